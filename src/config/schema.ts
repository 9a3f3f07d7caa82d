/**
 * The one configuration schema of outbox-relay (convict). Every key has a default, an environment
 * variable and a doc string; README.md's configuration reference is generated from the same facts by
 * `npm run docs` (scripts/config-reference.mjs), and a test fails when the two drift apart.
 */

/** A schema leaf in convict's shape, narrowed to what we use. */
export interface SchemaLeaf {
  doc: string;
  format: unknown;
  default: unknown;
  env?: string;
  sensitive?: boolean;
  nullable?: boolean;
}

export const NOTIFY_MODES = ['always', 'idle', 'off'] as const;
export type NotifyMode = (typeof NOTIFY_MODES)[number];

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const NODE_ENVS = ['production', 'development', 'test'] as const;
export type NodeEnv = (typeof NODE_ENVS)[number];

export const SSL_MODES = ['disable', 'require', 'verify-full'] as const;
export type SslMode = (typeof SSL_MODES)[number];

export const schema = {
  env: {
    doc: 'Runtime environment. `production` turns on the strict checks: secrets must be present and strong, webhook targets must be https, `reset-db` is refused.',
    format: NODE_ENVS,
    default: 'development',
    env: 'NODE_ENV',
  },
  database: {
    url: {
      doc: 'PostgreSQL connection URL (`postgres://user:pass@host:port/db?sslmode=…`). When set it overrides every `DB_*` part (but a URL without a password takes `DB_PASSWORD`); its `sslmode` means what it means to libpq and psql (`require`: encrypted, certificate not checked; `verify-ca` needs `sslrootcert`) and wins over `DB_SSL`, except that nothing falls back: `prefer` is `require`, and `allow` is refused.',
      format: String,
      default: '',
      env: 'DATABASE_URL',
      sensitive: true,
    },
    host: { doc: 'PostgreSQL host.', format: String, default: 'localhost', env: 'DB_HOST' },
    port: { doc: 'PostgreSQL port.', format: 'port', default: 5432, env: 'DB_PORT' },
    name: { doc: 'Database name.', format: String, default: 'postgres', env: 'DB_NAME' },
    user: { doc: 'Database user.', format: String, default: 'postgres', env: 'DB_USER' },
    password: { doc: 'Database password. It also fills in a `DATABASE_URL` that has none, so that the URL can sit in an environment file and the password in a secret file or systemd credential.', format: String, default: '', env: 'DB_PASSWORD', sensitive: true },
    ssl: {
      doc: 'TLS to PostgreSQL: `disable`, `require` (encrypted, certificate not checked) or `verify-full`.',
      format: SSL_MODES,
      default: 'disable',
      env: 'DB_SSL',
    },
    poolMax: { doc: 'Connections in the pool (the LISTEN connection is extra).', format: 'nat', default: 10, env: 'DB_POOL_MAX' },
    connectTimeoutMs: { doc: 'Give up connecting after this long.', format: 'nat', default: 10_000, env: 'DB_CONNECT_TIMEOUT_MS' },
    statementTimeoutMs: {
      doc: 'Server-side statement_timeout for the relay\'s own statements (0 = none).',
      format: 'nat',
      default: 30_000,
      env: 'DB_STATEMENT_TIMEOUT_MS',
    },
    applicationName: { doc: 'application_name shown in pg_stat_activity.', format: String, default: 'outbox-relay', env: 'DB_APPLICATION_NAME' },
  },
  secrets: {
    jwtSecret: {
      doc: 'HMAC key of the pull API\'s bearer tokens (HS256). Required by `api` and `api token`; checked by `validate-env`.',
      format: String,
      default: '',
      env: 'JWT_SECRET',
      sensitive: true,
    },
    refreshTokenSecret: {
      doc: 'The application\'s refresh-token key (kept for the seed\'s contract; only `validate-env` checks it).',
      format: String,
      default: '',
      env: 'REFRESH_TOKEN_SECRET',
      sensitive: true,
    },
    tenantHashSalt: {
      doc: 'Salt of the tenant hash (`tenants hash`). Changing it changes every tenant\'s schema name.',
      format: String,
      default: '',
      env: 'TENANT_HASH_SALT',
      sensitive: true,
    },
    tenantEntropySource: {
      doc: 'Per-deployment string mixed into the tenant hash key, so two deployments never share schema names.',
      format: String,
      default: '',
      env: 'TENANT_ENTROPY_SOURCE',
      sensitive: true,
    },
    encryptionKeys: {
      doc: 'Keys that encrypt subscription signing secrets at rest (AES-256-GCM): `id:base64key,…`, 32-byte keys; the first encrypts, all decrypt. Required in production.',
      format: String,
      default: '',
      env: 'OUTBOX_ENCRYPTION_KEYS',
      sensitive: true,
    },
  },
  relay: {
    enabled: {
      doc: '`false` runs the daemon in standby: connected and ready, claiming nothing.',
      format: Boolean,
      default: true,
      env: 'ENABLE_OUTBOX_PROCESSING',
    },
    workerId: {
      doc: 'Name of this replica in leases and logs (default: hostname and pid).',
      format: String,
      default: '',
      env: 'RELAY_WORKER_ID',
    },
    fanoutBatchSize: {
      doc: 'New events fanned out to deliveries per statement.',
      format: 'nat',
      default: 1000,
      env: 'RELAY_FANOUT_BATCH_SIZE',
    },
    claimBatchSize: {
      doc: 'Most deliveries claimed per statement (each subscription also gets at most its free in-flight slots).',
      format: 'nat',
      default: 500,
      env: 'RELAY_CLAIM_BATCH_SIZE',
    },
    bufferBytes: {
      doc: 'Most payload bytes a relay holds in deliveries it leased and has not finished sending (its prefetch queues and requests in flight), shared equally among the active subscriptions; a subscription at its share claims nothing more until sends finish, and a single larger payload still goes, alone. Bounds memory with rows of megabytes. 0 turns the bound off.',
      format: 'nat',
      default: 33_554_432,
      env: 'RELAY_BUFFER_BYTES',
    },
    leaseMs: {
      doc: 'How long a claim is held. Must exceed the longest webhook timeout; work of a crashed replica resumes after it.',
      format: 'nat',
      default: 30_000,
      env: 'RELAY_LEASE_MS',
    },
    pollIntervalMs: {
      doc: 'Safety poll while idle: NOTIFY is only a latency hint, this bounds the delay when one is missed.',
      format: 'nat',
      default: 2_000,
      env: 'RELAY_POLL_INTERVAL_MS',
    },
    notifyMode: {
      doc: 'When capture triggers NOTIFY: `idle` (only while a relay waits; cheap under load), `always` (every capturing statement), `off` (poll only).',
      format: NOTIFY_MODES,
      default: 'idle',
      env: 'RELAY_NOTIFY_MODE',
    },
    shutdownTimeoutMs: {
      doc: 'On SIGTERM, how long in-flight sends may take before they are aborted and their leases released.',
      format: 'nat',
      default: 20_000,
      env: 'RELAY_SHUTDOWN_TIMEOUT_MS',
    },
  },
  webhook: {
    timeoutMs: {
      doc: 'Default whole-request timeout of new subscriptions (headers and body).',
      format: 'nat',
      default: 10_000,
      env: 'WEBHOOK_TIMEOUT_MS',
    },
    connectTimeoutMs: { doc: 'TCP/TLS connect timeout.', format: 'nat', default: 5_000, env: 'WEBHOOK_CONNECT_TIMEOUT_MS' },
    maxResponseBytes: {
      doc: 'Response bodies are read up to this many bytes (kept for the error message), the rest discarded.',
      format: 'nat',
      default: 8_192,
      env: 'WEBHOOK_MAX_RESPONSE_BYTES',
    },
    maxInFlight: {
      doc: 'Default in-flight limit of new subscriptions (per replica).',
      format: 'nat',
      default: 32,
      env: 'WEBHOOK_MAX_IN_FLIGHT',
    },
    allowPrivateTargets: {
      doc: 'Allow targets that resolve to loopback, private, link-local or metadata addresses (SSRF guard off). For tests and the demo.',
      format: Boolean,
      default: false,
      env: 'WEBHOOK_ALLOW_PRIVATE_TARGETS',
    },
    allowHttp: {
      doc: 'Allow plain http targets in production (always allowed outside production).',
      format: Boolean,
      default: false,
      env: 'WEBHOOK_ALLOW_HTTP',
    },
    secretGraceMs: {
      doc: 'After `rotate-secret`, the old secret keeps signing (beside the new one) for this long.',
      format: 'nat',
      default: 86_400_000,
      env: 'WEBHOOK_SECRET_GRACE_MS',
    },
    circuitFailureThreshold: {
      doc: 'Consecutive failed attempts that open a subscription\'s circuit.',
      format: 'nat',
      default: 5,
      env: 'CIRCUIT_FAILURE_THRESHOLD',
    },
    circuitCooldownMs: {
      doc: 'First wait before a half-open probe; doubles while probes fail.',
      format: 'nat',
      default: 5_000,
      env: 'CIRCUIT_COOLDOWN_MS',
    },
    circuitMaxCooldownMs: {
      doc: 'Longest wait between probes of an open circuit.',
      format: 'nat',
      default: 300_000,
      env: 'CIRCUIT_MAX_COOLDOWN_MS',
    },
  },
  retry: {
    baseMs: { doc: 'First retry delay ceiling; doubles per attempt (full jitter).', format: 'nat', default: 10_000, env: 'RETRY_BASE_MS' },
    maxMs: { doc: 'Ceiling of one retry delay.', format: 'nat', default: 21_600_000, env: 'RETRY_MAX_MS' },
    maxAttempts: {
      doc: 'Attempts per delivery before it is dead (stamped on each event as `max_attempts`). The defaults span about a day.',
      format: 'nat',
      default: 20,
      env: 'RETRY_MAX_ATTEMPTS',
    },
    retryAfterMaxMs: {
      doc: 'Longest `Retry-After` honoured; longer values are cut to this.',
      format: 'nat',
      default: 3_600_000,
      env: 'RETRY_AFTER_MAX_MS',
    },
  },
  metrics: {
    enabled: { doc: 'Serve /metrics, /healthz and /readyz.', format: Boolean, default: true, env: 'METRICS_ENABLED' },
    port: { doc: 'Metrics port of the daemon (0 = any free port).', format: 'port', default: 9464, env: 'METRICS_PORT' },
    host: { doc: 'Address the metrics port binds to.', format: String, default: '0.0.0.0', env: 'METRICS_HOST' },
  },
  api: {
    port: { doc: 'Port of the pull API sidecar (`outbox-relay api`).', format: 'port', default: 3000, env: 'PORT' },
    host: { doc: 'Address the pull API binds to.', format: String, default: '0.0.0.0', env: 'API_HOST' },
    jwtTenantClaim: {
      doc: 'Claim of the bearer token that holds the tenant (its schema name). The tenant comes from the token only.',
      format: String,
      default: 'tenant',
      env: 'API_JWT_TENANT_CLAIM',
    },
    jwtUserClaim: {
      doc: 'Claim of the bearer token that holds the user id (an integer, or a string of one); anything else is refused (401).',
      format: String,
      default: 'sub',
      env: 'API_JWT_USER_CLAIM',
    },
    jwtClockSkewSeconds: {
      doc: 'Leeway for `exp` and `nbf` between the issuing application\'s clock and ours (at most 300).',
      format: 'nat',
      default: 30,
      env: 'API_JWT_CLOCK_SKEW_SECONDS',
    },
    jwtIssuer: { doc: 'When set, tokens must carry this `iss`.', format: String, default: '', env: 'API_JWT_ISSUER' },
    jwtAudience: { doc: 'When set, tokens must carry this `aud`.', format: String, default: '', env: 'API_JWT_AUDIENCE' },
    rateLimitPerSecond: {
      doc: 'Requests per second allowed to each token holder (tenant and user), refilled continuously; 0 turns the limit off. Over it: 429 with Retry-After.',
      format: 'nat',
      default: 100,
      env: 'API_RATE_LIMIT_PER_SECOND',
    },
    rateLimitBurst: {
      doc: 'Requests a token holder may make at once above the steady rate (the bucket size).',
      format: 'nat',
      default: 200,
      env: 'API_RATE_LIMIT_BURST',
    },
    bodyLimitBytes: {
      doc: 'Largest request body accepted (413 above it). Acknowledgment metadata is limited to 10 KB on its own.',
      format: 'nat',
      default: 16_384,
      env: 'API_BODY_LIMIT_BYTES',
    },
    requestTimeoutMs: {
      doc: 'Longest a request may take, from its first byte to the response (503 after it); also the statement_timeout of the sidecar\'s queries.',
      format: 'nat',
      default: 10_000,
      env: 'API_REQUEST_TIMEOUT_MS',
    },
    totalCacheMs: {
      doc: 'How long a count for `pagination.total` (when more pages follow) is reused before it is recounted in the background; an older count is answered once meanwhile. Counting a large tenant costs a scan. 0 counts on every request. The last page\'s total is always exact.',
      format: 'nat',
      default: 2_000,
      env: 'API_TOTAL_CACHE_MS',
    },
  },
  retention: {
    enabled: { doc: 'Run the retention job on its schedule inside `run` (not on standby relays).', format: Boolean, default: true, env: 'RETENTION_ENABLED' },
    days: { doc: 'Processed events older than this are deleted (with their acknowledgments).', format: 'nat', default: 30, env: 'RETENTION_DAYS' },
    deadDays: {
      doc: 'Events with dead deliveries are kept this long, for `replay`.',
      format: 'nat',
      default: 90,
      env: 'RETENTION_DEAD_DAYS',
    },
    schedule: { doc: 'Cron expression of the retention job.', format: String, default: '17 3 * * *', env: 'RETENTION_SCHEDULE' },
    batchSize: { doc: 'Rows deleted per short transaction.', format: 'nat', default: 5_000, env: 'RETENTION_BATCH_SIZE' },
  },
  log: {
    level: { doc: 'pino log level.', format: LOG_LEVELS, default: 'info', env: 'LOG_LEVEL' },
  },
} as const;

/** The resolved, validated and frozen configuration passed down from the CLI. */
export interface Config {
  env: NodeEnv;
  database: {
    url: string;
    host: string;
    port: number;
    name: string;
    user: string;
    password: string;
    ssl: SslMode;
    poolMax: number;
    connectTimeoutMs: number;
    statementTimeoutMs: number;
    applicationName: string;
  };
  secrets: {
    jwtSecret: string;
    refreshTokenSecret: string;
    tenantHashSalt: string;
    tenantEntropySource: string;
    encryptionKeys: string;
  };
  relay: {
    enabled: boolean;
    workerId: string;
    fanoutBatchSize: number;
    claimBatchSize: number;
    bufferBytes: number;
    leaseMs: number;
    pollIntervalMs: number;
    notifyMode: NotifyMode;
    shutdownTimeoutMs: number;
  };
  webhook: {
    timeoutMs: number;
    connectTimeoutMs: number;
    maxResponseBytes: number;
    maxInFlight: number;
    allowPrivateTargets: boolean;
    allowHttp: boolean;
    secretGraceMs: number;
    circuitFailureThreshold: number;
    circuitCooldownMs: number;
    circuitMaxCooldownMs: number;
  };
  retry: {
    baseMs: number;
    maxMs: number;
    maxAttempts: number;
    retryAfterMaxMs: number;
  };
  metrics: { enabled: boolean; port: number; host: string };
  api: {
    port: number;
    host: string;
    jwtTenantClaim: string;
    jwtUserClaim: string;
    jwtClockSkewSeconds: number;
    jwtIssuer: string;
    jwtAudience: string;
    rateLimitPerSecond: number;
    rateLimitBurst: number;
    bodyLimitBytes: number;
    requestTimeoutMs: number;
    totalCacheMs: number;
  };
  retention: { enabled: boolean; days: number; deadDays: number; schedule: string; batchSize: number };
  log: { level: LogLevel };
}

/** One documented key: its dotted path and schema leaf. */
export interface SchemaEntry {
  path: string;
  leaf: SchemaLeaf;
}

function isLeaf(node: object): node is SchemaLeaf {
  return 'doc' in node && 'default' in node;
}

/**
 * Numeric limits beyond the format's, by key: checked at load (src/config/load.ts) and printed in the
 * README's configuration reference (scripts/config-reference.mjs), from this one place.
 */
export const BOUNDS: Readonly<Record<string, { min?: number; max?: number }>> = {
  'database.poolMax': { min: 2 },
  'relay.fanoutBatchSize': { min: 1, max: 10_000 },
  'relay.claimBatchSize': { min: 1, max: 10_000 },
  'relay.pollIntervalMs': { min: 50 },
  'webhook.timeoutMs': { min: 100 },
  'webhook.maxInFlight': { min: 1, max: 1_000 },
  'webhook.circuitFailureThreshold': { min: 1 },
  'retry.maxAttempts': { min: 1, max: 1_000 },
  'retry.baseMs': { min: 1 },
  'retention.batchSize': { min: 1 },
  'retention.days': { min: 1 },
  'api.jwtClockSkewSeconds': { max: 300 },
  'api.bodyLimitBytes': { min: 1_024, max: 10_485_760 },
  'api.requestTimeoutMs': { min: 100 },
};

/** Every leaf of the schema in declaration order. */
export function schemaEntries(node: object = schema, prefix = ''): SchemaEntry[] {
  const out: SchemaEntry[] = [];
  for (const [key, child] of Object.entries(node)) {
    const path = prefix ? `${prefix}.${key}` : key;
    if (isLeaf(child as object)) out.push({ path, leaf: child as SchemaLeaf });
    else out.push(...schemaEntries(child as object, path));
  }
  return out;
}

/** Environment variable names of the secrets; each may also be given as `<NAME>_FILE`. */
export function sensitiveEnvNames(): string[] {
  return schemaEntries()
    .filter((e) => e.leaf.sensitive && e.leaf.env)
    .map((e) => e.leaf.env as string);
}

/**
 * Resolves the configuration once at start-up: defaults, then a JSON file (`--config` / `CONFIG_FILE`),
 * then the environment (which wins), with every secret also readable from `<NAME>_FILE` or a systemd
 * credential. The result is validated, frozen and passed down; no other module reads `process.env`.
 */
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import convict from 'convict';
import cron from 'node-cron';
import { ConfigError } from '../errors.js';
import { parseKeyring } from '../subscriptions/secretCipher.js';
import { BOUNDS, schema, schemaEntries, sensitiveEnvNames, type Config } from './schema.js';

export type Env = Readonly<Record<string, string | undefined>>;

export interface LoadOptions {
  /** Path of a JSON config file; falls back to `CONFIG_FILE`. */
  configFile?: string | undefined;
  /** The environment to read (default: process.env). */
  env?: Env;
  /**
   * More checks of the loaded values, reported with the others in one ConfigError (validate-env
   * adds the secrets' strength, so that a malformed key does not hide a weak secret).
   */
  checks?: (config: Config) => string[];
}

const TRUE_WORDS = new Set(['true', '1', 'yes', 'on']);
const FALSE_WORDS = new Set(['false', '0', 'no', 'off']);

/** A secret's value from `<NAME>_FILE` or `$CREDENTIALS_DIRECTORY/<NAME>`; strips one trailing newline. */
function readSecretFile(name: string, path: string): string {
  try {
    return readFileSync(path, 'utf8').replace(/\r?\n$/, '');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'error';
    throw new ConfigError(`${name}: cannot read ${path} (${code})`);
  }
}

/**
 * Strict reading of a boolean or whole-number setting given as text (convict's own coercion reads
 * `0` or `no` as true and `54x` as 54). Undefined for settings of other formats.
 */
function strictText(format: unknown, raw: string): { value: boolean | number } | { error: string } | undefined {
  if (format === Boolean) {
    const word = raw.trim().toLowerCase();
    if (TRUE_WORDS.has(word)) return { value: true };
    if (FALSE_WORDS.has(word)) return { value: false };
    return { error: 'expected true or false' };
  }
  if (format === 'nat' || format === 'port') {
    return /^\d+$/.test(raw.trim()) ? { value: Number(raw.trim()) } : { error: 'expected a whole number' };
  }
  return undefined;
}

/**
 * Builds the environment convict sees: secrets resolved from files, booleans and numbers checked
 * strictly (convict would read `ENABLE_OUTBOX_PROCESSING=0` as true and `DB_PORT=54x` as 54).
 */
function resolveEnv(env: Env): { env: Record<string, string>; problems: string[] } {
  const out: Record<string, string> = {};
  const problems: string[] = [];
  for (const [k, v] of Object.entries(env)) if (v !== undefined) out[k] = v;

  const credDir = env.CREDENTIALS_DIRECTORY;
  for (const name of sensitiveEnvNames()) {
    const fileVar = `${name}_FILE`;
    const direct = env[name];
    const file = env[fileVar];
    if (file !== undefined && file !== '') {
      if (direct !== undefined && direct !== '') {
        problems.push(`${name} and ${fileVar} are both set; set only one`);
        continue;
      }
      try {
        out[name] = readSecretFile(fileVar, file);
      } catch (err) {
        problems.push((err as ConfigError).message);
      }
    } else if ((direct === undefined || direct === '') && credDir) {
      // systemd LoadCredential=NAME:/path makes $CREDENTIALS_DIRECTORY/NAME available to the service.
      try {
        out[name] = readFileSync(join(credDir, name), 'utf8').replace(/\r?\n$/, '');
      } catch (err) {
        // No credential of that name: the secret stays unset. One that exists but cannot be read is a
        // problem (reporting it as "missing" later would send the operator looking in the wrong place).
        const code = (err as NodeJS.ErrnoException).code ?? 'error';
        if (code !== 'ENOENT') problems.push(`${name}: cannot read credential ${join(credDir, name)} (${code})`);
      }
    }
  }

  for (const { path, leaf } of schemaEntries()) {
    if (!leaf.env) continue;
    const raw = out[leaf.env];
    if (raw === undefined) continue;
    const parsed = strictText(leaf.format, raw);
    if (parsed === undefined) continue;
    if ('error' in parsed) {
      problems.push(`${leaf.env} (${path}): ${parsed.error}, got ${leaf.sensitive ? '[hidden]' : JSON.stringify(raw)}`);
      // Reported once, here: convict would otherwise report (or silently coerce) the same value again.
      delete out[leaf.env];
    } else out[leaf.env] = typeof parsed.value === 'boolean' ? String(parsed.value) : raw.trim();
  }
  return { env: out, problems };
}

function readConfigFile(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`config file ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text) as unknown;
  } catch (err) {
    throw new ConfigError(`config file ${path}: not valid JSON (${jsonErrorWhere(text, (err as Error).message)})`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new ConfigError(`config file ${path}: must contain a JSON object, like {"database": {"host": "db"}}`);
  }
  return parsed as Record<string, unknown>;
}

/**
 * What is wrong with a JSON text and where, without quoting it: V8's messages embed a piece of the
 * file (`Unexpected token 'x', "…" is not valid JSON`), and config files hold secrets.
 */
function jsonErrorWhere(text: string, message: string): string {
  // Cut V8's snippet (`, "…"`, `, …"…"`) and the offending character itself (it is the file's, not syntax).
  const what =
    (message.split(/,\s*(?:\.\.\.)?"|\s+in JSON\b|\s+at position\b|\s+is not valid JSON/)[0] ?? '').replace(/^(Unexpected token)\s*'.*'$/, '$1').trim() || 'syntax error';
  const at = /at position (\d+)/.exec(message);
  if (!at) return what;
  const before = text.slice(0, Number(at[1]));
  const line = before.split('\n').length;
  const column = before.length - before.lastIndexOf('\n');
  return `${what} at line ${line}, column ${column}`;
}

/**
 * The file's strings for boolean and number keys get the environment's strict reading (convict alone
 * would load `"enabled": "no"` as true and `"port": "54x"` as 54). Bad ones are reported and dropped.
 */
function strictFileValues(file: string, data: Record<string, unknown>): string[] {
  const problems: string[] = [];
  for (const { path, leaf } of schemaEntries()) {
    const keys = path.split('.');
    const last = keys.pop() as string;
    let parent: unknown = data;
    for (const k of keys) parent = parent && typeof parent === 'object' ? (parent as Record<string, unknown>)[k] : undefined;
    if (!parent || typeof parent !== 'object') continue;
    const holder = parent as Record<string, unknown>;
    const raw = holder[last];
    if (typeof raw !== 'string') continue;
    const parsed = strictText(leaf.format, raw);
    if (parsed === undefined) continue;
    if ('error' in parsed) {
      problems.push(`${path}${leaf.env ? ` (${leaf.env})` : ''}: ${parsed.error} in config file ${file}, got ${leaf.sensitive ? '[hidden]' : JSON.stringify(raw)}`);
      delete holder[last];
    } else holder[last] = parsed.value;
  }
  return problems;
}

/** Env var name of a dotted key, for messages that tell the user what to change. */
function envNameOf(path: string): string | undefined {
  return schemaEntries().find((e) => e.path === path)?.leaf.env;
}

/** Turns convict's multi-line validation message into one clear problem per key. */
function convictProblems(message: string): string[] {
  return message
    .split('\n')
    .map((line) => line.trim())
    .filter(Boolean)
    .map((line) => {
      const m = /^([\w.]+): (.*)$/.exec(line);
      if (m && m[1] && m[2]) {
        const env = envNameOf(m[1]);
        return env ? `${m[1]} (${env}): ${m[2]}` : `${m[1]}: ${m[2]}`;
      }
      const undeclared = /configuration param '([^']+)' not declared in the schema/.exec(line);
      if (undeclared) return `unknown configuration key "${undeclared[1]}"`;
      return line;
    });
}

/** Values outside BOUNDS, each as `key (ENV): must be …`. */
function boundsProblems(c: Config): string[] {
  const envOf = new Map(schemaEntries().map((e) => [e.path, e.leaf.env]));
  const problems: string[] = [];
  for (const [path, { min, max }] of Object.entries(BOUNDS)) {
    const value = path.split('.').reduce<unknown>((o, k) => (o as Record<string, unknown>)[k], c) as number;
    if ((min === undefined || value >= min) && (max === undefined || value <= max)) continue;
    const range = min !== undefined && max !== undefined ? `be ${min} to ${max}` : min !== undefined ? `be at least ${min}` : `be at most ${max}`;
    problems.push(`${path} (${envOf.get(path) ?? '?'}): must ${range}`);
  }
  return problems;
}

function checkDatabaseUrl(url: string): string | undefined {
  if (!url) return undefined;
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return 'database.url (DATABASE_URL): not a valid URL (expected postgres://user:password@host:port/database)';
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') {
    return `database.url (DATABASE_URL): scheme must be postgres:// or postgresql://, got ${parsed.protocol}//`;
  }
  return checkSslMode(parsed.searchParams);
}

/**
 * A URL's sslmode, read with libpq's meanings (see withLibpqSslModes). node-postgres cannot fall back
 * from one mode to another while connecting, so libpq's `allow` (plain text first) has no equivalent,
 * and `prefer` is TLS without a certificate check that does not fall back to plain text.
 */
function checkSslMode(params: URLSearchParams): string | undefined {
  const mode = params.get('sslmode');
  if (mode === null || params.has('uselibpqcompat')) return undefined;
  const key = 'database.url (DATABASE_URL)';
  if (mode === 'allow') {
    return `${key}: sslmode=allow (plain text, TLS only if the server insists) is not supported: use sslmode=disable or sslmode=require`;
  }
  if (!['disable', 'prefer', 'require', 'verify-ca', 'verify-full'].includes(mode)) {
    return `${key}: sslmode=${mode} is not one of disable, prefer, require, verify-ca, verify-full`;
  }
  if (mode === 'verify-ca' && !params.get('sslrootcert')) {
    return `${key}: sslmode=verify-ca needs sslrootcert=<CA file> (or use sslmode=verify-full, which checks the host name against the system's CAs)`;
  }
  return undefined;
}

/** JWT registered claims: a tenant or user claim of one of these names would be a mistake. */
const RESERVED_CLAIMS = new Set(['exp', 'nbf', 'iat', 'iss', 'aud', 'jti']);

/** The pull API's keys (`outbox-relay api`). */
function apiChecks(a: Config['api']): string[] {
  const problems: string[] = [];
  for (const [key, env, claim] of [['jwtTenantClaim', 'API_JWT_TENANT_CLAIM', a.jwtTenantClaim], ['jwtUserClaim', 'API_JWT_USER_CLAIM', a.jwtUserClaim]] as const) {
    if (!/^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$/.test(claim)) problems.push(`api.${key} (${env}): must be a claim name (letters, digits, _ . : -), got ${JSON.stringify(claim)}`);
    else if (RESERVED_CLAIMS.has(claim)) problems.push(`api.${key} (${env}): "${claim}" is a registered JWT claim, not a tenant or user`);
  }
  if (a.jwtTenantClaim === a.jwtUserClaim) problems.push('api.jwtUserClaim (API_JWT_USER_CLAIM): must differ from api.jwtTenantClaim (API_JWT_TENANT_CLAIM)');
  if (a.rateLimitPerSecond > 0 && a.rateLimitBurst < 1) problems.push('api.rateLimitBurst (API_RATE_LIMIT_BURST): must be at least 1 while the rate limit is on');
  return problems;
}

/** Relations between keys that no single format can express. */
function crossChecks(c: Config): string[] {
  const problems: string[] = [];
  const urlProblem = checkDatabaseUrl(c.database.url);
  if (urlProblem) problems.push(urlProblem);
  problems.push(...boundsProblems(c));
  if (c.secrets.encryptionKeys) {
    try {
      parseKeyring(c.secrets.encryptionKeys);
    } catch (err) {
      problems.push(`secrets.encryptionKeys (OUTBOX_ENCRYPTION_KEYS): ${(err as ConfigError).message.replace(/^OUTBOX_ENCRYPTION_KEYS:? ?/, '')}`);
    }
  }
  if (c.relay.leaseMs < c.webhook.timeoutMs + 1_000) {
    problems.push(`relay.leaseMs (RELAY_LEASE_MS): must exceed webhook.timeoutMs (WEBHOOK_TIMEOUT_MS) by at least 1000 ms, or a slow send would be re-claimed by another replica`);
  }
  if (c.webhook.circuitCooldownMs > c.webhook.circuitMaxCooldownMs) {
    problems.push('webhook.circuitCooldownMs (CIRCUIT_COOLDOWN_MS): must not exceed webhook.circuitMaxCooldownMs (CIRCUIT_MAX_COOLDOWN_MS)');
  }
  if (c.retry.baseMs > c.retry.maxMs) problems.push('retry.baseMs (RETRY_BASE_MS): must not exceed retry.maxMs (RETRY_MAX_MS)');
  if (!cron.validate(c.retention.schedule)) problems.push(`retention.schedule (RETENTION_SCHEDULE): not a valid cron expression: ${JSON.stringify(c.retention.schedule)}`);
  if (c.retention.deadDays < c.retention.days) problems.push('retention.deadDays (RETENTION_DEAD_DAYS): must be at least retention.days (RETENTION_DAYS)');
  problems.push(...apiChecks(c.api));
  return problems;
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

/**
 * Loads, validates and freezes the configuration. Throws {@link ConfigError} naming every offending
 * key (never a secret's value).
 */
export function loadConfig(options: LoadOptions = {}): Config {
  const rawEnv = options.env ?? process.env;
  const { env, problems } = resolveEnv(rawEnv);
  // convict reads env and args itself; give it our resolved env and no argv (the CLI owns argv).
  const conf = convict(schema as unknown as convict.Schema<Config>, { env, args: [] });
  const file = options.configFile ?? rawEnv.CONFIG_FILE;
  if (file) {
    try {
      const data = readConfigFile(file);
      problems.push(...strictFileValues(file, data));
      conf.load(data as Partial<Config>);
    } catch (err) {
      // Collected, not thrown: every problem (file and environment alike) is reported at once.
      if (err instanceof ConfigError) problems.push(...err.problems);
      else problems.push(...convictProblems((err as Error).message));
    }
  }
  try {
    conf.validate({ allowed: 'strict' });
  } catch (err) {
    problems.push(...convictProblems((err as Error).message));
  }

  const config = conf.getProperties() as Config;
  if (!config.relay.workerId) config.relay.workerId = `${hostname()}:${process.pid}`;
  // Cross-field checks run even when single keys failed (so a bad DATABASE_URL is not hidden behind
  // a bad DB_PORT), but say nothing more about a key that already has a problem.
  const reported = new Set(problems.flatMap((p) => /^([\w.]+) \(([\w.]+)\)/.exec(p)?.slice(1, 3) ?? []));
  problems.push(...crossChecks(config).filter((p) => !reported.has(/^([\w.]+)/.exec(p)?.[1] ?? '')));
  if (options.checks) problems.push(...options.checks(config));
  if (problems.length > 0) throw new ConfigError(problems);
  return deepFreeze(config);
}

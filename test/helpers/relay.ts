/**
 * Shared pieces of the relay engine's integration tests: the environment with small timings, tenants
 * with captured tables, subscriptions, relays in-process (RelayDaemon) or as processes
 * (`node dist/cli.js run`), and a bounded polling wait. Everything started here is stopped at
 * teardown, also when the test fails.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { loadConfig } from '../../src/config/load.js';
import type { Config } from '../../src/config/schema.js';
import { RelayDaemon } from '../../src/daemon/relayDaemon.js';
import { createLogger } from '../../src/log.js';
import type { Relay } from '../../src/relay/relay.js';
import { addSubscription, type NewSubscription } from '../../src/subscriptions/store.js';
import { generateSigningSecret } from '../../src/webhook/secret.js';
import { packageVersion } from '../../src/cli/version.js';
import { CLI, cleanEnv } from './cli.js';
import type { TestContext, TestDatabase } from './db.js';
import { LogLines } from './logLines.js';

export { LogLines };

/** Small timings, so retries, leases and circuits play out within seconds. */
export const FAST_ENV: Readonly<Record<string, string>> = {
  NODE_ENV: 'test',
  LOG_LEVEL: 'warn',
  RETRY_BASE_MS: '50',
  RETRY_MAX_MS: '500',
  RETRY_MAX_ATTEMPTS: '5',
  WEBHOOK_TIMEOUT_MS: '500',
  WEBHOOK_CONNECT_TIMEOUT_MS: '500',
  // Leases outlast twice the subscriptions' default test timeout (see subscribe): a claimed delivery
  // may wait a timeout in the prefetch queue, then take one (tests that need quick lease expiry,
  // kill -9, set their own lease and 500 ms timeouts).
  RELAY_LEASE_MS: '12000',
  RELAY_POLL_INTERVAL_MS: '200',
  RELAY_SHUTDOWN_TIMEOUT_MS: '5000',
  CIRCUIT_COOLDOWN_MS: '300',
  CIRCUIT_MAX_COOLDOWN_MS: '1000',
  WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true',
  METRICS_ENABLED: 'false',
  METRICS_PORT: '0',
  RETENTION_ENABLED: 'false',
};

export function relayEnv(databaseUrl: string, extra: Record<string, string> = {}): Record<string, string> {
  return { ...FAST_ENV, DATABASE_URL: databaseUrl, ...extra };
}

/** Polls `cond` until it holds; fails with `what` (and `describe()`) after `timeoutMs`. */
export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string, describe?: () => unknown): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) {
      let detail = '';
      if (describe) {
        try {
          detail = ` (${JSON.stringify(await describe())})`;
        } catch (err) {
          detail = ` (describe failed: ${String(err)})`;
        }
      }
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

export interface InProcessRelay {
  daemon: RelayDaemon;
  relay: Relay;
  config: Config;
  logs: LogLines;
  stop(): Promise<void>;
}

/** A relay in this process (RelayDaemon, as `run` builds it), stopped at teardown. */
export async function startRelay(t: TestContext, databaseUrl: string, extra: Record<string, string> = {}): Promise<InProcessRelay> {
  const config = loadConfig({ env: relayEnv(databaseUrl, { RELAY_WORKER_ID: `test-${randomBytes(4).toString('hex')}`, ...extra }) });
  const logs = new LogLines();
  const logger = createLogger({ level: config.log.level, destination: logs.stream });
  const daemon = new RelayDaemon({ config, logger, version: packageVersion() });
  t.teardown(() => daemon.stop().catch(() => undefined));
  await daemon.start();
  return { daemon, relay: daemon.relay, config, logs, stop: () => daemon.stop() };
}

export interface RelayProcess {
  child: ChildProcess;
  logs: LogLines;
  stderr(): string;
  /** Resolves with the exit code (null when killed by a signal) and signal. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  readonly running: boolean;
  kill(signal?: NodeJS.Signals): void;
  /** Waits for a log line; fails at once if the process exits first. */
  waitForLog(msg: string | RegExp, timeoutMs: number): Promise<void>;
  /** State for failure messages: running, exit, stderr and the last log lines. */
  diag(): Record<string, unknown>;
}

/** `node dist/cli.js run` as a child process; SIGKILLed at teardown if still running. */
export function spawnRelay(t: TestContext, databaseUrl: string, extra: Record<string, string> = {}, args: string[] = []): RelayProcess {
  const env = cleanEnv(relayEnv(databaseUrl, extra));
  const child = spawn(process.execPath, [CLI, 'run', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = new LogLines();
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => logs.push(d.toString('utf8')));
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  let running = true;
  let exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => {
      running = false;
      exit = { code, signal };
      resolve(exit);
    });
  });
  const diag = () => ({ running, exit, stderr: stderr.slice(-2000), lastLogs: logs.lines.slice(-10) });
  t.teardown(async () => {
    if (running) {
      child.kill('SIGKILL');
      await exited;
    }
  });
  return {
    child,
    logs,
    stderr: () => stderr,
    exited,
    get running() {
      return running;
    },
    kill(signal: NodeJS.Signals = 'SIGTERM') {
      if (running) child.kill(signal);
    },
    async waitForLog(msg: string | RegExp, timeoutMs: number) {
      await waitFor(() => {
        if (logs.has(msg)) return true;
        if (!running) throw new Error(`the relay process exited before logging ${String(msg)}: ${JSON.stringify(diag())}`);
        return false;
      }, timeoutMs, `the relay to log ${String(msg)}`, diag);
    },
    diag,
  };
}

/** A tenant schema with two captured tables: vendors and projects (id int primary key). */
export async function createTenant(db: TestDatabase, schema: string): Promise<void> {
  await db.query(`
    CREATE SCHEMA ${schema};
    CREATE TABLE ${schema}.vendors (id integer PRIMARY KEY, name text NOT NULL, seq integer NOT NULL DEFAULT 0);
    CREATE TABLE ${schema}.projects (id integer PRIMARY KEY, title text NOT NULL, seq integer NOT NULL DEFAULT 0);
    SELECT public.outbox_install_capture('${schema}', 'vendors'), public.outbox_install_capture('${schema}', 'projects');
  `);
}

export interface Subscription {
  id: number;
  secret: string;
}

/**
 * Creates a subscription through the library (the CLI path has its own tests). The default timeout is
 * a generous 5 s, so that a loaded test machine (an event-loop stall) does not turn into retries that
 * exact counts would trip over; tests about timeouts give their own (e.g. 500 ms).
 */
export async function subscribe(db: TestDatabase, input: Omit<NewSubscription, 'secret'> & { secret?: string }): Promise<Subscription> {
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  try {
    return await addSubscription(
      client,
      { secret: generateSigningSecret(), timeoutMs: 5000, ...input },
      { production: false, allowHttp: true, allowPrivateTargets: true },
      { maxInFlight: 32, timeoutMs: 5000 },
    );
  } finally {
    await client.end();
  }
}

/** Runs SQL statements one after another on one connection (each its own transaction, in order). */
export async function writeAll(db: { url: string }, statements: string[]): Promise<void> {
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  try {
    for (const s of statements) await client.query(s);
  } finally {
    await client.end();
  }
}

export async function count(db: TestDatabase, sql: string, params: unknown[] = []): Promise<number> {
  const { rows } = await db.query<{ n: number }>(sql, params);
  return Number(rows[0]?.n ?? 0);
}

/** Events not processed yet (in every tenant). */
export const unprocessed = (db: TestDatabase): Promise<number> => count(db, 'SELECT count(*)::int AS n FROM public.outbox_events WHERE processed_at IS NULL');

/** A tenant's event ids, in order, as text. */
export async function eventIds(db: TestDatabase, tenant: string): Promise<string[]> {
  const { rows } = await db.query<{ id: string }>('SELECT id::text FROM public.outbox_events WHERE tenant = $1 ORDER BY outbox_events.id', [tenant]);
  return rows.map((r) => r.id);
}

/** Groups requests by webhook-id. */
export function byWebhookId<T extends { webhookId: string }>(requests: readonly T[]): Map<string, T[]> {
  const m = new Map<string, T[]>();
  for (const r of requests) {
    const list = m.get(r.webhookId);
    if (list) list.push(r);
    else m.set(r.webhookId, [r]);
  }
  return m;
}

/** The webhook-id of an event delivered to a subscription, as the contract defines it. */
export function expectedWebhookId(eventId: string | number, subscriptionId: number): string {
  return `msg_${eventId}_${subscriptionId}`;
}

/** A unique-ish schema name for a tenant. */
export function tenantName(prefix: string): string {
  return `${prefix}_${randomBytes(3).toString('hex')}`;
}

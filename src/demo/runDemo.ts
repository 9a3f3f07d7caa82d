/**
 * `outbox-relay demo`: the whole product in one command. An embedded PostgreSQL (or DATABASE_URL), the
 * migrations, a demo tenant with two captured tables, a local receiver that verifies signatures with
 * the standardwebhooks library, a subscription, the relay, and a steady writer; a live progress line
 * until Ctrl-C or --duration, then a summary.
 */
import { Writable } from 'node:stream';
import pg from 'pg';
import { installSchema } from '../capture/triggers.js';
import { loadConfig } from '../config/load.js';
import { createPool } from '../db/connection.js';
import { startEmbeddedPostgres, type EmbeddedServer } from '../db/embeddedPostgres.js';
import { migrate } from '../db/migrate.js';
import { createLogger } from '../log.js';
import { Relay } from '../relay/relay.js';
import { addSubscription, disableSubscription, removeSubscription } from '../subscriptions/store.js';
import { generateSigningSecret } from '../webhook/secret.js';
import { quantile, startDemoReceiver } from './demoReceiver.js';

export interface DemoOptions {
  /** Seconds to run; 0 = until stopped. */
  durationSec: number;
  /** Row changes written per second. */
  rate: number;
  /** Share of requests the receiver fails on purpose (shows retries). */
  failRate: number;
  /** Use this database instead of an embedded one. */
  databaseUrl?: string;
  version: string;
  /** Resolves when the user asks to stop (Ctrl-C). */
  stopSignal: Promise<void>;
  out: (line: string) => void;
  /** Whether `out` is a terminal (then the progress line redraws in place). */
  tty: boolean;
}

export interface DemoSummary {
  written: number;
  delivered: number;
  badSignatures: number;
  duplicates: number;
  retries: number;
  orderViolations: number;
  p50Ms: number;
  p99Ms: number;
  acknowledgments: number;
  pendingAtEnd: number;
}

const TENANT = 'demo_tenant';
const USER_ID = 101;

const DEMO_TABLES = `
CREATE SCHEMA IF NOT EXISTS demo_tenant;
CREATE TABLE IF NOT EXISTS demo_tenant.vendors (
  id serial PRIMARY KEY, vendor_name text NOT NULL, risk_score numeric(5,2), tags text[], updated_at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS demo_tenant.projects (
  id serial PRIMARY KEY, title text NOT NULL, status text NOT NULL DEFAULT 'open', vendor_id integer);
`;

/** Human-readable warnings on stderr instead of JSON lines, for the person watching the demo. */
function prettyStream(out: (line: string) => void): Writable {
  return new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (!line) continue;
        try {
          const rec = JSON.parse(line) as { level: number; msg: string; [k: string]: unknown };
          const { level, msg, time: _t, pid: _p, name: _n, ...rest } = rec;
          const label = level >= 50 ? 'error' : level >= 40 ? 'warn' : 'info';
          const extra = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ');
          out(`  [relay ${label}] ${msg}${extra ? ` (${extra})` : ''}`);
        } catch {
          out(`  ${line}`);
        }
      }
      cb();
    },
  });
}

/**
 * One random row change, as an application would make; returns how many rows it changed (an update
 * or delete that finds no row changes none, and is captured as nothing).
 */
async function writeOne(pool: pg.Pool, random: () => number): Promise<number> {
  const r = random();
  let res: pg.QueryResult;
  if (r < 0.35) {
    res = await pool.query('INSERT INTO demo_tenant.vendors (vendor_name, risk_score, tags) VALUES ($1, $2, $3)', [
      `Vendor ${Math.floor(random() * 1e6)}`,
      (random() * 100).toFixed(2),
      ['demo', random() < 0.5 ? 'critical' : 'low'],
    ]);
  } else if (r < 0.75) {
    // Updates hit a few hot vendors, so per-aggregate ordering is exercised.
    res = await pool.query('UPDATE demo_tenant.vendors SET risk_score = $1, updated_at = now() WHERE id = (SELECT id FROM demo_tenant.vendors ORDER BY id LIMIT 1 OFFSET $2)', [
      (random() * 100).toFixed(2),
      Math.floor(random() * 5),
    ]);
  } else if (r < 0.95) {
    res = await pool.query('INSERT INTO demo_tenant.projects (title, vendor_id) VALUES ($1, $2)', [`Project ${Math.floor(random() * 1e6)}`, 1 + Math.floor(random() * 5)]);
  } else {
    res = await pool.query('DELETE FROM demo_tenant.projects WHERE id = (SELECT min(id) FROM demo_tenant.projects)');
  }
  return res.rowCount ?? 0;
}

const fmt = (n: number): string => n.toLocaleString('en-US');
const ms = (n: number): string => (Number.isNaN(n) ? '-' : `${n.toFixed(1)} ms`);

export async function runDemo(options: DemoOptions): Promise<DemoSummary> {
  const { out } = options;
  let server: EmbeddedServer | undefined;
  let url = options.databaseUrl;
  if (!url) {
    out('starting an embedded PostgreSQL (first run unpacks it; a few seconds)...');
    server = await startEmbeddedPostgres({ fast: true });
    url = server.url;
  }
  const cleanups: Array<() => Promise<unknown>> = [];
  try {
    const config = loadConfig({
      env: {
        NODE_ENV: 'development',
        DATABASE_URL: url,
        WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true',
        RETRY_BASE_MS: '500',
        RETRY_MAX_MS: '5000',
        RETRY_MAX_ATTEMPTS: '10',
        RELAY_POLL_INTERVAL_MS: '500',
        RELAY_WORKER_ID: 'demo',
        LOG_LEVEL: 'warn',
      },
    });
    const admin = new pg.Client({ connectionString: url });
    await admin.connect();
    cleanups.push(() => admin.end());
    const migrated = await migrate(admin);
    out(`database ready (${migrated.applied.length ? `applied ${migrated.applied.length} migrations` : 'schema up to date'})`);
    await admin.query(DEMO_TABLES);
    const capture = await installSchema(admin, TENANT);
    out(`capturing ${capture.installed.map((t) => `${t.schema}.${t.table}`).join(', ')}`);

    const secret = generateSigningSecret();
    const receiver = await startDemoReceiver(secret, options.failRate);
    cleanups.push(() => receiver.close());
    // A re-run against the same database (--database-url): replace the previous run's subscription
    // (what it had not delivered ends as failed, as a removal does; it is not sent to the new one).
    const previous = await admin.query<{ id: string }>('SELECT id::text FROM public.outbox_subscriptions WHERE tenant = $1 AND user_id = $2', [TENANT, USER_ID]);
    for (const { id } of previous.rows) {
      await disableSubscription(admin, id, 'replaced by a new demo run');
      await removeSubscription(admin, id);
    }
    const sub = await addSubscription(
      admin,
      { tenant: TENANT, userId: USER_ID, url: receiver.url, secret, events: 'vendors_*,projects_*' },
      { production: false, allowHttp: true, allowPrivateTargets: true },
      { maxInFlight: 32, timeoutMs: 5_000 },
    );
    out(`subscription ${sub.id}: ${TENANT} -> ${receiver.url} as user ${USER_ID} (receiver verifies with standardwebhooks)`);

    const pool = createPool(config.database, { max: 8 });
    cleanups.push(() => pool.end());
    const logger = createLogger({ level: 'warn', destination: prettyStream(out) });
    const relay = new Relay({ config, pool, logger, userAgent: `outbox-relay/${options.version} (demo)` });
    let retries = 0;
    relay.on('attempt', (a) => {
      if (a.outcome.kind === 'retry') retries++;
    });
    await relay.start();
    cleanups.unshift(() => relay.stop());

    const writerPool = createPool(config.database, { max: 4 });
    cleanups.push(() => writerPool.end());
    const baseline = Number((await admin.query<{ n: string }>('SELECT count(*) AS n FROM public.outbox_events')).rows[0]?.n ?? 0);
    let written = 0;
    let statements = 0;
    let stopping = false;
    const interval = 1000 / Math.max(1, options.rate);
    out(`writing ${options.rate} row changes per second${options.durationSec ? ` for ${options.durationSec} s` : ''}; press Ctrl-C to stop\n`);
    const writer = (async () => {
      const start = Date.now();
      while (!stopping) {
        const due = start + statements * interval;
        const wait = due - Date.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        if (stopping) break;
        written += await writeOne(writerPool, Math.random);
        statements++;
      }
    })();

    const pendingQuery = async (): Promise<{ events: number; pending: number }> => {
      const { rows } = await admin.query<{ events: string; pending: string }>(
        'SELECT count(*) AS events, count(*) FILTER (WHERE processed_at IS NULL) AS pending FROM public.outbox_events',
      );
      return { events: Number(rows[0]?.events ?? 0) - baseline, pending: Number(rows[0]?.pending ?? 0) };
    };
    const progress = async (): Promise<string> => {
      const { events, pending } = await pendingQuery();
      const s = receiver.stats;
      return `events ${fmt(events)} | delivered ${fmt(s.verified - s.duplicates)} | pending ${fmt(pending)} | retries ${fmt(retries)} | latency p50 ${ms(quantile(s.latenciesMs, 0.5))} p99 ${ms(quantile(s.latenciesMs, 0.99))}`;
    };
    let lastPrint = 0;
    const ticker = setInterval(() => {
      void progress().then((line) => {
        if (options.tty) process.stdout.write(`\r\x1b[2K${line}`);
        else if (Date.now() - lastPrint >= 5_000) {
          lastPrint = Date.now();
          out(line);
        }
      }, () => undefined);
    }, 500);
    cleanups.unshift(async () => clearInterval(ticker));

    const timer = options.durationSec > 0 ? new Promise<void>((r) => setTimeout(r, options.durationSec * 1000).unref()) : new Promise<void>(() => undefined);
    await Promise.race([timer, options.stopSignal]);
    stopping = true;
    await writer;
    clearInterval(ticker);
    if (options.tty) process.stdout.write('\n');
    out('stopping the writer; waiting for the last deliveries...');
    const deadline = Date.now() + 20_000;
    let state = await pendingQuery();
    while (state.pending > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      state = await pendingQuery();
    }
    await relay.stop();
    const acks = await admin.query<{ n: string }>(
      "SELECT count(*) AS n FROM public.event_acknowledgments WHERE user_id = $1 AND status = 'processed'",
      [USER_ID],
    );
    const s = receiver.stats;
    return {
      written,
      delivered: s.verified - s.duplicates,
      badSignatures: s.badSignatures,
      duplicates: s.duplicates,
      retries,
      orderViolations: s.orderViolations,
      p50Ms: quantile(s.latenciesMs, 0.5),
      p99Ms: quantile(s.latenciesMs, 0.99),
      acknowledgments: Number(acks.rows[0]?.n ?? 0),
      pendingAtEnd: state.pending,
    };
  } finally {
    for (const c of cleanups) await c().catch(() => undefined);
    if (server) await server.destroy();
  }
}

/** The summary as the demo prints it. */
export function renderSummary(s: DemoSummary): string {
  return [
    '',
    'demo summary',
    `  row changes written       ${fmt(s.written)}`,
    `  webhooks delivered        ${fmt(s.delivered)}  (each verified with standardwebhooks; bad signatures: ${s.badSignatures})`,
    `  duplicates                ${fmt(s.duplicates)}`,
    `  retries                   ${fmt(s.retries)}  (the receiver refused some requests on purpose)`,
    `  commit -> receipt         p50 ${ms(s.p50Ms)}, p99 ${ms(s.p99Ms)}`,
    `  per-aggregate order       ${s.orderViolations === 0 ? 'kept' : `${s.orderViolations} violations`}`,
    `  acknowledgments           ${fmt(s.acknowledgments)} processed, written as user ${USER_ID}`,
    `  still pending             ${fmt(s.pendingAtEnd)}`,
  ].join('\n');
}

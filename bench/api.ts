/**
 * `npm run bench:api`: the pull API sidecar under load, against the targets of its issue:
 *   1,000,000 events over 20 tenants, 100,000 acknowledgments of one user;
 *   GET /api/outbox/events?exclude_acknowledged=true&limit=50  p99 <= 20 ms  (50 concurrent clients)
 *   PATCH /api/outbox/events/:id/acknowledge                    p99 <= 10 ms  (50 concurrent clients)
 * Prints p50/p90/p99/max and throughput per endpoint (and, with one client, the service time without
 * queueing), the plans (EXPLAIN ANALYZE) of the queries the
 * API runs, and one JSON line. Bounded in time (BENCH_TIMEOUT_S, default 600 s).
 *
 * Data: tenant_00 is the benchmarked user's tenant; it holds 150,000 events (the user's 100,000
 * acknowledgments cover its oldest 100,000: the poll-and-acknowledge pattern of the seed's Flowgram
 * client, and the worst case for exclude_acknowledged), the other 19 tenants share the other 850,000;
 * ids interleave tenants. Rows are generated with INSERT ... SELECT generate_series (no triggers).
 *
 * The sidecar runs as its own process (`node dist/cli.js api`, built first), as its own role (row-level
 * security on), with LOG_LEVEL=warn and the per-token rate limit off (one token makes all the load).
 *
 * Environment: BENCH_DATABASE_URL (a superuser URL; else TEST_DATABASE_URL; else an embedded
 * PostgreSQL), BENCH_SECONDS (per phase, default 15), BENCH_CLIENTS (default 50).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cpus, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { Pool as HttpPool } from 'undici';
import { authSettings, mintToken } from '../src/api/auth.js';
import { createApiRole } from '../src/api/createRole.js';
import { acknowledgeEventQuery } from '../src/api/sql/acknowledgeEvent.js';
import { countEventsQuery } from '../src/api/sql/countEvents.js';
import { listEventsQuery } from '../src/api/sql/listEvents.js';
import { parseListQuery } from '../src/api/validation.js';
import { loadConfig } from '../src/config/load.js';
import { freePort, startEmbeddedPostgres, type EmbeddedServer } from '../src/db/embeddedPostgres.js';
import { migrate } from '../src/db/migrate.js';

const EVENTS = 1_000_000;
const TENANTS = 20;
const USER_TENANT = 'tenant_00';
const USER_TENANT_EVENTS = 150_000;
const ACKS = 100_000;
const USER = 101;
const SECONDS = Number(process.env.BENCH_SECONDS ?? 15);
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 50);
const TIMEOUT_S = Number(process.env.BENCH_TIMEOUT_S ?? 600);
const SOLO_SECONDS = 3;
const TARGETS = { getP99Ms: 20, patchP99Ms: 10 };
const CLI = fileURLToPath(new URL('../dist/cli.js', import.meta.url));

const log = (msg: string): void => void process.stderr.write(`bench: ${msg}\n`);

interface Stats {
  requests: number;
  errors: number;
  statuses: Record<string, number>;
  rps: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

function stats(latencies: number[], statuses: Record<string, number>, seconds: number): Stats {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q: number): number => Math.round((sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0) * 100) / 100;
  const ok = statuses['200'] ?? 0;
  return {
    requests: sorted.length,
    errors: sorted.length - ok,
    statuses,
    rps: Math.round(sorted.length / seconds),
    p50: at(0.5),
    p90: at(0.9),
    p99: at(0.99),
    max: at(1),
  };
}

/** `clients` loops, each sending `next()` requests back to back for `seconds`. */
async function load(http: HttpPool, seconds: number, clients: number, next: (client: number) => { method: 'GET' | 'PATCH'; path: string; body?: string }, headers: Record<string, string>): Promise<Stats> {
  const latencies: number[] = [];
  const statuses: Record<string, number> = {};
  const until = performance.now() + seconds * 1000;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async (_, client) => {
      while (performance.now() < until) {
        const r = next(client);
        const t0 = performance.now();
        try {
          const res = await http.request({ method: r.method, path: r.path, headers, ...(r.body !== undefined ? { body: r.body } : {}) });
          await res.body.text();
          latencies.push(performance.now() - t0);
          statuses[res.statusCode] = (statuses[res.statusCode] ?? 0) + 1;
        } catch (err) {
          latencies.push(performance.now() - t0);
          statuses.error = (statuses.error ?? 0) + 1;
          if ((statuses.error ?? 0) <= 3) log(`request failed: ${String(err)}`);
        }
      }
    }),
  );
  return stats(latencies, statuses, (performance.now() - started) / 1000);
}

async function loadData(c: pg.Client): Promise<void> {
  const t0 = performance.now();
  await c.query('ALTER TABLE public.outbox_events SET (autovacuum_enabled = false)');
  // Tenant of row i: tenant_00 takes 15 of every 100 rows (150,000), the other 19 share the rest.
  await c.query(`
    INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, attempts, max_attempts,
                                      processed_at, created_at, updated_at, dedupe_key)
    SELECT t.tenant, t.tbl || '_' || t.op, (i % 5000)::text, t.tbl,
           jsonb_build_object('operation', upper(t.op), 'table', t.tbl, 'schema', t.tenant, 'timestamp', c.ts,
                              'old_data', jsonb_build_object('id', i % 5000, 'vendor_name', 'Old ' || i, 'amount', 12345.678901234567890123),
                              'new_data', jsonb_build_object('id', i % 5000, 'vendor_name', 'New ' || i, 'amount', 12345.678901234567890124),
                              'changed_fields', jsonb_build_object('vendor_name', 'New ' || i)),
           CASE WHEN i % 100 = 7 THEN 20 ELSE 1 END, 20,
           CASE WHEN i % 100 = 7 OR i % 20 = 3 THEN NULL ELSE c.ts + interval '2 seconds' END,
           c.ts, c.ts, 'bench:' || i
    FROM generate_series(1, ${EVENTS}) AS i
    CROSS JOIN LATERAL (SELECT now() - (${EVENTS} - i) * interval '1 second' AS ts) AS c
    CROSS JOIN LATERAL (SELECT 'tenant_' || lpad((CASE WHEN i % 100 < ${(USER_TENANT_EVENTS / EVENTS) * 100} THEN 0 ELSE 1 + i % ${TENANTS - 1} END)::text, 2, '0') AS tenant,
                               (ARRAY['vendors', 'projects', 'risks', 'users'])[1 + i % 4] AS tbl,
                               (ARRAY['insert', 'update', 'update', 'delete'])[1 + (i / 4) % 4] AS op) AS t`);
  // The user has acknowledged the oldest 100,000 events of their tenant (by pull, as a poller does).
  await c.query(
    `INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, processor, status, processed_at, metadata, source)
     SELECT e.id, $1, e.tenant, 'flowgram.ai', 'processed', e.created_at + interval '5 seconds', '{"workflow_id": "bench"}', 'pull'
     FROM public.outbox_events AS e WHERE e.tenant = $2 ORDER BY e.id LIMIT $3`,
    [USER, USER_TENANT, ACKS],
  );
  await c.query('ALTER TABLE public.outbox_events RESET (autovacuum_enabled)');
  await c.query('VACUUM ANALYZE public.outbox_events');
  await c.query('VACUUM ANALYZE public.event_acknowledgments');
  const { rows } = await c.query<{ tenants: number; events: number; acks: number; user_tenant: number }>(
    `SELECT count(DISTINCT tenant)::int AS tenants, count(*)::int AS events,
            (SELECT count(*)::int FROM public.event_acknowledgments) AS acks,
            count(*) FILTER (WHERE tenant = $1)::int AS user_tenant FROM public.outbox_events`,
    [USER_TENANT],
  );
  log(`loaded ${JSON.stringify(rows[0])} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}

/** EXPLAIN (ANALYZE, BUFFERS) of a query as the API role runs it (each confines itself); writes are rolled back. */
async function explain(c: pg.Client, q: pg.QueryConfig): Promise<{ plan: string; ms: number }> {
  await c.query('BEGIN');
  try {
    const { rows } = await c.query<{ 'QUERY PLAN': string }>({ text: `EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) ${q.text}`, values: q.values ?? [] });
    const plan = rows.map((r) => r['QUERY PLAN']).join('\n');
    const ms = Number(/Execution Time: ([0-9.]+) ms/.exec(plan)?.[1] ?? NaN);
    return { plan, ms };
  } finally {
    await c.query('ROLLBACK');
  }
}

/**
 * Plan lines that matter (what is scanned, how, and how long), without the policies' lookups of the
 * role registry (an InitPlan per table, evaluated once per statement).
 */
function excerpt(plan: string): string {
  const out: string[] = [];
  let skipDeeperThan = -1;
  for (const line of plan.split('\n')) {
    const indent = line.length - line.trimStart().length;
    if (skipDeeperThan >= 0 && indent > skipDeeperThan) continue;
    skipDeeperThan = -1;
    if (/InitPlan|SubPlan/.test(line) && !/->/.test(line)) {
      skipDeeperThan = indent;
      continue;
    }
    if (/Scan|Join|Nested Loop|Limit|Index Cond|Rows Removed|Execution Time|Sort|Insert|Conflict|Aggregate|Heap Fetches/.test(line)) out.push(`    ${line}`);
  }
  return out.join('\n');
}

async function main(): Promise<void> {
  const deadline = setTimeout(() => {
    log(`timed out after ${TIMEOUT_S} s`);
    process.exit(2);
  }, TIMEOUT_S * 1000);
  deadline.unref();

  const loadBefore = loadavg().map((l) => l.toFixed(2)).join(' ');
  let embedded: EmbeddedServer | undefined;
  let sidecar: ChildProcess | undefined;
  let adminBase = process.env.BENCH_DATABASE_URL ?? process.env.TEST_DATABASE_URL;
  const dbName = `outbox_bench_api_${randomBytes(4).toString('hex')}`;
  const roleName = `outbox_api_bench_${randomBytes(4).toString('hex')}`;
  const rolePassword = randomBytes(18).toString('base64url');
  const cleanup = async (): Promise<void> => {
    if (sidecar && sidecar.exitCode === null) {
      sidecar.kill('SIGTERM');
      await new Promise((r) => sidecar?.once('exit', r));
    }
    if (adminBase) {
      const a = new pg.Client({ connectionString: adminBase });
      await a.connect();
      await a.query(`DROP DATABASE IF EXISTS ${a.escapeIdentifier(dbName)} WITH (FORCE)`).catch((e: Error) => log(`cleanup: ${e.message}`));
      await a.query(`DROP ROLE IF EXISTS ${a.escapeIdentifier(roleName)}`).catch((e: Error) => log(`cleanup: ${e.message}`));
      await a.end();
    }
    await embedded?.destroy();
  };

  try {
    if (!adminBase) {
      log('BENCH_DATABASE_URL / TEST_DATABASE_URL not set: starting an embedded PostgreSQL');
      embedded = await startEmbeddedPostgres({ settings: { max_connections: 200, shared_buffers: '512MB' } });
      adminBase = embedded.url;
    }
    const admin = new pg.Client({ connectionString: adminBase });
    admin.on('error', (e) => log(`admin connection: ${e.message}`));
    await admin.connect();
    const version = (await admin.query<{ server_version: string }>('SHOW server_version')).rows[0]?.server_version;
    await admin.query(`CREATE DATABASE ${admin.escapeIdentifier(dbName)}`);
    await admin.end();
    const u = new URL(adminBase);
    u.pathname = `/${dbName}`;
    const dbUrl = u.toString();
    const owner = new pg.Client({ connectionString: dbUrl });
    owner.on('error', (e) => log(`owner connection: ${e.message}`));
    await owner.connect();
    await migrate(owner);
    await createApiRole(owner, { name: roleName, password: rolePassword });
    log(`PostgreSQL ${version}${embedded ? ' (embedded)' : ''}, database ${dbName}`);
    await loadData(owner);

    const roleUrl = new URL(dbUrl);
    roleUrl.username = roleName;
    roleUrl.password = rolePassword;
    const port = await freePort();
    const jwtSecret = randomBytes(32).toString('hex');
    const env = {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      NODE_ENV: 'production',
      LOG_LEVEL: 'warn',
      DATABASE_URL: roleUrl.toString(),
      JWT_SECRET: jwtSecret,
      PORT: String(port),
      API_HOST: '127.0.0.1',
      API_RATE_LIMIT_PER_SECOND: '0',
    };
    sidecar = spawn(process.execPath, [CLI, 'api'], { env, stdio: ['ignore', 'inherit', 'inherit'] });
    const base = `http://127.0.0.1:${port}`;
    for (let i = 0; ; i++) {
      const up = await fetch(`${base}/healthz`).then((r) => r.ok, () => false);
      if (up) break;
      if (i > 200 || sidecar.exitCode !== null) throw new Error('the sidecar did not start');
      await new Promise((r) => setTimeout(r, 100));
    }
    const config = loadConfig({ env: { JWT_SECRET: jwtSecret } });
    const { token } = await mintToken({ tenant: USER_TENANT, userId: USER, ttlSeconds: 3600 }, authSettings(config));
    const headers = { authorization: `Bearer ${token}` };
    const http = new HttpPool(base, { connections: CLIENTS, pipelining: 1 });
    const getPath = '/api/outbox/events?exclude_acknowledged=true&limit=50';

    // Warm-up: polls move the user's pull cursor past the acknowledged prefix (in the background).
    const lastAcked = (await owner.query<{ id: string }>('SELECT max(event_id)::text AS id FROM public.event_acknowledgments')).rows[0]?.id ?? '0';
    const warmStart = performance.now();
    for (;;) {
      await load(http, 0.5, 4, () => ({ method: 'GET', path: getPath }), headers);
      const { rows } = await owner.query<{ h: string }>('SELECT hidden_through::text AS h FROM public.outbox_pull_cursors WHERE tenant = $1 AND user_id = $2', [USER_TENANT, USER]);
      if (BigInt(rows[0]?.h ?? '0') >= BigInt(lastAcked)) break;
      if (performance.now() - warmStart > 60_000) {
        log('warning: the pull cursor did not reach the acknowledged prefix within 60 s');
        break;
      }
    }
    log(`warm-up ${((performance.now() - warmStart) / 1000).toFixed(1)} s (pull cursor settled past the ${ACKS} acknowledged events)`);

    log(`GET ${getPath}: ${CLIENTS} clients for ${SECONDS} s`);
    const get = await load(http, SECONDS, CLIENTS, () => ({ method: 'GET', path: getPath }), headers);
    // One client: the service time without queueing (on a small machine, 50 clients mostly measure the queue).
    const get1 = await load(http, SOLO_SECONDS, 1, () => ({ method: 'GET', path: getPath }), headers);
    // The plans of the GET, as the API role runs them, with the cursor as the phase left it.
    const apiClient = new pg.Client({ connectionString: roleUrl.toString() });
    apiClient.on('error', (e) => log(`api connection: ${e.message}`));
    await apiClient.connect();
    const hidden = (await owner.query<{ h: string }>('SELECT hidden_through::text AS h FROM public.outbox_pull_cursors WHERE tenant = $1 AND user_id = $2', [USER_TENANT, USER])).rows[0]?.h ?? '0';
    const q = parseListQuery(new URLSearchParams('exclude_acknowledged=true&limit=50'));
    const unnamed = (c: pg.QueryConfig): pg.QueryConfig => ({ text: c.text, values: c.values ?? [] });
    const listPlan = await explain(apiClient, unnamed(listEventsQuery(q, USER_TENANT, USER)));
    const list = listEventsQuery(q, USER_TENANT, USER);
    // The same page as if the user had no pull cursor: every poll would skip the acknowledged prefix.
    const noCursorPlan = await explain(apiClient, { text: list.text.replaceAll('b.hidden_through', '0::bigint'), values: list.values ?? [] });
    const countPlan = await explain(apiClient, unnamed(countEventsQuery(q, USER_TENANT, USER)));

    // PATCH: each request acknowledges a different event of the user's tenant, oldest unacknowledged first.
    const { rows: open } = await owner.query<{ id: string }>(
      `SELECT e.id::text AS id FROM public.outbox_events AS e
       WHERE e.tenant = $1 AND NOT EXISTS (SELECT 1 FROM public.event_acknowledgments AS a WHERE a.event_id = e.id AND a.user_id = $2)
       ORDER BY e.id`,
      [USER_TENANT, USER],
    );
    let cursor = 0;
    log(`PATCH /api/outbox/events/:id/acknowledge: ${CLIENTS} clients for ${SECONDS} s`);
    const patch = await load(
      http,
      SECONDS,
      CLIENTS,
      (client) => ({
        method: 'PATCH',
        path: `/api/outbox/events/${open[cursor++ % open.length]?.id}/acknowledge`,
        body: JSON.stringify({ status: 'processed', processor: 'bench', metadata: { client, execution_time_ms: 150 } }),
      }),
      { ...headers, 'content-type': 'application/json' },
    );
    const patch1 = await load(
      http,
      SOLO_SECONDS,
      1,
      () => ({ method: 'PATCH', path: `/api/outbox/events/${open[cursor++ % open.length]?.id}/acknowledge`, body: '{"status":"processed","processor":"bench"}' }),
      { ...headers, 'content-type': 'application/json' },
    );
    await http.close();
    const patchPlan = await explain(
      apiClient,
      unnamed(acknowledgeEventQuery({ tenant: USER_TENANT, eventId: open[open.length - 1]?.id ?? '1', userId: USER, processor: 'bench', status: 'processed', rawBody: '{"metadata":{"a":1}}' })),
    );

    await apiClient.end();
    await owner.end();

    const row = (name: string, s: Stats): string =>
      `${name.padEnd(44)} ${String(s.rps).padStart(6)} req/s  p50 ${s.p50.toFixed(2).padStart(7)} ms  p90 ${s.p90.toFixed(2).padStart(7)} ms  p99 ${s.p99.toFixed(2).padStart(7)} ms  max ${s.max.toFixed(1).padStart(7)} ms  errors ${s.errors}`;
    process.stdout.write(
      [
        '',
        `pull API, PostgreSQL ${version}${embedded ? ' (embedded)' : ''}, ${EVENTS.toLocaleString('en')} events / ${TENANTS} tenants / ${ACKS.toLocaleString('en')} acknowledgments of one user, ${CLIENTS} clients, ${SECONDS} s per phase`,
        row('GET exclude_acknowledged=true&limit=50', get),
        row('PATCH /api/outbox/events/:id/acknowledge', patch),
        row('GET, 1 client (service time)', get1),
        row('PATCH, 1 client (service time)', patch1),
        `machine: ${cpus().length} CPUs, load average before ${loadBefore}, after ${loadavg().map((l) => l.toFixed(2)).join(' ')} (client, sidecar and PostgreSQL share them)`,
        `targets: GET p99 <= ${TARGETS.getP99Ms} ms: ${get.p99 <= TARGETS.getP99Ms ? 'met' : 'NOT met'}; PATCH p99 <= ${TARGETS.patchP99Ms} ms: ${patch.p99 <= TARGETS.patchP99Ms ? 'met' : 'NOT met'}`,
        '',
        `EXPLAIN ANALYZE, GET page (pull cursor at ${hidden}): ${listPlan.ms} ms`,
        excerpt(listPlan.plan),
        `EXPLAIN ANALYZE, GET page without the pull cursor (what every poll would cost): ${noCursorPlan.ms} ms`,
        excerpt(noCursorPlan.plan),
        `EXPLAIN ANALYZE, pagination.total (API_TOTAL_CACHE_MS: computed in the background, not per request): ${countPlan.ms} ms`,
        excerpt(countPlan.plan),
        `EXPLAIN ANALYZE, PATCH upsert (rolled back): ${patchPlan.ms} ms`,
        excerpt(patchPlan.plan),
        '',
        JSON.stringify({
          bench: 'api',
          postgres: version,
          embedded: Boolean(embedded),
          events: EVENTS,
          tenants: TENANTS,
          acknowledgments: ACKS,
          clients: CLIENTS,
          seconds: SECONDS,
          get,
          patch,
          get1,
          patch1,
          cpus: cpus().length,
          plansMs: { list: listPlan.ms, listWithoutCursor: noCursorPlan.ms, count: countPlan.ms, acknowledge: patchPlan.ms },
          targets: TARGETS,
          met: { get: get.p99 <= TARGETS.getP99Ms, patch: patch.p99 <= TARGETS.patchP99Ms },
        }),
        '',
      ].join('\n'),
    );
  } finally {
    await cleanup();
    clearTimeout(deadline);
  }
}

main().catch((err: unknown) => {
  log(`failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
  process.exitCode = 1;
});

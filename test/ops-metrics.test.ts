/**
 * The daemon's metrics port, live: `node dist/cli.js run` delivering to a good and a failing receiver,
 * scraped over HTTP. /metrics passes `promtool check metrics` and carries the relay's own series with
 * bounded labels; /healthz and /readyz answer; /readyz follows the database (a private embedded
 * PostgreSQL, stopped and started again under a running daemon); an open circuit shows in /metrics
 * and in `outbox-relay status`.
 */
import { createServer, type AddressInfo } from 'node:net';
import t from 'tap';
import { freePort, startEmbeddedPostgres } from '../src/db/embeddedPostgres.js';
import { runCli } from './helpers/cli.js';
import { runProcess, which } from './helpers/process.js';
import { freshDatabase } from './helpers/db.js';
import { answer, startReceiver } from './helpers/receiver.js';
import { count, createTenant, spawnRelay, subscribe, tenantName, waitFor, writeAll, type RelayProcess } from './helpers/relay.js';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Parses the Prometheus text format (samples only; comments skipped). */
function parseMetrics(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) throw new Error(`unparsable metrics line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1] as string] = (l[2] as string).replace(/\\(.)/g, '$1');
    out.push({ name: m[1] as string, labels, value: Number(m[3]) });
  }
  return out;
}

function find(samples: readonly Sample[], name: string, labels: Record<string, string> = {}): Sample[] {
  return samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
}

async function get(base: string, path: string, method = 'GET'): Promise<{ status: number; text: string; contentType: string }> {
  const res = await fetch(`${base}${path}`, { method, signal: AbortSignal.timeout(10_000) });
  return { status: res.status, text: await res.text(), contentType: res.headers.get('content-type') ?? '' };
}

/** GET that reports a refused connection as status 0 instead of throwing. */
async function status(base: string, path: string): Promise<number> {
  try {
    return (await get(base, path)).status;
  } catch {
    return 0;
  }
}

/** The metrics port's env for a relay process on a known free port. */
async function metricsEnv(extra: Record<string, string> = {}): Promise<{ env: Record<string, string>; base: string }> {
  const port = await freePort();
  return {
    env: { METRICS_ENABLED: 'true', METRICS_PORT: String(port), METRICS_HOST: '127.0.0.1', LOG_LEVEL: 'info', ...extra },
    base: `http://127.0.0.1:${port}`,
  };
}

async function waitForPort(relay: RelayProcess, base: string): Promise<void> {
  await waitFor(async () => {
    if (!relay.running) throw new Error(`the relay exited: ${JSON.stringify(relay.diag())}`);
    return (await status(base, '/healthz')) === 200;
  }, 30_000, 'the metrics port to answer', relay.diag);
}

t.test('a metrics port that is taken: the relay exits with one line naming the address and the setting', async (t) => {
  const db = await freshDatabase(t);
  const holder = createServer();
  await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => holder.close(() => resolve())));
  const port = (holder.address() as AddressInfo).port;
  const relay = spawnRelay(t, db.url, { METRICS_ENABLED: 'true', METRICS_HOST: '127.0.0.1', METRICS_PORT: String(port) });
  const { code } = await relay.exited;
  t.equal(code, 1, relay.stderr());
  t.match(relay.stderr(), new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} for the metrics endpoint: the address is already in use .*change METRICS_PORT`));
  t.notMatch(relay.stderr(), /PostgreSQL/, 'not mistaken for a database error');
  // Any other listen failure reads the same way (here a host name that cannot resolve: names under
  // .invalid never do).
  const unresolvable = spawnRelay(t, db.url, { METRICS_ENABLED: 'true', METRICS_HOST: 'no-such-host.invalid', METRICS_PORT: '0' });
  t.equal((await unresolvable.exited).code, 1, unresolvable.stderr());
  t.match(unresolvable.stderr(), /cannot listen on no-such-host\.invalid:0 for the metrics endpoint: .*change METRICS_PORT or METRICS_HOST/);
  t.notMatch(unresolvable.stderr(), /PostgreSQL|cannot reach/, 'not mistaken for a database error');
});

t.test('a live daemon: /metrics passes promtool, carries the relay series with bounded labels; circuit open in /metrics and status', async (t) => {
  const promtool = which('promtool');
  if (!promtool) {
    t.fail('promtool not found on PATH or in /usr/bin: install the Debian package "prometheus" (CI installs it); /metrics cannot be checked without it');
    return;
  }
  const db = await freshDatabase(t);
  // Event ids far from subscription ids, so that an event id among label values cannot pass for one.
  await db.query('ALTER TABLE public.outbox_events ALTER COLUMN id RESTART WITH 900000001');
  const T = tenantName('tm');
  await createTenant(db, T);
  const good = await startReceiver(t);
  const bad = await startReceiver(t, { respond: (_r, res) => answer(res, 500, 'receiver broken') });
  const subOk = await subscribe(db, { tenant: T, userId: 1, url: good.url('/ok') });
  good.secrets.push(subOk.secret);
  const subBad = await subscribe(db, { tenant: T, userId: 2, url: bad.url('/bad?token=sekrit-query-token') });

  // Two attempts per delivery; the circuit opens at the 6th consecutive failure: three events die
  // exactly as it opens. Events written later wait for the bad subscription (no attempts burned).
  const { env, base } = await metricsEnv({
    RETRY_MAX_ATTEMPTS: '2',
    CIRCUIT_FAILURE_THRESHOLD: '6',
    CIRCUIT_COOLDOWN_MS: '600000',
    CIRCUIT_MAX_COOLDOWN_MS: '600000',
    RELAY_WORKER_ID: 'ops-metrics-relay',
  });
  const relay = spawnRelay(t, db.url, env);
  await waitForPort(relay, base);
  // Events get their attempt limit when captured, from the settings the relay writes as it starts.
  await relay.waitForLog('relay started', 30_000);

  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 3) g`]);
  await waitFor(async () => (await count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE state = 'dead'")) === 3,
    30_000, 'three dead deliveries for the failing receiver', () => ({ bad: bad.requests.length, relay: relay.diag() }));
  await waitFor(async () => (await count(db, "SELECT count(*)::int AS n FROM public.outbox_circuit_states WHERE state = 'open'")) === 1,
    15_000, 'the open circuit to be recorded', relay.diag);
  t.equal(bad.requests.length, 6, 'the failing receiver got exactly 2 attempts per event');
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(4, 6) g`]);
  await waitFor(() => good.delivered.size === 6, 30_000, 'six events delivered to the good receiver', relay.diag);
  t.equal(bad.requests.length, 6, 'no attempt was made while the circuit is open');

  // The queue gauges are sampled (every 15 s): wait for a sample that saw the dead and pending deliveries.
  let text = '';
  await waitFor(async () => {
    text = (await get(base, '/metrics')).text;
    const s = parseMetrics(text);
    return find(s, 'outbox_relay_dead_deliveries', { tenant: T })[0]?.value === 3 && find(s, 'outbox_relay_pending_deliveries', { tenant: T })[0]?.value === 3;
  }, 40_000, 'the sampled gauges to show 3 dead and 3 pending deliveries', () => text.split('\n').filter((l) => /pending|dead/.test(l)));

  const scrape = await get(base, '/metrics');
  t.equal(scrape.status, 200, '/metrics answers 200');
  t.match(scrape.contentType, /^text\/plain; version=0\.0\.4/, 'in the Prometheus text format');
  const checked = await runProcess(promtool, ['check', 'metrics'], { input: scrape.text });
  t.equal(checked.code, 0, `promtool check metrics passes${checked.code === 0 ? '' : `: ${checked.stdout}${checked.stderr}`}`);

  const s = parseMetrics(scrape.text);
  const ok = { tenant: T, subscription: String(subOk.id) };
  const ko = { tenant: T, subscription: String(subBad.id) };
  t.equal(find(s, 'outbox_relay_deliveries_total', { ...ok, outcome: 'delivered' })[0]?.value, 6, 'deliveries_total{tenant,subscription,outcome="delivered"} counts the good deliveries');
  t.equal(find(s, 'outbox_relay_deliveries_total', { ...ko, outcome: 'retry' })[0]?.value, 3, 'outcome="retry" for the failed first attempts');
  t.equal(find(s, 'outbox_relay_deliveries_total', { ...ko, outcome: 'dead' })[0]?.value, 3, 'outcome="dead" for the last ones');
  t.equal(find(s, 'outbox_relay_retries_total', ko)[0]?.value, 3, 'retries_total');
  t.equal(find(s, 'outbox_relay_attempt_duration_seconds_count', ok)[0]?.value, 6, 'attempt duration histogram: one observation per attempt');
  t.equal(find(s, 'outbox_relay_attempt_duration_seconds_count', ko)[0]?.value, 6, 'also for failed attempts');
  t.ok(find(s, 'outbox_relay_attempt_duration_seconds_bucket', { ...ok, le: '+Inf' }).length === 1, 'with buckets');
  t.ok((find(s, 'outbox_relay_oldest_pending_age_seconds', { tenant: T })[0]?.value ?? -1) > 0, 'oldest pending age per tenant: the waiting deliveries have an age');
  t.equal(find(s, 'outbox_relay_circuit_state', { ...ko, state: 'open' })[0]?.value, 1, 'circuit_state{state="open"} = 1 for the failing subscription');
  t.equal(find(s, 'outbox_relay_circuit_state', { ...ko, state: 'closed' })[0]?.value, 0, 'and 0 for closed');
  t.equal(find(s, 'outbox_relay_circuit_state', { ...ok, state: 'closed' })[0]?.value, 1, 'the good subscription is closed');
  t.ok((find(s, 'outbox_relay_claim_batch_size_count')[0]?.value ?? 0) > 0, 'claim batch sizes observed');
  t.ok((find(s, 'outbox_relay_claim_batch_size_sum')[0]?.value ?? 0) >= 12, 'the claimed deliveries add up');
  t.equal(find(s, 'outbox_relay_listen_up')[0]?.value, 1, 'listen_up = 1');
  t.equal(find(s, 'outbox_relay_database_up')[0]?.value, 1, 'database_up = 1');
  for (const state of ['total', 'idle', 'waiting']) t.equal(find(s, 'outbox_relay_db_pool_connections', { state }).length, 1, `db pool gauge state="${state}"`);
  t.ok((find(s, 'outbox_relay_db_pool_connections', { state: 'total' })[0]?.value ?? 0) >= 1, 'the pool has connections');
  t.equal(find(s, 'outbox_relay_build_info')[0]?.value, 1, 'build_info');
  t.ok(find(s, 'process_cpu_user_seconds_total').length === 1 && find(s, 'nodejs_heap_size_used_bytes').length === 1, 'default process metrics too');

  // Bounded labels: known names on the relay's series; no value is an event id, a webhook-id or a URL.
  const allowed = new Set(['tenant', 'subscription', 'outcome', 'state', 'le', 'version']);
  const odd = s.filter((x) => x.name.startsWith('outbox_relay_') && Object.keys(x.labels).some((k) => !allowed.has(k)));
  t.same(odd.map((x) => x.name), [], 'outbox_relay_* series use only tenant, subscription, outcome, state, le, version labels');
  const { rows } = await db.query<{ id: string }>('SELECT id::text AS id FROM public.outbox_events');
  t.equal(rows.length, 6);
  const eventIds = new Set(rows.map((r) => r.id));
  const values = s.flatMap((x) => Object.values(x.labels));
  t.same(values.filter((v) => eventIds.has(v) || v.startsWith('msg_')), [], 'no label value is an event id or webhook-id');
  t.same(values.filter((v) => /:\/\/|127\.0\.0\.1|sekrit|\/ok|\/bad/.test(v)), [], 'no label value is a URL or part of one');
  t.same([...new Set(find(s, 'outbox_relay_deliveries_total').map((x) => x.labels.subscription))].sort(), [String(subOk.id), String(subBad.id)].sort(), 'subscription label values are subscription ids');

  // The open circuit in `outbox-relay status` (recorded by the relay in outbox_circuit_states).
  const st = await runCli(['status'], { DATABASE_URL: db.url });
  t.equal(st.code, 0, `status exits 0 ${st.stderr}`);
  const line = st.stdout.split('\n').find((l) => /^\s*\S+/.test(l) && l.includes('open@ops-metrics-relay'));
  t.ok(line, 'the text report shows the open circuit and the replica that has it');
  t.match(line ?? '', new RegExp(`^\\s*${subBad.id}\\s+${T}\\s+2\\s+yes\\s+open@ops-metrics-relay\\s+3`), 'on the failing subscription\'s row, with its 3 dead deliveries');
  const stj = await runCli(['status', '--json'], { DATABASE_URL: db.url });
  t.equal(stj.code, 0);
  const report = JSON.parse(stj.stdout) as { attention: Array<{ id: number; circuits: Array<{ worker: string; state: string }> | null; dead: number }> };
  const att = report.attention.find((a) => a.id === subBad.id);
  t.same(att?.circuits?.map((c) => [c.worker, c.state]), [['ops-metrics-relay', 'open']], '--json: the circuit is open on this replica');
  t.equal(att?.dead, 3, '--json: and the dead deliveries are counted');
  t.notOk(report.attention.some((a) => a.id === subOk.id), 'the healthy subscription needs no attention');

  // The other endpoints.
  const health = await get(base, '/healthz');
  t.equal(health.status, 200, '/healthz 200');
  const ready = await get(base, '/readyz');
  t.equal(ready.status, 200, '/readyz 200');
  t.same(JSON.parse(ready.text), { status: 'ready', checks: { database: 'ok', listen: 'ok' } }, '/readyz says what it checked');
  t.equal((await get(base, '/metrics', 'POST')).status, 405, 'POST is refused');
  t.equal((await get(base, '/nope')).status, 404, 'unknown paths are 404');

  // The container's HEALTHCHECK command: METRICS_PORT first, then the sidecar's PORT.
  const metricsPort = new URL(base).port;
  const idlePort = String(await freePort());
  const hc = await runCli(['healthcheck'], { METRICS_PORT: metricsPort, PORT: idlePort });
  t.equal(hc.code, 0, `healthcheck exits 0 while the daemon runs ${hc.stderr}`);
  t.match(hc.stdout, new RegExp(`healthy \\(http://127\\.0\\.0\\.1:${metricsPort}/healthz\\)`), hc.stdout.trim());

  relay.kill('SIGTERM');
  const exit = await relay.exited;
  t.equal(exit.code, 0, 'the daemon stops cleanly');
  const hcDown = await runCli(['healthcheck', '--timeout-ms', '1000'], { METRICS_PORT: metricsPort, PORT: idlePort });
  t.not(hcDown.code, 0, 'healthcheck fails once nothing answers');
  t.match(hcDown.stderr, /unhealthy: .*ECONNREFUSED/, `saying why: ${hcDown.stderr.trim()}`);
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.outbox_circuit_states WHERE seen_at > now() - interval '2 minutes'"), 0,
    'and its circuits leave status when it stops (the rows stay a while for the relay that starts next)');
});

t.test('/readyz follows the database: 503 while its PostgreSQL is stopped, 200 when it is back; the daemon never exits (a standby relay too)', async (t) => {
  // A private server: the shared one is never stopped.
  const server = await startEmbeddedPostgres({ fast: true });
  t.teardown(() => server.destroy().catch(() => undefined));
  const db = await freshDatabase(t, { base: server.url });
  const { env, base } = await metricsEnv();
  const relay = spawnRelay(t, db.url, env);
  let exitedEarly: unknown;
  void relay.exited.then((e) => (exitedEarly = e));
  // A standby replica beside it: it listens for nothing, so its listen_up must not read as an outage
  // (OutboxRelayListenDown), and its database_up must follow the database, though it runs no pump.
  const sb = await metricsEnv({ ENABLE_OUTBOX_PROCESSING: 'false', RELAY_POLL_INTERVAL_MS: '500' });
  const standby = spawnRelay(t, db.url, sb.env);
  const ups = async (b: string) => {
    const m = parseMetrics((await get(b, '/metrics')).text);
    return { listen: find(m, 'outbox_relay_listen_up')[0]?.value, database: find(m, 'outbox_relay_database_up')[0]?.value };
  };
  await waitForPort(relay, base);
  await waitForPort(standby, sb.base);
  await waitFor(async () => (await status(base, '/readyz')) === 200, 30_000, '/readyz 200 with the database up', relay.diag);
  t.pass('/readyz 200 while the database is up');
  await waitFor(async () => (await status(sb.base, '/readyz')) === 200, 30_000, 'the standby relay\'s /readyz 200', standby.diag);
  // /readyz runs a query of its own; database_up follows the relay's first check, a moment later.
  await waitFor(async () => (await ups(sb.base)).database === 1, 30_000, 'the standby relay\'s database_up 1', async () => ups(sb.base));
  t.same(await ups(sb.base), { listen: 1, database: 1 }, 'standby: listen_up 1 (it listens for nothing) and database_up 1');

  await server.stop();
  const seen: number[] = [];
  await waitFor(async () => {
    const s = await status(base, '/readyz');
    seen.push(s);
    return s === 503;
  }, 30_000, '/readyz to turn 503 with the database stopped', () => ({ seen: seen.slice(-5), relay: relay.diag() }));
  t.pass('/readyz 503 while the database is stopped');
  const down = await get(base, '/readyz');
  t.equal(down.status, 503);
  const body = JSON.parse(down.text) as { status: string; checks: Record<string, string> };
  t.equal(body.status, 'not ready');
  t.not(body.checks.database, 'ok', `the database check says why (${body.checks.database})`);
  t.equal((await get(base, '/healthz')).status, 200, '/healthz stays 200: the process is alive');
  let metrics: Sample[] = [];
  await waitFor(async () => {
    metrics = parseMetrics((await get(base, '/metrics')).text);
    return find(metrics, 'outbox_relay_listen_up')[0]?.value === 0 && find(metrics, 'outbox_relay_database_up')[0]?.value === 0;
  }, 30_000, 'listen_up and database_up to drop to 0', () => metrics.filter((m) => /_up$/.test(m.name)));
  t.pass('/metrics still answers, with listen_up 0 and database_up 0');
  await waitFor(async () => (await ups(sb.base)).database === 0, 30_000, 'the standby relay\'s database_up to drop to 0', async () => ups(sb.base));
  t.equal(await status(sb.base, '/readyz'), 503, 'standby: /readyz 503 as well');
  t.equal((await ups(sb.base)).listen, 1, 'standby: listen_up stays 1');
  t.ok(relay.running, 'the daemon is still running with its database down');

  await server.start();
  await waitFor(async () => (await status(base, '/readyz')) === 200, 60_000, '/readyz to return to 200 once the database is back', relay.diag);
  t.pass('/readyz 200 again after the database came back');
  await waitFor(async () => {
    metrics = parseMetrics((await get(base, '/metrics')).text);
    return find(metrics, 'outbox_relay_listen_up')[0]?.value === 1;
  }, 30_000, 'listen_up back to 1');
  t.pass('listen_up 1 again');
  await waitFor(async () => (await ups(sb.base)).database === 1, 30_000, 'the standby relay\'s database_up back to 1', async () => ups(sb.base));
  t.ok(standby.running, 'the standby relay never exited either');
  t.ok(relay.running, 'the daemon never exited');
  t.equal(exitedEarly, undefined, 'no exit was observed at any point');
  relay.kill('SIGTERM');
  t.equal((await relay.exited).code, 0, 'and it stops cleanly on SIGTERM');
});

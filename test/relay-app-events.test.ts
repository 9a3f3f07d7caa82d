/**
 * Events an application writes itself (sql/015): through public.outbox_write_event they are delivered
 * at once; a plain INSERT into outbox_events (as the seed's own trigger does) is queued by the relays'
 * stranded-event sweep instead of staying pending for ever, shown by `status`, and never deleted by
 * retention's dead-event rule.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import t from 'tap';
import { createLogger } from '../src/log.js';
import { runRetention } from '../src/maintenance/retention.js';
import { STRANDED_COUNT_LIMIT } from '../src/maintenance/status.js';
import { REQUEUE_STRANDED_SQL } from '../src/maintenance/strandedSweep.js';
import { runCli } from './helpers/cli.js';
import { freshDatabase, type TestDatabase } from './helpers/db.js';
import { startReceiver } from './helpers/receiver.js';
import { count, createTenant, expectedWebhookId, startRelay, subscribe, tenantName, waitFor } from './helpers/relay.js';

interface SweepRow {
  n: number;
  nextCreated: string | null;
  nextId: string | null;
}

const WRITE = 'SELECT public.outbox_write_event($1, $2, $3, $4, $5::jsonb, $6) AS id';

/** The seed's own way: a plain INSERT, here backdated so that the sweep's minimum age has passed. */
async function insertDirectly(db: TestDatabase, tenant: string, aggregateId: string, ageSeconds = 120): Promise<string> {
  const { rows } = await db.query<{ id: string }>(
    `INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, created_at)
     VALUES ($1, 'orders_insert', $2, 'orders', '{"direct":true}', now() - $3 * interval '1 second') RETURNING id::text AS id`,
    [tenant, aggregateId, ageSeconds],
  );
  return rows[0]!.id;
}

async function status(db: TestDatabase): Promise<{ stranded: number; text: string }> {
  const json = await runCli(['status', '--json'], { DATABASE_URL: db.url });
  const text = await runCli(['status'], { DATABASE_URL: db.url });
  if (json.code !== 0 || text.code !== 0) throw new Error(`status failed: ${json.stderr}${text.stderr}`);
  return { stranded: (JSON.parse(json.stdout) as { stranded: number }).stranded, text: text.stdout };
}

t.test('outbox_write_event: delivered at once, deduplicated, granted by name, refuses missing fields', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('app');
  await createTenant(db, tenant);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant, userId: 7, url: recv.url('/hook') });
  recv.secrets.push(sub.secret);
  await startRelay(t, db.url);

  // A writer role with EXECUTE on the function only: no grants on the outbox tables.
  const role = `outbox_t_writer_${randomBytes(4).toString('hex')}`;
  // A password: an embedded PostgreSQL authenticates by password, not trust.
  await db.query(`CREATE ROLE ${role} LOGIN PASSWORD 'writer-role-pw'`);
  t.teardown(async () => {
    await db.query(`DROP OWNED BY ${role}`).catch(() => undefined);
    await db.query(`DROP ROLE IF EXISTS ${role}`).catch(() => undefined);
  });
  const asRole = async <R>(fn: (c: pg.Client) => Promise<R>): Promise<R> => {
    const url = new URL(db.url);
    url.username = role;
    url.password = 'writer-role-pw';
    const c = new pg.Client({ connectionString: url.toString() });
    await c.connect();
    try {
      return await fn(c);
    } finally {
      await c.end();
    }
  };

  const denied = await asRole((c) => c.query(WRITE, [tenant, 'orders_insert', 'orders', '1', '{}', null]).then(() => null, (err: { code?: string }) => err.code));
  t.equal(denied, '42501', 'without a grant, EXECUTE is refused (not granted to PUBLIC)');
  await db.query(`GRANT EXECUTE ON FUNCTION public.outbox_write_event(text, text, text, text, jsonb, text) TO ${role}`);

  const first = await asRole((c) => c.query<{ id: string | null }>(WRITE, [tenant, 'orders_insert', 'orders', '42', '{"total":10}', 'order-42']));
  const again = await asRole((c) => c.query<{ id: string | null }>(WRITE, [tenant, 'orders_insert', 'orders', '42', '{"total":10}', 'order-42']));
  const plain = await asRole((c) => c.query<{ id: string | null }>(WRITE, [tenant, 'orders_update', 'orders', '42', '{"total":11}', null]));
  const id = first.rows[0]!.id;
  t.ok(id, 'the first call returns the event id');
  t.equal(again.rows[0]!.id, null, 'the same dedupe key again writes nothing and returns NULL');
  t.ok(plain.rows[0]!.id, 'no dedupe key: written');

  await waitFor(() => recv.delivered.size >= 2, 10_000, 'both events delivered', () => recv.delivered.size);
  t.ok(recv.delivered.has(expectedWebhookId(id!, sub.id)), 'the deduplicated event was delivered under its webhook-id');
  t.equal(recv.requests.length, 2, 'two events, two requests');
  t.ok(recv.requests.every((r) => r.verifiedBy.length === 1), 'signed with the subscription secret');
  const body = JSON.parse(recv.requests.find((r) => r.webhookId === expectedWebhookId(id!, sub.id))!.body) as Record<string, unknown>;
  t.match(body, { tenant, event_type: 'orders_insert', aggregate_type: 'orders', aggregate_id: '42', payload: { total: 10 } }, 'the body carries what was written');
  await waitFor(async () => (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_events WHERE processed_at IS NULL')) === 0, 10_000, 'both processed');

  for (const args of [[null, 'x_insert', 'x', '1', '{}', null], [tenant, 'x_insert', 'x', null, '{}', null], [tenant, 'x_insert', 'x', '1', null, null]]) {
    const code = await db.query(WRITE, args).then(() => null, (err: { code?: string }) => err.code);
    t.equal(code, '22004', `missing field refused: ${JSON.stringify(args)}`);
  }
  for (const args of [['', 'x_insert', 'x', '1', '{}', null], ['Tenant A!', 'x_insert', 'x', '1', '{}', null], [tenant, '', 'x', '1', '{}', null],
    [tenant, 'vendors paid', 'x', '1', '{}', null], [tenant, 'x_insert', 'x', '', '{}', null]]) {
    const code = await db.query(WRITE, args).then(() => null, (err: { code?: string }) => err.code);
    t.equal(code, '22023', `refused: ${JSON.stringify(args)}`);
  }
  // A pull API role (confined to one tenant by row-level security) may not write events, even granted.
  await db.query('INSERT INTO public.outbox_api_roles (role_name) VALUES ($1)', [role]);
  const apiRole = await asRole((c) => c.query(WRITE, [tenant, 'orders_insert', 'orders', '43', '{}', null]).then(() => null, (err: { code?: string; message: string }) => `${err.code} ${err.message}`));
  t.match(apiRole, /^42501 .*is a pull API role and may not write events/, 'refused for a registered API role');
  await db.query('DELETE FROM public.outbox_api_roles WHERE role_name = $1', [role]);
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_events'), 2, 'nothing else was written');
  // An empty dedupe key is no key: two such events are both written.
  const blank1 = await db.query<{ id: string | null }>(WRITE, [tenant, 'orders_note', 'orders', '44', '{}', '']);
  const blank2 = await db.query<{ id: string | null }>(WRITE, [tenant, 'orders_note', 'orders', '44', '{}', '']);
  t.ok(blank1.rows[0]!.id && blank2.rows[0]!.id, "dedupe_key '' is treated as none");
});

t.test('a plain INSERT into outbox_events: shown by status, queued by the relay at start, delivered once', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('direct');
  await createTenant(db, tenant);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant, userId: 8, url: recv.url('/hook') });
  recv.secrets.push(sub.secret);

  const old = await insertDirectly(db, tenant, 'a');
  const young = await insertDirectly(db, tenant, 'b', 0);
  const before = await status(db);
  t.equal(before.stranded, 1, 'status counts the event older than a minute that nothing queued');
  t.match(before.text, /1 unprocessed event\(s\) older than a minute have no fan-out queue entry/, 'and says so in words');

  await startRelay(t, db.url);
  await waitFor(() => recv.delivered.has(expectedWebhookId(old, sub.id)), 10_000, 'the stranded event delivered after the start-up sweep');
  t.notOk(recv.delivered.has(expectedWebhookId(young, sub.id)), 'an event younger than the sweep\'s minimum age is left to its writer for now');
  t.equal((await status(db)).stranded, 0, 'status: nothing stranded any more');

  // The sweep's function itself, with no minimum age: queues the young one once, and nothing twice.
  const sweep = async (): Promise<number> => (await db.query<{ n: number }>(REQUEUE_STRANDED_SQL, ['0 seconds', 1000, null, null])).rows[0]!.n;
  t.equal(await sweep(), 1, 'the sweep queues the younger event');
  await waitFor(() => recv.delivered.has(expectedWebhookId(young, sub.id)), 10_000, 'the younger event delivered');
  t.equal(await sweep(), 0, 'nothing is queued twice');
  t.equal(recv.requests.length, 2, 'each event sent once');

  // An event the relay delivered before is never sent again, even with processed_at reset by hand.
  await db.query('UPDATE public.outbox_events SET processed_at = NULL WHERE id = $1', [old]);
  t.equal(await sweep(), 0, 'an event with a relay acknowledgment is not stranded');
  await db.query('UPDATE public.outbox_events SET processed_at = now() WHERE id = $1', [old]);
});

t.test('retention never deletes an event that was never fanned out (its dead rule needs a dead delivery)', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('keep');
  await createTenant(db, tenant);
  const id = await insertDirectly(db, tenant, 'z', 40 * 86_400);
  const pool = db.pool();
  const logger = createLogger({ level: 'silent' });
  const result = await runRetention(pool, { days: 7, deadDays: 30, batchSize: 100, logger });
  t.equal(result.deadEvents, 0, 'no dead event deleted');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_events WHERE id = $1', [id]), 1, 'the 40-day-old stranded event is still there');

  // Control: the same event with a dead delivery is deleted by the same rule.
  const sub = await subscribe(db, { tenant, userId: 9, url: 'http://127.0.0.1:9/never' });
  await db.query(`INSERT INTO public.outbox_deliveries (event_id, subscription_id, state, attempts, next_attempt_at) VALUES ($1, $2, 'dead', 5, now())`, [id, sub.id]);
  const again = await runRetention(pool, { days: 7, deadDays: 30, batchSize: 100, logger });
  t.equal(again.deadEvents, 1, 'with a dead delivery it is a dead event, deleted after RETENTION_DEAD_DAYS');
});

t.test('the sweep queues only events with no queue entry, no delivery in any state and no relay acknowledgment', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('sw');
  await createTenant(db, tenant);
  const sub = await subscribe(db, { tenant, userId: 3, url: 'http://127.0.0.1:9/never' });
  const withDelivery = async (state: string, extra = ''): Promise<void> => {
    const id = await insertDirectly(db, tenant, `d-${state}${extra}`);
    await db.query(
      `INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state, attempts, next_attempt_at)
       VALUES ($1, $2, $3, $4::public.outbox_delivery_state, 2, now() + interval '1 hour')`,
      [id, sub.id, state === 'waiting' ? 7 : null, state],
    );
  };
  await withDelivery('ready'); // a retry waiting for its time
  await withDelivery('waiting'); // behind its lane's head
  await withDelivery('dead');
  const queued = await insertDirectly(db, tenant, 'queued');
  await db.query('INSERT INTO public.outbox_fanout_queue (event_id) VALUES ($1)', [queued]);
  await db.query(`UPDATE public.outbox_events SET processed_at = now() WHERE id = $1`, [await insertDirectly(db, tenant, 'nobody-matched')]);
  const stranded = await insertDirectly(db, tenant, 'stranded');

  const { rows } = await db.query<SweepRow>(REQUEUE_STRANDED_SQL, ['0 seconds', 1000, null, null]);
  t.equal(rows[0]!.n, 1, 'exactly one event queued');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_fanout_queue WHERE event_id = $1', [stranded]), 1, 'the stranded one');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_fanout_queue'), 2, 'and nothing else (besides the one queued before)');
});

t.test('the sweep waits for a replay in progress, so it never queues an event replay is giving a delivery', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('race');
  await createTenant(db, tenant);
  const sub = await subscribe(db, { tenant, userId: 4, url: 'http://127.0.0.1:9/never' });
  const id = await insertDirectly(db, tenant, 'r');

  // What outbox_replay does, in an open transaction: the lane lock exclusively, then a new delivery.
  const replay = new pg.Client({ connectionString: db.url });
  await replay.connect();
  t.teardown(() => replay.end().catch(() => undefined));
  await replay.query('BEGIN');
  await replay.query('SELECT pg_advisory_xact_lock(7411201005)');
  await replay.query("INSERT INTO public.outbox_deliveries (event_id, subscription_id, state, attempts, next_attempt_at) VALUES ($1, $2, 'ready', 0, now())", [id, sub.id]);

  let settled = false;
  const sweeping = db.query<SweepRow>(REQUEUE_STRANDED_SQL, ['0 seconds', 1000, null, null]).finally(() => (settled = true));
  await new Promise((r) => setTimeout(r, 500));
  t.notOk(settled, 'the sweep waits while replay holds the lane lock');
  await replay.query('COMMIT');
  t.equal((await sweeping).rows[0]!.n, 0, 'then sees the delivery and queues nothing');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_fanout_queue'), 0, 'no queue entry beside the delivery (fan-out would fail on it)');
});

t.test('status counts stranded events up to a limit and then says "more than"', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('bulk');
  await createTenant(db, tenant);
  // A bulk load around capture, one row over the count's limit.
  await db.query(`INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, created_at)
                  SELECT $1, 'orders_insert', g::text, 'orders', '{}', now() - interval '2 minutes' FROM generate_series(1, $2::int) g`,
  [tenant, STRANDED_COUNT_LIMIT + 1]);
  const json = await runCli(['status', '--json'], { DATABASE_URL: db.url });
  t.equal(json.code, 0, 'status --json runs');
  t.match(JSON.parse(json.stdout), { stranded: STRANDED_COUNT_LIMIT, strandedAtLeast: true }, 'counted up to the limit, flagged as "at least"');
  const text = await runCli(['status'], { DATABASE_URL: db.url });
  t.match(text.stdout, new RegExp(`more than ${STRANDED_COUNT_LIMIT} unprocessed event\\(s\\) older than a minute`), 'and says "more than" in words');
  await db.query('DELETE FROM public.outbox_events WHERE id IN (SELECT id FROM public.outbox_events ORDER BY id LIMIT 2)');
  t.match(JSON.parse((await runCli(['status', '--json'], { DATABASE_URL: db.url })).stdout), { stranded: STRANDED_COUNT_LIMIT - 1, strandedAtLeast: false },
    'below the limit: the exact count');
});

t.test('a walk over all unprocessed events finds a stranded one however many newer ones there are', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('walk');
  await createTenant(db, tenant);
  const sub = await subscribe(db, { tenant, userId: 5, url: 'http://127.0.0.1:9/never' });
  // By age: two with deliveries, the stranded one, three with deliveries (newest).
  const ids: string[] = [];
  for (const [key, age] of [['e1', 600], ['e2', 500], ['s', 400], ['e3', 300], ['e4', 200], ['e5', 100]] as const) {
    const id = await insertDirectly(db, tenant, key, age);
    ids.push(id);
    if (key !== 's') {
      await db.query("INSERT INTO public.outbox_deliveries (event_id, subscription_id, state, attempts, next_attempt_at) VALUES ($1, $2, 'ready', 1, now() + interval '1 hour')", [id, sub.id]);
    }
  }
  const sweep = async (cursor: SweepRow | null): Promise<SweepRow> =>
    (await db.query<SweepRow>(REQUEUE_STRANDED_SQL, ['0 seconds', 2, cursor?.nextCreated ?? null, cursor?.nextId ?? null])).rows[0]!;
  const first = await sweep(null);
  t.equal(first.n, 0, 'first sweep: the two newest and the two oldest have deliveries');
  t.equal(first.nextId, ids[1], 'the walk goes on after the second oldest');
  const second = await sweep(first);
  t.equal(second.n, 1, 'second sweep: the walk reaches the stranded event');
  t.equal(second.nextId, ids[3]);
  const third = await sweep(second);
  t.equal(third.nextId, ids[5], 'third: the last two');
  const fourth = await sweep(third);
  t.same([fourth.n, fourth.nextCreated, fourth.nextId], [0, null, null], 'then the walk starts again from the beginning');
});

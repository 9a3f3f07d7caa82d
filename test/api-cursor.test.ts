/**
 * Pull cursors (sql/007 outbox_pull_advance): the shortcut of exclude_acknowledged must never hide an
 * event the user has not hidden: not one whose acknowledgment turned 'failed' or was deleted, and not
 * one that commits late with a smaller id than events already passed. And the roles of the engine
 * (owner, capture, a relay role of its own) keep seeing every row under row-level security.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import t from 'tap';
import { principalKey, type Principal } from '../src/api/auth.js';
import { createTenant, createTestApiRole, insertEvents, startApi, type RunningApi } from './helpers/api.js';
import { adminUrl, freshDatabase, type TestDatabase } from './helpers/db.js';

const TENANT = 'tenant_c';
const USER = 7;
const P: Principal = { tenant: TENANT, userId: USER, key: principalKey(TENANT, USER) };

async function cursor(db: TestDatabase): Promise<number> {
  const { rows } = await db.query<{ h: string }>('SELECT hidden_through::text AS h FROM public.outbox_pull_cursors WHERE tenant = $1 AND user_id = $2', [TENANT, USER]);
  return Number(rows[0]?.h ?? 0);
}

/**
 * Steps the cursor (settling takes a few steps; the settle delay is 0 here) and, given `until`, keeps
 * stepping until it reaches that id, for up to 30 s: a step settles only once no transaction older
 * than its probe runs anywhere on the server, and other test files share the server (seen in CI:
 * a long transaction of another file held a cursor for longer than twelve quick steps).
 */
async function settle(api: RunningApi, db?: TestDatabase, until?: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    for (let i = 0; i < 12; i++) await api.server.store.advanceCursor(P, 0, 3);
    if (db === undefined || until === undefined || (await cursor(db)) === until || Date.now() > deadline) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function visibleIds(api: RunningApi, token: string, query = ''): Promise<string[]> {
  const res = await api.request(`/api/outbox/events?exclude_acknowledged=true&limit=100${query}`, { token });
  if (res.status !== 200) throw new Error(res.text);
  return res.json.events.map((e: { id: string }) => e.id);
}

async function ackAll(db: TestDatabase, ids: string[], status = 'processed', source = 'pull'): Promise<void> {
  await db.query(
    `INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, status, source)
     SELECT unnest($1::bigint[]), $2, $3, $4::public.acknowledgment_status, $5`,
    [ids, USER, TENANT, status, source],
  );
}

t.test('the cursor skips what the user hid, and only that', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { cursor: { intervalMs: 60_000 } });
  const token = await api.token(TENANT, USER);
  const ids = await insertEvents(db, TENANT, 12);
  await insertEvents(db, 'tenant_other', 5);
  await ackAll(db, ids.slice(0, 8));
  await ackAll(db, [ids[9]!]);

  t.same(await visibleIds(api, token), [ids[8], ...ids.slice(10)], 'before any cursor');
  await settle(api, db, Number(ids[8]) - 1);
  t.equal(await cursor(db), Number(ids[8]) - 1, 'the cursor stops before the first event not hidden');
  t.same(await visibleIds(api, token), [ids[8], ...ids.slice(10)], 'same answer through the cursor');

  await api.request(`/api/outbox/events/${ids[8]}/acknowledge`, { method: 'PATCH', token, body: '{"status":"skipped"}' });
  await settle(api, db, Number(ids[9]));
  t.equal(await cursor(db), Number(ids[9]), 'moves on over the newly hidden ones');
  t.same(await visibleIds(api, token), ids.slice(10));
  t.same(await visibleIds(api, token, '&order_dir=DESC'), ids.slice(10).reverse(), 'any order');
  const page = await api.request('/api/outbox/events?exclude_acknowledged=true&limit=1', { token });
  t.same(page.json.pagination, { total: 2, limit: 1, offset: 0, hasMore: true }, 'counts agree');

  t.test("an acknowledgment changed to 'failed' moves the cursor back", async (t) => {
    const res = await api.request(`/api/outbox/events/${ids[3]}/acknowledge`, { method: 'PATCH', token, body: '{"status":"failed"}' });
    t.equal(res.status, 200);
    t.equal(await cursor(db), Number(ids[3]) - 1);
    t.same(await visibleIds(api, token), [ids[3], ...ids.slice(10)]);
    await api.request(`/api/outbox/events/${ids[3]}/acknowledge`, { method: 'PATCH', token, body: '{"status":"processed"}' });
    await settle(api, db, Number(ids[9]));
    t.equal(await cursor(db), Number(ids[9]));
  });

  t.test('a relay acknowledgment turning failed (a replayed delivery that died) moves it back too', async (t) => {
    await db.query("UPDATE public.event_acknowledgments SET source = 'relay' WHERE event_id = $1", [ids[5]]);
    // The relay's own upsert (sql/005 outbox_complete), as the owner.
    await db.query(
      `INSERT INTO public.event_acknowledgments AS a (event_id, user_id, tenant, status, source) VALUES ($1, $2, $3, 'failed', 'relay')
       ON CONFLICT (event_id, user_id) DO UPDATE SET status = excluded.status, updated_at = now() WHERE a.source = 'relay'`,
      [ids[5], USER, TENANT],
    );
    t.equal(await cursor(db), Number(ids[5]) - 1);
    t.same(await visibleIds(api, token), [ids[5], ...ids.slice(10)]);
  });

  t.test('deleting an acknowledgment by hand moves it back; deleting the event does not matter', async (t) => {
    await db.query('DELETE FROM public.event_acknowledgments WHERE event_id = $1', [ids[1]]);
    t.equal(await cursor(db), Number(ids[1]) - 1);
    t.same(await visibleIds(api, token), [ids[1], ids[5], ...ids.slice(10)]);
    await db.query('DELETE FROM public.outbox_events WHERE id = $1', [ids[2]]);
    t.equal(await cursor(db), Number(ids[1]) - 1, 'an event removed with its acknowledgments moves nothing');
  });
});

t.test('an event that commits late, below the cursor, is not skipped', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { cursor: { intervalMs: 60_000 } });
  const token = await api.token(TENANT, USER);
  await createTenant(db, TENANT);

  // A writer draws an event id (through capture, as in production) and stays open.
  const writer = new pg.Client({ connectionString: db.url });
  await writer.connect();
  t.teardown(() => writer.end().catch(() => undefined));
  await writer.query('BEGIN');
  await writer.query(`INSERT INTO ${TENANT}.vendors (id, name) VALUES (1, 'late')`);
  const late = (await writer.query<{ id: string }>('SELECT max(id)::text AS id FROM public.outbox_events')).rows[0]!.id;

  // Meanwhile later events commit, and the user acknowledges all of them.
  await db.query(`INSERT INTO ${TENANT}.vendors (id, name) SELECT i, 'v' || i FROM generate_series(2, 9) AS i`);
  const committed = (await db.query<{ id: string }>('SELECT id::text AS id FROM public.outbox_events ORDER BY id')).rows.map((r) => r.id);
  t.ok(committed.every((id) => Number(id) > Number(late)), 'the open event has the smallest id');
  await ackAll(db, committed);
  await settle(api);
  t.ok(await cursor(db) < Number(late), `the cursor waits below the open event (${await cursor(db)} < ${late})`);

  await writer.query('COMMIT');
  t.same(await visibleIds(api, token), [late], 'the late event is there once it commits');
  await settle(api, db, Number(late) - 1);
  t.equal(await cursor(db), Number(late) - 1, 'and holds the cursor');
  await ackAll(db, [late]);
  await settle(api, db, Number(committed[committed.length - 1]));
  t.equal(await cursor(db), Number(committed[committed.length - 1]), 'then everything is passed');
  t.same(await visibleIds(api, token), []);
});

t.test('polling moves the cursor in the background', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { cursor: { intervalMs: 0, settleMs: 0, chunk: 4 } });
  const token = await api.token(TENANT, USER);
  const ids = await insertEvents(db, TENANT, 20);
  await ackAll(db, ids.slice(0, 15));
  const deadline = Date.now() + 10_000;
  while ((await cursor(db)) < Number(ids[14]) && Date.now() < deadline) {
    t.same(await visibleIds(api, token), ids.slice(15));
    await new Promise((r) => setTimeout(r, 20));
  }
  t.equal(await cursor(db), Number(ids[14]), 'reached the first event not hidden');
});

t.test('the engine is not confined: owner, capture, and a relay role of its own see every row', async (t) => {
  const db = await freshDatabase(t);
  await createTestApiRole(t, db);
  await createTenant(db, 'tenant_x');
  await createTenant(db, 'tenant_y');
  await db.query("INSERT INTO tenant_x.vendors (id, name) VALUES (1, 'a'), (2, 'b')");
  await db.query("INSERT INTO tenant_y.vendors (id, name) VALUES (1, 'c')");
  const owner = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM public.outbox_events');
  t.equal(owner.rows[0]!.n, 3, 'capture wrote every event and the owner sees them');

  const relayRole = `outbox_relay_t_${randomBytes(5).toString('hex')}`;
  const admin = new pg.Client({ connectionString: adminUrl() });
  await admin.connect();
  await admin.query(`CREATE ROLE ${relayRole} LOGIN PASSWORD 'relay-pw'`);
  await admin.end();
  t.teardown(async () => {
    const c = new pg.Client({ connectionString: db.url });
    await c.connect().then(() => c.query(`DROP OWNED BY ${relayRole}`)).catch(() => undefined);
    await c.end().catch(() => undefined);
    const a = new pg.Client({ connectionString: adminUrl() });
    await a.connect();
    await a.query(`DROP ROLE IF EXISTS ${relayRole}`);
    await a.end();
  });
  await db.query(`GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO ${relayRole}`);
  const u = new URL(db.url);
  u.username = relayRole;
  u.password = 'relay-pw';
  const relay = new pg.Client({ connectionString: u.toString() });
  await relay.connect();
  t.teardown(() => relay.end());
  t.equal((await relay.query<{ n: number }>('SELECT count(*)::int AS n FROM public.outbox_events')).rows[0]!.n, 3, 'a relay role reads all tenants');
  const updated = await relay.query("UPDATE public.outbox_events SET processed_at = now() WHERE tenant = 'tenant_x'");
  t.equal(updated.rowCount, 2, 'and writes them');
  await relay.query(
    "INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, status, source) SELECT id, 5, tenant, 'processed', 'relay' FROM public.outbox_events",
  );
  t.equal((await relay.query<{ n: number }>('SELECT count(*)::int AS n FROM public.event_acknowledgments')).rows[0]!.n, 3, 'relay acknowledgments for every tenant');
});

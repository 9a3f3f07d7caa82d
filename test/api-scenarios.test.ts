/**
 * The seed's three integration scenarios, automated against the pull API over real HTTP and a real
 * PostgreSQL, with the sidecar connected as its own role (row-level security on):
 *   - tests/simple-acknowledgment-demo.js: users A and B, exactly as the sequence diagram;
 *   - tests/cross-tenant-isolation-test.js: tenants never see each other, also when a query forgets
 *     its tenant filter (a test double of the SQL) — row-level security still holds;
 *   - tests/user-acknowledgment-test.js: the endpoints' parameters, shapes and acknowledgment rules.
 */
import pg from 'pg';
import t from 'tap';
import { defaultQueries, type ApiQueries } from '../src/api/eventStore.js';
import { createTenant, createTestApiRole, fingerprint, insertEvents, startApi } from './helpers/api.js';
import { freshDatabase } from './helpers/db.js';

const USER_A = 101;
const USER_B = 102;

t.test('simple acknowledgment demo: users A and B acknowledge independently (the sequence diagram)', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role);
  await createTenant(db, 'demo_tenant');

  // E ->> DB: Event Created (by the capture trigger, as in production).
  await db.query("INSERT INTO demo_tenant.vendors (id, name) VALUES (456, 'New Name')");
  const { rows } = await db.query<{ id: string }>("SELECT id::text AS id FROM public.outbox_events WHERE tenant = 'demo_tenant'");
  t.equal(rows.length, 1, 'one event captured');
  const eventId = rows[0]!.id;

  const tokenA = await api.token('demo_tenant', USER_A);
  const tokenB = await api.token('demo_tenant', USER_B);
  const visible = async (token: string): Promise<boolean> => {
    const res = await api.request('/api/outbox/events?exclude_acknowledged=true', { token });
    t.equal(res.status, 200);
    return (res.json.events as Array<{ id: string }>).some((e) => e.id === eventId);
  };
  const acknowledge = async (token: string): Promise<number> =>
    (await api.request(`/api/outbox/events/${eventId}/acknowledge`, { method: 'PATCH', token, body: JSON.stringify({ status: 'processed', processor: 'flowgram.ai' }) })).status;

  t.ok(await visible(tokenA), 'UA: event visible');
  t.ok(await visible(tokenB), 'UB: event visible');
  t.equal(await acknowledge(tokenA), 200, 'UA acknowledges');
  t.notOk(await visible(tokenA), 'UA: event hidden');
  t.ok(await visible(tokenB), 'UB: event still visible');
  t.equal(await acknowledge(tokenB), 200, 'UB acknowledges');
  t.notOk(await visible(tokenB), 'UB: event hidden');

  const acks = await db.query<{ user_id: number; source: string; status: string }>(
    'SELECT user_id, source, status::text AS status FROM public.event_acknowledgments WHERE event_id = $1 ORDER BY user_id',
    [eventId],
  );
  t.same(acks.rows, [
    { user_id: USER_A, source: 'pull', status: 'processed' },
    { user_id: USER_B, source: 'pull', status: 'processed' },
  ], 'one pull acknowledgment per user');
});

t.test('cross-tenant isolation', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role);
  await createTenant(db, 'tenant_alpha');
  await createTenant(db, 'tenant_beta');
  await db.query("INSERT INTO tenant_alpha.vendors (id, name) SELECT i, 'alpha ' || i FROM generate_series(1, 3) AS i");
  await db.query("INSERT INTO tenant_beta.vendors (id, name) SELECT i, 'beta ' || i FROM generate_series(1, 5) AS i");
  await db.query("INSERT INTO tenant_beta.projects (id, title) VALUES (1, 'secret project')");
  const betaIds = (await db.query<{ id: string }>("SELECT id::text AS id FROM public.outbox_events WHERE tenant = 'tenant_beta' ORDER BY id")).rows.map((r) => r.id);
  const alpha = await api.token('tenant_alpha', USER_A);

  t.test('the API shows a tenant its own events only', async (t) => {
    const res = await api.request('/api/outbox/events?limit=100', { token: alpha });
    t.equal(res.status, 200);
    t.equal(res.json.events.length, 3);
    t.ok(res.json.events.every((e: { tenant: string }) => e.tenant === 'tenant_alpha'), 'only tenant_alpha');
    t.equal(res.json.pagination.total, 3);
    const projects = await api.request('/api/outbox/events?event_type=projects_insert', { token: alpha });
    t.same(projects.json.events, [], "the other tenant's event types are not there");
  });

  t.test("acknowledging another tenant's event is 404 and changes nothing", async (t) => {
    const before = await fingerprint(db);
    for (const id of [betaIds[0]!, betaIds[betaIds.length - 1]!]) {
      const res = await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token: alpha, body: '{"status":"processed"}' });
      t.equal(res.status, 404);
      t.same(res.json, { error: { code: 'not_found', message: `event ${id} not found` } }, 'same answer as a missing event');
    }
    const missing = await api.request('/api/outbox/events/999999999/acknowledge', { method: 'PATCH', token: alpha, body: '{}' });
    t.equal(missing.status, 404);
    t.equal(await fingerprint(db), before, 'database unchanged');
  });

  t.test('row-level security holds when a query forgets its tenant filter (test double)', async (t) => {
    const forgetful: ApiQueries = {
      listEvents: (q, tenant, user) => withoutTenantFilter(defaultQueries.listEvents(q, tenant, user)),
      countEvents: (f, tenant, user) => withoutTenantFilter(defaultQueries.countEvents(f, tenant, user)),
      acknowledgeEvent: (i) => withoutTenantFilter(defaultQueries.acknowledgeEvent(i)),
    };
    // Control: the double really drops the filter (as the owner, which RLS does not confine, it leaks).
    const leaky = await startApi(t, db, undefined, { url: db.url, queries: forgetful });
    const leaked = await leaky.request('/api/outbox/events?limit=100', { token: await leaky.token('tenant_alpha', USER_A) });
    t.equal(leaked.status, 200, leaked.text);
    t.equal(leaked.json?.events?.length, 9, 'without row-level security the double leaks every tenant');

    const guarded = await startApi(t, db, role, { queries: forgetful });
    const tokenA = await guarded.token('tenant_alpha', USER_A);
    const res = await guarded.request('/api/outbox/events?limit=100', { token: tokenA });
    t.equal(res.status, 200);
    t.equal(res.json.events.length, 3, 'as the API role: tenant_alpha only');
    t.ok(res.json.events.every((e: { tenant: string }) => e.tenant === 'tenant_alpha'));
    t.equal(res.json.pagination.total, 3, 'the count too');
    const before = await fingerprint(db);
    const ack = await guarded.request(`/api/outbox/events/${betaIds[0]}/acknowledge`, { method: 'PATCH', token: tokenA, body: '{}' });
    t.equal(ack.status, 404, "another tenant's event stays invisible to the forgetful acknowledgment");
    t.equal(await fingerprint(db), before, 'database unchanged');
  });

  t.test('row-level security in SQL: settings decide, nothing without them', async (t) => {
    const c = new pg.Client({ connectionString: role.url });
    await c.connect();
    t.teardown(() => c.end());
    const count = async (): Promise<number> => Number((await c.query<{ n: string }>('SELECT count(*) AS n FROM public.outbox_events')).rows[0]!.n);
    t.equal(await count(), 0, 'no settings: no rows at all');
    await c.query('BEGIN');
    await c.query('SELECT * FROM public.outbox_api_begin($1, $2)', ['tenant_beta', USER_B]);
    t.equal(await count(), 6, 'tenant_beta: its 6 events');
    // Writing for another tenant or user, or as the relay, is refused by the policies.
    for (const [tenant, user, source] of [['tenant_alpha', USER_B, 'pull'], ['tenant_beta', USER_A, 'pull'], ['tenant_beta', USER_B, 'relay']] as const) {
      await c.query('SAVEPOINT s');
      await t.rejects(
        c.query('INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, source) VALUES ($1, $2, $3, $4)', [betaIds[0], user, tenant, source]),
        { code: '42501' },
        `refused: ${tenant} / ${user} / ${source}`,
      );
      await c.query('ROLLBACK TO SAVEPOINT s');
    }
    await t.rejects(c.query('UPDATE public.outbox_events SET processed_at = now()'), { code: '42501' }, 'events are read-only for the API role');
    await c.query('ROLLBACK');
    t.equal(await count(), 0, 'settings end with the transaction');
  });
});

/**
 * The double: the same SQL with its tenant filter `e.tenant = b.tenant` (the first condition of every
 * query) turned into a condition that is always true. It still refers to `b`, the confining call, so
 * that call still runs first: what is tested is a forgotten filter, nothing else.
 */
function withoutTenantFilter(q: pg.QueryConfig): pg.QueryConfig {
  const text = q.text.replace('e.tenant = b.tenant', 'b.tenant IS NOT NULL');
  if (text === q.text) throw new Error(`test double: no tenant filter found in ${q.text}`);
  return { text, values: q.values ?? [] };
}

t.test('user acknowledgment API test', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role);
  const vendors = await insertEvents(db, 'tenant_u', 7, 'vendors_update', 'vendors');
  const projects = await insertEvents(db, 'tenant_u', 3, 'projects_insert', 'projects');
  await db.query("UPDATE public.outbox_events SET processed_at = now() WHERE id = ANY($1::bigint[])", [vendors.slice(0, 2)]);
  await db.query("UPDATE public.outbox_events SET attempts = max_attempts WHERE id = $1", [vendors[2]]);
  const token = await api.token('tenant_u', USER_A);

  t.test('GET: shape, defaults and pagination', async (t) => {
    const res = await api.request('/api/outbox/events', { token });
    t.equal(res.status, 200);
    t.match(res.headers.get('content-type'), /^application\/json/);
    t.same(res.json.pagination, { total: 10, limit: 50, offset: 0, hasMore: false });
    const first = res.json.events[0];
    t.same(Object.keys(first), ['id', 'tenant', 'event_type', 'aggregate_id', 'aggregate_type', 'payload', 'created_at', 'status'], "the seed's fields, in order");
    t.equal(typeof first.id, 'string', 'ids are strings, as in the seed');
    t.match(first.created_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    t.same(res.json.events.map((e: { id: string }) => e.id), [...vendors, ...projects], 'id order by default');

    const page = await api.request('/api/outbox/events?limit=4&offset=4', { token });
    t.same(page.json.pagination, { total: 10, limit: 4, offset: 4, hasMore: true });
    t.same(page.json.events.map((e: { id: string }) => e.id), [...vendors, ...projects].slice(4, 8));
    const last = await api.request('/api/outbox/events?limit=4&offset=8', { token });
    t.same(last.json.pagination, { total: 10, limit: 4, offset: 8, hasMore: false });
    const beyond = await api.request('/api/outbox/events?limit=4&offset=20', { token });
    t.same(beyond.json, { events: [], pagination: { total: 10, limit: 4, offset: 20, hasMore: false } });
  });

  t.test('GET: filters and ordering', async (t) => {
    const ids = async (query: string): Promise<string[]> => {
      const res = await api.request(`/api/outbox/events?${query}`, { token });
      t.equal(res.status, 200, query);
      return res.json.events.map((e: { id: string }) => e.id);
    };
    t.same(await ids('event_type=projects_insert'), projects);
    t.same(await ids('aggregate_type=vendors&status=processed'), vendors.slice(0, 2));
    t.same(await ids('status=failed'), [vendors[2]]);
    t.same(await ids('status=pending'), [...vendors.slice(3), ...projects]);
    t.same(await ids('status=all&limit=100'), [...vendors, ...projects]);
    t.same(await ids('order_by=id&order_dir=DESC'), [...vendors, ...projects].reverse());
    t.same(await ids('order_by=event_type&order_dir=asc'), [...projects, ...vendors], 'projects_insert sorts before vendors_update, ties by id');
    t.same(await ids('order_by=status&order_dir=DESC&limit=3'), [vendors[1], vendors[0], projects[2]], 'processed before pending, ties by id (descending too)');
  });

  t.test('PATCH: the seed request and response', async (t) => {
    const res = await api.request(`/api/outbox/events/${vendors[3]}/acknowledge`, {
      method: 'PATCH',
      token,
      body: JSON.stringify({ status: 'processed', processor: 'flowgram.ai', metadata: { workflow_id: 'project-notification', execution_time_ms: 150, result: 'success' } }),
    });
    t.equal(res.status, 200);
    t.equal(res.json.status, 'success');
    t.equal(res.json.message, 'Event acknowledged successfully');
    const ack = res.json.acknowledgment;
    t.same(Object.keys(ack), ['id', 'event_id', 'user_id', 'processor', 'status', 'processed_at']);
    t.equal(ack.event_id, Number(vendors[3]));
    t.equal(ack.user_id, USER_A);
    t.equal(ack.processor, 'flowgram.ai');
    t.equal(ack.status, 'processed');
    t.match(ack.processed_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    const stored = await db.query('SELECT metadata, tenant, source FROM public.event_acknowledgments WHERE id = $1', [ack.id]);
    t.same(stored.rows[0], { metadata: { workflow_id: 'project-notification', execution_time_ms: 150, result: 'success' }, tenant: 'tenant_u', source: 'pull' });
  });

  t.test('PATCH twice updates the one acknowledgment (200 both times)', async (t) => {
    const id = vendors[4]!;
    const first = await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body: '{"status":"in_progress","metadata":{"step":1}}' });
    const second = await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body: '{"status":"skipped","processor":"other"}' });
    t.equal(first.status, 200);
    t.equal(second.status, 200);
    t.equal(second.json.acknowledgment.id, first.json.acknowledgment.id, 'same row');
    const rows = await db.query('SELECT status::text AS status, processor, metadata FROM public.event_acknowledgments WHERE event_id = $1', [id]);
    t.same(rows.rows, [{ status: 'skipped', processor: 'other', metadata: null }], 'replaced, not duplicated');
  });

  t.test('defaults: processed by flowgram.ai; metadata numbers keep every digit', async (t) => {
    const id = vendors[5]!;
    const res = await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body: '{"metadata":{"amount":12345.678901234567890123,"big":12345678901234567890}}' });
    t.equal(res.status, 200);
    t.equal(res.json.acknowledgment.status, 'processed');
    t.equal(res.json.acknowledgment.processor, 'flowgram.ai');
    const { rows } = await db.query<{ m: string }>('SELECT metadata::text AS m FROM public.event_acknowledgments WHERE event_id = $1', [id]);
    t.equal(rows[0]!.m, '{"big": 12345678901234567890, "amount": 12345.678901234567890123}');
  });

  t.test("exclude_acknowledged hides processed, skipped and in_progress, not failed; only this user's", async (t) => {
    const id = vendors[6]!;
    await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body: '{"status":"failed"}' });
    const res = await api.request('/api/outbox/events?exclude_acknowledged=true', { token });
    const shown: string[] = res.json.events.map((e: { id: string }) => e.id);
    t.notOk(shown.includes(vendors[3]!), 'processed hidden');
    t.notOk(shown.includes(vendors[4]!), 'skipped hidden');
    t.notOk(shown.includes(vendors[5]!), 'processed (default) hidden');
    t.ok(shown.includes(id), 'failed stays visible, for a retry');
    t.equal(res.json.pagination.total, 7);
    const other = await api.request('/api/outbox/events?exclude_acknowledged=true', { token: await api.token('tenant_u', USER_B) });
    t.equal(other.json.events.length, 10, "another user is not affected by A's acknowledgments");
  });

  t.test("a pull acknowledgment overwrites the relay's", async (t) => {
    const id = projects[0]!;
    await db.query(
      "INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, processor, status, source) VALUES ($1, $2, 'tenant_u', 'flowgram.ai', 'failed', 'relay')",
      [id, USER_A],
    );
    const res = await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body: '{"status":"processed","processor":"manual"}' });
    t.equal(res.status, 200);
    const { rows } = await db.query('SELECT status::text AS status, processor, source FROM public.event_acknowledgments WHERE event_id = $1', [id]);
    t.same(rows, [{ status: 'processed', processor: 'manual', source: 'pull' }]);
  });

  t.test('healthz', async (t) => {
    const res = await api.request('/healthz');
    t.equal(res.status, 200);
    t.same(res.json, { status: 'ok' });
  });
});

/**
 * The sidecar's defences for a public-facing service: rate limit per token holder, body limit,
 * request deadline, and internal errors that reveal nothing.
 */
import t from 'tap';
import { defaultQueries } from '../src/api/eventStore.js';
import { createTestApiRole, fingerprint, insertEvents, startApi, waitFor } from './helpers/api.js';
import { freshDatabase } from './helpers/db.js';

t.test('rate limit per token holder', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  // One token a second after a burst of five: nothing refills while the assertions below run.
  const api = await startApi(t, db, role, { env: { API_RATE_LIMIT_PER_SECOND: '1', API_RATE_LIMIT_BURST: '5' } });
  const a = await api.token('tenant_r', 1);
  const a2 = await api.token('tenant_r', 1, 900);
  const b = await api.token('tenant_r', 2);
  const statuses: number[] = [];
  for (let i = 0; i < 3; i++) statuses.push((await api.request('/api/outbox/events', { token: a })).status);
  for (let i = 0; i < 2; i++) statuses.push((await api.request('/api/outbox/events/1/acknowledge', { method: 'PATCH', token: a, body: '{}' })).status);
  t.same(statuses, [200, 200, 200, 404, 404], 'the burst passes (both endpoints take from it)');
  const limited = await api.request('/api/outbox/events', { token: a });
  t.equal(limited.status, 429, 'then 429');
  t.same(limited.json, { error: { code: 'rate_limited', message: 'too many requests for this token; slow down' } });
  t.match(limited.headers.get('retry-after'), /^[1-9][0-9]*$/, 'Retry-After in seconds');
  t.equal((await api.request('/api/outbox/events/1/acknowledge', { method: 'PATCH', token: a, body: '{}' })).status, 429, 'PATCH too');
  t.equal((await api.request('/api/outbox/events', { token: a2 })).status, 429, 'a second token of the same user shares the bucket');
  t.equal((await api.request('/api/outbox/events', { token: b })).status, 200, 'another user has a bucket of their own');

  // One token a second: the bucket refills within a second or so.
  await waitFor(async () => (await api.request('/api/outbox/events', { token: a })).status === 200, 3_000, 'the bucket to refill');
  t.pass('refilled');
  t.equal((await api.request('/healthz')).status, 200, 'healthz is not rate limited');
});

t.test('a flood of bad tokens from one address is cut off too', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { env: { API_RATE_LIMIT_PER_SECOND: '3', API_RATE_LIMIT_BURST: '3' } });
  const statuses: number[] = [];
  for (let i = 0; i < 6; i++) statuses.push((await api.request('/api/outbox/events', { token: `forged.${i}.token` })).status);
  t.same(statuses, [401, 401, 401, 429, 429, 429]);
});

t.test('the default limit does not trouble a busy poller', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role);
  t.equal(api.config.api.rateLimitPerSecond, 100);
  const token = await api.token('tenant_busy', 1);
  const results = await Promise.all(Array.from({ length: 150 }, () => api.request('/api/outbox/events?limit=1', { token })));
  t.ok(results.every((r) => r.status === 200), '150 requests at once (within the default burst of 200)');
});

t.test('body limit', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { env: { API_BODY_LIMIT_BYTES: '2048' } });
  const [id] = await insertEvents(db, 'tenant_b', 1);
  const token = await api.token('tenant_b', 1);
  const before = await fingerprint(db);
  const big = await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body: JSON.stringify({ metadata: { x: 'y'.repeat(3000) } }) });
  t.equal(big.status, 413);
  t.same(big.json, { error: { code: 'payload_too_large', message: 'request body must be at most 2048 bytes' } });
  t.equal(await fingerprint(db), before);
  const small = await api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body: JSON.stringify({ metadata: { x: 'y'.repeat(1000) } }) });
  t.equal(small.status, 200);
});

t.test('request deadline: 503, and the query is cancelled by statement_timeout', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const slow = {
    ...defaultQueries,
    listEvents: (...args: Parameters<typeof defaultQueries.listEvents>) => {
      const q = defaultQueries.listEvents(...args);
      return { text: q.text.replace('FROM public.outbox_events AS e WHERE', 'FROM public.outbox_events AS e, pg_sleep(3) AS s WHERE'), values: q.values ?? [] };
    },
  };
  const api = await startApi(t, db, role, { env: { API_REQUEST_TIMEOUT_MS: '300' }, queries: slow });
  await insertEvents(db, 'tenant_slow', 1);
  const token = await api.token('tenant_slow', 1);
  const started = Date.now();
  const res = await api.request('/api/outbox/events', { token });
  const took = Date.now() - started;
  t.equal(res.status, 503);
  t.same(res.json, { error: { code: 'timeout', message: 'request took too long' } });
  t.equal(res.headers.get('retry-after'), '1', 'the timeout tells the client when to try again');
  t.ok(took < 2_000, `answered at the deadline, not after the 3 s query (${took} ms)`);
  // The connection comes back to the pool once statement_timeout cancels the query.
  await waitFor(() => api.pool.idleCount === api.pool.totalCount, 5_000, 'the pool to get its connection back', () => ({ idle: api.pool.idleCount, total: api.pool.totalCount }));
  t.pass('connection returned');
});

t.test('an internal error reveals nothing', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const broken = { ...defaultQueries, countEvents: () => ({ text: 'SELECT * FROM public.no_such_table_x', values: [] }) };
  const api = await startApi(t, db, role, { queries: broken, env: { API_TOTAL_CACHE_MS: '0' } });
  const res = await api.request('/api/outbox/events', { token: await api.token('tenant_e', 1) });
  t.equal(res.status, 500);
  t.same(res.json, { error: { code: 'internal', message: 'internal error' } });
  t.notMatch(res.text, /no_such_table|SELECT|at \w+ \(/);
  const logged = api.logs.errors();
  t.equal(logged.length, 1, 'logged on our side');
  t.match(String(logged[0]?.err), /no_such_table_x/, 'with the cause');
});

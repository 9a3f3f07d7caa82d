/**
 * Input as an attacker would send it: SQL and JSON injection in every parameter and body field, deep
 * and huge metadata, odd ids, unknown parameters, wrong content types, oversized bodies. Each gets
 * the right 4xx with a message naming the field, and the database is unchanged.
 */
import t from 'tap';
import { createTestApiRole, fingerprint, insertEvents, startApi } from './helpers/api.js';
import { freshDatabase } from './helpers/db.js';

const SQL_INJECTIONS = [
  "' OR '1'='1",
  "x'; DROP TABLE public.outbox_events; --",
  'x; DELETE FROM public.event_acknowledgments',
  "1 UNION SELECT * FROM pg_authid --",
  "id; SELECT pg_sleep(5)",
  'x/*',
  '1) OR (1=1',
  "$1",
  'ASC, (SELECT 1)',
];

const JSON_INJECTIONS = ['{"$gt":""}', '["processed"]', '{"__proto__":{"admin":true}}', 'null', 'true', '"processed"'];

t.test('attacker input', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { env: { API_BODY_LIMIT_BYTES: '16384', API_RATE_LIMIT_PER_SECOND: '0' } });
  const [eventId] = await insertEvents(db, 'tenant_v', 3);
  await insertEvents(db, 'tenant_other', 3);
  const token = await api.token('tenant_v', 101);
  const before = await fingerprint(db);

  const get = async (query: string): Promise<{ status: number; json: any }> => api.request(`/api/outbox/events?${query}`, { token });
  const patch = async (body: string, id: string = eventId!, headers: Record<string, string> = {}): Promise<{ status: number; json: any; headers: Headers }> =>
    api.request(`/api/outbox/events/${id}/acknowledge`, { method: 'PATCH', token, body, headers });

  t.test('SQL injection in every query parameter: 400 naming the parameter', async (t) => {
    const params = ['event_type', 'aggregate_type', 'status', 'exclude_acknowledged', 'limit', 'offset', 'order_by', 'order_dir'];
    for (const name of params) {
      for (const evil of SQL_INJECTIONS) {
        const res = await get(`${name}=${encodeURIComponent(evil)}`);
        t.equal(res.status, 400, `${name}=${evil}`);
        t.equal(res.json?.error?.code, 'invalid_parameter');
        t.match(res.json?.error?.message, new RegExp(`^${name} `), `message names ${name}`);
      }
    }
  });

  t.test('JSON injection in query parameters', async (t) => {
    for (const evil of JSON_INJECTIONS) {
      for (const name of ['event_type', 'status', 'limit', 'order_by']) {
        // `null` and `true` are well-formed event type names (letters only): nothing to refuse there.
        if (name === 'event_type' && /^[a-z]+$/.test(evil)) continue;
        const res = await get(`${name}=${encodeURIComponent(evil)}`);
        t.equal(res.status, 400, `${name}=${evil}`);
      }
    }
    const bracket = await get('status[$ne]=pending');
    t.equal(bracket.status, 400, 'qs-style operators are unknown parameters');
    t.equal(bracket.json.error.code, 'unknown_parameter');
  });

  t.test('values out of range, repeated and unknown parameters', async (t) => {
    const cases: Array<[string, RegExp]> = [
      ['limit=0', /^limit must be an integer from 1 to 100/],
      ['limit=101', /^limit /],
      ['limit=-1', /^limit /],
      ['limit=1.5', /^limit /],
      ['limit=1e2', /^limit /],
      ['limit=', /^limit /],
      ['limit=%2050', /^limit /],
      ['offset=-1', /^offset must be an integer from 0/],
      ['offset=99999999999', /^offset /],
      ['offset=0x10', /^offset /],
      ['order_by=payload', /^order_by must be one of id, created_at, event_type, aggregate_type, status/],
      ['order_by=ID', /^order_by /],
      ['order_dir=sideways', /^order_dir must be one of ASC, DESC/],
      ['status=done', /^status must be one of pending, processed, failed, all/],
      ['exclude_acknowledged=yes', /^exclude_acknowledged must be true or false/],
      ['event_type=' + 'a'.repeat(101), /^event_type must be 1 to 100/],
      ['event_type=', /^event_type /],
      ['event_type=vendors-update', /^event_type /],
      ['event_type=vendors%00update', /^event_type /],
      ['event_type=v%C3%A9ndors', /^event_type /],
      ['aggregate_type=a%20b', /^aggregate_type /],
      ['limit=10&limit=20', /^limit is given more than once/],
      ['tenant=tenant_other', /^unknown query parameter "tenant"/],
      ['user_id=1', /^unknown query parameter "user_id"/],
      ['evnet_type=x', /^unknown query parameter "evnet_type"/],
    ];
    for (const [query, message] of cases) {
      const res = await get(query);
      t.equal(res.status, 400, query);
      t.match(res.json?.error?.message, message, query);
    }
    t.equal((await get('limit=100&offset=2147483647&order_dir=desc')).status, 200, 'the edges are allowed');
  });

  t.test('event ids: non-numeric, negative, zero, huge', async (t) => {
    for (const id of ['abc', '-1', '0', '1.5', '1e3', '+1', '%201', '01', '9223372036854775808', '99999999999999999999', "1'%20OR%20'1'='1", '1;DROP', '%00']) {
      const res = await patch('{"status":"processed"}', id);
      t.equal(res.status, 400, `id ${id}`);
      t.match(res.json?.error?.message, /^event id must be a positive integer/, `id ${id}`);
    }
    for (const path of ['/api/outbox/events//acknowledge', '/api/outbox/events/1/2/acknowledge', '/api/outbox/events/1/acknowledge/', '/api/outbox/events/1']) {
      const res = await api.request(path, { method: 'PATCH', token, body: '{}' });
      t.equal(res.status, path === '/api/outbox/events//acknowledge' ? 400 : 404, path);
    }
    const max = await patch('{}', '9223372036854775807');
    t.equal(max.status, 404, 'the largest bigint is a well-formed id: not found');
  });

  t.test('bodies that are not JSON objects', async (t) => {
    for (const body of ['', ' ', 'processed', '{"status":', "{'status':'processed'}", ...JSON_INJECTIONS.filter((b) => !b.startsWith('{')), '[]', '123', '{"status":"processed"}{"x":1}']) {
      const res = await patch(body);
      t.equal(res.status, 400, `body ${JSON.stringify(body)}`);
      t.equal(res.json?.error?.code, 'invalid_body');
    }
  });

  t.test('JSON injection and bad fields in the body', async (t) => {
    const cases: Array<[string, RegExp]> = [
      ['{"$gt":""}', /^unknown field "\$gt"/],
      ['{"__proto__":{"status":"processed"}}', /^unknown field "__proto__"/],
      ['{"constructor":{"prototype":{}}}', /^unknown field "constructor"/],
      ['{"status":"processed","user_id":1}', /^unknown field "user_id"/],
      ['{"status":"processed","tenant":"tenant_other"}', /^unknown field "tenant"/],
      ['{"status":"processed","source":"relay"}', /^unknown field "source"/],
      ['{"status":{"$ne":"failed"}}', /^status must be one of processed, failed, skipped, in_progress/],
      ['{"status":["processed"]}', /^status /],
      ['{"status":"processed\'; DROP TABLE x; --"}', /^status /],
      ['{"status":"PROCESSED"}', /^status /],
      ['{"processor":""}', /^processor must be 1 to 100 characters/],
      [`{"processor":"${'p'.repeat(101)}"}`, /^processor must be 1 to 100/],
      ['{"processor":42}', /^processor must be a string/],
      ['{"processor":"a\\u0000b"}', /^processor must not contain control characters/],
      ['{"processor":"a\\nb"}', /^processor /],
      ['{"metadata":"text"}', /^metadata must be a JSON object or null/],
      ['{"metadata":[1,2]}', /^metadata must be a JSON object/],
      ['{"metadata":{"k":"\\u0000"}}', /^metadata contains text that cannot be stored/],
      ['{"metadata":{"\\u0000":1}}', /^metadata contains a key/],
      ['{"metadata":{"k":"\\ud800"}}', /^metadata contains text that cannot be stored/],
    ];
    for (const [body, message] of cases) {
      const res = await patch(body);
      t.equal(res.status, 400, body.slice(0, 60));
      t.match(res.json?.error?.message, message, body.slice(0, 60));
    }
    const unicode = await patch(`{"processor":"${'é'.repeat(100)}"}`, eventId);
    t.equal(unicode.status, 200, '100 characters (not bytes) is the limit');
    await db.query('DELETE FROM public.event_acknowledgments');
  });

  t.test('deep and huge metadata', async (t) => {
    const nest = (levels: number): unknown => (levels === 0 ? 1 : { n: nest(levels - 1) });
    const five = await patch(JSON.stringify({ metadata: nest(5) }));
    t.equal(five.status, 200, '5 levels (the metadata object and 4 more) is allowed');
    const six = await patch(JSON.stringify({ metadata: nest(6) }));
    t.equal(six.status, 400, '6 levels');
    t.match(six.json.error.message, /^metadata must not nest more than 5 levels/);
    const arrays = await patch(JSON.stringify({ metadata: { a: [[[[[1]]]]] } }));
    t.equal(arrays.status, 400, 'arrays count as levels');
    const abyss = await patch(`{"metadata":${'{"a":'.repeat(2000)}1${'}'.repeat(2000)}}`);
    t.equal(abyss.status, 400, '2000 levels: refused, without exhausting the stack');
    const big = await patch(JSON.stringify({ metadata: { blob: 'x'.repeat(10 * 1024) } }));
    t.equal(big.status, 400, 'over 10 KB');
    t.match(big.json.error.message, /^metadata must be at most 10 KB/);
    const wide = await patch(JSON.stringify({ metadata: Object.fromEntries(Array.from({ length: 1000 }, (_, i) => [`k${i}`, i])) }));
    t.equal(wide.status, 400, 'many small keys over 10 KB');
    const justUnder = await patch(JSON.stringify({ metadata: { blob: 'x'.repeat(10 * 1024 - 20) } }));
    t.equal(justUnder.status, 200, 'just under 10 KB');
    await db.query('DELETE FROM public.event_acknowledgments');
  });

  t.test('body limit, content type, numbers PostgreSQL cannot hold', async (t) => {
    const huge = await patch(JSON.stringify({ metadata: { blob: 'x'.repeat(20_000) } }));
    t.equal(huge.status, 413, 'over the body limit');
    t.equal(huge.json.error.code, 'payload_too_large');
    const chunked = await fetch(`${api.base}/api/outbox/events/${eventId}/acknowledge`, {
      method: 'PATCH',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: new ReadableStream({
        start(controller) {
          for (let i = 0; i < 40; i++) controller.enqueue(new TextEncoder().encode('x'.repeat(1000)));
          controller.close();
        },
      }),
      duplex: 'half',
    } as RequestInit);
    t.equal(chunked.status, 413, 'chunked body over the limit (no Content-Length)');
    await chunked.text();
    for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'application/json; charset=latin1', '']) {
      const res = await patch('{"status":"processed"}', eventId, { 'content-type': type });
      t.equal(res.status, 415, `content type ${JSON.stringify(type)}`);
    }
    t.equal((await patch('{"status":"processed"}', eventId, { 'content-type': 'application/json; charset=utf-8' })).status, 200, 'charset utf-8 is fine');
    // No body at all (every field is optional): the defaults, whatever the Content-Type says.
    const bare = await fetch(`${api.base}/api/outbox/events/${eventId}/acknowledge`, { method: 'PATCH', headers: { authorization: `Bearer ${token}` } });
    t.equal(bare.status, 200, 'a PATCH without a body and without Content-Type acknowledges');
    t.match(await bare.json(), { acknowledgment: { status: 'processed', processor: 'flowgram.ai' } }, 'with the defaults');
    const overflow = await patch('{"metadata":{"n":1e1000000}}');
    t.equal(overflow.status, 400, 'a number numeric cannot hold');
    t.equal(overflow.json.error.code, 'invalid_body');
    const latin1 = await fetch(`${api.base}/api/outbox/events/${eventId}/acknowledge`, {
      method: 'PATCH',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: Buffer.from([0x7b, 0x22, 0x70, 0x72, 0x6f, 0x63, 0x65, 0x73, 0x73, 0x6f, 0x72, 0x22, 0x3a, 0x22, 0xe9, 0x22, 0x7d]),
    });
    t.equal(latin1.status, 400, 'bytes that are not UTF-8');
    await latin1.text();
    const query = await api.request(`/api/outbox/events/${eventId}/acknowledge?status=processed`, { method: 'PATCH', token, body: '{}' });
    t.equal(query.status, 400, 'PATCH takes no query parameters');
    await db.query('DELETE FROM public.event_acknowledgments');
  });

  t.test('methods and paths', async (t) => {
    const cases: Array<[string, string, number]> = [
      ['POST', '/api/outbox/events', 405],
      ['DELETE', '/api/outbox/events', 405],
      ['GET', `/api/outbox/events/${eventId}/acknowledge`, 405],
      ['PUT', `/api/outbox/events/${eventId}/acknowledge`, 405],
      ['POST', '/healthz', 405],
      ['GET', '/api/outbox/events/', 404],
      ['GET', '/api/outbox', 404],
      ['GET', '/../etc/passwd', 404],
      ['GET', '/api/outbox/events/../../../etc/passwd', 404],
    ];
    for (const [method, path, status] of cases) {
      const res = await api.request(path, { method, token });
      t.equal(res.status, status, `${method} ${path}`);
      t.type(res.json?.error?.code, 'string', 'error shape');
    }
    const allow = await api.request('/api/outbox/events', { method: 'POST', token });
    t.equal(allow.headers.get('allow'), 'GET');
  });

  t.test('no stack traces or SQL in any error', async (t) => {
    const everything = JSON.stringify(api.logs.lines.length);
    t.ok(everything, 'requests logged');
    const res = await get("event_type=x'");
    t.notMatch(JSON.stringify(res.json), /at |\.ts:|SELECT|postgres/i);
  });

  t.test('the database is unchanged by all of it', async (t) => {
    t.equal(await fingerprint(db), before);
    t.same(api.logs.errors(), [], 'no request failed inside the server');
  });
});

/** The pull API's pure pieces: rate limiter, count cache, token helpers, validation, error mapping. */
import t from 'tap';
import { bearerToken, parseTtl, parseUserId, isTenantName } from '../src/api/auth.js';
import { ApiError } from '../src/api/errors.js';
import { eventJson } from '../src/api/eventStore.js';
import { isJsonContentType } from '../src/api/http.js';
import { RateLimiter } from '../src/api/rateLimiter.js';
import { matchRoute } from '../src/api/routes.js';
import { toApiError } from '../src/api/server.js';
import { TotalCache } from '../src/api/totalCache.js';
import { jsonDepth, parseAckBody, parseEventId, parseListQuery } from '../src/api/validation.js';
import { eventBody } from '../src/relay/eventBody.js';

t.test('rate limiter: burst, steady rate, retry-after, forgetting idle keys', async (t) => {
  let now = 0;
  const limiter = new RateLimiter(10, 3, 100, () => now);
  t.same([1, 2, 3].map(() => limiter.take('a').ok), [true, true, true], 'burst of 3');
  const refused = limiter.take('a');
  t.same(refused, { ok: false, retryAfterSeconds: 1 });
  t.ok(limiter.take('b').ok, 'keys are independent');
  now += 100; // one token at 10/s
  t.ok(limiter.take('a').ok);
  t.notOk(limiter.take('a').ok);
  now += 10_000;
  t.ok(limiter.take('c').ok);
  t.equal(limiter.size, 1, 'full buckets are forgotten');
  t.ok(new RateLimiter(0, 0).take('x').ok, 'rate 0: no limit');
  const slow = new RateLimiter(0.1, 1, 100, () => now);
  slow.take('s');
  t.same(slow.take('s'), { ok: false, retryAfterSeconds: 10 });
});

t.test('rate limiter stays bounded under a flood of keys', async (t) => {
  let now = 0;
  const limiter = new RateLimiter(1, 1, 1000, () => now);
  for (let i = 0; i < 10_000; i++) {
    limiter.take(`k${i}`);
    now += 0.01;
  }
  t.ok(limiter.size <= 1000, `at most maxKeys (${limiter.size})`);
});

t.test('count cache: one computation per key, stale while revalidating', async (t) => {
  let now = 0;
  const errors: unknown[] = [];
  const cache = new TotalCache(1000, (e) => errors.push(e), 10, () => now);
  let calls = 0;
  let release: ((n: number) => void) | undefined;
  const compute = (): Promise<number> => {
    calls++;
    return new Promise<number>((resolve) => (release = resolve));
  };
  const a = cache.get('k', compute);
  const b = cache.get('k', compute);
  release!(5);
  t.same(await Promise.all([a, b]), [5, 5]);
  t.equal(calls, 1, 'shared');
  t.equal(await cache.get('k', compute), 5, 'fresh: cached');
  t.equal(calls, 1);
  now += 1500;
  t.equal(await cache.get('k', compute), 5, 'stale: old value at once');
  t.equal(calls, 2, 'and a refresh started');
  release!(7);
  await new Promise((r) => setImmediate(r));
  t.equal(await cache.get('k', compute), 7, 'refreshed');
  now += 1500;
  t.equal(await cache.get('k', () => Promise.reject(new Error('db down'))), 7);
  await new Promise((r) => setImmediate(r));
  t.equal(errors.length, 1, 'a failed refresh is reported');
  t.equal(await cache.get('k', compute), 7, 'and keeps the old value');
  await t.rejects(cache.get('new', () => Promise.reject(new Error('no'))), /no/, 'a first computation that fails fails the request');
});

t.test('token helpers', async (t) => {
  t.equal(parseUserId(101), 101);
  t.equal(parseUserId('101'), 101);
  t.equal(parseUserId('-5'), -5);
  for (const bad of ['1.0', '01', '1e2', 1.5, 2 ** 31, '2147483648', null, true, '', ' 1']) t.equal(parseUserId(bad), undefined, JSON.stringify(bad));
  t.ok(isTenantName('a4ayc80OGd'));
  t.notOk(isTenantName('x'.repeat(64)));
  t.notOk(isTenantName('a\nb'));
  t.equal(parseTtl('1h'), 3600);
  t.equal(parseTtl('90s'), 90);
  t.equal(parseTtl('15m'), 900);
  t.equal(parseTtl('7d'), 604800);
  t.equal(parseTtl('3600'), 3600);
  for (const bad of ['0', '1y', '-1h', '367d', 'h', '']) t.equal(parseTtl(bad), undefined, bad);
  t.equal(bearerToken('Bearer abc.def.ghi'), 'abc.def.ghi');
  t.throws(() => bearerToken('Bearer abc def'), ApiError);
  t.throws(() => bearerToken(undefined), ApiError);
});

t.test('validation', async (t) => {
  const q = parseListQuery(new URLSearchParams(''));
  t.same(q, { eventType: undefined, aggregateType: undefined, status: 'all', excludeAcknowledged: false, limit: 50, offset: 0, orderBy: 'id', orderDir: 'ASC' });
  t.same(parseListQuery(new URLSearchParams('limit=100&offset=0&order_dir=desc&exclude_acknowledged=true')).orderDir, 'DESC');
  t.equal(parseEventId('123'), '123');
  t.equal(parseEventId('9223372036854775807'), '9223372036854775807');
  t.throws(() => parseEventId('9223372036854775808'));
  t.equal(jsonDepth(1, 5), 0);
  t.equal(jsonDepth({}, 5), 1);
  t.equal(jsonDepth({ a: [{ b: 1 }] }, 5), 3);
  t.same(parseAckBody('{}'), { status: 'processed', processor: 'flowgram.ai', hasMetadata: false });
  t.same(parseAckBody('{"metadata":null}'), { status: 'processed', processor: 'flowgram.ai', hasMetadata: false });
  t.same(parseAckBody('{"status":"in_progress","processor":"x","metadata":{"a":1}}'), { status: 'in_progress', processor: 'x', hasMetadata: true });
  t.ok(isJsonContentType('application/json'));
  t.ok(isJsonContentType('Application/JSON; charset=UTF-8'));
  t.notOk(isJsonContentType('application/jsonx'));
  t.notOk(isJsonContentType('text/json'));
  t.notOk(isJsonContentType(undefined));
});

t.test('routes', async (t) => {
  t.same(matchRoute('/api/outbox/events'), { name: 'list', allow: 'GET' });
  t.same(matchRoute('/api/outbox/events/12/acknowledge'), { name: 'acknowledge', allow: 'PATCH', idSegment: '12' });
  t.same(matchRoute('/healthz'), { name: 'health', allow: 'GET' });
  t.equal(matchRoute('/api/outbox/events/'), undefined);
});

t.test('the API event is the webhook body plus status', async (t) => {
  const row = {
    id: '123', tenant: 'a4ayc80OGd', event_type: 'vendors_update', aggregate_id: '456', aggregate_type: 'vendors',
    payload: '{"amount": 12345.678901234567890123}', created_at: '2025-01-06T10:30:00.000Z', status: 'pending',
  };
  const json = eventJson(row);
  t.equal(json, `${eventBody(row).slice(0, -1)},"status":"pending"}`);
  t.match(json, /"amount": 12345\.678901234567890123/, 'numbers exactly as PostgreSQL rendered them');
  t.same(Object.keys(JSON.parse(json)), ['id', 'tenant', 'event_type', 'aggregate_id', 'aggregate_type', 'payload', 'created_at', 'status']);
});

t.test('errors clients may see', async (t) => {
  t.same(pick(toApiError({ code: '22P02', message: 'invalid input syntax' })), [400, 'invalid_body']);
  t.same(pick(toApiError({ code: '57014', message: 'canceling statement' })), [503, 'timeout']);
  t.same(pick(toApiError({ code: '40P01', message: 'deadlock' })), [503, 'unavailable']);
  t.same(pick(toApiError({ code: '08006', message: 'connection failure' })), [503, 'unavailable']);
  t.same(pick(toApiError({ code: '28000', message: 'role "api" does not exist' })), [503, 'unavailable'], 'a refused login is the database unavailable, not a bug');
  t.same(pick(toApiError({ code: '28P01', message: 'password authentication failed' })), [503, 'unavailable'], 'a wrong password too');
  t.same(pick(toApiError({ code: '3D000', message: 'database "app" does not exist' })), [503, 'unavailable'], 'and a database gone');
  t.same(pick(toApiError({ code: 'ECONNREFUSED', message: 'connect ECONNREFUSED' })), [503, 'unavailable']);
  t.same(pick(toApiError(new Error('timeout exceeded when trying to connect'))), [503, 'unavailable']);
  t.same(pick(toApiError({ code: '42P01', message: 'relation does not exist' })), [500, 'internal']);
  t.same(pick(toApiError(new TypeError('x is undefined'))), [500, 'internal']);
  t.equal(toApiError(new TypeError('secret detail')).message, 'internal error');
});

function pick(e: ApiError): [number, string] {
  return [e.status, e.code];
}

/**
 * Bearer tokens as an attacker would try them: forged, expired, alg:none, wrong secret, missing or
 * odd claims. Each is a 401 with the standard error shape, and the database is unchanged.
 */
import { SignJWT } from 'jose';
import t from 'tap';
import { createTestApiRole, fingerprint, handmadeJwt, insertEvents, JWT_SECRET, nowSeconds, startApi } from './helpers/api.js';
import { freshDatabase } from './helpers/db.js';

t.test('tokens', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { env: { API_JWT_CLOCK_SKEW_SECONDS: '30' } });
  const [eventId] = await insertEvents(db, 'tenant_auth', 2);
  const now = nowSeconds();
  const header = { alg: 'HS256', typ: 'JWT' };
  const claims = { tenant: 'tenant_auth', sub: '101', iat: now, exp: now + 600 };

  const good = handmadeJwt(header, claims, JWT_SECRET);
  const parts = good.split('.');

  /** Both endpoints refuse `token` with 401 and leave the database alone. */
  const refused = async (token: string | undefined, what: string, message?: RegExp): Promise<void> => {
    const before = await fingerprint(db);
    const get = await api.request('/api/outbox/events', { token });
    t.equal(get.status, 401, `GET: ${what}`);
    t.equal(get.json?.error?.code, 'unauthorized', `GET code: ${what}`);
    if (message) t.match(get.json?.error?.message, message, `message: ${what}`);
    t.match(get.headers.get('www-authenticate') ?? '', /^Bearer /, 'RFC 6750 challenge');
    const patch = await api.request(`/api/outbox/events/${eventId}/acknowledge`, { method: 'PATCH', token, body: '{"status":"processed"}' });
    t.equal(patch.status, 401, `PATCH: ${what}`);
    t.equal(await fingerprint(db), before, `database unchanged: ${what}`);
  };

  t.test('a good token works, from jose and from a jsonwebtoken-style HMAC', async (t) => {
    t.equal((await api.request('/api/outbox/events', { token: good })).status, 200);
    const minted = await api.token('tenant_auth', 101);
    t.equal((await api.request('/api/outbox/events', { token: minted })).status, 200);
    const numericSub = handmadeJwt(header, { ...claims, sub: 101 }, JWT_SECRET);
    t.equal((await api.request('/api/outbox/events', { token: numericSub })).status, 200, 'a numeric sub is accepted');
    const lower = await fetch(`${api.base}/api/outbox/events`, { headers: { authorization: `bearer ${good}` } });
    t.equal(lower.status, 200, 'the scheme is case-insensitive');
    await lower.text();
  });

  t.test('missing and malformed headers', async () => {
    await refused(undefined, 'no Authorization header', /missing bearer token/);
    for (const h of ['Basic dXNlcjpwYXNz', `Token ${good}`, 'Bearer', `Bearer ${good} extra`, 'Bearer a.b', "Bearer ' OR 1=1 --"]) {
      const res = await api.request('/api/outbox/events', { headers: { authorization: h } });
      t.equal(res.status, 401, `header ${JSON.stringify(h.slice(0, 20))}`);
    }
  });

  t.test('forged: payload changed, signature kept', async () => {
    const forgedPayload = Buffer.from(JSON.stringify({ ...claims, tenant: 'tenant_other' })).toString('base64url');
    await refused(`${parts[0]}.${forgedPayload}.${parts[2]}`, 'forged tenant', /invalid token/);
    const forgedUser = Buffer.from(JSON.stringify({ ...claims, sub: '1' })).toString('base64url');
    await refused(`${parts[0]}.${forgedUser}.${parts[2]}`, 'forged user');
    await refused(`${parts[0]}.${parts[1]}.${Buffer.from('x'.repeat(32)).toString('base64url')}`, 'made-up signature');
    await refused(`${parts[0]}.${parts[1]}.`, 'empty signature');
  });

  t.test('alg none, and algorithms other than HS256', async () => {
    await refused(handmadeJwt({ alg: 'none', typ: 'JWT' }, claims, undefined), 'alg none');
    await refused(handmadeJwt({ alg: 'NONE', typ: 'JWT' }, claims, undefined), 'alg NONE');
    await refused(handmadeJwt({ alg: 'none' }, claims, JWT_SECRET), 'alg none with a signature');
    const hs512 = await new SignJWT(claims).setProtectedHeader({ alg: 'HS512' }).sign(new TextEncoder().encode(JWT_SECRET));
    await refused(hs512, 'HS512 with the right secret (algorithm pinned)');
    await refused(handmadeJwt({ alg: 'RS256', typ: 'JWT' }, claims, JWT_SECRET), 'RS256 header over an HMAC (key confusion)');
  });

  t.test('wrong secret', async () => {
    await refused(handmadeJwt(header, claims, `${JWT_SECRET}x`), 'secret with one more character');
    await refused(handmadeJwt(header, claims, 'secret'), 'a guessable secret');
  });

  t.test('expiry, with the configured clock skew', async () => {
    await refused(handmadeJwt(header, { ...claims, exp: now - 3600 }, JWT_SECRET), 'expired an hour ago', /token expired/);
    await refused(handmadeJwt(header, { ...claims, exp: now - 120 }, JWT_SECRET), 'expired beyond the 30 s skew');
    const withinSkew = handmadeJwt(header, { ...claims, exp: now - 5 }, JWT_SECRET);
    t.equal((await api.request('/api/outbox/events', { token: withinSkew })).status, 200, 'expired 5 s ago: within the skew');
    const { exp: _exp, ...noExp } = claims;
    await refused(handmadeJwt(header, noExp, JWT_SECRET), 'no exp (required)');
    await refused(handmadeJwt(header, { ...claims, exp: 'tomorrow' }, JWT_SECRET), 'exp not a number');
    await refused(handmadeJwt(header, { ...claims, nbf: now + 3600 }, JWT_SECRET), 'not valid before an hour from now');
  });

  t.test('tenant and user claims', async () => {
    const { tenant: _tenant, ...noTenant } = claims;
    await refused(handmadeJwt(header, noTenant, JWT_SECRET), 'no tenant claim', /tenant/);
    await refused(handmadeJwt(header, { ...claims, tenant: '' }, JWT_SECRET), 'empty tenant');
    await refused(handmadeJwt(header, { ...claims, tenant: ['tenant_auth'] }, JWT_SECRET), 'tenant as an array');
    await refused(handmadeJwt(header, { ...claims, tenant: 'x'.repeat(64) }, JWT_SECRET), 'tenant longer than a schema name');
    await refused(handmadeJwt(header, { ...claims, tenant: 'tenant_auth\u0000' }, JWT_SECRET), 'tenant with NUL');
    const { sub: _sub, ...noSub } = claims;
    await refused(handmadeJwt(header, noSub, JWT_SECRET), 'no user claim', /user id/);
    for (const sub of ['abc', '1.5', '1e3', ' 101', '99999999999', '0x10', '', '101; DROP TABLE x']) {
      await refused(handmadeJwt(header, { ...claims, sub }, JWT_SECRET), `user ${JSON.stringify(sub)}`);
    }
    for (const sub of [1.5, 2 ** 31, true, null, { id: 1 }]) {
      await refused(handmadeJwt(header, { ...claims, sub }, JWT_SECRET), `user ${JSON.stringify(sub)}`);
    }
  });

  t.test('a token of another tenant: no error, just that tenant (the tenant comes from the token only)', async (t) => {
    const other = await api.token('tenant_elsewhere', 101);
    const res = await api.request('/api/outbox/events', { token: other });
    t.equal(res.status, 200);
    t.same(res.json.events, []);
    const tenantParam = await api.request('/api/outbox/events?tenant=tenant_auth', { token: other });
    t.equal(tenantParam.status, 400, 'no tenant parameter');
  });

  t.test('logs never hold the token', async (t) => {
    const text = JSON.stringify(api.logs.lines);
    t.ok(api.logs.lines.length > 10, 'requests were logged');
    t.notOk(text.includes(parts[2]!), 'no signature in the logs');
    t.notOk(/eyJ[A-Za-z0-9_-]{10,}\./.test(text), 'no JWT in the logs');
    t.ok(api.logs.lines.some((l) => l.msg === 'request' && l.status === 401 && l.code === 'unauthorized'));
  });
});

t.test('issuer and audience, when configured', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { env: { API_JWT_ISSUER: 'verifywise', API_JWT_AUDIENCE: 'outbox' } });
  const now = nowSeconds();
  const base = { tenant: 't', sub: '1', exp: now + 60 };
  const header = { alg: 'HS256', typ: 'JWT' };
  t.equal((await api.request('/api/outbox/events', { token: await api.token('t', 1) })).status, 200, 'minted tokens carry both');
  t.equal((await api.request('/api/outbox/events', { token: handmadeJwt(header, base, JWT_SECRET) })).status, 401, 'neither');
  t.equal((await api.request('/api/outbox/events', { token: handmadeJwt(header, { ...base, iss: 'verifywise', aud: 'other' }, JWT_SECRET) })).status, 401, 'wrong audience');
  t.equal((await api.request('/api/outbox/events', { token: handmadeJwt(header, { ...base, iss: 'verifywise', aud: 'outbox' }, JWT_SECRET) })).status, 200, 'both right');
});

t.test('custom claim names', async (t) => {
  const db = await freshDatabase(t);
  const role = await createTestApiRole(t, db);
  const api = await startApi(t, db, role, { env: { API_JWT_TENANT_CLAIM: 'tenant_hash', API_JWT_USER_CLAIM: 'user_id' } });
  const now = nowSeconds();
  const header = { alg: 'HS256', typ: 'JWT' };
  t.equal((await api.request('/api/outbox/events', { token: handmadeJwt(header, { tenant_hash: 't', user_id: 7, exp: now + 60 }, JWT_SECRET) })).status, 200);
  t.equal((await api.request('/api/outbox/events', { token: handmadeJwt(header, { tenant: 't', sub: '7', exp: now + 60 }, JWT_SECRET) })).status, 401, 'the default claims no longer count');
});

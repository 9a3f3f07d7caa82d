/**
 * The tenant hash (the seed's getTenantHash): a tenant id's schema name, and the registry that makes
 * a collision an error instead of two tenants on one schema.
 */
import pg from 'pg';
import t from 'tap';
import { checkTenantSchema, parseTenantId, registerTenant, tenantHash, type TenantHashKey } from '../src/capture/tenantHash.js';
import { ConfigError, OutboxError, UsageError } from '../src/errors.js';
import { runCli } from './helpers/cli.js';
import { freshDatabase, type TestDatabase } from './helpers/db.js';

const KEY: TenantHashKey = { salt: 'c2FsdC1mb3ItdGVzdHMtb25seQ==', entropySource: 'outbox-relay-test-deployment' };
const ENV = { TENANT_HASH_SALT: KEY.salt, TENANT_ENTROPY_SOURCE: KEY.entropySource };
const VALID = /^[a-z][a-z0-9]{15}$/;

t.test('deterministic, pinned values: schema names must never change between versions', async (t) => {
  t.equal(tenantHash(42, KEY), tenantHash(42, KEY));
  t.equal(tenantHash('42', KEY), tenantHash(42, KEY), 'a decimal string and a number are the same id');
  t.equal(tenantHash(1, { ...KEY }), tenantHash(1, KEY), 'depends on the key\'s values, not its identity');
  // Changing these would move every tenant to another schema.
  t.equal(tenantHash(1, KEY), 's8gtmecdkawnduvn');
  t.equal(tenantHash(42, KEY), 'ydf6c9f7q4xgnbxf');
  t.equal(tenantHash(Number.MAX_SAFE_INTEGER, KEY), 'ytk29a93rtxgr48p');
});

t.test('salt and entropy source both change the hash, and are not interchangeable', async (t) => {
  const base = tenantHash(42, KEY);
  t.not(tenantHash(42, { ...KEY, salt: `${KEY.salt}x` }), base, 'salt');
  t.not(tenantHash(42, { ...KEY, entropySource: `${KEY.entropySource}x` }), base, 'entropy source');
  t.not(tenantHash(42, { salt: KEY.entropySource, entropySource: KEY.salt }), base, 'swapped');
  t.not(tenantHash(42, { salt: 'ab', entropySource: 'c' }), tenantHash(42, { salt: 'a', entropySource: 'bc' }), 'the boundary between salt and entropy matters');
  t.not(tenantHash(42, { salt: 'a:b', entropySource: 'c' }), tenantHash(42, { salt: 'a', entropySource: 'b:c' }), 'even with the separator inside');
  t.not(tenantHash(43, KEY), base, 'neighbouring ids differ');
  // Many keys: no two give the same name for one tenant.
  const names = new Set(Array.from({ length: 500 }, (_, i) => tenantHash(42, { ...KEY, salt: `salt-${i}` })));
  t.equal(names.size, 500, '500 salts, 500 names');
});

t.test('always 16 characters and a valid unquoted identifier, for thousands of ids', async (t) => {
  const seen = new Map<string, number>();
  const firsts = new Set<string>();
  const chars = new Set<string>();
  let bad = 0;
  const ids = [...Array.from({ length: 20_000 }, (_, i) => i + 1), Number.MAX_SAFE_INTEGER, 2 ** 52, 10 ** 15];
  for (const id of ids) {
    const h = tenantHash(id, KEY);
    if (h.length !== 16 || !VALID.test(h)) bad++;
    if (seen.has(h)) t.fail(`collision between ${seen.get(h)} and ${id}`);
    seen.set(h, id);
    firsts.add(h[0] as string);
    for (const c of h.slice(1)) chars.add(c);
  }
  t.equal(bad, 0, `every one of ${ids.length} hashes matches ${VALID}`);
  t.equal(seen.size, ids.length, 'no collisions among them');
  t.equal(firsts.size, 26, 'every letter appears first (uniform spread)');
  t.equal(chars.size, 36, 'letters and digits appear after the first');

  // PostgreSQL agrees that they are plain identifiers: quote_ident leaves them unquoted.
  const db = await freshDatabase(t);
  const sample = [...seen.keys()].slice(0, 2000);
  const { rows } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM unnest($1::text[]) AS s WHERE quote_ident(s) <> s', [sample]);
  t.equal(rows[0]?.n, 0, 'quote_ident(hash) = hash for 2,000 of them');
});

t.test('bad tenant ids are a UsageError', async (t) => {
  const bad: Array<string | number> = [0, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53, 1e21,
    'abc', '', '   ', '0', '-1', '1.5', '007', '01', '9007199254740992', '99999999999999999', '1e3', '0x10', '+5', '1_000', '4 2', '42abc'];
  for (const id of bad) {
    t.throws(() => parseTenantId(id), UsageError, `parseTenantId(${JSON.stringify(String(id))})`);
    t.throws(() => tenantHash(id, KEY), UsageError, `tenantHash(${JSON.stringify(String(id))})`);
  }
  t.throws(() => parseTenantId('abc'), { message: /invalid tenant id "abc": expected a positive integer/ });
  t.throws(() => parseTenantId('9007199254740992'), { message: /larger than 9007199254740991/ });
  t.equal(parseTenantId('9007199254740991'), Number.MAX_SAFE_INTEGER, 'the largest safe integer is fine');
  t.equal(parseTenantId(1), 1);
  t.throws(() => tenantHash(1, { salt: '', entropySource: 'x' }), ConfigError, 'missing salt: ConfigError');
  t.throws(() => tenantHash(1, { salt: 'x', entropySource: '' }), ConfigError, 'missing entropy source: ConfigError');
  t.throws(() => tenantHash(1, { salt: '', entropySource: '' }), { message: /TENANT_HASH_SALT and TENANT_ENTROPY_SOURCE must be set/ });
});

t.test('CLI: tenants hash prints the hash; bad ids exit 2; missing secrets exit 78', async (t) => {
  const cases = await Promise.all([
    runCli(['tenants', 'hash', '42'], ENV),
    runCli(['tenants', 'hash', '42', '--json'], ENV),
    runCli(['tenants', 'hash', '0'], ENV),
    runCli(['tenants', 'hash', 'abc'], ENV),
    runCli(['tenants', 'hash', '9007199254740992'], ENV),
    runCli(['tenants', 'hash', '42'], { TENANT_ENTROPY_SOURCE: KEY.entropySource }),
    runCli(['tenants', 'hash', '42'], { TENANT_HASH_SALT: KEY.salt }),
    runCli(['tenants', 'hash', '42'], { ...ENV, NODE_ENV: 'production', TENANT_HASH_SALT: 'changeme' }),
    runCli(['tenants', 'hash'], ENV),
  ]);
  const [plain, json, zero, abc, big, noSalt, noEntropy, weak, none] = cases;
  t.equal(plain?.code, 0, plain?.stderr);
  t.equal(plain?.stdout, `${tenantHash(42, KEY)}\n`, 'prints exactly the hash');
  t.equal(plain?.stdout, 'ydf6c9f7q4xgnbxf\n');
  t.equal(json?.code, 0);
  t.same(JSON.parse(json?.stdout ?? 'null'), { tenantId: 42, schema: 'ydf6c9f7q4xgnbxf' }, '--json');
  for (const [name, res] of [['0', zero], ['abc', abc], ['2^53', big]] as const) {
    t.equal(res?.code, 2, `id ${name}: exit 2`);
    t.match(res?.stderr, /^outbox-relay: error: invalid tenant id .*\n$/, `id ${name}: one clear line`);
    t.equal(res?.stdout, '');
  }
  t.equal(noSalt?.code, 78, 'missing salt: exit 78 (EX_CONFIG)');
  t.match(noSalt?.stderr, /TENANT_HASH_SALT is missing/);
  t.notMatch(noSalt?.stderr, /TENANT_ENTROPY_SOURCE is missing/);
  t.equal(noSalt?.stdout, '');
  t.equal(noEntropy?.code, 78, 'missing entropy source: exit 78');
  t.match(noEntropy?.stderr, /TENANT_ENTROPY_SOURCE is missing/);
  t.notMatch(noEntropy?.stderr, new RegExp(KEY.salt.replace(/[+=/]/g, '.')), 'the salt is never printed');
  t.equal(weak?.code, 78, 'a default-looking salt in production: exit 78');
  t.match(weak?.stderr, /TENANT_HASH_SALT/);
  t.notMatch(weak?.stderr, /changeme/, 'without printing it');
  t.equal(none?.code, 2, 'no id: usage error');
});

async function registry(db: TestDatabase): Promise<Array<{ tenant_id: string; schema_name: string }>> {
  const { rows } = await db.query<{ tenant_id: string; schema_name: string }>('SELECT tenant_id::text, schema_name FROM public.outbox_tenants ORDER BY tenant_id');
  return rows;
}

t.test('registry: --check, --register, collisions and a changed key', async (t) => {
  const db = await freshDatabase(t);
  const env = { ...ENV, DATABASE_URL: db.url };
  const h42 = tenantHash(42, KEY);

  const free = await runCli(['tenants', 'hash', '42', '--check', '--json'], env);
  t.equal(free.code, 0, free.stderr);
  t.same(JSON.parse(free.stdout), { tenantId: 42, schema: h42, ownership: 'free' });

  await db.query(`CREATE SCHEMA ${h42}`);
  const exists = await runCli(['tenants', 'hash', '42', '--check'], env);
  t.equal(exists.code, 0);
  t.equal(exists.stdout, `${h42}\nschema "${h42}" exists but is not registered to any tenant\n`);
  t.match(exists.stderr, /use --register/);
  t.same(await registry(db), [], '--check registers nothing');

  const reg = await runCli(['tenants', 'hash', '42', '--register', '--json'], env);
  t.equal(reg.code, 0, reg.stderr);
  t.same(JSON.parse(reg.stdout), { tenantId: 42, schema: h42, ownership: 'registered' });
  t.same(await registry(db), [{ tenant_id: '42', schema_name: h42 }]);
  const twice = await runCli(['tenants', 'hash', '42', '--register'], env);
  t.equal(twice.code, 0, '--register twice is harmless');
  t.match(twice.stdout, /registered to this tenant/);
  t.same(await registry(db), [{ tenant_id: '42', schema_name: h42 }], 'still one row');

  // Another tenant id mapped to tenant 7's name: a collision, whatever is asked.
  const h7 = tenantHash(7, KEY);
  await db.query('INSERT INTO public.outbox_tenants (tenant_id, schema_name) VALUES (777, $1)', [h7]);
  const before = await registry(db);
  for (const flag of ['--check', '--register']) {
    const res = await runCli(['tenants', 'hash', '7', flag], env);
    t.equal(res.code, 1, `${flag}: refused`);
    t.match(res.stderr, new RegExp(`^outbox-relay: error: tenant hash collision: schema "${h7}" (for tenant 7 already )?belongs to tenant 777; refusing to put two tenants on one schema\\n$`), `${flag}: one clear line`);
    t.equal(res.stdout, '', `${flag}: no result printed`);
  }
  t.same(await registry(db), before, 'nothing changed');

  // The same tenant under another key: the schema name would move, which is refused.
  const otherKey = { TENANT_HASH_SALT: 'another-salt-value-123', TENANT_ENTROPY_SOURCE: KEY.entropySource };
  for (const flag of ['--check', '--register']) {
    const res = await runCli(['tenants', 'hash', '42', flag], { ...otherKey, DATABASE_URL: db.url });
    t.equal(res.code, 1, `changed key, ${flag}: refused`);
    t.match(res.stderr, new RegExp(`tenant 42 is already registered with schema "${h42}"; its hash key .* must have changed`));
  }
  t.same(await registry(db), before, 'still nothing changed');
});

t.test('registerTenant: two tenants racing for one name, one wins', async (t) => {
  const db = await freshDatabase(t);
  const clients = await Promise.all([1, 2].map(async () => {
    const c = new pg.Client({ connectionString: db.url });
    await c.connect();
    return c;
  }));
  t.teardown(() => Promise.all(clients.map((c) => c.end())));
  const [a, b] = clients as [pg.Client, pg.Client];
  // Tenant 1's provisioning has inserted the name but not committed; tenant 2's sees the name free,
  // inserts, and waits on the unique schema name until tenant 1 commits.
  await a.query('BEGIN');
  await a.query('INSERT INTO public.outbox_tenants (tenant_id, schema_name) VALUES (1, $1)', ['racedname0000000']);
  t.same(await checkTenantSchema(b, 2, 'racedname0000000'), { state: 'free' }, 'uncommitted: the name looks free');
  const bPid = (await b.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid;
  const second = registerTenant(b, 2, 'racedname0000000').then(() => 'registered', (err: unknown) => err);
  // Wait (bounded) until tenant 2's INSERT is blocked on tenant 1's row.
  for (let i = 0; i < 500; i++) {
    const { rows } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_locks WHERE pid = $1 AND NOT granted', [bPid]);
    if ((rows[0]?.n ?? 0) > 0) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  await a.query('COMMIT');
  const outcome = await second;
  t.type(outcome, OutboxError, 'the loser gets an error');
  t.match(outcome, { code: 'E_TENANT_COLLISION', message: /schema "racedname0000000" for tenant 2 already belongs to tenant 1/ });
  t.same(await registry(db), [{ tenant_id: '1', schema_name: 'racedname0000000' }], 'one tenant on the schema');
  await t.rejects(registerTenant(b, 2, 'racedname0000000'), { code: 'E_TENANT_COLLISION', message: /belongs to tenant 1/ }, 'afterwards: a plain collision');
  t.same(await registerTenant(b, 1, 'racedname0000000'), { state: 'registered', tenantId: 1 }, 'the owner registering again is fine');
});

t.test('--check before migrate: run migrate first', async (t) => {
  const db = await freshDatabase(t, { migrated: false });
  const res = await runCli(['tenants', 'hash', '42', '--check'], { ...ENV, DATABASE_URL: db.url });
  t.equal(res.code, 1);
  t.match(res.stderr, /run "outbox-relay migrate" first/);
  t.equal(res.stdout, '');
});

/**
 * The `api` commands as a user runs them (node dist/cli.js): help, minting tokens, creating the
 * sidecar's role (idempotent), running the sidecar (JSON logs on stdout, graceful SIGTERM), refusing
 * a superuser or unregistered role in production, and configuration errors (exit 78).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { jwtVerify } from 'jose';
import pg from 'pg';
import t from 'tap';
import { scramSha256Verifier } from '../src/api/scram.js';
import { CLI, cleanEnv, runCli } from './helpers/cli.js';
import { adminUrl, freshDatabase, type TestContext, type TestDatabase } from './helpers/db.js';
import { LogLines, waitFor } from './helpers/api.js';

const SECRET = randomBytes(32).toString('hex');

function tempDir(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'outbox-api-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A unique role name, dropped (with its privileges in `db`) at teardown. */
function roleName(t: TestContext, db: TestDatabase): string {
  const name = `outbox_api_c_${randomBytes(5).toString('hex')}`;
  t.teardown(async () => {
    const c = new pg.Client({ connectionString: db.url });
    await c.connect().then(() => c.query(`DROP OWNED BY ${name}`)).catch(() => undefined);
    await c.end().catch(() => undefined);
    const a = new pg.Client({ connectionString: adminUrl() });
    await a.connect();
    await a.query(`DROP ROLE IF EXISTS ${name}`);
    await a.end();
  });
  return name;
}

function urlAs(db: TestDatabase, user: string, password: string): string {
  const u = new URL(db.url);
  u.username = user;
  u.password = password;
  return u.toString();
}

t.test('help', async (t) => {
  for (const args of [['api', '--help'], ['api', 'token', '--help'], ['api', 'create-role', '--help']]) {
    const res = await runCli(args);
    t.equal(res.code, 0, args.join(' '));
    t.match(res.stdout, /Usage: outbox-relay api/);
  }
  const bad = await runCli(['api', 'serve']);
  t.equal(bad.code, 2, 'unknown word');
  t.equal(bad.stderr.trim().split('\n').length, 1, 'one line');
});

t.test('api token', async (t) => {
  const noSecret = await runCli(['api', 'token', '--tenant', 't1', '--user', '5']);
  t.equal(noSecret.code, 78, 'no JWT_SECRET: configuration error');
  t.match(noSecret.stderr, /JWT_SECRET is missing/);

  const res = await runCli(['api', 'token', '--tenant', 'a4ayc80OGd', '--user', '101', '--ttl', '2h'], { JWT_SECRET: SECRET });
  t.equal(res.code, 0, res.stderr);
  const token = res.stdout.trim();
  const { payload, protectedHeader } = await jwtVerify(token, new TextEncoder().encode(SECRET), { algorithms: ['HS256'] });
  t.equal(protectedHeader.alg, 'HS256');
  t.equal(payload.tenant, 'a4ayc80OGd');
  t.equal(payload.sub, '101');
  t.ok(Math.abs((payload.exp as number) - (payload.iat as number) - 7200) <= 1, 'ttl 2h');

  const json = await runCli(['api', 'token', '--tenant', 't', '--user', '1', '--json'], { JWT_SECRET: SECRET });
  t.equal(json.code, 0);
  t.same(Object.keys(JSON.parse(json.stdout)), ['token', 'tenant', 'user', 'expiresAt']);

  for (const [args, what] of [
    [['--tenant', 't', '--user', 'abc'], 'non-integer user'],
    [['--tenant', 't', '--user', '1', '--ttl', '1y'], 'bad ttl'],
    [['--tenant', '', '--user', '1'], 'empty tenant'],
    [['--user', '1'], 'no tenant'],
  ] as const) {
    const bad = await runCli(['api', 'token', ...args], { JWT_SECRET: SECRET });
    t.equal(bad.code, 2, what);
    t.equal(bad.stderr.trim().split('\n').length, 1, `${what}: one line`);
  }

  const skew = await runCli(['api', 'token', '--tenant', 't', '--user', '1'], { JWT_SECRET: SECRET, API_JWT_CLOCK_SKEW_SECONDS: '1000' });
  t.equal(skew.code, 78, 'config error');
  t.match(skew.stderr, /API_JWT_CLOCK_SKEW_SECONDS/);
  const claim = await runCli(['api', 'token', '--tenant', 't', '--user', '1'], { JWT_SECRET: SECRET, API_JWT_USER_CLAIM: 'exp' });
  t.equal(claim.code, 78);
  const weak = await runCli(['api', 'token', '--tenant', 't', '--user', '1'], { JWT_SECRET: 'secret', NODE_ENV: 'production' });
  t.equal(weak.code, 78, 'a weak secret in production');
});

t.test('api create-role', async (t) => {
  const db = await freshDatabase(t);
  const name = roleName(t, db);
  const dir = tempDir(t);
  const pwFile = join(dir, 'pw');
  writeFileSync(pwFile, 'correct-horse-battery-staple\n', { mode: 0o600 });

  const first = await runCli(['api', 'create-role', '--name', name, '--password-file', pwFile], { DATABASE_URL: db.url });
  t.equal(first.code, 0, first.stderr);
  t.match(first.stdout, new RegExp(`role ${name} created; password set`));
  const again = await runCli(['api', 'create-role', '--name', name, '--json'], { DATABASE_URL: db.url });
  t.equal(again.code, 0, 'idempotent');
  t.same(JSON.parse(again.stdout), { role: name, database: db.name, created: false, passwordSet: false });

  const { rows } = await db.query(
    `SELECT r.rolsuper, r.rolbypassrls, r.rolcanlogin, r.rolcreaterole,
            EXISTS (SELECT 1 FROM public.outbox_api_roles WHERE role_name = r.rolname) AS registered,
            has_table_privilege(r.rolname, 'public.outbox_events', 'SELECT') AS read_events,
            has_table_privilege(r.rolname, 'public.outbox_events', 'UPDATE') AS write_events,
            has_table_privilege(r.rolname, 'public.event_acknowledgments', 'INSERT') AS write_acks,
            has_table_privilege(r.rolname, 'public.event_acknowledgments', 'DELETE') AS delete_acks,
            has_table_privilege(r.rolname, 'public.outbox_subscriptions', 'SELECT') AS read_subscriptions,
            has_table_privilege(r.rolname, 'public.outbox_subscription_secrets', 'SELECT') AS read_secrets
     FROM pg_roles AS r WHERE r.rolname = $1`,
    [name],
  );
  t.same(rows[0], {
    rolsuper: false, rolbypassrls: false, rolcanlogin: true, rolcreaterole: false, registered: true,
    read_events: true, write_events: false, write_acks: true, delete_acks: false, read_subscriptions: false, read_secrets: false,
  }, 'a confined login role with exactly what it needs');

  // The password was stored as a SCRAM verifier computed by us: it must equal PostgreSQL's own for
  // the same password, salt and iterations.
  const stored = (await db.query<{ p: string }>('SELECT rolpassword AS p FROM pg_authid WHERE rolname = $1', [name])).rows[0]!.p;
  const m = /^SCRAM-SHA-256\$(\d+):([^$]+)\$/.exec(stored);
  t.ok(m, 'stored as a SCRAM verifier');
  t.equal(scramSha256Verifier('correct-horse-battery-staple', Buffer.from(m![2]!, 'base64'), Number(m![1])), stored);
  const probe = roleName(t, db);
  await db.query(`SET password_encryption = 'scram-sha-256'; CREATE ROLE ${probe} PASSWORD 'pencil'`);
  const pgOwn = (await db.query<{ p: string }>('SELECT rolpassword AS p FROM pg_authid WHERE rolname = $1', [probe])).rows[0]!.p;
  const pm = /^SCRAM-SHA-256\$(\d+):([^$]+)\$/.exec(pgOwn)!;
  t.equal(scramSha256Verifier('pencil', Buffer.from(pm[2]!, 'base64'), Number(pm[1])), pgOwn, "identical to PostgreSQL's own verifier");

  const login = new pg.Client({ connectionString: urlAs(db, name, 'correct-horse-battery-staple') });
  await login.connect();
  t.equal((await login.query<{ u: string }>('SELECT current_user AS u')).rows[0]!.u, name, 'logs in');
  await login.end();

  for (const [args, what] of [
    [['--name', 'postgres'], 'the owner'],
    [['--name', 'Bad;Name'], 'a bad name'],
    [['--name', 'pg_monitor'], 'a reserved name'],
    [['--name', name, '--password-file', join(dir, 'missing')], 'a missing password file'],
  ] as const) {
    const res = await runCli(['api', 'create-role', ...args], { DATABASE_URL: db.url });
    t.equal(res.code, 2, what);
    t.equal(res.stderr.trim().split('\n').length, 1, `${what}: one line`);
  }
  // An application's role (here: one granted a tenant table) is not taken over.
  const app = roleName(t, db);
  await db.query(`CREATE SCHEMA app_data; CREATE TABLE app_data.orders (id integer PRIMARY KEY); CREATE ROLE ${app} LOGIN; GRANT SELECT, INSERT ON app_data.orders TO ${app}`);
  const taken = await runCli(['api', 'create-role', '--name', app], { DATABASE_URL: db.url });
  t.equal(taken.code, 2, 'an application role is refused');
  t.match(taken.stderr, new RegExp(`role "${app}" already holds table app_data\\.orders: it looks like an application role`));
  t.equal(await db.query('SELECT 1 FROM public.outbox_api_roles WHERE role_name = $1', [app]).then((r) => r.rowCount), 0, 'and not registered');
  // A writer with EXECUTE on outbox_write_event only (the README's setup), and a member of a group role.
  const writer = roleName(t, db);
  const member = roleName(t, db);
  await db.query(`CREATE ROLE ${writer} LOGIN; GRANT EXECUTE ON FUNCTION public.outbox_write_event(text, text, text, text, jsonb, text) TO ${writer};
                  CREATE ROLE ${member} LOGIN IN ROLE ${app}`);
  const w = await runCli(['api', 'create-role', '--name', writer], { DATABASE_URL: db.url });
  t.equal(w.code, 2, 'a writer role is refused');
  t.match(w.stderr, /already holds function outbox_write_event\(text,text,text,text,jsonb,text\)/);
  const mem = await runCli(['api', 'create-role', '--name', member], { DATABASE_URL: db.url });
  t.equal(mem.code, 2, 'a member of another role is refused');
  t.match(mem.stderr, new RegExp(`already holds membership in ${app}`));
  t.equal((await runCli(['api', 'create-role', '--name', name], { DATABASE_URL: db.url })).code, 0, 'a registered role re-runs as before');

  const empty = await freshDatabase(t, { migrated: false });
  const unmigrated = await runCli(['api', 'create-role', '--name', name], { DATABASE_URL: empty.url });
  t.equal(unmigrated.code, 1);
  t.match(unmigrated.stderr, /migrate/);
});

interface ApiProcess {
  logs: LogLines;
  stderr(): string;
  exited: Promise<number | null>;
  kill(signal: NodeJS.Signals): void;
}

function spawnApi(t: TestContext, env: Record<string, string>): ApiProcess {
  const child = spawn(process.execPath, [CLI, 'api'], { env: cleanEnv({ PORT: '0', API_HOST: '127.0.0.1', LOG_LEVEL: 'info', ...env }), stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = new LogLines();
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => logs.push(d.toString('utf8')));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  let running = true;
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => {
    running = false;
    resolve(code);
  }));
  t.teardown(async () => {
    if (running) {
      child.kill('SIGKILL');
      await exited;
    }
  });
  return { logs, stderr: () => stderr, exited, kill: (s) => child.kill(s) };
}

t.test('api: the sidecar process', async (t) => {
  const db = await freshDatabase(t);
  const name = roleName(t, db);
  const dir = tempDir(t);
  writeFileSync(join(dir, 'pw'), 'sidecar-password-1\n');
  t.equal((await runCli(['api', 'create-role', '--name', name, '--password-file', join(dir, 'pw')], { DATABASE_URL: db.url })).code, 0);
  await db.query("INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload) VALUES ('tp', 'vendors_insert', '1', 'vendors', '{}')");

  t.test('runs as its role, logs JSON to stdout, stops on SIGTERM', async (t) => {
    const api = spawnApi(t, { DATABASE_URL: urlAs(db, name, 'sidecar-password-1'), JWT_SECRET: SECRET, NODE_ENV: 'production' });
    await waitFor(() => api.logs.has('pull API listening'), 20_000, 'the sidecar to listen', () => api.stderr());
    const port = api.logs.lines.find((l) => l.msg === 'pull API listening')?.port as number;
    t.equal((await fetch(`http://127.0.0.1:${port}/healthz`)).status, 200);
    const token = (await runCli(['api', 'token', '--tenant', 'tp', '--user', '3'], { JWT_SECRET: SECRET })).stdout.trim();
    const res = await fetch(`http://127.0.0.1:${port}/api/outbox/events`, { headers: { authorization: `Bearer ${token}` } });
    t.equal(res.status, 200);
    t.equal(((await res.json()) as { events: unknown[] }).events.length, 1);
    await waitFor(() => api.logs.lines.some((l) => l.msg === 'request' && l.path === '/api/outbox/events'), 5_000, 'the request log line');
    t.notOk(JSON.stringify(api.logs.lines).includes(token.split('.')[2]!), 'the token is not logged');
    api.kill('SIGTERM');
    t.equal(await api.exited, 0, 'exit 0 after SIGTERM');
    t.ok(api.logs.has('stopped'));
    t.ok(api.logs.lines.every((l) => typeof l.level === 'number'), 'every stdout line is a JSON log line');
  });

  t.test('its login refused (the role changed under it): 503 naming why, and back to 200 once it is right again', async (t) => {
    const api = spawnApi(t, { DATABASE_URL: urlAs(db, name, 'sidecar-password-1'), JWT_SECRET: SECRET, NODE_ENV: 'production' });
    await waitFor(() => api.logs.has('pull API listening'), 20_000, 'the sidecar to listen', () => api.stderr());
    const port = api.logs.lines.find((l) => l.msg === 'pull API listening')?.port as number;
    const token = (await runCli(['api', 'token', '--tenant', 'tp', '--user', '3'], { JWT_SECRET: SECRET })).stdout.trim();
    const events = () => fetch(`http://127.0.0.1:${port}/api/outbox/events`, { headers: { authorization: `Bearer ${token}` } });
    t.equal((await events()).status, 200);
    // NOLOGIN: refused whatever the server's authentication method (trust, here).
    const setLogin = async (login: boolean) => {
      const { rows } = await db.query<{ ddl: string }>(`SELECT format('ALTER ROLE %I ${login ? 'LOGIN' : 'NOLOGIN'}', $1::text) AS ddl`, [name]);
      await db.query(rows[0]?.ddl as string);
    };
    await setLogin(false);
    await db.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1', [name]);
    // The pool notices its dead connections on their next use; healthz probes at most once a second.
    let health: Response | undefined;
    await waitFor(async () => (health = await fetch(`http://127.0.0.1:${port}/healthz`)).status === 503, 10_000, 'healthz to fail');
    t.match(await (health as Response).json(), { error: { message: "the database refused this service's login (its role or password)" } }, 'healthz says why, without the server\'s message');
    const refused = await events();
    t.equal(refused.status, 503, 'a request gets 503, not 500');
    t.equal(refused.headers.get('retry-after'), '1');
    await waitFor(() => api.logs.lines.some((l) => l.msg === 'health check failing'), 5_000, 'the failing health check logged');
    await setLogin(true);
    await waitFor(async () => (await fetch(`http://127.0.0.1:${port}/healthz`)).status === 200, 10_000, 'healthz to pass again');
    t.equal((await events()).status, 200, 'requests succeed again without a restart');
    t.notOk(JSON.stringify(api.logs.lines).includes('sidecar-password-1'), 'the password is never logged');
    api.kill('SIGTERM');
    t.equal(await api.exited, 0);
  });

  t.test('refuses a superuser in production (exit 78), warns elsewhere', async (t) => {
    const prod = spawnApi(t, { DATABASE_URL: db.url, JWT_SECRET: SECRET, NODE_ENV: 'production' });
    t.equal(await prod.exited, 78);
    t.match(prod.stderr(), /superuser.*row-level security/);
    t.equal(prod.stderr().trim().split('\n').length, 1, 'one line');

    const dev = spawnApi(t, { DATABASE_URL: db.url, JWT_SECRET: SECRET, NODE_ENV: 'development' });
    await waitFor(() => dev.logs.has('pull API listening'), 20_000, 'the sidecar to listen', () => dev.stderr());
    t.ok(dev.logs.lines.some((l) => /superuser/.test(String(l.msg)) && l.level === 40), 'a warning');
    dev.kill('SIGTERM');
    t.equal(await dev.exited, 0);
  });

  t.test('refuses a role that is not registered, in production', async (t) => {
    const plain = roleName(t, db);
    await db.query(`CREATE ROLE ${plain} LOGIN PASSWORD 'plain-pw'; GRANT SELECT ON public.outbox_relay_migrations, public.outbox_events TO ${plain}`);
    const api = spawnApi(t, { DATABASE_URL: urlAs(db, plain, 'plain-pw'), JWT_SECRET: SECRET, NODE_ENV: 'production' });
    t.equal(await api.exited, 78);
    t.match(api.stderr(), /not registered.*api create-role/);
  });

  t.test('a role without grants: the permission error says how to get them', async (t) => {
    const bare = roleName(t, db);
    await db.query(`CREATE ROLE ${bare} LOGIN PASSWORD 'bare-pw'`);
    const api = spawnApi(t, { DATABASE_URL: urlAs(db, bare, 'bare-pw'), JWT_SECRET: SECRET });
    t.not(await api.exited, 0);
    t.match(api.stderr(), /PostgreSQL error 42501: permission denied .*run this command as the database owner; the pull API sidecar runs as a role made by "outbox-relay api create-role"/);
  });

  t.test('a port that is taken: one line naming the address and the setting, not a database error', async (t) => {
    const holder = createServer();
    await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
    t.teardown(() => new Promise<void>((resolve) => holder.close(() => resolve())));
    const port = (holder.address() as AddressInfo).port;
    const api = spawnApi(t, { DATABASE_URL: db.url, JWT_SECRET: SECRET, PORT: String(port) });
    t.equal(await api.exited, 1);
    t.match(api.stderr(), new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} for the pull API: the address is already in use .*change PORT or API_HOST`));
    t.notMatch(api.stderr(), /PostgreSQL/);
    t.equal(api.stderr().trim().split('\n').filter((l) => l.startsWith('outbox-relay: error')).length, 1, 'one error line');
  });

  t.test('configuration errors exit 78', async (t) => {
    const noSecret = spawnApi(t, { DATABASE_URL: db.url });
    t.equal(await noSecret.exited, 78);
    t.match(noSecret.stderr(), /JWT_SECRET is missing/);
    const badLimit = spawnApi(t, { DATABASE_URL: db.url, JWT_SECRET: SECRET, API_RATE_LIMIT_PER_SECOND: 'lots' });
    t.equal(await badLimit.exited, 78);
    t.match(badLimit.stderr(), /API_RATE_LIMIT_PER_SECOND/);
    const badBody = spawnApi(t, { DATABASE_URL: db.url, JWT_SECRET: SECRET, API_BODY_LIMIT_BYTES: '10' });
    t.equal(await badBody.exited, 78);
  });
});

t.test('api drop-role undoes create-role: per database, all or nothing, and --drop only once no database holds the role', async (t) => {
  const a = await freshDatabase(t);
  const b = await freshDatabase(t);
  const name = roleName(t, a);
  const pwFile = join(tempDir(t), 'pw');
  writeFileSync(pwFile, 'drop-role-test-pw\n', { mode: 0o600 });
  for (const db of [a, b]) t.equal((await runCli(['api', 'create-role', '--name', name, '--password-file', pwFile], { DATABASE_URL: db.url })).code, 0, `created and registered in ${db.name}`);

  // A session connected as the role (a running sidecar): refused unless --force.
  const asRole = new URL(a.url);
  asRole.username = name;
  asRole.password = 'drop-role-test-pw';
  const sidecar = new pg.Client({ connectionString: asRole.toString() });
  await sidecar.connect();
  const busy = await runCli(['api', 'drop-role', '--name', name], { DATABASE_URL: a.url });
  t.equal(busy.code, 2, 'refused while a session is connected as the role');
  t.match(busy.stderr, new RegExp(`1 session\\(s\\) are connected as role "${name}" \\(database ${a.name}\\): stop the sidecars that use it first, or pass --force; nothing changed`));
  await sidecar.end();
  await waitFor(async () => (await a.query('SELECT 1 FROM pg_stat_activity WHERE usename = $1', [name])).rowCount === 0, 5_000, 'the session to end');
  const rights = async (db: TestDatabase) => (await db.query<{ registered: boolean; read_events: boolean; write_acks: boolean; connect: boolean | null; exists: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM public.outbox_api_roles WHERE role_name = $1) AS registered,
            EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS exists,
            CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) THEN has_table_privilege($1, 'public.outbox_events', 'SELECT') END AS read_events,
            CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) THEN has_table_privilege($1, 'public.event_acknowledgments', 'INSERT') END AS write_acks,
            CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) THEN EXISTS (
              SELECT 1 FROM pg_database AS d, aclexplode(d.datacl) AS x
              WHERE d.datname = current_database() AND x.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1)) END AS connect`, [name])).rows[0];

  // Still registered in b: dropping the role is refused, and nothing changes in a.
  const refused = await runCli(['api', 'drop-role', '--name', name, '--drop'], { DATABASE_URL: a.url });
  t.equal(refused.code, 1, `refused while b holds it: ${refused.stderr.trim()}`);
  t.match(refused.stderr, new RegExp(`role "${name}" cannot be dropped: it still holds rights elsewhere \\(.*${b.name}.*\\)\\. Run "outbox-relay api drop-role --name ${name}" against each other database first; nothing changed here`),
    'naming the other database and what to do');
  t.same(await rights(a), { registered: true, exists: true, read_events: true, write_acks: true, connect: true }, 'a is unchanged');

  const unregistered = await runCli(['api', 'drop-role', '--name', name, '--json'], { DATABASE_URL: b.url });
  t.equal(unregistered.code, 0, unregistered.stderr);
  t.same(JSON.parse(unregistered.stdout), { role: name, database: b.name, dropped: false }, 'b: unregistered, the role kept');
  t.same(await rights(b), { registered: false, exists: true, read_events: false, write_acks: false, connect: false }, 'b: every right create-role gave is revoked');
  const again = await runCli(['api', 'drop-role', '--name', name], { DATABASE_URL: b.url });
  t.equal(again.code, 2, 'a second time: not registered, exit 2');
  t.match(again.stderr, new RegExp(`role "${name}" is not a registered pull API role in database ${b.name}.*nothing changed`));

  const dropped = await runCli(['api', 'drop-role', '--name', name, '--drop'], { DATABASE_URL: a.url });
  t.equal(dropped.code, 0, dropped.stderr);
  t.match(dropped.stdout, new RegExp(`role ${name} unregistered and its rights revoked in database ${a.name}; role dropped`));
  t.same(await rights(a), { registered: false, exists: false, read_events: null, write_acks: null, connect: null }, 'a: unregistered, and the role is gone from the cluster');

  const bad = await runCli(['api', 'drop-role', '--name', 'Robert"; DROP TABLE x'], { DATABASE_URL: a.url });
  t.equal(bad.code, 2, 'a name outside the pattern: exit 2');
  t.match(bad.stderr, /is not allowed/);
});

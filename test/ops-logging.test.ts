/**
 * Logging: runs that try to make a secret appear in a log line or an error message, with stdout and
 * stderr of the daemon and of CLI commands captured in full. The secrets: a subscription's signing
 * secret (whsec_…), the database password (DATABASE_URL and DB_PASSWORD), OUTBOX_ENCRYPTION_KEYS,
 * JWT_SECRET and the other secret keys, and the webhook signatures themselves (a receiver echoes the
 * request headers back in a 500 body). Also: one warn line per failed attempt, with tenant,
 * subscription, event id, status, attempt and next attempt.
 */
import { randomBytes } from 'node:crypto';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { freePort } from '../src/db/embeddedPostgres.js';
import { runCli, type CliResult } from './helpers/cli.js';
import { adminUrl, freshDatabase } from './helpers/db.js';
import { answer, startReceiver } from './helpers/receiver.js';
import { count, createTenant, spawnRelay, tenantName, waitFor, writeAll, type RelayProcess } from './helpers/relay.js';

const b64 = (n: number) => randomBytes(n).toString('base64');

/** Secret values that must never be printed: each as a distinct, recognizable string. */
const JWT_SECRET = `jwt${randomBytes(32).toString('hex')}`;
const REFRESH_TOKEN_SECRET = `rts${randomBytes(32).toString('hex')}`;
const TENANT_HASH_SALT = `salt${randomBytes(16).toString('hex')}`;
const TENANT_ENTROPY_SOURCE = `ent${randomBytes(16).toString('hex')}`;
const KEY_NEW = b64(32);
const KEY_OLD = b64(32);
const OUTBOX_ENCRYPTION_KEYS = `klog2:${KEY_NEW},klog1:${KEY_OLD}`;

const SECRET_ENV = { JWT_SECRET, REFRESH_TOKEN_SECRET, TENANT_HASH_SALT, TENANT_ENTROPY_SOURCE, OUTBOX_ENCRYPTION_KEYS };

/** The database password of the test server's URL, or a made-up one (a trust server ignores it). */
function withPassword(url: string): { url: string; password: string } {
  const u = new URL(url);
  if (!u.password) u.password = `pgpw${randomBytes(12).toString('hex')}`;
  return { url: u.toString(), password: decodeURIComponent(u.password) };
}

/** Every place a secret must not appear, with what it was (never the secret itself in a message). */
function leaks(outputs: Record<string, string>, secrets: Record<string, string>): string[] {
  const found: string[] = [];
  for (const [where, text] of Object.entries(outputs)) {
    for (const [name, value] of Object.entries(secrets)) {
      if (value.length >= 8 && text.includes(value)) found.push(`${name} in ${where}`);
    }
  }
  return found;
}

/** Raw stdout of a relay process (in addition to the parsed log lines the helper keeps). */
function rawStdout(relay: RelayProcess): () => string {
  let out = '';
  relay.child.stdout?.on('data', (d: Buffer) => (out += d.toString('utf8')));
  return () => out;
}

function cliOutput(name: string, r: CliResult): Record<string, string> {
  return { [`${name} stdout`]: r.stdout, [`${name} stderr`]: r.stderr };
}

t.test('a daemon at debug level, a receiver echoing headers in its 500s: no secret or signature in any output; one warn line per failed attempt', async (t) => {
  const db = await freshDatabase(t);
  const { url: dbUrl, password: dbPassword } = withPassword(db.url);
  const T = tenantName('tlog');
  await createTenant(db, T);

  // The echoing receiver: the request headers (signature first, so it survives any truncation) in a 500.
  const echo = await startReceiver(t, {
    respond: (r, res) => answer(res, 500, `webhook-signature: ${r.signature}\n${JSON.stringify(r.headers)}`),
  });
  const good = await startReceiver(t);

  const env = { DATABASE_URL: dbUrl, ...SECRET_ENV, WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true', LOG_LEVEL: 'debug' };
  const outputs: Record<string, string> = {};
  const addEcho = await runCli(['subscriptions', 'add', '--tenant', T, '--user', '1', '--url', echo.url('/hook?token=querytoken123456'), '--json'], env);
  t.equal(addEcho.code, 0, `subscriptions add ${addEcho.stderr}`);
  const echoSub = JSON.parse(addEcho.stdout) as { id: number; secret: string };
  const addGood = await runCli(['subscriptions', 'add', '--tenant', T, '--user', '2', '--url', good.url('/ok'), '--json'], env);
  t.equal(addGood.code, 0);
  const goodSub = JSON.parse(addGood.stdout) as { id: number; secret: string };
  good.secrets.push(goodSub.secret);
  // stdout of `add` is the one place a secret is meant to be shown; its stderr is checked.
  outputs['add stderr'] = addEcho.stderr + addGood.stderr;

  const relay = spawnRelay(t, dbUrl, { ...env, RETRY_MAX_ATTEMPTS: '3', CIRCUIT_FAILURE_THRESHOLD: '100' });
  const stdout = rawStdout(relay);
  // Events get their attempt limit when captured, from the settings the relay writes as it starts.
  await relay.waitForLog('relay started', 30_000);
  const EVENTS = 3;
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, ${EVENTS}) g`]);
  await waitFor(async () => (await count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE state = 'dead'")) === EVENTS && good.delivered.size === EVENTS,
    30_000, 'every attempt to the echoing receiver to fail and the good ones to arrive', relay.diag);
  t.equal(echo.requests.length, EVENTS * 3, 'three attempts per event at the echoing receiver');

  // CLI commands that read the same configuration and the same rows.
  for (const args of [['status'], ['status', '--json'], ['subscriptions', 'list', '--json'], ['subscriptions', 'list'], ['validate-env'], ['cleanup']]) {
    const r = await runCli(args, env);
    Object.assign(outputs, cliOutput(args.join(' '), r));
  }

  relay.kill('SIGTERM');
  t.equal((await relay.exited).code, 0, 'the daemon stops cleanly');
  outputs['daemon stdout'] = stdout();
  outputs['daemon stderr'] = relay.stderr();
  // (After the daemon stopped: a replay would have it send the dead deliveries again.)
  Object.assign(outputs, cliOutput('replay', await runCli(['replay', '--subscription', String(echoSub.id), '--json'], env)));

  const signatures = echo.requests.flatMap((r) => r.signature.split(' ').map((s) => s.replace(/^v1,/, '')));
  t.equal(signatures.length, EVENTS * 3);
  const secrets: Record<string, string> = {
    ...SECRET_ENV,
    'OUTBOX_ENCRYPTION_KEYS (new key)': KEY_NEW,
    'OUTBOX_ENCRYPTION_KEYS (old key)': KEY_OLD,
    'database password': dbPassword,
    'signing secret': echoSub.secret,
    'signing secret (key part)': echoSub.secret.replace(/^whsec_/, ''),
    'signing secret of the good subscription': goodSub.secret,
    ...Object.fromEntries(signatures.map((s, i) => [`webhook signature ${i + 1}`, s])),
  };
  t.same(leaks(outputs, secrets), [], 'no secret, key, password or signature in any output');
  // `subscriptions list` shows the URL (that is its job); logs and errors never do.
  const logsOnly = Object.fromEntries(Object.entries(outputs).filter(([k]) => !k.startsWith('subscriptions list')));
  t.same(leaks(logsOnly, { 'subscription URL token': 'querytoken123456' }), [], 'the token in the subscription URL appears in no log line');
  t.ok(outputs['daemon stdout']?.includes('"level":20'), 'the daemon did log at debug (the check covered debug lines)');
  t.ok(outputs['daemon stdout']?.includes('HTTP 500'), 'and logged the receiver\'s answer (with the echoed secrets removed)');

  // One warn line per failed attempt.
  const failed = relay.logs.lines.filter((l) => l.level === 40 && typeof l.msg === 'string' && /^delivery failed/.test(l.msg));
  t.equal(failed.length, echo.requests.length, `one warn line per failed attempt (${failed.length} lines, ${echo.requests.length} failed attempts)`);
  const fromReceiver = echo.requests.map((r) => `${/^msg_(\d+)_/.exec(r.webhookId)?.[1]}#${r.attempt}`).sort();
  const fromLogs = failed.map((l) => `${String(l.eventId)}#${String(l.attempt)}`).sort();
  t.same(fromLogs, fromReceiver, 'the lines name the event ids and attempts the receiver saw');
  for (const l of failed) {
    const where = `event ${String(l.eventId)} attempt ${String(l.attempt)}`;
    t.equal(l.tenant, T, `${where}: tenant`);
    t.equal(l.subscription, echoSub.id, `${where}: subscription`);
    t.equal(l.status, 500, `${where}: status`);
    t.equal(l.maxAttempts, 3, `${where}: maxAttempts`);
    if (Number(l.attempt) < Number(l.maxAttempts)) {
      t.equal(l.msg, 'delivery failed; will retry', `${where}: will retry`);
      t.ok(typeof l.nextAttemptAt === 'string' && !Number.isNaN(Date.parse(l.nextAttemptAt)), `${where}: nextAttemptAt is a time (${String(l.nextAttemptAt)})`);
    } else {
      t.match(l.msg, /last time: it is dead/, `${where}: the last attempt says the delivery is dead`);
    }
  }
  const okLines = relay.logs.lines.filter((l) => l.level === 20 && l.msg === 'delivered');
  t.equal(okLines.length, EVENTS, 'a debug line per delivery');
  t.notOk(relay.logs.lines.some((l) => l.level === 40 && l.subscription === goodSub.id), 'no warn line for the good subscription');
});

t.test('failing database connections with a password: daemon and CLI errors never show it', async (t) => {
  const password = `dbpw${randomBytes(12).toString('hex')}`;
  const closedPort = await freePort();
  const base = new URL(adminUrl());
  const noDb = new URL(adminUrl());
  noDb.pathname = `/no_such_db_${randomBytes(4).toString('hex')}`;
  const realPassword = decodeURIComponent(noDb.password);
  noDb.password = password;
  const targets: Array<[string, Record<string, string>]> = [
    ['DATABASE_URL to a closed port', { DATABASE_URL: `postgres://outbox:${password}@127.0.0.1:${closedPort}/outbox` }],
    ['DATABASE_URL to a missing database', { DATABASE_URL: noDb.toString() }],
    ['DB_* parts with DB_PASSWORD to a closed port', { DB_HOST: '127.0.0.1', DB_PORT: String(closedPort), DB_NAME: 'outbox', DB_USER: 'outbox', DB_PASSWORD: password }],
  ];
  if (base.password) {
    // A server that checks passwords (the embedded one): a wrong one for a real user.
    const wrong = new URL(adminUrl());
    wrong.password = password;
    targets.push(['DATABASE_URL with a wrong password', { DATABASE_URL: wrong.toString() }]);
  }
  const secrets = { ...SECRET_ENV, 'database password': password, ...(realPassword ? { 'the server\'s real password': realPassword } : {}) };
  for (const [what, dbEnv] of targets) {
    const env = { ...dbEnv, ...SECRET_ENV, LOG_LEVEL: 'debug' };
    const outputs: Record<string, string> = {};
    for (const args of [['status'], ['migrate'], ['cleanup'], ['subscriptions', 'list'], ['validate-env']]) {
      const r = await runCli(args, env);
      Object.assign(outputs, cliOutput(args.join(' '), r));
      if (args[0] !== 'validate-env') t.not(r.code, 0, `${what}: ${args.join(' ')} fails (exit ${r.code}): ${r.stderr.trim().split('\n').pop()}`);
    }
    const relay = spawnRelay(t, 'postgres://unused', { ...env, ...(dbEnv.DATABASE_URL ? {} : { DATABASE_URL: '' }) });
    const stdout = rawStdout(relay);
    // The daemon waits for the database (or gives up on a missing one); either way it says why.
    const reported = /ECONNREFUSED|does not exist|password authentication failed|refused/;
    await waitFor(() => !relay.running || reported.test(stdout() + relay.stderr()), 30_000, `${what}: the daemon to report the database`, relay.diag);
    relay.kill('SIGTERM');
    await relay.exited;
    outputs['daemon stdout'] = stdout();
    outputs['daemon stderr'] = relay.stderr();
    const said = outputs['daemon stdout'] + outputs['daemon stderr'];
    t.ok(reported.test(said), `${what}: the daemon says what is wrong${reported.test(said) ? '' : `: ${said.slice(-1500)}`}`);
    t.same(leaks(outputs, secrets), [], `${what}: no password or secret in any output`);
  }
});

t.test('bad values for secret keys: exit 78 with a message that names the key, never the value', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'outbox-log-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const marker = `MARK${randomBytes(10).toString('hex')}`;
  const file = (name: string, text: string) => {
    const p = join(dir, name);
    writeFileSync(p, text);
    return p;
  };
  const secretFile = file('jwt', `${marker}-from-file\n`);
  const cases: Array<[string, Record<string, string>, string[], RegExp]> = [
    ['OUTBOX_ENCRYPTION_KEYS with a short key', { OUTBOX_ENCRYPTION_KEYS: `k1:${Buffer.from(marker).toString('base64')}` }, [], /OUTBOX_ENCRYPTION_KEYS.*32 bytes/],
    ['OUTBOX_ENCRYPTION_KEYS not base64', { OUTBOX_ENCRYPTION_KEYS: `k1:${marker}!!${b64(32)}` }, [], /OUTBOX_ENCRYPTION_KEYS/],
    ['OUTBOX_ENCRYPTION_KEYS without an id', { OUTBOX_ENCRYPTION_KEYS: `${marker}` }, [], /OUTBOX_ENCRYPTION_KEYS.*entry 1/],
    ['OUTBOX_ENCRYPTION_KEYS with a bad id', { OUTBOX_ENCRYPTION_KEYS: `${marker}_ID:${b64(32)}` }, [], /OUTBOX_ENCRYPTION_KEYS.*entry 1/],
    ['JWT_SECRET and JWT_SECRET_FILE both set', { JWT_SECRET: marker, JWT_SECRET_FILE: secretFile }, [], /JWT_SECRET and JWT_SECRET_FILE/],
    ['DATABASE_URL with a wrong scheme', { DATABASE_URL: `mysql://app:${marker}@db.example/app` }, [], /DATABASE_URL.*scheme/],
    ['DATABASE_URL that is not a URL', { DATABASE_URL: `postgres://app:${marker}@db.example:99999999/app` }, [], /DATABASE_URL.*not a valid URL/],
    ['DATABASE_URL without a scheme', { DATABASE_URL: `app:${marker}@db.example/app` }, [], /DATABASE_URL/],
    ['DB_PASSWORD beside a bad DB_PORT', { DB_PASSWORD: marker, DB_PORT: '54x' }, [], /DB_PORT/],
    ['a config file with a syntax error next to a secret', {}, ['--config', file('syntax.json', `{"secrets": {"jwtSecret": "${marker}" ,, }}`)], /not valid JSON/],
    ['a config file with an unquoted secret', {}, ['--config', file('unquoted.json', `{"secrets": {"jwtSecret": ${marker}}}`)], /not valid JSON/],
    ['a config file with a secret of the wrong type', {}, ['--config', file('type.json', `{"secrets": {"jwtSecret": ["${marker}"]}, "database": {"password": {"v": "${marker}"}}}`)], /jwtSecret.*String/],
    ['a config file with a misspelt secret key', {}, ['--config', file('unknown.json', `{"secrets": {"jwt_secret": "${marker}"}}`)], /unknown configuration key/],
  ];
  for (const [what, env, pre, expected] of cases) {
    const cmds = [['status'], ['run']];
    const results = await Promise.all(cmds.map((cmd) => runCli([...pre, ...cmd], { DATABASE_URL: 'postgres://127.0.0.1:1/none', ...env })));
    cmds.forEach((cmd, i) => {
      const r = results[i] as CliResult;
      t.equal(r.code, 78, `${what}: ${cmd.join(' ')} exits 78`);
      t.match(r.stderr, expected, `${what}: ${cmd.join(' ')} names the problem`);
      t.notOk(r.stdout.includes(marker) || r.stderr.includes(marker), `${what}: ${cmd.join(' ')} never prints the value${r.stderr.includes(marker) ? ` (${r.stderr.trim()})` : ''}`);
    });
  }
  // Malformed signing secrets given on the command line: refused without being echoed.
  const db = await freshDatabase(t);
  const badSecrets = [`whsec_${marker}!!`, `${marker}AAAAAAAAAAAAAAAAAAAAAAAA`, `whsec_${randomBytes(12).toString('base64')}`];
  for (const bad of badSecrets) {
    for (const cmd of [['subscriptions', 'add', '--tenant', 'tenant_x', '--user', '1', '--url', 'https://hooks.example.com/x', '--secret', bad], ['subscriptions', 'rotate-secret', '1', '--secret', bad]]) {
      const r = await runCli(cmd, { DATABASE_URL: db.url, OUTBOX_ENCRYPTION_KEYS });
      t.equal(r.code, 2, `${cmd.slice(0, 2).join(' ')} --secret <malformed> is refused (${r.stderr.trim().split('\n').pop()})`);
      t.match(r.stderr, /a signing secret must/, 'saying what a secret must look like');
      t.notOk((r.stdout + r.stderr).includes(marker) || (r.stdout + r.stderr).includes(bad.replace(/^whsec_/, '')), `${cmd.slice(0, 2).join(' ')}: the malformed secret is not echoed`);
    }
  }

  // validate-env in production: weak and missing secrets are reported by name only.
  const weak = await runCli(['validate-env'], { NODE_ENV: 'production', JWT_SECRET: `${marker}`, REFRESH_TOKEN_SECRET: 'changeme-changeme-changeme-changeme', TENANT_HASH_SALT: `${marker}${marker}` });
  t.equal(weak.code, 78, 'validate-env rejects weak secrets in production');
  t.match(weak.stderr + weak.stdout, /JWT_SECRET is too short/, 'naming them');
  t.match(weak.stderr + weak.stdout, /REFRESH_TOKEN_SECRET looks like a default/, 'each of them');
  t.notOk((weak.stdout + weak.stderr).includes(marker), 'without their values');
  t.notOk((weak.stdout + weak.stderr).includes('changeme-changeme'), 'not even a default-looking one');
});

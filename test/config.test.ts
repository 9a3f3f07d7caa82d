/**
 * loadConfig: sources and their precedence (defaults < JSON file < environment), secrets from files
 * and systemd credentials, strict parsing, cross-field checks, and error reporting (every problem at
 * once, never a secret's value). The environment is always passed explicitly; process.env is not touched.
 */
import { chmodSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { hostname } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { loadConfig, type Env, type LoadOptions } from '../src/config/load.js';
import { BOUNDS, schemaEntries } from '../src/config/schema.js';
import { connectionOptions } from '../src/db/connection.js';
import { ConfigError, EXIT } from '../src/errors.js';

/** Runs loadConfig expecting a ConfigError; returns it (or fails the test and returns a blank one). */
function configError(tt: Pick<Test, 'fail'>, options: LoadOptions): ConfigError {
  try {
    const config = loadConfig(options);
    tt.fail(`expected a ConfigError, got a config (env ${JSON.stringify(options.env)})`, { config });
  } catch (err) {
    if (err instanceof ConfigError) return err;
    tt.fail(`expected a ConfigError, got ${String(err)}`);
  }
  return new ConfigError([]);
}

/** Everything a user could see of an error. */
function visible(err: ConfigError): string {
  return [err.message, String(err), err.stack ?? '', ...err.problems].join('\n');
}

// Distinctive secret strings: if any of these shows up in an error, a secret leaked.
const SECRET_A = 'Leak-Canary-JWT-4f9c2e7b1d0a';
const SECRET_B = 'Leak-Canary-DBPW-8e1b5a3c9f27';
const SECRET_C = 'Leak-Canary-FILE-0d6a4c2e8b13';
const SECRET_D = 'Leak-Canary-SALT-77aa31cc95ee';

t.test('defaults', async (t) => {
  const c = loadConfig({ env: {} });
  t.equal(c.env, 'development');
  t.same(
    { ...c.database },
    {
      url: '',
      host: 'localhost',
      port: 5432,
      name: 'postgres',
      user: 'postgres',
      password: '',
      ssl: 'disable',
      poolMax: 10,
      connectTimeoutMs: 10_000,
      statementTimeoutMs: 30_000,
      applicationName: 'outbox-relay',
    },
  );
  t.same({ ...c.secrets }, { jwtSecret: '', refreshTokenSecret: '', tenantHashSalt: '', tenantEntropySource: '', encryptionKeys: '' });
  t.equal(c.relay.enabled, true);
  t.equal(c.relay.notifyMode, 'idle');
  t.equal(c.relay.workerId, `${hostname()}:${process.pid}`, 'worker id defaults to hostname:pid');
  t.equal(c.retry.maxAttempts, 20);
  t.equal(c.retry.baseMs, 10_000);
  t.equal(c.webhook.allowPrivateTargets, false);
  t.equal(c.metrics.port, 9464);
  t.equal(c.api.port, 3000);
  t.equal(c.retention.days, 30);
  t.equal(c.log.level, 'info');
});

t.test('values from the JSON file; the rest stay defaults', async (t) => {
  const dir = t.testdir({
    'relay.json': JSON.stringify({
      env: 'test',
      database: { host: 'db.internal', port: 6543, name: 'app' },
      relay: { notifyMode: 'off', enabled: false, workerId: 'relay-a' },
      retry: { maxAttempts: 7 },
      log: { level: 'debug' },
    }),
  });
  const c = loadConfig({ configFile: join(dir, 'relay.json'), env: {} });
  t.equal(c.env, 'test');
  t.equal(c.database.host, 'db.internal');
  t.equal(c.database.port, 6543);
  t.equal(c.database.name, 'app');
  t.equal(c.database.user, 'postgres', 'not in the file: default');
  t.equal(c.relay.notifyMode, 'off');
  t.equal(c.relay.enabled, false);
  t.equal(c.relay.workerId, 'relay-a');
  t.equal(c.retry.maxAttempts, 7);
  t.equal(c.retry.baseMs, 10_000, 'not in the file: default');
  t.equal(c.log.level, 'debug');
});

t.test('the environment beats the file', async (t) => {
  const dir = t.testdir({
    'relay.json': JSON.stringify({ database: { host: 'filehost', port: 6000 }, relay: { enabled: false, notifyMode: 'off' } }),
  });
  const c = loadConfig({
    configFile: join(dir, 'relay.json'),
    env: { DB_HOST: 'envhost', ENABLE_OUTBOX_PROCESSING: 'true', RELAY_NOTIFY_MODE: 'always' },
  });
  t.equal(c.database.host, 'envhost');
  t.equal(c.database.port, 6000, 'file value kept where the environment says nothing');
  t.equal(c.relay.enabled, true);
  t.equal(c.relay.notifyMode, 'always');
});

t.test('CONFIG_FILE names the file; an explicit configFile (--config) wins over it', async (t) => {
  const dir = t.testdir({
    'a.json': JSON.stringify({ database: { host: 'from-a' } }),
    'b.json': JSON.stringify({ database: { host: 'from-b' } }),
  });
  t.equal(loadConfig({ env: { CONFIG_FILE: join(dir, 'a.json') } }).database.host, 'from-a');
  t.equal(loadConfig({ configFile: join(dir, 'b.json'), env: { CONFIG_FILE: join(dir, 'a.json') } }).database.host, 'from-b');
});

t.test('DATABASE_URL overrides the DB_* parts', async (t) => {
  const parts: Env = { DB_HOST: 'parts-host', DB_PORT: '7777', DB_NAME: 'parts_db', DB_USER: 'parts_user', DB_PASSWORD: SECRET_B };
  const fromParts = connectionOptions(loadConfig({ env: parts }).database);
  t.match(fromParts, { host: 'parts-host', port: 7777, database: 'parts_db', user: 'parts_user', password: SECRET_B });
  t.notOk('connectionString' in fromParts);

  const url = 'postgres://url_user:url_pw@url-host:6543/url_db';
  const c = loadConfig({ env: { ...parts, DATABASE_URL: url } });
  t.equal(c.database.url, url);
  const fromUrl = connectionOptions(c.database);
  t.equal(fromUrl.connectionString, url, 'a URL with a password of its own is used as it is');
  for (const k of ['host', 'port', 'database', 'user', 'password'] as const) {
    t.equal(fromUrl[k], undefined, `${k} from DB_* is not passed beside the URL`);
  }
  t.equal(loadConfig({ env: { DATABASE_URL: 'postgresql://h/db' } }).database.url, 'postgresql://h/db', 'postgresql:// is accepted too');
});

t.test('DB_PASSWORD fills in a DATABASE_URL without a password (the URL in an env file, the password a credential)', async (t) => {
  // What node-postgres makes of the options: its own parser, as pg.Client uses it.
  const ConnectionParameters = createRequire(import.meta.url)('pg/lib/connection-parameters') as new (c: object) => { user: string; password: unknown; host: string; database: string };
  const read = (env: Env) => new ConnectionParameters(connectionOptions(loadConfig({ env }).database));
  const odd = 'p@ss:w/rd%41 ü#?&=';
  const filled = read({ DATABASE_URL: 'postgres://app@db.example:6543/app?sslmode=disable', DB_PASSWORD: odd });
  t.match(filled, { user: 'app', host: 'db.example', database: 'app' });
  t.equal(filled.password, odd, 'the password arrives exactly, whatever characters it holds');
  t.equal(read({ DATABASE_URL: 'postgres://app:own@db.example/app', DB_PASSWORD: odd }).password, 'own', "the URL's own password wins");
  t.equal(connectionOptions(loadConfig({ env: { DATABASE_URL: 'postgres://app@db.example/app' } }).database).connectionString,
    'postgres://app@db.example/app', 'no DB_PASSWORD: the URL unchanged');
  const socket = read({ DATABASE_URL: 'postgres:///app?host=/var/run/postgresql&user=app', DB_PASSWORD: odd });
  t.match(socket, { user: 'app', host: '/var/run/postgresql', database: 'app' }, 'a socket URL (no host in its authority) keeps its meaning');
  t.equal(socket.password, odd, 'and takes the password as a query parameter');
  t.equal(read({ DATABASE_URL: 'postgres://app@db.example/app?password=inquery', DB_PASSWORD: odd }).password, 'inquery', "a URL's ?password= wins too");
});

t.test('a secret from NAME_FILE; one trailing newline stripped', async (t) => {
  const dir = t.testdir({
    jwt: `${SECRET_A}\n`,
    crlf: `${SECRET_D}\r\n`,
    pw: SECRET_B,
    url: 'postgres://u@h:1/fromfile\n',
  });
  const c = loadConfig({
    env: {
      JWT_SECRET_FILE: join(dir, 'jwt'),
      TENANT_HASH_SALT_FILE: join(dir, 'crlf'),
      DB_PASSWORD_FILE: join(dir, 'pw'),
      DATABASE_URL_FILE: join(dir, 'url'),
    },
  });
  t.equal(c.secrets.jwtSecret, SECRET_A);
  t.equal(c.secrets.tenantHashSalt, SECRET_D);
  t.equal(c.database.password, SECRET_B);
  t.equal(c.database.url, 'postgres://u@h:1/fromfile');
  t.equal(c.secrets.refreshTokenSecret, '', 'secrets not given stay empty');

  const alsoEmpty = loadConfig({ env: { JWT_SECRET: '', JWT_SECRET_FILE: join(dir, 'jwt') } });
  t.equal(alsoEmpty.secrets.jwtSecret, SECRET_A, 'an empty NAME does not conflict with NAME_FILE');
});

t.test('NAME and NAME_FILE both set: refused, naming both, without the value', async (t) => {
  const dir = t.testdir({ jwt: SECRET_C });
  const err = configError(t, { env: { JWT_SECRET: SECRET_A, JWT_SECRET_FILE: join(dir, 'jwt') } });
  t.equal(err.exitCode, EXIT.config);
  t.equal(err.problems.length, 1);
  t.match(err.problems[0], /JWT_SECRET\b.*JWT_SECRET_FILE/);
  t.notMatch(visible(err), SECRET_A);
  t.notMatch(visible(err), SECRET_C);
});

t.test('an unreadable NAME_FILE is an error naming the variable', async (t) => {
  const dir = t.testdir({ adir: {} });
  const missing = join(dir, 'no-such-file');
  let err = configError(t, { env: { JWT_SECRET_FILE: missing } });
  t.equal(err.problems.length, 1);
  t.match(err.problems[0], 'JWT_SECRET_FILE');
  t.match(err.problems[0], missing);
  t.match(err.problems[0], 'ENOENT');

  err = configError(t, { env: { REFRESH_TOKEN_SECRET_FILE: join(dir, 'adir') } });
  t.match(err.problems[0], 'REFRESH_TOKEN_SECRET_FILE');
  t.match(err.problems[0], 'EISDIR');
});

t.test('systemd credentials from $CREDENTIALS_DIRECTORY/NAME', async (t) => {
  const dir = t.testdir({ creds: { JWT_SECRET: `${SECRET_A}\n`, TENANT_ENTROPY_SOURCE: SECRET_D } });
  const creds = join(dir, 'creds');
  const c = loadConfig({ env: { CREDENTIALS_DIRECTORY: creds } });
  t.equal(c.secrets.jwtSecret, SECRET_A);
  t.equal(c.secrets.tenantEntropySource, SECRET_D);
  t.equal(c.secrets.refreshTokenSecret, '', 'no credential of that name: unset, no error');

  const direct = loadConfig({ env: { CREDENTIALS_DIRECTORY: creds, JWT_SECRET: SECRET_B } });
  t.equal(direct.secrets.jwtSecret, SECRET_B, 'the variable itself beats the credential');

  // A credential that exists but cannot be read is reported, not silently treated as missing.
  mkdirSync(join(creds, 'TENANT_HASH_SALT'));
  const err = configError(t, { env: { CREDENTIALS_DIRECTORY: creds } });
  t.equal(err.problems.length, 1);
  t.match(err.problems[0], /TENANT_HASH_SALT.*EISDIR/);
  t.notMatch(visible(err), SECRET_A);
  t.notMatch(visible(err), SECRET_D);
});

t.test('booleans are strict', async (t) => {
  for (const word of ['0', 'false', 'FALSE', 'no', 'off', ' Off ']) {
    t.equal(loadConfig({ env: { ENABLE_OUTBOX_PROCESSING: word } }).relay.enabled, false, `${JSON.stringify(word)} is false`);
  }
  for (const word of ['1', 'true', 'True', 'yes', 'on']) {
    t.equal(loadConfig({ env: { ENABLE_OUTBOX_PROCESSING: word, WEBHOOK_ALLOW_PRIVATE_TARGETS: word } }).webhook.allowPrivateTargets, true, `${JSON.stringify(word)} is true`);
  }
  const err = configError(t, { env: { ENABLE_OUTBOX_PROCESSING: 'maybe' } });
  t.equal(err.problems.length, 1, 'reported once');
  t.match(err.problems[0], /ENABLE_OUTBOX_PROCESSING.*relay\.enabled.*maybe/);

});

t.test('the file gets the same strict reading of booleans and numbers as the environment', async (t) => {
  const dir = t.testdir({
    'words.json': JSON.stringify({ relay: { enabled: 'no' }, webhook: { allowHttp: 'on' }, database: { port: ' 6543 ' } }),
    'bad.json': JSON.stringify({ relay: { enabled: 'maybe' }, database: { port: '54x' } }),
    'typed.json': JSON.stringify({ relay: { enabled: 0 } }),
  });
  const c = loadConfig({ configFile: join(dir, 'words.json'), env: {} });
  t.equal(c.relay.enabled, false, '"no" is false (convict alone reads any string but "false" as true)');
  t.equal(c.webhook.allowHttp, true);
  t.equal(c.database.port, 6543);

  const err = configError(t, { configFile: join(dir, 'bad.json'), env: {} });
  t.equal(err.problems.length, 2, 'one problem each');
  t.match(err.problems.join('\n'), /relay\.enabled \(ENABLE_OUTBOX_PROCESSING\): expected true or false.*bad\.json.*maybe/);
  t.match(err.problems.join('\n'), /database\.port \(DB_PORT\): expected a whole number.*54x/, 'not silently read as 54');

  const typed = configError(t, { configFile: join(dir, 'typed.json'), env: {} });
  t.match(typed.problems[0], /relay\.enabled.*Boolean/, 'a number is not a boolean');
});

t.test('numbers are strict', async (t) => {
  t.equal(loadConfig({ env: { DB_PORT: '6432' } }).database.port, 6432);
  t.equal(loadConfig({ env: { RETRY_MAX_ATTEMPTS: ' 5 ' } }).retry.maxAttempts, 5, 'surrounding blanks are fine');
  for (const bad of ['54x', 'abc', '1e3', '-1', '5.5', '0x10', '']) {
    const err = configError(t, { env: { DB_PORT: bad } });
    t.equal(err.problems.length, 1, `DB_PORT=${JSON.stringify(bad)}: one problem`);
    t.match(err.problems[0], /DB_PORT.*database\.port.*whole number/);
  }
  const range = configError(t, { env: { DB_PORT: '70000' } });
  t.match(range.problems.join('\n'), /database\.port \(DB_PORT\).*65535/);
  const attempts = configError(t, { env: { RETRY_MAX_ATTEMPTS: '3x' } });
  t.match(attempts.problems[0], 'RETRY_MAX_ATTEMPTS');
});

t.test('enums: RELAY_NOTIFY_MODE, NODE_ENV, LOG_LEVEL, DB_SSL', async (t) => {
  const err = configError(t, { env: { RELAY_NOTIFY_MODE: 'loud', NODE_ENV: 'staging', LOG_LEVEL: 'verbose', DB_SSL: 'prefer' } });
  const all = err.problems.join('\n');
  t.equal(err.problems.length, 4);
  t.match(all, /RELAY_NOTIFY_MODE.*loud/);
  t.match(all, /NODE_ENV.*staging/);
  t.match(all, /LOG_LEVEL.*verbose/);
  t.match(all, /DB_SSL.*prefer/);
  t.equal(loadConfig({ env: { NODE_ENV: 'production', RELAY_NOTIFY_MODE: 'off' } }).env, 'production');
});

t.test('file problems: unknown key, malformed JSON, not an object, missing file', async (t) => {
  const dir = t.testdir({
    'unknown.json': JSON.stringify({ databse: { host: 'x' }, relay: { notifyMod: 'off' } }),
    'malformed.json': `{\n  "database": {"host": "db"},\n  "secrets": {"jwtSecret": "${SECRET_C}"},\n}\n`,
    'garbage.json': `${SECRET_C} is not json`,
    'array.json': '[{"database": {"host": "db"}}]',
    'null.json': 'null',
    // A secret typed without quotes: V8's own message would quote it ("…tSecret": Zr8Qw7-unq"…).
    'unquoted.json': '{"secrets": {"jwtSecret": Zr8Qw7-unquoted-secret}}',
  });
  let err = configError(t, { configFile: join(dir, 'unknown.json'), env: {} });
  t.equal(err.problems.length, 2);
  t.match(err.problems.join('\n'), /unknown configuration key "databse\.host"/);
  t.match(err.problems.join('\n'), /unknown configuration key "relay\.notifyMod"/);

  err = configError(t, { configFile: join(dir, 'malformed.json'), env: {} });
  t.equal(err.problems.length, 1);
  t.match(err.problems[0], /malformed\.json.*not valid JSON.*line 4/);
  t.notMatch(visible(err), SECRET_C, 'the parser message must not quote the file (it holds secrets)');

  err = configError(t, { configFile: join(dir, 'garbage.json'), env: {} });
  t.match(err.problems[0], /garbage\.json.*not valid JSON/);
  t.notMatch(visible(err), SECRET_C);
  t.notMatch(visible(err), 'Leak-Canary');

  err = configError(t, { configFile: join(dir, 'unquoted.json'), env: {} });
  t.match(err.problems[0], /unquoted\.json.*not valid JSON/);
  t.notMatch(visible(err), 'Zr8Qw7', 'an unquoted secret is not echoed');

  for (const name of ['array.json', 'null.json']) {
    err = configError(t, { configFile: join(dir, name), env: {} });
    t.match(err.problems[0], new RegExp(`${name.replace('.', '\\.')}: must contain a JSON object`));
  }

  const missing = join(dir, 'nope.json');
  err = configError(t, { configFile: missing, env: {} });
  t.match(err.problems[0], missing);
  t.match(err.problems[0], 'ENOENT');
});

t.test('DATABASE_URL must be a postgres URL', async (t) => {
  let err = configError(t, { env: { DATABASE_URL: `mysql://root:${SECRET_B}@db/app` } });
  t.match(err.problems[0], /DATABASE_URL.*postgres:\/\/.*mysql:/);
  t.notMatch(visible(err), SECRET_B);
  err = configError(t, { env: { DATABASE_URL: `host=db password=${SECRET_B}` } });
  t.match(err.problems[0], /DATABASE_URL.*not a valid URL/);
  t.notMatch(visible(err), SECRET_B);
});

t.test('cross-field checks', async (t) => {
  const err = configError(t, { env: { RELAY_LEASE_MS: '5000', WEBHOOK_TIMEOUT_MS: '10000', DB_POOL_MAX: '1', RETRY_BASE_MS: '100000', RETRY_MAX_MS: '1000' } });
  const all = err.problems.join('\n');
  t.equal(err.problems.length, 3);
  t.match(all, /RELAY_LEASE_MS.*WEBHOOK_TIMEOUT_MS/);
  t.match(all, /DB_POOL_MAX/);
  t.match(all, /RETRY_BASE_MS.*RETRY_MAX_MS/);
  t.ok(loadConfig({ env: { RELAY_LEASE_MS: '11000', WEBHOOK_TIMEOUT_MS: '10000' } }), 'a lease just long enough is fine');
});

t.test('every problem is reported at once', async (t) => {
  const dir = t.testdir({ 'c.json': JSON.stringify({ retention: { dayz: 3 } }) });
  const err = configError(t, {
    configFile: join(dir, 'c.json'),
    env: {
      ENABLE_OUTBOX_PROCESSING: 'maybe',
      DB_PORT: '54x',
      RELAY_NOTIFY_MODE: 'loud',
      NODE_ENV: 'staging',
      DATABASE_URL: 'mysql://db/app',
      JWT_SECRET_FILE: join(dir, 'missing-secret'),
      DB_POOL_MAX: '1',
    },
  });
  const all = err.problems.join('\n');
  for (const name of ['ENABLE_OUTBOX_PROCESSING', 'DB_PORT', 'RELAY_NOTIFY_MODE', 'NODE_ENV', 'DATABASE_URL', 'JWT_SECRET_FILE', 'DB_POOL_MAX', 'retention.dayz']) {
    t.match(all, name, `${name} is reported`);
  }
  t.equal(err.problems.length, 8, 'each once');
  t.equal(err.message, err.problems.join('; '), 'the message lists them all');

  // A config file that cannot be read does not hide problems of the environment.
  const both = configError(t, { configFile: join(dir, 'absent.json'), env: { DB_PORT: 'abc' } });
  t.equal(both.problems.length, 2);
  t.match(both.problems.join('\n'), /absent\.json[\s\S]*DB_PORT|DB_PORT[\s\S]*absent\.json/);
});

t.test('no secret value appears in any error message', async (t) => {
  const dir = t.testdir({
    jwt: SECRET_A,
    'typed.json': JSON.stringify({ secrets: { jwtSecret: 1234567890123 }, database: { password: [SECRET_B] } }),
    'unknown.json': JSON.stringify({ secrets: { jwtSecrett: SECRET_C }, database: { password: SECRET_B } }),
    'bad.json': `{"secrets": {"refreshTokenSecret": "${SECRET_C}"}, "database": {"password": "${SECRET_B}" "port": 1}}`,
  });
  const secretsEnv: Env = { JWT_SECRET: SECRET_A, REFRESH_TOKEN_SECRET: SECRET_C, TENANT_HASH_SALT: SECRET_D, DB_PASSWORD: SECRET_B };
  const cases: Array<[string, LoadOptions]> = [
    ['secrets beside other bad values', { env: { ...secretsEnv, DB_PORT: 'x', NODE_ENV: 'qa', ENABLE_OUTBOX_PROCESSING: 'nah', RELAY_LEASE_MS: '1' } }],
    ['NAME and NAME_FILE', { env: { JWT_SECRET: SECRET_C, JWT_SECRET_FILE: join(dir, 'jwt') } }],
    ['DATABASE_URL with a password and a bad scheme', { env: { DATABASE_URL: `redis://u:${SECRET_B}@h/0`, DB_PASSWORD: SECRET_D } }],
    ['DATABASE_URL that is not a URL', { env: { DATABASE_URL: `${SECRET_B}@@::` } }],
    ['secrets of the wrong type in the file', { configFile: join(dir, 'typed.json'), env: {} }],
    ['secrets beside unknown keys in the file', { configFile: join(dir, 'unknown.json'), env: { JWT_SECRET: SECRET_A } }],
    ['malformed file holding secrets', { configFile: join(dir, 'bad.json'), env: { JWT_SECRET: SECRET_A } }],
  ];
  for (const [name, options] of cases) {
    const err = configError(t, options);
    t.ok(err.problems.length > 0, `${name}: refused`);
    const text = visible(err);
    for (const secret of [SECRET_A, SECRET_B, SECRET_C, SECRET_D, '1234567890123']) {
      t.notMatch(text, secret, `${name}: ${secret} not shown`);
    }
    t.notMatch(text, 'Leak-Canary', `${name}: no part of a secret shown`);
  }
});

t.test('the returned config is deeply frozen', async (t) => {
  const c = loadConfig({ env: { JWT_SECRET: SECRET_A } });
  t.ok(Object.isFrozen(c));
  for (const section of Object.values(c)) if (typeof section === 'object') t.ok(Object.isFrozen(section));
  t.throws(() => {
    (c.database as { port: number }).port = 1;
  }, TypeError);
  t.throws(() => {
    (c as { env: string }).env = 'production';
  }, TypeError);
  t.equal(c.database.port, 5432);
  t.equal(c.env, 'development');
});

t.test('a secret file readable only by others is refused with its path (not as root)', { skip: process.getuid?.() === 0 ? 'root reads any file' : false }, async (t) => {
  const dir = t.testdir({ locked: SECRET_A });
  chmodSync(join(dir, 'locked'), 0o000);
  const err = configError(t, { env: { JWT_SECRET_FILE: join(dir, 'locked') } });
  t.match(err.problems[0], /JWT_SECRET_FILE.*EACCES/);
  t.notMatch(visible(err), SECRET_A);
});

t.test("a URL's sslmode means what libpq means (node-postgres reads it so, without its warning)", async (t) => {
  // node-postgres's own reading of the options a client gets (what pg.Client does with them).
  const ConnectionParameters = createRequire(import.meta.url)('pg/lib/connection-parameters') as new (c: object) => { ssl: unknown };
  const sslOf = (url: string): unknown => new ConnectionParameters(connectionOptions(loadConfig({ env: { DATABASE_URL: url } }).database)).ssl;
  const warnings: string[] = [];
  const onWarning = (w: Error): void => void warnings.push(w.message);
  process.on('warning', onWarning);
  t.teardown(() => void process.off('warning', onWarning));

  t.match(sslOf('postgres://u:p%40ss@db.example:5432/app?sslmode=require'), { rejectUnauthorized: false }, 'require: encrypted, certificate not checked (as DB_SSL=require)');
  t.match(sslOf('postgres://u@db.example/app?sslmode=prefer'), { rejectUnauthorized: false }, 'prefer: not verified either');
  t.equal(sslOf('postgres://u@db.example/app?sslmode=disable'), false, 'disable: no TLS');
  const full = sslOf('postgres://u@db.example/app?sslmode=verify-full') as Record<string, unknown>;
  t.ok(full && typeof full === 'object' && full.rejectUnauthorized !== false, 'verify-full: verified');
  t.equal(connectionOptions(loadConfig({ env: { DATABASE_URL: 'postgres://u:p%40ss@h/app?sslmode=require' } }).database).connectionString,
    'postgres://u:p%40ss@h/app?sslmode=require&uselibpqcompat=true', 'the URL is kept byte for byte, the option appended');
  t.equal(connectionOptions(loadConfig({ env: { DATABASE_URL: 'postgres://u@h/app' } }).database).connectionString, 'postgres://u@h/app', 'no sslmode: unchanged');
  t.equal(connectionOptions(loadConfig({ env: { DATABASE_URL: 'postgres://u@h/app?sslmode=require&uselibpqcompat=false' } }).database).connectionString,
    'postgres://u@h/app?sslmode=require&uselibpqcompat=false', 'an explicit choice is kept');
  await new Promise((r) => setImmediate(r));
  t.same(warnings.filter((m) => m.includes('SECURITY WARNING')), [], 'no SECURITY WARNING from node-postgres');
});

t.test('every numeric bound (BOUNDS) is enforced at load, and its edge is accepted', async (t) => {
  const envOf = new Map(schemaEntries().map((e) => [e.path, e.leaf.env as string]));
  for (const [path, { min, max }] of Object.entries(BOUNDS)) {
    const env = envOf.get(path)!;
    for (const [edge, outside] of [[min, min === undefined ? undefined : min - 1], [max, max === undefined ? undefined : max + 1]] as const) {
      if (edge === undefined || outside === undefined) continue;
      const err = configError(t, { env: { [env]: String(outside) } });
      t.match(err.message, new RegExp(`${path.replace('.', '\\.')} \\(${env}\\): must be`), `${env}=${outside} refused, naming the key`);
      t.doesNotThrow(() => loadConfig({ env: { [env]: String(edge) } }), `${env}=${edge} accepted`);
    }
  }
});

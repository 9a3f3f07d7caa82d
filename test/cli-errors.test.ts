/**
 * The CLI's error contract through the real executable: --help everywhere (exit 0), usage errors
 * (exit 2), configuration errors (exit 78), an unreachable database (exit 69), reset-db refused in
 * production; always one clear line on stderr and never a stack trace.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import t from 'tap';
import { CLI, cleanEnv, runCli, type CliResult } from './helpers/cli.js';
import { adminUrl, freshDatabase } from './helpers/db.js';

/** One non-empty line on stderr. */
function oneLine(res: CliResult): boolean {
  return res.stderr.trim() !== '' && !res.stderr.trimEnd().includes('\n');
}

function noStack(text: string): boolean {
  return !/^\s*at /m.test(text) && !/\n\s+at \S+ \(/.test(text);
}

const COMMANDS: string[][] = [
  [],
  ['migrate'],
  ['reset-db'],
  ['triggers'],
  ['triggers', 'install'],
  ['triggers', 'remove'],
  ['triggers', 'list'],
  ['tenants'],
  ['tenants', 'hash'],
  ['generate-secrets'],
  ['validate-env'],
];

t.test('--help works for every command and subcommand', async (t) => {
  // Even with a broken configuration: help needs none.
  const results = await Promise.all(COMMANDS.map((cmd) => runCli([...cmd, '--help'], { DB_PORT: 'abc', NODE_ENV: 'production' })));
  COMMANDS.forEach((cmd, i) => {
    const res = results[i]!;
    const name = ['outbox-relay', ...cmd].join(' ');
    t.equal(res.code, 0, `${name} --help exits 0 (${res.stderr})`);
    t.match(res.stdout, new RegExp(`^Usage: ${name.replace(/ /g, ' ')} `), `${name} --help prints its usage on stdout`);
    t.equal(res.stderr, '', `${name} --help: nothing on stderr`);
  });
  t.match(results[0]!.stdout, /migrate[\s\S]*triggers[\s\S]*generate-secrets[\s\S]*validate-env/, 'top-level help lists the commands');
  t.match(results[4]!.stdout, /--schema[\s\S]*--all-schemas/, 'triggers install --help shows its options');

  const [short, helpCmd, helpSub] = await Promise.all([runCli(['migrate', '-h']), runCli(['help']), runCli(['help', 'migrate'])]);
  t.equal(short.code, 0);
  t.match(short.stdout, /^Usage: outbox-relay migrate/);
  t.equal(helpCmd.code, 0, '`help` exits 0');
  t.equal(helpSub.code, 0, '`help migrate` exits 0');
  t.match(helpSub.stdout, /^Usage: outbox-relay migrate/);

  const version = await runCli(['--version']);
  t.equal(version.code, 0);
  t.match(version.stdout, /^\d+\.\d+\.\d+\n$/);
});

t.test('usage errors: exit 2, exactly one line on stderr, nothing on stdout', async (t) => {
  const cases: Array<[string[], RegExp]> = [
    [['frobnicate'], /unknown command 'frobnicate'/],
    [['--bogus'], /unknown option '--bogus'/],
    [['migrate', '--bogus'], /unknown option '--bogus'/],
    [['triggers', 'install', '--frob'], /unknown option '--frob'/],
    [['triggers', 'frob'], /unknown command 'frob'/],
    [['generate-secrets', '--wrte-file'], /unknown option '--wrte-file'.*Did you mean --write-file\?/],
    [['validate-env', 'extra'], /too many arguments/],
    [['tenants', 'hash'], /missing required argument 'id'/],
    [['--config'], /argument missing/],
    [['healthcheck', '--url', 'notaurl'], /--url must be an http:\/\/ URL/],
    [['healthcheck', '--url', 'ftp://127.0.0.1/healthz'], /--url must be an http:\/\/ URL/],
  ];
  const results = await Promise.all(cases.map(([args]) => runCli(args)));
  cases.forEach(([args, message], i) => {
    const res = results[i]!;
    const name = args.join(' ');
    t.equal(res.code, 2, `${name}: exit 2`);
    t.ok(oneLine(res), `${name}: one line on stderr: ${JSON.stringify(res.stderr)}`);
    t.match(res.stderr, /^outbox-relay: error: /, `${name}: says who complains`);
    t.match(res.stderr, message, `${name}: says what is wrong`);
    t.equal(res.stdout, '', `${name}: nothing on stdout`);
  });

  // A command group without its subcommand is a usage error too (help goes to stderr).
  for (const group of ['triggers', 'tenants']) {
    const res = await runCli([group]);
    t.equal(res.code, 2, `${group} alone: exit 2`);
    t.equal(res.stdout, '', `${group} alone: nothing on stdout`);
    t.match(res.stderr, new RegExp(`Usage: outbox-relay ${group}`));
  }
  const bare = await runCli([]);
  t.equal(bare.code, 2, 'no command at all: exit 2');
});

t.test('configuration errors: exit 78, one line, no stack trace', async (t) => {
  const dir = t.testdir({
    'bad.json': '{"database": {"host": "db",}}',
    'unknown.json': JSON.stringify({ databse: { host: 'db' } }),
    'secret.json': '{"secrets": {"jwtSecret": "Leak-Canary-3c9e1f"} "x": 1}',
  });
  const cases: Array<[string, string[], Record<string, string>, RegExp]> = [
    ['malformed --config', ['--config', join(dir, 'bad.json'), 'migrate'], {}, /bad\.json: not valid JSON.*line 1/],
    ['malformed CONFIG_FILE', ['migrate'], { CONFIG_FILE: join(dir, 'bad.json') }, /bad\.json: not valid JSON/],
    ['missing --config', ['-c', join(dir, 'nope.json'), 'migrate'], {}, /nope\.json: cannot read it \(ENOENT\)/],
    ['unknown key', ['--config', join(dir, 'unknown.json'), 'migrate'], {}, /unknown configuration key "databse\.host"/],
    ['malformed file with a secret', ['--config', join(dir, 'secret.json'), 'migrate'], {}, /secret\.json: not valid JSON/],
    ['DB_PORT=abc', ['migrate'], { DB_PORT: 'abc' }, /DB_PORT \(database\.port\): expected a whole number, got "abc"/],
    ['bad boolean', ['migrate'], { ENABLE_OUTBOX_PROCESSING: 'maybe' }, /ENABLE_OUTBOX_PROCESSING/],
    ['bad NODE_ENV', ['reset-db'], { NODE_ENV: 'staging' }, /NODE_ENV.*staging/],
    ['bad DATABASE_URL', ['migrate'], { DATABASE_URL: 'mysql://root:Leak-Canary-7a2b@db/app' }, /DATABASE_URL.*scheme/],
    ['unreadable secret file', ['triggers', 'list'], { JWT_SECRET_FILE: join(dir, 'no-such-secret') }, /JWT_SECRET_FILE: cannot read/],
  ];
  const results = await Promise.all(cases.map(([, args, env]) => runCli(args, env)));
  cases.forEach(([name, , , message], i) => {
    const res = results[i]!;
    t.equal(res.code, 78, `${name}: exit 78 (${res.stderr})`);
    t.ok(oneLine(res), `${name}: one line on stderr`);
    t.match(res.stderr, message, `${name}: names the problem`);
    t.ok(noStack(res.stderr), `${name}: no stack trace`);
    t.equal(res.stdout, '', `${name}: nothing on stdout`);
    t.notMatch(res.stderr, /Leak-Canary/, `${name}: no secret value`);
  });

  const several = await runCli(['migrate'], { DB_PORT: 'abc', RELAY_NOTIFY_MODE: 'loud', DATABASE_URL: 'http://x/y' });
  t.equal(several.code, 78);
  t.ok(oneLine(several), 'several problems, still one line');
  t.match(several.stderr, /DB_PORT.*RELAY_NOTIFY_MODE.*DATABASE_URL|DB_PORT.*DATABASE_URL.*RELAY_NOTIFY_MODE/, 'all of them on it');
});

function withSslMode(url: string, mode: string): string {
  const u = new URL(url);
  u.searchParams.set('sslmode', mode);
  return u.toString();
}

t.test('a URL whose sslmode cannot be honoured is a configuration error (exit 78)', async (t) => {
  const cases: Array<[string, RegExp]> = [
    ['allow', /sslmode=allow .* is not supported: use sslmode=disable or sslmode=require/],
    ['bogus', /sslmode=bogus is not one of disable, prefer, require, verify-ca, verify-full/],
    ['verify-ca', /sslmode=verify-ca needs sslrootcert=<CA file>/],
  ];
  for (const [mode, message] of cases) {
    const res = await runCli(['validate-env'], { DATABASE_URL: `postgres://u@db.example/app?sslmode=${mode}` });
    t.equal(res.code, 78, `sslmode=${mode}: exit 78`);
    t.match(res.stdout + res.stderr, message, `sslmode=${mode}: says why`);
  }
});

t.test('an unreachable database: exit 69, one clear line, no stack trace', async (t) => {
  const cases: Array<[string, string[], Record<string, string>, RegExp]> = [
    ['DATABASE_URL', ['migrate'], { DATABASE_URL: 'postgres://postgres@127.0.0.1:1/x' }, /cannot reach PostgreSQL.*ECONNREFUSED.*127\.0\.0\.1:1\/x/],
    ['DB_* parts', ['migrate'], { DB_HOST: '127.0.0.1', DB_PORT: '1', DB_NAME: 'nowhere' }, /cannot reach PostgreSQL.*127\.0\.0\.1:1\/nowhere/],
    ['password in the URL', ['triggers', 'list'], { DATABASE_URL: 'postgres://postgres:Leak-Canary-pw1@127.0.0.1:1/x' }, /cannot reach PostgreSQL/],
    // The test servers offer no TLS: the message says how to connect without it.
    ['TLS asked of a server without it', ['migrate'], { DATABASE_URL: withSslMode(adminUrl(), 'require') }, /does not support SSL.*offers no TLS: connect with sslmode=disable/],
  ];
  const results = await Promise.all(cases.map(([, args, env]) => runCli(args, env, { timeoutMs: 30_000 })));
  cases.forEach(([name, , , message], i) => {
    const res = results[i]!;
    t.equal(res.code, 69, `${name}: exit 69 (${res.stderr})`);
    t.ok(oneLine(res), `${name}: one line on stderr: ${JSON.stringify(res.stderr)}`);
    t.match(res.stderr, message, `${name}: clear message`);
    t.ok(noStack(res.stderr + res.stdout), `${name}: no "at " frames`);
    t.equal(res.stdout, '', `${name}: nothing on stdout`);
    t.notMatch(res.stderr, /Leak-Canary/, `${name}: the password is not shown`);
  });
});

t.test('reset-db is refused with NODE_ENV=production and leaves the database untouched', async (t) => {
  const db = await freshDatabase(t);
  await db.query('CREATE SCHEMA tenant_keep');
  await db.query('CREATE TABLE tenant_keep.items (id int PRIMARY KEY, name text)');
  const install = await runCli(['triggers', 'install', '--schema', 'tenant_keep'], { DATABASE_URL: db.url });
  t.equal(install.code, 0, install.stderr);
  await db.query("INSERT INTO tenant_keep.items VALUES (1, 'kept')");

  const snapshot = async (): Promise<unknown> => ({
    events: (await db.query('SELECT id, event_type, aggregate_id FROM public.outbox_events ORDER BY id')).rows,
    migrations: (await db.query('SELECT count(*)::int AS n FROM public.outbox_relay_migrations')).rows[0],
    triggers: (await db.query("SELECT tgname FROM pg_trigger WHERE tgrelid = 'tenant_keep.items'::regclass AND NOT tgisinternal ORDER BY 1")).rows,
  });
  const before = await snapshot();
  t.equal((before as { events: unknown[] }).events.length, 1, 'one captured event before');

  for (const args of [['reset-db'], ['reset-db', '--json']]) {
    const res = await runCli(args, { NODE_ENV: 'production', DATABASE_URL: db.url });
    t.not(res.code, 0, `${args.join(' ')}: refused`);
    t.ok(oneLine(res), `${args.join(' ')}: one line on stderr`);
    t.match(res.stderr, /refusing to reset the database with NODE_ENV=production/);
    t.equal(res.stdout, '');
  }
  t.same(await snapshot(), before, 'events, migrations and capture triggers untouched');

  // At a terminal (a pty from script(1)) outside production, a person must type the name back.
  const atTerminal = (typed: string): Promise<{ code: number | null; out: string }> =>
    new Promise((resolve, reject) => {
      const child = spawn('script', ['-qfec', `${JSON.stringify(process.execPath)} ${JSON.stringify(CLI)} reset-db`, '/dev/null'], {
        env: cleanEnv({ NODE_ENV: 'development', DATABASE_URL: db.url }),
        stdio: ['pipe', 'pipe', 'pipe'],
      });
      let out = '';
      const collect = (b: Buffer): void => {
        out += b.toString();
        if (/to go on: /.test(out) && !child.stdin.writableEnded) child.stdin.end(`${typed}\n`);
      };
      child.stdout.on('data', collect);
      child.stderr.on('data', collect);
      const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
      child.on('error', reject);
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ code, out });
      });
    });
  const wrong = await atTerminal('not-this-one');
  t.match(wrong.out, new RegExp(`Type the database name \\(${db.name}\\) to go on`), 'at a terminal it asks for the database name');
  t.equal(wrong.code, 2, 'a wrong name cancels (exit 2)');
  t.match(wrong.out, /reset-db cancelled: "not-this-one" is not/);
  t.same(await snapshot(), before, 'and changes nothing');

  // Control: outside production the same command does reset (so the snapshot above can tell).
  await runCli(['reset-db'], { NODE_ENV: 'development', DATABASE_URL: db.url });
  const after = (await snapshot()) as { events: unknown[]; triggers: unknown[] };
  t.same(after.events, [], 'reset-db outside production drops the events');
  t.same(after.triggers, [], 'and the capture triggers');
});

/**
 * `generate-secrets` and `validate-env` through the real executable (node dist/cli.js, clean env).
 */
import { readFileSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { runCli, type CliResult } from './helpers/cli.js';
import { SECRET_SPECS, weaknessOf } from '../src/config/secrets.js';
import { parseKeyring } from '../src/subscriptions/secretCipher.js';

const NAMES = ['JWT_SECRET', 'REFRESH_TOKEN_SECRET', 'TENANT_HASH_SALT', 'TENANT_ENTROPY_SOURCE', 'OUTBOX_ENCRYPTION_KEYS'];

/** NAME=value lines of an env text (comments and blank lines skipped). */
function assignments(text: string): Array<[string, string]> {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '' && !l.startsWith('#'))
    .map((l) => {
      const m = /^([A-Z_]+)=(.*)$/.exec(l);
      return m ? [m[1]!, m[2]!] : ['<not NAME=value>', l];
    });
}

function modeOf(path: string): number {
  return statSync(path).mode & 0o777;
}

function oneLine(res: CliResult): boolean {
  return res.stderr.trim() !== '' && !res.stderr.trimEnd().includes('\n');
}

async function freshSecrets(): Promise<Record<string, string>> {
  const res = await runCli(['generate-secrets', '--json']);
  if (res.code !== 0) throw new Error(`generate-secrets failed: ${res.stderr}`);
  return JSON.parse(res.stdout) as Record<string, string>;
}

t.test('generate-secrets prints five NAME=value lines of strong, fresh secrets', async (t) => {
  const [a, b] = await Promise.all([runCli(['generate-secrets']), runCli(['generate-secrets'])]);
  t.equal(a.code, 0, a.stderr);
  t.equal(a.stderr, '', 'nothing on stderr');
  const lines = assignments(a.stdout);
  t.same(
    lines.map(([name]) => name),
    NAMES,
  );
  for (const [name, value] of lines) {
    const spec = SECRET_SPECS.find((s) => s.env === name);
    if (spec) t.equal(weaknessOf(spec, value), undefined, `${name} is strong`);
    else t.equal(parseKeyring(value).keys.size, 1, `${name} is one well-formed 32-byte key`);
  }
  t.ok(a.stdout.split('\n').every((l) => l === '' || l.startsWith('#') || /^[A-Z_]+=\S+$/.test(l)), 'only comments besides the five lines');
  const other = new Map(assignments(b.stdout));
  for (const [name, value] of lines) t.not(other.get(name), value, `${name} differs between runs`);
  // Two keys made the same day get different ids: listed together (a rotation), both are accepted.
  const keyA = new Map(lines).get('OUTBOX_ENCRYPTION_KEYS') as string;
  const keyB = other.get('OUTBOX_ENCRYPTION_KEYS') as string;
  t.not(keyA.split(':')[0], keyB.split(':')[0], 'key ids differ, even on the same day');
  t.equal(parseKeyring(`${keyB},${keyA}`).ids.length, 2, 'so the new key can be listed before the old one');
});

t.test('generate-secrets --json is exactly one JSON object with the five names', async (t) => {
  const res = await runCli(['generate-secrets', '--json']);
  t.equal(res.code, 0, res.stderr);
  t.equal(res.stderr, '');
  const doc = JSON.parse(res.stdout) as Record<string, unknown>;
  t.same(Object.keys(doc), NAMES);
  for (const name of NAMES) t.type(doc[name], 'string');
  t.equal(new Set(Object.values(doc)).size, 5, 'five distinct values');
});

t.test('generate-secrets --write-file PATH: mode 0600, refuses to overwrite, --force overwrites', async (t) => {
  const dir = t.testdir({});
  const path = join(dir, 'secrets.env');

  const first = await runCli(['generate-secrets', '--write-file', path]);
  t.equal(first.code, 0, first.stderr);
  t.equal(modeOf(path), 0o600, 'created with mode 0600');
  const original = readFileSync(path, 'utf8');
  const written = assignments(original);
  t.same(
    written.map(([n]) => n),
    NAMES,
  );
  t.match(first.stdout, path, 'says where it wrote');
  for (const [name, value] of written) t.notMatch(first.stdout + first.stderr, value, `${name}'s value is not printed`);

  const second = await runCli(['generate-secrets', '--write-file', path]);
  t.not(second.code, 0, 'refused');
  t.ok(oneLine(second), `one line on stderr: ${JSON.stringify(second.stderr)}`);
  t.match(second.stderr, /already exists.*--force/);
  t.equal(second.stdout, '');
  t.equal(readFileSync(path, 'utf8'), original, 'file unchanged');
  t.equal(modeOf(path), 0o600);

  const forced = await runCli(['generate-secrets', '--write-file', path, '--force']);
  t.equal(forced.code, 0, forced.stderr);
  const replaced = readFileSync(path, 'utf8');
  t.not(replaced, original, 'overwritten');
  t.same(
    assignments(replaced).map(([n]) => n),
    NAMES,
  );
  t.equal(modeOf(path), 0o600, 'still mode 0600');

  // An existing file readable by others gets mode 0600 when overwritten with --force.
  const loose = join(dir, 'loose.env');
  writeFileSync(loose, 'OLD=1\n', { mode: 0o644 });
  const fixed = await runCli(['generate-secrets', '--force', '--write-file', loose]);
  t.equal(fixed.code, 0, fixed.stderr);
  t.equal(modeOf(loose), 0o600);
  t.notMatch(readFileSync(loose, 'utf8'), 'OLD=1');
});

t.test('generate-secrets --write-file with no path writes .env.production in the working directory', async (t) => {
  const dir = t.testdir({});
  const res = await runCli(['generate-secrets', '--write-file', '--force'], {}, { cwd: dir });
  t.equal(res.code, 0, res.stderr);
  const path = join(dir, '.env.production');
  t.ok(existsSync(path), '.env.production created');
  t.notOk(existsSync(join(dir, '--force')), '--force is an option, not the path');
  t.equal(modeOf(path), 0o600);
  t.same(
    assignments(readFileSync(path, 'utf8')).map(([n]) => n),
    NAMES,
  );

  const again = await runCli(['generate-secrets', '--write-file', '--json'], {}, { cwd: dir });
  t.not(again.code, 0, 'an existing .env.production is not overwritten without --force');
  t.equal(again.stdout, '');

  const json = await runCli(['generate-secrets', '--write-file', 'other.env', '--json'], {}, { cwd: dir });
  t.equal(json.code, 0, json.stderr);
  t.same(JSON.parse(json.stdout), { written: 'other.env', names: NAMES }, 'one JSON document, no values');
});

t.test('validate-env in production with nothing set: exit 78, all five missing at once', async (t) => {
  const res = await runCli(['validate-env'], { NODE_ENV: 'production' });
  t.equal(res.code, 78);
  for (const name of NAMES) t.match(res.stdout, new RegExp(`${name} is missing`));
  t.ok(oneLine(res), `one line on stderr: ${JSON.stringify(res.stderr)}`);
  t.match(res.stderr, /5 configuration problems/);
  t.notMatch(res.stderr, /^\s+at /m, 'no stack trace');
});

t.test('validate-env in production with weak secrets lists each, never its value', async (t) => {
  const weak = {
    JWT_SECRET: 'changeme-Canary1-changeme-changeme',
    REFRESH_TOKEN_SECRET: 'Canary2pwCanary2pwCanary2pwCanary2pwCanary2pw',
    TENANT_HASH_SALT: 'Canary3-short',
    TENANT_ENTROPY_SOURCE: 'unique_deployment_string_Canary4',
  };
  for (const json of [false, true]) {
    const res = await runCli(['validate-env', ...(json ? ['--json'] : [])], { NODE_ENV: 'production', ...weak });
    t.equal(res.code, 78, res.stderr);
    for (const name of NAMES) t.match(res.stdout, name, `${name} is listed (weak, or missing)`);
    for (const [name, value] of Object.entries(weak)) {
      t.notMatch(res.stdout + res.stderr, value, `${name}'s value is not printed`);
    }
    t.notMatch(res.stdout + res.stderr, /Canary/, 'no part of any value is printed');
    if (json) {
      const doc = JSON.parse(res.stdout) as { valid: boolean; env: string; problems: string[] };
      t.equal(doc.valid, false);
      t.equal(doc.env, 'production');
      t.equal(doc.problems.length, 5, 'four weak, and the encryption key missing');
    }
  }
});

t.test('validate-env in production with secrets from generate-secrets: exit 0', async (t) => {
  const secrets = await freshSecrets();
  const res = await runCli(['validate-env'], { NODE_ENV: 'production', ...secrets });
  t.equal(res.code, 0, res.stderr);
  t.match(res.stdout, /configuration is valid \(NODE_ENV=production\)/);
  t.equal(res.stderr, '');
  for (const value of Object.values(secrets)) t.notMatch(res.stdout, value);

  // The same secrets from files (NAME_FILE), as Docker secrets provide them.
  const dir = t.testdir(Object.fromEntries(Object.entries(secrets).map(([k, v]) => [k.toLowerCase(), `${v}\n`])));
  const fromFiles = await runCli(['validate-env'], {
    NODE_ENV: 'production',
    ...Object.fromEntries(NAMES.map((n) => [`${n}_FILE`, join(dir, n.toLowerCase())])),
  });
  t.equal(fromFiles.code, 0, fromFiles.stderr);

  // An env file written by generate-secrets --write-file, loaded the way a shell or systemd would.
  const envFile = join(dir, 'prod.env');
  t.equal((await runCli(['generate-secrets', '--write-file', envFile])).code, 0);
  const fromEnvFile = await runCli(['validate-env'], { NODE_ENV: 'production', ...Object.fromEntries(assignments(readFileSync(envFile, 'utf8'))) });
  t.equal(fromEnvFile.code, 0, fromEnvFile.stderr);

  const same = await runCli(['validate-env'], { NODE_ENV: 'production', ...secrets, REFRESH_TOKEN_SECRET: secrets.JWT_SECRET });
  t.equal(same.code, 78, 'JWT_SECRET == REFRESH_TOKEN_SECRET is refused');
  t.match(same.stdout, /must differ/);
});

t.test('validate-env in production refuses encryption keys that are not random bytes, and reports them with the other problems', async (t) => {
  const secrets = await freshSecrets();
  const typed = Buffer.from('Tr0ub4dor&3-xkcd!QuizJumpsWvnG7z').toString('base64'); // 32 printable bytes, 27 distinct
  for (const [what, key] of [['zeros', Buffer.alloc(32).toString('base64')], ['one repeated byte', Buffer.alloc(32, 0x61).toString('base64')], ['a typed phrase', typed]] as const) {
    const res = await runCli(['validate-env', '--json'], { NODE_ENV: 'production', ...secrets, OUTBOX_ENCRYPTION_KEYS: `k1:${key}` });
    t.equal(res.code, 78, `${what}: refused`);
    const doc = JSON.parse(res.stdout) as { valid: boolean; problems: string[] };
    t.same(doc.problems, [`OUTBOX_ENCRYPTION_KEYS: key "k1" does not look random (${what === 'a typed phrase' ? 'it is printable text, not random bytes' : 'too few distinct bytes for random data'}; \`outbox-relay generate-secrets\` makes one)`], `${what}: the one problem, naming the key id`);
    t.notMatch(res.stdout + res.stderr, key, `${what}: the key is not printed`);
  }
  // `run` refuses such a key too, before it connects anywhere.
  const run = await runCli(['run'], { NODE_ENV: 'production', ...secrets, OUTBOX_ENCRYPTION_KEYS: `k1:${Buffer.alloc(32).toString('base64')}`, DATABASE_URL: 'postgres://nobody@127.0.0.1:1/none' });
  t.equal(run.code, 78, run.stderr);
  t.match(run.stderr, /key "k1" does not look random/);
  // Only the first key encrypts: a weak older key (kept to decrypt until reencrypt has run) is a
  // warning, so a rotation away from it is not refused; a weak first key is refused.
  const good = secrets.OUTBOX_ENCRYPTION_KEYS as string;
  const zeros = Buffer.alloc(32).toString('base64');
  const rotating = await runCli(['validate-env'], { NODE_ENV: 'production', ...secrets, OUTBOX_ENCRYPTION_KEYS: `${good},old:${zeros}` });
  t.equal(rotating.code, 0, rotating.stderr);
  t.match(rotating.stderr, /the older key "old" does not look random; run `outbox-relay subscriptions reencrypt` and then remove it/);
  const weakFirst = await runCli(['validate-env', '--json'], { NODE_ENV: 'production', ...secrets, OUTBOX_ENCRYPTION_KEYS: `new:${zeros},${good}` });
  t.equal(weakFirst.code, 78);
  t.match((JSON.parse(weakFirst.stdout) as { problems: string[] }).problems, [/key "new" does not look random/]);
  // A malformed key no longer hides the weak secrets: every problem in one run.
  const mixed = await runCli(['validate-env', '--json'], { NODE_ENV: 'production', ...secrets, JWT_SECRET: 'changeme', REFRESH_TOKEN_SECRET: 'changeme', OUTBOX_ENCRYPTION_KEYS: 'k1:abc' });
  t.equal(mixed.code, 78);
  const problems = (JSON.parse(mixed.stdout) as { problems: string[] }).problems;
  t.ok(problems.some((p) => /OUTBOX_ENCRYPTION_KEYS.*32 bytes/.test(p)), 'the malformed key', { problems });
  t.ok(problems.some((p) => /^JWT_SECRET is too short/.test(p)), 'and the weak JWT_SECRET', { problems });
  t.ok(problems.some((p) => /^REFRESH_TOKEN_SECRET is too short/.test(p)), 'and the weak REFRESH_TOKEN_SECRET', { problems });
  t.ok(problems.some((p) => /must differ/.test(p)), 'and that the two are equal', { problems });
  // Outside production the key's shape is all that is checked (tests and demos use fixed keys).
  const dev = await runCli(['validate-env'], { NODE_ENV: 'development', OUTBOX_ENCRYPTION_KEYS: `k1:${Buffer.alloc(32).toString('base64')}` });
  t.equal(dev.code, 0, dev.stderr);
});

t.test('validate-env --json prints exactly one JSON document', async (t) => {
  const secrets = await freshSecrets();
  const ok = await runCli(['validate-env', '--json'], { NODE_ENV: 'production', ...secrets });
  t.equal(ok.code, 0, ok.stderr);
  t.same(JSON.parse(ok.stdout), { valid: true, env: 'production', problems: [] });

  const bad = await runCli(['validate-env', '--json'], { NODE_ENV: 'production' });
  t.equal(bad.code, 78);
  const doc = JSON.parse(bad.stdout) as { valid: boolean; problems: string[] };
  t.equal(doc.valid, false);
  t.equal(doc.problems.length, 5);
  t.ok(oneLine(bad), 'the error line goes to stderr, not into the JSON');

  const config = await runCli(['validate-env', '--json'], { NODE_ENV: 'production', DB_PORT: 'abc', ENABLE_OUTBOX_PROCESSING: 'maybe' });
  t.equal(config.code, 78);
  const cdoc = JSON.parse(config.stdout) as { valid: boolean; problems: string[] };
  t.equal(cdoc.valid, false);
  t.match(cdoc.problems.join('\n'), /DB_PORT[\s\S]*ENABLE_OUTBOX_PROCESSING/, 'configuration problems are listed too');
});

t.test('validate-env outside production: exit 0 with a warning on stderr', async (t) => {
  for (const env of ['development', 'test']) {
    const res = await runCli(['validate-env'], { NODE_ENV: env });
    t.equal(res.code, 0, res.stderr);
    t.match(res.stdout, new RegExp(`configuration is valid \\(NODE_ENV=${env}\\)`));
    t.match(res.stderr, /warning: not set \(required in production\): JWT_SECRET, REFRESH_TOKEN_SECRET, TENANT_HASH_SALT, TENANT_ENTROPY_SOURCE/);
    t.notMatch(res.stdout, /warning/, 'the warning is not mixed into the result');
  }
  const weak = await runCli(['validate-env'], { NODE_ENV: 'development', JWT_SECRET: 'changeme' });
  t.equal(weak.code, 0, 'weak secrets are allowed outside production');
  t.match(weak.stderr, /REFRESH_TOKEN_SECRET/);
  t.notMatch(weak.stderr, /JWT_SECRET,/, 'a secret that is set is not reported as missing');

  const json = await runCli(['validate-env', '--json'], { NODE_ENV: 'development' });
  t.equal(json.code, 0);
  t.same(JSON.parse(json.stdout), { valid: true, env: 'development', problems: [] });
  t.match(json.stderr, /warning/);
});

t.test('validate-env and every command warn about variables that look like ours but are not', async (t) => {
  const env = { RETRY_MAX_ATEMPTS: '3', WEBHOOK_ALLOW_PRIVATE_TARGET: 'true', RELAY_COMPLETELY_UNKNOWN_THING: '1', MY_APP_DB_HOST: 'x', DATABASE_URL: 'postgres://127.0.0.1:1/none' };
  const res = await runCli(['validate-env'], env);
  t.equal(res.code, 0, 'a warning, not an error');
  const lines = res.stderr.split('\n').filter((l) => / is not a setting of outbox-relay/.test(l));
  t.same(lines, [
    'outbox-relay: warning: RELAY_COMPLETELY_UNKNOWN_THING is not a setting of outbox-relay and is ignored',
    'outbox-relay: warning: RETRY_MAX_ATEMPTS is not a setting of outbox-relay and is ignored; did you mean RETRY_MAX_ATTEMPTS?',
    'outbox-relay: warning: WEBHOOK_ALLOW_PRIVATE_TARGET is not a setting of outbox-relay and is ignored; did you mean WEBHOOK_ALLOW_PRIVATE_TARGETS?',
  ], 'one line each, with the closest name when there is one; other software\'s variables are left alone');
  const status = await runCli(['status'], env);
  t.match(status.stderr, /RETRY_MAX_ATEMPTS is not a setting of outbox-relay and is ignored; did you mean RETRY_MAX_ATTEMPTS\?/, 'other commands warn too');
  const clean = await runCli(['validate-env'], {
    RETRY_MAX_ATTEMPTS: '3',
    JWT_SECRET_FILE: '/dev/null/x',
    OUTBOX_RELAY_DEBUG: '1',
    // An application's env file, and what Kubernetes injects for Services named outbox-relay and db.
    DB_SSLMODE: 'require',
    JWT_EXPIRES_IN: '1h',
    API_PORT: '8080',
    OUTBOX_RELAY_SERVICE_HOST: '10.0.0.1',
    OUTBOX_RELAY_PORT: 'tcp://10.0.0.1:9464',
    DB_PORT_5432_TCP_ADDR: '10.0.0.2',
  });
  t.notMatch(clean.stderr, /is not a setting/, 'known names, NAME_FILE variants, other software\'s names under shared prefixes and service links draw no warning');
  const shared = await runCli(['validate-env'], { DB_PASWORD: 'x' });
  t.match(shared.stderr, /DB_PASWORD is not a setting of outbox-relay and is ignored; did you mean DB_PASSWORD\?/, 'under a shared prefix, a near miss of one of ours is reported');
});

/**
 * Secret strength rules (weaknessOf, secretProblems) and generation (generateSecrets). Configs are
 * built by the real loadConfig from an explicit environment.
 */
import t from 'tap';
import { loadConfig, type Env } from '../src/config/load.js';
import { estimateBits, generateSecrets, SECRET_SPECS, secretProblems, weaknessOf, type SecretSpec } from '../src/config/secrets.js';

const NAMES = ['JWT_SECRET', 'REFRESH_TOKEN_SECRET', 'TENANT_HASH_SALT', 'TENANT_ENTROPY_SOURCE'];
const ALL_KEYS = SECRET_SPECS.map((s) => s.key);

function spec(env: string): SecretSpec {
  const s = SECRET_SPECS.find((x) => x.env === env);
  if (!s) throw new Error(`no spec ${env}`);
  return s;
}

/** Hand-made strong values (not from generateSecrets), long enough for every spec. */
const STRONG: Record<string, string> = {
  JWT_SECRET: 'xK9#mP2$vL5@nQ8&wR3!tY6*uI1^oE4%Gh7(Jd0)',
  REFRESH_TOKEN_SECRET: 'Zq8sV1bN4mXc7Lk2Jh5Gf9Dd3Ss6Aa0PpWt',
  TENANT_HASH_SALT: 'r7Tq2WvYz9Kp4Lm8Xn3BcH6jD1sF',
  TENANT_ENTROPY_SOURCE: 'eu-west-prod-7f3Q9zK2mV',
};

function strongEnv(extra: Env = {}): Env {
  return { ...STRONG, ...extra };
}

t.test('the four strength-checked secrets, in env-file order; the encryption key comes last', async (t) => {
  t.same(
    SECRET_SPECS.map((s) => s.env),
    NAMES,
  );
  t.same(
    generateSecrets().map((s) => s.env),
    [...NAMES, 'OUTBOX_ENCRYPTION_KEYS'],
  );
});

t.test('weaknessOf: missing and short', async (t) => {
  for (const s of SECRET_SPECS) {
    t.match(weaknessOf(s, ''), new RegExp(`^${s.env} is missing`));
    const short = STRONG[s.env]!.slice(0, s.minLength - 1);
    t.match(weaknessOf(s, short), new RegExp(`${s.env} is too short \\(${short.length} characters; at least ${s.minLength}\\)`));
    t.notMatch(weaknessOf(s, short) ?? '', short, 'the value is not in the message');
  }
  t.match(weaknessOf(spec('JWT_SECRET'), 'changeme'), /too short/);
});

t.test('weaknessOf: default-looking and example values', async (t) => {
  const examples = [
    // The seed's .env example values, verbatim.
    'cryptographically_secure_64_char_hex_string',
    'different_secure_64_char_hex_string',
    // Padded to pass the length rule of every spec, so the default-looking rule must catch them.
    'secure_base64_salt_for_tenant_hashing_xyz',
    'unique_deployment_string_for_this_cluster_x',
    'changeme-changeme-changeme-changeme',
    'CHANGEME_9f2K7q1Zr8Lm3Xw5Vb0Tn4Yp6Hs2Dg',
    'change_me_in_production_please_1234',
    'your-256-bit-secret-goes-here-ok!!xyz',
    '<placeholder-value-for-the-jwt-secret>',
    'replace-this-with-a-real-secret-value',
    'XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX',
    '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef',
  ];
  for (const value of examples) {
    for (const s of SECRET_SPECS) {
      const w = weaknessOf(s, value);
      if (value.length < s.minLength) {
        t.match(w, /too short/, `${s.env}: ${value} is too short`);
        continue;
      }
      t.match(w, new RegExp(`^${s.env} looks like a default or example value`), `${s.env}: ${value} refused as default-looking`);
      t.notMatch(w ?? '', value);
    }
  }
});

t.test('weaknessOf: low entropy, whatever the length', async (t) => {
  const lows = [
    'a'.repeat(64),
    'passwordpasswordpasswordpassword',
    'password'.repeat(8),
    'password'.repeat(20),
    'supersecretsupersecretsupersecret',
    'Password123!Password123!Password123!',
    'abcabcabcabcabcabcabcabcabcabcabcabc',
    'jwt_secret_jwt_secret_jwt_secret',
    'abababababababababababababababab',
  ];
  for (const value of lows) {
    for (const s of SECRET_SPECS) {
      const w = weaknessOf(s, value);
      t.ok(w, `${s.env}: ${value.slice(0, 24)}… (${value.length} chars) refused`);
      t.match(w, /too little entropy|looks like a default/);
      t.notMatch(w ?? '', value);
    }
  }
  t.ok(estimateBits('password'.repeat(20)) < 64, 'repeating a word does not add entropy');
  t.ok(estimateBits('password'.repeat(20)) <= estimateBits('password'.repeat(4)) + 8, 'length of a repeat barely counts');
  t.equal(estimateBits(''), 0);
});

t.test('weaknessOf: strong values pass', async (t) => {
  for (const s of SECRET_SPECS) {
    t.equal(weaknessOf(s, STRONG[s.env]!), undefined, `${s.env}: hand-made strong value`);
    t.equal(weaknessOf(s, s.generate()), undefined, `${s.env}: its own generator`);
  }
});

t.test('secretProblems in production', async (t) => {
  const none = loadConfig({ env: { NODE_ENV: 'production' } });
  const missing = secretProblems(none, ALL_KEYS);
  t.equal(missing.length, 4, 'all four missing, at once');
  for (const name of NAMES) t.match(missing.join('\n'), new RegExp(`${name} is missing \\(set it, or ${name}_FILE`));
  t.same(secretProblems(none, []), [], 'nothing required, nothing set: nothing to say');
  t.same(
    secretProblems(none, ['tenantHashSalt']).map((p) => p.split(' ')[0]),
    ['TENANT_HASH_SALT'],
    'only the required ones are missing',
  );

  t.same(secretProblems(loadConfig({ env: strongEnv({ NODE_ENV: 'production' }) }), ALL_KEYS), [], 'strong secrets pass');

  const weakEnv: Env = {
    NODE_ENV: 'production',
    JWT_SECRET: 'changeme-changeme-changeme-changeme',
    REFRESH_TOKEN_SECRET: 'passwordpasswordpasswordpasswordpassword',
    TENANT_HASH_SALT: 'short-salt-Qz',
    TENANT_ENTROPY_SOURCE: 'unique_deployment_string',
  };
  const weak = secretProblems(loadConfig({ env: weakEnv }), ALL_KEYS);
  t.equal(weak.length, 4, 'every weak secret is reported');
  t.match(weak[0], /^JWT_SECRET looks like a default/);
  t.match(weak[1], /^REFRESH_TOKEN_SECRET has too little entropy/);
  t.match(weak[2], /^TENANT_HASH_SALT is too short/);
  t.match(weak[3], /^TENANT_ENTROPY_SOURCE looks like a default/);
  for (const [name, value] of Object.entries(weakEnv)) {
    if (name !== 'NODE_ENV') t.notMatch(weak.join('\n'), value, `${name}'s value is not shown`);
  }

  const notRequiredButWeak = secretProblems(loadConfig({ env: { NODE_ENV: 'production', JWT_SECRET: 'a'.repeat(40) } }), []);
  t.equal(notRequiredButWeak.length, 1, 'a secret that is set is checked even when not required');
  t.match(notRequiredButWeak[0], /^JWT_SECRET/);
});

t.test('secretProblems outside production: only missing required ones', async (t) => {
  for (const env of ['development', 'test']) {
    const weak = loadConfig({
      env: { NODE_ENV: env, JWT_SECRET: 'changeme', REFRESH_TOKEN_SECRET: 'changeme', TENANT_HASH_SALT: 'aaaaaaaaaaaaaaaaaaaa', TENANT_ENTROPY_SOURCE: 'x' },
    });
    t.same(secretProblems(weak, ALL_KEYS), [], `${env}: weak and equal secrets are allowed`);
    const none = loadConfig({ env: { NODE_ENV: env } });
    t.equal(secretProblems(none, ALL_KEYS).length, 4, `${env}: missing required secrets are still reported`);
  }
});

t.test('JWT_SECRET == REFRESH_TOKEN_SECRET is refused in production', async (t) => {
  const same = generateSecrets()[0]!.value;
  const prod = secretProblems(loadConfig({ env: strongEnv({ NODE_ENV: 'production', JWT_SECRET: same, REFRESH_TOKEN_SECRET: same }) }), ALL_KEYS);
  t.same(prod, ['JWT_SECRET and REFRESH_TOKEN_SECRET must differ']);
  t.notMatch(prod.join('\n'), same);
  const dev = secretProblems(loadConfig({ env: strongEnv({ NODE_ENV: 'development', JWT_SECRET: same, REFRESH_TOKEN_SECRET: same }) }), ALL_KEYS);
  t.same(dev, [], 'allowed in development');
});

t.test('generateSecrets: always strong, always fresh', async (t) => {
  const seen = new Set<string>();
  const runs = 300;
  let weak = 0;
  const names = [...NAMES, 'OUTBOX_ENCRYPTION_KEYS'];
  for (let i = 0; i < runs; i++) {
    const out = generateSecrets();
    if (out.map((s) => s.env).join() !== names.join()) t.fail(`run ${i}: names ${out.map((s) => s.env).join()}`);
    for (const s of out) {
      // The encryption key is checked by its format (loadConfig below refuses a malformed one).
      const w = s.env === 'OUTBOX_ENCRYPTION_KEYS' ? undefined : weaknessOf(spec(s.env), s.value);
      if (w) {
        weak++;
        t.fail(`run ${i}: ${w}`);
      }
      if (/\s/.test(s.value) || s.value.includes('#')) t.fail(`run ${i}: ${s.env} is not a plain env-file value`);
      seen.add(s.value);
    }
    const config = loadConfig({ env: { NODE_ENV: 'production', ...Object.fromEntries(out.map((s) => [s.env, s.value])) } });
    const problems = secretProblems(config, [...ALL_KEYS, 'encryptionKeys']);
    if (problems.length) t.fail(`run ${i}: ${problems.join('; ')}`);
  }
  t.equal(weak, 0, `${runs * 4} generated secrets, none weak`);
  t.equal(seen.size, runs * 5, 'every value is distinct (within and across runs)');
  const one = generateSecrets();
  t.equal(new Set(one.map((s) => s.value)).size, 5);
  t.ok(one.filter((s) => s.env !== 'OUTBOX_ENCRYPTION_KEYS').every((s) => s.value.length >= spec(s.env).minLength));
});

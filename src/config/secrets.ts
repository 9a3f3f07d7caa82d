/**
 * Secret strength rules and secret generation (the seed's `generate-secrets` / `validate-env`).
 * Pure functions: they never print or log a secret's value.
 */
import { randomBytes } from 'node:crypto';
import { generateKeyEntry, parseKeyring, type Keyring } from '../subscriptions/secretCipher.js';
import type { Config } from './schema.js';

/** A secret this tool knows: where it lives in the config, its env name and its minimum strength. */
export interface SecretSpec {
  key: keyof Config['secrets'];
  env: string;
  /** Minimum length in characters. */
  minLength: number;
  /** Minimum estimated entropy in bits. */
  minBits: number;
  generate: () => string;
}

export const SECRET_SPECS: readonly SecretSpec[] = [
  { key: 'jwtSecret', env: 'JWT_SECRET', minLength: 32, minBits: 128, generate: () => randomBytes(32).toString('hex') },
  { key: 'refreshTokenSecret', env: 'REFRESH_TOKEN_SECRET', minLength: 32, minBits: 128, generate: () => randomBytes(32).toString('hex') },
  { key: 'tenantHashSalt', env: 'TENANT_HASH_SALT', minLength: 16, minBits: 96, generate: () => randomBytes(32).toString('base64') },
  { key: 'tenantEntropySource', env: 'TENANT_ENTROPY_SOURCE', minLength: 16, minBits: 64, generate: () => randomBytes(24).toString('base64url') },
];

/**
 * OUTBOX_ENCRYPTION_KEYS is structured (`id:base64key,…`), so it is checked by its format (loadConfig
 * refuses a malformed one) and, in production, by the bytes of its first (encrypting) key for signs
 * that they were not drawn at random (see {@link encryptionKeyProblems}), not by the length and
 * entropy rules of the secrets above.
 */
export const ENCRYPTION_KEYS_ENV = 'OUTBOX_ENCRYPTION_KEYS';

/** Every secret `validate-env` requires in production. */
export const ALL_SECRET_KEYS: readonly (keyof Config['secrets'])[] = [...SECRET_SPECS.map((s) => s.key), 'encryptionKeys'];

/** Words and shapes of values that were typed by a person or copied from an example. */
const DEFAULT_LOOKING = [
  /change[-_ ]?me/i,
  /changeit/i,
  /^(secret|password|passwd|default|example|sample|test|dev|admin|token|key|salt)\w{0,8}$/i,
  /your[-_ ]/i,
  /placeholder/i,
  /replace[-_ ]?(this|me)/i,
  /cryptographically_secure/i,
  /secure_(base64_salt|password)/i,
  /unique_deployment_string/i,
  /different_secure/i,
  /^x+$/i,
  /(.)\1{7,}/, // eight or more of the same character in a row
  /0123456789|123456|abcdef(?![0-9a-f]{20})|qwerty/i,
];

/**
 * A rough upper bound of the bits an attacker must guess: the Shannon entropy of the value's own
 * characters, counted only for characters that are not a repeat (4+ characters, LZ77-style) of
 * something earlier in the value; each repeat costs about log2(length) bits (where it points).
 * Without the repeat discount a word repeated to any length would pass ("password" x 8 scored 176
 * bits). Random hex of 64 chars scores ~240; "passwordpassword…" ~30 whatever its length.
 */
export function estimateBits(whole: string): number {
  // Quadratic below: look at no more than any real secret needs (a NAME_FILE pointing at a big file
  // must not hang validate-env).
  const value = whole.slice(0, 1024);
  if (value.length === 0) return 0;
  const counts = new Map<string, number>();
  for (const ch of value) counts.set(ch, (counts.get(ch) ?? 0) + 1);
  let perChar = 0;
  for (const n of counts.values()) {
    const p = n / value.length;
    perChar -= p * Math.log2(p);
  }
  let novel = 0;
  let repeats = 0;
  for (let i = 0; i < value.length; ) {
    // Longest run starting at i that already began earlier (overlap allowed, as in "aaaa…").
    let len = 0;
    while (i + len < value.length) {
      const at = value.indexOf(value.slice(i, i + len + 1));
      if (at === -1 || at >= i) break;
      len++;
    }
    if (len >= 4) {
      repeats++;
      i += len;
    } else {
      novel++;
      i++;
    }
  }
  return perChar * novel + repeats * Math.log2(value.length);
}

/** What is wrong with one secret's value, or undefined when it is strong enough. */
export function weaknessOf(spec: SecretSpec, value: string): string | undefined {
  if (value.length === 0) return `${spec.env} is missing`;
  if (value.length < spec.minLength) return `${spec.env} is too short (${value.length} characters; at least ${spec.minLength})`;
  if (DEFAULT_LOOKING.some((re) => re.test(value))) return `${spec.env} looks like a default or example value`;
  const bits = estimateBits(value);
  if (bits < spec.minBits) return `${spec.env} has too little entropy (about ${Math.floor(bits)} bits; at least ${spec.minBits})`;
  return undefined;
}

/**
 * Why 32 key bytes do not look random, or undefined. Random bytes have, with overwhelming
 * probability, 20 or more distinct values (about 30 on average) and at least one outside printable
 * ASCII (all 32 printable: about 1 in 10^14). A key made of zeros, one repeated byte, or a typed
 * passphrase fails one or the other.
 */
export function keyWeakness(key: Buffer): string | undefined {
  if (new Set(key).size < 20) return 'too few distinct bytes for random data';
  if (key.every((b) => b >= 0x20 && b < 0x7f)) return 'it is printable text, not random bytes';
  return undefined;
}

/** The keyring of a production config, or undefined (not production, not set, or malformed: loadConfig reports that). */
function productionKeyring(config: Config): Keyring | undefined {
  if (config.env !== 'production' || !config.secrets.encryptionKeys) return undefined;
  try {
    return parseKeyring(config.secrets.encryptionKeys);
  } catch {
    return undefined;
  }
}

/**
 * In production, the first (encrypting) key must look random. Older keys stay listed to decrypt what
 * they encrypted until `subscriptions reencrypt` has run, so a weak one there must not stop a
 * rotation away from it: it is a warning ({@link keyringWarnings}).
 */
export function encryptionKeyProblems(config: Config): string[] {
  const keyring = productionKeyring(config);
  const first = keyring?.ids[0];
  const key = first === undefined ? undefined : keyring?.keys.get(first);
  const weak = key && keyWeakness(key);
  return weak ? [`${ENCRYPTION_KEYS_ENV}: key "${first}" does not look random (${weak}; \`outbox-relay generate-secrets\` makes one)`] : [];
}

/** Older (decrypt-only) keys that do not look random: worth re-encrypting away from, not refusing. */
export function keyringWarnings(config: Config): string[] {
  const keyring = productionKeyring(config);
  if (!keyring) return [];
  return keyring.ids.slice(1).filter((id) => {
    const key = keyring.keys.get(id);
    return key !== undefined && keyWeakness(key) !== undefined;
  }).map((id) => `${ENCRYPTION_KEYS_ENV}: the older key "${id}" does not look random; run \`outbox-relay subscriptions reencrypt\` and then remove it`);
}

/**
 * Checks secrets. `required` lists the ones the caller needs (missing = problem); any secret that is
 * set is checked for strength in production, needed or not. Returns every problem at once.
 */
export function secretProblems(config: Config, required: readonly (keyof Config['secrets'])[]): string[] {
  const problems: string[] = [];
  for (const spec of SECRET_SPECS) {
    const value = config.secrets[spec.key];
    if (!value) {
      if (required.includes(spec.key)) problems.push(`${spec.env} is missing (set it, or ${spec.env}_FILE; \`outbox-relay generate-secrets\` makes one)`);
      continue;
    }
    if (config.env === 'production') {
      const weak = weaknessOf(spec, value);
      if (weak) problems.push(weak);
    }
  }
  if (!config.secrets.encryptionKeys && required.includes('encryptionKeys')) {
    problems.push(`${ENCRYPTION_KEYS_ENV} is missing (set it, or ${ENCRYPTION_KEYS_ENV}_FILE; \`outbox-relay generate-secrets\` makes one)`);
  }
  problems.push(...encryptionKeyProblems(config));
  if (config.env === 'production' && config.secrets.jwtSecret && config.secrets.jwtSecret === config.secrets.refreshTokenSecret) {
    problems.push('JWT_SECRET and REFRESH_TOKEN_SECRET must differ');
  }
  return problems;
}

/** Fresh values for every secret, in env-file order; each passes {@link weaknessOf}. */
export function generateSecrets(): Array<{ env: string; value: string }> {
  const strong = SECRET_SPECS.map((spec) => {
    // Random output can, very rarely, contain a pattern the checks refuse (e.g. "123456"): draw again.
    let value = spec.generate();
    while (weaknessOf(spec, value)) value = spec.generate();
    return { env: spec.env, value };
  });
  return [...strong, { env: ENCRYPTION_KEYS_ENV, value: generateKeyEntry() }];
}

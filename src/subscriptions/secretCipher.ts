/**
 * How signing secrets are stored. Without encryption keys they are kept as given (`whsec_…`); with
 * OUTBOX_ENCRYPTION_KEYS they are encrypted with AES-256-GCM (`enc:v1:<key id>:<iv>:<ciphertext+tag>`)
 * so that a database dump does not leak them. The first key encrypts; every listed key decrypts, so
 * rotating is: put a new key first, keep the old one listed, run `subscriptions reencrypt`, then drop
 * the old one. Decryption accepts plain secrets too, so encryption can be turned on for a running
 * system.
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { ConfigError } from '../errors.js';

export interface SecretCipher {
  /** Whether new secrets are stored encrypted. */
  readonly encrypts: boolean;
  encrypt(secret: string): string;
  decrypt(stored: string): string;
}

export const ENCRYPTION_KEYS_ENV = 'OUTBOX_ENCRYPTION_KEYS';
const PREFIX = 'enc:v1:';
/** Binds ciphertexts to their purpose: one cannot be moved into another field that uses the same key. */
const AAD = Buffer.from('outbox-relay:subscription-secret:v1');
const KEY_ID = /^[a-z0-9]{1,32}$/;

export interface Keyring {
  /** Key ids in order; the first encrypts. */
  ids: string[];
  keys: Map<string, Buffer>;
}

/** Parses "k2:<base64 of 32 bytes>,k1:<…>"; throws a ConfigError (never echoing a key) when malformed. */
export function parseKeyring(spec: string): Keyring {
  const ids: string[] = [];
  const keys = new Map<string, Buffer>();
  const entries = spec.split(',').map((e) => e.trim()).filter(Boolean);
  if (entries.length === 0) throw new ConfigError(`${ENCRYPTION_KEYS_ENV} is empty`);
  for (const [i, entry] of entries.entries()) {
    const colon = entry.indexOf(':');
    const id = colon > 0 ? entry.slice(0, colon) : '';
    const material = colon > 0 ? entry.slice(colon + 1) : '';
    if (!KEY_ID.test(id)) throw new ConfigError(`${ENCRYPTION_KEYS_ENV}: entry ${i + 1} must look like <id>:<base64 key>, with an id of 1 to 32 lower-case letters or digits`);
    if (keys.has(id)) throw new ConfigError(`${ENCRYPTION_KEYS_ENV}: key id "${id}" appears twice`);
    const key = Buffer.from(material, 'base64');
    if (key.length !== 32 || !/^[A-Za-z0-9+/]+={0,2}$/.test(material)) {
      throw new ConfigError(`${ENCRYPTION_KEYS_ENV}: key "${id}" must be 32 bytes in base64 (outbox-relay generate-secrets makes one)`);
    }
    ids.push(id);
    keys.set(id, key);
  }
  return { ids, keys };
}

/**
 * A fresh keyring entry: `k<YYYYMMDD><6 random hex digits>:<base64 of 32 random bytes>`. The random
 * part keeps two keys made the same day (an emergency rotation) from sharing an id, which the
 * keyring refuses.
 */
export function generateKeyEntry(now = new Date()): string {
  const day = now.toISOString().slice(0, 10).replace(/-/g, '');
  return `k${day}${randomBytes(3).toString('hex')}:${randomBytes(32).toString('base64')}`;
}

function decryptWith(keyring: Keyring | undefined, stored: string): string {
  if (!stored.startsWith('enc:')) return stored;
  if (!keyring) throw new Error(`a signing secret is encrypted, but ${ENCRYPTION_KEYS_ENV} is not set`);
  const parts = stored.slice(PREFIX.length).split(':');
  const [id, ivB64, dataB64] = parts;
  if (!stored.startsWith(PREFIX) || parts.length !== 3 || !id || !ivB64 || !dataB64) throw new Error('a stored signing secret is malformed');
  const key = keyring.keys.get(id);
  if (!key) throw new Error(`a signing secret is encrypted with key "${id}", which ${ENCRYPTION_KEYS_ENV} does not list`);
  const data = Buffer.from(dataB64, 'base64');
  const decipher = createDecipheriv('aes-256-gcm', key, Buffer.from(ivB64, 'base64'));
  decipher.setAAD(AAD);
  decipher.setAuthTag(data.subarray(data.length - 16));
  try {
    return Buffer.concat([decipher.update(data.subarray(0, data.length - 16)), decipher.final()]).toString('utf8');
  } catch {
    throw new Error(`a signing secret does not decrypt with key "${id}" (wrong key, or tampered)`);
  }
}

/** A cipher for the configured keys (`spec` empty: plain storage). */
export function createSecretCipher(spec: string): SecretCipher {
  if (!spec) return plainCipher;
  const keyring = parseKeyring(spec);
  const current = keyring.ids[0] as string;
  const key = keyring.keys.get(current) as Buffer;
  return {
    encrypts: true,
    encrypt(secret) {
      const iv = randomBytes(12);
      const cipher = createCipheriv('aes-256-gcm', key, iv);
      cipher.setAAD(AAD);
      const data = Buffer.concat([cipher.update(secret, 'utf8'), cipher.final(), cipher.getAuthTag()]);
      return `${PREFIX}${current}:${iv.toString('base64')}:${data.toString('base64')}`;
    },
    decrypt: (stored) => decryptWith(keyring, stored),
  };
}

export const plainCipher: SecretCipher = {
  encrypts: false,
  encrypt: (secret) => secret,
  decrypt: (stored) => decryptWith(undefined, stored),
};

/** The key id a stored secret was encrypted with, or undefined when it is stored plain. */
export function storedKeyId(stored: string): string | undefined {
  return stored.startsWith(PREFIX) ? stored.slice(PREFIX.length).split(':')[0] : undefined;
}

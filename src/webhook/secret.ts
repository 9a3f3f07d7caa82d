/**
 * Signing secrets in the Standard Webhooks form: `whsec_` followed by the base64 of the key bytes.
 */
import { randomBytes } from 'node:crypto';
import { UsageError } from '../errors.js';

export const SECRET_PREFIX = 'whsec_';

/** A fresh 32-byte secret, as shown to users. */
export function generateSigningSecret(): string {
  return SECRET_PREFIX + randomBytes(32).toString('base64');
}

/** The key bytes of a `whsec_…` secret; throws a UsageError (without echoing it) when malformed. */
export function secretKey(secret: string): Buffer {
  if (!secret.startsWith(SECRET_PREFIX)) throw new UsageError('a signing secret must start with "whsec_" followed by base64');
  const b64 = secret.slice(SECRET_PREFIX.length);
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64) || b64.length % 4 !== 0) throw new UsageError('a signing secret must be "whsec_" followed by valid base64');
  const key = Buffer.from(b64, 'base64');
  if (key.length < 24 || key.length > 64) throw new UsageError(`a signing secret must hold 24 to 64 bytes of key (this one has ${key.length})`);
  return key;
}

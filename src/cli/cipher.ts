/**
 * The cipher for subscription signing secrets: AES-256-GCM with OUTBOX_ENCRYPTION_KEYS, required in
 * production; outside production secrets are stored plain, with one warning per process.
 */
import { encryptionKeyProblems, keyringWarnings } from '../config/secrets.js';
import { ConfigError } from '../errors.js';
import { createSecretCipher, plainCipher, type SecretCipher } from '../subscriptions/secretCipher.js';
import type { CommandContext } from './context.js';

let warned = false;

export function secretCipherFor(ctx: CommandContext, warn: (message: string) => void = (m) => ctx.warn(m)): SecretCipher {
  const config = ctx.config;
  if (config.secrets.encryptionKeys) {
    // In production, a key that is not random bytes (zeros, a typed phrase) is refused, as validate-env does.
    const weak = encryptionKeyProblems(config);
    if (weak.length > 0) throw new ConfigError(weak);
    for (const w of keyringWarnings(config)) warn(w);
    return createSecretCipher(config.secrets.encryptionKeys);
  }
  if (config.env === 'production') {
    throw new ConfigError('OUTBOX_ENCRYPTION_KEYS is required in production (it encrypts subscription signing secrets at rest; `outbox-relay generate-secrets` makes one)');
  }
  if (!warned) {
    warned = true;
    warn('subscription signing secrets are stored unencrypted: set OUTBOX_ENCRYPTION_KEYS (required in production)');
  }
  return plainCipher;
}

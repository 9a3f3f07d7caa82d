/** The secret cipher the CLI uses for subscription secrets (plain until encryption keys are configured). */
import { plainCipher, type SecretCipher } from '../subscriptions/secretCipher.js';
import type { CommandContext } from './context.js';

export function secretCipherFor(_ctx: CommandContext): SecretCipher {
  return plainCipher;
}

/**
 * How signing secrets are stored. `plainCipher` keeps them as given (`whsec_…`); an encrypting cipher
 * (AES-256-GCM, see the operations guide) stores `enc:v1:<key id>:…` so a database dump does not
 * leak them. Decryption accepts both forms, so encryption can be turned on for a running system.
 */
export interface SecretCipher {
  encrypt(secret: string): string;
  decrypt(stored: string): string;
}

export const plainCipher: SecretCipher = {
  encrypt: (secret) => secret,
  decrypt: (stored) => {
    if (stored.startsWith('enc:')) throw new Error('this signing secret is encrypted, but no encryption key is configured (OUTBOX_ENCRYPTION_KEYS)');
    return stored;
  },
};

/**
 * pino loggers. Daemons log JSON to stdout; one-shot CLI commands log to stderr so that their result
 * on stdout stays machine-readable. Secrets, signatures and authorization headers are redacted by
 * path wherever they could appear.
 */
import { pino, type Logger, type LoggerOptions } from 'pino';
import type { LogLevel } from './config/schema.js';

export type { Logger };

/** Paths pino censors in every log line (`*` matches one level). */
export const REDACT_PATHS = [
  'password', '*.password', '*.*.password',
  'secret', '*.secret', 'secrets', '*.secrets', '*.*.secret',
  'url', // database URLs carry passwords; webhook URLs may carry tokens in their query
  'connectionString', '*.connectionString',
  'authorization', '*.authorization', 'headers.authorization', '*.headers.authorization',
  'headers["webhook-signature"]', '*.headers["webhook-signature"]', 'signature', '*.signature',
  'token', '*.token', 'jwt', '*.jwt',
  'config.database.url', 'config.database.password', 'config.secrets',
];

/**
 * Secret-shaped text, wherever it occurs in a line (paths cannot catch a secret inside a message,
 * e.g. a receiver's error body that echoes our request headers). Applied to every serialized line.
 */
const SCRUBS: ReadonlyArray<[RegExp, string]> = [
  // Standard Webhooks signatures (v1 = HMAC-SHA256, v1a = ed25519), base64.
  [/\b(v1a?),[A-Za-z0-9+/]{16,}={0,2}/g, '$1,[redacted]'],
  // Signing secrets as users see them.
  [/\b(whsec|whsk|whpk)_[A-Za-z0-9+/]{8,}={0,2}/g, '$1_[redacted]'],
  // Encrypted signing secrets (enc:v1:<key id>:<iv>:<ciphertext>).
  [/\benc:v1:([a-z0-9]{1,32}):[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+/g, 'enc:v1:$1:[redacted]'],
  // Passwords in URLs (postgres://user:password@host).
  [/\b([a-z][a-z0-9+.-]*:\/\/[^\s:/?#@"]*):[^\s@/"]*@/gi, '$1:[redacted]@'],
  // Bearer tokens.
  [/\b(Bearer\s+)[A-Za-z0-9._~+/-]+=*/gi, '$1[redacted]'],
];

/** Replaces secret-shaped text (signatures, whsec_ secrets, URL passwords, bearer tokens) with [redacted]. */
export function scrubSecrets(text: string): string {
  let out = text;
  for (const [re, replacement] of SCRUBS) out = out.replace(re, replacement);
  return out;
}

export interface LoggerSettings {
  level: LogLevel;
  /** 1 = stdout (daemons), 2 = stderr (CLI commands). */
  fd?: 1 | 2;
  name?: string;
  /** Extra pino options (tests pass a destination stream). */
  destination?: NodeJS.WritableStream;
}

export function createLogger(settings: LoggerSettings): Logger {
  const options: LoggerOptions = {
    level: settings.level,
    name: settings.name ?? 'outbox-relay',
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    base: { pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    hooks: { streamWrite: scrubSecrets },
  };
  if (settings.destination) return pino(options, settings.destination);
  return pino(options, pino.destination({ fd: settings.fd ?? 1, sync: settings.fd === 2 }));
}

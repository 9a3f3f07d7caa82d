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
  };
  if (settings.destination) return pino(options, settings.destination);
  return pino(options, pino.destination({ fd: settings.fd ?? 1, sync: settings.fd === 2 }));
}

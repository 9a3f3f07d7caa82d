/**
 * A small error taxonomy with stable codes. Core modules throw these; the CLI entry point turns them
 * into one line on stderr and an exit status. Anything else is normalized once by {@link toOutboxError}.
 */

/** Exit statuses used by the CLI (sysexits.h where one fits). */
export const EXIT = {
  ok: 0,
  failure: 1,
  usage: 2,
  /** EX_CONFIG: the configuration is invalid. */
  config: 78,
  /** EX_UNAVAILABLE: a service we depend on (PostgreSQL) is not reachable. */
  unavailable: 69,
} as const;

export class OutboxError extends Error {
  readonly code: string;
  readonly exitCode: number;
  constructor(message: string, code = 'E_OUTBOX', exitCode: number = EXIT.failure, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'OutboxError';
    this.code = code;
    this.exitCode = exitCode;
  }
}

/**
 * A server that could not bind its port, as an error that names the address and the settings to
 * change (not a "PostgreSQL error", which is how any coded error would otherwise read).
 */
export function listenError(err: unknown, what: string, host: string, port: number, settings: string): OutboxError {
  const code = (err as { code?: unknown } | null)?.code;
  const reason = code === 'EADDRINUSE' ? 'the address is already in use (another process listens there)'
    : code === 'EACCES' ? 'permission denied (ports below 1024 need privileges)'
    : code === 'EADDRNOTAVAIL' ? 'no network interface has that address'
    : code === 'ENOTFOUND' || code === 'EAI_AGAIN' ? 'the host name does not resolve'
    : (err as { message?: unknown } | null)?.message ? String((err as { message: unknown }).message)
    : String(err);
  return new OutboxError(`cannot listen on ${host}:${port} for ${what}: ${reason}; change ${settings}`, `E_LISTEN_${typeof code === 'string' ? code : 'FAILED'}`, EXIT.failure, { cause: err });
}

/** Invalid configuration (file, environment, secrets). Exit 78. */
export class ConfigError extends OutboxError {
  /** Every problem found, one per line; `message` joins them. */
  readonly problems: readonly string[];
  constructor(problems: string | readonly string[]) {
    const list = typeof problems === 'string' ? [problems] : problems;
    super(list.join('; '), 'E_CONFIG', EXIT.config);
    this.name = 'ConfigError';
    this.problems = list;
  }
}

/** Bad command-line input or a refused request (bad identifier, unknown table). Exit 2. */
export class UsageError extends OutboxError {
  constructor(message: string) {
    super(message, 'E_USAGE', EXIT.usage);
    this.name = 'UsageError';
  }
}

/** PostgreSQL could not be reached or refused us. Exit 69. */
export class DatabaseUnavailableError extends OutboxError {
  constructor(message: string, cause?: unknown) {
    super(message, 'E_DB_UNAVAILABLE', EXIT.unavailable, { cause });
    this.name = 'DatabaseUnavailableError';
  }
}

/** The shape of an error thrown by node-postgres (a server error or a socket error). */
export interface PgLikeError {
  code?: string;
  message: string;
  detail?: string;
  hint?: string;
  errno?: number;
}

export function isPgLikeError(err: unknown): err is PgLikeError {
  return typeof err === 'object' && err !== null && 'message' in err && typeof (err as { message: unknown }).message === 'string';
}

/** SQLSTATEs after which the same statement may simply be tried again. */
const RETRYABLE_SQLSTATES = new Set([
  '40001', // serialization_failure
  '40P01', // deadlock_detected
  '55P03', // lock_not_available
  '57P01', // admin_shutdown
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '08000', '08003', '08006', '08001', '08004', // connection exceptions
  '53300', // too_many_connections
]);

const RETRYABLE_SOCKET_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN']);

/** True when a database operation failed for a passing reason (restart, deadlock, network) and may be retried. */
export function isRetryableDbError(err: unknown): boolean {
  if (!isPgLikeError(err)) return false;
  if (err.code && (RETRYABLE_SQLSTATES.has(err.code) || RETRYABLE_SOCKET_CODES.has(err.code))) return true;
  return /Connection terminated|connection timeout|Client has encountered a connection error|terminating connection/i.test(err.message);
}

/** Normalize anything thrown into an OutboxError with a clear one-line message. */
export function toOutboxError(err: unknown): OutboxError {
  if (err instanceof OutboxError) return err;
  if (isPgLikeError(err)) {
    const code = err.code ?? '';
    if (/does not support SSL/i.test(err.message)) {
      return new DatabaseUnavailableError(
        `cannot reach PostgreSQL: ${err.message} (this server offers no TLS: connect with sslmode=disable in DATABASE_URL, or DB_SSL=disable)`,
        err,
      );
    }
    if (RETRYABLE_SOCKET_CODES.has(code) || code === 'ENOTFOUND' || /connect|Connection terminated/i.test(err.message) && !code.match(/^[0-9A-Z]{5}$/)) {
      return new DatabaseUnavailableError(`cannot reach PostgreSQL: ${err.message}`, err);
    }
    if (code === '28P01' || code === '28000') return new DatabaseUnavailableError(`PostgreSQL refused the login: ${err.message}`, err);
    if (code === '3D000') return new DatabaseUnavailableError(`${err.message} (check DB_NAME or DATABASE_URL)`, err);
    if (code === '57P03') return new DatabaseUnavailableError(`PostgreSQL is not accepting connections yet: ${err.message}`, err);
    // Permission errors name the relation but not the way out.
    const ours = code === '42501'
      ? 'this database role lacks a privilege: run this command as the database owner; the pull API sidecar runs as a role made by "outbox-relay api create-role" (run it again after reset-db)'
      // Undefined column, function, table: most often a schema older than this version.
      : ['42703', '42883', '42P01'].includes(code)
        ? 'the database schema may be older than this version of outbox-relay: run "outbox-relay migrate"'
        : undefined;
    const extra = [err.detail, err.hint, ours].filter(Boolean).join(' ');
    return new OutboxError(code ? `PostgreSQL error ${code}: ${err.message}${extra ? ` (${extra})` : ''}` : err.message, code ? `E_PG_${code}` : 'E_INTERNAL', EXIT.failure, { cause: err });
  }
  return new OutboxError(String(err), 'E_INTERNAL', EXIT.failure, { cause: err });
}

/**
 * PostgreSQL connection settings and pools. One place decides how we connect, so the relay, the
 * LISTEN client, the CLI and the API sidecar all agree.
 */
import pg from 'pg';
import type { Config } from '../config/schema.js';

export type DatabaseConfig = Config['database'];

/**
 * Connection options for node-postgres from our config (`DATABASE_URL` wins over `DB_*`, except that
 * `DB_PASSWORD` fills in a URL that carries no password: see withPassword).
 */
export function connectionOptions(db: DatabaseConfig, applicationName = db.applicationName): pg.ClientConfig {
  const ssl = db.ssl === 'disable' ? undefined : db.ssl === 'require' ? { rejectUnauthorized: false } : { rejectUnauthorized: true };
  const common: pg.ClientConfig = {
    application_name: applicationName,
    connectionTimeoutMillis: db.connectTimeoutMs,
    keepAlive: true,
    keepAliveInitialDelayMillis: 10_000,
  };
  if (ssl) common.ssl = ssl;
  if (db.url) return { ...common, connectionString: withLibpqSslModes(withPassword(db.url, db.password)) };
  return { ...common, host: db.host, port: db.port, database: db.name, user: db.user, password: db.password };
}

/**
 * DB_PASSWORD for a DATABASE_URL without a password, as libpq takes PGPASSWORD: the URL can sit in an
 * environment file while the password comes from a secret file or a systemd credential. A URL with a
 * password of its own (in its user part or as `?password=`), or that is not a URL, is kept as it is.
 * Without a host (a socket directory in `?host=`) the password goes into the query, which
 * node-postgres reads too. Percent-encoded whole, so node-postgres decodes exactly it.
 */
export function withPassword(url: string, password: string): string {
  if (!password) return url;
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return url;
  }
  if (u.password || u.searchParams.has('password') || u.hash) return url;
  if (!u.host) return `${url}${u.search ? '&' : '?'}password=${encodeURIComponent(password)}`;
  u.password = encodeURIComponent(password);
  return u.href;
}

/**
 * A URL's `sslmode` means what libpq (psql, every other client) means by it. node-postgres 8 reads
 * `prefer`, `require` and `verify-ca` as `verify-full` unless the URL opts into libpq semantics, and
 * warns about it on stderr at every connection: `sslmode=require` against a managed database with a
 * private CA then failed on the certificate, although `require` is documented here (and by libpq) as
 * "encrypted, certificate not checked", as `DB_SSL=require` does. A URL that says how to read it
 * already, or that is not a URL, is passed as it is.
 */
export function withLibpqSslModes(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return url;
  }
  if (!u.searchParams.has('sslmode') || u.searchParams.has('uselibpqcompat') || u.hash) return url;
  // Appended, not re-serialized: the rest of the URL (an encoded password) stays byte for byte.
  return `${url}&uselibpqcompat=true`;
}

/** Where we connect, for messages: host, port and database, never the password. */
export function describeTarget(db: DatabaseConfig): string {
  if (db.url) {
    try {
      const u = new URL(db.url);
      return `${u.hostname || 'localhost'}:${u.port || '5432'}/${decodeURIComponent(u.pathname.replace(/^\//, '')) || u.username || 'postgres'}`;
    } catch {
      return '(DATABASE_URL)';
    }
  }
  return `${db.host}:${db.port}/${db.name}`;
}

export interface PoolOptions {
  max?: number;
  applicationName?: string;
  /** statement_timeout for every connection of the pool (0 = none). */
  statementTimeoutMs?: number;
  /** Called for errors of idle clients (a restarted server); without a handler they would crash the process. */
  onError?: (err: Error) => void;
}

/** A pool with keep-alive, a connect timeout and a handler for errors of idle clients. */
export function createPool(db: DatabaseConfig, options: PoolOptions = {}): pg.Pool {
  const pool = new pg.Pool({
    ...connectionOptions(db, options.applicationName),
    max: options.max ?? db.poolMax,
    idleTimeoutMillis: 30_000,
    ...(options.statementTimeoutMs ? { statement_timeout: options.statementTimeoutMs } : {}),
  });
  pool.on('error', (err) => options.onError?.(err));
  // A backend's last message (PostgreSQL shutting down: 57P01) can reach a client that is checked
  // out but has no statement running, where the pool's own listener is not attached: an 'error'
  // event without a listener crashes the process. Every client of the pool keeps a listener of its
  // own for that; the statement that would have run next fails instead, and the pool discards the
  // client on release (it is no longer queryable). Seen once in CI: a relay exited while its
  // database was being stopped.
  pool.on('connect', (client) => client.on('error', () => undefined));
  return pool;
}

/**
 * Runs `fn` with a client checked out of the pool. A checked-out client has lost the pool's error
 * listener: a connection lost between two statements (a database restart) would be an unhandled
 * 'error' event and crash the process. Here it only fails the statement in flight, and after any
 * failure the connection is discarded instead of going back to the pool.
 */
export async function withPoolClient<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let failed: Error | undefined;
  const onError = (err: Error): void => {
    failed = err;
  };
  client.on('error', onError);
  try {
    return await fn(client);
  } catch (err) {
    failed ??= err instanceof Error ? err : new Error(String(err));
    throw err;
  } finally {
    client.removeListener('error', onError);
    client.release(failed);
  }
}

/**
 * One statement in its own transaction under a statement_timeout of its own (background work such
 * as the queue sampler and the stranded-event sweep: never long, whatever the pool allows).
 */
export async function queryWithTimeout<R extends pg.QueryResultRow>(pool: pg.Pool, timeoutMs: number, query: pg.QueryConfig): Promise<pg.QueryResult<R>> {
  return withPoolClient(pool, async (client) => {
    try {
      await client.query('BEGIN');
      await client.query("SELECT set_config('statement_timeout', $1, true)", [`${Math.max(1, Math.round(timeoutMs))}ms`]);
      const res = await client.query<R>(query);
      await client.query('COMMIT');
      return res;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw err;
    }
  });
}

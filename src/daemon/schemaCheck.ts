/** Waits until the database is reachable and its schema matches this version (or migrates it). */
import type pg from 'pg';
import { withPoolClient } from '../db/connection.js';
import { appliedVersions, label, loadMigrations, migrate, missingMigrationsError } from '../db/migrate.js';
import { OutboxError, isRetryableDbError, toOutboxError } from '../errors.js';
import type { Logger } from '../log.js';

export interface SchemaCheckOptions {
  pool: pg.Pool;
  logger: Logger;
  migrate: boolean;
  signal: AbortSignal;
}

/**
 * Resolves when the schema is current. A database that is down or starting is waited for (with
 * backoff, logged); a schema that is behind is an error unless `migrate` is set.
 */
export async function ensureSchema(options: SchemaCheckOptions): Promise<void> {
  const expected = loadMigrations();
  for (let attempt = 1; ; attempt++) {
    if (options.signal.aborted) throw new OutboxError('stopped while waiting for the database', 'E_STOPPED');
    try {
      await withPoolClient(options.pool, async (client) => {
        if (options.migrate) {
          const res = await migrate(client, expected);
          if (res.applied.length) options.logger.info({ applied: res.applied.map(label) }, 'migrations applied');
        }
        const behind = missingMigrationsError(expected, await appliedVersions(client), 'run "outbox-relay migrate" (or start with --migrate)');
        if (behind) throw behind;
      });
      return;
    } catch (err) {
      if (err instanceof OutboxError && err.code !== 'E_MIGRATION') throw err;
      if (!isRetryableDbError(err)) throw toOutboxError(err);
      const delay = Math.min(10_000, 250 * 2 ** Math.min(attempt, 6));
      if (attempt === 1 || attempt % 10 === 0) options.logger.warn({ err: (err as Error).message, attempt, retryInMs: delay }, 'database not reachable yet; waiting');
      // Wait, or stop waiting on abort; either way the abort listener goes (no pile-up while the
      // database stays down).
      await new Promise<void>((resolve) => {
        const onAbort = (): void => {
          clearTimeout(t);
          resolve();
        };
        const t = setTimeout(() => {
          options.signal.removeEventListener('abort', onAbort);
          resolve();
        }, delay);
        options.signal.addEventListener('abort', onAbort, { once: true });
      });
    }
  }
}

/**
 * A clear message instead of "relation does not exist" or "column does not exist" when `migrate` has
 * not been run, or not since this version was installed (the window of a rolling upgrade).
 */
import type pg from 'pg';
import { appliedVersions, loadMigrations, missingMigrationsError } from '../db/migrate.js';
import { OutboxError } from '../errors.js';

export async function requireMigrated(client: pg.ClientBase): Promise<void> {
  const { rows } = await client.query<{ ok: boolean }>(
    "SELECT to_regclass('public.outbox_relay_migrations') IS NOT NULL AND to_regprocedure('public.outbox_capture()') IS NOT NULL AS ok",
  );
  if (!rows[0]?.ok) throw new OutboxError('the outbox schema is not installed in this database; run "outbox-relay migrate" first', 'E_NOT_MIGRATED');
  const behind = missingMigrationsError(loadMigrations(), await appliedVersions(client));
  if (behind) throw behind;
}

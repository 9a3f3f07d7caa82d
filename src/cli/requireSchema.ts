/**
 * A clear message instead of "relation does not exist" when `migrate` has not been run. A schema
 * that has the outbox but lacks some of this version's migrations (the window of a rolling upgrade)
 * is not refused here: most commands work on it, and one that needs a newer object fails with
 * PostgreSQL's error and a hint to migrate (errors.ts, toOutboxError).
 */
import type pg from 'pg';
import { OutboxError } from '../errors.js';

export async function requireMigrated(client: pg.ClientBase): Promise<void> {
  const { rows } = await client.query<{ ok: boolean }>(
    "SELECT to_regclass('public.outbox_relay_migrations') IS NOT NULL AND to_regprocedure('public.outbox_capture()') IS NOT NULL AS ok",
  );
  if (!rows[0]?.ok) throw new OutboxError('the outbox schema is not installed in this database; run "outbox-relay migrate" first', 'E_NOT_MIGRATED');
}

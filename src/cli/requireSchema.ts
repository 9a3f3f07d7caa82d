/** A clear message instead of "relation does not exist" when `migrate` has not been run. */
import type pg from 'pg';
import { OutboxError } from '../errors.js';

export async function requireMigrated(client: pg.ClientBase): Promise<void> {
  const { rows } = await client.query<{ ok: boolean }>(
    "SELECT to_regclass('public.outbox_relay_migrations') IS NOT NULL AND to_regprocedure('public.outbox_capture()') IS NOT NULL AS ok",
  );
  if (!rows[0]?.ok) throw new OutboxError('the outbox schema is not installed in this database; run "outbox-relay migrate" first', 'E_NOT_MIGRATED');
}

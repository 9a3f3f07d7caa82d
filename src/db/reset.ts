/**
 * Drops everything outbox-relay created in a database (development only; the CLI refuses it in
 * production): the event trigger, every public.outbox_* function (CASCADE removes the capture
 * triggers on tenant tables), table and type, and the seed's event_acknowledgments and
 * acknowledgment_status. Objects are found in the catalog, so migrations added later are covered.
 */
import type pg from 'pg';

const RESET_SQL = `
DO $reset$
DECLARE
    r record;
BEGIN
    DROP EVENT TRIGGER IF EXISTS outbox_capture_new_tables;
    FOR r IN
        SELECT p.oid::regprocedure AS fn FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.proname LIKE 'outbox\\_%'
    LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', r.fn);
    END LOOP;
    FOR r IN
        SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND (c.relname LIKE 'outbox\\_%' OR c.relname = 'event_acknowledgments')
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS public.%I CASCADE', r.relname);
    END LOOP;
    FOR r IN
        SELECT t.typname FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typtype IN ('e', 'c') AND (t.typname LIKE 'outbox\\_%' OR t.typname = 'acknowledgment_status')
          AND NOT EXISTS (SELECT 1 FROM pg_class AS c WHERE c.reltype = t.oid AND c.relkind <> 'c')
    LOOP
        EXECUTE format('DROP TYPE IF EXISTS public.%I CASCADE', r.typname);
    END LOOP;
END
$reset$`;

export async function resetDatabase(client: pg.ClientBase): Promise<void> {
  await client.query('BEGIN');
  try {
    await client.query(RESET_SQL);
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

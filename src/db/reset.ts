/**
 * Drops everything outbox-relay created in a database (development only; the CLI refuses it in
 * production). Dropping the capture function with CASCADE removes the triggers on tenant tables;
 * tenant tables and their data are left alone.
 *
 * The objects are found in the catalog rather than listed here, so that a later migration's tables,
 * functions and types are dropped too (a fixed list would leave them behind, and the migrate that
 * follows would fail on "already exists"). Ours are: in schema public, everything named `outbox_*`,
 * plus the seed's `event_acknowledgments` table and `acknowledgment_status` type; the event trigger
 * `outbox_capture_new_tables`. A test checks that after a reset only what migrate creates exists.
 */
import type pg from 'pg';

const RESET_SQL = `
DO $reset$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT evtname FROM pg_catalog.pg_event_trigger WHERE evtname LIKE 'outbox\\_%' LOOP
        EXECUTE format('DROP EVENT TRIGGER IF EXISTS %I', r.evtname);
    END LOOP;
    -- Functions first: CASCADE takes the capture triggers on tenant tables with them. Names are
    -- collected before dropping, as one drop may cascade to another object of the list.
    FOR r IN
        SELECT format('%I.%I(%s)', n.nspname, p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid)) AS sig,
               CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END AS kind
        FROM pg_catalog.pg_proc AS p JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.proname LIKE 'outbox\\_%'
        ORDER BY p.oid DESC
    LOOP
        EXECUTE format('DROP %s IF EXISTS %s CASCADE', r.kind, r.sig);
    END LOOP;
    FOR r IN
        SELECT c.relname, CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                                         WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END AS kind
        FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
          AND NOT c.relispartition
          AND (c.relname LIKE 'outbox\\_%' OR c.relname = 'event_acknowledgments')
        -- Tables first: their identity sequences go with them (IF EXISTS skips those afterwards).
        ORDER BY c.relkind IN ('r', 'p') DESC, c.oid DESC
    LOOP
        EXECUTE format('DROP %s IF EXISTS public.%I CASCADE', r.kind, r.relname);
    END LOOP;
    FOR r IN
        SELECT t.typname, CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END AS kind
        FROM pg_catalog.pg_type AS t JOIN pg_catalog.pg_namespace AS n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typtype IN ('e', 'c', 'd', 'r', 'b')
          AND (t.typtype <> 'c' OR (SELECT c.relkind FROM pg_catalog.pg_class AS c WHERE c.oid = t.typrelid) = 'c')
          AND t.typelem = 0
          AND (t.typname LIKE 'outbox\\_%' OR t.typname = 'acknowledgment_status')
        ORDER BY t.oid DESC
    LOOP
        EXECUTE format('DROP %s IF EXISTS public.%I CASCADE', r.kind, r.typname);
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

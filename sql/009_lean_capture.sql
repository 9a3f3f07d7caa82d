-- 009: a leaner capture function (DESIGN.md invariant 7: the trigger does the minimum in the
-- writer's transaction). Same events, payloads, aggregate ids, notifications and settings as
-- 003_capture.sql; what changed, measured with pgbench at 8 writers on 2 cores (CHANGELOG, README):
--
-- * Captured events carry no dedupe_key (NULL), as the seed's own trigger does. 003 wrote
--   xid:statement:relid:op:md5(key) and inserted with ON CONFLICT (dedupe_key) DO NOTHING. A
--   statement-level trigger fires once per statement and a row changes at most once per statement,
--   so that key met a duplicate only when two rows of one statement rendered the same key; then 003
--   silently dropped all but one of them. It cost a session counter, an md5 per row and a
--   speculative insertion (an index probe and an extra WAL record) per event. The column and its
--   UNIQUE constraint stay, for events an application writes itself.
-- * UPDATE pairs old and new rows by the key's JSON value (so a jsonb key 1 is not paired with "1"),
--   and a row whose key columns are missing from it (the trigger's arguments are stale: the key was
--   renamed or redefined while no event trigger re-installed capture) is paired by its whole content
--   instead. A changed row is then captured as a delete and an insert, never lost, and one statement
--   can no longer pair every old row with every new one.
-- * The settings row is read inside the one statement that writes the events and the fan-out queue
--   (one executor run per capturing statement instead of three).
-- * Each row is rendered as JSON once. The planner pulls a plain subquery up into its parent and
--   copies its expressions to every reference, so 003 ran to_jsonb(row) for the payload and again for
--   the key (an UPDATE more often still); OFFSET 0 keeps those subqueries, and the key's, apart.
--
-- Rendering settings stay pinned (timestamps in UTC, ISO dates inside ranges, hex bytea,
-- shortest-exact floats) and the function stays SECURITY DEFINER with a fixed search_path, so
-- writers need no grants on the outbox tables and every name below is schema-qualified.
-- Trigger arguments (unchanged): the table's primary-key column names, in key order.
CREATE OR REPLACE FUNCTION public.outbox_capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET "TimeZone" = 'UTC'
SET "DateStyle" = 'ISO, YMD'
SET "IntervalStyle" = 'postgres'
SET bytea_output = 'hex'
SET extra_float_digits = 1
AS $fn$
DECLARE
    -- TG_ARGV is indexed from 0; a slice renumbers it from 1.
    key_columns text[] := TG_ARGV[0:TG_NARGS - 1];
    -- A single-column key (the usual case) is read inline; only composite keys call outbox_key_of.
    single_key  text := CASE WHEN TG_NARGS = 1 THEN TG_ARGV[0] END;
    inserted    bigint;
    -- From public.outbox_relay_state (written by the relays): NOTIFY now? (mode 'always', or 'idle'
    -- while a relay waits; no settings row means 'always').
    notify      boolean;
BEGIN
    -- Whole rows are referenced as "alias.*": a bare alias would mean a column of the same name.
    IF TG_OP = 'INSERT' THEN
        WITH cfg AS (SELECT s.notify_mode, s.relay_idle, s.max_attempts FROM public.outbox_relay_state AS s),
        ev AS (
            INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, max_attempts)
            SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME || '_insert', r.k, TG_TABLE_NAME,
                   jsonb_build_object('operation', 'INSERT', 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                                      'timestamp', now(), 'old_data', NULL, 'new_data', r.j, 'changed_fields', NULL),
                   coalesce((SELECT cfg.max_attempts FROM cfg), 20)
            FROM (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k
                  FROM (SELECT to_jsonb(new_row.*) AS j FROM outbox_new AS new_row OFFSET 0) AS t) AS r
            RETURNING id),
        q AS (INSERT INTO public.outbox_fanout_queue (event_id) SELECT ev.id FROM ev RETURNING 1)
        SELECT (SELECT count(*) FROM q),
               coalesce((SELECT cfg.notify_mode = 'always' OR (cfg.notify_mode = 'idle' AND cfg.relay_idle) FROM cfg), true)
        INTO inserted, notify;
    ELSIF TG_OP = 'DELETE' THEN
        WITH cfg AS (SELECT s.notify_mode, s.relay_idle, s.max_attempts FROM public.outbox_relay_state AS s),
        ev AS (
            INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, max_attempts)
            SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME || '_delete', r.k, TG_TABLE_NAME,
                   jsonb_build_object('operation', 'DELETE', 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                                      'timestamp', now(), 'old_data', r.j, 'new_data', NULL, 'changed_fields', NULL),
                   coalesce((SELECT cfg.max_attempts FROM cfg), 20)
            FROM (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k
                  FROM (SELECT to_jsonb(old_row.*) AS j FROM outbox_old AS old_row OFFSET 0) AS t) AS r
            RETURNING id),
        q AS (INSERT INTO public.outbox_fanout_queue (event_id) SELECT ev.id FROM ev RETURNING 1)
        SELECT (SELECT count(*) FROM q),
               coalesce((SELECT cfg.notify_mode = 'always' OR (cfg.notify_mode = 'idle' AND cfg.relay_idle) FROM cfg), true)
        INTO inserted, notify;
    ELSE
        -- Old and new rows are paired by primary key (pk: see the header). A row whose key changed has
        -- no partner: it is captured as a delete of the old key and an insert of the new one
        -- (aggregates are keyed).
        -- A pair whose data did not change produces no event (compared as text when jsonb says
        -- equal: 1.0 -> 1.00 is a change). Events of one statement are numbered in key order.
        WITH cfg AS (SELECT s.notify_mode, s.relay_idle, s.max_attempts FROM public.outbox_relay_state AS s),
        ev AS (
            INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, max_attempts)
            SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME || '_' || p.kind, p.k, TG_TABLE_NAME,
                   jsonb_build_object('operation', upper(p.kind), 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                                      'timestamp', now(), 'old_data', p.oj, 'new_data', p.nj,
                                      'changed_fields', CASE WHEN p.kind = 'update' THEN public.outbox_changed_fields(p.oj, p.nj) END),
                   coalesce((SELECT cfg.max_attempts FROM cfg), 20)
            FROM (
                SELECT o.j AS oj, n.j AS nj, coalesce(n.k, o.k) AS k,
                       CASE WHEN o.j IS NULL THEN 'insert' WHEN n.j IS NULL THEN 'delete' ELSE 'update' END AS kind
                FROM (SELECT r.j, r.k, CASE WHEN NOT (r.j ?& key_columns) THEN 'row:' || md5(r.j::text)
                                            WHEN single_key IS NOT NULL THEN (r.j -> single_key)::text
                                            ELSE r.k END AS pk
                      FROM (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k
                            FROM (SELECT to_jsonb(old_row.*) AS j FROM outbox_old AS old_row OFFSET 0) AS t
                            OFFSET 0) AS r) AS o
                FULL JOIN (SELECT r.j, r.k, CASE WHEN NOT (r.j ?& key_columns) THEN 'row:' || md5(r.j::text)
                                                 WHEN single_key IS NOT NULL THEN (r.j -> single_key)::text
                                                 ELSE r.k END AS pk
                           FROM (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k
                                 FROM (SELECT to_jsonb(new_row.*) AS j FROM outbox_new AS new_row OFFSET 0) AS t
                                 OFFSET 0) AS r) AS n
                    ON o.pk = n.pk
            ) AS p
            WHERE p.oj IS DISTINCT FROM p.nj OR p.oj::text <> p.nj::text
            ORDER BY p.k
            RETURNING id),
        q AS (INSERT INTO public.outbox_fanout_queue (event_id) SELECT ev.id FROM ev RETURNING 1)
        SELECT (SELECT count(*) FROM q),
               coalesce((SELECT cfg.notify_mode = 'always' OR (cfg.notify_mode = 'idle' AND cfg.relay_idle) FROM cfg), true)
        INTO inserted, notify;
    END IF;

    IF inserted > 0 AND notify THEN
        -- One notification per statement at most (and PostgreSQL folds identical ones per transaction).
        PERFORM pg_notify('outbox_wakeup', TG_TABLE_SCHEMA || ':' || TG_TABLE_NAME || '_' || lower(TG_OP));
    END IF;
    RETURN NULL;
END
$fn$;

COMMENT ON COLUMN public.outbox_events.dedupe_key IS
    'NULL for captured events (a statement-level trigger never captures a change twice); unique when an application sets it.';

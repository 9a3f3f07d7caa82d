-- 003: change capture. Statement-level AFTER triggers with transition tables write one outbox event per
-- changed row in a single INSERT per statement (a bulk statement costs one trigger call, not one per
-- row). The function runs as its owner (SECURITY DEFINER) with a fixed search_path, so writers need no
-- grants on the outbox tables; every name below is schema-qualified.

-- The aggregate id of a row (as jsonb): a single-column key as its plain text, a composite key as a
-- JSON array of its values (unambiguous). Never NULL, so a capture never fails the writer.
CREATE FUNCTION public.outbox_key_of(row_data jsonb, key_columns text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
        CASE WHEN cardinality(key_columns) = 1 THEN row_data ->> key_columns[1]
             ELSE (SELECT jsonb_agg(row_data -> k ORDER BY o)::text FROM unnest(key_columns) WITH ORDINALITY AS u(k, o))
        END,
        '')
$$;

-- Exactly the keys whose values changed, with their new values. jsonb equality treats 1.0 and 1.00
-- as equal; a change of a numeric's scale is a change of the data, so equal values are compared as
-- text too (only then, so real changes pay nothing extra).
CREATE FUNCTION public.outbox_changed_fields(old_data jsonb, new_data jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_object_agg(n.key, n.value), '{}'::jsonb)
    FROM jsonb_each(new_data) AS n
    WHERE n.value IS DISTINCT FROM old_data -> n.key
       OR n.value::text <> (old_data -> n.key)::text
$$;

-- Trigger arguments: the table's primary-key column names, in key order (set at install).
-- Rendering settings are pinned, so a payload looks the same whatever the writer's session set
-- (timestamps in UTC, ISO dates inside ranges, hex bytea, shortest-exact floats).
CREATE FUNCTION public.outbox_capture() RETURNS trigger
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
    prev_seq    text := current_setting('outbox.statement_seq', true);
    -- Names one capturing statement of this transaction: with the xid, the relation and the row key
    -- it makes dedupe keys that two real changes never share (a row changes at most once per
    -- statement). Strictly increasing within the transaction, and never reused even when the session
    -- loses the setting (RESET ALL) or sets it to something else: the counter never goes below the
    -- clock in microseconds.
    stmt_seq    bigint := greatest(
                    CASE WHEN prev_seq ~ '^[0-9]{1,18}$' THEN prev_seq::bigint + 1 ELSE 0 END,
                    (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    key_prefix  text;
    inserted    integer;
    -- A single-column key (the usual case) is read inline; only composite keys call outbox_key_of.
    single_key  text := CASE WHEN TG_NARGS = 1 THEN TG_ARGV[0] END;
    -- Settings written by the relays (sql/002): when to NOTIFY, and the attempt limit to stamp.
    cfg_notify_mode  text;
    cfg_relay_idle   boolean;
    cfg_max_attempts integer;
BEGIN
    SELECT s.notify_mode, s.relay_idle, s.max_attempts INTO cfg_notify_mode, cfg_relay_idle, cfg_max_attempts
    FROM public.outbox_relay_state AS s;
    PERFORM set_config('outbox.statement_seq', stmt_seq::text, true);
    key_prefix := pg_current_xact_id()::text || ':' || stmt_seq || ':' || TG_RELID::bigint || ':';

    -- Whole rows are referenced as "alias.*": a bare alias would mean a column of the same name.
    IF TG_OP = 'INSERT' THEN
        WITH ev AS (
        INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, dedupe_key, max_attempts)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME || '_insert', r.k, TG_TABLE_NAME,
               jsonb_build_object('operation', 'INSERT', 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                                  'timestamp', now(), 'old_data', NULL, 'new_data', r.j, 'changed_fields', NULL),
               key_prefix || 'i:' || md5(r.k), coalesce(cfg_max_attempts, 20)
        FROM (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k
              FROM (SELECT to_jsonb(new_row.*) AS j FROM outbox_new AS new_row) AS t) AS r
        ON CONFLICT (dedupe_key) DO NOTHING
        RETURNING id)
        INSERT INTO public.outbox_fanout_queue (event_id) SELECT ev.id FROM ev;
    ELSIF TG_OP = 'DELETE' THEN
        WITH ev AS (
        INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, dedupe_key, max_attempts)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME || '_delete', r.k, TG_TABLE_NAME,
               jsonb_build_object('operation', 'DELETE', 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                                  'timestamp', now(), 'old_data', r.j, 'new_data', NULL, 'changed_fields', NULL),
               key_prefix || 'd:' || md5(r.k), coalesce(cfg_max_attempts, 20)
        FROM (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k
              FROM (SELECT to_jsonb(old_row.*) AS j FROM outbox_old AS old_row) AS t) AS r
        ON CONFLICT (dedupe_key) DO NOTHING
        RETURNING id)
        INSERT INTO public.outbox_fanout_queue (event_id) SELECT ev.id FROM ev;
    ELSE
        -- Old and new rows are paired by primary key. A row whose key changed has no partner: it is
        -- captured as a delete of the old key and an insert of the new one (aggregates are keyed).
        -- A pair whose data did not change produces no event (compared as text when jsonb says
        -- equal: 1.0 -> 1.00 is a change).
        WITH ev AS (
        INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, dedupe_key, max_attempts)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME || '_' || p.kind, p.k, TG_TABLE_NAME,
               jsonb_build_object('operation', upper(p.kind), 'table', TG_TABLE_NAME, 'schema', TG_TABLE_SCHEMA,
                                  'timestamp', now(), 'old_data', p.oj, 'new_data', p.nj,
                                  'changed_fields', CASE WHEN p.kind = 'update' THEN public.outbox_changed_fields(p.oj, p.nj) END),
               key_prefix || left(p.kind, 1) || ':' || md5(p.k), coalesce(cfg_max_attempts, 20)
        FROM (
            SELECT o.j AS oj, n.j AS nj, coalesce(n.k, o.k) AS k,
                   CASE WHEN o.j IS NULL THEN 'insert' WHEN n.j IS NULL THEN 'delete' ELSE 'update' END AS kind
            FROM (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k FROM (SELECT to_jsonb(old_row.*) AS j FROM outbox_old AS old_row) AS t) AS o
            FULL JOIN (SELECT t.j, CASE WHEN single_key IS NOT NULL THEN coalesce(t.j ->> single_key, '') ELSE public.outbox_key_of(t.j, key_columns) END AS k FROM (SELECT to_jsonb(new_row.*) AS j FROM outbox_new AS new_row) AS t) AS n
                ON o.k = n.k
        ) AS p
        WHERE p.oj IS DISTINCT FROM p.nj OR p.oj::text <> p.nj::text
        ORDER BY p.k
        ON CONFLICT (dedupe_key) DO NOTHING
        RETURNING id)
        INSERT INTO public.outbox_fanout_queue (event_id) SELECT ev.id FROM ev;
    END IF;

    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted > 0 THEN
        -- One notification per statement at most (and PostgreSQL folds identical ones per transaction).
        IF cfg_notify_mode IS NULL OR cfg_notify_mode = 'always' OR (cfg_notify_mode = 'idle' AND cfg_relay_idle) THEN
            PERFORM pg_notify('outbox_wakeup', TG_TABLE_SCHEMA || ':' || TG_TABLE_NAME || '_' || lower(TG_OP));
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

-- Schemas whose tables are all captured, including tables created later (see outbox_capture_ddl).
CREATE TABLE public.outbox_capture_schemas (
    schema_name text        PRIMARY KEY,
    added_at    timestamptz NOT NULL DEFAULT now()
);

-- `triggers install --all-schemas`: every tenant schema, also those created later, except these.
CREATE TABLE public.outbox_capture_settings (
    singleton        boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    all_schemas      boolean     NOT NULL DEFAULT false,
    excluded_schemas text[]      NOT NULL DEFAULT '{}',
    updated_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.outbox_capture_settings (singleton) VALUES (true);

-- Is a schema captured as a whole? System schemas and public never are implicitly.
-- SECURITY DEFINER: the event trigger runs as whoever creates a table, who may have no grant here.
CREATE FUNCTION public.outbox_schema_is_captured(schema_name text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM public.outbox_capture_schemas AS c WHERE c.schema_name = $1)
        OR EXISTS (SELECT 1 FROM public.outbox_capture_settings AS s
                   WHERE s.all_schemas
                     AND NOT ($1 = ANY (s.excluded_schemas))
                     AND $1 <> 'public' AND $1 <> 'information_schema'
                     AND $1 NOT LIKE 'pg\_%')
$$;

-- Tables of outbox-relay itself (public.outbox_* and the seed's event_acknowledgments): never captured.
CREATE FUNCTION public.outbox_is_own_table(schema_name text, table_name text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT schema_name = 'public' AND (table_name LIKE 'outbox\_%' OR table_name = 'event_acknowledgments')
$$;

-- Installs (or re-installs, after a key change) the three capture triggers on one table.
-- Returns false (with a WARNING) when the table has no primary key and strict is false; raises when
-- strict. Names are looked up, never parsed, and quoted with format('%I').
-- Triggers that are already as wanted are left alone, so the event trigger (which runs this for
-- every ALTER TABLE in a captured schema) does not undo an operator's ALTER TABLE ... DISABLE
-- TRIGGER; an explicit install (strict) re-creates disabled ones.
-- outbox-relay's own tables are never captured: a trigger on outbox_events would call itself.
CREATE FUNCTION public.outbox_install_capture(schema_name text, table_name text, strict boolean DEFAULT true)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $fn$
DECLARE
    rel     oid;
    kind    "char";
    is_part boolean;
    keys    text[];
    args    text;
    want    bytea;
    current integer;
BEGIN
    SELECT c.oid, c.relkind, c.relispartition INTO rel, kind, is_part
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname = schema_name AND c.relname = table_name;
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table %.% does not exist', schema_name, table_name USING ERRCODE = 'undefined_table';
    END IF;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '%.% is not a table', schema_name, table_name USING ERRCODE = 'wrong_object_type';
    END IF;
    IF public.outbox_is_own_table(schema_name, table_name) THEN
        IF strict THEN
            RAISE EXCEPTION '%.% is a table of outbox-relay itself and cannot be captured', schema_name, table_name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN false;
    END IF;
    IF is_part THEN
        -- Partitions are captured through their partitioned parent.
        RETURN false;
    END IF;

    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keys
    FROM pg_index AS i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = rel AND i.indisprimary;

    IF keys IS NULL THEN
        PERFORM public.outbox_remove_capture(schema_name, table_name);
        IF strict THEN
            RAISE EXCEPTION 'table %.% has no primary key: its rows cannot be named as aggregates, add one before capturing it',
                schema_name, table_name USING ERRCODE = 'invalid_table_definition';
        END IF;
        RAISE WARNING 'outbox-relay: table %.% has no primary key and is not captured; add a primary key to capture it',
            schema_name, table_name;
        RETURN false;
    END IF;

    -- pg_trigger.tgargs: each argument followed by a zero byte.
    SELECT string_agg(convert_to(k, pg_catalog.getdatabaseencoding()) || decode('00', 'hex'), ''::bytea ORDER BY o) INTO want
    FROM unnest(keys) WITH ORDINALITY AS u(k, o);
    SELECT count(*) INTO current
    FROM pg_trigger AS t
    WHERE t.tgrelid = rel
      AND t.tgfoid = 'public.outbox_capture()'::regprocedure
      AND t.tgargs = want
      AND (t.tgname, t.tgtype) IN (('outbox_capture_insert', 4), ('outbox_capture_update', 16), ('outbox_capture_delete', 8))
      AND (NOT strict OR t.tgenabled <> 'D');
    IF current = 3 THEN
        RETURN true;
    END IF;

    SELECT string_agg(quote_literal(k), ', ') INTO args FROM unnest(keys) AS k;

    EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture_insert ON %I.%I', schema_name, table_name);
    EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture_update ON %I.%I', schema_name, table_name);
    EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture_delete ON %I.%I', schema_name, table_name);
    EXECUTE format('CREATE TRIGGER outbox_capture_insert AFTER INSERT ON %I.%I REFERENCING NEW TABLE AS outbox_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_capture(%s)', schema_name, table_name, args);
    EXECUTE format('CREATE TRIGGER outbox_capture_update AFTER UPDATE ON %I.%I REFERENCING OLD TABLE AS outbox_old NEW TABLE AS outbox_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_capture(%s)', schema_name, table_name, args);
    EXECUTE format('CREATE TRIGGER outbox_capture_delete AFTER DELETE ON %I.%I REFERENCING OLD TABLE AS outbox_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_capture(%s)', schema_name, table_name, args);
    RETURN true;
END
$fn$;

-- Removes the capture triggers of one table (no error when there are none).
CREATE FUNCTION public.outbox_remove_capture(schema_name text, table_name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $fn$
DECLARE
    had boolean;
BEGIN
    SELECT EXISTS (
        SELECT 1 FROM pg_trigger AS t
        JOIN pg_class AS c ON c.oid = t.tgrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = schema_name AND c.relname = table_name AND t.tgfoid = 'public.outbox_capture()'::regprocedure
    ) INTO had;
    IF had THEN
        EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture_insert ON %I.%I', schema_name, table_name);
        EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture_update ON %I.%I', schema_name, table_name);
        EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture_delete ON %I.%I', schema_name, table_name);
    END IF;
    RETURN had;
END
$fn$;

-- Tables created (or re-keyed) later in a captured schema are captured at once, so a new tenant
-- table is never silently missed. A table without a primary key gets a WARNING, shown to the client.
CREATE FUNCTION public.outbox_capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT n.nspname::text AS schema_name, c.relname::text AS table_name
        FROM pg_event_trigger_ddl_commands() AS d
        JOIN pg_class AS c ON c.oid = d.objid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE d.classid = 'pg_catalog.pg_class'::regclass
          AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND d.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    LOOP
        IF public.outbox_schema_is_captured(r.schema_name) THEN
            PERFORM public.outbox_install_capture(r.schema_name, r.table_name, false);
        END IF;
    END LOOP;
END
$fn$;

-- Event triggers need a superuser. Without one, migration still succeeds and `triggers list` reports
-- that new tables are not captured automatically.
DO $do$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER outbox_capture_new_tables ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
            EXECUTE FUNCTION public.outbox_capture_ddl();
    ELSE
        RAISE WARNING 'outbox-relay: not a superuser, so tables created later in captured schemas are not captured automatically; re-run "outbox-relay triggers install" after creating tables';
    END IF;
END
$do$;

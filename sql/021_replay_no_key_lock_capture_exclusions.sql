-- 021: replay's event locks no longer wait for acknowledgments; a table's exclusion from capture
-- survives a key change, a lost primary key and a partial install.
--
-- 1. outbox_replay (020) locked its candidate events FOR UPDATE, so that retention (FOR UPDATE SKIP
--    LOCKED) passes them over. FOR UPDATE also conflicts with the FOR KEY SHARE lock that every
--    INSERT into event_acknowledgments takes on its event through the foreign key: an open
--    application transaction that had acknowledged an event of the range stalled replay, and replay
--    holds the lane lock (7411201005) exclusively while it waits, so fan-out and relay outcomes
--    stalled behind it (a helper's review reproduced it). FOR NO KEY UPDATE is what an UPDATE of the
--    event takes anyway: it still conflicts with retention's FOR UPDATE (which SKIP LOCKED skips) and
--    no longer with acknowledgment inserts. Otherwise outbox_replay is 020's.
--
-- 2. outbox_install_capture (003). `triggers remove --schema S --table T`, when S is captured as a
--    whole, excludes T by disabling its capture triggers; the DDL event trigger runs a non-strict
--    install at every ALTER TABLE and leaves disabled triggers alone. But when it had to re-create
--    them (the primary key changed, one trigger was missing) it created them enabled, and when the
--    table had no primary key it dropped them: in each case the exclusion was forgotten and the
--    table captured again (a helper's review reproduced all three). Now a re-created trigger keeps
--    the state it had (disabled, or ENABLE ALWAYS / REPLICA), a missing one is created disabled when
--    every capture trigger left on the table is disabled (the table is excluded), and the disabled
--    triggers of an excluded table without a primary key stay (they fire on nothing). A strict
--    install (by table name, the documented way to include the table again) enables disabled
--    triggers as before, and keeps ALWAYS / REPLICA.

CREATE OR REPLACE FUNCTION public.outbox_replay(
    mode text, subscription_ids bigint[], tenant_name text, type_patterns text[],
    created_from timestamptz, created_to timestamptz, after_event_id bigint, batch_size integer,
    OUT queued integer, OUT last_event_id bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    touched bigint[];
BEGIN
    IF mode NOT IN ('dead', 'delivered') THEN
        RAISE EXCEPTION 'replay mode must be dead or delivered' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(7411201005);

    SELECT max(c.id) INTO last_event_id FROM (
        SELECT e.id FROM public.outbox_events AS e
        WHERE e.id > after_event_id
          AND NOT EXISTS (SELECT 1 FROM public.outbox_fanout_queue AS q WHERE q.event_id = e.id)
          AND (tenant_name IS NULL OR e.tenant = tenant_name)
          AND (type_patterns IS NULL OR public.outbox_event_type_matches(type_patterns, e.event_type))
          AND (created_from IS NULL OR e.created_at >= created_from)
          AND (created_to IS NULL OR e.created_at < created_to)
        ORDER BY e.id LIMIT batch_size
    ) AS c;
    IF last_event_id IS NULL THEN
        queued := 0;
        RETURN;
    END IF;

    WITH candidates AS (
        SELECT e.id, e.aggregate_type, e.aggregate_id, e.event_type, e.tenant FROM public.outbox_events AS e
        WHERE e.id > after_event_id AND e.id <= last_event_id
          AND NOT EXISTS (SELECT 1 FROM public.outbox_fanout_queue AS q WHERE q.event_id = e.id)
          AND (tenant_name IS NULL OR e.tenant = tenant_name)
          AND (type_patterns IS NULL OR public.outbox_event_type_matches(type_patterns, e.event_type))
          AND (created_from IS NULL OR e.created_at >= created_from)
          AND (created_to IS NULL OR e.created_at < created_to)
        FOR NO KEY UPDATE OF e
    ),
    batch AS (
        SELECT d.event_id, d.subscription_id, d.lane, true AS existing
        FROM candidates AS c JOIN public.outbox_deliveries AS d ON d.event_id = c.id
        WHERE mode = 'dead' AND d.state = 'dead'
          AND (subscription_ids IS NULL OR d.subscription_id = ANY (subscription_ids))
        UNION ALL
        SELECT c.id, s.id, CASE WHEN s.ordering = 'aggregate' THEN public.outbox_lane(c.aggregate_type, c.aggregate_id) END, false
        FROM candidates AS c
        JOIN public.outbox_subscriptions AS s
          ON s.tenant = c.tenant AND public.outbox_event_type_matches(s.event_types, c.event_type)
        WHERE mode = 'delivered'
          AND (subscription_ids IS NULL OR s.id = ANY (subscription_ids))
          AND (subscription_ids IS NOT NULL OR s.enabled)
          AND NOT EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = c.id AND d.subscription_id = s.id)
    ),
    -- Ready at the head of its lane, waiting behind live deliveries (or earlier ones of this batch).
    decided AS (
        SELECT b.*, (b.lane IS NULL OR (
                   row_number() OVER (PARTITION BY b.subscription_id, b.lane ORDER BY b.event_id) = 1
                   AND NOT EXISTS (
                       SELECT 1 FROM public.outbox_deliveries AS d
                       WHERE d.subscription_id = b.subscription_id AND d.lane = b.lane AND d.state <> 'dead'))) AS is_ready
        FROM batch AS b
    ),
    requeued AS (
        UPDATE public.outbox_deliveries AS d
        SET state = CASE WHEN x.is_ready THEN 'ready' ELSE 'waiting' END::public.outbox_delivery_state,
            attempts = 0, next_attempt_at = now(), locked_by = NULL, last_error = NULL, last_status = NULL,
            created_at = now()
        FROM decided AS x
        WHERE x.existing AND d.event_id = x.event_id AND d.subscription_id = x.subscription_id
        RETURNING d.event_id
    ),
    created AS (
        INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state)
        SELECT x.event_id, x.subscription_id, x.lane, CASE WHEN x.is_ready THEN 'ready' ELSE 'waiting' END::public.outbox_delivery_state
        FROM decided AS x WHERE NOT x.existing
        ORDER BY x.event_id, x.subscription_id
        RETURNING event_id
    )
    SELECT (SELECT count(*)::integer FROM requeued) + (SELECT count(*)::integer FROM created),
           (SELECT array_agg(DISTINCT u.event_id) FROM (SELECT event_id FROM requeued UNION ALL SELECT event_id FROM created) AS u)
      INTO queued, touched;

    -- The events are pending again (a new statement sees the requeued and created deliveries).
    IF touched IS NOT NULL THEN
        UPDATE public.outbox_events AS e
        SET processed_at = NULL,
            attempts = CASE WHEN EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = e.id AND d.state = 'dead')
                            THEN e.max_attempts
                            ELSE coalesce((SELECT max(d.attempts) FROM public.outbox_deliveries AS d WHERE d.event_id = e.id), 0) END,
            updated_at = now()
        WHERE e.id = ANY (touched);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION public.outbox_install_capture(schema_name text, table_name text, strict boolean DEFAULT true)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $fn$
DECLARE
    rel      oid;
    kind     "char";
    is_part  boolean;
    keys     text[];
    args     text;
    want     bytea;
    current  integer;
    excluded boolean;
    states   jsonb;
    trg      text;
    state    text;
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

    -- The state of each capture trigger there is (tgenabled: O enabled, D disabled, A always, R replica),
    -- and whether the table is excluded: capture triggers left, all of them disabled.
    SELECT jsonb_object_agg(t.tgname, t.tgenabled::text), coalesce(bool_and(t.tgenabled = 'D'), false)
      INTO states, excluded
    FROM pg_trigger AS t
    WHERE t.tgrelid = rel AND t.tgfoid = 'public.outbox_capture()'::regprocedure;

    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keys
    FROM pg_index AS i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = rel AND i.indisprimary;

    IF keys IS NULL THEN
        IF strict THEN
            PERFORM public.outbox_remove_capture(schema_name, table_name);
            RAISE EXCEPTION 'table %.% has no primary key: its rows cannot be named as aggregates, add one before capturing it',
                schema_name, table_name USING ERRCODE = 'invalid_table_definition';
        END IF;
        IF excluded THEN
            -- Disabled triggers fire on nothing; they keep the exclusion for when a key comes back.
            RETURN false;
        END IF;
        PERFORM public.outbox_remove_capture(schema_name, table_name);
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

    -- Each re-created trigger gets the state it had; a missing one of an excluded table is disabled.
    FOREACH trg IN ARRAY ARRAY['outbox_capture_insert', 'outbox_capture_update', 'outbox_capture_delete'] LOOP
        state := coalesce(states ->> trg, CASE WHEN excluded THEN 'D' ELSE 'O' END);
        IF state = 'D' AND NOT strict THEN
            EXECUTE format('ALTER TABLE %I.%I DISABLE TRIGGER %I', schema_name, table_name, trg);
        ELSIF state = 'A' THEN
            EXECUTE format('ALTER TABLE %I.%I ENABLE ALWAYS TRIGGER %I', schema_name, table_name, trg);
        ELSIF state = 'R' THEN
            EXECUTE format('ALTER TABLE %I.%I ENABLE REPLICA TRIGGER %I', schema_name, table_name, trg);
        END IF;
    END LOOP;
    RETURN true;
END
$fn$;

-- 021: replay's and outcomes' event locks no longer wait for acknowledgments; a table's exclusion
-- from capture survives a key change, a lost primary key and a partial install.
--
-- 1. outbox_replay (020) locked its candidate events FOR UPDATE, so that retention (FOR UPDATE SKIP
--    LOCKED) passes them over. FOR UPDATE also conflicts with the FOR KEY SHARE lock that every
--    INSERT into event_acknowledgments takes on its event through the foreign key: an open
--    application transaction that had acknowledged an event of the range stalled replay, and replay
--    holds the lane lock (7411201005) exclusively while it waits, so fan-out and relay outcomes
--    stalled behind it (a helper's review reproduced it). FOR NO KEY UPDATE is what an UPDATE of the
--    event takes anyway: it still conflicts with retention's FOR UPDATE (which SKIP LOCKED skips) and
--    no longer with acknowledgment inserts. Otherwise outbox_replay is 020's.
--    outbox_complete (005) had the same lock on the events whose deliveries to other subscriptions
--    finish in other transactions (its `siblings`), taken under the shared lane lock: an open
--    acknowledgment stalled the outcome, fan-out and replay queued behind it for the lock
--    exclusively, and every later outcome behind them (the same review reproduced the chain). It
--    takes FOR NO KEY UPDATE now too, which still serializes outcomes of one event (the lock
--    conflicts with itself). Otherwise outbox_complete is 005's. What still waits: an outcome whose
--    acknowledgment has the same (event, user) as one an open transaction inserted (the unique key).
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

CREATE OR REPLACE FUNCTION public.outbox_complete(
    worker text, event_ids bigint[], subscription_ids bigint[], attempt_numbers integer[], outcomes text[],
    http_statuses integer[], errors text[], delays_ms bigint[], durations_ms integer[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Key lookups only: never let a stale estimate turn one into a scan of a large table.
SET enable_seqscan = off
AS $fn$
DECLARE
    applied   integer;
    ev_ids    bigint[];
    ev_max    integer[];
    lane_subs bigint[];
    lane_ids  bigint[];
    n_locked  integer;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7411201005);

    WITH input AS (
        SELECT DISTINCT ON (i.event_id, i.subscription_id) i.*
        FROM unnest(event_ids, subscription_ids, attempt_numbers, outcomes, http_statuses, errors, delays_ms, durations_ms)
            AS i(event_id, subscription_id, attempt, outcome, http_status, error, delay_ms, duration_ms)
        ORDER BY i.event_id, i.subscription_id
    ),
    -- One primary-key lookup per outcome, driven from the input. The state test stays outside the
    -- locking subquery on purpose: inside, it would let the planner pick the claim index (partial on
    -- state = 'ready', keyed by subscription), and with a fresh queue's statistics it does, scanning
    -- the whole queue per outcome (seen: seconds per batch).
    target AS (
        SELECT d.event_id, d.subscription_id, d.lane, i.attempt, i.outcome, i.http_status, i.error, i.delay_ms, i.duration_ms
        FROM input AS i
        CROSS JOIN LATERAL (
            SELECT x.event_id, x.subscription_id, x.lane, x.attempts, x.locked_by, x.state
            FROM public.outbox_deliveries AS x
            WHERE x.event_id = i.event_id AND x.subscription_id = i.subscription_id
            OFFSET 0 -- a fence: the state test below must not be pushed in here
            FOR UPDATE
        ) AS d
        WHERE d.attempts = i.attempt AND d.locked_by = worker AND d.state = 'ready'
    ),
    -- An event with deliveries to several subscriptions may see them finish in several transactions at
    -- once; locking it (in id order, no deadlocks) makes the last one see all the others' outcomes.
    -- NO KEY UPDATE (021): conflicts with itself and with retention, not with acknowledgment inserts.
    siblings AS (
        SELECT e.id FROM public.outbox_events AS e
        WHERE e.id IN (
            SELECT t.event_id FROM target AS t
            WHERE t.outcome IN ('ok', 'dead') AND EXISTS (
                SELECT 1 FROM public.outbox_deliveries AS o WHERE o.event_id = t.event_id AND o.subscription_id <> t.subscription_id))
        ORDER BY e.id
        FOR NO KEY UPDATE
    ),
    delivered AS (
        DELETE FROM public.outbox_deliveries AS d USING target AS t
        WHERE d.event_id = t.event_id AND d.subscription_id = t.subscription_id AND t.outcome = 'ok'
        RETURNING 1
    ),
    changed AS (
        UPDATE public.outbox_deliveries AS d
        SET state = CASE WHEN t.outcome = 'dead' THEN 'dead'::public.outbox_delivery_state ELSE d.state END,
            attempts = CASE WHEN t.outcome = 'gone' THEN greatest(d.attempts - 1, 0) ELSE d.attempts END,
            next_attempt_at = now() + CASE WHEN t.outcome = 'retry' THEN t.delay_ms ELSE 0 END * interval '1 millisecond',
            locked_by = NULL,
            last_status = t.http_status,
            last_error = left(t.error, 2000)
        FROM target AS t
        WHERE d.event_id = t.event_id AND d.subscription_id = t.subscription_id AND t.outcome IN ('retry', 'dead', 'gone')
        RETURNING 1
    ),
    gone AS (
        UPDATE public.outbox_subscriptions AS s
        SET enabled = false, disabled_reason = 'receiver answered 410 Gone', disabled_at = now(), updated_at = now()
        WHERE s.id IN (SELECT t.subscription_id FROM target AS t WHERE t.outcome = 'gone') AND s.enabled
        RETURNING 1
    ),
    acks AS (
        INSERT INTO public.event_acknowledgments AS a
            (event_id, user_id, tenant, processor, status, processed_at, metadata, source)
        SELECT t.event_id, s.user_id, s.tenant, s.processor,
               CASE WHEN t.outcome = 'ok' THEN 'processed' ELSE 'failed' END::public.acknowledgment_status,
               now(),
               jsonb_build_object('subscription_id', s.id, 'http_status', t.http_status, 'attempts', t.attempt,
                                  'duration_ms', t.duration_ms, 'webhook_id', 'msg_' || t.event_id || '_' || s.id)
                   || CASE WHEN t.outcome = 'dead' THEN jsonb_build_object('error', left(t.error, 500)) ELSE '{}'::jsonb END,
               'relay'
        FROM target AS t JOIN public.outbox_subscriptions AS s ON s.id = t.subscription_id
        WHERE t.outcome IN ('ok', 'dead')
        ON CONFLICT (event_id, user_id) DO UPDATE
            SET status = excluded.status, processor = excluded.processor, processed_at = excluded.processed_at,
                metadata = excluded.metadata, updated_at = now()
            WHERE a.source = 'relay'
        RETURNING 1
    ),
    per_event AS (
        SELECT t.event_id, max(t.attempt)::integer AS max_attempt
        FROM target AS t WHERE t.outcome <> 'gone' GROUP BY t.event_id
    )
    SELECT (SELECT count(*)::integer FROM target),
           (SELECT array_agg(p.event_id ORDER BY p.event_id) FROM per_event AS p),
           (SELECT array_agg(p.max_attempt ORDER BY p.event_id) FROM per_event AS p),
           (SELECT array_agg(t.subscription_id) FROM target AS t WHERE t.outcome IN ('ok', 'dead') AND t.lane IS NOT NULL),
           (SELECT array_agg(t.lane) FROM target AS t WHERE t.outcome IN ('ok', 'dead') AND t.lane IS NOT NULL),
           (SELECT count(*)::integer FROM siblings) -- a plain SELECT runs only when referenced
      INTO applied, ev_ids, ev_max, lane_subs, lane_ids, n_locked;

    -- A new statement sees the changes above: roll the events up, then promote each finished lane.
    IF ev_ids IS NOT NULL THEN
        UPDATE public.outbox_events AS e
        SET attempts = CASE WHEN r.dead THEN e.max_attempts ELSE greatest(e.attempts, r.max_attempt) END,
            processed_at = CASE WHEN e.processed_at IS NULL AND r.remaining = 0 THEN now() ELSE e.processed_at END,
            updated_at = now()
        FROM (
            -- What is left of each event's deliveries (by key: no state test, see target above).
            SELECT f.id, f.max_attempt, left_over.remaining, left_over.dead
            FROM unnest(ev_ids, ev_max) AS f(id, max_attempt)
            CROSS JOIN LATERAL (
                SELECT count(*) AS remaining, coalesce(bool_or(d.state = 'dead'), false) AS dead
                FROM public.outbox_deliveries AS d WHERE d.event_id = f.id
            ) AS left_over
        ) AS r
        WHERE e.id = r.id;
    END IF;
    IF lane_subs IS NOT NULL THEN
        PERFORM public.outbox_promote_lanes(lane_subs, lane_ids);
    END IF;
    RETURN applied;
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

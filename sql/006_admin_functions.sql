-- 006: operator actions on the queue: disabling a subscription and replaying events. Both change
-- ordering lanes, so both hold the lane lock exclusively (see 005), one bounded batch per call.

-- Disables a subscription. Its live deliveries become dead (visible, replayable with `replay`), their
-- events roll up as failed and the subscription's user gets a 'failed' acknowledgment, as when a
-- delivery runs out of attempts. Returns how many deliveries were ended.
CREATE FUNCTION public.outbox_disable_subscription(subscription bigint, reason text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7411201005);
    UPDATE public.outbox_subscriptions
    SET enabled = false, disabled_reason = reason, disabled_at = now(), updated_at = now()
    WHERE id = subscription;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription % does not exist', subscription USING ERRCODE = 'no_data_found';
    END IF;
    WITH killed AS (
        UPDATE public.outbox_deliveries AS d
        SET state = 'dead', locked_by = NULL, last_error = 'subscription disabled: ' || reason
        WHERE d.subscription_id = subscription AND d.state <> 'dead'
        RETURNING d.event_id, d.attempts
    ),
    per_event AS (
        SELECT k.event_id, count(*)::integer AS n FROM killed AS k GROUP BY k.event_id
    ),
    rollup AS (
        UPDATE public.outbox_events AS e
        SET pending_deliveries = e.pending_deliveries - p.n,
            dead_deliveries = e.dead_deliveries + p.n,
            attempts = e.max_attempts,
            updated_at = now()
        FROM per_event AS p
        WHERE e.id = p.event_id
        RETURNING e.id
    ),
    acks AS (
        INSERT INTO public.event_acknowledgments AS a
            (event_id, user_id, tenant, processor, status, processed_at, metadata, source)
        SELECT k.event_id, s.user_id, s.tenant, s.processor, 'failed', now(),
               jsonb_build_object('subscription_id', s.id, 'attempts', k.attempts,
                                  'webhook_id', 'msg_' || k.event_id || '_' || s.id,
                                  'error', 'subscription disabled: ' || reason),
               'relay'
        FROM killed AS k JOIN public.outbox_subscriptions AS s ON s.id = subscription
        ON CONFLICT (event_id, user_id) DO UPDATE
            SET status = excluded.status, processor = excluded.processor, processed_at = excluded.processed_at,
                metadata = excluded.metadata, updated_at = now()
            WHERE a.source = 'relay'
        RETURNING a.id
    )
    SELECT count(*)::integer INTO n FROM killed;
    RETURN n;
END
$fn$;

-- Replay. Candidates are events after after_event_id (a cursor, so a call never picks up its own
-- work again), in id order, at most batch_size of them, filtered by tenant, event-type patterns,
-- creation time and subscriptions (NULL = no filter).
--   mode 'dead':      dead deliveries are queued again with fresh attempts;
--   mode 'delivered': events with no delivery for a subscription (delivered before, or older than the
--                     subscription) get a new one: this is how history is re-sent.
-- Requeued deliveries of ordered subscriptions join their lane (ready at its head, else waiting).
-- Returns how many deliveries were queued and the last event id looked at (NULL when none: done).
CREATE FUNCTION public.outbox_replay(
    mode text, subscription_ids bigint[], tenant_name text, type_patterns text[],
    created_from timestamptz, created_to timestamptz, after_event_id bigint, batch_size integer,
    OUT queued integer, OUT last_event_id bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF mode NOT IN ('dead', 'delivered') THEN
        RAISE EXCEPTION 'replay mode must be dead or delivered' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(7411201005);

    CREATE TEMP TABLE IF NOT EXISTS outbox_replay_batch (
        delivery_id bigint, event_id bigint, subscription_id bigint, lane bigint, ordering text
    ) ON COMMIT DROP;
    TRUNCATE outbox_replay_batch;

    SELECT max(e.id) INTO last_event_id FROM (
        SELECT e.id FROM public.outbox_events AS e
        WHERE e.id > after_event_id AND e.fanned_out_at IS NOT NULL
          AND (tenant_name IS NULL OR e.tenant = tenant_name)
          AND (type_patterns IS NULL OR public.outbox_event_type_matches(type_patterns, e.event_type))
          AND (created_from IS NULL OR e.created_at >= created_from)
          AND (created_to IS NULL OR e.created_at < created_to)
        ORDER BY e.id LIMIT batch_size
    ) AS e;
    IF last_event_id IS NULL THEN
        queued := 0;
        RETURN;
    END IF;

    IF mode = 'dead' THEN
        INSERT INTO outbox_replay_batch
        SELECT d.id, d.event_id, d.subscription_id, d.lane, s.ordering
        FROM public.outbox_deliveries AS d
        JOIN public.outbox_events AS e ON e.id = d.event_id
        JOIN public.outbox_subscriptions AS s ON s.id = d.subscription_id
        WHERE d.state = 'dead' AND e.id > after_event_id AND e.id <= last_event_id
          AND (tenant_name IS NULL OR e.tenant = tenant_name)
          AND (type_patterns IS NULL OR public.outbox_event_type_matches(type_patterns, e.event_type))
          AND (created_from IS NULL OR e.created_at >= created_from)
          AND (created_to IS NULL OR e.created_at < created_to)
          AND (subscription_ids IS NULL OR d.subscription_id = ANY (subscription_ids));
    ELSE
        INSERT INTO outbox_replay_batch
        SELECT NULL, e.id, s.id, public.outbox_lane(e.aggregate_type, e.aggregate_id), s.ordering
        FROM public.outbox_events AS e
        JOIN public.outbox_subscriptions AS s
          ON s.tenant = e.tenant AND public.outbox_event_type_matches(s.event_types, e.event_type)
        WHERE e.id > after_event_id AND e.id <= last_event_id AND e.fanned_out_at IS NOT NULL
          AND (tenant_name IS NULL OR e.tenant = tenant_name)
          AND (type_patterns IS NULL OR public.outbox_event_type_matches(type_patterns, e.event_type))
          AND (created_from IS NULL OR e.created_at >= created_from)
          AND (created_to IS NULL OR e.created_at < created_to)
          AND (subscription_ids IS NULL OR s.id = ANY (subscription_ids))
          AND (subscription_ids IS NOT NULL OR s.enabled)
          AND NOT EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = e.id AND d.subscription_id = s.id);
    END IF;

    -- Ready at the head of its lane, waiting behind live deliveries (or earlier ones of this batch).
    WITH ranked AS (
        SELECT b.*, row_number() OVER (PARTITION BY b.subscription_id, b.lane ORDER BY b.event_id) AS rn
        FROM outbox_replay_batch AS b
    ),
    decided AS (
        SELECT r.*, CASE
                WHEN r.ordering = 'none' THEN 'ready'
                WHEN r.rn = 1 AND NOT EXISTS (
                    SELECT 1 FROM public.outbox_deliveries AS d
                    WHERE d.subscription_id = r.subscription_id AND d.lane = r.lane AND d.state <> 'dead')
                THEN 'ready' ELSE 'waiting' END::public.outbox_delivery_state AS new_state
        FROM ranked AS r
    ),
    requeued AS (
        UPDATE public.outbox_deliveries AS d
        SET state = x.new_state, attempts = 0, next_attempt_at = now(), locked_by = NULL, last_error = NULL, last_status = NULL
        FROM decided AS x
        WHERE x.delivery_id IS NOT NULL AND d.id = x.delivery_id
        RETURNING d.event_id
    ),
    created AS (
        INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state)
        SELECT x.event_id, x.subscription_id, x.lane, x.new_state FROM decided AS x WHERE x.delivery_id IS NULL
        ORDER BY x.event_id
        RETURNING event_id
    ),
    per_event AS (
        SELECT event_id, count(*)::integer AS n, bool_or(was_dead) AS was_dead FROM (
            SELECT event_id, true AS was_dead FROM requeued
            UNION ALL SELECT event_id, false FROM created
        ) AS u GROUP BY event_id
    ),
    rollup AS (
        UPDATE public.outbox_events AS e
        SET pending_deliveries = e.pending_deliveries + p.n,
            dead_deliveries = CASE WHEN p.was_dead THEN e.dead_deliveries - p.n ELSE e.dead_deliveries END,
            attempts = CASE WHEN p.was_dead AND e.dead_deliveries - p.n = 0 THEN 0 ELSE e.attempts END,
            processed_at = NULL,
            updated_at = now()
        FROM per_event AS p
        WHERE e.id = p.event_id
        RETURNING e.id
    )
    SELECT coalesce(sum(p.n), 0)::integer INTO queued FROM per_event AS p;
END
$fn$;

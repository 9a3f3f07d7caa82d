-- 020: replay locks the events it chooses, and a delivery it queues again is aged from that moment.
--
-- Retention deletes processed events older than RETENTION_DAYS, row by row with FOR UPDATE SKIP
-- LOCKED. `replay --delivered` chose such an event, wrote its new delivery and only then marked the
-- event pending again: retention running in between (while replay waited on a lock, say) deleted the
-- event and its acknowledgment, and replay reported the delivery queued. The relay then dropped the
-- orphaned delivery at its claim (014): a replay lost without a word (a helper's review reproduced
-- it; the ops-retention test "retention does not delete an event that replay is sending again" does
-- too). Replay now locks its candidate events first (FOR UPDATE), so retention passes them over.
-- Relay outcomes and fan-out, which also update events, take the lane lock before any row, as
-- replay does, so the order of locks is the same everywhere.
--
-- The lag (`status` LAG and outbox_relay_oldest_pending_age_seconds) ages a live delivery from its
-- created_at, the moment it was queued. A dead delivery that `replay` queued again kept the
-- created_at of its first fan-out, so replaying last month's dead deliveries showed a month of lag
-- until they were sent (a helper's review reproduced it: 2,592,000 s after replaying a 30-day-old
-- dead delivery). The requeue now sets created_at = now(), as the new deliveries of
-- `replay --delivered` have it. Nothing else reads a delivery's created_at.
-- Otherwise outbox_replay is 006's.

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
        FOR UPDATE OF e
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

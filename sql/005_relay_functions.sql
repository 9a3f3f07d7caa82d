-- 005: the relay's set-based operations, one function each, so that each is one round trip and holds
-- its locks for exactly one transaction.
--
-- Locking protocol of the ordering lanes (invariant 4). A delivery of an ordered subscription is
-- 'ready' only at the head of its lane (subscription, aggregate); the rest wait. Fan-out decides
-- "head or waiting" by looking for live deliveries in the lane, and completion promotes the next one
-- when the head finishes. If the two interleaved, fan-out could see a head that completion is deleting
-- and queue a new delivery behind it that nobody promotes. So fan-out (and replay, and disable) hold
-- an exclusive transaction advisory lock, and completions that finish ordered deliveries hold it
-- shared: completions still run side by side, fan-out never overlaps one. Key: 7411201005.

-- Does an event type match a subscription's filter? Exact names and '*' wildcards; empty = all.
CREATE FUNCTION public.outbox_event_type_matches(patterns text[], event_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT cardinality(patterns) = 0 OR EXISTS (
        SELECT 1 FROM unnest(patterns) AS p
        WHERE event_type LIKE replace(replace(replace(p, '\', '\\'), '_', '\_'), '*', '%'))
$$;

-- The ordering lane of an aggregate: a 64-bit hash (a collision merely orders two aggregates together).
CREATE FUNCTION public.outbox_lane(aggregate_type text, aggregate_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT hashtextextended(length(aggregate_type)::text || ':' || aggregate_type || aggregate_id, 0)
$$;

-- Fan-out: up to batch_size new events, oldest first, each to every enabled subscription of its tenant
-- whose filter matches. An event nothing matches is processed at once. Returns how many events were
-- fanned out (batch_size means: call again).
CREATE FUNCTION public.outbox_fan_out(batch_size integer, max_attempts integer) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7411201005);
    WITH ev AS (
        SELECT e.id, e.tenant, e.event_type, e.aggregate_type, e.aggregate_id
        FROM public.outbox_events AS e
        WHERE e.fanned_out_at IS NULL
        ORDER BY e.id
        LIMIT batch_size
    ),
    m AS (
        SELECT ev.id AS event_id, s.id AS subscription_id, s.ordering,
               public.outbox_lane(ev.aggregate_type, ev.aggregate_id) AS lane
        FROM ev
        JOIN public.outbox_subscriptions AS s
          ON s.tenant = ev.tenant AND s.enabled AND public.outbox_event_type_matches(s.event_types, ev.event_type)
    ),
    ranked AS (
        SELECT m.*, row_number() OVER (PARTITION BY m.subscription_id, m.lane ORDER BY m.event_id) AS rn
        FROM m
    ),
    ins AS (
        INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state)
        SELECT r.event_id, r.subscription_id, r.lane,
               CASE
                   WHEN r.ordering = 'none' THEN 'ready'
                   WHEN r.rn = 1 AND NOT EXISTS (
                       SELECT 1 FROM public.outbox_deliveries AS d
                       WHERE d.subscription_id = r.subscription_id AND d.lane = r.lane AND d.state <> 'dead')
                   THEN 'ready'
                   ELSE 'waiting'
               END::public.outbox_delivery_state
        FROM ranked AS r
        ORDER BY r.event_id
    ),
    counts AS (
        SELECT m.event_id, count(*)::integer AS n FROM m GROUP BY m.event_id
    )
    UPDATE public.outbox_events AS e
    SET fanned_out_at = now(),
        max_attempts = outbox_fan_out.max_attempts,
        pending_deliveries = coalesce(c.n, 0),
        processed_at = CASE WHEN c.n IS NULL THEN now() END,
        updated_at = now()
    FROM ev LEFT JOIN counts AS c ON c.event_id = ev.id
    WHERE e.id = ev.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

-- Claim: for each subscription, up to its free capacity of due ready deliveries (oldest due first),
-- leased to worker until now() + lease_ms; each claim counts as an attempt. Returns what to send.
CREATE FUNCTION public.outbox_claim(subscription_ids bigint[], capacities integer[], lease_ms integer, worker text)
RETURNS TABLE (
    delivery_id bigint, event_id bigint, subscription_id bigint, attempt integer, max_attempts integer,
    tenant text, event_type text, aggregate_id text, aggregate_type text, payload text, created_at text
)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH c AS (
        SELECT x.id
        FROM unnest(subscription_ids, capacities) AS s(sub, cap)
        CROSS JOIN LATERAL (
            SELECT d.id FROM public.outbox_deliveries AS d
            WHERE d.subscription_id = s.sub AND d.state = 'ready' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT s.cap
            FOR UPDATE SKIP LOCKED
        ) AS x
    )
    UPDATE public.outbox_deliveries AS d
    SET attempts = d.attempts + 1,
        next_attempt_at = now() + lease_ms * interval '1 millisecond',
        locked_by = worker,
        last_attempt_at = now()
    FROM c, public.outbox_events AS e
    WHERE d.id = c.id AND e.id = d.event_id
    RETURNING d.id, d.event_id, d.subscription_id, d.attempts, e.max_attempts,
              e.tenant::text, e.event_type::text, e.aggregate_id, e.aggregate_type::text, e.payload::text,
              to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- When the earliest ready delivery of these subscriptions falls due (a retry, or a lease that ends).
CREATE FUNCTION public.outbox_next_due(subscription_ids bigint[]) RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT min(n.next_at) FROM unnest(subscription_ids) AS s(sub)
    CROSS JOIN LATERAL (
        SELECT d.next_attempt_at AS next_at FROM public.outbox_deliveries AS d
        WHERE d.subscription_id = s.sub AND d.state = 'ready'
        ORDER BY d.next_attempt_at LIMIT 1
    ) AS n
$$;

-- Records a batch of attempt outcomes, fenced by (worker, attempt) so that a replica whose lease
-- expired cannot overwrite the work of the replica that took over. Outcomes:
--   ok    delivered: the delivery is removed, the acknowledgment written as 'processed';
--   retry failed, tries again after delay_ms;
--   dead  out of attempts: kept as dead, the acknowledgment written as 'failed';
--   gone  410 Gone: the subscription is disabled, the delivery kept (the attempt is not counted).
-- The event rolls up in the same transaction (attempts, counters, processed_at), so the seed's
-- monitoring queries stay true; a 'pull' acknowledgment of the user is never overwritten.
-- Returns how many outcomes applied (the rest were fenced off).
CREATE FUNCTION public.outbox_complete(
    worker text, delivery_ids bigint[], attempt_numbers integer[], outcomes text[], http_statuses integer[],
    errors text[], delays_ms bigint[], durations_ms integer[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    applied   integer;
    lane_subs bigint[];
    lane_ids  bigint[];
BEGIN
    IF EXISTS (
        SELECT 1 FROM unnest(delivery_ids, outcomes) AS i(id, outcome)
        JOIN public.outbox_deliveries AS d ON d.id = i.id
        JOIN public.outbox_subscriptions AS s ON s.id = d.subscription_id
        WHERE i.outcome IN ('ok', 'dead') AND s.ordering = 'aggregate'
    ) THEN
        PERFORM pg_advisory_xact_lock_shared(7411201005);
    END IF;

    WITH input AS (
        SELECT DISTINCT ON (i.id) i.*
        FROM unnest(delivery_ids, attempt_numbers, outcomes, http_statuses, errors, delays_ms, durations_ms)
            AS i(id, attempt, outcome, http_status, error, delay_ms, duration_ms)
        ORDER BY i.id
    ),
    target AS (
        SELECT d.id, d.event_id, d.subscription_id, d.lane, i.attempt, i.outcome, i.http_status, i.error,
               i.delay_ms, i.duration_ms, s.ordering
        FROM public.outbox_deliveries AS d
        JOIN input AS i ON i.id = d.id
        JOIN public.outbox_subscriptions AS s ON s.id = d.subscription_id
        WHERE d.attempts = i.attempt AND d.locked_by = worker AND d.state = 'ready'
        FOR UPDATE OF d
    ),
    delivered AS (
        DELETE FROM public.outbox_deliveries AS d USING target AS t
        WHERE d.id = t.id AND t.outcome = 'ok'
        RETURNING d.id
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
        WHERE d.id = t.id AND t.outcome IN ('retry', 'dead', 'gone')
        RETURNING d.id
    ),
    gone AS (
        UPDATE public.outbox_subscriptions AS s
        SET enabled = false, disabled_reason = 'receiver answered 410 Gone', disabled_at = now(), updated_at = now()
        WHERE s.id IN (SELECT t.subscription_id FROM target AS t WHERE t.outcome = 'gone') AND s.enabled
        RETURNING s.id
    ),
    per_event AS (
        SELECT t.event_id,
               max(t.attempt) FILTER (WHERE t.outcome <> 'gone') AS max_attempt,
               count(*) FILTER (WHERE t.outcome IN ('ok', 'dead'))::integer AS finished,
               count(*) FILTER (WHERE t.outcome = 'dead')::integer AS died
        FROM target AS t GROUP BY t.event_id
    ),
    rollup AS (
        UPDATE public.outbox_events AS e
        SET attempts = CASE WHEN p.died > 0 OR e.dead_deliveries > 0 THEN e.max_attempts
                            ELSE greatest(e.attempts, coalesce(p.max_attempt, 0)) END,
            pending_deliveries = e.pending_deliveries - p.finished,
            dead_deliveries = e.dead_deliveries + p.died,
            processed_at = CASE WHEN e.pending_deliveries - p.finished = 0 AND e.dead_deliveries + p.died = 0
                                THEN coalesce(e.processed_at, now()) ELSE e.processed_at END,
            updated_at = now()
        FROM per_event AS p
        WHERE e.id = p.event_id
        RETURNING e.id
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
        RETURNING a.id
    )
    SELECT count(*)::integer,
           array_agg(t.subscription_id) FILTER (WHERE t.outcome IN ('ok', 'dead') AND t.ordering = 'aggregate'),
           array_agg(t.lane) FILTER (WHERE t.outcome IN ('ok', 'dead') AND t.ordering = 'aggregate')
      INTO applied, lane_subs, lane_ids
    FROM target AS t;

    -- A new statement sees the deletes above: promote each finished lane's next delivery.
    IF lane_subs IS NOT NULL THEN
        PERFORM public.outbox_promote_lanes(lane_subs, lane_ids);
    END IF;
    RETURN applied;
END
$fn$;

-- In each given lane, the oldest live delivery becomes ready if it is waiting. Callers hold the lane
-- lock (shared) so that no fan-out runs concurrently.
CREATE FUNCTION public.outbox_promote_lanes(subscription_ids bigint[], lanes bigint[]) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n integer;
BEGIN
    UPDATE public.outbox_deliveries AS d
    SET state = 'ready', next_attempt_at = now()
    FROM (
        SELECT h.id, h.state
        FROM (SELECT DISTINCT u.subscription_id, u.lane FROM unnest(subscription_ids, lanes) AS u(subscription_id, lane)) AS l
        CROSS JOIN LATERAL (
            SELECT x.id, x.state FROM public.outbox_deliveries AS x
            WHERE x.subscription_id = l.subscription_id AND x.lane = l.lane AND x.state <> 'dead'
            ORDER BY x.event_id LIMIT 1
        ) AS h
    ) AS head
    WHERE d.id = head.id AND head.state = 'waiting';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

-- Gives back leases a stopping relay did not use: the deliveries are due again at once, and an
-- attempt that was never sent is not counted.
CREATE FUNCTION public.outbox_release(worker text, delivery_ids bigint[], attempt_numbers integer[], uncount boolean[])
RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH r AS (
        UPDATE public.outbox_deliveries AS d
        SET next_attempt_at = now(),
            locked_by = NULL,
            attempts = CASE WHEN i.unsent THEN greatest(d.attempts - 1, 0) ELSE d.attempts END
        FROM unnest(delivery_ids, attempt_numbers, uncount) AS i(id, attempt, unsent)
        WHERE d.id = i.id AND d.attempts = i.attempt AND d.locked_by = worker AND d.state = 'ready'
        RETURNING 1
    )
    SELECT count(*)::integer FROM r
$$;

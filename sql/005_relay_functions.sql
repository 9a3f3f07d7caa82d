-- 005: the relay's set-based operations, one function each, so that each is one round trip and holds
-- its locks for exactly one transaction.
--
-- Locking protocol (invariant 4). A delivery of an ordered subscription is 'ready' only at the head of
-- its lane (subscription, aggregate); the rest wait. Fan-out decides "head or waiting" by looking for
-- live deliveries in the lane, and completion promotes the next one when the head finishes. If the two
-- interleaved, fan-out could see a head that a completion is deleting and queue a new delivery behind
-- it that nobody promotes. So fan-out (and replay, and disable) hold an exclusive transaction advisory
-- lock, and completions hold it shared: completions run side by side, fan-out never overlaps one.
-- Key: 7411201005.

-- Does an event type match a subscription's filter? Exact names and '*' wildcards; empty = all.
-- (For replay; fan-out compares with the subscription's precomputed event_likes instead, per row.)
CREATE FUNCTION public.outbox_event_type_matches(patterns text[], event_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT cardinality(patterns) = 0 OR event_type LIKE ANY (public.outbox_like_patterns(patterns))
$$;

-- Called per row by fan-out, so it has no SET clause (a function with one cannot be inlined and
-- costs a full call per row); every name in it is schema-qualified instead.
-- The ordering lane of an aggregate: a 64-bit hash (a collision merely orders two aggregates together).
CREATE FUNCTION public.outbox_lane(aggregate_type text, aggregate_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT pg_catalog.hashtextextended(
        pg_catalog.length(aggregate_type)::pg_catalog.text OPERATOR(pg_catalog.||) ':'
            OPERATOR(pg_catalog.||) aggregate_type OPERATOR(pg_catalog.||) aggregate_id, 0)
$$;

-- The event fields a webhook body is made of (the payload as PostgreSQL renders it).
CREATE TYPE public.outbox_claimed AS (
    event_id bigint, subscription_id bigint, attempt integer, max_attempts integer,
    tenant text, event_type text, aggregate_id text, aggregate_type text, payload text, created_at text
);

-- Claim: for each subscription, up to its capacity of due ready deliveries (oldest due first), leased
-- to worker until now() + that subscription's lease (the relay sizes it from the subscription's
-- timeout); each claim counts as an attempt.
CREATE FUNCTION public.outbox_claim(subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text)
RETURNS SETOF public.outbox_claimed
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH c AS (
        SELECT x.event_id, x.subscription_id, s.lease
        FROM unnest(subscription_ids, capacities, leases_ms) AS s(sub, cap, lease)
        CROSS JOIN LATERAL (
            SELECT d.event_id, d.subscription_id FROM public.outbox_deliveries AS d
            WHERE d.subscription_id = s.sub AND d.state = 'ready' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT greatest(s.cap, 0)
            FOR UPDATE SKIP LOCKED
        ) AS x
    )
    UPDATE public.outbox_deliveries AS d
    SET attempts = d.attempts + 1,
        next_attempt_at = now() + c.lease * interval '1 millisecond',
        locked_by = worker,
        last_attempt_at = now()
    FROM c, public.outbox_events AS e
    WHERE d.event_id = c.event_id AND d.subscription_id = c.subscription_id AND e.id = d.event_id
    RETURNING d.event_id, d.subscription_id, d.attempts, e.max_attempts,
              e.tenant::text, e.event_type::text, e.aggregate_id, e.aggregate_type::text, e.payload::text,
              to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- One relay round trip: fan out up to batch_size new events (oldest first) to every enabled
-- subscription of their tenant whose filter matches, leasing at once what fits the caller's free
-- capacity (a fresh delivery is inserted already claimed: one write instead of two), then claim due
-- deliveries with the capacity left. An event nothing matches is processed at once.
-- Returns the leased deliveries, then one summary row (event_id NULL) whose max_attempts column holds
-- how many events were fanned out (batch_size means: call again).
CREATE FUNCTION public.outbox_poll(batch_size integer, subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Key lookups only: never let a stale estimate turn one into a scan of a large table.
SET enable_seqscan = off
AS $fn$
DECLARE
    fanned_ids bigint[];
    leased     public.outbox_claimed[];
    n_fanned   integer := 0;
    caps_left  integer[] := capacities;
BEGIN
    IF EXISTS (SELECT 1 FROM public.outbox_fanout_queue) THEN
        PERFORM pg_advisory_xact_lock(7411201005);
        WITH q AS (
            DELETE FROM public.outbox_fanout_queue AS q
            WHERE q.event_id IN (SELECT f.event_id FROM public.outbox_fanout_queue AS f ORDER BY f.event_id LIMIT batch_size)
            RETURNING q.event_id
        ),
        ev AS (
            SELECT e.id, e.tenant, e.event_type, e.aggregate_type, e.aggregate_id
            FROM q JOIN public.outbox_events AS e ON e.id = q.event_id
        ),
        m AS (
            SELECT ev.id AS event_id, s.id AS subscription_id,
                   CASE WHEN s.ordering = 'aggregate' THEN public.outbox_lane(ev.aggregate_type, ev.aggregate_id) END AS lane
            FROM ev
            JOIN public.outbox_subscriptions AS s
              ON s.tenant = ev.tenant AND s.enabled
             AND (cardinality(s.event_likes) = 0 OR ev.event_type LIKE ANY (s.event_likes))
        ),
        decided AS (
            SELECT m.event_id, m.subscription_id, m.lane,
                   m.lane IS NULL OR (
                       row_number() OVER (PARTITION BY m.subscription_id, m.lane ORDER BY m.event_id) = 1
                       AND NOT EXISTS (
                           SELECT 1 FROM public.outbox_deliveries AS d
                           WHERE d.subscription_id = m.subscription_id AND d.lane = m.lane AND d.state <> 'dead')
                   ) AS is_ready
            FROM m
        ),
        leasing AS (
            SELECT x.*, x.is_ready AND row_number() OVER (PARTITION BY x.subscription_id, x.is_ready ORDER BY x.event_id)
                        <= coalesce(c.cap, 0) AS leased, c.lease
            FROM decided AS x
            LEFT JOIN unnest(subscription_ids, capacities, leases_ms) AS c(sub, cap, lease) ON c.sub = x.subscription_id
        ),
        ins AS (
            INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state, attempts, next_attempt_at, locked_by, last_attempt_at)
            SELECT l.event_id, l.subscription_id, l.lane,
                   CASE WHEN l.is_ready THEN 'ready' ELSE 'waiting' END::public.outbox_delivery_state,
                   CASE WHEN l.leased THEN 1 ELSE 0 END,
                   CASE WHEN l.leased THEN now() + l.lease * interval '1 millisecond' ELSE now() END,
                   CASE WHEN l.leased THEN worker END,
                   CASE WHEN l.leased THEN now() END
            FROM leasing AS l
            ORDER BY l.event_id, l.subscription_id
            RETURNING 1
        ),
        unmatched AS (
            UPDATE public.outbox_events AS e
            SET processed_at = now(), updated_at = now()
            FROM ev
            WHERE e.id = ev.id AND NOT EXISTS (SELECT 1 FROM m WHERE m.event_id = ev.id)
            RETURNING 1
        )
        SELECT array_agg(q.event_id) INTO fanned_ids FROM q;
        n_fanned := coalesce(cardinality(fanned_ids), 0);
    END IF;

    IF n_fanned > 0 THEN
        -- What fan-out leased to us: this transaction's now() tells them apart. Looked up by key from
        -- the fanned ids (no state test, and OFFSET 0 keeps the lookup per id: see outbox_complete).
        SELECT array_agg(ROW(d.event_id, d.subscription_id, d.attempts, e.max_attempts,
                   e.tenant::text, e.event_type::text, e.aggregate_id, e.aggregate_type::text, e.payload::text,
                   to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))::public.outbox_claimed
                   ORDER BY d.event_id)
          INTO leased
        FROM unnest(fanned_ids) AS f(id)
        CROSS JOIN LATERAL (
            SELECT x.event_id, x.subscription_id, x.attempts, x.locked_by, x.last_attempt_at
            FROM public.outbox_deliveries AS x WHERE x.event_id = f.id
            OFFSET 0
        ) AS d
        JOIN public.outbox_events AS e ON e.id = d.event_id
        WHERE d.locked_by = worker AND d.last_attempt_at = now();

        IF leased IS NOT NULL THEN
            RETURN QUERY SELECT * FROM unnest(leased);
            SELECT array_agg(greatest(c.cap - coalesce(l.n, 0), 0)::integer ORDER BY c.ord) INTO caps_left
            FROM unnest(subscription_ids, capacities) WITH ORDINALITY AS c(sub, cap, ord)
            LEFT JOIN (SELECT p.subscription_id AS sub, count(*) AS n FROM unnest(leased) AS p GROUP BY 1) AS l ON l.sub = c.sub;
        END IF;
    END IF;

    IF cardinality(subscription_ids) > 0 THEN
        RETURN QUERY SELECT * FROM public.outbox_claim(subscription_ids, caps_left, leases_ms, worker);
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::integer, n_fanned, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text;
END
$fn$;

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
-- The event rolls up in the same transaction: attempts (the most any delivery made; max_attempts once
-- one is dead, so the seed's queries count it failed) and processed_at (when no delivery is left).
-- A 'pull' acknowledgment of the user is never overwritten. Returns how many outcomes applied.
CREATE FUNCTION public.outbox_complete(
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
    siblings AS (
        SELECT e.id FROM public.outbox_events AS e
        WHERE e.id IN (
            SELECT t.event_id FROM target AS t
            WHERE t.outcome IN ('ok', 'dead') AND EXISTS (
                SELECT 1 FROM public.outbox_deliveries AS o WHERE o.event_id = t.event_id AND o.subscription_id <> t.subscription_id))
        ORDER BY e.id
        FOR UPDATE
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

-- In each given lane, the oldest live delivery becomes ready if it is waiting. Callers hold the lane
-- lock (shared at least) so that no fan-out runs concurrently.
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
        SELECT h.event_id, h.subscription_id, h.state
        FROM (SELECT DISTINCT u.subscription_id, u.lane FROM unnest(subscription_ids, lanes) AS u(subscription_id, lane)) AS l
        CROSS JOIN LATERAL (
            SELECT x.event_id, x.subscription_id, x.state FROM public.outbox_deliveries AS x
            WHERE x.subscription_id = l.subscription_id AND x.lane = l.lane AND x.state <> 'dead'
            ORDER BY x.event_id LIMIT 1
        ) AS h
    ) AS head
    WHERE d.event_id = head.event_id AND d.subscription_id = head.subscription_id AND head.state = 'waiting';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

-- Gives back leases a stopping relay did not use: the deliveries are due again at once, and an
-- attempt that was never sent is not counted.
CREATE FUNCTION public.outbox_release(worker text, event_ids bigint[], subscription_ids bigint[], attempt_numbers integer[], uncount boolean[])
RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH r AS (
        UPDATE public.outbox_deliveries AS d
        SET next_attempt_at = now(),
            locked_by = NULL,
            attempts = CASE WHEN i.unsent THEN greatest(d.attempts - 1, 0) ELSE d.attempts END
        FROM unnest(event_ids, subscription_ids, attempt_numbers, uncount) AS i(event_id, subscription_id, attempt, unsent)
        WHERE d.event_id = i.event_id AND d.subscription_id = i.subscription_id
          AND d.attempts = i.attempt AND d.locked_by = worker AND d.state = 'ready'
        RETURNING 1
    )
    SELECT count(*)::integer FROM r
$$;

-- 012: the fan-out is driven by its batch's keys, so that one plan fits every batch, and outbox_poll
-- reuses its statements' plans on each connection (generic plans) instead of planning every call.
--
-- 011 made PostgreSQL plan outbox_poll's statements on every call, because a generic plan made on
-- near-empty tables joined the batch to the outbox tables in ways that read them whole. But planning
-- the fan-out statement costs more than running it for a small batch, and a poll is on the path of
-- every idle delivery and of every round under load: a poll that fans out one event took 1.29-1.38 ms
-- with plans made per call and 0.76-0.78 ms with this function's generic plans (pgbench, PostgreSQL 15,
-- alternating runs). A 1,000-event fan-out (one subscription, ordering none) from a 200,000-event
-- backlog took 12.4-13.0 ms, against 26-76 ms with 011's statements and plans made per call.
--
-- The statements leave the planner no join whose cost grows with a table:
--   * the batch is read off the queue's primary key in order (ORDER BY ... LIMIT), then deleted by
--     key (= ANY of the ids), instead of a semi-join between the queue and itself;
--   * the events are fetched by key (= ANY of the ids), for fan-out and for marking unmatched events
--     processed, instead of joins to outbox_events;
--   * no join between two batch-sized inputs either, since a generic plan may make it a nested loop
--     (batch x batch): an event is unmatched when no subscription matches it (a per-event probe of
--     the subscriptions' index), and capacities and leases are read by position in the arrays;
--   * the lane test was already a correlated subquery (in a select list) on the lane index;
--   * what fan-out leased is looked up per id, the delivery and then its event (LATERAL ... OFFSET 0).
-- So generic plans are forced here (`auto` would keep planning every call whenever it expects a
-- generic plan to cost more, which it may for a one-element array); outbox_claim below likewise.
-- The warm-then-backlog test of 011 checks that a connection whose plans were made on a near-empty
-- outbox fans out a backlog touching no more buffers than a new one, and (auto_explain) that no plan
-- node of a 200-event fan-out or claim over 40,000-row tables handles more than 1,000 rows.
CREATE OR REPLACE FUNCTION public.outbox_poll(batch_size integer, subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Key lookups only: never let a stale estimate turn one into a scan of a large table.
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    batch_ids  bigint[];
    fanned_ids bigint[];
    leased     public.outbox_claimed[];
    n_fanned   integer := 0;
    caps_left  integer[] := capacities;
    r          record;
BEGIN
    IF EXISTS (SELECT 1 FROM public.outbox_fanout_queue) THEN
        PERFORM pg_advisory_xact_lock(7411201005);
        -- Only fan-out deletes from the queue, under the lock above, so the batch read here is still
        -- queued when the next statement deletes it.
        SELECT array_agg(f.event_id) INTO batch_ids
        FROM (SELECT f.event_id FROM public.outbox_fanout_queue AS f ORDER BY f.event_id LIMIT batch_size) AS f;

        WITH q AS (
            DELETE FROM public.outbox_fanout_queue AS q
            WHERE q.event_id = ANY (batch_ids)
            RETURNING q.event_id
        ),
        ev AS (
            SELECT e.id, e.tenant, e.event_type, e.aggregate_type, e.aggregate_id
            FROM public.outbox_events AS e
            WHERE e.id = ANY (batch_ids)
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
        -- Each subscription's capacity and lease by its position in the arrays: a join with them
        -- would be a nested loop under a generic plan (rows x subscriptions).
        leasing AS (
            SELECT x.*, x.is_ready AND row_number() OVER (PARTITION BY x.subscription_id, x.is_ready ORDER BY x.event_id)
                        <= coalesce(capacities[x.pos], 0) AS leased, leases_ms[x.pos] AS lease
            FROM (SELECT y.*, array_position(subscription_ids, y.subscription_id) AS pos FROM decided AS y) AS x
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
        -- Events no subscription matches (the test of m, per event on the subscriptions' index: an
        -- anti-join with m was a nested loop under a generic plan, batch x batch rows).
        unmatched AS (
            UPDATE public.outbox_events AS e
            SET processed_at = now(), updated_at = now()
            WHERE e.id = ANY (batch_ids)
              AND NOT EXISTS (
                  SELECT 1 FROM public.outbox_subscriptions AS s
                  WHERE s.tenant = e.tenant AND s.enabled
                    AND (cardinality(s.event_likes) = 0 OR e.event_type LIKE ANY (s.event_likes)))
            RETURNING 1
        )
        SELECT array_agg(q.event_id) INTO fanned_ids FROM q;
        n_fanned := coalesce(cardinality(fanned_ids), 0);
    END IF;

    IF n_fanned > 0 THEN
        -- What fan-out leased to us: this transaction's now() tells them apart. Looked up by key from
        -- the fanned ids, the delivery first and then its event (no state test, and OFFSET 0 keeps
        -- each lookup per id: see outbox_complete).
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
        CROSS JOIN LATERAL (
            SELECT y.max_attempts, y.tenant, y.event_type, y.aggregate_id, y.aggregate_type, y.payload, y.created_at
            FROM public.outbox_events AS y WHERE y.id = d.event_id
            OFFSET 0
        ) AS e
        WHERE d.locked_by = worker AND d.last_attempt_at = now();

        IF leased IS NOT NULL THEN
            RETURN QUERY SELECT * FROM unnest(leased);
            -- What is left of each subscription's capacity, by position (no join: see leasing).
            FOR r IN SELECT array_position(subscription_ids, p.subscription_id) AS pos, count(*)::integer AS n
                     FROM unnest(leased) AS p GROUP BY 1 LOOP
                IF r.pos IS NOT NULL THEN
                    caps_left[r.pos] := greatest(caps_left[r.pos] - r.n, 0);
                END IF;
            END LOOP;
        END IF;
    END IF;

    IF cardinality(subscription_ids) > 0 THEN
        RETURN QUERY SELECT * FROM public.outbox_claim(subscription_ids, caps_left, leases_ms, worker);
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::integer, n_fanned, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text;
END
$fn$;

-- The claim, keyed the same way. The due deliveries are found and locked per subscription on the claim
-- index (as in 010); the update reaches them by the row addresses just locked (ctid = ANY of an array:
-- a TID scan), where a join by key let a generic plan hash the whole queue (seen: a full scan of its
-- primary key for a 30-row claim); the events are looked up per claimed row. With `auto`, PostgreSQL
-- kept planning this statement on every call (it expected a generic plan to cost more): a poll with
-- nothing to fan out or claim took 0.49-0.55 ms, and 0.09-0.10 ms with generic plans (pgbench,
-- PostgreSQL 15). Each row's lease comes from its subscription's position in the arrays, so nothing
-- is joined to the locked rows (a generic plan may make any join a nested loop: claimed x claimed).
-- A row locked in a version newer than the statement's snapshot (another transaction changed it and
-- committed meanwhile) is not found by its address and is left for the next claim: it stays due and
-- is not returned, so nothing is lost and nothing is sent without its lease.
CREATE OR REPLACE FUNCTION public.outbox_claim(subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY
    WITH c AS (
        SELECT x.tid
        FROM unnest(subscription_ids, capacities) AS s(sub, cap)
        CROSS JOIN LATERAL (
            SELECT d.ctid AS tid FROM public.outbox_deliveries AS d
            WHERE d.subscription_id = s.sub AND d.state = 'ready' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT greatest(s.cap, 0)
            FOR UPDATE SKIP LOCKED
        ) AS x
    ),
    claimed AS (
        UPDATE public.outbox_deliveries AS d
        SET attempts = d.attempts + 1,
            next_attempt_at = now() + leases_ms[array_position(subscription_ids, d.subscription_id)] * interval '1 millisecond',
            locked_by = worker,
            last_attempt_at = now()
        WHERE d.ctid = ANY (ARRAY(SELECT c.tid FROM c))
          -- A delivery whose event is gone is not leased (as with 010's join), per row by key.
          AND EXISTS (SELECT 1 FROM public.outbox_events AS y WHERE y.id = d.event_id OFFSET 0)
        RETURNING d.event_id, d.subscription_id, d.attempts
    )
    SELECT k.event_id, k.subscription_id, k.attempts, e.max_attempts,
           e.tenant::text, e.event_type::text, e.aggregate_id, e.aggregate_type::text, e.payload::text,
           to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
    FROM claimed AS k
    CROSS JOIN LATERAL (
        SELECT y.max_attempts, y.tenant, y.event_type, y.aggregate_id, y.aggregate_type, y.payload, y.created_at
        FROM public.outbox_events AS y WHERE y.id = k.event_id
        OFFSET 0
    ) AS e;
END
$fn$;

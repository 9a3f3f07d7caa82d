-- 014: a claim removes the due deliveries whose event no longer exists, instead of locking and
-- skipping them on every claim.
--
-- Deliveries have no foreign key to their event (002: its checks would lock the event row on every
-- insert). So a DELETE of event rows by hand, or retention deleting a processed event while a replay
-- gives it a new delivery, can leave deliveries without an event. outbox_claim (012) locked such a
-- delivery and then did not lease it (its EXISTS test), so it stayed due and ready: every later claim
-- took it again, first, within the subscription's capacity. With as many orphans as the relay asks
-- for (twice max_in_flight), nothing more of that subscription was ever claimed, and outbox_next_due
-- kept answering "due now" (a poll every few milliseconds). The relay-retries test "a delivery whose
-- event was deleted" shows it: two orphans and max_in_flight 1 held back four of six events for good.
--
-- Such a delivery can never be sent (there is nothing to send), nor replayed or removed by retention
-- (both start from the event), so the claim deletes it: the rows it locked and did not lease, by their
-- addresses (a TID scan, as the UPDATE) and the same per-row test of the event's key.
--
-- A deleted delivery may be the head of an ordering lane, with the aggregate's later deliveries
-- waiting behind it; only a recorded outcome promoted the next one (outbox_complete), so the claim
-- now promotes those lanes itself, in a second statement (it sees the deletion) under the lane lock
-- taken shared, as outbox_complete does (see 005). The lock is taken only when such a lane exists,
-- after the rows were locked: a concurrent disable or replay (exclusive lock, then row locks) could
-- then deadlock with it, which PostgreSQL detects and the relay retries; taking it on every claim
-- would make every claim wait for every other replica's fan-out instead. A fan-out that saw the
-- deleted head as live queued its deliveries as waiting and committed before the lock was granted,
-- so the promotion (a new snapshot) sees them. The relay-retries test covers a lane whose head is
-- such a delivery.
--
-- The leased rows are collected first and their events looked up per row after that (as 012 did in
-- one statement). Whether a locked delivery's event exists is looked up once per row, on the primary
-- key (see live below), for both the UPDATE and the DELETE. Otherwise outbox_claim is 012's, and
-- its results are the same.

CREATE OR REPLACE FUNCTION public.outbox_claim(subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    ev_ids       bigint[];
    ev_subs      bigint[];
    ev_attempts  integer[];
    orphan_subs  bigint[];
    orphan_lanes bigint[];
BEGIN
    WITH c AS (
        SELECT x.tid, x.event_id, sb.tenant
        FROM unnest(subscription_ids, capacities) AS s(sub, cap)
        JOIN public.outbox_subscriptions AS sb ON sb.id = s.sub
        CROSS JOIN LATERAL (
            SELECT d.ctid AS tid, d.event_id FROM public.outbox_deliveries AS d
            WHERE d.subscription_id = s.sub AND d.state = 'ready' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT greatest(s.cap, 0)
            FOR UPDATE SKIP LOCKED
        ) AS x
    ),
    -- Whether each locked delivery's event exists, one lookup per row by tenant and id. By id alone
    -- (012's EXISTS), a plan made on tables analysed while empty used idx_outbox_tenant_id (tenant,
    -- id) with the id as a mere filter: the whole index once per row (a 60-row claim beside 200,000
    -- events took 14 ms, and 146 ms when the lookup also read the row; 1.9 ms like this, PostgreSQL
    -- 15, autovacuum off). With the tenant, both that index and the primary key are point lookups. A delivery's event always has its subscription's
    -- tenant (fan-out and replay match on it); one that does not must never be sent, and goes as an
    -- orphan.
    live AS (
        SELECT c.tid, e.id IS NOT NULL AS alive
        FROM c
        LEFT JOIN LATERAL (
            SELECT y.id FROM public.outbox_events AS y WHERE y.tenant = c.tenant AND y.id = c.event_id
            OFFSET 0
        ) AS e ON true
    ),
    claimed AS (
        UPDATE public.outbox_deliveries AS d
        SET attempts = d.attempts + 1,
            next_attempt_at = now() + leases_ms[array_position(subscription_ids, d.subscription_id)] * interval '1 millisecond',
            locked_by = worker,
            last_attempt_at = now()
        WHERE d.ctid = ANY (ARRAY(SELECT l.tid FROM live AS l WHERE l.alive))
        RETURNING d.event_id, d.subscription_id, d.attempts
    ),
    -- The rows locked above whose event is gone, by the same addresses.
    orphaned AS (
        DELETE FROM public.outbox_deliveries AS d
        WHERE d.ctid = ANY (ARRAY(SELECT l.tid FROM live AS l WHERE NOT l.alive))
        RETURNING d.subscription_id, d.lane
    )
    SELECT (SELECT array_agg(k.event_id) FROM claimed AS k),
           (SELECT array_agg(k.subscription_id) FROM claimed AS k),
           (SELECT array_agg(k.attempts) FROM claimed AS k),
           (SELECT array_agg(o.subscription_id) FROM orphaned AS o WHERE o.lane IS NOT NULL),
           (SELECT array_agg(o.lane) FROM orphaned AS o WHERE o.lane IS NOT NULL)
      INTO ev_ids, ev_subs, ev_attempts, orphan_subs, orphan_lanes;

    IF orphan_subs IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock_shared(7411201005);
        PERFORM public.outbox_promote_lanes(orphan_subs, orphan_lanes);
    END IF;

    IF ev_ids IS NOT NULL THEN
        RETURN QUERY
        SELECT k.event_id, k.subscription_id, k.attempts, e.max_attempts,
               e.tenant::text, e.event_type::text, e.aggregate_id, e.aggregate_type::text, e.payload::text,
               to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
        FROM unnest(ev_ids, ev_subs, ev_attempts) AS k(event_id, subscription_id, attempts)
        JOIN public.outbox_subscriptions AS sb ON sb.id = k.subscription_id
        CROSS JOIN LATERAL (
            SELECT y.max_attempts, y.tenant, y.event_type, y.aggregate_id, y.aggregate_type, y.payload, y.created_at
            FROM public.outbox_events AS y WHERE y.tenant = sb.tenant AND y.id = k.event_id
            OFFSET 0
        ) AS e;
    END IF;
END
$fn$;

-- 010: the relay's hot functions stop planning their statements on every call. Same statements, same
-- results as 005_relay_functions.sql; measured on PostgreSQL 15 with one event at a time (server
-- log durations, medians): a poll that fans out and claims one event 1.3 -> 0.8 ms, an empty poll
-- 0.6 -> 0.2 ms, an outcome 1.35 -> 0.84 ms; commit-to-receiver 3.1 -> 2.4 ms.
--
-- * outbox_claim in PL/pgSQL. A SQL-language function that cannot be inlined (it has SET clauses and
--   writes) is planned again on every call before PostgreSQL 18; outbox_poll calls it on every
--   round, so every claim paid about 0.4 ms of planning for about 0.01 ms of work when little is due.
-- * outbox_poll and outbox_complete use generic plans from the first call. PL/pgSQL caches a plan
--   per statement, but with the default plan_cache_mode it keeps re-planning custom plans whenever it
--   estimates a generic one to be dearer, which is what these large statements over arrays of
--   unknown size get. Their plans do not depend on the values: every table is reached by key
--   (enable_seqscan is off in both), so re-planning bought nothing.
CREATE OR REPLACE FUNCTION public.outbox_claim(subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
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
    ),
    claimed AS (
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
    )
    SELECT * FROM claimed;
END
$fn$;

ALTER FUNCTION public.outbox_poll(integer, bigint[], integer[], integer[], text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION public.outbox_complete(text, bigint[], bigint[], integer[], text[], integer[], text[], bigint[], integer[])
    SET plan_cache_mode = force_generic_plan;

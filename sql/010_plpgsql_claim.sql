-- 010: outbox_claim in PL/pgSQL, which keeps its statement prepared per connection (with the default
-- plan_cache_mode it still chooses between custom and generic plans by cost). A SQL-language function
-- that cannot be inlined (it has SET clauses and writes) is parsed, analysed and planned again on
-- every call before PostgreSQL 18; outbox_poll calls it on every round, so every claim paid about
-- 0.4 ms of that for about 0.01 ms of work when little is due (auto_explain on PostgreSQL 15; an empty
-- poll went from about 0.85 to 0.4 ms in psql). Same statement, same results as 005_relay_functions.sql.
--
-- Tried and not done: forcing generic plans on outbox_poll and outbox_complete. It made a poll with
-- one event 1.3 -> 0.8 ms, but a fan-out of 1,000 events from a 200,000-event backlog 14 -> 45 ms,
-- and a backlog drain collapsed from about 2,300 to 42 deliveries/s: their custom plans do depend on
-- the batch size and the arrays' lengths.
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


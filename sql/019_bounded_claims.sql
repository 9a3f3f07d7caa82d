-- 019: a relay's claims are bounded in payload bytes, not only in deliveries.
--
-- A relay holds every delivery it leased with its payload until the request is done: up to
-- 2 x max_in_flight per subscription (src/relay/relay.ts). With rows of megabytes that is hundreds
-- of megabytes: on the development machine, 2 MB rows with one subscription at the default 32
-- slots took a relay to about 500 MB RSS, and under a 160 MB heap limit it aborted. A relay killed
-- that way (a container's memory limit) restarts, claims the same rows again once their leases run
-- out, and dies again, each time counting an attempt.
--
-- outbox_poll_bounded is outbox_poll (013, 017) with a byte budget: it returns leased deliveries in
-- outbox_poll's order while their payloads (octet_length of the text sent) fit in max_bytes, always
-- at least one (a payload larger than the budget still goes, alone), and gives the rest back at
-- once as outbox_release does for a lease never used (no attempt counted, due again now). The
-- summary row (event_id NULL, last) carries in `attempt` how many were given back, so that the relay
-- knows the subscription has more waiting. The budget is applied set-based (a running sum), not in a
-- loop over the rows. The relay passes its budget less what it holds (RELAY_BUFFER_BYTES). Only ready lane heads are leased, so giving any of them back keeps order.
-- Nothing changes for payloads of ordinary size: the budget is then never reached.
CREATE FUNCTION public.outbox_poll_bounded(batch_size integer, subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text, max_bytes bigint)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- As outbox_poll: plans kept per connection (PL/pgSQL, see 010) and generic.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    kept        public.outbox_claimed[];
    back_events bigint[];
    back_subs   bigint[];
    back_tries  integer[];
BEGIN
    WITH p AS MATERIALIZED (
        SELECT x.*, x.ordinality AS n
        FROM public.outbox_poll(batch_size, subscription_ids, capacities, leases_ms, worker) WITH ORDINALITY AS x
    ),
    -- Payload bytes up to and including each leased row, in outbox_poll's order; the first leased
    -- row always stays (a payload larger than the budget still goes, alone).
    s AS MATERIALIZED (
        SELECT p.*, (p.n = min(p.n) FILTER (WHERE p.event_id IS NOT NULL) OVER ()) AS first,
               sum(coalesce(octet_length(p.payload), 0)) OVER (ORDER BY p.n) AS upto
        FROM p
    )
    SELECT array_agg(ROW(s.event_id, s.subscription_id, s.attempt, s.max_attempts, s.tenant, s.event_type,
                         s.aggregate_id, s.aggregate_type, s.payload, s.created_at)::public.outbox_claimed ORDER BY s.n)
             FILTER (WHERE s.event_id IS NULL OR s.first OR s.upto <= max_bytes),
           array_agg(s.event_id ORDER BY s.n) FILTER (WHERE s.event_id IS NOT NULL AND NOT s.first AND s.upto > max_bytes),
           array_agg(s.subscription_id ORDER BY s.n) FILTER (WHERE s.event_id IS NOT NULL AND NOT s.first AND s.upto > max_bytes),
           array_agg(s.attempt ORDER BY s.n) FILTER (WHERE s.event_id IS NOT NULL AND NOT s.first AND s.upto > max_bytes)
      INTO kept, back_events, back_subs, back_tries
    FROM s;

    -- A statement of its own: it must see the leases outbox_poll just wrote (the statement above
    -- could not: its snapshot predates them).
    IF back_events IS NOT NULL THEN
        PERFORM public.outbox_release(worker, back_events, back_subs, back_tries,
                                      array_fill(true, ARRAY[cardinality(back_events)]));
    END IF;

    RETURN QUERY
    SELECT k.event_id, k.subscription_id,
           CASE WHEN k.event_id IS NULL THEN coalesce(cardinality(back_events), 0) ELSE k.attempt END,
           k.max_attempts, k.tenant, k.event_type, k.aggregate_id, k.aggregate_type, k.payload, k.created_at
    FROM unnest(kept) AS k;
END
$fn$;

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
-- knows the subscription has more waiting. The relay passes its budget less what it holds
-- (RELAY_BUFFER_BYTES). The leases over the budget go back in a statement of their own: it must see
-- the leases outbox_poll just wrote, which one statement beside the call could not (its snapshot
-- predates them). A loop over the rows, because it copies each row once (the set-based form, an
-- array of the rows unnested, copied them twice and cost more in throughput pairs). Only ready lane
-- heads are leased, so giving any of them back keeps order. Nothing changes for payloads of
-- ordinary size: the budget is then never reached.
CREATE FUNCTION public.outbox_poll_bounded(batch_size integer, subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text, max_bytes bigint)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r            public.outbox_claimed;
    held         bigint := 0;
    taken        integer := 0;
    back_events  bigint[] := '{}';
    back_subs    bigint[] := '{}';
    back_tries   integer[] := '{}';
BEGIN
    FOR r IN SELECT * FROM public.outbox_poll(batch_size, subscription_ids, capacities, leases_ms, worker) LOOP
        IF r.event_id IS NULL THEN
            -- The summary row, always last.
            r.attempt := cardinality(back_events);
            RETURN NEXT r;
        ELSIF taken = 0 OR held + octet_length(r.payload) <= max_bytes THEN
            held := held + octet_length(r.payload);
            taken := taken + 1;
            RETURN NEXT r;
        ELSE
            back_events := back_events || r.event_id;
            back_subs := back_subs || r.subscription_id;
            back_tries := back_tries || r.attempt;
        END IF;
    END LOOP;
    IF cardinality(back_events) > 0 THEN
        PERFORM public.outbox_release(worker, back_events, back_subs, back_tries,
                                      array_fill(true, ARRAY[cardinality(back_events)]));
    END IF;
END
$fn$;

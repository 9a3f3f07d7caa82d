-- 019: a relay's claims are bounded in payload bytes, not only in deliveries.
--
-- A relay holds every delivery it leased with its payload until the request is done: up to
-- 2 x max_in_flight per subscription (src/relay/relay.ts). With rows of megabytes that is hundreds
-- of megabytes: on the development machine, 2 MB rows with one subscription at the default 32
-- slots took a relay to about 500 MB RSS, and under a 160 MB heap limit it aborted. A relay killed
-- that way (a container's memory limit) restarts, claims the same rows again once their leases run
-- out, and dies again, each time counting an attempt.
--
-- outbox_poll_bounded is outbox_poll (013, 017) with a byte budget per subscription: rooms[i] is
-- what subscription_ids[i] may still take on (the relay gives each active subscription an equal
-- share of RELAY_BUFFER_BYTES, less what it holds for it). In outbox_poll's order, a subscription's
-- leased deliveries are kept while their payloads (octet_length of the text sent) fit its room,
-- always its first one (a payload larger than the room still goes, alone), and the rest go back at
-- once as outbox_release does for a lease never used (no attempt counted, due again now). Per
-- subscription, so that one receiver holding large payloads never takes another's room (a shared
-- budget let one tenant's slow receiver stop every other tenant: a helper's review reproduced it).
-- The summary row (event_id NULL, last) carries in `attempt` how many went back, so that the relay
-- knows more is waiting. The release is a statement of its own: it must see the leases outbox_poll
-- just wrote, which one statement beside the call could not (its snapshot predates them). A loop
-- over the rows copies each row once (a set-based form, the rows as an array unnested, copied them
-- twice and cost more in throughput pairs). Only ready lane heads are leased, so giving any of them
-- back keeps order. With payloads of ordinary size no room is ever reached; RELAY_BUFFER_BYTES=0
-- makes the relay call outbox_poll itself.
CREATE FUNCTION public.outbox_poll_bounded(batch_size integer, subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text, rooms bigint[])
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r            public.outbox_claimed;
    pos          integer;
    held         bigint[] := array_fill(0::bigint, ARRAY[greatest(cardinality(subscription_ids), 1)]);
    taken        integer[] := array_fill(0, ARRAY[greatest(cardinality(subscription_ids), 1)]);
    back_events  bigint[] := '{}';
    back_subs    bigint[] := '{}';
    back_tries   integer[] := '{}';
BEGIN
    FOR r IN SELECT * FROM public.outbox_poll(batch_size, subscription_ids, capacities, leases_ms, worker) LOOP
        IF r.event_id IS NULL THEN
            -- The summary row, always last.
            r.attempt := cardinality(back_events);
            RETURN NEXT r;
            CONTINUE;
        END IF;
        pos := array_position(subscription_ids, r.subscription_id);
        IF pos IS NULL OR taken[pos] = 0 OR held[pos] + octet_length(r.payload) <= rooms[pos] THEN
            IF pos IS NOT NULL THEN
                held[pos] := held[pos] + octet_length(r.payload);
                taken[pos] := taken[pos] + 1;
            END IF;
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

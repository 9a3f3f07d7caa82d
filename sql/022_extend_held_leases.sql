-- 022: a relay keeps the leases of deliveries whose outcomes it holds but cannot record yet.
--
-- A relay records outcomes in batches (outbox_complete). When recording fails for longer than a
-- lease (the database refuses every outcome, e.g. an operator's constraint or trigger on
-- event_acknowledgments; or the batch keeps failing for another reason), the leases of the
-- deliveries it already sent ran out and they were claimed and sent again, by this relay or
-- another, every lease period, although their outcomes were only waiting to be written. While it
-- retries, the relay now pushes the lease end of what it holds forward with this function.
--
-- The fence is outbox_complete's and outbox_release's: the same attempt, still locked by this
-- worker, still ready. A delivery another replica has claimed since (its attempt changed) is left
-- alone. Rows locked by someone else (an outcome or a replay waiting on a lock) are skipped, not
-- waited for: a lease keepalive must never queue behind the very statement that is stuck. A lease
-- end is only ever moved forward. Returns how many leases were extended.
CREATE FUNCTION public.outbox_extend_leases(worker text, event_ids bigint[], subscription_ids bigint[], attempt_numbers integer[], lease_lengths_ms integer[])
RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH held AS (
        SELECT d.event_id, d.subscription_id, i.lease_ms
        FROM unnest(event_ids, subscription_ids, attempt_numbers, lease_lengths_ms) AS i(event_id, subscription_id, attempt, lease_ms)
        JOIN public.outbox_deliveries AS d ON d.event_id = i.event_id AND d.subscription_id = i.subscription_id
        WHERE d.attempts = i.attempt AND d.locked_by = worker AND d.state = 'ready'
        FOR NO KEY UPDATE OF d SKIP LOCKED
    ), extended AS (
        UPDATE public.outbox_deliveries AS d
        SET next_attempt_at = greatest(d.next_attempt_at, now() + held.lease_ms * interval '1 millisecond')
        FROM held
        WHERE d.event_id = held.event_id AND d.subscription_id = held.subscription_id
        RETURNING 1
    )
    SELECT count(*)::integer FROM extended
$$;

-- 016: removing a subscription (`outbox-relay subscriptions remove`).
--
-- Deliveries have no foreign key to their subscription, so a subscription deleted by hand left its
-- deliveries behind: its events stayed pending for ever, and a tenant's user could not subscribe
-- again under a corrected tenant or ordering except by SQL. Removal is an operator action on a
-- subscription that is disabled already (so no relay sends to it while it goes):
--   * what disable does to live deliveries is done again (a 410 Gone disables but keeps them
--     pending): they end as dead, their events roll up as failed, and the user gets a 'failed'
--     acknowledgment, exactly as outbox_disable_subscription does;
--   * then its deliveries, circuit states and secrets go, and the subscription itself. The user's
--     acknowledgments stay: they are the history of what was and was not delivered.
-- An event left with no delivery and a relay acknowledgment is one whose receivers are all gone: the
-- stranded-event sweep (015) never queues it again, and retention deletes it after
-- RETENTION_DEAD_DAYS like an event whose deliveries died (src/maintenance/retention.ts).
-- Returns how many deliveries were removed.
CREATE FUNCTION public.outbox_remove_subscription(subscription bigint) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    is_enabled boolean;
    n integer;
BEGIN
    -- The lane lock, exclusively (as disable and replay take it): no fan-out or outcome batch runs
    -- meanwhile.
    PERFORM pg_advisory_xact_lock(7411201005);
    SELECT s.enabled INTO is_enabled FROM public.outbox_subscriptions AS s WHERE s.id = subscription FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription % does not exist', subscription USING ERRCODE = 'no_data_found';
    END IF;
    IF is_enabled THEN
        RAISE EXCEPTION 'subscription % is enabled; disable it first', subscription USING ERRCODE = 'object_in_use';
    END IF;
    PERFORM public.outbox_disable_subscription(subscription, 'subscription removed');
    DELETE FROM public.outbox_deliveries AS d WHERE d.subscription_id = subscription;
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM public.outbox_circuit_states AS c WHERE c.subscription_id = subscription;
    DELETE FROM public.outbox_subscriptions AS s WHERE s.id = subscription; -- secrets: ON DELETE CASCADE
    RETURN n;
END
$fn$;

-- 015: events an application writes itself are delivered too.
--
-- Fan-out reads new events from public.outbox_fanout_queue, which the capture trigger fills in the
-- same statement as the events. An event inserted into public.outbox_events any other way (by the
-- application, or by a trigger in the style of the seed's create_outbox_event) had no queue entry:
-- it stayed pending for ever, and retention's dead-event rule (no live delivery, nothing queued)
-- deleted it after RETENTION_DEAD_DAYS without a single delivery attempt. Now:
--
-- * public.outbox_write_event(...) writes an event, its queue entry and (as the capture trigger
--   does) the wakeup in one call: the way for an application to write events. It runs as its owner,
--   so writers need EXECUTE on it (granted by name: see the README), no grants on the tables.
-- * public.outbox_requeue_stranded(...) queues unprocessed events that have neither a queue entry
--   nor any delivery ("stranded": only a write that bypassed both can make one), among the newest
--   `scan_limit` unprocessed events older than `min_age`. The relays call it at start and then every
--   minute, one replica at a time, so a plain INSERT is delivered within about a minute.
-- * retention's dead rule now needs a dead delivery (see src/maintenance/retention.ts).

CREATE OR REPLACE FUNCTION public.outbox_write_event(
    event_tenant text, event_type text, aggregate_type text, aggregate_id text, payload jsonb,
    dedupe_key text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    new_id bigint;
    notify boolean;
BEGIN
    IF event_tenant IS NULL OR event_type IS NULL OR aggregate_type IS NULL OR aggregate_id IS NULL OR payload IS NULL THEN
        RAISE EXCEPTION 'outbox_write_event: tenant, event_type, aggregate_type, aggregate_id and payload are required'
            USING ERRCODE = '22004';
    END IF;
    -- With a dedupe key that exists already, nothing is written and the result is NULL.
    INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, dedupe_key, max_attempts)
    VALUES (event_tenant, event_type, aggregate_id, aggregate_type, payload, dedupe_key,
            coalesce((SELECT s.max_attempts FROM public.outbox_relay_state AS s), 20))
    ON CONFLICT ON CONSTRAINT outbox_events_dedupe_key_key DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO public.outbox_fanout_queue (event_id) VALUES (new_id);
    SELECT coalesce((SELECT s.notify_mode = 'always' OR (s.notify_mode = 'idle' AND s.relay_idle) FROM public.outbox_relay_state AS s), true)
      INTO notify;
    IF notify THEN
        PERFORM pg_notify('outbox_wakeup', event_tenant || ':' || event_type);
    END IF;
    RETURN new_id;
END
$fn$;

-- Writing events for any tenant is a privilege: grant it by name (GRANT EXECUTE ... TO app_role).
REVOKE ALL ON FUNCTION public.outbox_write_event(text, text, text, text, jsonb, text) FROM PUBLIC;

COMMENT ON FUNCTION public.outbox_write_event(text, text, text, text, jsonb, text) IS
    'Writes an event with its fan-out queue entry and wakeup; returns its id, or NULL when dedupe_key exists already.';

CREATE OR REPLACE FUNCTION public.outbox_requeue_stranded(min_age interval, scan_limit integer)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n integer;
BEGIN
    -- One sweeper at a time; the others return at once.
    IF NOT pg_try_advisory_xact_lock(7411201008) THEN
        RETURN 0;
    END IF;
    -- The candidates come from the unprocessed events' partial index, newest first, bounded: a
    -- stranded event is found while it is among the newest scan_limit unprocessed ones. A snapshot
    -- never shows a captured event without its queue entry or its deliveries (fan-out swaps one for
    -- the other in one transaction, and marks an event nobody receives processed in it).
    WITH candidates AS (
        SELECT e.id FROM public.outbox_events AS e
        WHERE e.processed_at IS NULL AND e.created_at < now() - min_age
        ORDER BY e.created_at DESC
        LIMIT scan_limit
    ),
    stranded AS (
        SELECT c.id FROM candidates AS c
        WHERE NOT EXISTS (SELECT 1 FROM public.outbox_fanout_queue AS q WHERE q.event_id = c.id)
          AND NOT EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = c.id)
          -- Fanned out before (its deliveries removed by hand since): never send it again.
          AND NOT EXISTS (SELECT 1 FROM public.event_acknowledgments AS a WHERE a.event_id = c.id AND a.source = 'relay')
    ),
    queued AS (
        INSERT INTO public.outbox_fanout_queue (event_id)
        SELECT s.id FROM stranded AS s ORDER BY s.id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer INTO n FROM queued;
    IF n > 0 THEN
        PERFORM pg_notify('outbox_wakeup', 'stranded');
    END IF;
    RETURN n;
END
$fn$;

COMMENT ON FUNCTION public.outbox_requeue_stranded(interval, integer) IS
    'Queues for fan-out the unprocessed events with neither a queue entry nor a delivery (written around capture and outbox_write_event).';

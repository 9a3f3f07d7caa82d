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
-- * public.outbox_requeue_stranded(...) queues unprocessed events that have no queue entry, no
--   delivery and no relay acknowledgment ("stranded"). A write around capture and
--   outbox_write_event makes one; so do deliveries deleted by hand before any was acknowledged (their
--   event is then fanned out again, to the subscriptions enabled now). The relays call it at start
--   and then every minute, one replica at a time. A swept event is fanned out after any newer events
--   of its aggregate: per-aggregate order does not hold for it.
-- * retention's dead rule needs a dead delivery or an attempt (see src/maintenance/retention.ts):
--   an event never fanned out is not "dead".

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
    -- The names subscriptions and the pull API can match: a tenant is a schema name (as
    -- `subscriptions add` requires), an event type what the pull API's event_type filter accepts.
    IF event_tenant !~ '^[A-Za-z_][A-Za-z0-9_$]*$' OR octet_length(event_tenant) > 63 THEN
        RAISE EXCEPTION 'outbox_write_event: tenant % is not a plain schema name (letters, digits, "_" and "$", at most 63 bytes)', quote_literal(event_tenant)
            USING ERRCODE = '22023';
    END IF;
    IF event_type !~ '^[A-Za-z0-9_]{1,100}$' THEN
        RAISE EXCEPTION 'outbox_write_event: event_type % must be 1 to 100 letters, digits or "_"', quote_literal(event_type)
            USING ERRCODE = '22023';
    END IF;
    IF aggregate_type = '' OR aggregate_id = '' THEN
        RAISE EXCEPTION 'outbox_write_event: aggregate_type and aggregate_id must not be empty'
            USING ERRCODE = '22023';
    END IF;
    -- An empty key is no key (else the first event written with '' would swallow every later one).
    dedupe_key := nullif(dedupe_key, '');
    -- The pull API's roles are confined to one tenant by row-level security, which this function
    -- (running as its owner) would step around: they may not write events, even if granted.
    IF EXISTS (SELECT 1 FROM public.outbox_api_roles AS r WHERE r.role_name = session_user) THEN
        RAISE EXCEPTION 'outbox_write_event: % is a pull API role and may not write events', session_user
            USING ERRCODE = '42501';
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

-- The monitoring index of unprocessed events (001), keyed by (created_at, id) now, so that the
-- sweep's keyset walk is an index range scan: events of one transaction share created_at, and with
-- created_at alone a walk re-read a whole group of them at every sweep (250,000 rows read, 200 ms,
-- for 300,000 events written by one statement). Same name, same predicate, one more column: the
-- seed's monitoring query ("WHERE processed_at IS NULL ORDER BY created_at") uses it as before. On a
-- large existing table this rebuild blocks writes to outbox_events while it runs (see the README,
-- Upgrading).
DROP INDEX public.idx_outbox_unprocessed;
CREATE INDEX idx_outbox_unprocessed ON public.outbox_events (created_at, id) WHERE processed_at IS NULL;

-- The sweep. Candidates are unprocessed events older than min_age, from two bounded walks over the
-- unprocessed events' partial index: the newest scan_limit (a stranded event is queued within a
-- sweep of being written), and scan_limit after a cursor (after_created, after_id) kept by the
-- caller, so that over successive sweeps every unprocessed event is looked at, however large the
-- backlog (next_created/next_id: where the next sweep goes on; NULL when the walk reached the end
-- and starts again). Every test is a key probe per candidate (OFFSET 0 keeps each EXISTS a probe:
-- as an anti-join, a plan made on small tables hashed whole tables).
-- Each walk carries its rows' attempts, so no statement joins back to the events: a draft
-- did, its plan read far more than the walks, and fan-out (waiting for the lane lock) stalled
-- behind it for seconds (the ops-retention test saw no delivery during a cleanup). The relay also
-- runs it under a 5-second statement_timeout.
-- It holds the lane lock shared, so no fan-out or replay (both exclusive, and the only writers of
-- deliveries) runs meanwhile: its statements see their committed work, never half of it. Without
-- the lock, a sweep overlapping `replay --delivered` queued an event replay had just given a
-- delivery, and every later fan-out failed on the deliveries' primary key.
CREATE OR REPLACE FUNCTION public.outbox_requeue_stranded(
    min_age interval, scan_limit integer, after_created timestamptz, after_id bigint,
    OUT queued integer, OUT next_created timestamptz, OUT next_id bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
AS $fn$
DECLARE
    walked integer;
BEGIN
    queued := 0;
    -- One sweeper at a time; the others return at once (and keep their cursor).
    IF NOT pg_try_advisory_xact_lock(7411201008) THEN
        next_created := after_created;
        next_id := after_id;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(7411201005);

    WITH walk AS MATERIALIZED (
        SELECT e.id, e.created_at, e.attempts FROM public.outbox_events AS e
        WHERE e.processed_at IS NULL AND e.created_at < now() - min_age
          AND (after_created IS NULL OR (e.created_at, e.id) > (after_created, coalesce(after_id, 0)))
        ORDER BY e.created_at, e.id
        LIMIT scan_limit
    ),
    newest AS MATERIALIZED (
        SELECT e.id, e.attempts FROM public.outbox_events AS e
        WHERE e.processed_at IS NULL AND e.created_at < now() - min_age
        ORDER BY e.created_at DESC, e.id DESC
        LIMIT scan_limit
    ),
    -- Never tried: an outcome or a disable (and so a removal) sets attempts. The relay's own
    -- acknowledgment cannot tell, since it never overwrites one the user made by pull.
    candidates AS (
        SELECT w.id FROM walk AS w WHERE w.attempts = 0
        UNION
        SELECT n.id FROM newest AS n WHERE n.attempts = 0
    ),
    -- Stranded: no queue entry, no delivery in any state, never tried, and never acknowledged by a
    -- relay (an event fanned out before whose deliveries are gone, e.g. its subscription removed, is
    -- not sent again).
    stranded AS (
        SELECT c.id FROM candidates AS c
        WHERE NOT EXISTS (SELECT 1 FROM public.outbox_fanout_queue AS q WHERE q.event_id = c.id OFFSET 0)
          AND NOT EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = c.id OFFSET 0)
          AND NOT EXISTS (SELECT 1 FROM public.event_acknowledgments AS a WHERE a.event_id = c.id AND a.source = 'relay' OFFSET 0)
    ),
    inserted AS (
        INSERT INTO public.outbox_fanout_queue (event_id)
        SELECT s.id FROM stranded AS s ORDER BY s.id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*)::integer FROM inserted),
           (SELECT count(*)::integer FROM walk),
           (SELECT w.created_at FROM walk AS w ORDER BY w.created_at DESC, w.id DESC LIMIT 1),
           (SELECT w.id FROM walk AS w ORDER BY w.created_at DESC, w.id DESC LIMIT 1)
      INTO queued, walked, next_created, next_id;
    IF walked < scan_limit THEN
        next_created := NULL;
        next_id := NULL;
    END IF;
    IF queued > 0 THEN
        PERFORM pg_notify('outbox_wakeup', 'stranded');
    END IF;
END
$fn$;

COMMENT ON FUNCTION public.outbox_requeue_stranded(interval, integer, timestamptz, bigint) IS
    'Queues for fan-out the unprocessed events with neither a queue entry nor a delivery nor a relay acknowledgment (written around capture and outbox_write_event).';

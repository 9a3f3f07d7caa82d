-- 017: fan-out takes only events that were never fanned out; an event queued again is dropped from
-- the queue and nothing else happens.
--
-- Fan-out (013) trusted the queue: every queued event was fanned out to the subscriptions that
-- match it now. An event queued while it had been fanned out already (an INSERT into
-- outbox_fanout_queue by hand, a restored dump, a script that "requeues" a dead event the wrong
-- way) then did harm, depending on what its deliveries had become:
--   * one still there (retrying, waiting, dead): the INSERT broke the deliveries' primary key. The
--     whole batch was refused, at every poll, and with it every event queued behind it: nothing
--     more was fanned out or claimed, for any tenant, until someone found and deleted the queue row;
--   * one delivered (its row deleted): a new delivery, so the event was sent again, after later
--     events of its aggregate;
--   * all its subscriptions disabled since: marked processed as "matched by none", so a failed
--     event turned processed (and retention could delete it beside its dead deliveries).
-- Now an event with a delivery or a relay acknowledgment (every outcome and every disable writes
-- one) counts as fanned out, as the stranded sweep (015) counts it: it leaves the queue and is not
-- fanned out, marked or leased. `replay` is the way to send such an event again. Fan-out and replay
-- are the only writers of deliveries and both hold the lane lock (see 005), so what fan-out sees
-- here still holds when it inserts.
-- The relay-retries test "an event queued again" covers the three cases.
-- Otherwise outbox_poll is 013's.

CREATE OR REPLACE FUNCTION public.outbox_poll(batch_size integer, subscription_ids bigint[], capacities integer[], leases_ms integer[], worker text)
RETURNS SETOF public.outbox_claimed
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Key lookups only: never let a stale estimate turn one into a scan of a large table.
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    batch_ids     bigint[];
    fanned_ids    bigint[];
    leased        public.outbox_claimed[];
    n_fanned      integer := 0;
    unmatched_ids bigint[];
    n_unmatched   integer;
    n_left        integer;
    n_marked      integer;
    caps_left     integer[] := capacities;
    r             record;
BEGIN
    IF EXISTS (SELECT 1 FROM public.outbox_fanout_queue) THEN
        PERFORM pg_advisory_xact_lock(7411201005);
        -- Only fan-out deletes from the queue, under the lock above, so the batch read here is still
        -- queued when the next statement deletes it.
        SELECT array_agg(f.event_id) INTO batch_ids
        FROM (SELECT f.event_id FROM public.outbox_fanout_queue AS f ORDER BY f.event_id LIMIT batch_size) AS f;
    END IF;

    IF batch_ids IS NOT NULL THEN
        WITH q AS (
            DELETE FROM public.outbox_fanout_queue AS q
            WHERE q.event_id = ANY (batch_ids)
            RETURNING q.event_id
        ),
        ev AS MATERIALIZED (
            SELECT e.tid, e.id, e.tenant, e.event_type, e.aggregate_type, e.aggregate_id
            FROM unnest(batch_ids) AS b(id)
            CROSS JOIN LATERAL (
                SELECT x.ctid AS tid, x.id, x.tenant, x.event_type, x.aggregate_type, x.aggregate_id
                FROM public.outbox_events AS x WHERE x.id = b.id
                OFFSET 0
            ) AS e
            -- 017: only events never fanned out: no delivery and no relay acknowledgment (the
            -- stranded sweep's rule, 015). The others leave the queue and nothing else happens.
            -- Probes on the keys' leading column; OFFSET 0 keeps each a probe, never an anti-join.
            WHERE NOT EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = e.id OFFSET 0)
              AND NOT EXISTS (SELECT 1 FROM public.event_acknowledgments AS a WHERE a.event_id = e.id AND a.source = 'relay' OFFSET 0)
        ),
        -- Materialized, so that the lane probe below compares the lane index's columns with values
        -- (planned as parameters), not with the expression that computes them: with an expression,
        -- a plan made on empty tables chose the primary key for the probe (see the header).
        m AS MATERIALIZED (
            SELECT ev.id AS event_id, s.id AS subscription_id,
                   CASE WHEN s.ordering = 'aggregate' THEN public.outbox_lane(ev.aggregate_type, ev.aggregate_id) END AS lane
            FROM ev
            JOIN public.outbox_subscriptions AS s
              ON s.tenant = ev.tenant AND s.enabled
             AND (cardinality(s.event_likes) = 0 OR ev.event_type LIKE ANY (s.event_likes))
        ),
        decided AS (
            SELECT m.event_id, m.subscription_id, m.lane,
                   m.lane IS NULL OR (
                       row_number() OVER (PARTITION BY m.subscription_id, m.lane ORDER BY m.event_id) = 1
                       AND NOT EXISTS (
                           SELECT 1 FROM public.outbox_deliveries AS d
                           WHERE d.subscription_id = m.subscription_id AND d.lane = m.lane AND d.state <> 'dead'
                           OFFSET 0)
                   ) AS is_ready
            FROM m
        ),
        -- Each subscription's capacity and lease by its position in the arrays: a join with them
        -- would be a nested loop under a generic plan (rows x subscriptions).
        leasing AS (
            SELECT x.*, x.is_ready AND row_number() OVER (PARTITION BY x.subscription_id, x.is_ready ORDER BY x.event_id)
                        <= coalesce(capacities[x.pos], 0) AS leased, leases_ms[x.pos] AS lease
            FROM (SELECT y.*, array_position(subscription_ids, y.subscription_id) AS pos FROM decided AS y) AS x
        ),
        ins AS (
            INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state, attempts, next_attempt_at, locked_by, last_attempt_at)
            SELECT l.event_id, l.subscription_id, l.lane,
                   CASE WHEN l.is_ready THEN 'ready' ELSE 'waiting' END::public.outbox_delivery_state,
                   CASE WHEN l.leased THEN 1 ELSE 0 END,
                   CASE WHEN l.leased THEN now() + l.lease * interval '1 millisecond' ELSE now() END,
                   CASE WHEN l.leased THEN worker END,
                   CASE WHEN l.leased THEN now() END
            FROM leasing AS l
            ORDER BY l.event_id, l.subscription_id
            RETURNING 1
        ),
        -- Events no subscription matches (the test of m, per event on the subscriptions' index: an
        -- anti-join with m was a nested loop under a generic plan, batch x batch rows).
        um AS MATERIALIZED (
            SELECT ev.id, ev.tid FROM ev
            WHERE NOT EXISTS (
                SELECT 1 FROM public.outbox_subscriptions AS s
                WHERE s.tenant = ev.tenant AND s.enabled
                  AND (cardinality(s.event_likes) = 0 OR ev.event_type LIKE ANY (s.event_likes)))
        ),
        -- Updated by address (a TID scan), never by a plan that may scan the table for the ids.
        unmatched AS (
            UPDATE public.outbox_events AS e
            SET processed_at = now(), updated_at = now()
            WHERE e.ctid = ANY (ARRAY(SELECT um.tid FROM um))
            RETURNING 1
        )
        SELECT array_agg(q.event_id), (SELECT array_agg(um.id) FROM um), (SELECT count(*)::integer FROM unmatched)
          INTO fanned_ids, unmatched_ids, n_unmatched
        FROM q;

        -- An event row that another transaction updated since this statement's snapshot is not at
        -- that address any more: look the unmatched events up again, per id (a new statement sees
        -- their current addresses), and mark those still unprocessed, until none was skipped. Keyed
        -- like ev, and the processed_at test stays outside the lookup: with it inside, a plan made on
        -- empty tables scanned idx_outbox_unprocessed (every unprocessed event) with a filter, under
        -- the fan-out's lock.
        IF coalesce(cardinality(unmatched_ids), 0) > n_unmatched THEN
            LOOP
                WITH cur AS MATERIALIZED (
                    SELECT x.tid
                    FROM unnest(unmatched_ids) AS b(id)
                    CROSS JOIN LATERAL (
                        SELECT y.ctid AS tid, y.processed_at FROM public.outbox_events AS y WHERE y.id = b.id
                        OFFSET 0
                    ) AS x
                    WHERE x.processed_at IS NULL
                ),
                marked AS (
                    UPDATE public.outbox_events AS e
                    SET processed_at = now(), updated_at = now()
                    WHERE e.ctid = ANY (ARRAY(SELECT cur.tid FROM cur))
                    RETURNING 1
                )
                SELECT (SELECT count(*)::integer FROM cur), (SELECT count(*)::integer FROM marked)
                  INTO n_left, n_marked;
                EXIT WHEN n_marked >= n_left;
            END LOOP;
        END IF;
        n_fanned := coalesce(cardinality(fanned_ids), 0);
    END IF;

    IF n_fanned > 0 THEN
        -- What fan-out leased to us: this transaction's now() tells them apart. Looked up by key from
        -- the fanned ids, the delivery first and then its event (no state test, and OFFSET 0 keeps
        -- each lookup per id: see outbox_complete).
        SELECT array_agg(ROW(d.event_id, d.subscription_id, d.attempts, e.max_attempts,
                   e.tenant::text, e.event_type::text, e.aggregate_id, e.aggregate_type::text, e.payload::text,
                   to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))::public.outbox_claimed
                   ORDER BY d.event_id)
          INTO leased
        FROM unnest(fanned_ids) AS f(id)
        CROSS JOIN LATERAL (
            SELECT x.event_id, x.subscription_id, x.attempts, x.locked_by, x.last_attempt_at
            FROM public.outbox_deliveries AS x WHERE x.event_id = f.id
            OFFSET 0
        ) AS d
        CROSS JOIN LATERAL (
            SELECT y.max_attempts, y.tenant, y.event_type, y.aggregate_id, y.aggregate_type, y.payload, y.created_at
            FROM public.outbox_events AS y WHERE y.id = d.event_id
            OFFSET 0
        ) AS e
        WHERE d.locked_by = worker AND d.last_attempt_at = now();

        IF leased IS NOT NULL THEN
            RETURN QUERY SELECT * FROM unnest(leased);
            -- What is left of each subscription's capacity, by position (no join: see leasing).
            FOR r IN SELECT array_position(subscription_ids, p.subscription_id) AS pos, count(*)::integer AS n
                     FROM unnest(leased) AS p GROUP BY 1 LOOP
                IF r.pos IS NOT NULL THEN
                    caps_left[r.pos] := greatest(caps_left[r.pos] - r.n, 0);
                END IF;
            END LOOP;
        END IF;
    END IF;

    IF cardinality(subscription_ids) > 0 THEN
        RETURN QUERY SELECT * FROM public.outbox_claim(subscription_ids, caps_left, leases_ms, worker);
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::integer, n_fanned, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text;
END
$fn$;


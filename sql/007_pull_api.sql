-- 007: the pull API sidecar (`outbox-relay api`): its indexes, per-user pull cursors, and row-level
-- security that confines the sidecar's database role to one tenant (and one user) per request.
--
-- Who is confined: only roles registered in public.outbox_api_roles (`outbox-relay api create-role`
-- registers the role it creates). Every other role (the migrating owner, capture triggers running as
-- that owner, the relay's role, operators) sees and writes every row exactly as before this file.
-- A registered role sees only rows whose tenant equals the transaction-local setting `outbox.tenant`
-- (and, for acknowledgments and cursors, whose user equals `outbox.user`), which every statement of
-- the sidecar sets first (set_config(..., true) in outbox_api_begin below): a query that forgot its
-- tenant filter returns nothing of another tenant, and nothing at all when the settings are missing.
-- Superusers and BYPASSRLS roles skip row-level security altogether; `outbox-relay api` refuses to
-- start as one in production.

-- Hiding acknowledgments: the statuses that `exclude_acknowledged=true` hides ('failed' stays visible).
-- Spelled out wherever it is used (as IN ('processed', 'skipped', 'in_progress')) so that the partial
-- index below matches the queries.

-- A tenant's events in id order: pages in the default order, counts (index-only), the pull cursors'
-- scans and the acknowledgment's lookup. The only index this file adds to outbox_events, whose write
-- path stays lean: other orders and filters read this one (or the seed's) and filter.
CREATE INDEX idx_outbox_tenant_id ON public.outbox_events (tenant, id);
-- What a user has hidden: the anti-join of `exclude_acknowledged` probes it by (user, tenant, event)
-- and merges it in event order; index-only once vacuumed.
CREATE INDEX idx_event_ack_hidden ON public.event_acknowledgments (user_id, tenant, event_id)
    WHERE status IN ('processed', 'skipped', 'in_progress');

-- The database roles of the pull API in this database. Readable by everyone: the policies below look
-- themselves up here for whoever runs a query (role names are not secret).
CREATE TABLE public.outbox_api_roles (
    role_name name        PRIMARY KEY,
    added_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE public.outbox_api_roles IS 'outbox-relay: roles confined by row-level security to the tenant and user of the request (see `outbox-relay api create-role`).';
GRANT SELECT ON public.outbox_api_roles TO PUBLIC;

-- Per (tenant, user) pull cursor: a shortcut for `exclude_acknowledged=true`. Without it a user who has
-- acknowledged the oldest N events makes every poll skip those N rows again.
--   hidden_through: every event of the tenant with id <= hidden_through is hidden for the user (has a
--                   'processed', 'skipped' or 'in_progress' acknowledgment); queries start after it.
--   safe_through:   no event with id <= safe_through can still become visible (every transaction
--                   that could insert one has ended); hidden_through never passes it, because identity
--                   order is not commit order.
--   probe_*:        the settling probe that moves safe_through (see outbox_pull_advance).
-- Kept true when an acknowledgment stops hiding its event (status changed to 'failed', or deleted):
-- the triggers at the end of this file move hidden_through back.
CREATE TABLE public.outbox_pull_cursors (
    tenant         varchar(63) NOT NULL,
    user_id        integer     NOT NULL,
    hidden_through bigint      NOT NULL DEFAULT 0,
    safe_through   bigint      NOT NULL DEFAULT 0,
    probe_last_id  bigint      NULL,
    probe_read_at  timestamptz NULL,
    probe_xid      xid8        NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, user_id),
    CHECK (hidden_through <= safe_through)
);
COMMENT ON TABLE public.outbox_pull_cursors IS 'outbox-relay: per-user shortcut of the pull API''s exclude_acknowledged (every event up to hidden_through is hidden).';

-- Row-level security. Each table gets two permissive policies (a row is visible when either allows it):
-- "engine" allows everything to every role that is not a registered API role; "api" allows a
-- registered role its request's tenant (and user). The registry lookup is an uncorrelated subquery:
-- evaluated once per statement, not per row.
ALTER TABLE public.outbox_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.outbox_events FORCE ROW LEVEL SECURITY;
CREATE POLICY outbox_events_engine ON public.outbox_events AS PERMISSIVE FOR ALL TO PUBLIC
    USING (NOT EXISTS (SELECT 1 FROM public.outbox_api_roles AS r WHERE r.role_name = current_user))
    WITH CHECK (NOT EXISTS (SELECT 1 FROM public.outbox_api_roles AS r WHERE r.role_name = current_user));
-- Read only: the API never writes events.
CREATE POLICY outbox_events_api ON public.outbox_events AS PERMISSIVE FOR SELECT TO PUBLIC
    USING (tenant = current_setting('outbox.tenant', true));

ALTER TABLE public.event_acknowledgments ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.event_acknowledgments FORCE ROW LEVEL SECURITY;
CREATE POLICY event_acknowledgments_engine ON public.event_acknowledgments AS PERMISSIVE FOR ALL TO PUBLIC
    USING (NOT EXISTS (SELECT 1 FROM public.outbox_api_roles AS r WHERE r.role_name = current_user))
    WITH CHECK (NOT EXISTS (SELECT 1 FROM public.outbox_api_roles AS r WHERE r.role_name = current_user));
-- The request's user, in the request's tenant; what it writes is a 'pull' acknowledgment.
CREATE POLICY event_acknowledgments_api ON public.event_acknowledgments AS PERMISSIVE FOR ALL TO PUBLIC
    USING (tenant = current_setting('outbox.tenant', true)
           AND user_id::text = current_setting('outbox.user', true))
    WITH CHECK (tenant = current_setting('outbox.tenant', true)
                AND user_id::text = current_setting('outbox.user', true)
                AND source = 'pull');

ALTER TABLE public.outbox_pull_cursors ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.outbox_pull_cursors FORCE ROW LEVEL SECURITY;
CREATE POLICY outbox_pull_cursors_engine ON public.outbox_pull_cursors AS PERMISSIVE FOR ALL TO PUBLIC
    USING (NOT EXISTS (SELECT 1 FROM public.outbox_api_roles AS r WHERE r.role_name = current_user))
    WITH CHECK (NOT EXISTS (SELECT 1 FROM public.outbox_api_roles AS r WHERE r.role_name = current_user));
CREATE POLICY outbox_pull_cursors_api ON public.outbox_pull_cursors AS PERMISSIVE FOR ALL TO PUBLIC
    USING (tenant = current_setting('outbox.tenant', true)
           AND user_id::text = current_setting('outbox.user', true))
    WITH CHECK (tenant = current_setting('outbox.tenant', true)
                AND user_id::text = current_setting('outbox.user', true));

-- Starts a pull API statement: confines the current transaction to one tenant and user (the settings
-- the policies above read; transaction-local, so a pooled connection never carries them into the next
-- request) and returns them with the user's pull cursor (0 when there is none).
-- The sidecar calls it in the FROM clause of each statement and joins its query LATERALly to the
-- result, filtering by the returned tenant: a lateral reference makes PostgreSQL run this first, so
-- the settings are in place before any policy is evaluated, and a request is one round trip without
-- BEGIN and COMMIT. (Were the order ever different, the policies would see no settings and return
-- nothing: it fails closed.)
CREATE FUNCTION public.outbox_api_begin(p_tenant text, p_user integer,
                                        OUT tenant text, OUT user_id integer, OUT hidden_through bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM set_config('outbox.tenant', p_tenant, true), set_config('outbox.user', p_user::text, true);
    tenant := p_tenant;
    user_id := p_user;
    hidden_through := coalesce((SELECT c.hidden_through FROM public.outbox_pull_cursors AS c
                                WHERE c.tenant = p_tenant AND c.user_id = p_user), 0);
END
$fn$;

-- One step of a pull cursor, run by the sidecar in the background for users who poll with
-- exclude_acknowledged=true (as the caller, so row-level security applies). Returns the cursor's
-- hidden_through and whether another call right away would move it further.
--
-- Settling (safe_through): identity values are handed out before their transactions commit, so an
-- event with a small id can appear long after bigger ones. A probe reads the sequence's last value L
-- (step 1); at least settle_ms later it takes a transaction id X (step 2): every transaction that had
-- drawn an id <= L had an xid by then (capture draws ids after its statement's row change gave the
-- transaction one; a plain INSERT draws its id microseconds before), so its xid is < X. Once no
-- transaction older than X is running (step 3), none of the ids <= L can still appear: L is settled.
-- One step per call; a poller's cursor settles about two calls after its acknowledgments.
--
-- Hiding (hidden_through): up to `chunk` events after hidden_through (and up to safe_through) are
-- checked against the user's hiding acknowledgments; the cursor moves to just before the first event
-- that is not hidden. The cursor row is locked first (SKIP LOCKED: one advancer at a time), so an
-- acknowledgment that stops hiding an event either commits before this scan looks, or its trigger
-- (below) waits for this transaction and then moves the cursor back.
CREATE FUNCTION public.outbox_pull_advance(p_tenant text, p_user integer, settle_ms integer, chunk integer,
                                           OUT hidden_through bigint, OUT more boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    c          public.outbox_pull_cursors;
    scanned    integer;
    chunk_end  bigint;
    first_open bigint;
BEGIN
    more := false;
    INSERT INTO public.outbox_pull_cursors AS pc (tenant, user_id) VALUES (p_tenant, p_user) ON CONFLICT DO NOTHING;
    SELECT pc.* INTO c FROM public.outbox_pull_cursors AS pc
    WHERE pc.tenant = p_tenant AND pc.user_id = p_user
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        -- Another advancer holds it (or row-level security hides it: wrong settings). Nothing to do.
        hidden_through := NULL;
        RETURN;
    END IF;

    -- Settling: one step.
    IF c.probe_last_id IS NULL THEN
        SELECT coalesce(pg_sequence_last_value('public.outbox_events_id_seq'::regclass), 0), clock_timestamp()
          INTO c.probe_last_id, c.probe_read_at;
    ELSIF c.probe_xid IS NULL THEN
        IF now() >= c.probe_read_at + settle_ms * interval '1 millisecond' THEN
            c.probe_xid := pg_current_xact_id();
        END IF;
    ELSIF pg_snapshot_xmin(pg_current_snapshot()) >= c.probe_xid THEN
        c.safe_through := greatest(c.safe_through, c.probe_last_id);
        SELECT coalesce(pg_sequence_last_value('public.outbox_events_id_seq'::regclass), 0), clock_timestamp(), NULL::xid8
          INTO c.probe_last_id, c.probe_read_at, c.probe_xid;
    END IF;

    -- Hiding: one chunk.
    IF c.hidden_through < c.safe_through THEN
        -- Usually the next event is the one the user has not acknowledged yet: two index probes.
        SELECT e.id INTO first_open FROM public.outbox_events AS e
        WHERE e.tenant = p_tenant AND e.id > c.hidden_through AND e.id <= c.safe_through
        ORDER BY e.id LIMIT 1;
        IF first_open IS NULL THEN
            c.hidden_through := c.safe_through;
        ELSIF EXISTS (SELECT 1 FROM public.event_acknowledgments AS a
                      WHERE a.user_id = p_user AND a.tenant = p_tenant AND a.event_id = first_open
                        AND a.status IN ('processed', 'skipped', 'in_progress')) THEN
            first_open := NULL;
        ELSE
            c.hidden_through := first_open - 1;
        END IF;
    END IF;

    IF c.hidden_through < c.safe_through AND first_open IS NULL THEN
        SELECT count(*)::integer, max(x.id) INTO scanned, chunk_end
        FROM (SELECT e.id FROM public.outbox_events AS e
              WHERE e.tenant = p_tenant AND e.id > c.hidden_through AND e.id <= c.safe_through
              ORDER BY e.id LIMIT chunk) AS x;
        IF scanned > 0 THEN
            SELECT min(e.id) INTO first_open
            FROM public.outbox_events AS e
            WHERE e.tenant = p_tenant AND e.id > c.hidden_through AND e.id <= chunk_end
              AND NOT EXISTS (
                  SELECT 1 FROM public.event_acknowledgments AS a
                  WHERE a.user_id = p_user AND a.tenant = p_tenant AND a.event_id = e.id
                    AND a.status IN ('processed', 'skipped', 'in_progress')
                    AND a.event_id > c.hidden_through AND a.event_id <= chunk_end);
        END IF;
        IF first_open IS NOT NULL THEN
            c.hidden_through := first_open - 1;
        ELSIF scanned = chunk THEN
            c.hidden_through := chunk_end;
            more := true;
        ELSE
            c.hidden_through := c.safe_through;
        END IF;
    END IF;

    UPDATE public.outbox_pull_cursors AS pc
    SET hidden_through = c.hidden_through, safe_through = c.safe_through, probe_last_id = c.probe_last_id,
        probe_read_at = c.probe_read_at, probe_xid = c.probe_xid, updated_at = now()
    WHERE pc.tenant = p_tenant AND pc.user_id = p_user;
    hidden_through := c.hidden_through;
END
$fn$;

-- Moves pull cursors back before events whose acknowledgment stopped hiding them: changed to 'failed'
-- (a pull client, or a replayed delivery that died) or deleted by hand. Deleting an event (retention)
-- also deletes its acknowledgments; the event is gone, so nothing moves. Runs as the owner, whoever
-- changed the acknowledgment, once per statement.
CREATE FUNCTION public.outbox_pull_cursor_rewind() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        UPDATE public.outbox_pull_cursors AS c
        SET hidden_through = x.first_id - 1, updated_at = now()
        FROM (SELECT o.tenant, o.user_id, min(o.event_id) AS first_id
              FROM outbox_old AS o JOIN outbox_new AS n ON n.id = o.id
              WHERE o.status IN ('processed', 'skipped', 'in_progress')
                AND (n.status NOT IN ('processed', 'skipped', 'in_progress')
                     OR n.event_id <> o.event_id OR n.user_id <> o.user_id OR n.tenant <> o.tenant)
              GROUP BY o.tenant, o.user_id) AS x
        WHERE c.tenant = x.tenant AND c.user_id = x.user_id AND c.hidden_through >= x.first_id;
    ELSE
        UPDATE public.outbox_pull_cursors AS c
        SET hidden_through = x.first_id - 1, updated_at = now()
        FROM (SELECT o.tenant, o.user_id, min(o.event_id) AS first_id
              FROM outbox_old AS o
              WHERE o.status IN ('processed', 'skipped', 'in_progress')
                AND EXISTS (SELECT 1 FROM public.outbox_events AS e WHERE e.id = o.event_id)
              GROUP BY o.tenant, o.user_id) AS x
        WHERE c.tenant = x.tenant AND c.user_id = x.user_id AND c.hidden_through >= x.first_id;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER outbox_pull_cursor_rewind_update AFTER UPDATE ON public.event_acknowledgments
    REFERENCING OLD TABLE AS outbox_old NEW TABLE AS outbox_new
    FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_pull_cursor_rewind();
CREATE TRIGGER outbox_pull_cursor_rewind_delete AFTER DELETE ON public.event_acknowledgments
    REFERENCING OLD TABLE AS outbox_old
    FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_pull_cursor_rewind();

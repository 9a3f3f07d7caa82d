-- 001: the outbox log and the acknowledgment record, with the seed's columns, constraints and indexes
-- in PostgreSQL spelling. Widened where the seed's sizes would break real data: a tenant is a schema
-- name (up to 63 characters), an aggregate id is a primary key rendered as text (any length).

CREATE TYPE public.acknowledgment_status AS ENUM ('processed', 'failed', 'skipped', 'in_progress');

CREATE TABLE public.outbox_events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant         varchar(63)  NOT NULL,
    event_type     varchar(100) NOT NULL,
    aggregate_id   text         NOT NULL,
    aggregate_type varchar(100) NOT NULL,
    payload        jsonb        NOT NULL,

    -- Processing control, rolled up from the deliveries (see DESIGN.md): attempts is the most any
    -- delivery made, max_attempts is RETRY_MAX_ATTEMPTS when the event was captured, processed_at is
    -- set when every delivery succeeded (at once when no subscription matched).
    attempts       integer      NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts   integer      NOT NULL DEFAULT 20 CHECK (max_attempts >= 1),
    available_at   timestamptz  NOT NULL DEFAULT now(),
    processed_at   timestamptz  NULL,

    -- Deduplication: the capture trigger's key names one row change of one statement.
    dedupe_key     varchar(255) UNIQUE,

    created_at     timestamptz  NOT NULL DEFAULT now(),
    updated_at     timestamptz  NOT NULL DEFAULT now(),

    -- The seed's queries group by a status its table sketch lacks; derived, never written.
    status text GENERATED ALWAYS AS (
        CASE
            WHEN processed_at IS NOT NULL THEN 'processed'
            WHEN attempts >= max_attempts THEN 'failed'
            ELSE 'pending'
        END
    ) STORED
);

COMMENT ON TABLE public.outbox_events IS 'outbox-relay: the event log, written by capture triggers, read by the relay and the pull API.';
COMMENT ON COLUMN public.outbox_events.status IS 'Derived: processed | failed | pending.';

-- Relay bookkeeping is kept out of outbox_events on purpose: every update of an event copies the row
-- and (the seed's indexes include processed_at) touches every index, so an event is updated once, when
-- its outcome is known. New events wait for fan-out in this queue instead, written by the capture
-- trigger in the same statement and emptied by fan-out.
CREATE TABLE public.outbox_fanout_queue (
    event_id bigint PRIMARY KEY
);

-- The seed's indexes.
CREATE INDEX idx_outbox_tenant_status ON public.outbox_events (tenant, processed_at, available_at);
CREATE INDEX idx_outbox_event_type    ON public.outbox_events (event_type);
CREATE INDEX idx_outbox_created_at    ON public.outbox_events (created_at);

-- Partial index of unprocessed events (monitoring: "WHERE processed_at IS NULL ORDER BY created_at").
CREATE INDEX idx_outbox_unprocessed ON public.outbox_events (created_at) WHERE processed_at IS NULL;

CREATE TABLE public.event_acknowledgments (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     bigint       NOT NULL REFERENCES public.outbox_events (id) ON DELETE CASCADE,
    user_id      integer      NOT NULL,
    tenant       varchar(63)  NOT NULL,
    processor    varchar(100) NOT NULL DEFAULT 'flowgram.ai',
    status       public.acknowledgment_status NOT NULL DEFAULT 'processed',
    processed_at timestamptz  NOT NULL DEFAULT now(),
    metadata     jsonb,
    created_at   timestamptz  NOT NULL DEFAULT now(),
    updated_at   timestamptz  NOT NULL DEFAULT now(),
    -- Who wrote it: 'pull' (the user, through the API) or 'relay' (a push delivery as that user).
    -- The relay never overwrites a 'pull' acknowledgment.
    source       text         NOT NULL DEFAULT 'pull' CHECK (source IN ('pull', 'relay')),

    CONSTRAINT unique_event_user_acknowledgment UNIQUE (event_id, user_id)
);

COMMENT ON TABLE public.event_acknowledgments IS 'outbox-relay: outcome of an event per user, by push (relay) or pull (API).';

CREATE INDEX idx_event_ack_user_tenant  ON public.event_acknowledgments (user_id, tenant);
CREATE INDEX idx_event_ack_processed_at ON public.event_acknowledgments (processed_at);

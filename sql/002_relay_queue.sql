-- 002: webhook subscriptions and the delivery queue (one row per event x subscription while live).
-- Successful deliveries are deleted (their outcome lives on in event_acknowledgments), so the queue
-- stays small and claims stay fast; dead deliveries stay, visible, until replayed or expired.

-- A subscription's event-type filter as LIKE patterns ('vendors_*' -> 'vendors\_%'), computed once
-- per subscription (a generated column) so that fan-out matches with a plain LIKE ANY per event.
CREATE FUNCTION public.outbox_like_patterns(patterns text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(replace(replace(replace(p, '\', '\\'), '_', '\_'), '*', '%') ORDER BY o), '{}')
    FROM unnest(patterns) WITH ORDINALITY AS u(p, o)
$$;

CREATE TABLE public.outbox_subscriptions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant        varchar(63)  NOT NULL,
    user_id       integer      NOT NULL,
    processor     varchar(100) NOT NULL DEFAULT 'flowgram.ai',
    url           text         NOT NULL CHECK (length(url) <= 2048),
    -- Event-type filter: exact names or '*' patterns; empty = every event of the tenant.
    event_types   text[]       NOT NULL DEFAULT '{}',
    event_likes   text[]       GENERATED ALWAYS AS (public.outbox_like_patterns(event_types)) STORED,
    -- 'aggregate': one aggregate's events arrive in commit order; 'none': no ordering, most throughput.
    ordering      text         NOT NULL DEFAULT 'aggregate' CHECK (ordering IN ('aggregate', 'none')),
    max_in_flight integer      NOT NULL DEFAULT 32 CHECK (max_in_flight BETWEEN 1 AND 1000),
    timeout_ms    integer      NOT NULL DEFAULT 10000 CHECK (timeout_ms BETWEEN 100 AND 600000),
    enabled       boolean      NOT NULL DEFAULT true,
    disabled_reason text       NULL,
    disabled_at   timestamptz  NULL,
    created_at    timestamptz  NOT NULL DEFAULT now(),
    updated_at    timestamptz  NOT NULL DEFAULT now(),

    -- Acknowledgments are unique per (event, user): one subscription per user and tenant, so one
    -- push outcome per event and user. (README: "Subscriptions".)
    CONSTRAINT outbox_subscriptions_tenant_user UNIQUE (tenant, user_id)
);

CREATE INDEX idx_outbox_subscriptions_enabled ON public.outbox_subscriptions (tenant) WHERE enabled;

-- Signing secrets: the current one (expires_at NULL) and, after a rotation, the previous ones until
-- they expire. Every unexpired secret signs, as Standard Webhooks allows.
CREATE TABLE public.outbox_subscription_secrets (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id bigint      NOT NULL REFERENCES public.outbox_subscriptions (id) ON DELETE CASCADE,
    secret          text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NULL
);

CREATE INDEX idx_outbox_subscription_secrets_sub ON public.outbox_subscription_secrets (subscription_id);

-- waiting: queued behind an earlier event of the same aggregate (ordering 'aggregate');
-- ready:   claimable once next_attempt_at has passed (a claim pushes next_attempt_at to the lease end);
-- dead:    out of attempts, or its subscription was disabled; requeued by `replay`.
CREATE TYPE public.outbox_delivery_state AS ENUM ('waiting', 'ready', 'dead');

-- The queue is kept lean because every delivery is written two or three times: no surrogate key (the
-- pair is the key), no foreign keys (their checks lock the referenced event and subscription rows on
-- every insert; the relay's functions and retention keep the references), and the ordering index
-- covers only ordered subscriptions.
CREATE TABLE public.outbox_deliveries (
    event_id        bigint      NOT NULL,
    subscription_id bigint      NOT NULL,
    -- Hash of (aggregate_type, aggregate_id) for ordering 'aggregate'; NULL for ordering 'none'.
    -- A hash collision only orders two aggregates together.
    lane            bigint      NULL,
    state           public.outbox_delivery_state NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_by       text        NULL,
    last_attempt_at timestamptz NULL,
    last_status     integer     NULL,
    last_error      text        NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, subscription_id)
);

-- Claims: per subscription, the due ready deliveries, oldest due first.
CREATE INDEX idx_outbox_deliveries_claim ON public.outbox_deliveries (subscription_id, next_attempt_at) WHERE state = 'ready';
-- Ordering lanes: the live deliveries of one aggregate of one subscription, in event order.
CREATE INDEX idx_outbox_deliveries_lane ON public.outbox_deliveries (subscription_id, lane, event_id) WHERE lane IS NOT NULL AND state <> 'dead';
-- Dead deliveries, for replay and status.
CREATE INDEX idx_outbox_deliveries_dead ON public.outbox_deliveries (subscription_id, event_id) WHERE state = 'dead';

-- One row of settings the capture trigger reads. notify_mode comes from RELAY_NOTIFY_MODE; relay_idle
-- is set by a relay that is waiting, so that under load writers skip pg_notify (whose commit-time lock
-- serializes notifying transactions) and the busy relay polls instead; max_attempts is
-- RETRY_MAX_ATTEMPTS, stamped on each new event. Relays write their settings here when they start.
CREATE TABLE public.outbox_relay_state (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    notify_mode  text        NOT NULL DEFAULT 'always' CHECK (notify_mode IN ('always', 'idle', 'off')),
    relay_idle   boolean     NOT NULL DEFAULT true,
    max_attempts integer     NOT NULL DEFAULT 20 CHECK (max_attempts >= 1),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

INSERT INTO public.outbox_relay_state (singleton) VALUES (true);

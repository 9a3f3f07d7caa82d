-- 008: what operators look at. Circuit breakers live in each relay's memory; relays record their
-- non-closed circuits here so that `outbox-relay status` can show them (a row per subscription and
-- relay replica, removed when the circuit closes or the replica stops).
CREATE TABLE public.outbox_circuit_states (
    subscription_id bigint      NOT NULL,
    worker_id       text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('open', 'half-open')),
    probe_at        timestamptz NULL,
    changed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, worker_id)
);

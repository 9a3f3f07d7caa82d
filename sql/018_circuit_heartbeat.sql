-- 018: rows of public.outbox_circuit_states say when their relay last vouched for them.
--
-- A relay records its open and half-open circuits here for `outbox-relay status` (008) and removes
-- them when they close or it stops. A relay that is killed (kill -9, the OOM killer, a node lost)
-- leaves its rows behind. A relay at start clears those of dead relays on its own host (worker id
-- `hostname:pid`), but in containers every restart or rollout brings a new hostname, so such rows
-- stayed for ever and `status` listed open circuits of relays long gone.
-- Now each relay rewrites its rows every 30 s (seen_at, src/relay/circuitRecorder.ts); `status`
-- shows only rows seen in the last 2 minutes, and relays delete rows not seen for 10 minutes.
ALTER TABLE public.outbox_circuit_states ADD COLUMN seen_at timestamptz NOT NULL DEFAULT now();

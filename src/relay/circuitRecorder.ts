/**
 * Records this replica's open and half-open circuits in public.outbox_circuit_states (from the
 * relay's circuit events), so that `outbox-relay status` can show them. Best effort: a failed write
 * is logged at debug and the next change writes again.
 */
import type pg from 'pg';
import type { Logger } from '../log.js';
import type { Relay } from './relay.js';

const UPSERT = `
INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state, probe_at, changed_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (subscription_id, worker_id) DO UPDATE SET state = excluded.state, probe_at = excluded.probe_at, changed_at = now()`;
const REMOVE = 'DELETE FROM public.outbox_circuit_states WHERE subscription_id = $1 AND worker_id = $2';
const REMOVE_ALL = 'DELETE FROM public.outbox_circuit_states WHERE worker_id = $1';

export class CircuitRecorder {
  constructor(
    private readonly pool: pg.Pool,
    private readonly workerId: string,
    private readonly logger: Logger,
  ) {}

  bind(relay: Relay): void {
    relay.on('circuit', (subscriptionId, _tenant, state) => {
      const probeAt = relay.circuits().find((c) => c.subscriptionId === subscriptionId)?.probeAt ?? null;
      const query = state === 'closed'
        ? this.pool.query(REMOVE, [subscriptionId, this.workerId])
        : this.pool.query(UPSERT, [subscriptionId, this.workerId, state, probeAt ? new Date(probeAt) : null]);
      query.catch((err: unknown) => this.logger.debug({ err: (err as Error).message }, 'could not record circuit state'));
    });
  }

  /** Forgets this replica's rows (at start, after a crash, and at stop). */
  async clear(): Promise<void> {
    await this.pool.query(REMOVE_ALL, [this.workerId]).catch(() => undefined);
  }
}

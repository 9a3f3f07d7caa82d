/**
 * Records this replica's open and half-open circuits in public.outbox_circuit_states (from the
 * relay's circuit events), so that `outbox-relay status` can show them. Best effort: a failed write
 * is logged at debug and the next change writes again.
 */
import { hostname } from 'node:os';
import type pg from 'pg';
import type { Logger } from '../log.js';
import type { Relay } from './relay.js';

const UPSERT = `
INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state, probe_at, changed_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (subscription_id, worker_id) DO UPDATE SET state = excluded.state, probe_at = excluded.probe_at, changed_at = now()`;
const REMOVE = 'DELETE FROM public.outbox_circuit_states WHERE subscription_id = $1 AND worker_id = $2';
const REMOVE_ALL = 'DELETE FROM public.outbox_circuit_states WHERE worker_id = $1';
const REMOVE_WORKERS = 'DELETE FROM public.outbox_circuit_states WHERE worker_id = ANY ($1::text[])';
const LOCAL_WORKERS = "SELECT DISTINCT worker_id FROM public.outbox_circuit_states WHERE starts_with(worker_id, $1)";

/** Whether a process of this host with this pid runs (EPERM: it runs, as another user). */
function processAlive(pidText: string): boolean {
  if (!/^[1-9][0-9]{0,9}$/.test(pidText)) return true; // not a pid: not ours to judge
  try {
    process.kill(Number(pidText), 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

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

  /**
   * Forgets this replica's rows (at start, after a crash, and at stop), and at start those of relays
   * on this host that are gone: a default worker id is `hostname:pid`, and a relay killed with -9
   * (or by the OOM killer) left its rows behind, shown by `status` as open circuits for ever.
   */
  async clear(): Promise<void> {
    await this.pool.query(REMOVE_ALL, [this.workerId]).catch(() => undefined);
    try {
      const prefix = `${hostname()}:`;
      const { rows } = await this.pool.query<{ worker_id: string }>(LOCAL_WORKERS, [prefix]);
      const gone = rows.map((r) => r.worker_id).filter((w) => w !== this.workerId && !processAlive(w.slice(prefix.length)));
      if (gone.length) await this.pool.query(REMOVE_WORKERS, [gone]);
    } catch (err) {
      this.logger.debug({ err: (err as Error).message }, 'could not clear circuit states of stopped relays');
    }
  }
}

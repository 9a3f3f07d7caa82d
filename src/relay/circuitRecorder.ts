/**
 * Records this replica's open and half-open circuits in public.outbox_circuit_states (from the
 * relay's circuit events, and a heartbeat that rewrites them every 30 s: sql/018), so that
 * `outbox-relay status` can show them. Best effort: a failed write is logged at debug and the next
 * change or heartbeat writes again.
 */
import { hostname } from 'node:os';
import type pg from 'pg';
import { PeriodicTask } from '../daemon/periodicTask.js';
import type { Logger } from '../log.js';
import type { Relay } from './relay.js';

const UPSERT = `
INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state, probe_at, changed_at, seen_at)
VALUES ($1, $2, $3, $4, now(), now())
ON CONFLICT (subscription_id, worker_id) DO UPDATE SET state = excluded.state, probe_at = excluded.probe_at, changed_at = now(), seen_at = now()`;

/** How often a relay rewrites its rows (seen_at). */
export const CIRCUIT_HEARTBEAT_MS = 30_000;
/**
 * A row counts while its relay vouches for it: `status` shows, and starting relays heed, rows seen
 * this lately (four heartbeats).
 */
export const CIRCUIT_ROW_VISIBLE = '2 minutes';
/** Rows no relay rewrote for this long are deleted by any relay's heartbeat; until then a starting relay reads them. */
export const CIRCUIT_ROW_EXPIRY = '10 minutes';

/**
 * The heartbeat: this relay's rows become exactly its current non-closed circuits ($2..$4, seen
 * now), and rows of any relay unseen for CIRCUIT_ROW_EXPIRY go. This relay's own rows are never
 * both deleted and upserted by the one statement. The ids must be distinct (Relay.circuits() gives
 * one entry per subscription): ON CONFLICT DO UPDATE refuses to touch a row twice.
 */
const SYNC = `
WITH gone AS (
  DELETE FROM public.outbox_circuit_states AS s
  WHERE (s.worker_id = $1 AND NOT (s.subscription_id = ANY ($2::bigint[])))
     OR (s.worker_id <> $1 AND s.seen_at < now() - interval '${CIRCUIT_ROW_EXPIRY}')
)
INSERT INTO public.outbox_circuit_states AS s (subscription_id, worker_id, state, probe_at, changed_at, seen_at)
SELECT c.subscription_id, $1, c.state, c.probe_at, now(), now()
FROM unnest($2::bigint[], $3::text[], $4::timestamptz[]) AS c(subscription_id, state, probe_at)
ON CONFLICT (subscription_id, worker_id) DO UPDATE
SET state = excluded.state, probe_at = excluded.probe_at, seen_at = now(),
    changed_at = CASE WHEN s.state = excluded.state THEN s.changed_at ELSE now() END`;
const REMOVE = 'DELETE FROM public.outbox_circuit_states WHERE subscription_id = $1 AND worker_id = $2';
const REMOVE_ALL = 'DELETE FROM public.outbox_circuit_states WHERE worker_id = $1';
/**
 * At a graceful stop: this relay's rows drop out of `status` at once (seen_at older than its 2-minute
 * window), but stay until they expire, so that a relay starting next can read them (recentlyOpen).
 */
const RETIRE = `UPDATE public.outbox_circuit_states SET seen_at = least(seen_at, now() - interval '${CIRCUIT_ROW_VISIBLE}' - interval '1 second')
WHERE worker_id = $1`;
/**
 * Subscriptions some relay had an open circuit for, seen within a window; optionally not counting one
 * relay's rows, and only among some subscriptions (null: no such condition).
 */
const OPEN_SEEN_WITHIN = `SELECT DISTINCT subscription_id::int AS id FROM public.outbox_circuit_states
WHERE state = 'open' AND seen_at > now() - $1::interval
  AND ($2::text IS NULL OR worker_id <> $2) AND ($3::bigint[] IS NULL OR subscription_id = ANY ($3::bigint[]))`;
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

/**
 * Subscriptions whose circuit a relay reports open, in rows seen within `within` (an interval):
 * CIRCUIT_ROW_VISIBLE for what relays vouch for now, CIRCUIT_ROW_EXPIRY for what any relay had open
 * lately, a stopped one included. `exceptWorker` leaves one relay's rows out; `among` limits the ids.
 */
export async function openCircuitIds(
  db: pg.Pool | pg.PoolClient,
  within: string,
  opts: { exceptWorker?: string; among?: readonly number[] } = {},
): Promise<number[]> {
  const { rows } = await db.query<{ id: number }>(OPEN_SEEN_WITHIN, [within, opts.exceptWorker ?? null, opts.among ?? null]);
  return rows.map((r) => r.id);
}

export class CircuitRecorder {
  private relay: Relay | undefined;
  /** Writes go one after another, in the order of the changes (a heartbeat never undoes a later change). */
  private chain: Promise<unknown> = Promise.resolve();
  private heartbeatFailing = false;
  private readonly heartbeat = new PeriodicTask(() => this.sync(), CIRCUIT_HEARTBEAT_MS);

  constructor(
    private readonly pool: pg.Pool,
    private readonly workerId: string,
    private readonly logger: Logger,
  ) {}

  bind(relay: Relay): void {
    this.relay = relay;
    relay.on('circuit', (subscriptionId, _tenant, state) => {
      const probeAt = relay.circuits().find((c) => c.subscriptionId === subscriptionId)?.probeAt ?? null;
      void this.write(() => state === 'closed'
        ? this.pool.query(REMOVE, [subscriptionId, this.workerId])
        : this.pool.query(UPSERT, [subscriptionId, this.workerId, state, probeAt ? new Date(probeAt) : null]));
    });
  }

  /** Rewrites this relay's rows every CIRCUIT_HEARTBEAT_MS (also repairing a write that failed). */
  startHeartbeat(): void {
    this.heartbeat.start();
  }

  async stopHeartbeat(): Promise<void> {
    await this.heartbeat.stop();
  }

  /**
   * One heartbeat: this relay's rows as its circuits are now; rows of relays long gone deleted. A
   * failing heartbeat is a warning (once until one succeeds): `status` stops showing this relay's
   * open circuits two minutes after its last one.
   */
  sync(): Promise<void> {
    return this.write(async () => {
      const open = (this.relay?.circuits() ?? []).filter((c) => c.state !== 'closed');
      try {
        await this.pool.query(SYNC, [
          this.workerId,
          open.map((c) => c.subscriptionId),
          open.map((c) => c.state),
          open.map((c) => (c.probeAt ? new Date(c.probeAt) : null)),
        ]);
        this.heartbeatFailing = false;
      } catch (err) {
        if (!this.heartbeatFailing) {
          this.logger.warn({ err: (err as Error).message }, 'could not record circuit states; status will not show this relay\'s open circuits until this succeeds (retried every 30 s)');
        }
        this.heartbeatFailing = true;
      }
    });
  }

  private write(query: () => Promise<unknown>): Promise<void> {
    const next = this.chain.then(query).then(
      () => undefined,
      (err: unknown) => this.logger.debug({ err: (err as Error).message }, 'could not record circuit state'),
    );
    this.chain = next;
    return next;
  }

  /**
   * Subscriptions whose circuit some relay had open in the last 10 minutes, read at start before
   * clear() (a restarted relay's own rows are among them): the relay starts those half-open.
   */
  async recentlyOpen(): Promise<number[]> {
    try {
      return await openCircuitIds(this.pool, CIRCUIT_ROW_EXPIRY);
    } catch (err) {
      this.logger.debug({ err: (err as Error).message }, 'could not read circuit states');
      return [];
    }
  }

  /** At a graceful stop: this relay's rows leave `status` but stay for its successor (see RETIRE). */
  retire(): Promise<void> {
    return this.write(() => this.pool.query(RETIRE, [this.workerId]));
  }

  /**
   * Forgets this replica's rows (at start, after a crash), and at start those of relays
   * on this host that are gone: a default worker id is `hostname:pid`, and a relay killed with -9
   * (or by the OOM killer) left its rows behind, shown by `status` as open circuits for ever.
   */
  clear(): Promise<void> {
    // In the chain: a change still being written when the relay stops is not left behind.
    return this.write(async () => {
      await this.pool.query(REMOVE_ALL, [this.workerId]).catch(() => undefined);
      try {
        const prefix = `${hostname()}:`;
        const { rows } = await this.pool.query<{ worker_id: string }>(LOCAL_WORKERS, [prefix]);
        const gone = rows.map((r) => r.worker_id).filter((w) => w !== this.workerId && !processAlive(w.slice(prefix.length)));
        if (gone.length) await this.pool.query(REMOVE_WORKERS, [gone]);
      } catch (err) {
        this.logger.debug({ err: (err as Error).message }, 'could not clear circuit states of stopped relays');
      }
    });
  }
}

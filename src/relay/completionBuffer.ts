/**
 * Collects attempt outcomes and records them in batches: one outbox_complete() call for everything
 * that finished since the last call (results that arrive while a call runs go into the next one).
 * A failed call keeps its batch and is retried with backoff; if leases expire meanwhile, another
 * replica re-sends (at-least-once) and our late call is fenced off by the database.
 *
 * A batch refused for its data (SQLSTATE class 22 or 23: e.g. the acknowledgment of an event whose
 * row was deleted while it was being sent) would be refused at every retry, and every outcome queued
 * behind it with it: the relay would stop recording anything. Such a batch is split in halves, each
 * recorded on its own, down to the outcome that is refused; that one is given up (logged as an
 * error): its lease runs out and the delivery is claimed again (a claim drops it if its event is
 * gone, see sql/014). Other errors (connection, timeout, schema) are retried whole, as before.
 *
 * Outcomes held longer than a third of the relay's lease (recording keeps failing, or one call is
 * stuck behind a lock) keep their leases: a keepalive pushes their lease ends forward (sql/022), so
 * that neither this relay nor another sends them again while they only wait to be written. When the
 * keepalive cannot reach the database either, the leases run out as before (at-least-once).
 */
import type pg from 'pg';
import { isRetryableDbError } from '../errors.js';
import type { Logger } from '../log.js';
import type { OutcomeKind } from './outcome.js';

export interface CompletionItem {
  eventId: string;
  subscriptionId: number;
  attempt: number;
  kind: OutcomeKind;
  httpStatus: number | null;
  error: string | null;
  delayMs: number;
  durationMs: number;
}

/** Records a batch of outcomes (see sql/005_relay_functions.sql); returns how many applied. Prepared once per connection (see relay.ts). */
export const COMPLETE_SQL =
  'SELECT public.outbox_complete($1, $2::bigint[], $3::bigint[], $4::int[], $5::text[], $6::int[], $7::text[], $8::bigint[], $9::int[]) AS applied';

/** Pushes forward the lease ends of deliveries whose outcomes are held (sql/022); returns how many. */
export const EXTEND_LEASES_SQL = 'SELECT public.outbox_extend_leases($1, $2::bigint[], $3::bigint[], $4::int[], $5::int[]) AS extended';

export interface CompletionOptions {
  pool: pg.Pool;
  workerId: string;
  logger: Logger;
  maxBatch?: number;
  /** Called after each recorded batch (the relay claims again: capacity and lanes were freed). */
  onFlushed: (items: readonly CompletionItem[], applied: number) => void;
  onError?: (err: unknown) => void;
  /** How long a claim of this subscription holds (the relay's lease for it); held outcomes are kept leased this long. */
  leaseFor?: (subscriptionId: number) => number;
  /** How often held outcomes' leases are extended: a third of the shortest lease. Off without leaseFor. */
  keepaliveMs?: number;
}

/**
 * After this many outcomes given up in a row with nothing recorded in between, refusals are taken to
 * be systemic (a constraint or trigger that refuses every outcome), not one outcome's data: giving
 * every outcome up would re-send every delivery after its lease, so the buffer retries instead.
 */
const SYSTEMIC_AFTER = 8;

/** A refusal of the data itself, which no retry of the same batch can get past. */
function refusedForData(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^2[23][0-9A-Z]{3}$/.test(code);
}

export class CompletionBuffer {
  private pending: CompletionItem[] = [];
  /** Parts of a batch refused for its data, recorded one part at a time before anything else. */
  private isolating: CompletionItem[][] = [];
  private flushing: Promise<void> | undefined;
  private failures = 0;
  /** Outcomes given up since the last batch that was recorded. */
  private givenUp = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** The batch of the call in progress (no longer in pending or isolating, still held). */
  private recordingNow: readonly CompletionItem[] = [];
  /** When each held outcome was pushed. */
  private readonly heldSince = new WeakMap<CompletionItem, number>();
  private keepaliveTimer: NodeJS.Timeout | undefined;
  private extending = false;

  constructor(private readonly options: CompletionOptions) {}

  get size(): number {
    return this.pending.length + this.isolating.reduce((n, part) => n + part.length, 0);
  }

  push(item: CompletionItem): void {
    this.pending.push(item);
    this.heldSince.set(item, Date.now());
    this.startKeepalive();
    // Let every result of this turn of the event loop join the batch.
    if (!this.flushing && !this.retryTimer) setImmediate(() => this.flush());
  }

  private flush(): void {
    if (this.flushing || this.size === 0) return;
    this.flushing = this.run().finally(() => {
      this.flushing = undefined;
      if (this.size > 0 && !this.retryTimer) this.flush();
    });
  }

  private async run(): Promise<void> {
    const isolated = this.isolating.shift();
    const batch = isolated ?? this.pending.splice(0, this.options.maxBatch ?? 1000);
    this.recordingNow = batch;
    try {
      const { rows } = await this.options.pool.query<{ applied: number }>({ name: 'outbox-relay-complete', text: COMPLETE_SQL, values: [
        this.options.workerId,
        batch.map((b) => b.eventId),
        batch.map((b) => b.subscriptionId),
        batch.map((b) => b.attempt),
        batch.map((b) => b.kind),
        batch.map((b) => b.httpStatus),
        batch.map((b) => b.error),
        batch.map((b) => Math.round(b.delayMs)),
        batch.map((b) => Math.round(b.durationMs)),
      ] });
      const applied = rows[0]?.applied ?? 0;
      this.failures = 0;
      this.givenUp = 0;
      if (applied < batch.length) {
        this.options.logger.warn({ submitted: batch.length, applied }, 'some outcomes were not recorded: their leases had expired and another replica took over');
      }
      this.options.onFlushed(batch, applied);
    } catch (err) {
      if (refusedForData(err) && !(batch.length === 1 && this.givenUp >= SYSTEMIC_AFTER)) {
        this.isolate(batch, err, !isolated);
        return;
      }
      if (isolated) this.isolating.unshift(isolated);
      else this.pending.unshift(...batch);
      this.failures++;
      this.options.onError?.(err);
      if (this.closed && this.failures > 3) {
        this.options.logger.error({ lost: this.size, err: (err as Error).message }, 'could not record outcomes before stopping; their leases expire and the deliveries are sent again');
        this.pending = [];
        this.isolating = [];
        this.stopKeepalive();
        return;
      }
      const delay = Math.min(5_000, 100 * 2 ** Math.min(this.failures, 6));
      if (refusedForData(err)) {
        this.options.logger.error(
          { givenUp: this.givenUp, code: (err as { code?: string }).code, err: (err as Error).message },
          'outcome after outcome is refused for its data: something refuses them all (a constraint or trigger?); retrying instead of giving more up',
        );
      } else if (!isRetryableDbError(err)) this.options.logger.error({ err: (err as Error).message }, 'recording outcomes failed');
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        this.flush();
      }, delay);
    } finally {
      this.recordingNow = [];
    }
  }

  /** Everything pushed and not yet recorded or given up: waiting, being isolated, or in the call in progress. */
  private held(): CompletionItem[] {
    return [...this.recordingNow, ...this.isolating.flat(), ...this.pending];
  }

  private startKeepalive(): void {
    const every = this.options.keepaliveMs;
    if (this.keepaliveTimer || !this.options.leaseFor || !every || every <= 0) return;
    this.keepaliveTimer = setInterval(() => void this.keepalive(), every);
    this.keepaliveTimer.unref();
  }

  private stopKeepalive(): void {
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    this.keepaliveTimer = undefined;
  }

  /**
   * Extends the leases of outcomes held longer than one keepalive period. Normally outcomes are
   * recorded within milliseconds and there is nothing to do; the timer stops once nothing is held.
   * A failure is left to the next tick (the database being away is reported by the recording).
   */
  private async keepalive(): Promise<void> {
    const leaseFor = this.options.leaseFor;
    const every = this.options.keepaliveMs ?? 0;
    if (!leaseFor || this.extending) return;
    if (this.size === 0 && this.recordingNow.length === 0) {
      this.stopKeepalive();
      return;
    }
    const before = Date.now() - every;
    const old = this.held().filter((item) => (this.heldSince.get(item) ?? 0) <= before);
    if (old.length === 0) return;
    this.extending = true;
    try {
      const { rows } = await this.options.pool.query<{ extended: number }>(EXTEND_LEASES_SQL, [
        this.options.workerId,
        old.map((b) => b.eventId),
        old.map((b) => b.subscriptionId),
        old.map((b) => b.attempt),
        old.map((b) => leaseFor(b.subscriptionId)),
      ]);
      this.options.logger.debug({ held: old.length, extended: rows[0]?.extended ?? 0 }, 'extended the leases of outcomes waiting to be recorded');
    } catch (err) {
      this.options.logger.debug({ err: (err as Error).message }, 'could not extend the leases of outcomes waiting to be recorded');
    } finally {
      this.extending = false;
    }
  }

  /** A batch refused for its data: its halves are recorded separately, a single outcome given up. */
  private isolate(batch: CompletionItem[], err: unknown, first: boolean): void {
    const pgErr = err as { code?: string; message?: string; detail?: string };
    if (batch.length > 1) {
      const half = Math.ceil(batch.length / 2);
      this.isolating.unshift(batch.slice(0, half), batch.slice(half));
      if (first) this.options.logger.warn({ outcomes: batch.length, code: pgErr.code, err: pgErr.message }, 'a batch of outcomes was refused for its data: recording it in parts to find the outcome at fault');
      return;
    }
    const [item] = batch as [CompletionItem];
    this.givenUp++;
    this.options.logger.error(
      { eventId: item.eventId, subscription: item.subscriptionId, attempt: item.attempt, outcome: item.kind, code: pgErr.code, err: pgErr.message, detail: pgErr.detail },
      'the outcome of this delivery cannot be recorded and is given up: its lease runs out and it is claimed again (dropped if its event no longer exists)',
    );
    this.options.onFlushed(batch, 0);
  }

  /** Resolves when everything pushed so far is recorded (or given up on, after close()). */
  async drain(): Promise<void> {
    for (;;) {
      if (this.flushing) await this.flushing;
      else if (this.retryTimer) await new Promise((r) => setTimeout(r, 50));
      else if (this.size > 0) this.flush();
      else return;
    }
  }

  /** From now on, give up after a few failed tries instead of retrying forever. */
  close(): void {
    this.closed = true;
  }

  /** Stops the lease keepalive (the relay is gone; what is still held is sent again after its lease). */
  dispose(): void {
    this.stopKeepalive();
  }
}

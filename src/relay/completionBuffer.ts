/**
 * Collects attempt outcomes and records them in batches: one outbox_complete() call for everything
 * that finished since the last call (results that arrive while a call runs go into the next one).
 * A failed call keeps its batch and is retried with backoff; if leases expire meanwhile, another
 * replica re-sends (at-least-once) and our late call is fenced off by the database.
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

export interface CompletionOptions {
  pool: pg.Pool;
  workerId: string;
  logger: Logger;
  maxBatch?: number;
  /** Called after each recorded batch (the relay claims again: capacity and lanes were freed). */
  onFlushed: (items: readonly CompletionItem[], applied: number) => void;
  onError?: (err: unknown) => void;
}

export class CompletionBuffer {
  private pending: CompletionItem[] = [];
  private flushing: Promise<void> | undefined;
  private failures = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(private readonly options: CompletionOptions) {}

  get size(): number {
    return this.pending.length;
  }

  push(item: CompletionItem): void {
    this.pending.push(item);
    // Let every result of this turn of the event loop join the batch.
    if (!this.flushing && !this.retryTimer) setImmediate(() => this.flush());
  }

  private flush(): void {
    if (this.flushing || this.pending.length === 0) return;
    this.flushing = this.run().finally(() => {
      this.flushing = undefined;
      if (this.pending.length > 0 && !this.retryTimer) this.flush();
    });
  }

  private async run(): Promise<void> {
    const batch = this.pending.splice(0, this.options.maxBatch ?? 1000);
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
      if (applied < batch.length) {
        this.options.logger.warn({ submitted: batch.length, applied }, 'some outcomes were not recorded: their leases had expired and another replica took over');
      }
      this.options.onFlushed(batch, applied);
    } catch (err) {
      this.pending.unshift(...batch);
      this.failures++;
      this.options.onError?.(err);
      if (this.closed && this.failures > 3) {
        this.options.logger.error({ lost: this.pending.length, err: (err as Error).message }, 'could not record outcomes before stopping; their leases expire and the deliveries are sent again');
        this.pending = [];
        return;
      }
      const delay = Math.min(5_000, 100 * 2 ** Math.min(this.failures, 6));
      if (!isRetryableDbError(err)) this.options.logger.error({ err: (err as Error).message }, 'recording outcomes failed');
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        this.flush();
      }, delay);
    }
  }

  /** Resolves when everything pushed so far is recorded (or given up on, after close()). */
  async drain(): Promise<void> {
    for (;;) {
      if (this.flushing) await this.flushing;
      else if (this.retryTimer) await new Promise((r) => setTimeout(r, 50));
      else if (this.pending.length > 0) this.flush();
      else return;
    }
  }

  /** From now on, give up after a few failed tries instead of retrying forever. */
  close(): void {
    this.closed = true;
  }
}

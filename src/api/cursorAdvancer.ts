/**
 * Moves pull cursors forward in the background, for users who poll with exclude_acknowledged=true:
 * at most one run per user at a time and one per `intervalMs`, a few runs at once in all, never in a
 * request's way (a failed step is logged and tried again at the next poll). See outbox_pull_advance.
 */
import type { Logger } from '../log.js';
import type { Principal } from './auth.js';
import type { EventStore } from './eventStore.js';

export interface CursorAdvancerOptions {
  store: EventStore;
  logger: Logger;
  /** Least time between two runs for one user. */
  intervalMs?: number;
  /** The settling delay of the id horizon (see sql/007). */
  settleMs?: number;
  /** Events checked per step. */
  chunk?: number;
  /** Steps per run at most (a run with more to do continues at the next poll). */
  maxSteps?: number;
  /** Runs at once, over all users (each holds one pooled connection while it works). */
  concurrency?: number;
}

export class CursorAdvancer {
  private readonly lastRun = new Map<string, number>();
  private readonly running = new Map<string, Promise<void>>();
  private stopped = false;
  private readonly intervalMs: number;
  private readonly settleMs: number;
  private readonly chunk: number;
  private readonly maxSteps: number;
  private readonly concurrency: number;

  constructor(private readonly options: CursorAdvancerOptions) {
    this.intervalMs = options.intervalMs ?? 1_000;
    this.settleMs = options.settleMs ?? 1_000;
    this.chunk = options.chunk ?? 10_000;
    this.maxSteps = options.maxSteps ?? 20;
    this.concurrency = options.concurrency ?? 2;
  }

  /** A user polled with exclude_acknowledged=true: run their cursor if it is due. */
  touch(p: Principal): void {
    if (this.stopped || this.running.has(p.key) || this.running.size >= this.concurrency) return;
    const now = performance.now();
    if (now - (this.lastRun.get(p.key) ?? -Infinity) < this.intervalMs) return;
    this.lastRun.set(p.key, now);
    if (this.lastRun.size > 100_000) this.forgetIdle(now);
    const run = this.run(p).finally(() => this.running.delete(p.key));
    this.running.set(p.key, run);
  }

  /** Waits for the runs in progress (each ends after its current step); no new ones start. */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.allSettled([...this.running.values()]);
  }

  /** Runs now, whatever the interval (tests and the bench's warm-up). Resolves when settled or done. */
  async runNow(p: Principal): Promise<void> {
    await this.running.get(p.key);
    await this.run(p);
  }

  private async run(p: Principal): Promise<void> {
    try {
      for (let step = 0; step < this.maxSteps && !this.stopped; step++) {
        const more = await this.options.store.advanceCursor(p, this.settleMs, this.chunk);
        if (!more) return;
      }
    } catch (err) {
      this.options.logger.warn({ err: err instanceof Error ? err.message : String(err), tenant: p.tenant, userId: p.userId }, 'pull cursor step failed; retried at the next poll');
    }
  }

  private forgetIdle(now: number): void {
    for (const [key, at] of this.lastRun) if (now - at > 10 * 60_000) this.lastRun.delete(key);
  }
}

/**
 * Queues events that were written into public.outbox_events around capture and
 * public.outbox_write_event, so without a fan-out queue entry (sql/015): a plain INSERT by an
 * application, or a trigger in the style of the seed's create_outbox_event. Runs at start and then
 * every minute; one replica at a time (the SQL function takes a transaction advisory lock).
 */
import type pg from 'pg';
import type { Logger } from '../log.js';

/** Arguments: the least age of an event to look at, and how many of the newest unprocessed to examine. */
export const REQUEUE_STRANDED_SQL = 'SELECT public.outbox_requeue_stranded($1::interval, $2::integer) AS n';

export interface StrandedSweepOptions {
  pool: pg.Pool;
  logger: Logger;
  intervalMs?: number;
  /** Events younger than this are left alone (their writer may still be queueing them). */
  minAgeMs?: number;
  /** How many of the newest unprocessed events one sweep examines (bounds its cost under a backlog). */
  scanLimit?: number;
}

export class StrandedSweep {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<number> | undefined;

  constructor(private readonly options: StrandedSweepOptions) {}

  start(): void {
    void this.sweep();
    this.timer = setInterval(() => void this.sweep(), this.options.intervalMs ?? 60_000);
    this.timer.unref();
  }

  /** One sweep now (joins one that is running); resolves to how many events it queued. */
  sweep(): Promise<number> {
    this.running ??= this.run().finally(() => (this.running = undefined));
    return this.running;
  }

  private async run(): Promise<number> {
    const { pool, logger } = this.options;
    try {
      const minAge = `${Math.max(0, Math.round(this.options.minAgeMs ?? 30_000))} milliseconds`;
      const { rows } = await pool.query<{ n: number }>({ text: REQUEUE_STRANDED_SQL, values: [minAge, this.options.scanLimit ?? 10_000] });
      const n = rows[0]?.n ?? 0;
      if (n > 0) {
        logger.warn(
          { events: n },
          'queued events that were written without a fan-out queue entry; write events with public.outbox_write_event(...) to have them delivered at once',
        );
      }
      return n;
    } catch (err) {
      logger.warn({ err: (err as Error).message }, 'stranded-event sweep failed; it runs again in a minute');
      return 0;
    }
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.running;
  }
}

/**
 * Queues events that were written into public.outbox_events around capture and
 * public.outbox_write_event, so without a fan-out queue entry (sql/015): a plain INSERT by an
 * application, or a trigger in the style of the seed's create_outbox_event. Runs at start and then
 * every minute; one replica at a time (the SQL function takes a transaction advisory lock). Each
 * sweep looks at the newest unprocessed events and at the next chunk of a walk over all of them,
 * so an old stranded event is found too, however large the backlog (sql/015).
 */
import type pg from 'pg';
import { queryWithTimeout } from '../db/connection.js';
import { PeriodicTask } from '../daemon/periodicTask.js';
import type { Logger } from '../log.js';

/**
 * Arguments: the least age of an event to look at; how many unprocessed events each of the two walks
 * examines (the newest, and those after the cursor); the cursor (NULL, NULL: from the start).
 */
export const REQUEUE_STRANDED_SQL = `SELECT s.queued AS n,
       to_char(s.next_created AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS "nextCreated", s.next_id::text AS "nextId"
FROM public.outbox_requeue_stranded($1::interval, $2::integer, $3::timestamptz, $4::bigint) AS s`;

export interface StrandedSweepOptions {
  pool: pg.Pool;
  logger: Logger;
  intervalMs?: number;
  /** Events younger than this are left alone (their writer may still be queueing them). */
  minAgeMs?: number;
  /**
   * How many unprocessed events each of a sweep's two walks examines: the newest ones, and the next
   * ones of a walk over all of them (bounds a sweep's cost under a backlog).
   */
  scanLimit?: number;
}

export class StrandedSweep {
  private readonly task: PeriodicTask<number>;
  /**
   * Where the walk over all unprocessed events goes on (null: from the start). Text, to the
   * microsecond: a JavaScript Date would cut it to milliseconds and walk some events twice.
   */
  private cursor: { created: string | null; id: string | null } = { created: null, id: null };

  constructor(private readonly options: StrandedSweepOptions) {
    this.task = new PeriodicTask(() => this.run(), options.intervalMs ?? 60_000);
  }

  start(): void {
    this.task.start();
  }

  /** One sweep now (joins one that is running); resolves to how many events it queued. */
  sweep(): Promise<number> {
    return this.task.now();
  }

  private async run(): Promise<number> {
    const { pool, logger } = this.options;
    try {
      const minAge = `${Math.max(0, Math.round(this.options.minAgeMs ?? 30_000))} milliseconds`;
      // The sweep holds the lane lock shared, so fan-out waits while it runs: never for long.
      const { rows } = await queryWithTimeout<{ n: number; nextCreated: string | null; nextId: string | null }>(pool, 5_000, {
        text: REQUEUE_STRANDED_SQL,
        values: [minAge, this.options.scanLimit ?? 10_000, this.cursor.created, this.cursor.id],
      });
      const n = rows[0]?.n ?? 0;
      this.cursor = { created: rows[0]?.nextCreated ?? null, id: rows[0]?.nextId ?? null };
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

  stop(): Promise<void> {
    return this.task.stop();
  }
}

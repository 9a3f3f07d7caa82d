/**
 * Retention: deletes processed events older than RETENTION_DAYS, and events whose deliveries all died
 * longer than RETENTION_DEAD_DAYS ago, with their acknowledgments and deliveries. Small batches, each
 * its own short transaction taking only row locks it can get (SKIP LOCKED), so writers and the relay
 * never wait on it; one replica at a time (a session advisory lock), the others skip.
 */
import type pg from 'pg';
import { withPoolClient } from '../db/connection.js';
import type { Logger } from '../log.js';

const RETENTION_LOCK_KEY = '7411201007';

/** Processed events created and processed before the cutoff, oldest first, with their acknowledgments. */
const DELETE_PROCESSED = `
WITH doomed AS (
  SELECT e.id FROM public.outbox_events AS e
  WHERE e.created_at < $1 AND e.processed_at < $1
  ORDER BY e.created_at
  LIMIT $2
  FOR UPDATE SKIP LOCKED
),
acks AS (DELETE FROM public.event_acknowledgments AS a USING doomed AS d WHERE a.event_id = d.id RETURNING 1),
events AS (DELETE FROM public.outbox_events AS e USING doomed AS d WHERE e.id = d.id RETURNING 1)
SELECT (SELECT count(*)::int FROM events) AS events, (SELECT count(*)::int FROM acks) AS acks, 0 AS deliveries`;

/**
 * Unprocessed events older than the dead cutoff whose deliveries are all dead (none live, none
 * queued), and that were fanned out: a dead delivery is left, or it was tried (attempts, set by every
 * outcome and by a disable, so also by a removal of its subscriptions, sql/016). An event with no
 * delivery that was never tried was never fanned out (written around capture): the relays queue it
 * (sql/015), retention must not delete it.
 */
const DELETE_DEAD = `
WITH doomed AS (
  SELECT e.id FROM public.outbox_events AS e
  WHERE e.created_at < $1 AND e.processed_at IS NULL
    AND NOT EXISTS (SELECT 1 FROM public.outbox_fanout_queue AS q WHERE q.event_id = e.id)
    AND NOT EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = e.id AND d.state <> 'dead')
    AND (e.attempts > 0 OR EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = e.id AND d.state = 'dead'))
  ORDER BY e.created_at
  LIMIT $2
  FOR UPDATE SKIP LOCKED
),
deliveries AS (DELETE FROM public.outbox_deliveries AS d USING doomed AS x WHERE d.event_id = x.id RETURNING 1),
acks AS (DELETE FROM public.event_acknowledgments AS a USING doomed AS x WHERE a.event_id = x.id RETURNING 1),
events AS (DELETE FROM public.outbox_events AS e USING doomed AS x WHERE e.id = x.id RETURNING 1)
SELECT (SELECT count(*)::int FROM events) AS events, (SELECT count(*)::int FROM acks) AS acks,
       (SELECT count(*)::int FROM deliveries) AS deliveries`;

export interface RetentionOptions {
  days: number;
  deadDays: number;
  batchSize: number;
  logger: Logger;
  signal?: AbortSignal;
  /** Pause between batches, so the deletes never crowd out other work. */
  pauseMs?: number;
  now?: Date;
}

export interface RetentionResult {
  skipped: boolean;
  processedEvents: number;
  deadEvents: number;
  acknowledgments: number;
  deliveries: number;
  batches: number;
  durationMs: number;
}

async function deleteInBatches(
  client: pg.ClientBase,
  sql: string,
  cutoff: Date,
  options: RetentionOptions,
  total: { events: number; acks: number; deliveries: number; batches: number },
): Promise<number> {
  let deleted = 0;
  for (;;) {
    if (options.signal?.aborted) break;
    const { rows } = await client.query<{ events: number; acks: number; deliveries: number }>(sql, [cutoff, options.batchSize]);
    const r = rows[0] ?? { events: 0, acks: 0, deliveries: 0 };
    deleted += r.events;
    total.events += r.events;
    total.acks += r.acks;
    total.deliveries += r.deliveries;
    total.batches++;
    if (r.events < options.batchSize) break;
    if (options.pauseMs) await new Promise((resolve) => setTimeout(resolve, options.pauseMs));
  }
  return deleted;
}

/** Runs retention once (skipped when another replica is running it). */
export async function runRetention(pool: pg.Pool, options: RetentionOptions): Promise<RetentionResult> {
  const started = Date.now();
  return withPoolClient(pool, async (client) => {
    const { rows } = await client.query<{ locked: boolean }>('SELECT pg_try_advisory_lock($1) AS locked', [RETENTION_LOCK_KEY]);
    if (!rows[0]?.locked) {
      options.logger.info('retention skipped: another replica is running it');
      return { skipped: true, processedEvents: 0, deadEvents: 0, acknowledgments: 0, deliveries: 0, batches: 0, durationMs: 0 };
    }
    try {
      // Never wait long for a lock a writer or the relay holds: skip it now, take it next time.
      await client.query("SET lock_timeout = '2s'");
      const now = options.now ?? new Date();
      const day = 86_400_000;
      const total = { events: 0, acks: 0, deliveries: 0, batches: 0 };
      const processedEvents = await deleteInBatches(client, DELETE_PROCESSED, new Date(now.getTime() - options.days * day), options, total);
      const deadEvents = await deleteInBatches(client, DELETE_DEAD, new Date(now.getTime() - options.deadDays * day), options, total);
      const result: RetentionResult = {
        skipped: false,
        processedEvents,
        deadEvents,
        acknowledgments: total.acks,
        deliveries: total.deliveries,
        batches: total.batches,
        durationMs: Date.now() - started,
      };
      options.logger.info(result, 'retention finished');
      return result;
    } finally {
      await client.query('RESET lock_timeout').catch(() => undefined);
      await client.query('SELECT pg_advisory_unlock($1)', [RETENTION_LOCK_KEY]).catch(() => undefined);
    }
  });
}

/**
 * Samples the queue for the gauges that need a database query (pending and dead deliveries, the lag
 * per tenant), on a timer rather than per scrape, so that scrapes stay cheap and a slow query never
 * piles up. Each sample is one statement with a short statement_timeout.
 */
import type pg from 'pg';
import { queryWithTimeout } from '../db/connection.js';
import { PeriodicTask } from '../daemon/periodicTask.js';
import type { Logger } from '../log.js';
import type { QueueSample, RelayMetrics } from './relayMetrics.js';

/**
 * Per tenant: live and dead deliveries and the age of the oldest live one (since fan-out), merged
 * with events still waiting for fan-out (age since capture). The queue is small in steady state.
 */
const SAMPLE_QUEUE = `
WITH deliveries AS (
  SELECT s.tenant::text AS tenant,
         count(*) FILTER (WHERE d.state <> 'dead') AS pending,
         count(*) FILTER (WHERE d.state = 'dead') AS dead,
         min(d.created_at) FILTER (WHERE d.state <> 'dead') AS oldest
  FROM public.outbox_deliveries AS d
  JOIN public.outbox_subscriptions AS s ON s.id = d.subscription_id
  GROUP BY s.tenant
),
waiting AS (
  SELECT e.tenant::text AS tenant, count(*) AS queued, min(e.created_at) AS oldest
  FROM public.outbox_fanout_queue AS q JOIN public.outbox_events AS e ON e.id = q.event_id
  GROUP BY e.tenant
),
-- Every tenant with a subscription is reported (0 when caught up), so gauges never just vanish.
tenants AS (
  SELECT DISTINCT s.tenant::text AS tenant FROM public.outbox_subscriptions AS s
  UNION SELECT tenant FROM deliveries
  UNION SELECT tenant FROM waiting
)
SELECT t.tenant,
       coalesce(d.pending, 0)::float8 AS pending,
       coalesce(d.dead, 0)::float8 AS dead,
       coalesce(w.queued, 0)::float8 AS queued,
       coalesce(extract(epoch FROM now() - least(d.oldest, w.oldest)), 0)::float8 AS oldest_age
FROM tenants AS t
LEFT JOIN deliveries AS d ON d.tenant = t.tenant
LEFT JOIN waiting AS w ON w.tenant = t.tenant`;

export interface SamplerOptions {
  pool: pg.Pool;
  metrics: RelayMetrics;
  logger: Logger;
  intervalMs?: number;
}

export class QueueSampler {
  private readonly task: PeriodicTask<void>;

  constructor(private readonly options: SamplerOptions) {
    this.task = new PeriodicTask(() => this.run(), options.intervalMs ?? 15_000);
  }

  start(): void {
    this.task.start();
  }

  /** One sample now (skipped while the previous one still runs). */
  sample(): Promise<void> {
    return this.task.now();
  }

  private async run(): Promise<void> {
    try {
      const { rows } = await queryWithTimeout<{ tenant: string; pending: number; dead: number; queued: number; oldest_age: number }>(this.options.pool, 5_000, { text: SAMPLE_QUEUE });
      const samples: QueueSample[] = rows.map((r) => ({ tenant: r.tenant, pending: r.pending + r.queued, dead: r.dead, oldestAgeSeconds: Math.max(0, r.oldest_age) }));
      this.options.metrics.setQueueSample(samples, rows.reduce((n, r) => n + r.queued, 0));
    } catch (err) {
      // The database is down or slow: the gauges keep their last values, database_up says why.
      this.options.logger.debug({ err: (err as Error).message }, 'queue sample failed; gauges keep their last values');
    }
  }

  stop(): Promise<void> {
    return this.task.stop();
  }
}

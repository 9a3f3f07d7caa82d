/**
 * 2. Idle commit-to-receiver latency: a writer in this process commits one row every ~50 ms; latency is
 * the receipt time at the receiver (also in this process, same clock) minus the time the writer's
 * commit was acknowledged. The same from just before the INSERT was sent is reported beside it: it
 * adds the writer's own statement and WAL flush, whose rare stalls on this VM's disk (up to hundreds
 * of ms) are no part of delivery. The relay is a separate process (`node dist/cli.js run`, notify mode idle as
 * configured by default). The same measurement serves the graphile-worker peer.
 */
import type { Ctx, LatencyFigures } from '../context.js';
import { note } from '../lifecycle.js';
import { spawnRelay, type Proc } from '../processes.js';
import { createTenant, latencies, pacedWriter, quantile, subscribe } from '../workload.js';
import { round } from './common.js';

const WARMUP_ROWS = 10;

/** Warm-up rows, then the measured rows, paced; the worker process is stopped at the end. */
export async function measureLatency(ctx: Ctx, options: { url: string; tenant: string; label: string; start: () => Proc }): Promise<LatencyFigures> {
  const { label } = options;
  const arrivals = ctx.receiver.trackLatency(label);
  const proc = options.start();
  try {
    const interval = ctx.opts.latencyIntervalMs;
    await pacedWriter(options.url, options.tenant, 1, WARMUP_ROWS, interval);
    await ctx.receiver.waitFor(label, WARMUP_ROWS, { timeoutMs: 60_000, stallMs: 60_000, check: () => proc.assertRunning() });
    const rows = ctx.opts.latencyRows;
    const first = 1_000;
    const { sent, committed } = await pacedWriter(options.url, options.tenant, first, rows, interval);
    await ctx.receiver.waitFor(label, WARMUP_ROWS + rows, { timeoutMs: 60_000, stallMs: 20_000, check: () => proc.assertRunning() }).catch((err: unknown) => {
      note(`  not every row arrived: ${err instanceof Error ? err.message : String(err)}`);
    });
    const { values, missing } = latencies(committed, arrivals);
    const fromInsert = latencies(sent, arrivals).values;
    const commit = [...sent].map(([id, t]) => (committed.get(id) ?? t) - t);
    const summary = (v: number[]): { p50: number; p99: number; max: number } => ({
      p50: round(quantile(v, 0.5), 2),
      p99: round(quantile(v, 0.99), 2),
      max: round(Math.max(...v), 2),
    });
    return {
      rows,
      missing,
      ...summary(values),
      p90: round(quantile(values, 0.9), 2),
      mean: round(values.reduce((a, b) => a + b, 0) / Math.max(1, values.length), 2),
      fromInsert: summary(fromInsert),
      commit: summary(commit),
    };
  } finally {
    await proc.stop();
  }
}

export async function latencySection(ctx: Ctx): Promise<void> {
  const label = 'latency';
  const tenant = 'bench_tenant';
  const db = await ctx.server.createDatabase(label);
  try {
    await createTenant(db.pool, tenant);
    const sub = await subscribe(db.pool, { tenant, userId: 1, url: ctx.receiver.url(label), ordering: 'aggregate' });
    ctx.receiver.setSecret(label, sub.secret);
    note(`2. idle latency: one row every ${ctx.opts.latencyIntervalMs} ms, ${ctx.opts.latencyRows} rows`);
    const figures = await measureLatency(ctx, {
      url: db.url,
      tenant,
      label,
      start: () => spawnRelay(db.url, { workerId: 'latency-1' }),
    });
    const { rows } = await db.pool.query<{ notify_mode: string }>('SELECT notify_mode FROM public.outbox_relay_state');
    ctx.results.latency = { ...figures, intervalMs: ctx.opts.latencyIntervalMs, notifyMode: rows[0]?.notify_mode ?? '?' };
    note(`  p50 ${figures.p50} ms, p99 ${figures.p99} ms from the commit; p50 ${figures.fromInsert.p50} ms, p99 ${figures.fromInsert.p99} ms from the INSERT sent`);
  } finally {
    await db.drop();
  }
}

/**
 * 4. A backlog of pending events (1,000,000 by default) loaded through the capture trigger in chunks,
 * then one relay drains it: the rate of each 10% slice (is it steady?) and the relay's peak RSS
 * (VmRSS sampled every 250 ms, and the kernel's VmHWM read before it stops).
 */
import type { Ctx } from '../context.js';
import { note } from '../lifecycle.js';
import { spawnRelay } from '../processes.js';
import { checkpoint, countRows, createTenant, loadInserts, subscribe } from '../workload.js';
import { figures, measureRun, round } from './common.js';

const TENANT = 'bench_tenant';

/** A slice is "steady" when its rate is within this factor of the median slice (the first excluded: it includes start-up). */
export const STEADY_BAND = 0.7;

export async function drainSection(ctx: Ctx): Promise<void> {
  const label = 'drain';
  const events = ctx.opts.drainN;
  const db = await ctx.server.createDatabase(label);
  try {
    await createTenant(db.pool, TENANT);
    const sub = await subscribe(db.pool, { tenant: TENANT, userId: 1, url: ctx.receiver.url(label), ordering: 'none' });
    ctx.receiver.setSecret(label, sub.secret);
    note(`4. backlog drain: loading ${events.toLocaleString('en-US')} events through the capture trigger`);
    const t0 = performance.now();
    await loadInserts(db.pool, TENANT, 1, events, 'drain backlog');
    await checkpoint(db.pool);
    const loadSeconds = (performance.now() - t0) / 1000;
    note(`  loaded in ${Math.round(loadSeconds)} s; starting one relay`);
    const thresholds = Array.from({ length: 10 }, (_, i) => Math.round(((i + 1) * events) / 10));
    const milestones = ctx.receiver.trackMilestones(label, thresholds);
    let rss: ReturnType<import('../processes.js').Proc['sampleRss']> | undefined;
    let vmHwmMb = 0;
    const run = await measureRun(ctx, {
      dbName: db.name,
      pool: db.pool,
      what: 'backlog drain',
      stallSeconds: 90,
      start: () => {
        const relay = spawnRelay(db.url, { workerId: `${label}-1` });
        rss = relay.sampleRss(250);
        return [relay];
      },
      expect: [{ label, count: events }],
      beforeStop: () => {
        vmHwmMb = rss?.hwmMb() ?? 0;
      },
    });
    const t = run.procs[0]?.startedAt ?? 0;
    const slices: Array<{ upTo: number; seconds: number; perSecond: number }> = [];
    let prevAt = t;
    let prevN = 0;
    for (const upTo of thresholds) {
      const at = milestones.get(upTo) ?? Number.NaN;
      const seconds = (at - prevAt) / 1000;
      slices.push({ upTo, seconds: round(seconds, 2), perSecond: round((upTo - prevN) / seconds) });
      prevAt = at;
      prevN = upTo;
    }
    const rates = slices.slice(1).map((s) => s.perSecond).sort((a, b) => a - b);
    const median = rates[Math.floor(rates.length / 2)] ?? Number.NaN;
    const minOverMedian = round((rates[0] ?? Number.NaN) / median, 2);
    const maxOverMedian = round((rates[rates.length - 1] ?? Number.NaN) / median, 2);
    const leftInQueue = await countRows(db.pool, 'SELECT count(*) AS n FROM public.outbox_deliveries');
    ctx.results.drain = {
      ...figures(run),
      leftInQueue,
      events,
      loadSeconds: round(loadSeconds),
      slices,
      steadiness: { minOverMedian, maxOverMedian, firstOverMedian: round((slices[0]?.perSecond ?? Number.NaN) / median, 2), steady: minOverMedian >= STEADY_BAND && maxOverMedian <= 1 / STEADY_BAND },
      peakRssMb: round(rss?.peakRssMb() ?? 0),
      vmHwmMb: round(vmHwmMb),
      rssSamples: rss?.samples() ?? 0,
    };
    note(`  ${run.perSecond.toLocaleString('en-US')} deliveries/s overall; slices ${slices.map((s) => Math.round(s.perSecond)).join(', ')}; peak RSS ${round(vmHwmMb)} MB`);
  } finally {
    await db.drop();
  }
}

/**
 * 7. graphile-worker 0.16, the peer, against the same receiver: throughput draining the same number of
 * pre-loaded jobs (queued in bulk with graphile_worker.add_jobs), each job POSTing the same ~1 KB event
 * body, signed the same way; and idle latency with a row trigger calling graphile_worker.add_job per
 * row, measured exactly as ours.
 */
import type { Ctx } from '../context.js';
import { note } from '../lifecycle.js';
import { addJobsBulk, graphileVersion, installEnqueueTrigger, installGraphile } from '../graphile.js';
import { spawnGraphileWorker } from '../processes.js';
import { checkpoint, createTenant } from '../workload.js';
import { generateSigningSecret } from '../../src/webhook/secret.js';
import { figures, measureRun } from './common.js';
import { measureLatency } from './latency.js';

const TENANT = 'bench_tenant';

export async function peerSection(ctx: Ctx): Promise<void> {
  const { graphileConcurrency: concurrency, graphileMaxPoolSize: maxPoolSize } = ctx.opts;
  const out: NonNullable<Ctx['results']['peer']> = {
    version: await graphileVersion(),
    settings: { concurrentJobs: concurrency, maxPoolSize, pollInterval: 2000 },
    unsupported: ['localQueue', 'completeJobBatchDelay', 'failJobBatchDelay'],
  };
  ctx.results.peer = out;
  note(`7. graphile-worker ${out.version} (concurrentJobs ${concurrency}, maxPoolSize ${maxPoolSize})`);

  {
    const label = 'gw_throughput';
    const db = await ctx.server.createDatabase(label, { migrated: false });
    try {
      await installGraphile(db.url);
      const secret = generateSigningSecret();
      ctx.receiver.setSecret(label, secret);
      note(`  queueing ${ctx.opts.n.toLocaleString('en-US')} jobs with add_jobs`);
      const loadJobsPerSecond = await addJobsBulk(db.pool, TENANT, 1, ctx.opts.n);
      await checkpoint(db.pool);
      const run = await measureRun(ctx, {
        dbName: db.name,
        pool: db.pool,
        what: 'graphile-worker',
        start: () => [spawnGraphileWorker(db.url, { targetUrl: ctx.receiver.url(label), secret, concurrency, maxPoolSize })],
        expect: [{ label, count: ctx.opts.n }],
      });
      out.throughput = { ...figures(run), loadJobsPerSecond: Math.round(loadJobsPerSecond) };
      note(`  ${run.perSecond.toLocaleString('en-US')} jobs/s`);
    } finally {
      await db.drop();
    }
  }

  {
    const label = 'gw_latency';
    const db = await ctx.server.createDatabase(label, { migrated: false });
    try {
      await installGraphile(db.url);
      await createTenant(db.pool, TENANT, { capture: false });
      await installEnqueueTrigger(db.pool, TENANT);
      const secret = generateSigningSecret();
      ctx.receiver.setSecret(label, secret);
      const lat = await measureLatency(ctx, {
        url: db.url,
        tenant: TENANT,
        label,
        start: () => spawnGraphileWorker(db.url, { targetUrl: ctx.receiver.url(label), secret, concurrency, maxPoolSize }),
      });
      out.latency = { ...lat, intervalMs: ctx.opts.latencyIntervalMs };
      note(`  p50 ${lat.p50} ms, p99 ${lat.p99} ms`);
    } finally {
      await db.drop();
    }
  }
}

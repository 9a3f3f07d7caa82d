/**
 * 5. A dead subscriber (a server that accepts connections and never answers: every request times out)
 * on one tenant beside a healthy subscriber on another: the healthy one's deliveries/s against its solo
 * figure, measured in the same way (one relay, one subscription, ordering none) just before and just
 * after, and averaged: this VM's speed drifts within minutes, and one reference on one side of the
 * comparison put the drift into the ratio.
 *
 * 6. Three relay replicas against one on the same backlog, with the CPU of PostgreSQL, the relays and
 * the receiver, to say where the bottleneck is.
 */
import { availableParallelism } from 'node:os';
import type { Ctx, RunFigures } from '../context.js';
import { note, onCleanup } from '../lifecycle.js';
import { spawnRelay } from '../processes.js';
import { startDeadServer } from '../receiver.js';
import { checkpoint, countRows, createTenant, loadInserts, subscribe } from '../workload.js';
import { figures, measureRun, round } from './common.js';
import { runNone } from './throughput.js';

const HEALTHY = 'bench_healthy';
const DEAD = 'bench_dead';
/** Request timeout of the dead subscription: short, so that timeouts happen while the healthy one drains. */
const DEAD_TIMEOUT_MS = 2_000;

/**
 * The reference figure of sections 5 and 6: one relay, one subscription, ordering none, measured
 * right before the comparison (run-to-run noise on a shared 2-core machine is +-15%, so a figure
 * from minutes earlier would make the ratio mostly noise).
 */
async function referenceRun(ctx: Ctx, label: string): Promise<RunFigures> {
  note('  measuring the reference: one relay, one subscription (ordering none)');
  const run = await runNone(ctx, label);
  note(`  reference: ${run.perSecond.toLocaleString('en-US')} deliveries/s`);
  return run;
}

export async function isolationSection(ctx: Ctx): Promise<void> {
  note('5. dead subscriber beside a healthy one');
  const soloRun = await referenceRun(ctx, 'solo');
  const label = 'healthy';
  const n = ctx.opts.n;
  const dead = await startDeadServer();
  const closeDead = onCleanup('dead server', () => dead.close());
  const db = await ctx.server.createDatabase('isolation');
  try {
    await createTenant(db.pool, HEALTHY);
    await createTenant(db.pool, DEAD);
    const healthy = await subscribe(db.pool, { tenant: HEALTHY, userId: 1, url: ctx.receiver.url(label), ordering: 'none' });
    ctx.receiver.setSecret(label, healthy.secret);
    const deadSub = await subscribe(db.pool, { tenant: DEAD, userId: 2, url: dead.url, ordering: 'none', timeoutMs: DEAD_TIMEOUT_MS });
    // Interleaved, so the dead tenant's events are fanned out and claimed all along the healthy drain.
    note(`  loading ${n.toLocaleString('en-US')} events for each tenant, interleaved`);
    const chunk = 10_000;
    for (let first = 1; first <= n; first += chunk) {
      const count = Math.min(chunk, n - first + 1);
      await loadInserts(db.pool, HEALTHY, first, count);
      await loadInserts(db.pool, DEAD, first, count);
    }
    await checkpoint(db.pool);
    const run = await measureRun(ctx, {
      dbName: db.name,
      pool: db.pool,
      what: 'healthy beside dead',
      start: () => [spawnRelay(db.url, { workerId: 'isolation-1' })],
      expect: [{ label, count: n }],
    });
    const deadAttempts = await countRows(db.pool, 'SELECT coalesce(sum(attempts), 0) AS n FROM public.outbox_deliveries WHERE subscription_id = $1', [deadSub.id]);
    const healthyFigures = figures(run);
    await db.drop();
    await closeDead();
    const soloAfterRun = await referenceRun(ctx, 'solo_after');
    const solo = {
      perSecond: Math.round((soloRun.perSecond + soloAfterRun.perSecond) / 2),
      from: `the mean of solo runs just before and after: ${Math.round(soloRun.perSecond).toLocaleString('en-US')} and ${Math.round(soloAfterRun.perSecond).toLocaleString('en-US')}/s`,
    };
    ctx.results.isolation = {
      healthy: healthyFigures,
      soloRun,
      soloAfterRun,
      solo,
      ratio: round(healthyFigures.perSecond / solo.perSecond, 3),
      deadConnections: dead.connections,
      deadAttempts,
      deadEvents: n,
    };
    note(`  healthy ${healthyFigures.perSecond.toLocaleString('en-US')}/s vs solo ${solo.perSecond.toLocaleString('en-US')}/s; dead subscriber: ${deadAttempts} attempts over ${dead.connections} connections`);
  } finally {
    await db.drop();
    await closeDead();
  }
}

export async function replicasSection(ctx: Ctx): Promise<void> {
  note('6. three relay replicas on one backlog');
  const oneRun = await referenceRun(ctx, 'one_replica');
  const one = { perSecond: oneRun.perSecond, from: 'a one-replica run just before', cpu: oneRun.cpu };
  const label = 'replicas';
  const db = await ctx.server.createDatabase(label);
  try {
    await createTenant(db.pool, 'bench_tenant');
    const sub = await subscribe(db.pool, { tenant: 'bench_tenant', userId: 1, url: ctx.receiver.url(label), ordering: 'none' });
    ctx.receiver.setSecret(label, sub.secret);
    await loadInserts(db.pool, 'bench_tenant', 1, ctx.opts.n);
    await checkpoint(db.pool);
    const run = await measureRun(ctx, {
      dbName: db.name,
      pool: db.pool,
      what: '3 replicas',
      start: () => [1, 2, 3].map((i) => spawnRelay(db.url, { workerId: `replica-${i}` })),
      expect: [{ label, count: ctx.opts.n }],
    });
    const leftInQueue = await countRows(db.pool, 'SELECT count(*) AS n FROM public.outbox_deliveries');
    const three = { ...figures(run), leftInQueue };
    ctx.results.replicas = { one, oneRun, three, ratio: round(three.perSecond / one.perSecond, 3), bottleneck: bottleneck(three.cpu) };
    note(`  3 replicas ${three.perSecond.toLocaleString('en-US')}/s vs 1 replica ${one.perSecond.toLocaleString('en-US')}/s; ${ctx.results.replicas.bottleneck}`);
  } finally {
    await db.drop();
  }
}

/** Where the CPU went while three replicas ran, and whether the machine was saturated. */
export function bottleneck(cpu: RunFigures['cpu']): string {
  const cores = availableParallelism();
  const capacity = cores * 100;
  const saturated = cpu.machine >= 0.9 * capacity;
  const parts = [
    cpu.postgres !== null ? `postgres ${Math.round(cpu.postgres)}%` : 'postgres n/a',
    `relays ${Math.round(cpu.workers)}%`,
    `receiver ${Math.round(cpu.bench)}%`,
    `other ${Math.round(cpu.other)}%`,
  ];
  const top = cpu.postgres !== null && cpu.postgres >= cpu.workers ? 'PostgreSQL' : 'the relays';
  return saturated
    ? `CPU-bound: the machine was saturated (${Math.round(cpu.machine)}% of ${capacity}%: ${parts.join(', ')}); the largest consumer was ${top}`
    : `not CPU-saturated (${Math.round(cpu.machine)}% of ${capacity}%: ${parts.join(', ')}); the limit is waiting (round trips, locks, in-flight limits), not CPU`;
}

/**
 * 1. End-to-end deliveries/s draining a pre-loaded backlog (rows inserted through the capture trigger
 * while no relay runs), each run in a fresh database: one subscription with ordering `none` over as
 * many aggregates as events; one with ordering `aggregate` over a fixed number of aggregates; ten
 * subscriptions (ten users) of one tenant, counting every delivery.
 */
import type { Ctx, RunFigures } from '../context.js';
import { note } from '../lifecycle.js';
import { spawnRelay } from '../processes.js';
import { checkpoint, countRows, createTenant, loadAggregateEvents, loadInserts, subscribe } from '../workload.js';
import { figures, measureRun } from './common.js';

const TENANT = 'bench_tenant';

/** One subscription, `n` single-row events, one relay: the figure sections 5 and 6 compare against. */
export async function runNone(ctx: Ctx, label: string): Promise<RunFigures & { loadRowsPerSecond: number }> {
  const db = await ctx.server.createDatabase(label);
  try {
    await createTenant(db.pool, TENANT);
    const sub = await subscribe(db.pool, { tenant: TENANT, userId: 1, url: ctx.receiver.url(label), ordering: 'none' });
    ctx.receiver.setSecret(label, sub.secret);
    note(`  loading ${ctx.opts.n.toLocaleString('en-US')} events (ordering none, one aggregate each)`);
    const loadRowsPerSecond = await loadInserts(db.pool, TENANT, 1, ctx.opts.n);
    await checkpoint(db.pool);
    const run = await measureRun(ctx, {
      dbName: db.name,
      pool: db.pool,
      what: 'ordering none',
      start: () => [spawnRelay(db.url, { workerId: `${label}-1` })],
      expect: [{ label, count: ctx.opts.n }],
    });
    const leftInQueue = await countRows(db.pool, 'SELECT count(*) AS n FROM public.outbox_deliveries');
    return { ...figures(run), leftInQueue, loadRowsPerSecond: Math.round(loadRowsPerSecond) };
  } finally {
    await db.drop();
  }
}

export async function throughputSection(ctx: Ctx): Promise<void> {
  const out: NonNullable<Ctx['results']['throughput']> = {};
  ctx.results.throughput = out;
  const { n, aggregates } = ctx.opts;

  note('1a. ordering none, many aggregates');
  out.none = await runNone(ctx, 't_none');
  note(`  ${out.none.perSecond.toLocaleString('en-US')} deliveries/s`);

  note(`1b. ordering aggregate, ${aggregates} aggregates`);
  {
    const label = 't_aggregate';
    const db = await ctx.server.createDatabase(label);
    try {
      await createTenant(db.pool, TENANT);
      const sub = await subscribe(db.pool, { tenant: TENANT, userId: 1, url: ctx.receiver.url(label), ordering: 'aggregate' });
      ctx.receiver.setSecret(label, sub.secret);
      ctx.receiver.trackOrder(label);
      note(`  loading ${n.toLocaleString('en-US')} events over ${aggregates} aggregates (insert/delete rounds)`);
      const loadRowsPerSecond = await loadAggregateEvents(db.pool, TENANT, n, aggregates);
      const events = await countRows(db.pool, 'SELECT count(*) AS n FROM public.outbox_events');
      await checkpoint(db.pool);
      const run = await measureRun(ctx, {
        dbName: db.name,
        pool: db.pool,
        what: 'ordering aggregate',
        start: () => [spawnRelay(db.url, { workerId: `${label}-1` })],
        expect: [{ label, count: events }],
      });
      const leftInQueue = await countRows(db.pool, 'SELECT count(*) AS n FROM public.outbox_deliveries');
      out.aggregate = { ...figures(run), leftInQueue, aggregates, loadRowsPerSecond: Math.round(loadRowsPerSecond) };
      note(`  ${out.aggregate.perSecond.toLocaleString('en-US')} deliveries/s, ${run.orderViolations} order violations`);
    } finally {
      await db.drop();
    }
  }

  note('1c. 10 subscriptions on one tenant');
  {
    const label = 't_fanout';
    const subs = 10;
    const events = Math.ceil(n / subs);
    const db = await ctx.server.createDatabase(label);
    try {
      await createTenant(db.pool, TENANT);
      const labels: string[] = [];
      for (let i = 0; i < subs; i++) {
        const l = `${label}${i}`;
        const sub = await subscribe(db.pool, { tenant: TENANT, userId: 1 + i, url: ctx.receiver.url(l), ordering: 'aggregate' });
        ctx.receiver.setSecret(l, sub.secret);
        labels.push(l);
      }
      note(`  loading ${events.toLocaleString('en-US')} events x ${subs} subscriptions`);
      await loadInserts(db.pool, TENANT, 1, events);
      await checkpoint(db.pool);
      const run = await measureRun(ctx, {
        dbName: db.name,
        pool: db.pool,
        what: '10 subscriptions',
        start: () => [spawnRelay(db.url, { workerId: `${label}-1` })],
        expect: labels.map((l) => ({ label: l, count: events })),
      });
      const leftInQueue = await countRows(db.pool, 'SELECT count(*) AS n FROM public.outbox_deliveries');
      out.fanout = { ...figures(run), leftInQueue, subscriptions: subs, events };
      note(`  ${out.fanout.perSecond.toLocaleString('en-US')} deliveries/s`);
    } finally {
      await db.drop();
    }
  }
}

/**
 * The measurement shared by every throughput figure: start the worker processes (relays or the peer),
 * time from the first spawn until the receiver has every expected delivery, and account the CPU by
 * role over exactly that window; then stop the processes.
 */
import type pg from 'pg';
import type { Ctx, RunFigures } from '../context.js';
import { note } from '../lifecycle.js';
import type { Proc } from '../processes.js';
import { startCpuMeter } from '../procstat.js';

export interface Expectation {
  label: string;
  count: number;
}

export interface MeasureOptions {
  /** The database the processes work on (its backends are PostgreSQL's share of the CPU). */
  dbName: string;
  /** A pool on that database, to read the WAL position before and after (WAL bytes per delivery). */
  pool: pg.Pool;
  /** Starts the processes (the clock starts just before the first spawn). */
  start: () => Proc[];
  /** What the receiver must get; the clock stops when the last of these is complete. */
  expect: Expectation[];
  /** Called once everything arrived, before the processes are stopped (e.g. read peak RSS). */
  beforeStop?: (procs: Proc[]) => void;
  /** Seconds without a new delivery before giving up. */
  stallSeconds?: number;
  what: string;
}

export async function measureRun(ctx: Ctx, options: MeasureOptions): Promise<RunFigures & { procs: Proc[] }> {
  const wal0 = await walPosition(options.pool);
  const meter = startCpuMeter(ctx.server.postmasterPid, options.dbName);
  const procs = options.start();
  for (const p of procs) meter.addWorker(p.pid);
  const t0 = Math.min(...procs.map((p) => p.startedAt));
  const total = options.expect.reduce((a, e) => a + e.count, 0);
  let end = t0;
  let lastNote = Date.now();
  try {
    for (const e of options.expect) {
      const at = await ctx.receiver.waitFor(e.label, e.count, {
        timeoutMs: Math.max(180_000, (e.count / 100) * 1000),
        stallMs: (options.stallSeconds ?? 60) * 1000,
        check: () => procs.forEach((p) => p.assertRunning()),
        progress: () => {
          if (Date.now() - lastNote > 15_000) {
            lastNote = Date.now();
            const got = options.expect.reduce((a, x) => a + Math.min(x.count, ctx.receiver.count(x.label)), 0);
            note(`  ${options.what}: ${got.toLocaleString('en-US')} of ${total.toLocaleString('en-US')} delivered`);
          }
        },
      });
      end = Math.max(end, at);
    }
    meter.sampleWorkers();
    const cpu = meter.stop();
    options.beforeStop?.(procs);
    const wal1 = await walPosition(options.pool);
    const seconds = (end - t0) / 1000;
    const stats = options.expect.map((e) => ctx.receiver.stats(e.label));
    const first = Math.min(...stats.map((s) => s.firstAt ?? Number.POSITIVE_INFINITY));
    return {
      deliveries: total,
      seconds: round(seconds, 3),
      perSecond: round(total / seconds, 1),
      walBytesPerDelivery: wal0 !== null && wal1 !== null ? Math.round(Number(wal1 - wal0) / total) : null,
      firstDeliveryMs: Number.isFinite(first) ? Math.round(first - t0) : null,
      cpu,
      workerCpu: cpu.perWorker,
      duplicates: stats.reduce((a, s) => a + s.duplicates, 0),
      badSignatures: stats.reduce((a, s) => a + s.badSignatures, 0),
      verifiedSample: stats.reduce((a, s) => a + s.verified, 0),
      orderViolations: stats.reduce((a, s) => a + s.orderViolations, 0),
      problems: procs.flatMap((p) => p.problems).slice(0, 5),
      procs,
    };
  } finally {
    await Promise.all(procs.map((p) => p.stop()));
  }
}

/** The server's WAL insert position in bytes (server-wide: other databases' writes count too). */
async function walPosition(pool: pg.Pool): Promise<bigint | null> {
  try {
    const { rows } = await pool.query<{ lsn: string }>("SELECT (pg_current_wal_lsn() - '0/0')::text AS lsn");
    return BigInt((rows[0]?.lsn ?? '0').split('.')[0] ?? '0');
  } catch {
    return null;
  }
}

export function round(x: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Strips the process handles off a run's figures (for the JSON). */
export function figures<T extends { procs: Proc[] }>(run: T): Omit<T, 'procs'> {
  const { procs: _procs, ...rest } = run;
  return rest;
}

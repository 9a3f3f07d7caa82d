/**
 * `npm run bench`: PostgreSQL + relay + a local receiver on this one machine, and graphile-worker 0.16
 * as the peer against the same receiver. Prints the JSON document and then the table (progress goes
 * to stderr) and writes the JSON to bench/results/<date>.json.
 *
 *   npm run bench                                  everything (about 10-15 minutes on 2 cores)
 *   npm run bench -- --quick                       everything, small sizes (a smoke run)
 *   npm run bench -- --sections throughput,peer    some sections (names or numbers 1-7)
 *   BENCH_DATABASE_URL=postgres://... npm run bench   use that server (else an embedded PostgreSQL)
 *
 * Sizes: --n (BENCH_N), --drain-n (BENCH_DRAIN_N), --capture-seconds, --latency-rows, --aggregates.
 * Relay settings pass through from the environment (RELAY_*, WEBHOOK_*, RETRY_*, CIRCUIT_*, DB_POOL_MAX).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { SECTION_NAMES, type Ctx, type Options, type Results, type SectionName } from './context.js';
import { openServer, REPO_ROOT } from './db.js';
import { graphileVersion } from './graphile.js';
import { cancel, cancelled, Cancelled, killAllChildrenNow, note, onCleanup, runAllCleanups } from './lifecycle.js';
import { passThroughEnv } from './processes.js';
import { machineInfo } from './procstat.js';
import { startReceiver } from './receiver.js';
import { buildRows, renderDetails, renderHeader, renderTable, type Header } from './report.js';
import { captureSection } from './sections/capture.js';
import { drainSection } from './sections/drain.js';
import { isolationSection, replicasSection } from './sections/isolation.js';
import { latencySection } from './sections/latency.js';
import { peerSection } from './sections/peer.js';
import { throughputSection } from './sections/throughput.js';

const USAGE = `usage: npm run bench -- [--quick] [--sections LIST] [--n N] [--drain-n N] [--aggregates N]
                        [--capture-seconds S] [--latency-rows N]
sections (names or numbers, comma-separated; default all):
  1 throughput  2 latency  3 capture  4 drain  5 isolation  6 replicas  7 peer
environment: BENCH_DATABASE_URL (a server to create databases on; default: embedded PostgreSQL),
  BENCH_SECTIONS, BENCH_N, BENCH_DRAIN_N, BENCH_QUICK=1`;

/** The order sections run in: the long drain last, the peer before it (its figures feed the ratios). */
const RUN_ORDER: SectionName[] = ['throughput', 'latency', 'capture', 'isolation', 'replicas', 'peer', 'drain'];

const SECTIONS: Record<SectionName, (ctx: Ctx) => Promise<void>> = {
  throughput: throughputSection,
  latency: latencySection,
  capture: captureSection,
  drain: drainSection,
  isolation: isolationSection,
  replicas: replicasSection,
  peer: peerSection,
};

function positiveInt(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value.replace(/_/g, ''));
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, got ${JSON.stringify(value)}`);
  return n;
}

function parseOptions(argv: string[]): Options | undefined {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      sections: { type: 'string' },
      n: { type: 'string' },
      'drain-n': { type: 'string' },
      aggregates: { type: 'string' },
      'capture-seconds': { type: 'string' },
      'latency-rows': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return undefined;
  }
  const quick = Boolean(values.quick) || process.env.BENCH_QUICK === '1';
  const list = values.sections ?? process.env.BENCH_SECTIONS;
  let sections: SectionName[] = [...SECTION_NAMES];
  if (list) {
    sections = list.split(',').map((s) => {
      const t = s.trim().toLowerCase();
      const byNumber = /^[1-7]$/.test(t) ? SECTION_NAMES[Number(t) - 1] : undefined;
      const name = byNumber ?? (SECTION_NAMES as readonly string[]).find((x) => x === t);
      if (!name) throw new Error(`unknown section ${JSON.stringify(s)}\n${USAGE}`);
      return name as SectionName;
    });
  }
  return {
    quick,
    sections: RUN_ORDER.filter((s) => sections.includes(s)),
    n: positiveInt('--n', values.n ?? process.env.BENCH_N, quick ? 3_000 : 50_000),
    aggregates: positiveInt('--aggregates', values.aggregates, quick ? 100 : 1_000),
    drainN: positiveInt('--drain-n', values['drain-n'] ?? process.env.BENCH_DRAIN_N, quick ? 20_000 : 1_000_000),
    captureSeconds: positiveInt('--capture-seconds', values['capture-seconds'], quick ? 2 : 8),
    writers: 8,
    latencyRows: positiveInt('--latency-rows', values['latency-rows'], quick ? 40 : 300),
    latencyIntervalMs: 50,
    graphileConcurrency: 24,
    graphileMaxPoolSize: 25,
  };
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  if (!opts) return 0;
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals): void => {
    signals++;
    if (signals > 1) {
      note(`${signal} again: killing everything now`);
      killAllChildrenNow();
      process.exit(130);
    }
    note(`${signal}: stopping (the current section is abandoned; everything started is stopped)`);
    cancel();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const started = new Date();
  const machine = machineInfo();
  const results: Results = {};
  const errors: Record<string, string> = {};
  let header: Header | undefined;
  try {
    const server = await openServer(process.env.BENCH_DATABASE_URL || undefined);
    const receiver = await startReceiver();
    onCleanup('receiver', () => receiver.close());
    header = {
      date: started.toISOString(),
      machine,
      node: process.version,
      postgres: server.version,
      database: `${server.kind === 'embedded' ? 'embedded' : 'BENCH_DATABASE_URL'}; fsync ${server.settings.fsync}, synchronous_commit ${server.settings.synchronous_commit}, shared_buffers ${server.settings.shared_buffers}`,
      graphileWorker: opts.sections.includes('peer') ? await graphileVersion() : null,
      options: opts,
      relayOverrides: passThroughEnv(),
    };
    note(renderHeader(header).split('\n').join('\n  '));
    if (server.postmasterPid === null) note('PostgreSQL is not on this machine (or not visible in /proc): its CPU is reported as n/a');
    const ctx: Ctx = { opts, server, receiver, results };
    for (const name of opts.sections) {
      if (cancelled.aborted) break;
      const t0 = Date.now();
      try {
        await SECTIONS[name](ctx);
        note(`section ${name} done in ${Math.round((Date.now() - t0) / 1000)} s`);
      } catch (err) {
        if (err instanceof Cancelled || cancelled.aborted) break;
        errors[name] = err instanceof Error ? err.message : String(err);
        note(`section ${name} FAILED after ${Math.round((Date.now() - t0) / 1000)} s: ${errors[name]}`);
      }
    }
  } finally {
    note('stopping everything');
    await runAllCleanups();
  }

  const rows = buildRows(results, opts);
  const doc = {
    ...(header ?? { date: started.toISOString(), machine, options: opts }),
    finishedAt: new Date().toISOString(),
    complete: !cancelled.aborted && Object.keys(errors).length === 0 && opts.sections.length === SECTION_NAMES.length,
    cancelled: cancelled.aborted,
    errors,
    results,
    table: rows,
  };
  const day = started.toISOString().slice(0, 10);
  const suffix = (opts.quick ? '-quick' : opts.sections.length < SECTION_NAMES.length ? `-${opts.sections.join('-')}` : '') + (cancelled.aborted ? '-cancelled' : '');
  const dir = join(REPO_ROOT, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${day}${suffix}.json`);
  writeFileSync(file, `${JSON.stringify(doc, null, 2)}\n`);

  process.stdout.write(`${JSON.stringify(doc, null, 2)}\n\n`);
  if (header) process.stdout.write(`${renderHeader(header)}\n\n`);
  process.stdout.write(`${renderTable(rows)}\n`);
  process.stdout.write(`${renderDetails(results)}\n`);
  for (const [name, message] of Object.entries(errors)) process.stdout.write(`\nsection ${name} FAILED: ${message}\n`);
  if (cancelled.aborted) process.stdout.write('\n(cancelled: the figures above are partial)\n');
  process.stdout.write(`\nJSON written to ${file}\n`);
  return cancelled.aborted ? 130 : Object.keys(errors).length > 0 ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  async (err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    await runAllCleanups();
    process.exit(1);
  },
);

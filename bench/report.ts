/**
 * The results as a table (one row per figure: ours, the peer's, the ratio, the issue's target and
 * whether it was met), the details under it (CPU by role, drain slices, notes), and the JSON document.
 */
import type { LatencyFigures, Options, Results, RunFigures, WriterFigures } from './context.js';
import type { Machine } from './procstat.js';

export interface Row {
  id: string;
  what: string;
  ours: string;
  peer: string;
  ratio: string;
  target: string;
  met: 'yes' | 'no' | '-' | string;
}

export interface Header {
  date: string;
  machine: Machine;
  node: string;
  postgres: string;
  database: string;
  graphileWorker: string | null;
  options: Options;
  relayOverrides: Record<string, string>;
}

const int = (x: number): string => (Number.isFinite(x) ? Math.round(x).toLocaleString('en-US') : '-');
const ms = (x: number): string => (Number.isFinite(x) ? `${x.toFixed(1)} ms` : '-');
const pct = (x: number): string => (Number.isFinite(x) ? `${Math.round(x * 100)}%` : '-');
const times = (x: number): string => (Number.isFinite(x) ? `${x.toFixed(2)}x` : '-');
const yesNo = (b: boolean): string => (b ? 'yes' : 'no');

export function buildRows(r: Results, opts: Options): Row[] {
  const rows: Row[] = [];
  const peerRate = r.peer?.throughput?.perSecond ?? Number.NaN;
  const peerShown = r.peer?.throughput ? `${int(peerRate)}/s` : 'not run';
  const ratio = (x: number): number => x / peerRate;

  const t = r.throughput;
  if (t?.none) {
    const x = t.none.perSecond;
    const okAbs = x >= 10_000;
    const okRel = ratio(x) >= 5;
    rows.push({
      id: '1a',
      what: `deliveries/s: 1 subscription, ordering none, ${int(t.none.deliveries)} events (1 aggregate each)`,
      ours: `${int(x)}/s`,
      peer: peerShown,
      ratio: times(ratio(x)),
      target: '>= 10,000/s and >= 5x peer',
      met: r.peer?.throughput ? yesNo(okAbs && okRel) : `${yesNo(okAbs)} (abs.; peer not run)`,
    });
  }
  if (t?.aggregate) {
    const x = t.aggregate.perSecond;
    rows.push({
      id: '1b',
      what: `deliveries/s: 1 subscription, ordering aggregate, ${int(t.aggregate.deliveries)} events over ${int(t.aggregate.aggregates)} aggregates`,
      ours: `${int(x)}/s`,
      peer: peerShown,
      ratio: times(ratio(x)),
      target: '>= 3x peer',
      met: r.peer?.throughput ? yesNo(ratio(x) >= 3) + (t.aggregate.orderViolations ? ` (${t.aggregate.orderViolations} order violations!)` : '') : 'peer not run',
    });
  }
  if (t?.fanout) {
    const x = t.fanout.perSecond;
    rows.push({
      id: '1c',
      what: `deliveries/s: ${t.fanout.subscriptions} subscriptions x ${int(t.fanout.events)} events (all deliveries counted)`,
      ours: `${int(x)}/s`,
      peer: peerShown,
      ratio: times(ratio(x)),
      target: '- (none set)',
      met: '-',
    });
  }
  if (r.latency) {
    const pl = r.peer?.latency;
    rows.push({
      id: '2',
      what: `idle commit-to-receiver latency p50 (1 row / ${r.latency.intervalMs} ms, ${r.latency.rows} rows)`,
      ours: ms(r.latency.p50),
      peer: pl ? ms(pl.p50) : 'not run',
      ratio: pl ? times(r.latency.p50 / pl.p50) : '-',
      target: "< peer's p50 (aim <= 4 ms)",
      met: pl ? yesNo(r.latency.p50 < pl.p50) + (r.latency.p50 <= 4 ? '' : ' (above 4 ms aim)') : 'peer not run',
    });
    rows.push({
      id: '2',
      what: 'idle commit-to-receiver latency p99',
      ours: ms(r.latency.p99),
      peer: pl ? ms(pl.p99) : 'not run',
      ratio: pl ? times(r.latency.p99 / pl.p99) : '-',
      target: '<= 15 ms',
      met: yesNo(r.latency.p99 <= 15),
    });
    rows.push({
      id: '2',
      what: "the same from the INSERT sent (adds the writer's own commit), p50 / p99",
      ours: `${ms(r.latency.fromInsert.p50)} / ${ms(r.latency.fromInsert.p99)}`,
      peer: pl ? `${ms(pl.fromInsert.p50)} / ${ms(pl.fromInsert.p99)}` : 'not run',
      ratio: pl ? `${times(r.latency.fromInsert.p50 / pl.fromInsert.p50)} (p50)` : '-',
      target: '(info)',
      met: '-',
    });
  }
  const c = r.capture;
  if (c) {
    const s = c.single;
    rows.push({
      id: '3',
      what: `writer TPS, ${c.connections} single-row writers, trigger + notify idle (relay busy: the mode under load) vs no trigger`,
      ours: `${int(s.idleBusy.perSecond)} vs ${int(s.none.perSecond)} = ${pct(s.idleBusy.perSecond / s.none.perSecond)}`,
      peer: '-',
      ratio: '-',
      target: '>= 75% of no trigger, wakeups working',
      met: yesNo(s.idleBusy.perSecond / s.none.perSecond >= 0.75 && c.wakeupWhenIdle),
    });
    rows.push({
      id: '3',
      what: `writer TPS, ${c.connections} single-row writers, trigger + notify always (NOTIFY per commit) vs no trigger`,
      ours: `${int(s.always.perSecond)} vs ${int(s.none.perSecond)} = ${pct(s.always.perSecond / s.none.perSecond)}`,
      peer: '-',
      ratio: '-',
      target: '(info: not used under load)',
      met: '-',
    });
    const m = c.multi;
    rows.push({
      id: '3',
      what: `rows/s, ${c.connections} writers of 100-row INSERTs, trigger (statement-level) vs no trigger`,
      ours: `${int(m.idleBusy.rowsPerSecond)} vs ${int(m.none.rowsPerSecond)} = ${pct(m.idleBusy.rowsPerSecond / m.none.rowsPerSecond)}`,
      peer: '-',
      ratio: '-',
      target: '>= 50% of no trigger',
      met: yesNo(m.idleBusy.rowsPerSecond / m.none.rowsPerSecond >= 0.5),
    });
    for (const [shape, f, unit] of [['single-row', s, 'statements/s'], ['100-row', m, 'rows/s']] as const) {
      const ref = f.reference;
      if (!ref) continue;
      const rate = (x: WriterFigures): number => (unit === 'rows/s' ? x.rowsPerSecond : x.perSecond);
      rows.push({
        id: '3',
        what: `${shape} ${unit}: reference trigger (a lower bound for any trigger: the row as JSON into a table with only a key) vs no trigger; ours vs the reference`,
        ours: `${int(rate(ref))} vs ${int(rate(f.none))} = ${pct(rate(ref) / rate(f.none))}; ours ${pct(rate(f.idleBusy) / rate(ref))} of it`,
        peer: '-',
        ratio: '-',
        target: '(info: what the barest trigger costs)',
        met: '-',
      });
    }
  }
  const d = r.drain;
  if (d) {
    rows.push({
      id: '4',
      what: `backlog drain of ${int(d.events)} events: overall rate; 10% slices vs their median (slice 1 incl. start-up; slices 2-10 min-max)`,
      ours: `${int(d.perSecond)}/s; ${d.steadiness.firstOverMedian.toFixed(2)}; ${d.steadiness.minOverMedian.toFixed(2)}-${d.steadiness.maxOverMedian.toFixed(2)}`,
      peer: peerShown,
      ratio: times(ratio(d.perSecond)),
      target: 'steady rate (slices 2-10 within 0.7-1.43x of median)',
      met: yesNo(d.steadiness.steady),
    });
    rows.push({
      id: '4',
      what: 'relay peak RSS during the drain (VmHWM; highest sampled VmRSS)',
      ours: `${d.vmHwmMb.toFixed(0)} MB (${d.peakRssMb.toFixed(0)} MB)`,
      peer: '-',
      ratio: '-',
      target: '<= 200 MB',
      met: yesNo(Math.max(d.vmHwmMb, d.peakRssMb) <= 200),
    });
  }
  const iso = r.isolation;
  if (iso) {
    rows.push({
      id: '5',
      what: `healthy subscriber beside a dead one (timeouts), vs its solo figure (${iso.solo.from})`,
      ours: `${int(iso.healthy.perSecond)} vs ${int(iso.solo.perSecond)} = ${pct(iso.ratio)}`,
      peer: '-',
      ratio: '-',
      target: '>= 90% of solo',
      met: yesNo(iso.ratio >= 0.9),
    });
  }
  const rep = r.replicas;
  if (rep) {
    rows.push({
      id: '6',
      what: `3 relay replicas vs 1 (${rep.one.from}), same backlog`,
      ours: `${int(rep.three.perSecond)} vs ${int(rep.one.perSecond)} = ${times(rep.ratio)}`,
      peer: '-',
      ratio: '-',
      target: '>= 1.5x until PostgreSQL is the bottleneck',
      met: rep.ratio >= 1.5 ? 'yes' : `no (${rep.bottleneck.startsWith('CPU-bound') ? 'CPU-bound machine' : 'not CPU-bound'})`,
    });
  }
  const p = r.peer;
  if (p?.throughput) {
    rows.push({
      id: '7',
      what: `graphile-worker ${p.version}: jobs/s draining ${int(p.throughput.deliveries)} jobs queued with add_jobs`,
      ours: '-',
      peer: `${int(p.throughput.perSecond)}/s`,
      ratio: '-',
      target: '(reference: ~1,800/s)',
      met: '-',
    });
  }
  if (p?.latency) {
    rows.push({
      id: '7',
      what: `graphile-worker ${p.version}: idle latency via row trigger + add_job, p50 / p99`,
      ours: '-',
      peer: `${ms(p.latency.p50)} / ${ms(p.latency.p99)}`,
      ratio: '-',
      target: '(reference: 4.4 / ~11 ms)',
      met: '-',
    });
  }
  void opts;
  return rows;
}

export function renderTable(rows: Row[]): string {
  const head: Row = { id: '#', what: 'measurement', ours: 'outbox-relay', peer: 'graphile-worker', ratio: 'ratio', target: 'target (issue 3)', met: 'met' };
  const cols: Array<keyof Row> = ['id', 'what', 'ours', 'peer', 'ratio', 'target', 'met'];
  const all = [head, ...rows];
  const width = (k: keyof Row): number => Math.max(...all.map((r) => r[k].length));
  const widths = cols.map(width);
  const line = (r: Row): string => cols.map((k, i) => r[k].padEnd(widths[i] ?? 0)).join(' | ').trimEnd();
  const sep = widths.map((w) => '-'.repeat(w)).join('-+-');
  return [line(head), sep, ...rows.map(line)].join('\n');
}

/** The latency from the INSERT sent, and the writer's own statement-and-commit time that it adds. */
function latencyDetail(l: LatencyFigures): string {
  return `from the INSERT sent: p50 ${ms(l.fromInsert.p50)}, p99 ${ms(l.fromInsert.p99)}, max ${ms(l.fromInsert.max)}; the writer's INSERT and commit alone: p50 ${ms(l.commit.p50)}, p99 ${ms(l.commit.p99)}, max ${ms(l.commit.max)}`;
}

function cpuLine(name: string, f: RunFigures): string {
  const c = f.cpu;
  const per = f.workerCpu.length > 1 ? ` (each: ${f.workerCpu.map((x) => `${Math.round(x)}%`).join(', ')})` : '';
  const us = (p: number | null): string => (p === null ? 'n/a' : String(Math.round(((p / 100) * c.seconds * 1e6) / f.deliveries)));
  const perDelivery = `CPU per delivery (µs): postgres ${us(c.postgres)}, workers ${us(c.workers)}, receiver ${us(c.bench)}`;
  return `  ${name}: ${f.seconds.toFixed(1)} s, first delivery after ${f.firstDeliveryMs ?? '-'} ms; CPU (% of one core): postgres ${c.postgres === null ? 'n/a' : Math.round(c.postgres)}, workers ${Math.round(c.workers)}${per}, receiver ${Math.round(c.bench)}, other ${Math.round(c.other)}, machine ${Math.round(c.machine)}; ${perDelivery}; WAL ${f.walBytesPerDelivery ?? '-'} B/delivery; duplicates ${f.duplicates}, bad signatures ${f.badSignatures} (of ${f.verifiedSample + f.badSignatures} verified)${f.leftInQueue !== undefined ? `, left in queue ${f.leftInQueue}` : ''}${f.problems.length ? `; ${f.problems.length} warnings logged` : ''}`;
}

export function renderDetails(r: Results): string {
  const out: string[] = ['', 'details'];
  const t = r.throughput;
  if (t?.none) out.push(cpuLine('1a ordering none', t.none));
  if (t?.aggregate) out.push(cpuLine(`1b ordering aggregate (order violations: ${t.aggregate.orderViolations ?? 0})`, t.aggregate));
  if (t?.fanout) out.push(cpuLine('1c 10 subscriptions', t.fanout));
  if (r.latency) {
    const l = r.latency;
    out.push(`  2 latency (notify mode ${l.notifyMode}) from the commit: p50 ${ms(l.p50)}, p90 ${ms(l.p90)}, p99 ${ms(l.p99)}, max ${ms(l.max)}, mean ${ms(l.mean)}; ${l.missing} of ${l.rows} rows missing`);
    out.push(`    ${latencyDetail(l)}`);
  }
  if (r.capture) {
    const c = r.capture;
    const w = (name: string, f: typeof c.single.none): string =>
      `    ${name.padEnd(44)} ${int(f.perSecond).padStart(8)} stmt/s ${int(f.rowsPerSecond).padStart(9)} rows/s  (${f.notifications} NOTIFYs heard)`;
    out.push(`  3 capture (${c.connections} writers, ${c.single.none.seconds.toFixed(0)} s each; wakeup once the relay is idle: ${c.wakeupWhenIdle ? 'works' : 'NOT SEEN'}):`);
    out.push(w('single-row, no trigger', c.single.none), w('single-row, trigger, notify always', c.single.always), w('single-row, trigger, notify idle, relay busy', c.single.idleBusy));
    out.push(w('100-row, no trigger', c.multi.none), w('100-row, trigger, notify idle, relay busy', c.multi.idleBusy), w('100-row, trigger, notify always', c.multi.always));
    if (c.single.reference) out.push(w('single-row, reference trigger', c.single.reference));
    if (c.multi.reference) out.push(w('100-row, reference trigger', c.multi.reference));
  }
  if (r.drain) {
    const d = r.drain;
    out.push(cpuLine(`4 drain of ${int(d.events)} (loaded in ${d.loadSeconds.toFixed(0)} s)`, d));
    out.push(`    slices (deliveries/s per 10%): ${d.slices.map((s) => int(s.perSecond)).join(', ')}; RSS peak ${d.peakRssMb.toFixed(0)} MB sampled ${d.rssSamples} times, VmHWM ${d.vmHwmMb.toFixed(0)} MB`);
  }
  if (r.isolation) {
    const i = r.isolation;
    out.push(cpuLine('5 solo reference', i.soloRun));
    out.push(cpuLine('5 healthy beside dead', i.healthy));
    if (i.soloAfterRun) out.push(cpuLine('5 solo reference, after', i.soloAfterRun));
    out.push(`    dead subscriber: ${int(i.deadEvents)} events, ${int(i.deadAttempts)} attempts made over ${i.deadConnections} connections while the healthy one drained`);
  }
  if (r.replicas) {
    if (r.replicas.oneRun) out.push(cpuLine('6 one replica', r.replicas.oneRun));
    out.push(cpuLine('6 three replicas', r.replicas.three));
    out.push(`    ${r.replicas.bottleneck}`);
  }
  if (r.peer) {
    const p = r.peer;
    out.push(`  7 graphile-worker ${p.version}: ${Object.entries(p.settings).map(([k, v]) => `${k} ${String(v)}`).join(', ')}; not in 0.16 (added in 0.17): ${p.unsupported.join(', ')}`);
    if (p.throughput) out.push(cpuLine('7 graphile-worker throughput', p.throughput));
    if (p.latency) {
      out.push(`    latency from the commit: p50 ${ms(p.latency.p50)}, p90 ${ms(p.latency.p90)}, p99 ${ms(p.latency.p99)}, max ${ms(p.latency.max)}; ${p.latency.missing} of ${p.latency.rows} missing`);
      out.push(`    ${latencyDetail(p.latency)}`);
    }
  }
  return out.join('\n');
}

export function renderHeader(h: Header): string {
  const m = h.machine;
  return [
    `outbox-relay benchmark, ${h.date}`,
    `machine: ${m.cpuModel}, ${m.cores} cores, ${m.memoryGb} GB RAM, Linux ${m.kernel}; load average at start ${m.loadAverage.join(' ')}`,
    `Node ${h.node}; PostgreSQL ${h.postgres} (${h.database}); graphile-worker ${h.graphileWorker ?? '-'}`,
    `sizes: N=${h.options.n.toLocaleString('en-US')} per throughput run, drain ${h.options.drainN.toLocaleString('en-US')}, capture ${h.options.captureSeconds} s x ${h.options.writers} writers, latency ${h.options.latencyRows} rows every ${h.options.latencyIntervalMs} ms${h.options.quick ? ' (--quick)' : ''}`,
    ...(Object.keys(h.relayOverrides).length ? [`relay settings from the environment: ${Object.entries(h.relayOverrides).map(([k, v]) => `${k}=${v}`).join(' ')}`] : []),
  ].join('\n');
}

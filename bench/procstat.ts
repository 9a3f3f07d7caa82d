/**
 * Where the CPU goes, read from /proc: per process (relay, graphile-worker), the PostgreSQL server as a
 * whole (postmaster and every backend, including exited ones through the postmaster's cutime), this
 * process (the receiver and writers), and the machine (so that other developers' load shows up as
 * "other" instead of silently skewing the figures). Also RSS (VmRSS, VmHWM) and the machine facts.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';

let clkTck: number | undefined;
function ticksPerSecond(): number {
  if (clkTck === undefined) {
    try {
      clkTck = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clkTck = 100;
    }
  }
  return clkTck;
}

interface StatFields {
  ppid: number;
  /** utime + stime, seconds. */
  own: number;
  /** cutime + cstime (children waited for), seconds. */
  children: number;
}

function readStat(pid: number): StatFields | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // The command name may hold spaces and parentheses: fields start after the last ')'.
  const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const n = (i: number): number => Number(rest[i] ?? 0);
  const hz = ticksPerSecond();
  return { ppid: n(1), own: (n(11) + n(12)) / hz, children: (n(13) + n(14)) / hz };
}

/** CPU seconds a process has used so far (its own, not its children's); undefined once it is gone. */
export function processCpuSeconds(pid: number): number | undefined {
  return readStat(pid)?.own;
}

/** The parent of a process (e.g. the postmaster of a backend). */
export function parentPid(pid: number): number | undefined {
  return readStat(pid)?.ppid;
}

function cmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
  } catch {
    return '';
  }
}

/** PostgreSQL's shared background processes (their titles name no database). */
const AUX_PROCESS = /: (checkpointer|background writer|walwriter|autovacuum launcher|logical replication launcher|stats collector|archiver|io worker|checkpointer)\b/;

/**
 * CPU seconds, per process, of the part of a PostgreSQL server that works for database `dbName`:
 * the postmaster itself, the shared background processes (WAL writer, checkpointer, ...) and every
 * backend or autovacuum worker of that database, but not backends of other databases (other
 * developers' test suites on the same server). A backend that exits between two readings loses what
 * it used since the first one; the relays keep their connections for the whole run.
 */
export function serverCpuByPid(postmasterPid: number, dbName: string): Map<number, number> {
  const out = new Map<number, number>();
  const pm = readStat(postmasterPid);
  if (!pm) return out;
  out.set(postmasterPid, pm.own);
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    const st = readStat(pid);
    if (!st || st.ppid !== postmasterPid) continue;
    const title = cmdline(pid);
    const words = title.split(/\s+/);
    if (words.includes(dbName) || AUX_PROCESS.test(title)) out.set(pid, st.own);
  }
  return out;
}

/** Busy CPU seconds of the whole machine (all cores, everything but idle and iowait). */
export function machineBusySeconds(): number {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
  return (total - idle) / ticksPerSecond();
}

/** VmRSS and VmHWM (peak RSS) of a process, in MB. */
export function memoryMb(pid: number): { rss: number; hwm: number } | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const kb = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0);
  return { rss: kb('VmRSS') / 1024, hwm: kb('VmHWM') / 1024 };
}

export interface Machine {
  cpuModel: string;
  cores: number;
  memoryGb: number;
  kernel: string;
  loadAverage: number[];
}

export function machineInfo(): Machine {
  let cpuModel = 'unknown';
  let memoryGb = os.totalmem() / 1024 ** 3;
  try {
    cpuModel = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? cpuModel;
    const kb = Number(/^MemTotal:\s+(\d+)/m.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    if (kb) memoryGb = kb / 1024 ** 2;
  } catch {
    // not Linux: os.* figures stand
  }
  return {
    cpuModel,
    cores: os.availableParallelism(),
    memoryGb: Math.round(memoryGb * 10) / 10,
    kernel: os.release(),
    loadAverage: os.loadavg().map((x) => Math.round(x * 100) / 100),
  };
}

/** CPU used during an interval, in percent of one core, by role. */
export interface CpuBreakdown {
  seconds: number;
  postgres: number | null;
  /** The relay processes (or the graphile-worker process), summed. */
  workers: number;
  /** Each of them. */
  perWorker: number[];
  /** This process: the receiver (and writers, where a section has them). */
  bench: number;
  /** Everything else on the machine (other developers' test suites and their databases, the kernel's own threads). */
  other: number;
  machine: number;
}

export interface CpuMeter {
  /** Adds a process to the "workers" role; one spawned during the interval counts from zero. */
  addWorker(pid: number, spawnedDuringInterval?: boolean): void;
  /** Reads the workers' counters now (call before they exit). */
  sampleWorkers(): void;
  stop(): CpuBreakdown;
}

/**
 * Starts measuring CPU by role; `stop()` returns the breakdown since the start. PostgreSQL counts
 * the processes working for `dbName` (see serverCpuByPid).
 */
export function startCpuMeter(postmasterPid: number | null, dbName: string): CpuMeter {
  const t0 = performance.now();
  const pg0 = postmasterPid ? serverCpuByPid(postmasterPid, dbName) : undefined;
  const bench0 = process.cpuUsage();
  const machine0 = machineBusySeconds();
  const workers = new Map<number, { first: number; last: number }>();
  const sampleWorkers = (): void => {
    for (const [pid, w] of workers) {
      const s = processCpuSeconds(pid);
      if (s !== undefined) w.last = s;
    }
  };
  return {
    addWorker(pid: number, spawnedDuringInterval = true) {
      const now = processCpuSeconds(pid) ?? 0;
      workers.set(pid, { first: spawnedDuringInterval ? 0 : now, last: now });
    },
    sampleWorkers,
    stop() {
      sampleWorkers();
      const seconds = (performance.now() - t0) / 1000;
      const pct = (cpu: number): number => Math.round((cpu / seconds) * 1000) / 10;
      const pg1 = postmasterPid ? serverCpuByPid(postmasterPid, dbName) : undefined;
      let pgCpu: number | null = null;
      if (pg0 && pg1) {
        pgCpu = 0;
        for (const [pid, cpu] of pg1) pgCpu += cpu - (pg0.get(pid) ?? 0);
      }
      const b = process.cpuUsage(bench0);
      const benchCpu = (b.user + b.system) / 1e6;
      const workerCpu = [...workers.values()].reduce((a, w) => a + (w.last - w.first), 0);
      const machineCpu = machineBusySeconds() - machine0;
      return {
        seconds: Math.round(seconds * 100) / 100,
        postgres: pgCpu === null ? null : pct(pgCpu),
        workers: pct(workerCpu),
        perWorker: [...workers.values()].map((w) => pct(w.last - w.first)),
        bench: pct(benchCpu),
        other: pct(Math.max(0, machineCpu - (pgCpu ?? 0) - workerCpu - benchCpu)),
        machine: pct(machineCpu),
      };
    },
  };
}

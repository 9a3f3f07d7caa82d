/**
 * The processes a section measures: relays (`node dist/cli.js run`, as an operator runs them) and the
 * graphile-worker peer (`node build/bench/graphileWorker.js`). Each is stopped with SIGTERM (SIGKILL
 * after a grace period), at the latest by the run's cleanups; the tail of its output is kept for the
 * error message when it dies.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { REPO_ROOT } from './db.js';
import { note, onCleanup, trackChild } from './lifecycle.js';
import { memoryMb } from './procstat.js';

export interface Proc {
  readonly name: string;
  readonly pid: number;
  /** performance.now() just before spawn(). */
  readonly startedAt: number;
  readonly running: boolean;
  /** Lines logged at warn level or above (relay JSON logs) or on stderr. */
  readonly problems: string[];
  /** Throws if the process has exited (for waits that must not outlive it). */
  assertRunning(): void;
  /** Samples VmRSS every `everyMs` (peak kept) until stopped. */
  sampleRss(everyMs: number): { peakRssMb(): number; samples(): number; hwmMb(): number };
  stop(graceMs?: number): Promise<void>;
}

/** Relay settings for the benchmark; RELAY_*, WEBHOOK_*, RETRY_*, CIRCUIT_* and DB_POOL_MAX from our environment pass through. */
export const PASS_THROUGH = /^(RELAY_|WEBHOOK_|RETRY_|CIRCUIT_|DB_POOL_MAX$|DB_STATEMENT_TIMEOUT_MS$|UV_THREADPOOL_SIZE$)/;

export function passThroughEnv(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && PASS_THROUGH.test(k)) out[k] = v;
  return out;
}

function baseEnv(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of ['PATH', 'HOME', 'LANG', 'TZ', 'TMPDIR']) {
    const v = process.env[k];
    if (v !== undefined) out[k] = v;
  }
  return out;
}

function startProc(name: string, args: string[], env: Record<string, string>): Proc {
  const startedAt = performance.now();
  const child: ChildProcess = spawn(process.execPath, args, { cwd: REPO_ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let running = true;
  let exitInfo = '';
  const tail: string[] = [];
  const problems: string[] = [];
  const keep = (line: string): void => {
    if (!line.trim()) return;
    tail.push(line);
    if (tail.length > 30) tail.shift();
  };
  let partial = '';
  child.stdout?.on('data', (d: Buffer) => {
    const parts = (partial + d.toString('utf8')).split('\n');
    partial = parts.pop() ?? '';
    for (const line of parts) {
      keep(line);
      const level = /"level":(\d+)/.exec(line)?.[1];
      if (level && Number(level) >= 40 && problems.length < 50) problems.push(line.slice(0, 400));
    }
  });
  child.stderr?.on('data', (d: Buffer) => {
    for (const line of d.toString('utf8').split('\n')) {
      keep(line);
      if (line.trim() && !/unencrypted/.test(line) && problems.length < 50) problems.push(line.slice(0, 400));
    }
  });
  const exited = new Promise<void>((resolve) => {
    child.once('exit', (code, signal) => {
      running = false;
      exitInfo = signal ? `signal ${signal}` : `code ${code}`;
      resolve();
    });
  });
  const samplers: NodeJS.Timeout[] = [];
  const pid = child.pid ?? -1;
  const stop = async (graceMs = 25_000): Promise<void> => {
    for (const t of samplers) clearInterval(t);
    if (!running) return;
    child.kill('SIGTERM');
    const timer = setTimeout(() => {
      if (running) {
        note(`${name} did not stop within ${graceMs / 1000} s: SIGKILL`);
        child.kill('SIGKILL');
      }
    }, graceMs);
    await exited;
    clearTimeout(timer);
  };
  const cleanup = onCleanup(`process ${name}`, () => stop());
  return {
    name,
    pid,
    startedAt,
    get running() {
      return running;
    },
    problems,
    assertRunning() {
      if (!running) throw new Error(`${name} exited (${exitInfo}); last output:\n  ${tail.join('\n  ')}`);
    },
    sampleRss(everyMs) {
      let peak = 0;
      let hwm = 0;
      let n = 0;
      const sample = (): void => {
        const m = memoryMb(pid);
        if (!m) return;
        n++;
        peak = Math.max(peak, m.rss);
        hwm = Math.max(hwm, m.hwm);
      };
      sample();
      const t = setInterval(sample, everyMs);
      samplers.push(t);
      return {
        peakRssMb: () => peak,
        samples: () => n,
        hwmMb: () => {
          sample();
          return hwm;
        },
      };
    },
    stop: () => cleanup(),
  };
}

export interface RelayOptions {
  workerId: string;
  /** Extra settings (they win over the pass-through environment). */
  env?: Record<string, string>;
}

/** `node dist/cli.js run` against `databaseUrl`. */
export function spawnRelay(databaseUrl: string, options: RelayOptions): Proc {
  const env = {
    ...baseEnv(),
    NODE_ENV: 'development',
    LOG_LEVEL: 'warn',
    METRICS_ENABLED: 'false',
    RETENTION_ENABLED: 'false',
    WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true',
    ...passThroughEnv(),
    ...options.env,
    DATABASE_URL: databaseUrl,
    RELAY_WORKER_ID: options.workerId,
  };
  return startProc(`relay ${options.workerId}`, [join(REPO_ROOT, 'dist', 'cli.js'), 'run'], env);
}

export interface GraphileOptions {
  /** Where the task POSTs. */
  targetUrl: string;
  /** The signing secret (whsec_...) the task signs with, as our relay does. */
  secret: string;
  concurrency: number;
  maxPoolSize: number;
}

/** The graphile-worker peer in its own process (see graphileWorker.ts). */
export function spawnGraphileWorker(databaseUrl: string, options: GraphileOptions): Proc {
  const env = {
    ...baseEnv(),
    NODE_ENV: 'production',
    BENCH_GW_DATABASE_URL: databaseUrl,
    BENCH_GW_TARGET_URL: options.targetUrl,
    BENCH_GW_SECRET: options.secret,
    BENCH_GW_CONCURRENCY: String(options.concurrency),
    BENCH_GW_MAX_POOL_SIZE: String(options.maxPoolSize),
  };
  return startProc('graphile-worker', [join(REPO_ROOT, 'build', 'bench', 'graphileWorker.js')], env);
}

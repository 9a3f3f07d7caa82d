/** What every section gets, and what each one reports (the report turns these into the table). */
import type { DbServer } from './db.js';
import type { CpuBreakdown } from './procstat.js';
import type { Receiver } from './receiver.js';

export const SECTION_NAMES = ['throughput', 'latency', 'capture', 'drain', 'isolation', 'replicas', 'peer'] as const;
export type SectionName = (typeof SECTION_NAMES)[number];

export interface Options {
  quick: boolean;
  sections: SectionName[];
  /** Events (deliveries) of each throughput run. */
  n: number;
  /** Aggregates of the ordering-`aggregate` run. */
  aggregates: number;
  /** Events of the backlog drain. */
  drainN: number;
  /** Seconds of each writer phase of the capture section. */
  captureSeconds: number;
  writers: number;
  /** Rows the latency writer commits (after a warm-up of 10). */
  latencyRows: number;
  latencyIntervalMs: number;
  graphileConcurrency: number;
  graphileMaxPoolSize: number;
}

/** One measured drain of a backlog (from process start until the receiver has every delivery). */
export interface RunFigures {
  deliveries: number;
  seconds: number;
  perSecond: number;
  /** WAL written per delivery while it ran (server-wide, so other databases' activity is included). */
  walBytesPerDelivery: number | null;
  /** From process start to the first delivery (start-up, schema check, first claim). */
  firstDeliveryMs: number | null;
  cpu: CpuBreakdown;
  /** Per worker process, percent of one core. */
  workerCpu: number[];
  duplicates: number;
  badSignatures: number;
  verifiedSample: number;
  orderViolations?: number;
  /** Deliveries still in outbox_deliveries after the relay stopped (0: every outcome recorded). */
  leftInQueue?: number;
  /** Warnings and errors the processes logged (first few). */
  problems: string[];
}

/**
 * Latency of paced single-row writes, in ms. The main figures run from the moment the writer's commit
 * was acknowledged to the receipt of the webhook (commit-to-receiver); `fromInsert` runs from just
 * before the INSERT was sent, so it adds the writer's own statement and commit (the WAL flush), and
 * `commit` is that part alone.
 */
export interface LatencyFigures {
  rows: number;
  missing: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
  fromInsert: { p50: number; p99: number; max: number };
  commit: { p50: number; p99: number; max: number };
}

export interface WriterFigures {
  statements: number;
  rows: number;
  seconds: number;
  perSecond: number;
  rowsPerSecond: number;
  notifications: number;
}

export interface Results {
  throughput?: {
    none?: RunFigures & { loadRowsPerSecond: number };
    aggregate?: RunFigures & { aggregates: number; loadRowsPerSecond: number };
    fanout?: RunFigures & { subscriptions: number; events: number };
  };
  latency?: LatencyFigures & { intervalMs: number; notifyMode: string };
  capture?: {
    connections: number;
    /** `reference`: the least a trigger can do (see bench/sections/capture.ts). */
    single: { none: WriterFigures; always: WriterFigures; idleBusy: WriterFigures; reference?: WriterFigures };
    multi: { none: WriterFigures; idleBusy: WriterFigures; always: WriterFigures; reference?: WriterFigures };
    wakeupWhenIdle: boolean;
  };
  drain?: RunFigures & {
    events: number;
    loadSeconds: number;
    slices: Array<{ upTo: number; seconds: number; perSecond: number }>;
    /** Slices 2-10 against their median (slice 1 includes the relay's start-up). */
    steadiness: { minOverMedian: number; maxOverMedian: number; steady: boolean; firstOverMedian: number };
    peakRssMb: number;
    vmHwmMb: number;
    rssSamples: number;
  };
  isolation?: {
    healthy: RunFigures;
    soloRun: RunFigures;
    soloAfterRun?: RunFigures;
    solo: { perSecond: number; from: string };
    ratio: number;
    deadConnections: number;
    deadAttempts: number;
    deadEvents: number;
  };
  replicas?: {
    one: { perSecond: number; from: string; cpu?: CpuBreakdown };
    oneRun?: RunFigures;
    three: RunFigures;
    ratio: number;
    bottleneck: string;
  };
  peer?: {
    version: string;
    settings: Record<string, unknown>;
    unsupported: string[];
    throughput?: RunFigures & { loadJobsPerSecond: number };
    latency?: LatencyFigures & { intervalMs: number };
  };
}

export interface Ctx {
  opts: Options;
  server: DbServer;
  receiver: Receiver;
  results: Results;
}

/**
 * The local webhook receiver every figure is measured at: a node:http server on 127.0.0.1 that reads
 * each request in full and answers 204, counting distinct deliveries (by webhook-id) per label (the
 * first path segment, one per subscription or peer). It does as little as a fast receiver would, so
 * that it is not the bottleneck: signatures are verified with the `standardwebhooks` library on a
 * sample (the first requests of each label and one in 500 after), and bodies are parsed only where a
 * section measures latency. Also: a server that accepts connections and never answers (a dead
 * subscriber).
 */
import { createServer, type Server } from 'node:http';
import { createServer as createTcpServer, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { Webhook } from 'standardwebhooks';
import { cancelled, Cancelled, throwIfCancelled } from './lifecycle.js';

interface LabelState {
  ids: Set<string>;
  requests: number;
  duplicates: number;
  verified: number;
  badSignatures: number;
  verifier?: Webhook;
  /** Row id -> performance.now() at receipt, when latency is tracked for this label. */
  arrivals?: Map<number, number>;
  /** Thresholds of distinct deliveries -> performance.now() when reached. */
  milestones?: Map<number, number>;
  /** Aggregate -> last event id, when per-aggregate order is checked for this label. */
  lastOfAggregate?: Map<string, number>;
  orderViolations: number;
  firstAt?: number;
  lastAt?: number;
}

interface Waiter {
  label: string;
  count: number;
  resolve: (at: number) => void;
}

export interface Receiver {
  readonly base: string;
  /** The URL a subscription (or the peer) posts to; `label` keys the counters. */
  url(label: string): string;
  /** Verify a sample of this label's requests with this signing secret. */
  setSecret(label: string, secret: string): void;
  /** Record arrival times by row id (body.payload.new_data.id) for this label. */
  trackLatency(label: string): Map<number, number>;
  /** Record when the label's distinct deliveries reach each threshold. */
  trackMilestones(label: string, thresholds: number[]): Map<number, number>;
  /** Check that each aggregate's events arrive in event-id order at this label. */
  trackOrder(label: string): void;
  count(label: string): number;
  stats(label: string): { distinct: number; requests: number; duplicates: number; verified: number; badSignatures: number; orderViolations: number; firstAt?: number; lastAt?: number };
  /**
   * Resolves with performance.now() when `label` has `count` distinct deliveries. Fails when nothing
   * new arrives for `stallMs`, after `timeoutMs`, when `check` throws (a process died), or on Ctrl-C.
   */
  waitFor(label: string, count: number, options: { timeoutMs: number; stallMs: number; check?: () => void; progress?: (n: number) => void }): Promise<number>;
  /** Forgets a label (its counters and waiters). */
  reset(label: string): void;
  close(): Promise<void>;
}

const SAMPLE_FIRST = 20;
const SAMPLE_EVERY = 500;

export async function startReceiver(): Promise<Receiver> {
  const labels = new Map<string, LabelState>();
  const waiters = new Set<Waiter>();
  const state = (label: string): LabelState => {
    let s = labels.get(label);
    if (!s) {
      s = { ids: new Set(), requests: 0, duplicates: 0, verified: 0, badSignatures: 0, orderViolations: 0 };
      labels.set(label, s);
    }
    return s;
  };

  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('error', () => undefined);
    req.on('end', () => {
      const now = performance.now();
      const path = req.url ?? '/';
      const label = path.slice(1, path.indexOf('/', 1) > 0 ? path.indexOf('/', 1) : undefined);
      const s = state(label);
      s.requests++;
      const id = req.headers['webhook-id'];
      if (typeof id !== 'string') {
        res.writeHead(400).end();
        return;
      }
      if (s.verifier && (s.requests <= SAMPLE_FIRST || s.requests % SAMPLE_EVERY === 0)) {
        const body = Buffer.concat(chunks).toString('utf8');
        try {
          s.verifier.verify(body, req.headers as Record<string, string>);
          s.verified++;
        } catch {
          s.badSignatures++;
          res.writeHead(401).end();
          return;
        }
      }
      if (s.ids.has(id)) {
        s.duplicates++;
      } else {
        s.ids.add(id);
        s.firstAt ??= now;
        s.lastAt = now;
        if (s.arrivals) {
          try {
            const event = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { payload?: { new_data?: { id?: number | string } } };
            const rowId = Number(event.payload?.new_data?.id);
            if (Number.isFinite(rowId) && !s.arrivals.has(rowId)) s.arrivals.set(rowId, now);
          } catch {
            // not a row event: not timed
          }
        }
        if (s.lastOfAggregate) {
          // The body starts {"id":"<event id>",...,"aggregate_id":"<key>",...}: no full parse needed.
          const head = Buffer.concat(chunks).subarray(0, 400).toString('utf8');
          const eventId = Number(/^\{"id":"(\d+)"/.exec(head)?.[1]);
          const aggregate = /"aggregate_id":"((?:[^"\\]|\\.)*)"/.exec(head)?.[1];
          if (aggregate !== undefined && Number.isFinite(eventId)) {
            if ((s.lastOfAggregate.get(aggregate) ?? 0) > eventId) s.orderViolations++;
            s.lastOfAggregate.set(aggregate, eventId);
          }
        }
        const n = s.ids.size;
        if (s.milestones?.has(n)) s.milestones.set(n, now);
        for (const w of waiters) {
          if (w.label === label && n >= w.count) {
            waiters.delete(w);
            w.resolve(now);
          }
        }
      }
      res.writeHead(204).end();
    });
  });
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 70_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const base = `http://127.0.0.1:${port}`;

  return {
    base,
    url: (label) => `${base}/${label}/hook`,
    setSecret(label, secret) {
      state(label).verifier = new Webhook(secret);
    },
    trackLatency(label) {
      const s = state(label);
      s.arrivals ??= new Map();
      return s.arrivals;
    },
    trackMilestones(label, thresholds) {
      const s = state(label);
      s.milestones = new Map(thresholds.map((t) => [t, Number.NaN]));
      return s.milestones;
    },
    trackOrder(label) {
      state(label).lastOfAggregate ??= new Map();
    },
    count: (label) => labels.get(label)?.ids.size ?? 0,
    stats(label) {
      const s = state(label);
      return {
        distinct: s.ids.size,
        requests: s.requests,
        duplicates: s.duplicates,
        verified: s.verified,
        badSignatures: s.badSignatures,
        orderViolations: s.orderViolations,
        ...(s.firstAt !== undefined ? { firstAt: s.firstAt } : {}),
        ...(s.lastAt !== undefined ? { lastAt: s.lastAt } : {}),
      };
    },
    async waitFor(label, count, options) {
      const s = state(label);
      if (s.ids.size >= count) return s.lastAt ?? performance.now();
      let waiter: Waiter | undefined;
      const reached = new Promise<number>((resolve) => {
        waiter = { label, count, resolve };
        waiters.add(waiter);
      });
      const started = Date.now();
      let lastCount = s.ids.size;
      let lastChange = Date.now();
      let done = false;
      let failure: Error | undefined;
      const watchdog = (async () => {
        while (!done) {
          await new Promise((r) => setTimeout(r, 200));
          if (done) return;
          try {
            throwIfCancelled();
            options.check?.();
          } catch (err) {
            failure = err as Error;
            break;
          }
          const n = s.ids.size;
          if (n !== lastCount) {
            lastCount = n;
            lastChange = Date.now();
            options.progress?.(n);
          }
          if (Date.now() - lastChange > options.stallMs) {
            failure = new Error(`no new delivery at "${label}" for ${Math.round(options.stallMs / 1000)} s (${n} of ${count} arrived)`);
            break;
          }
          if (Date.now() - started > options.timeoutMs) {
            failure = new Error(`"${label}" did not get ${count} deliveries within ${Math.round(options.timeoutMs / 1000)} s (${n} arrived)`);
            break;
          }
        }
        if (waiter) waiters.delete(waiter);
      })();
      const failed = watchdog.then(() => {
        if (failure) throw failure;
        return Number.NaN;
      });
      try {
        return await Promise.race([reached, failed]);
      } finally {
        done = true;
        if (waiter) waiters.delete(waiter);
        if (cancelled.aborted) throw new Cancelled();
      }
    },
    reset(label) {
      labels.delete(label);
      for (const w of waiters) if (w.label === label) waiters.delete(w);
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

export interface DeadServer {
  url: string;
  /** Connections accepted so far. */
  readonly connections: number;
  close(): Promise<void>;
}

/** Accepts connections, reads what is sent, and never answers: every request times out. */
export async function startDeadServer(): Promise<DeadServer> {
  const sockets = new Set<Socket>();
  let connections = 0;
  const server = createTcpServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on('error', () => undefined);
    socket.on('close', () => sockets.delete(socket));
    socket.resume();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/dead/hook`,
    get connections() {
      return connections;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/**
 * A real webhook receiver for tests: a node:http server on 127.0.0.1 (port 0) that reads each
 * request in full, verifies it with the `standardwebhooks` library against every secret it holds,
 * records it, and answers through a replaceable responder (default: 200 when a secret verifies,
 * else 401, as a real receiver would). Closed at teardown, hanging connections included.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Webhook } from 'standardwebhooks';
import type { TestContext } from './db.js';

export interface ReceivedRequest {
  /** Order of arrival at this receiver (0-based). */
  seq: number;
  method: string;
  path: string;
  headers: http.IncomingHttpHeaders;
  webhookId: string;
  /** webhook-timestamp as a number (NaN when missing). */
  timestamp: number;
  signature: string;
  userAgent: string;
  contentType: string;
  /** The raw body, exactly as received. */
  body: string;
  /** Secrets (of this receiver, at arrival) with which `Webhook.verify` succeeded. */
  verifiedBy: string[];
  verified: boolean;
  /** Date.now() when the body had arrived. */
  receivedAt: number;
  /** 1 for the first request with this webhook-id at this receiver, 2 for the next, ... */
  attempt: number;
  /** The status we answered with (set once the response finished). */
  status?: number;
  /** True once our response was written in full. */
  answered: boolean;
  /** True when the connection closed before we answered (the sender gave up). */
  abandoned: boolean;
}

export type Responder = (req: ReceivedRequest, res: http.ServerResponse, raw: http.IncomingMessage) => void | Promise<void>;

export interface Receiver {
  /** Base URL, e.g. http://127.0.0.1:41234 */
  base: string;
  /** A URL on this receiver. */
  url(path?: string): string;
  /** Every request, in arrival order. */
  readonly requests: ReceivedRequest[];
  /** The secrets requests are verified against (mutable: add the new one after a rotation). */
  secrets: string[];
  /** How to answer (replaceable at any time). */
  respond: Responder;
  /** Requests answered 2xx, by webhook-id (the first such request of each id). */
  readonly delivered: Map<string, ReceivedRequest>;
  /** Requests with this path prefix. */
  at(pathPrefix: string): ReceivedRequest[];
  /** Requests received but not answered yet. */
  readonly pending: number;
  close(): Promise<void>;
}

/** The default answer: 200 when the signature verifies, 401 when it does not. */
export const verifyingResponder: Responder = (req, res) => {
  if (req.verified) answer(res, 200, 'ok');
  else answer(res, 401, 'bad signature');
};

/** Writes a complete response (ignoring a connection the sender already closed). */
export function answer(res: http.ServerResponse, status: number, body = '', headers: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed) return;
  res.writeHead(status, { 'content-type': 'text/plain', ...headers });
  res.end(body);
}

/** Verifies one request with `standardwebhooks`; returns the secrets that verify it. */
export function verifyWith(secrets: readonly string[], body: string, headers: http.IncomingHttpHeaders): string[] {
  const h: Record<string, string> = {
    'webhook-id': String(headers['webhook-id'] ?? ''),
    'webhook-timestamp': String(headers['webhook-timestamp'] ?? ''),
    'webhook-signature': String(headers['webhook-signature'] ?? ''),
  };
  return secrets.filter((s) => {
    try {
      new Webhook(s).verify(body, h);
      return true;
    } catch {
      return false;
    }
  });
}

export async function startReceiver(t: TestContext, options: { secrets?: string[]; respond?: Responder } = {}): Promise<Receiver> {
  const requests: ReceivedRequest[] = [];
  const delivered = new Map<string, ReceivedRequest>();
  const attempts = new Map<string, number>();
  let pending = 0;
  const receiver: Receiver = {
    base: '',
    requests,
    delivered,
    secrets: [...(options.secrets ?? [])],
    respond: options.respond ?? verifyingResponder,
    url(path = '/hook') {
      return `${receiver.base}${path}`;
    },
    at(prefix: string) {
      return requests.filter((r) => r.path.startsWith(prefix));
    },
    get pending() {
      return pending;
    },
    close: async () => undefined,
  };

  const server = http.createServer((raw, res) => {
    const chunks: Buffer[] = [];
    raw.on('data', (c: Buffer) => chunks.push(c));
    raw.on('error', () => undefined);
    res.on('error', () => undefined);
    raw.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      const webhookId = String(raw.headers['webhook-id'] ?? '');
      const attempt = (attempts.get(webhookId) ?? 0) + 1;
      attempts.set(webhookId, attempt);
      const verifiedBy = verifyWith(receiver.secrets, body, raw.headers);
      const rec: ReceivedRequest = {
        seq: requests.length,
        method: raw.method ?? '',
        path: raw.url ?? '',
        headers: raw.headers,
        webhookId,
        timestamp: Number(raw.headers['webhook-timestamp']),
        signature: String(raw.headers['webhook-signature'] ?? ''),
        userAgent: String(raw.headers['user-agent'] ?? ''),
        contentType: String(raw.headers['content-type'] ?? ''),
        body,
        verifiedBy,
        verified: verifiedBy.length > 0,
        receivedAt: Date.now(),
        attempt,
        answered: false,
        abandoned: false,
      };
      requests.push(rec);
      pending++;
      let settled = false;
      const settle = (): void => {
        if (settled) return;
        settled = true;
        pending--;
      };
      res.on('finish', () => {
        rec.status = res.statusCode;
        rec.answered = true;
        if (res.statusCode >= 200 && res.statusCode < 300 && !delivered.has(webhookId)) delivered.set(webhookId, rec);
        settle();
      });
      res.on('close', () => {
        if (!rec.answered) rec.abandoned = true;
        settle();
      });
      Promise.resolve(receiver.respond(rec, res, raw)).catch(() => {
        if (!res.headersSent) answer(res, 500, 'responder failed');
      });
    });
  });
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  receiver.base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  let closed: Promise<void> | undefined;
  receiver.close = () => {
    closed ??= new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
    return closed;
  };
  t.teardown(() => receiver.close().catch(() => undefined));
  return receiver;
}

/** A receiver that holds every request until the test releases it (or the test ends). */
export interface HoldingReceiver {
  recv: Receiver;
  /** Answers every held request, and every later one at once, with 200. */
  release: () => void;
  /** The most requests it held at once. */
  readonly maxPending: number;
}

export async function startHoldingReceiver(t: TestContext): Promise<HoldingReceiver> {
  let release: () => void = () => undefined;
  const held = new Promise<void>((r) => (release = r));
  let maxPending = 0;
  const recv = await startReceiver(t, {
    respond: async (_r, res) => {
      maxPending = Math.max(maxPending, recv.pending);
      await held;
      answer(res, 200, 'ok');
    },
  });
  t.teardown(() => release());
  return { recv, release: () => release(), get maxPending() { return maxPending; } };
}

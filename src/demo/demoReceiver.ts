/**
 * The demo's webhook receiver: a local HTTP server that verifies every request with the stock
 * `standardwebhooks` library (as a receiver such as Flowgram.ai would), fails a share of requests on
 * purpose to show retries, and keeps the figures the demo prints.
 */
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { OutboxError } from '../errors.js';

interface VerifierCtor {
  new (secret: string): { verify(payload: string, headers: Record<string, string>): unknown };
}

async function loadVerifier(): Promise<VerifierCtor> {
  try {
    const mod = (await import('standardwebhooks')) as { Webhook: VerifierCtor };
    return mod.Webhook;
  } catch {
    throw new OutboxError('the demo receiver needs the development dependencies (standardwebhooks): run "npm ci"', 'E_DEMO_DEPS');
  }
}

export interface ReceiverStats {
  received: number;
  verified: number;
  badSignatures: number;
  duplicates: number;
  failedOnPurpose: number;
  orderViolations: number;
  latenciesMs: number[];
}

export interface DemoReceiver {
  url: string;
  stats: ReceiverStats;
  close(): Promise<void>;
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

export async function startDemoReceiver(secret: string, failRate: number, random: () => number = Math.random): Promise<DemoReceiver> {
  const Webhook = await loadVerifier();
  const verifier = new Webhook(secret);
  const stats: ReceiverStats = { received: 0, verified: 0, badSignatures: 0, duplicates: 0, failedOnPurpose: 0, orderViolations: 0, latenciesMs: [] };
  const seen = new Set<string>();
  const lastEventOfAggregate = new Map<string, number>();
  const server: Server = createServer((req, res) => {
    readBody(req).then(
      (body) => {
        stats.received++;
        const headers: Record<string, string> = {};
        for (const [k, v] of Object.entries(req.headers)) if (typeof v === 'string') headers[k] = v;
        try {
          verifier.verify(body, headers);
        } catch {
          stats.badSignatures++;
          res.writeHead(401).end('bad signature');
          return;
        }
        if (random() < failRate) {
          stats.failedOnPurpose++;
          res.writeHead(503, { 'retry-after': '1' }).end('busy (on purpose)');
          return;
        }
        stats.verified++;
        const id = headers['webhook-id'] ?? '';
        if (seen.has(id)) stats.duplicates++;
        else {
          seen.add(id);
          const event = JSON.parse(body) as { id: string; aggregate_type: string; aggregate_id: string; created_at: string };
          stats.latenciesMs.push(Date.now() - Date.parse(event.created_at));
          const key = `${event.aggregate_type}/${event.aggregate_id}`;
          const eventId = Number(event.id);
          if ((lastEventOfAggregate.get(key) ?? 0) > eventId) stats.orderViolations++;
          lastEventOfAggregate.set(key, eventId);
        }
        res.writeHead(204).end();
      },
      () => res.writeHead(400).end(),
    );
  });
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/webhooks/outbox`,
    stats,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** The q-th quantile (0..1) of a list of numbers (nearest rank). */
export function quantile(values: readonly number[], q: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] as number;
}

/**
 * The peer: graphile-worker 0.16 in its own process, run with the high-throughput settings its
 * performance page documents that 0.16 supports (concurrentJobs 24, maxPoolSize 25; localQueue,
 * completeJobBatchDelay and failJobBatchDelay arrived in 0.17), and one task, `post`, that does what
 * our relay does per delivery: serialize the event, sign it as Standard Webhooks (the same HMAC), and
 * POST it with undici (a keep-alive Agent) to the same receiver; a non-2xx answer fails the job.
 * Started by processes.ts; stops on SIGTERM.
 */
import gw from 'graphile-worker';
import { Agent } from 'undici';
import { secretKey } from '../src/webhook/secret.js';
import { signPayload } from '../src/webhook/signPayload.js';

const env = (name: string): string => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};

const target = new URL(env('BENCH_GW_TARGET_URL'));
const key = secretKey(env('BENCH_GW_SECRET'));
const agent = new Agent({ connections: 64, pipelining: 1, keepAliveTimeout: 30_000 });

interface EventPayload {
  id: string | number;
}

const post = async (payload: unknown): Promise<void> => {
  const event = payload as EventPayload;
  const body = JSON.stringify(payload);
  const webhookId = `msg_${event.id}`;
  const timestamp = Math.floor(Date.now() / 1000);
  const res = await agent.request({
    origin: target.origin,
    path: target.pathname,
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      'user-agent': 'graphile-worker-bench',
      'webhook-id': webhookId,
      'webhook-timestamp': String(timestamp),
      'webhook-signature': signPayload(webhookId, timestamp, body, [key]),
    },
    body,
    headersTimeout: 10_000,
    bodyTimeout: 10_000,
  });
  await res.body.dump();
  if (res.statusCode < 200 || res.statusCode >= 300) throw new Error(`HTTP ${res.statusCode}`);
};

const logger = new gw.Logger(() => (level, message) => {
  if (level === 'error') process.stderr.write(`graphile-worker: ${message}\n`);
});

const runner = await gw.run({
  connectionString: env('BENCH_GW_DATABASE_URL'),
  concurrency: Number(env('BENCH_GW_CONCURRENCY')),
  maxPoolSize: Number(env('BENCH_GW_MAX_POOL_SIZE')),
  noHandleSignals: true,
  pollInterval: 2_000,
  logger,
  taskList: { post },
});

let stopping = false;
const stop = (): void => {
  if (stopping) process.exit(1);
  stopping = true;
  const force = setTimeout(() => process.exit(1), 15_000);
  force.unref();
  runner
    .stop()
    .then(() => agent.close())
    .then(
      () => process.exit(0),
      () => process.exit(1),
    );
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
await runner.promise;

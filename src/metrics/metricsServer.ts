/**
 * The daemon's only inbound HTTP: GET /metrics (Prometheus text), /healthz (the process is alive) and
 * /readyz (the database answers and, unless poll-only, LISTEN is up; 503 otherwise). Anything else
 * is 404; only GET and HEAD are allowed.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import { listenError } from '../errors.js';

export interface ReadinessReport {
  ready: boolean;
  checks: Record<string, string>;
}

export interface MetricsServerOptions {
  host: string;
  port: number;
  registry: Registry;
  readiness: () => Promise<ReadinessReport>;
}

export class MetricsServer {
  private server: Server | undefined;

  constructor(private readonly options: MetricsServerOptions) {}

  /** Listens; resolves with the bound port (useful with port 0). */
  async start(): Promise<number> {
    const server = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0];
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
        return;
      }
      const json = (status: number, body: unknown): void => {
        res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(`${JSON.stringify(body)}\n`);
      };
      if (path === '/healthz') return json(200, { status: 'ok' });
      if (path === '/readyz') {
        this.options.readiness().then(
          (r) => json(r.ready ? 200 : 503, { status: r.ready ? 'ready' : 'not ready', checks: r.checks }),
          (err: unknown) => json(503, { status: 'not ready', checks: { error: String(err) } }),
        );
        return;
      }
      if (path === '/metrics') {
        this.options.registry.metrics().then(
          (text) => res.writeHead(200, { 'content-type': this.options.registry.contentType }).end(text),
          () => res.writeHead(500, { 'content-type': 'text/plain' }).end('metrics unavailable\n'),
        );
        return;
      }
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics, /healthz or /readyz\n');
    });
    server.keepAliveTimeout = 65_000;
    server.headersTimeout = 10_000;
    server.requestTimeout = 30_000;
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      const fail = (err: unknown): void => reject(listenError(err, 'the metrics endpoint', this.options.host, this.options.port, 'METRICS_PORT or METRICS_HOST (or METRICS_ENABLED=false)'));
      server.once('error', fail);
      server.listen(this.options.port, this.options.host, () => {
        server.off('error', fail);
        resolve();
      });
    });
    return (server.address() as AddressInfo).port;
  }

  async stop(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    server.closeIdleConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

/**
 * `healthcheck`: for container HEALTHCHECKs. GETs /healthz of the daemon (METRICS_PORT) or, if nothing
 * listens there, of the pull API sidecar (PORT), on 127.0.0.1; exit 0 when one answers 200.
 */
import { request } from 'node:http';
import type { Command } from 'commander';
import { OutboxError, UsageError } from '../errors.js';
import type { CommandContext } from './context.js';

function probe(url: string, timeoutMs: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'GET', timeout: timeoutMs }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end();
  });
}

function isHttpUrl(value: string): boolean {
  try {
    return new URL(value).protocol === 'http:';
  } catch {
    return false;
  }
}

export function registerHealthcheckCommand(program: Command, ctx: () => CommandContext): void {
  program
    .command('healthcheck')
    .description('exit 0 when the local daemon (METRICS_PORT) or API sidecar (PORT) answers /healthz; for container health checks')
    .option('--url <url>', 'check this URL instead')
    .option('--timeout-ms <ms>', 'per attempt', '2000')
    .action(async (opts: { url?: string; timeoutMs: string }) => {
      const c = ctx();
      const timeout = Number(opts.timeoutMs);
      if (!Number.isInteger(timeout) || timeout < 1) throw new UsageError('--timeout-ms must be a positive whole number');
      if (opts.url !== undefined && !isHttpUrl(opts.url)) throw new UsageError(`--url must be an http:// URL, e.g. http://127.0.0.1:9464/healthz (got ${JSON.stringify(opts.url.slice(0, 200).replace(/\/\/[^/@]*@/, '//***@'))})`);
      const urls = opts.url ? [opts.url] : [`http://127.0.0.1:${c.config.metrics.port}/healthz`, `http://127.0.0.1:${c.config.api.port}/healthz`];
      const failures: string[] = [];
      for (const url of urls) {
        try {
          const status = await probe(url, timeout);
          if (status === 200) {
            c.io.stdout(`healthy (${url})\n`);
            return;
          }
          failures.push(`${url}: HTTP ${status}`);
        } catch (err) {
          failures.push(`${url}: ${(err as Error).message}`);
        }
      }
      throw new OutboxError(`unhealthy: ${failures.join('; ')}`, 'E_UNHEALTHY');
    });
}

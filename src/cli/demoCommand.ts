/** `demo`: the product working in one command (embedded PostgreSQL, receiver, relay, writer). */
import type { Command } from 'commander';
import { renderSummary, runDemo } from '../demo/runDemo.js';
import { UsageError } from '../errors.js';
import type { CommandContext } from './context.js';
import { packageVersion } from './version.js';

function number(name: string, value: string, min: number, max: number): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n < min || n > max) throw new UsageError(`${name} must be a number from ${min} to ${max}, got ${JSON.stringify(value)}`);
  return n;
}

export function registerDemoCommand(program: Command, ctx: () => CommandContext): void {
  program
    .command('demo')
    .description('run the whole pipeline locally: embedded PostgreSQL, capture, relay, a verifying receiver, a steady writer')
    .option('--duration <seconds>', 'stop after this many seconds; 0 runs until Ctrl-C', '0')
    .option('--rate <n>', 'row changes per second', '200')
    .option('--fail-rate <share>', 'share of requests the receiver refuses on purpose, to show retries (0 to 0.9)', '0.02')
    .option('--database-url <url>', 'use this PostgreSQL instead of an embedded one (a demo_tenant schema is created there)')
    .action(async (opts: { duration: string; rate: string; failRate: string; databaseUrl?: string }) => {
      const c = ctx();
      const durationSec = number('--duration', opts.duration, 0, 86_400);
      const rate = number('--rate', opts.rate, 1, 20_000);
      const failRate = number('--fail-rate', opts.failRate, 0, 0.9);
      let stop: () => void = () => undefined;
      const stopSignal = new Promise<void>((resolve) => (stop = resolve));
      let signals = 0;
      const onSignal = (): void => {
        signals++;
        if (signals > 1) process.exit(130);
        stop();
      };
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
      const summary = await runDemo({
        durationSec,
        rate,
        failRate,
        ...(opts.databaseUrl ? { databaseUrl: opts.databaseUrl } : {}),
        version: packageVersion(),
        stopSignal,
        out: (line) => c.io.stdout(`${line}\n`),
        tty: Boolean(process.stdout.isTTY),
      });
      c.io.stdout(`${renderSummary(summary)}\n`);
    });
}

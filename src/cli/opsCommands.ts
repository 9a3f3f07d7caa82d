/** `status` (the seed's monitoring queries as tables) and `cleanup` (retention, now). */
import type { Command } from 'commander';
import { createPool } from '../db/connection.js';
import { runRetention } from '../maintenance/retention.js';
import { statusReport } from '../maintenance/status.js';
import type { CommandContext } from './context.js';
import { requireMigrated } from './requireSchema.js';
import { renderTable } from './table.js';

const seconds = (s: number): string => (s < 120 ? `${s.toFixed(1)} s` : s < 7200 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`);

export function registerOpsCommands(program: Command, ctx: () => CommandContext): void {
  program
    .command('status')
    .description('events per tenant and type, acknowledgments per user, processing time, lag, and subscriptions needing attention')
    .option('--json', 'print the report as JSON')
    .action(async (opts: { json?: boolean }) => {
      const c = ctx();
      const report = await c.withClient(async (client) => {
        await requireMigrated(client);
        return statusReport(client);
      });
      c.print(opts.json, report, () => {
        const parts: string[] = [];
        parts.push('EVENTS');
        parts.push(report.events.length ? renderTable(['TENANT', 'EVENT TYPE', 'TOTAL', 'PROCESSED', 'PENDING', 'FAILED'], report.events.map((r) => [r.tenant, r.event_type, r.total_events, r.processed, r.pending, r.failed])) : 'no events');
        parts.push('', 'ACKNOWLEDGMENTS');
        parts.push(report.acknowledgments.length ? renderTable(['USER', 'PROCESSOR', 'STATUS', 'COUNT'], report.acknowledgments.map((r) => [r.user_id, r.processor, r.status, r.acknowledgment_count])) : 'no acknowledgments');
        parts.push('', 'AVERAGE PROCESSING TIME');
        parts.push(report.processingTime.length ? renderTable(['EVENT TYPE', 'AVG (s)'], report.processingTime.map((r) => [r.event_type, r.avg_processing_time_seconds.toFixed(3)])) : 'nothing processed yet');
        parts.push('', 'LAG');
        parts.push(report.lag.length ? renderTable(['TENANT', 'PENDING', 'OLDEST'], report.lag.map((r) => [r.tenant, r.unprocessed, seconds(r.oldest_seconds)])) : 'no pending events');
        if (report.stranded > 0) {
          parts.push(
            `${report.strandedAtLeast ? 'more than ' : ''}${report.stranded} unprocessed event(s) older than a minute have no fan-out queue entry (written into outbox_events directly):`,
            'running relays queue them (new ones within a minute); have writers use public.outbox_write_event(...) instead',
          );
        }
        parts.push('', 'SUBSCRIPTIONS NEEDING ATTENTION');
        parts.push(
          report.attention.length
            ? renderTable(
                ['ID', 'TENANT', 'USER', 'ENABLED', 'CIRCUIT', 'DEAD', 'REASON'],
                report.attention.map((r) => [r.id, r.tenant, r.userId, r.enabled ? 'yes' : 'no', r.circuits?.map((x) => `${x.state}@${x.worker}`).join(' ') ?? '', r.dead, r.disabledReason ?? '']),
              )
            : 'none',
        );
        return parts.join('\n');
      });
    });

  program
    .command('cleanup')
    .description('run retention now: delete processed events older than RETENTION_DAYS and dead ones older than RETENTION_DEAD_DAYS, in small batches')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { json?: boolean }) => {
      const c = ctx();
      const config = c.config;
      const pool = createPool(config.database, { max: 2, applicationName: 'outbox-relay-cleanup' });
      try {
        const result = await c.withClient(async (client) => {
          await requireMigrated(client);
          // The result is printed below: the daemon's "retention finished" line would only repeat it
          // on stderr (LOG_LEVEL=debug keeps every line).
          const logger = c.logger.isLevelEnabled('debug') ? c.logger : c.logger.child({}, { level: 'warn' });
          return runRetention(pool, { ...config.retention, logger });
        });
        c.print(opts.json, result, () =>
          result.skipped
            ? 'skipped: another replica is running retention right now'
            : `removed ${result.processedEvents} processed events (older than ${config.retention.days} days), ${result.deadEvents} events with dead deliveries (older than ${config.retention.deadDays} days), ${result.acknowledgments} acknowledgments and ${result.deliveries} deliveries in ${result.batches} batches (${result.durationMs} ms)`,
        );
      } finally {
        await pool.end();
      }
    });
}

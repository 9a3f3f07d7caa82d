/** Runs retention on its cron schedule inside the daemon (node-cron; overlapping runs are skipped). */
import cron, { type ScheduledTask } from 'node-cron';
import type pg from 'pg';
import type { Config } from '../config/schema.js';
import type { Logger } from '../log.js';
import { runRetention } from './retention.js';

export class RetentionSchedule {
  private task: ScheduledTask | undefined;
  private readonly abort = new AbortController();

  constructor(
    private readonly pool: pg.Pool,
    private readonly config: Config['retention'],
    private readonly logger: Logger,
  ) {}

  start(): void {
    // A daemon stopped while it was still starting must not schedule anything afterwards (the cron
    // timer would keep the stopped process alive).
    if (this.abort.signal.aborted) return;
    this.task = cron.schedule(
      this.config.schedule,
      async () => {
        try {
          await runRetention(this.pool, { ...this.config, logger: this.logger, signal: this.abort.signal, pauseMs: 20 });
        } catch (err) {
          this.logger.error({ err: (err as Error).message }, 'retention failed; it runs again at the next schedule');
        }
      },
      { name: 'outbox-relay-retention', noOverlap: true },
    );
    this.logger.info({ schedule: this.config.schedule, next: this.task.getNextRun()?.toISOString() }, 'retention scheduled');
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.task?.stop();
    await this.task?.destroy();
  }
}

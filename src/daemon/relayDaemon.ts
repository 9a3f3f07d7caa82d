/**
 * `outbox-relay run`: a pool, the relay, and (with the operations pieces) the metrics port and the
 * retention schedule, started and stopped in order. No signal handling here: the CLI owns the process.
 */
import type pg from 'pg';
import type { Config } from '../config/schema.js';
import { createPool } from '../db/connection.js';
import type { Logger } from '../log.js';
import { Relay } from '../relay/relay.js';
import type { SecretCipher } from '../subscriptions/secretCipher.js';
import { ensureSchema } from './schemaCheck.js';

export interface RelayDaemonOptions {
  config: Config;
  logger: Logger;
  version: string;
  migrate?: boolean;
  cipher?: SecretCipher;
}

export class RelayDaemon {
  readonly pool: pg.Pool;
  readonly relay: Relay;
  private readonly abort = new AbortController();
  private stopping: Promise<void> | undefined;

  constructor(private readonly options: RelayDaemonOptions) {
    const { config, logger } = options;
    this.pool = createPool(config.database, {
      // The relay's own queries plus completions; the LISTEN connection is separate.
      statementTimeoutMs: config.database.statementTimeoutMs,
      onError: (err) => logger.warn({ err: err.message }, 'idle database connection failed; it will be replaced'),
    });
    this.relay = new Relay({
      config,
      pool: this.pool,
      logger,
      userAgent: `outbox-relay/${options.version}`,
      ...(options.cipher ? { cipher: options.cipher } : {}),
    });
  }

  /** Waits for the database and a current schema, then starts relaying. */
  async start(): Promise<void> {
    await ensureSchema({ pool: this.pool, logger: this.options.logger, migrate: Boolean(this.options.migrate), signal: this.abort.signal });
    await this.relay.start();
  }

  /** Stops everything in order (idempotent). */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.abort.abort();
      await this.relay.stop().catch((err: unknown) => this.options.logger.error({ err: String(err) }, 'relay stop failed'));
      await this.pool.end().catch(() => undefined);
    })();
    return this.stopping;
  }
}

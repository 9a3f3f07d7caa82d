/**
 * `outbox-relay api`: a pool connected as the sidecar's own role, checks that row-level security
 * confines that role, and the HTTP server; started and stopped in order. No signal handling here:
 * the CLI owns the process.
 */
import type pg from 'pg';
import type { Config } from '../config/schema.js';
import { createPool } from '../db/connection.js';
import { ensureSchema } from '../daemon/schemaCheck.js';
import { ConfigError } from '../errors.js';
import type { Logger } from '../log.js';
import { ApiServer } from './server.js';
import { ROLE_INFO_SQL, type RoleInfo } from './sql/roleInfo.js';

export interface ApiSidecarOptions {
  config: Config;
  logger: Logger;
}

/**
 * Problems with the role the sidecar connects as: row-level security does not bind a superuser or a
 * BYPASSRLS role, and binds only roles registered by `outbox-relay api create-role`.
 */
export function roleProblems(info: RoleInfo): string[] {
  if (info.superuser || info.bypass_rls) {
    return [
      `the database role "${info.role}" is ${info.superuser ? 'a superuser' : 'a BYPASSRLS role'}, which row-level security does not confine; ` +
        'connect the sidecar as its own role, made with "outbox-relay api create-role" (the user of DATABASE_URL, or DB_USER when DATABASE_URL is not set)',
    ];
  }
  if (!info.registered) {
    return [
      `the database role "${info.role}" is not registered for the pull API in this database, so row-level security does not confine it; ` +
        `run "outbox-relay api create-role --name ${info.role}" as the database owner`,
    ];
  }
  return [];
}

export class ApiSidecar {
  readonly pool: pg.Pool;
  readonly server: ApiServer;
  private readonly abort = new AbortController();
  private stopping: Promise<void> | undefined;

  constructor(private readonly options: ApiSidecarOptions) {
    const { config, logger } = options;
    this.pool = createPool(config.database, {
      applicationName: 'outbox-relay-api',
      // A query never outlives the request it serves.
      statementTimeoutMs: config.api.requestTimeoutMs,
      onError: (err) => logger.warn({ err: err.message }, 'idle database connection failed; it will be replaced'),
    });
    this.server = new ApiServer({ config, pool: this.pool, logger });
  }

  /**
   * Waits for the database and a current schema, checks the role (refused in production when row-level
   * security would not confine it; a warning elsewhere), then listens. Resolves to the bound port.
   */
  async start(): Promise<number> {
    const { config, logger } = this.options;
    await ensureSchema({ pool: this.pool, logger, migrate: false, signal: this.abort.signal });
    const { rows } = await this.pool.query<RoleInfo>(ROLE_INFO_SQL);
    const info = rows[0];
    const problems = info ? roleProblems(info) : ['cannot tell which database role the sidecar connects as'];
    if (problems.length > 0) {
      if (config.env === 'production') throw new ConfigError(problems);
      for (const p of problems) logger.warn(`${p} (refused in production)`);
    }
    const address = await this.server.listen();
    logger.info({ port: address.port, host: address.address, role: info?.role }, 'pull API listening');
    return address.port;
  }

  /** Stops serving (requests in progress finish), then closes the pool. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.abort.abort();
      await this.server.stop().catch((err: unknown) => this.options.logger.error({ err: String(err) }, 'API server stop failed'));
      await this.pool.end().catch(() => undefined);
    })();
    return this.stopping;
  }
}

/**
 * `outbox-relay run`: a pool, the relay, the metrics port, the queue sampler, the stranded-event
 * sweep and the retention schedule, started and stopped in order. No signal handling here: the CLI
 * owns the process.
 */
import type pg from 'pg';
import type { Config } from '../config/schema.js';
import { createPool } from '../db/connection.js';
import type { Logger } from '../log.js';
import { RetentionSchedule } from '../maintenance/retentionSchedule.js';
import { StrandedSweep } from '../maintenance/strandedSweep.js';
import { MetricsServer, type ReadinessReport } from '../metrics/metricsServer.js';
import { QueueSampler } from '../metrics/queueSampler.js';
import { RelayMetrics } from '../metrics/relayMetrics.js';
import { logAttempts } from '../relay/attemptLogger.js';
import { CircuitRecorder } from '../relay/circuitRecorder.js';
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

/** Resolves with the result of `promise`, or rejects after `ms`. */
function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms} ms`)), ms);
    }),
  ]);
}

export class RelayDaemon {
  readonly pool: pg.Pool;
  readonly relay: Relay;
  readonly metrics: RelayMetrics;
  private readonly metricsServer: MetricsServer | undefined;
  private readonly sampler: QueueSampler;
  private readonly retention: RetentionSchedule | undefined;
  private readonly stranded: StrandedSweep | undefined;
  /** Records this replica's open circuits for `status` (sql/008, sql/018). */
  readonly circuits: CircuitRecorder;
  private readonly abort = new AbortController();
  private stopping: Promise<void> | undefined;
  private metricsPort: number | undefined;

  constructor(private readonly options: RelayDaemonOptions) {
    const { config, logger } = options;
    this.pool = createPool(config.database, {
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
    logAttempts(this.relay, logger);
    this.circuits = new CircuitRecorder(this.pool, config.relay.workerId, logger);
    this.circuits.bind(this.relay);
    this.metrics = new RelayMetrics(options.version);
    this.metrics.bindRelay(this.relay);
    this.metrics.bindPool(this.pool);
    this.sampler = new QueueSampler({ pool: this.pool, metrics: this.metrics, logger });
    if (config.metrics.enabled) {
      this.metricsServer = new MetricsServer({
        host: config.metrics.host,
        port: config.metrics.port,
        registry: this.metrics.registry,
        readiness: () => this.readiness(),
      });
    }
    if (config.retention.enabled && config.relay.enabled) this.retention = new RetentionSchedule(this.pool, config.retention, logger);
    // Standby relays claim nothing, so they queue nothing either.
    if (config.relay.enabled) this.stranded = new StrandedSweep({ pool: this.pool, logger });
  }

  /** The port /metrics listens on (after start), or undefined when metrics are off. */
  get port(): number | undefined {
    return this.metricsPort;
  }

  /** Ready: the database answers now and, unless poll-only, the LISTEN connection is up. */
  async readiness(): Promise<ReadinessReport> {
    const checks: Record<string, string> = {};
    let ready = true;
    try {
      await withTimeout(this.pool.query('SELECT 1'), 2_000, 'PostgreSQL');
      checks.database = 'ok';
    } catch (err) {
      ready = false;
      checks.database = err instanceof Error ? err.message : String(err);
    }
    if (this.options.config.relay.notifyMode !== 'off' && this.options.config.relay.enabled) {
      checks.listen = this.relay.listening ? 'ok' : 'down';
      if (!this.relay.listening) ready = false;
    }
    // Informational: the relay serves every other subscription, so this does not make it unready.
    const skipped = this.relay.skippedSubscriptions();
    if (skipped.length > 0) checks.subscriptions = `${skipped.length} skipped (secret unusable): ${skipped.map((s) => s.subscriptionId).join(', ')}`;
    if (this.stopping) {
      ready = false;
      checks.state = 'stopping';
    }
    return { ready, checks };
  }

  /** Opens the metrics port, waits for the database and a current schema, then starts relaying. */
  async start(): Promise<void> {
    // The metrics port comes first, so /healthz answers (and /readyz says why not) while we wait.
    if (this.metricsServer) {
      this.metricsPort = await this.metricsServer.start();
      this.options.logger.info({ port: this.metricsPort, host: this.options.config.metrics.host }, 'metrics listening');
    }
    await ensureSchema({ pool: this.pool, logger: this.options.logger, migrate: Boolean(this.options.migrate), signal: this.abort.signal });
    // Each step checks for a stop() that came meanwhile (a SIGTERM during start-up): nothing may be
    // started after it, or its timers would keep the process alive.
    if (this.abort.signal.aborted) return;
    // Circuits open lately (a predecessor's too, before clear() removes them): those start half-open.
    this.relay.expectOpenCircuits(await this.circuits.recentlyOpen());
    await this.circuits.clear();
    if (this.abort.signal.aborted) return;
    await this.relay.start();
    if (this.abort.signal.aborted) return;
    // The queue gauges exist for the metrics port; without it the sampler's queries are wasted.
    if (this.metricsServer) this.sampler.start();
    this.circuits.startHeartbeat();
    this.retention?.start();
    this.stranded?.start();
  }

  /** Stops everything in order (idempotent): claiming and sending first, the metrics port last. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.abort.abort();
      const log = this.options.logger;
      await this.retention?.stop().catch((err: unknown) => log.error({ err: String(err) }, 'retention stop failed'));
      await this.stranded?.stop();
      await this.relay.stop().catch((err: unknown) => log.error({ err: String(err) }, 'relay stop failed'));
      await this.sampler.stop().catch(() => undefined);
      await this.circuits.stopHeartbeat();
      await this.circuits.retire();
      await this.pool.end().catch(() => undefined);
      await this.metricsServer?.stop().catch(() => undefined);
    })();
    return this.stopping;
  }
}

/**
 * The relay's Prometheus metrics, fed from the relay's typed events (never sprinkled through the
 * delivery code), plus Node's default process metrics. Names follow Prometheus conventions (base
 * units, `_total` counters). Labels are bounded: tenant and subscription id (both configured by an
 * operator), outcome and state enums; never event ids or URLs.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type pg from 'pg';
import type { Relay } from '../relay/relay.js';
import type { CircuitState } from '../relay/circuitBreaker.js';

const CIRCUIT_STATES: readonly CircuitState[] = ['closed', 'half-open', 'open'];

/** prom-client default metrics that are gauges despite their `_total` names. */
const NON_COUNTER_TOTALS = ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'];

export interface QueueSample {
  tenant: string;
  pending: number;
  dead: number;
  oldestAgeSeconds: number;
}

export class RelayMetrics {
  readonly registry = new Registry();
  readonly deliveries: Counter<'tenant' | 'subscription' | 'outcome'>;
  readonly retries: Counter<'tenant' | 'subscription'>;
  readonly attemptDuration: Histogram<'tenant' | 'subscription'>;
  readonly pending: Gauge<'tenant'>;
  readonly dead: Gauge<'tenant'>;
  readonly oldestAge: Gauge<'tenant'>;
  readonly awaitingFanout: Gauge;
  readonly fannedOut: Counter;
  readonly claimBatch: Histogram;
  readonly circuit: Gauge<'tenant' | 'subscription' | 'state'>;
  readonly listenUp: Gauge;
  readonly databaseUp: Gauge;
  readonly inFlight: Gauge;
  readonly dbErrors: Counter;
  private relay: Relay | undefined;

  constructor(version: string) {
    // Gauges read at scrape time get their values from the bound relay.
    const metrics = this;
    const r = this.registry;
    collectDefaultMetrics({ register: r });
    // prom-client exports the totals of active handles, requests and resources as gauges named
    // `…_total`, which `promtool check metrics` rejects (`_total` is for counters). The same figures
    // stay available per type (nodejs_active_handles{type}, …): sum() gives the totals.
    for (const name of NON_COUNTER_TOTALS) r.removeSingleMetric(name);
    new Gauge({ name: 'outbox_relay_build_info', help: 'Version of the running outbox-relay (always 1).', labelNames: ['version'], registers: [r] }).set({ version }, 1);
    this.deliveries = new Counter({
      name: 'outbox_relay_deliveries_total',
      help: 'Delivery attempts by outcome: delivered (2xx), retry (failed, will retry), dead (out of attempts), gone (410, subscription disabled).',
      labelNames: ['tenant', 'subscription', 'outcome'],
      registers: [r],
    });
    this.retries = new Counter({
      name: 'outbox_relay_retries_total',
      help: 'Failed attempts that were scheduled for a retry.',
      labelNames: ['tenant', 'subscription'],
      registers: [r],
    });
    this.attemptDuration = new Histogram({
      name: 'outbox_relay_attempt_duration_seconds',
      help: 'Duration of one webhook request, from sending to the end of the (capped) response.',
      labelNames: ['tenant', 'subscription'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers: [r],
    });
    this.pending = new Gauge({ name: 'outbox_relay_pending_deliveries', help: 'Deliveries not yet delivered or dead (sampled).', labelNames: ['tenant'], registers: [r] });
    this.dead = new Gauge({ name: 'outbox_relay_dead_deliveries', help: 'Dead deliveries awaiting replay or retention (sampled).', labelNames: ['tenant'], registers: [r] });
    this.oldestAge = new Gauge({
      name: 'outbox_relay_oldest_pending_age_seconds',
      help: 'Age of the oldest pending delivery or not yet fanned-out event of the tenant: the delivery lag (sampled).',
      labelNames: ['tenant'],
      registers: [r],
    });
    this.awaitingFanout = new Gauge({ name: 'outbox_relay_events_awaiting_fanout', help: 'Captured events not yet fanned out to deliveries (sampled).', registers: [r] });
    this.fannedOut = new Counter({ name: 'outbox_relay_events_fanned_out_total', help: 'Events fanned out to deliveries by this replica.', registers: [r] });
    this.claimBatch = new Histogram({
      name: 'outbox_relay_claim_batch_size',
      help: 'Deliveries leased per claim round trip.',
      buckets: [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
      registers: [r],
    });
    this.circuit = new Gauge({
      name: 'outbox_relay_circuit_state',
      help: 'Circuit breaker state per subscription on this replica: 1 for the current state (closed, half-open, open), else 0.',
      labelNames: ['tenant', 'subscription', 'state'],
      registers: [r],
      collect() {
        for (const c of metrics.relay?.circuits() ?? []) metrics.setCircuit(c.tenant, c.subscriptionId, c.state);
      },
    });
    this.listenUp = new Gauge({
      name: 'outbox_relay_listen_up',
      help: '1 while the LISTEN connection is up (1 when it listens for nothing: poll-only or standby).',
      registers: [r],
      collect() {
        if (metrics.relay) this.set(metrics.relay.listening ? 1 : 0);
      },
    });
    this.databaseUp = new Gauge({
      name: 'outbox_relay_database_up',
      help: '1 when the last database round trip succeeded.',
      registers: [r],
      collect() {
        if (metrics.relay) this.set(metrics.relay.databaseHealthy ? 1 : 0);
      },
    });
    this.inFlight = new Gauge({
      name: 'outbox_relay_in_flight_requests',
      help: 'Webhook requests being sent now.',
      registers: [r],
      collect() {
        if (metrics.relay) this.set(metrics.relay.inFlight);
      },
    });
    new Gauge({
      name: 'outbox_relay_subscriptions_skipped',
      help: 'Enabled subscriptions this replica delivers nothing to because their signing secret cannot be used (see the relay\'s "subscription skipped" log line).',
      registers: [r],
      collect() {
        if (metrics.relay) this.set(metrics.relay.skippedSubscriptions().length);
      },
    });
    this.dbErrors = new Counter({ name: 'outbox_relay_database_errors_total', help: 'Database errors the relay recovered from (by retrying).', registers: [r] });
  }

  /** Feeds the metrics from a relay's events. */
  bindRelay(relay: Relay): void {
    this.relay = relay;
    relay.on('attempt', (a) => {
      const labels = { tenant: a.tenant, subscription: String(a.subscriptionId) };
      const outcome = a.outcome.kind === 'ok' ? 'delivered' : a.outcome.kind;
      this.deliveries.inc({ ...labels, outcome });
      if (a.outcome.kind === 'retry') this.retries.inc(labels);
      this.attemptDuration.observe(labels, a.result.durationMs / 1000);
    });
    relay.on('fanout', (n) => {
      if (n > 0) this.fannedOut.inc(n);
    });
    relay.on('claim', (n) => this.claimBatch.observe(n));
    relay.on('circuit', (subscriptionId, tenant, state) => this.setCircuit(tenant, subscriptionId, state));
    relay.on('db-error', () => this.dbErrors.inc());
  }

  /** Pool connections by state, read at scrape time. */
  bindPool(pool: pg.Pool): void {
    new Gauge({
      name: 'outbox_relay_db_pool_connections',
      help: 'Connections of the relay\'s pool: total, idle, and callers waiting for one.',
      labelNames: ['state'],
      registers: [this.registry],
      collect() {
        this.set({ state: 'total' }, pool.totalCount);
        this.set({ state: 'idle' }, pool.idleCount);
        this.set({ state: 'waiting' }, pool.waitingCount);
      },
    });
  }

  private setCircuit(tenant: string, subscriptionId: number, state: CircuitState): void {
    for (const s of CIRCUIT_STATES) this.circuit.set({ tenant, subscription: String(subscriptionId), state: s }, s === state ? 1 : 0);
  }

  /** Replaces the sampled queue figures (tenants absent from the sample are removed). */
  setQueueSample(samples: readonly QueueSample[], awaitingFanout: number): void {
    this.pending.reset();
    this.dead.reset();
    this.oldestAge.reset();
    for (const s of samples) {
      this.pending.set({ tenant: s.tenant }, s.pending);
      this.dead.set({ tenant: s.tenant }, s.dead);
      this.oldestAge.set({ tenant: s.tenant }, s.oldestAgeSeconds);
    }
    this.awaitingFanout.set(awaitingFanout);
  }
}

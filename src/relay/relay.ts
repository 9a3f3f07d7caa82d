/**
 * The relay engine: wakes up, fans new events out to deliveries, claims due deliveries within each
 * subscription's free capacity, sends them, and records outcomes in batches.
 *
 * Wakeup paths (any one suffices; NOTIFY is only a latency hint): a claim at start, LISTEN on
 * outbox_wakeup, a slow safety poll, a timer for the earliest due retry or lease end, an immediate
 * re-claim while work keeps coming, and a re-claim after every recorded batch of outcomes.
 * No transaction is open while a request is in flight: claims are leases (sql/005).
 */
import { EventEmitter, setMaxListeners } from 'node:events';
import type pg from 'pg';
import type { Config } from '../config/schema.js';
import { connectionOptions } from '../db/connection.js';
import { isRetryableDbError } from '../errors.js';
import type { Logger } from '../log.js';
import { plainCipher, type SecretCipher } from '../subscriptions/secretCipher.js';
import { SUBSCRIPTIONS_CHANNEL } from '../subscriptions/store.js';
import { WebhookSender, type SendResult } from '../webhook/sendWebhook.js';
import { webhookId } from '../webhook/signPayload.js';
import { CircuitBreaker, type CircuitState } from './circuitBreaker.js';
import { CIRCUIT_ROW_VISIBLE, openCircuitIds } from './circuitRecorder.js';
import { CompletionBuffer, type CompletionItem } from './completionBuffer.js';
import { eventBody, type EventFields } from './eventBody.js';
import { decideOutcome, type Outcome } from './outcome.js';
import { loadActiveSubscriptions, signingKeys, type ActiveSubscription } from './subscriptionCache.js';
import { WakeupListener } from './wakeupListener.js';

export const WAKEUP_CHANNEL = 'outbox_wakeup';

/**
 * One round trip: fans out a batch of new events (leasing fresh deliveries within our capacity) and
 * claims due deliveries with the capacity left; the last row is a summary (see sql/005).
 *
 * Its transaction commits without waiting for the WAL flush (`synchronous_commit` off for this
 * transaction only; the filter runs for every row, and there is always the summary row). This costs
 * no guarantee: a delivery is sent after its claim, and its outcome commits synchronously, which
 * flushes the claim too. So a PostgreSQL crash can only forget claims whose outcomes it also forgets,
 * and those deliveries would be sent again anyway. A lane moves on only after a durable outcome, so
 * order holds. Outcomes, releases and every other write keep the server's setting.
 */
export const POLL_SQL = `SELECT p.event_id, p.subscription_id, p.attempt, p.max_attempts, p.tenant, p.event_type,
       p.aggregate_id, p.aggregate_type, p.payload, p.created_at
FROM public.outbox_poll($1, $2::bigint[], $3::int[], $4::int[], $5) AS p
WHERE set_config('synchronous_commit', 'off', true) IS NOT NULL`;
/** The same with a payload budget per subscription (sql/019, RELAY_BUFFER_BYTES > 0). */
export const POLL_BOUNDED_SQL = `SELECT p.event_id, p.subscription_id, p.attempt, p.max_attempts, p.tenant, p.event_type,
       p.aggregate_id, p.aggregate_type, p.payload, p.created_at
FROM public.outbox_poll_bounded($1, $2::bigint[], $3::int[], $4::int[], $5, $6::bigint[]) AS p
WHERE set_config('synchronous_commit', 'off', true) IS NOT NULL`;
/*
 * The statements run on every round are prepared once per connection (named): that saves their
 * parse, about 0.1-0.2 ms a call in the server's log, on the path of every delivery. Their result
 * columns are named, not `*`, so that a migration that adds a column to what a function returns does
 * not break a relay that is still running: PostgreSQL refuses to run a prepared statement whose result
 * type changed ("cached plan must not change result type").
 */
const PREPARED = { poll: 'outbox-relay-poll', pollBounded: 'outbox-relay-poll-bounded', nextDue: 'outbox-relay-next-due', setIdle: 'outbox-relay-set-idle' } as const;
/** When the next ready delivery of these subscriptions falls due. */
const NEXT_DUE = 'SELECT extract(epoch FROM public.outbox_next_due($1::bigint[])) * 1000 AS at';
/** Gives back leases that were never used. */
const RELEASE = 'SELECT public.outbox_release($1, $2::bigint[], $3::bigint[], $4::int[], $5::boolean[]) AS n';
/** The settings capture triggers read: when to NOTIFY, and the attempt limit stamped on new events. */
const SET_RELAY_SETTINGS = `
UPDATE public.outbox_relay_state SET notify_mode = $1, max_attempts = $2, updated_at = now()
WHERE notify_mode IS DISTINCT FROM $1 OR max_attempts IS DISTINCT FROM $2`;
/** "A relay is waiting: writers, please NOTIFY" (only used with notify mode idle). */
const SET_IDLE = 'UPDATE public.outbox_relay_state SET relay_idle = $1, updated_at = now() WHERE relay_idle IS DISTINCT FROM $1';

/** A leased delivery: the event's body fields (its id as event_id) and the attempt. */
interface ClaimedRow extends Omit<EventFields, 'id'> {
  event_id: string;
  subscription_id: string;
  attempt: number;
  max_attempts: number;
}

/**
 * A leased payload's size in UTF-8 bytes, as sql/019 counts it (octet_length), measured once per row:
 * characters would under-count non-Latin text by up to 3x against the database's rooms.
 */
const payloadBytesOf = new WeakMap<ClaimedRow, number>();
function payloadBytes(row: ClaimedRow): number {
  let n = payloadBytesOf.get(row);
  if (n === undefined) {
    n = Buffer.byteLength(row.payload, 'utf8');
    payloadBytesOf.set(row, n);
  }
  return n;
}

/** One finished attempt, as reported to metrics and logs. */
export interface AttemptReport {
  subscriptionId: number;
  tenant: string;
  eventId: string;
  attempt: number;
  maxAttempts: number;
  outcome: Outcome;
  result: SendResult;
}

/** Typed events of the relay: metrics and logs hang off these rather than off the code paths. */
export interface RelayEvents {
  fanout: [events: number, durationMs: number];
  claim: [deliveries: number, durationMs: number];
  attempt: [report: AttemptReport];
  circuit: [subscriptionId: number, tenant: string, state: CircuitState];
  listen: [up: boolean];
  'db-error': [error: unknown];
  subscriptions: [count: number];
  idle: [];
}

interface SubState {
  sub: ActiveSubscription;
  /** Requests being sent. */
  inflight: number;
  /** Claimed (leased) deliveries waiting for a free slot: prefetched so sending never waits for a claim. */
  queue: ClaimedRow[];
  /** Sent, with the outcome waiting in the completion buffer: still leased, not yet recorded. */
  recording: number;
  /** The last claim returned less than asked: nothing more is due until new work arrives. */
  drained: boolean;
  /** Payload characters of this subscription's requests being sent now (its queue is counted from the queue). */
  inflightPayload: number;
  /** Payload size of this subscription's recent claims (a moving average; 0 until its first claim). */
  payloadEstimate: number;
  breaker: CircuitBreaker;
  active: boolean;
}

export interface RelayOptions {
  config: Config;
  pool: pg.Pool;
  logger: Logger;
  cipher?: SecretCipher;
  userAgent: string;
  random?: () => number;
  /** Listen for NOTIFY (default: unless notify mode is off). */
  listen?: boolean;
  /** Reload subscriptions this often even without a NOTIFY. */
  subscriptionRefreshMs?: number;
}

export class Relay extends EventEmitter<RelayEvents> {
  private readonly config: Config;
  private readonly pool: pg.Pool;
  private readonly log: Logger;
  private readonly cipher: SecretCipher;
  private readonly random: () => number;
  private readonly sender: WebhookSender;
  private readonly listener: WakeupListener | undefined;
  private readonly completions: CompletionBuffer;
  private readonly subs = new Map<number, SubState>();
  /** Enabled subscriptions left out because their secret cannot be used, with the problem. */
  private readonly skipped = new Map<number, string>();
  private readonly inflight = new Set<Promise<void>>();
  /** Subscriptions some relay had open when this one started (read once, at the first refresh). */
  private openAtStart = new Set<number>();
  private readonly sendAbort = new AbortController();

  private accepting = false;
  private starting: Promise<void> | undefined;
  private stopPromise: Promise<void> | undefined;
  private pumping: Promise<void> | undefined;
  private wanted = false;
  private fanoutWanted = true;
  private refreshWanted = false;
  private idleFlagged = false;
  private dbFailures = 0;
  private claimCursor = 0;
  private pollTimer: NodeJS.Timeout | undefined;
  private dueTimer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private refreshTimer: NodeJS.Timeout | undefined;
  private healthy = false;
  /** A standby database check is under way (a hung one must not pile up more behind it). */
  private checking = false;

  constructor(private readonly options: RelayOptions) {
    super();
    this.config = options.config;
    this.pool = options.pool;
    this.log = options.logger;
    this.cipher = options.cipher ?? plainCipher;
    this.random = options.random ?? Math.random;
    // Every send in flight listens on the shutdown signal (and stops listening when it ends); more
    // than ten at once is normal, not a leak.
    setMaxListeners(0, this.sendAbort.signal);
    const w = this.config.webhook;
    this.sender = new WebhookSender({
      connectTimeoutMs: w.connectTimeoutMs,
      maxResponseBytes: w.maxResponseBytes,
      allowPrivateTargets: w.allowPrivateTargets,
      retryAfterMaxMs: this.config.retry.retryAfterMaxMs,
      userAgent: options.userAgent,
    });
    // A standby relay claims nothing, so it has nothing to be woken for.
    const listen = options.listen ?? (this.config.relay.notifyMode !== 'off' && this.config.relay.enabled);
    if (listen) {
      this.listener = new WakeupListener({
        connection: connectionOptions(this.config.database, `${this.config.database.applicationName}-listen`),
        channels: [WAKEUP_CHANNEL, SUBSCRIPTIONS_CHANNEL],
        logger: this.log,
      });
      this.listener.on('notification', (channel) => this.onNotification(channel));
      this.listener.on('connected', () => {
        this.emit('listen', true);
        // Notifications sent while we were not listening are lost: look for work now.
        this.idleFlagged = false;
        this.refreshWanted = true;
        this.wake();
      });
      this.listener.on('disconnected', () => this.emit('listen', false));
    }
    this.completions = new CompletionBuffer({
      pool: this.pool,
      workerId: this.config.relay.workerId,
      logger: this.log,
      onFlushed: (items) => {
        for (const item of items) {
          const st = this.subs.get(item.subscriptionId);
          if (st) st.recording = Math.max(0, st.recording - 1);
        }
        this.kick();
      },
      onError: (err) => this.onDbError(err, 'recording outcomes'),
      leaseFor: (id) => this.leaseFor(id),
      keepaliveMs: Math.max(100, Math.floor(this.config.relay.leaseMs / 3)),
    });
  }

  /** Whether the LISTEN connection is up (always true when not listening, as in standby). */
  get listening(): boolean {
    return this.listener ? this.listener.up : true;
  }

  /** Whether the last database round trip succeeded. */
  get databaseHealthy(): boolean {
    return this.healthy;
  }

  /** Deliveries being sent right now. */
  get inFlight(): number {
    return this.inflight.size;
  }

  /** Before start(): subscriptions whose circuit was open lately (CircuitRecorder.recentlyOpen): they start half-open. */
  expectOpenCircuits(ids: readonly number[]): void {
    this.openAtStart = new Set(ids);
  }

  /**
   * Enabled subscriptions this relay delivers nothing to, because their signing secret cannot be used
   * (a key OUTBOX_ENCRYPTION_KEYS does not list, no current secret). Their deliveries wait.
   */
  skippedSubscriptions(): Array<{ subscriptionId: number; problem: string }> {
    return [...this.skipped].map(([subscriptionId, problem]) => ({ subscriptionId, problem }));
  }

  /** Circuit state per subscription, one entry per id (for metrics and status); probeAt: when an open one probes. */
  circuits(): Array<{ subscriptionId: number; tenant: string; state: CircuitState; probeAt?: number }> {
    return [...this.subs.values()]
      .filter((s) => s.active)
      .map((s) => ({ subscriptionId: s.sub.id, tenant: s.sub.tenant, state: s.breaker.state, ...(s.breaker.retryAt ? { probeAt: s.breaker.retryAt } : {}) }));
  }

  /**
   * Connects, loads subscriptions and starts relaying (or waits in standby when
   * ENABLE_OUTBOX_PROCESSING=false). Resolves once running; database trouble is retried in the
   * background, never fatal.
   */
  start(): Promise<void> {
    // After stop(), nothing starts: timers set now would keep the process alive.
    if (this.stopPromise) return Promise.resolve();
    this.starting ??= this.startOnce();
    return this.starting;
  }

  private async startOnce(): Promise<void> {
    if (!this.config.relay.enabled) {
      this.log.info('standby: ENABLE_OUTBOX_PROCESSING=false, connected but claiming nothing');
      await this.checkDatabase();
      // No pump runs in standby: this keeps databaseHealthy (outbox_relay_database_up) current.
      this.pollTimer = setInterval(() => void this.checkDatabase(), this.config.relay.pollIntervalMs);
      return;
    }
    this.accepting = true;
    try {
      await this.pool.query(SET_RELAY_SETTINGS, [this.config.relay.notifyMode, this.config.retry.maxAttempts]);
      await this.refreshSubscriptions();
      this.healthy = true;
    } catch (err) {
      this.onDbError(err, 'starting');
    }
    // A stop() that came while we were connecting wins: no listener, no timers.
    if (!this.accepting) return;
    if (this.listener) await this.listener.start();
    if (!this.accepting) {
      await this.listener?.stop();
      return;
    }
    this.pollTimer = setInterval(() => {
      this.fanoutWanted = true;
      this.kick();
    }, this.config.relay.pollIntervalMs);
    this.refreshTimer = setInterval(() => {
      this.refreshWanted = true;
      this.kick();
    }, this.options.subscriptionRefreshMs ?? 10_000);
    this.log.info(
      { worker: this.config.relay.workerId, notifyMode: this.config.relay.notifyMode, subscriptions: this.subs.size },
      'relay started',
    );
    this.wake();
  }

  /** In standby, readiness still needs a database that answers. One check at a time. */
  private async checkDatabase(): Promise<void> {
    if (this.checking) return;
    this.checking = true;
    try {
      await this.pool.query('SELECT 1');
      if (this.dbFailures > 0) this.log.info('database reachable again');
      this.dbFailures = 0;
      this.healthy = true;
    } catch (err) {
      this.onDbError(err, 'connecting');
    } finally {
      this.checking = false;
    }
  }

  private onNotification(channel: string): void {
    if (!this.accepting) return;
    if (channel === SUBSCRIPTIONS_CHANNEL) this.refreshWanted = true;
    this.wake();
  }

  /** New work may exist: fan out and claim. */
  private wake(): void {
    this.fanoutWanted = true;
    this.kick();
  }

  /** Runs the pump now, or once more right after the current run. Every run also fans out. */
  private kick(): void {
    if (!this.accepting) return;
    this.wanted = true;
    this.fanoutWanted = true;
    if (this.pumping) return;
    this.pumping = this.pump().finally(() => {
      this.pumping = undefined;
      if (this.wanted) this.kick();
    });
  }

  private async pump(): Promise<void> {
    try {
      while (this.wanted && this.accepting) {
        this.wanted = false;
        if (this.refreshWanted) await this.refreshSubscriptions();
        if (await this.cycle()) {
          // Work is flowing: look again at once (new events may have come in meanwhile).
          this.wanted = true;
          this.fanoutWanted = true;
          if (this.idleFlagged) {
            // Busy from now on: writers may stop notifying (each NOTIFY serializes commits).
            this.idleFlagged = false;
            await this.pool.query({ name: PREPARED.setIdle, text: SET_IDLE, values: [false] });
          }
        }
      }
      if (this.dbFailures > 0) this.log.info('database reachable again');
      this.dbFailures = 0;
      this.healthy = true;
      if (this.accepting) await this.settle();
    } catch (err) {
      this.wanted = false; // the retry timer takes over; no tight loop on a dead database
      this.onDbError(err, 'relaying');
    }
  }

  /** One round: fan out new events, claim within capacity, start sending. True if anything happened. */
  private async cycle(): Promise<boolean> {
    let progress = false;
    const batch = this.config.relay.fanoutBatchSize;
    for (let round = 0; ; round++) {
      const { ids, caps, rooms } = this.capacities();
      if (ids.length === 0 && !this.fanoutWanted) return progress;
      this.fanoutWanted = false;
      const t0 = performance.now();
      const leases = ids.map((id) => this.leaseFor(id));
      const worker = this.config.relay.workerId;
      const { rows } = await this.pool.query<ClaimedRow>(
        rooms
          ? { name: PREPARED.pollBounded, text: POLL_BOUNDED_SQL, values: [batch, ids, caps, leases, worker, rooms] }
          : { name: PREPARED.poll, text: POLL_SQL, values: [batch, ids, caps, leases, worker] },
      );
      const ms = performance.now() - t0;
      const summary = rows.pop();
      const fanned = summary?.max_attempts ?? 0;
      // Leases the budget gave back at once (sql/019): those subscriptions have more waiting.
      const givenBack = summary?.attempt ?? 0;
      this.emit('fanout', fanned, ms);
      this.emit('claim', rows.length, ms);
      if (fanned > 0 || rows.length > 0) progress = true;
      const got = new Map<number, number>();
      const bytes = new Map<number, number>();
      const unused: ClaimedRow[] = [];
      for (const row of rows) {
        const id = Number(row.subscription_id);
        got.set(id, (got.get(id) ?? 0) + 1);
        bytes.set(id, (bytes.get(id) ?? 0) + payloadBytes(row));
        const st = this.subs.get(id);
        if (!st || !st.active || !this.accepting) unused.push(row);
        else st.queue.push(row);
      }
      ids.forEach((id, i) => {
        const st = this.subs.get(id);
        if (st) {
          const n = got.get(id) ?? 0;
          st.drained = givenBack === 0 && n < (caps[i] ?? 0);
          if (n > 0) {
            const mean = (bytes.get(id) ?? 0) / n;
            st.payloadEstimate = st.payloadEstimate > 0 ? 0.7 * st.payloadEstimate + 0.3 * mean : mean;
          }
          this.startSends(st);
        }
      });
      if (unused.length) await this.release(unused, true);
      // A full fan-out batch: more new events are waiting.
      if (fanned < batch || !this.accepting || round > 100) return progress;
      this.fanoutWanted = true;
    }
  }

  /** Payload a subscription holds now, in bytes: its prefetch queue and its requests being sent. */
  private heldPayload(st: SubState): number {
    let n = st.inflightPayload;
    for (const row of st.queue) n += payloadBytes(row);
    return n;
  }

  /**
   * Free capacity per subscription: up to twice its in-flight limit may be claimed (half of it
   * queued, so a claim's round trip never leaves the receiver idle), as the circuit and its payload
   * room allow, shared out up to the claim batch size starting at a rotating subscription (fairness).
   */
  private capacities(): { ids: number[]; caps: number[]; rooms: number[] | undefined } {
    const states = [...this.subs.values()].filter((s) => s.active);
    const ids: number[] = [];
    const caps: number[] = [];
    // RELAY_BUFFER_BYTES shared equally among the active subscriptions (sql/019): each may take on
    // its share less what it holds, and asks for as many deliveries as that fits at the payload size
    // of its own recent claims (plus one: a claim always takes a subscription's first), so few come
    // back. Per subscription, so that a receiver holding large payloads never takes another's room,
    // and one with small payloads is not sized by another's large ones.
    const buffer = this.config.relay.bufferBytes;
    const rooms: number[] | undefined = buffer > 0 ? [] : undefined;
    const share = buffer > 0 ? Math.floor(buffer / Math.max(1, states.length)) : 0;
    let budget = this.config.relay.claimBatchSize;
    const n = states.length;
    this.claimCursor = n ? (this.claimCursor + 1) % n : 0;
    for (let i = 0; i < n && budget > 0; i++) {
      const st = states[(this.claimCursor + i) % n] as SubState;
      // Everything leased and not yet recorded counts, so that at most 2 x max_in_flight deliveries
      // of a subscription are unrecorded at any moment: what a crash can make us send twice.
      const outstanding = st.inflight + st.queue.length + st.recording;
      let want: number;
      switch (st.breaker.state) {
        case 'closed':
          want = 2 * st.sub.maxInFlight - outstanding;
          break;
        case 'half-open':
          want = outstanding === 0 ? 1 : 0; // one probe
          break;
        case 'open':
          want = 0;
          break;
      }
      let room = 0;
      if (rooms) {
        room = share - this.heldPayload(st);
        if (room <= 0) want = 0;
        else if (st.payloadEstimate > 0) want = Math.min(want, Math.floor(room / st.payloadEstimate) + 1);
      }
      const cap = Math.min(want, budget);
      if (cap > 0) {
        ids.push(st.sub.id);
        caps.push(cap);
        rooms?.push(room);
        budget -= cap;
      }
    }
    return { ids, caps, rooms };
  }

  /**
   * How long a claim of this subscription must hold. A claimed delivery may wait in the prefetch
   * queue until a slot frees (up to one request timeout of those in flight), then take its own
   * timeout; a lease that ended earlier would let this or another relay claim it again while it is
   * being sent (a duplicate, and with a receiver slower than the lease, forever: every outcome fenced
   * off as stale). So: twice the subscription's timeout plus a margin, never less than RELAY_LEASE_MS.
   */
  private leaseFor(subscriptionId: number): number {
    const timeout = this.subs.get(subscriptionId)?.sub.timeoutMs ?? 0;
    return Math.max(this.config.relay.leaseMs, 2 * timeout + 1_000);
  }

  /** Starts queued deliveries while the subscription has free slots and its circuit lets them through. */
  private startSends(st: SubState): void {
    while (st.queue.length > 0 && st.inflight < st.sub.maxInFlight && st.active && this.accepting) {
      if (st.breaker.allowance(1) === 0) {
        if (st.breaker.state === 'open') this.releaseQueue(st);
        return;
      }
      this.dispatch(st, st.queue.shift() as ClaimedRow);
    }
  }

  /** Gives back a subscription's queued leases without counting an attempt (circuit open, disabled, stopping). */
  private releaseQueue(st: SubState): void {
    if (st.queue.length === 0) return;
    const rows = st.queue.splice(0);
    this.release(rows, true).catch((err: unknown) => this.onDbError(err, 'releasing leases'));
  }

  private dispatch(st: SubState, row: ClaimedRow): void {
    st.inflight++;
    st.inflightPayload += payloadBytes(row);
    st.breaker.onStart();
    const p = this.deliver(st, row).catch((err: unknown) => {
      this.log.error({ err: err instanceof Error ? err.message : String(err), eventId: row.event_id, subscription: st.sub.id }, 'unexpected error while delivering');
    });
    this.inflight.add(p);
    void p.finally(() => {
      this.inflight.delete(p);
      st.inflight--;
      st.inflightPayload -= payloadBytes(row);
      this.startSends(st);
      // Refill the prefetch queue while the subscription has a backlog.
      if (!st.drained && st.queue.length < st.sub.maxInFlight) this.kick();
    });
  }

  private async deliver(st: SubState, row: ClaimedRow): Promise<void> {
    const sub = st.sub;
    // The circuit this send counts for: one reset meanwhile (a new URL) must not learn from it.
    const breaker = st.breaker;
    const body = eventBody({
      id: row.event_id,
      tenant: row.tenant,
      event_type: row.event_type,
      aggregate_id: row.aggregate_id,
      aggregate_type: row.aggregate_type,
      payload: row.payload,
      created_at: row.created_at,
    });
    const result = await this.sender.send({
      url: sub.url,
      webhookId: webhookId(row.event_id, sub.id),
      body,
      keys: signingKeys(sub),
      timeoutMs: sub.timeoutMs,
      signal: this.sendAbort.signal,
    });
    const aborted = result.error?.code === 'aborted';
    const outcome = decideOutcome(result, row.attempt, row.max_attempts, this.config.retry, this.random);
    if (!aborted && breaker === st.breaker) {
      const changed = breaker.record(result.ok);
      if (changed) {
        this.emit('circuit', sub.id, sub.tenant, changed);
        const retryAt = breaker.retryAt;
        this.log[changed === 'closed' ? 'info' : 'warn'](
          { tenant: sub.tenant, subscription: sub.id, state: changed, ...(retryAt ? { probeAt: new Date(retryAt).toISOString() } : {}) },
          changed === 'open' ? 'circuit opened: deliveries to this subscription pause (no attempts burned)' : `circuit ${changed}`,
        );
        if (retryAt) this.armDueTimer(retryAt - Date.now());
      }
    }
    if (outcome.kind === 'gone') {
      // Logged once: the other requests in flight when the receiver went away answer 410 too.
      if (st.active) this.log.warn({ tenant: sub.tenant, subscription: sub.id }, 'receiver answered 410 Gone: subscription disabled, its deliveries are kept for when it is enabled again');
      st.active = false;
      this.releaseQueue(st);
    }
    this.emit('attempt', {
      subscriptionId: sub.id,
      tenant: sub.tenant,
      eventId: row.event_id,
      attempt: row.attempt,
      maxAttempts: row.max_attempts,
      outcome,
      result,
    });
    const item: CompletionItem = {
      eventId: row.event_id,
      subscriptionId: sub.id,
      attempt: row.attempt,
      kind: aborted ? 'retry' : outcome.kind,
      httpStatus: result.status ?? null,
      error: result.error ? `${result.error.code}: ${result.error.message}` : null,
      delayMs: aborted ? 0 : outcome.delayMs,
      durationMs: result.durationMs,
    };
    st.recording++;
    this.completions.push(item);
  }

  private async release(rows: ClaimedRow[], unsent: boolean): Promise<void> {
    await this.pool.query(RELEASE, [
      this.config.relay.workerId,
      rows.map((r) => r.event_id),
      rows.map((r) => r.subscription_id),
      rows.map((r) => r.attempt),
      rows.map(() => unsent),
    ]);
  }

  /**
   * Nothing more to do right now: arm the timer for the next due delivery and, in notify mode idle,
   * ask writers to NOTIFY (then look once more, for events committed before they saw the flag).
   */
  private async settle(): Promise<void> {
    if (this.inflight.size > 0 || this.completions.size > 0) return; // outcomes will kick us
    for (const st of this.subs.values()) if (st.queue.length > 0) return;
    const active = [...this.subs.values()].filter((s) => s.active);
    if (active.length > 0) {
      const { rows } = await this.pool.query<{ at: number | null }>({ name: PREPARED.nextDue, text: NEXT_DUE, values: [active.map((s) => s.sub.id)] });
      const at = rows[0]?.at;
      if (at !== null && at !== undefined) this.armDueTimer(Number(at) - Date.now());
      for (const s of active) {
        const retryAt = s.breaker.retryAt;
        if (retryAt) this.armDueTimer(retryAt - Date.now());
      }
    }
    if (this.config.relay.notifyMode === 'idle' && !this.idleFlagged) {
      this.idleFlagged = true;
      await this.pool.query({ name: PREPARED.setIdle, text: SET_IDLE, values: [true] });
      this.emit('idle');
      // One more look: a writer that read the flag before we set it did not notify.
      this.fanoutWanted = true;
      this.wanted = true;
    } else {
      this.emit('idle');
    }
  }

  private armDueTimer(inMs: number): void {
    const delay = Math.max(5, Math.min(inMs + 5, this.config.relay.pollIntervalMs));
    if (this.dueTimer) clearTimeout(this.dueTimer);
    this.dueTimer = setTimeout(() => {
      this.dueTimer = undefined;
      this.kick();
    }, delay);
  }

  private async refreshSubscriptions(): Promise<void> {
    this.refreshWanted = false;
    const { subscriptions, problems } = await loadActiveSubscriptions(this.pool, this.cipher);
    // Subscriptions new to this relay whose circuit a relay has open (seen lately), or had open when
    // this one started: theirs start with a probe (CircuitBreaker.startWithProbe).
    const fresh = subscriptions.filter((x) => !this.subs.has(x.id)).map((x) => x.id);
    const openElsewhere = new Set<number>(this.openAtStart);
    this.openAtStart.clear();
    if (fresh.length > 0) {
      const ids = await openCircuitIds(this.pool, CIRCUIT_ROW_VISIBLE, { exceptWorker: this.config.relay.workerId, among: fresh });
      for (const id of ids) openElsewhere.add(id);
    }
    // Logged when a subscription becomes unusable (or its problem changes) and when it is usable
    // again, not at every refresh; /metrics and /readyz show the current set.
    const nowSkipped = new Map(problems.map((p) => [p.subscriptionId, p.message]));
    for (const [id, message] of nowSkipped) {
      if (this.skipped.get(id) !== message) this.log.error({ subscription: id, problem: message }, 'subscription skipped');
    }
    for (const id of this.skipped.keys()) {
      if (!nowSkipped.has(id) && subscriptions.some((x) => x.id === id)) this.log.info({ subscription: id }, 'subscription usable again');
    }
    this.skipped.clear();
    for (const [id, message] of nowSkipped) this.skipped.set(id, message);
    this.log.debug({ active: subscriptions.length, skipped: problems.length }, 'subscriptions loaded');
    const seen = new Set<number>();
    const w = this.config.webhook;
    for (const sub of subscriptions) {
      seen.add(sub.id);
      const st = this.subs.get(sub.id);
      if (st) {
        // Queued deliveries were leased for the old timeout and slot count (see leaseFor); with a
        // longer timeout or fewer slots they could outwait their lease and be claimed again while
        // still queued here, so they go back (no attempt counted) and are claimed afresh.
        const leasesTooShort = sub.timeoutMs > st.sub.timeoutMs || sub.maxInFlight < st.sub.maxInFlight;
        // A new URL is a new receiver: what the circuit learnt about the old one does not hold.
        if (sub.url.href !== st.sub.url.href) this.resetCircuit(st);
        st.sub = sub;
        st.active = true;
        if (leasesTooShort) this.releaseQueue(st);
      } else {
        this.subs.set(sub.id, {
          sub,
          inflight: 0,
          queue: [],
          recording: 0,
          drained: false,
          inflightPayload: 0,
          payloadEstimate: 0,
          active: true,
          breaker: new CircuitBreaker({ threshold: w.circuitFailureThreshold, cooldownMs: w.circuitCooldownMs, maxCooldownMs: w.circuitMaxCooldownMs }),
        });
        if (openElsewhere.has(sub.id)) {
          this.subs.get(sub.id)?.breaker.startWithProbe();
          this.log.info({ tenant: sub.tenant, subscription: sub.id }, 'circuit starts half-open: a relay had it open lately, so one probe goes first');
        }
      }
    }
    for (const [id, st] of this.subs) {
      if (seen.has(id)) continue;
      st.active = false;
      this.releaseQueue(st);
      if (st.inflight === 0 && st.recording === 0) {
        // Disabled or removed: its circuit goes with it (a re-enabled one starts closed).
        this.resetCircuit(st);
        this.subs.delete(id);
      }
    }
    this.emit('subscriptions', seen.size);
  }

  /** A fresh (closed) circuit for this subscription, announced if the old one was not closed. */
  private resetCircuit(st: SubState): void {
    const was = st.breaker.state;
    const w = this.config.webhook;
    st.breaker = new CircuitBreaker({ threshold: w.circuitFailureThreshold, cooldownMs: w.circuitCooldownMs, maxCooldownMs: w.circuitMaxCooldownMs });
    if (was !== 'closed') {
      this.emit('circuit', st.sub.id, st.sub.tenant, 'closed');
      this.log.info({ tenant: st.sub.tenant, subscription: st.sub.id }, 'circuit reset: the subscription changed its URL or stopped');
    }
  }

  private onDbError(err: unknown, doing: string): void {
    this.healthy = false;
    this.dbFailures++;
    this.emit('db-error', err);
    const message = err instanceof Error ? err.message : String(err);
    const retryable = isRetryableDbError(err);
    if (this.dbFailures === 1 || this.dbFailures % 20 === 0) {
      this.log[retryable ? 'warn' : 'error']({ err: message, failures: this.dbFailures }, `database error while ${doing}; retrying`);
    }
    if (!this.accepting || this.retryTimer) return;
    const delay = Math.min(5_000, 100 * 2 ** Math.min(this.dbFailures, 6)) * (0.5 + this.random() / 2);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.refreshWanted = true;
      this.fanoutWanted = true;
      this.kick();
    }, delay);
  }

  /**
   * Stops in order: stop listening and claiming, let in-flight sends finish within
   * RELAY_SHUTDOWN_TIMEOUT_MS (then abort them), record every outcome, close the HTTP pools.
   * Idempotent: every call returns the same promise. The caller closes the database pool.
   */
  stop(): Promise<void> {
    this.stopPromise ??= this.shutdown();
    return this.stopPromise;
  }

  private async shutdown(): Promise<void> {
    this.accepting = false;
    // Let a start that is under way finish (it sees accepting=false and stops short).
    await this.starting?.catch(() => undefined);
    for (const t of [this.pollTimer, this.refreshTimer]) if (t) clearInterval(t);
    for (const t of [this.dueTimer, this.retryTimer]) if (t) clearTimeout(t);
    await this.listener?.stop().catch(() => undefined);
    this.log.debug('stop: listener closed');
    await this.pumping?.catch(() => undefined);
    this.log.debug('stop: claiming stopped');
    // Leases claimed ahead but not sent go back at once (no attempt counted), for other replicas.
    const queued = [...this.subs.values()].flatMap((st) => st.queue.splice(0));
    if (queued.length > 0) await this.release(queued, true).catch((err: unknown) => this.onDbError(err, 'releasing leases'));
    if (this.inflight.size > 0) {
      this.log.info({ inFlight: this.inflight.size }, 'waiting for in-flight deliveries');
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        Promise.allSettled([...this.inflight]).then(() => false),
        new Promise<boolean>((r) => (timer = setTimeout(() => r(true), this.config.relay.shutdownTimeoutMs))),
      ]);
      if (timer) clearTimeout(timer);
      if (timedOut) {
        this.log.warn({ inFlight: this.inflight.size }, 'shutdown timeout: aborting in-flight deliveries (they are retried)');
        this.sendAbort.abort();
        await Promise.allSettled([...this.inflight]);
      }
    }
    this.log.debug('stop: sends finished');
    this.completions.close();
    await this.completions.drain();
    this.completions.dispose();
    this.log.debug('stop: outcomes recorded');
    await this.sender.destroy().catch(() => undefined);
    this.log.info('relay stopped');
  }
}

/**
 * `outbox-relay status`: the seed's monitoring queries (unchanged, they run as the seed wrote them),
 * plus the lag per tenant and the subscriptions that need attention.
 */
import type pg from 'pg';
import { CIRCUIT_ROW_VISIBLE } from '../relay/circuitRecorder.js';

/** The seed's "Event processing statistics". */
const EVENT_STATS = `
SELECT
  tenant,
  event_type,
  COUNT(*) as total_events,
  COUNT(CASE WHEN processed_at IS NOT NULL THEN 1 END) as processed,
  COUNT(CASE WHEN processed_at IS NULL AND attempts < max_attempts THEN 1 END) as pending,
  COUNT(CASE WHEN attempts >= max_attempts THEN 1 END) as failed
FROM outbox_events
GROUP BY tenant, event_type`;

/** The seed's "User acknowledgment statistics". */
const ACK_STATS = `
SELECT
  user_id,
  processor,
  status,
  COUNT(*) as acknowledgment_count
FROM event_acknowledgments
GROUP BY user_id, processor, status`;

/** The seed's "Performance monitoring". */
const PROCESSING_TIME = `
SELECT
  event_type,
  AVG(EXTRACT(EPOCH FROM (processed_at - created_at))) as avg_processing_time_seconds
FROM outbox_events
WHERE processed_at IS NOT NULL
GROUP BY event_type`;

/**
 * Lag per tenant, as the relay's outbox_relay_oldest_pending_age_seconds measures it: the events
 * still on their way (waiting for fan-out, or with a delivery that is not dead), and the age of the
 * oldest piece of work, a queued event since its capture and a live delivery since its fan-out (so a
 * replay of last month's events is not a month of lag). An event whose deliveries all died is not
 * lag (EVENTS counts it as failed, `replay` sends it again): counted, the lag of a tenant with one
 * dead delivery grew for ever while /metrics said 0. Stranded events are reported on their own
 * (STRANDED).
 */
const LAG = `
WITH live AS (
  SELECT d.event_id, min(d.created_at) AS since
  FROM public.outbox_deliveries AS d WHERE d.state <> 'dead' GROUP BY d.event_id
  UNION ALL
  SELECT e.id, e.created_at FROM public.outbox_fanout_queue AS q JOIN public.outbox_events AS e ON e.id = q.event_id
)
SELECT e.tenant::text AS tenant, count(DISTINCT e.id)::bigint AS unprocessed,
       extract(epoch FROM now() - min(l.since))::float8 AS oldest_seconds
FROM live AS l JOIN public.outbox_events AS e ON e.id = l.event_id
GROUP BY e.tenant
ORDER BY oldest_seconds DESC`;


/**
 * Open circuits (seen lately) of what `replay` chose: the given subscriptions (all when none is
 * given) and, with a tenant, of that tenant only, as replay's own filter combines them. It names
 * them, since what it queued waits for the circuit's next probe.
 */
export const OPEN_CIRCUITS = `
SELECT c.subscription_id::int AS id, count(*)::int AS relays,
       to_char(min(c.probe_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS "probeAt"
FROM public.outbox_circuit_states AS c
JOIN public.outbox_subscriptions AS s ON s.id = c.subscription_id
WHERE c.state = 'open' AND c.seen_at > now() - interval '${CIRCUIT_ROW_VISIBLE}'
  AND (cardinality($1::bigint[]) = 0 OR s.id = ANY ($1::bigint[])) AND (s.tenant = $2 OR $2 IS NULL)
GROUP BY c.subscription_id
ORDER BY 1`;

/** Subscriptions that are disabled or have an open circuit on some replica. */
const ATTENTION = `
SELECT s.id::int, s.tenant::text AS tenant, s.user_id AS "userId", s.enabled, s.disabled_reason AS "disabledReason",
       (SELECT json_agg(json_build_object('worker', c.worker_id, 'state', c.state,
                                          'since', to_char(c.changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
        FROM public.outbox_circuit_states AS c
        WHERE c.subscription_id = s.id AND c.seen_at > now() - interval '${CIRCUIT_ROW_VISIBLE}') AS circuits,
       (SELECT count(*)::int FROM public.outbox_deliveries AS d WHERE d.subscription_id = s.id AND d.state = 'dead') AS dead
FROM public.outbox_subscriptions AS s
WHERE NOT s.enabled
   OR EXISTS (SELECT 1 FROM public.outbox_circuit_states AS c
              WHERE c.subscription_id = s.id AND c.seen_at > now() - interval '${CIRCUIT_ROW_VISIBLE}')
   OR EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.subscription_id = s.id AND d.state = 'dead')
ORDER BY s.id`;

/**
 * `status` counts stranded events up to this many: past it, it says "at least". The count probes
 * three tables per unprocessed event, and a large backlog written around capture (a bulk load) would
 * otherwise make every `status` read all of it.
 */
export const STRANDED_COUNT_LIMIT = 10_000;

/**
 * Unprocessed events older than a minute that were never fanned out nor queued: written around
 * capture and public.outbox_write_event (sql/015). Running relays queue them (sql/015 says how soon).
 * The predicate is the sweep's (outbox_requeue_stranded); counted up to $1 rows.
 */
const STRANDED = `
SELECT count(*)::bigint AS n FROM (
  SELECT 1 FROM public.outbox_events AS e
  WHERE e.processed_at IS NULL AND e.created_at < now() - interval '1 minute' AND e.attempts = 0
    AND NOT EXISTS (SELECT 1 FROM public.outbox_fanout_queue AS q WHERE q.event_id = e.id)
    AND NOT EXISTS (SELECT 1 FROM public.outbox_deliveries AS d WHERE d.event_id = e.id)
    AND NOT EXISTS (SELECT 1 FROM public.event_acknowledgments AS a WHERE a.event_id = e.id AND a.source = 'relay')
  LIMIT $1
) AS s`;

export interface StatusReport {
  events: Array<{ tenant: string; event_type: string; total_events: number; processed: number; pending: number; failed: number }>;
  acknowledgments: Array<{ user_id: number; processor: string; status: string; acknowledgment_count: number }>;
  processingTime: Array<{ event_type: string; avg_processing_time_seconds: number }>;
  lag: Array<{ tenant: string; unprocessed: number; oldest_seconds: number }>;
  attention: Array<{ id: number; tenant: string; userId: number; enabled: boolean; disabledReason: string | null; circuits: Array<{ worker: string; state: string; since: string }> | null; dead: number }>;
  /** Events written without a fan-out queue entry, not yet queued by a relay (see STRANDED), counted up to STRANDED_COUNT_LIMIT. */
  stranded: number;
  /** True when there are more than `stranded` (the count stopped at STRANDED_COUNT_LIMIT). */
  strandedAtLeast: boolean;
}

const num = (v: unknown): number => Number(v);

export async function statusReport(client: pg.ClientBase): Promise<StatusReport> {
  // The seed's queries use unqualified names: pin the search path for them.
  await client.query('SET search_path = public');
  const events = await client.query(EVENT_STATS);
  const acks = await client.query(ACK_STATS);
  const times = await client.query(PROCESSING_TIME);
  const lag = await client.query(LAG);
  const attention = await client.query(ATTENTION);
  const stranded = await client.query<{ n: string }>(STRANDED, [STRANDED_COUNT_LIMIT + 1]);
  const nStranded = num(stranded.rows[0]?.n ?? 0);
  return {
    events: events.rows
      .map((r) => ({ tenant: r.tenant, event_type: r.event_type, total_events: num(r.total_events), processed: num(r.processed), pending: num(r.pending), failed: num(r.failed) }))
      .sort((a, b) => a.tenant.localeCompare(b.tenant) || a.event_type.localeCompare(b.event_type)),
    acknowledgments: acks.rows
      .map((r) => ({ user_id: num(r.user_id), processor: r.processor, status: r.status, acknowledgment_count: num(r.acknowledgment_count) }))
      .sort((a, b) => a.user_id - b.user_id || a.processor.localeCompare(b.processor) || a.status.localeCompare(b.status)),
    processingTime: times.rows
      .map((r) => ({ event_type: r.event_type, avg_processing_time_seconds: num(r.avg_processing_time_seconds) }))
      .sort((a, b) => a.event_type.localeCompare(b.event_type)),
    lag: lag.rows.map((r) => ({ tenant: r.tenant, unprocessed: num(r.unprocessed), oldest_seconds: num(r.oldest_seconds) })),
    attention: attention.rows,
    stranded: Math.min(nStranded, STRANDED_COUNT_LIMIT),
    strandedAtLeast: nStranded > STRANDED_COUNT_LIMIT,
  };
}

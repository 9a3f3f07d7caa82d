/**
 * Records (or replaces) one user's acknowledgment of one event of their tenant, as a 'pull'
 * acknowledgment: it overwrites a relay-written one, and acknowledging again updates the same row
 * (unique per event and user). No row comes back when the event does not exist in the tenant (404).
 * The metadata is taken by PostgreSQL from the raw request body, so its numbers keep every digit.
 * One statement: confined by outbox_api_begin (see eventFilters.ts), then the upsert.
 * Parameters: $1 tenant, $2 user id, $3 event id, $4 processor, $5 status, $6 raw body (jsonb).
 */
import type pg from 'pg';

export const ACKNOWLEDGE_EVENT_SQL = `
INSERT INTO public.event_acknowledgments AS a (event_id, user_id, tenant, processor, status, processed_at, metadata, source)
SELECT e.id, b.user_id, e.tenant, $4, $5::public.acknowledgment_status, now(), nullif($6::jsonb -> 'metadata', 'null'::jsonb), 'pull'
FROM public.outbox_api_begin($1, $2) AS b
CROSS JOIN LATERAL (SELECT e.id, e.tenant FROM public.outbox_events AS e WHERE e.tenant = b.tenant AND e.id = $3 LIMIT 1) AS e
ON CONFLICT (event_id, user_id) DO UPDATE
    SET processor = excluded.processor, status = excluded.status, processed_at = excluded.processed_at,
        metadata = excluded.metadata, source = 'pull', updated_at = now()
RETURNING a.id::text AS id, a.event_id::text AS event_id, a.user_id, a.processor::text AS processor, a.status::text AS status,
    to_char(a.processed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS processed_at`;

/** The acknowledgment as the API returns it; ids are bigint, kept as text to splice into JSON exactly. */
export interface AcknowledgmentRow {
  id: string;
  event_id: string;
  user_id: number;
  processor: string;
  status: string;
  processed_at: string;
}

/** The seed's acknowledgment object, with its numbers exactly as PostgreSQL rendered them. */
export function acknowledgmentJson(r: AcknowledgmentRow): string {
  return (
    `{"id":${r.id},"event_id":${r.event_id},"user_id":${r.user_id},"processor":${JSON.stringify(r.processor)},` +
    `"status":${JSON.stringify(r.status)},"processed_at":${JSON.stringify(r.processed_at)}}`
  );
}

export interface AcknowledgeInput {
  tenant: string;
  eventId: string;
  userId: number;
  processor: string;
  status: string;
  rawBody: string;
}

export function acknowledgeEventQuery(i: AcknowledgeInput): pg.QueryConfig {
  return {
    name: 'outbox_api_acknowledge',
    text: ACKNOWLEDGE_EVENT_SQL,
    values: [i.tenant, i.userId, i.eventId, i.processor, i.status, i.rawBody],
  };
}

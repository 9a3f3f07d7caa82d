/**
 * The webhook body: the immutable part of the event object the pull API returns, identical on every
 * attempt and replay. The payload is spliced in as PostgreSQL rendered it (never parsed into JS
 * numbers), so numerics of any precision arrive exactly as stored.
 */
export interface EventFields {
  id: string;
  tenant: string;
  event_type: string;
  aggregate_id: string;
  aggregate_type: string;
  /** jsonb rendered as text by PostgreSQL. */
  payload: string;
  /** ISO 8601 UTC with milliseconds. */
  created_at: string;
}

export function eventBody(e: EventFields): string {
  return (
    `{"id":${JSON.stringify(e.id)},"tenant":${JSON.stringify(e.tenant)},"event_type":${JSON.stringify(e.event_type)},` +
    `"aggregate_id":${JSON.stringify(e.aggregate_id)},"aggregate_type":${JSON.stringify(e.aggregate_type)},` +
    `"payload":${e.payload},"created_at":${JSON.stringify(e.created_at)}}`
  );
}

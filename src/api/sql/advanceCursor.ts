/**
 * One step of a user's pull cursor (see public.outbox_pull_advance in sql/007): settles the id horizon
 * and moves `hidden_through` over at most `chunk` events the user has hidden. `more` = call again now.
 * Confined like every statement of the API (outbox_api_begin first, by the lateral reference).
 * Parameters: $1 tenant, $2 user id, $3 settle delay (ms), $4 chunk size.
 */
import type pg from 'pg';

export function advanceCursorQuery(tenant: string, userId: number, settleMs: number, chunk: number): pg.QueryConfig {
  return {
    name: 'outbox_api_advance',
    text:
      'SELECT x.hidden_through::text AS hidden_through, x.more ' +
      'FROM public.outbox_api_begin($1, $2) AS b CROSS JOIN LATERAL public.outbox_pull_advance(b.tenant, b.user_id, $3, $4) AS x',
    values: [tenant, userId, settleMs, chunk],
  };
}

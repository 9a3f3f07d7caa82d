/**
 * The WHERE clause shared by the event list and its count. It runs inside a subquery joined LATERALly
 * to `public.outbox_api_begin($1, $2) AS b` (sql/007), which confines the statement to the tenant and
 * user and returns them with the user's pull cursor; every condition refers to `b`, so that call runs
 * first. Every value is a parameter ($1 tenant and $2 user belong to the begin call; filters follow);
 * the clause text depends only on which filters are present, so each shape is one prepared statement.
 * `e.tenant = b.tenant` is always the first condition.
 */
import type { ListQuery } from '../validation.js';

export type FilterInput = Pick<ListQuery, 'eventType' | 'aggregateType' | 'status' | 'excludeAcknowledged'>;

/** The acknowledgment statuses that hide an event from `exclude_acknowledged=true` ('failed' does not). */
export const HIDING_STATUSES_SQL = "('processed', 'skipped', 'in_progress')";

/** How every pull API statement starts: confined to the tenant ($1) and user ($2). */
export const BEGIN_FROM = 'public.outbox_api_begin($1, $2) AS b';

export interface WhereClause {
  text: string;
  /** All values, $1 and $2 (tenant, user) first. */
  values: unknown[];
  /** A short name of the clause's shape, for prepared statement names. */
  shape: string;
}

export function eventWhere(f: FilterInput, tenant: string, userId: number): WhereClause {
  const values: unknown[] = [tenant, userId];
  const parts = ['e.tenant = b.tenant'];
  let shape = '';
  if (f.excludeAcknowledged) {
    // Each event passed over is looked up in the user's acknowledgments by key: `OFFSET 0` keeps the
    // NOT EXISTS a correlated subplan, so the cost follows the events scanned whatever the statistics
    // say. As an anti-join, right after a bulk load into near-empty tables (before autovacuum analysed
    // them), the planner chose a nested loop comparing every event with every acknowledgment: 18-23 s
    // for one page of a 500,000-event table, 0.11 s keyed in the same state; the count behaved alike.
    // With statistics a page costs about the same either way; the count (computed in the background)
    // takes about five times as long as a hash anti-join would (see the README's Performance).
    parts.push(
      'e.id > b.hidden_through',
      'NOT EXISTS (SELECT 1 FROM public.event_acknowledgments AS a WHERE a.user_id = b.user_id AND a.tenant = b.tenant ' +
        `AND a.event_id = e.id AND a.status IN ${HIDING_STATUSES_SQL} OFFSET 0)`,
    );
    shape += 'x';
  }
  if (f.eventType !== undefined) {
    values.push(f.eventType);
    parts.push(`e.event_type = $${values.length}`);
    shape += 'e';
  }
  if (f.aggregateType !== undefined) {
    values.push(f.aggregateType);
    parts.push(`e.aggregate_type = $${values.length}`);
    shape += 'a';
  }
  if (f.status !== 'all') {
    values.push(f.status);
    parts.push(`e.status = $${values.length}`);
    shape += 's';
  }
  return { text: parts.join(' AND '), values, shape: shape || 'all' };
}

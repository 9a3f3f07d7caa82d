/**
 * One page of a tenant's events, in the requested (whitelisted) order with `id` breaking ties, one row
 * more than asked so that `hasMore` is exact. Each event comes as the webhook body's fields, rendered
 * by PostgreSQL as text (the payload is never parsed into JS numbers), plus the derived status.
 * One statement: confined by outbox_api_begin (see eventFilters.ts), then the page.
 */
import type pg from 'pg';
import type { EventFields } from '../../relay/eventBody.js';
import type { ListQuery, OrderBy } from '../validation.js';
import { BEGIN_FROM, eventWhere } from './eventFilters.js';

/** The whitelist of ORDER BY columns: the only identifiers a request chooses. */
const ORDER_COLUMNS: Readonly<Record<OrderBy, string>> = {
  id: 'e.id',
  created_at: 'e.created_at',
  event_type: 'e.event_type',
  aggregate_type: 'e.aggregate_type',
  status: 'e.status',
};

/** The webhook body's fields (one definition, so push and pull cannot drift) and the derived status. */
export interface EventRow extends EventFields {
  status: string;
}

export function listEventsQuery(q: ListQuery, tenant: string, userId: number): pg.QueryConfig {
  const where = eventWhere(q, tenant, userId);
  const values = [...where.values, q.limit + 1, q.offset];
  const column = ORDER_COLUMNS[q.orderBy];
  const dir = q.orderDir === 'DESC' ? 'DESC' : 'ASC';
  const byId = column === 'e.id';
  return {
    name: `outbox_api_list_${where.shape}_${q.orderBy}_${dir.toLowerCase()}`,
    text:
      'SELECT p.id, p.tenant, p.event_type, p.aggregate_id, p.aggregate_type, p.payload, p.created_at, p.status ' +
      `FROM ${BEGIN_FROM} CROSS JOIN LATERAL (` +
      `SELECT e.id AS k_id, ${byId ? '' : `${column} AS k_sort, `}e.id::text AS id, e.tenant::text AS tenant, ` +
      'e.event_type::text AS event_type, e.aggregate_id, e.aggregate_type::text AS aggregate_type, e.payload::text AS payload, ' +
      `to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS created_at, e.status ` +
      `FROM public.outbox_events AS e WHERE ${where.text} ` +
      `ORDER BY ${byId ? `e.id ${dir}` : `${column} ${dir}, e.id ${dir}`} LIMIT $${values.length - 1} OFFSET $${values.length}` +
      `) AS p ORDER BY ${byId ? `p.k_id ${dir}` : `p.k_sort ${dir}, p.k_id ${dir}`}`,
    values,
  };
}

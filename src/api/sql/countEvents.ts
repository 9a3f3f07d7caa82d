/** How many events match a list request's filters (all pages), for `pagination.total`. One statement. */
import type pg from 'pg';
import { BEGIN_FROM, eventWhere, type FilterInput } from './eventFilters.js';

export function countEventsQuery(f: FilterInput, tenant: string, userId: number): pg.QueryConfig {
  const where = eventWhere(f, tenant, userId);
  return {
    name: `outbox_api_count_${where.shape}`,
    text: `SELECT c.n FROM ${BEGIN_FROM} CROSS JOIN LATERAL (SELECT count(*)::text AS n FROM public.outbox_events AS e WHERE ${where.text}) AS c`,
    values: where.values,
  };
}

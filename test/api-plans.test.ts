/**
 * The pull API's page query keeps its cost in proportion to the events it scans even when the
 * statistics are stale: right after a bulk load into near-empty tables (before autovacuum analyses
 * them), a join-based `exclude_acknowledged` was planned as a nested loop that compared every event
 * with every acknowledgment (23 s for one page of 500,000 events). The page looks each event's
 * acknowledgment up by key instead (src/api/sql/eventFilters.ts, `probe`).
 */
import t from 'tap';
import { listEventsQuery } from '../src/api/sql/listEvents.js';
import { parseListQuery } from '../src/api/validation.js';
import { freshDatabase } from './helpers/db.js';

interface PlanNode {
  'Node Type': string;
  'Relation Name'?: string;
  'Parent Relationship'?: string;
  'Actual Rows'?: number;
  'Actual Loops'?: number;
  'Rows Removed by Join Filter'?: number;
  Plans?: PlanNode[];
}

function nodes(plan: PlanNode): PlanNode[] {
  return [plan, ...(plan.Plans ?? []).flatMap(nodes)];
}

t.test('a page of exclude_acknowledged=true right after a bulk load, before any ANALYZE', async (t) => {
  const db = await freshDatabase(t);
  const TENANT = 'tenant_p';
  const USER = 9;
  const EVENTS = 30_000;
  const ACKED = 10_000;
  await db.query(`
    ALTER TABLE public.outbox_events SET (autovacuum_enabled = false);
    ALTER TABLE public.event_acknowledgments SET (autovacuum_enabled = false)`);
  // Three tenants interleaved; the user has acknowledged the oldest ACKED events of theirs (no cursor yet).
  await db.query(
    `INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload)
     SELECT CASE g % 3 WHEN 0 THEN $1 WHEN 1 THEN 'tenant_q' ELSE 'tenant_r' END, 'vendors_update', g::text, 'vendors',
            jsonb_build_object('g', g)
     FROM generate_series(1, $2::int) AS g`,
    [TENANT, EVENTS * 3],
  );
  await db.query(
    `INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, status, source)
     SELECT id, $2, tenant, 'processed', 'pull' FROM public.outbox_events WHERE tenant = $1 ORDER BY id LIMIT $3`,
    [TENANT, USER, ACKED],
  );

  const q = listEventsQuery(parseListQuery(new URLSearchParams('exclude_acknowledged=true&limit=50')), TENANT, USER);
  const { rows } = await db.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(`EXPLAIN (ANALYZE, FORMAT JSON) ${q.text}`, q.values);
  const plan = rows[0]?.['QUERY PLAN'][0]?.Plan;
  t.ok(plan, 'explained');
  const all = plan ? nodes(plan) : [];
  const removed = all.reduce((n, p) => n + (p['Rows Removed by Join Filter'] ?? 0), 0);
  t.ok(removed < EVENTS, `no join compares events with acknowledgments wholesale (${removed} rows removed by join filters)`);
  const ackScans = all.filter((p) => p['Relation Name'] === 'event_acknowledgments');
  t.ok(ackScans.length > 0, 'the acknowledgments are read');
  // EXPLAIN reports rows per loop: a look-up by key finds at most one, a wholesale scan finds them all.
  for (const scan of ackScans) {
    t.ok((scan['Actual Rows'] ?? 0) <= 1, `each look-up finds at most one acknowledgment (${scan['Node Type']}, ${scan['Actual Rows']} rows per loop x ${scan['Actual Loops']} loops)`);
  }

  // And the page itself: the user's first 51 events after the acknowledged ones, in id order.
  const page = await db.query<{ id: string }>(q.text, q.values);
  const expected = await db.query<{ id: string }>(
    'SELECT e.id::text AS id FROM public.outbox_events AS e WHERE e.tenant = $1 ORDER BY e.id OFFSET $2 LIMIT 51',
    [TENANT, ACKED],
  );
  t.same(page.rows.map((r) => r.id), expected.rows.map((r) => r.id), 'the page skips exactly the acknowledged events');
});

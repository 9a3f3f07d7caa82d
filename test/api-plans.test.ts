/**
 * The pull API's exclude_acknowledged statements (the page and the count behind pagination.total)
 * look each event's acknowledgment up by key, so their cost follows the events they scan even when
 * the statistics are stale. Right after a bulk load into near-empty tables (before autovacuum analyses
 * them), an anti-join was planned as a nested loop comparing every event with every acknowledgment:
 * 18-23 s for one page of 500,000 events (src/api/sql/eventFilters.ts). Checked here in the plans:
 * every read of event_acknowledgments is an index look-up on the event id.
 */
import t from 'tap';
import { countEventsQuery } from '../src/api/sql/countEvents.js';
import { listEventsQuery } from '../src/api/sql/listEvents.js';
import { parseListQuery } from '../src/api/validation.js';
import { freshDatabase } from './helpers/db.js';

interface PlanNode {
  'Node Type': string;
  'Index Cond'?: string;
  'Relation Name'?: string;
  'Actual Rows'?: number;
  'Actual Loops'?: number;
  'Rows Removed by Join Filter'?: number;
  Plans?: PlanNode[];
}

function nodes(plan: PlanNode): PlanNode[] {
  return [plan, ...(plan.Plans ?? []).flatMap(nodes)];
}

t.test('exclude_acknowledged=true right after a bulk load, before any ANALYZE: page and count', async (t) => {
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

  const filters = parseListQuery(new URLSearchParams('exclude_acknowledged=true&limit=50'));
  const statements = { page: listEventsQuery(filters, TENANT, USER), count: countEventsQuery(filters, TENANT, USER) };
  for (const [what, q] of Object.entries(statements)) {
    const { rows } = await db.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(`EXPLAIN (ANALYZE, FORMAT JSON) ${q.text}`, q.values);
    const plan = rows[0]?.['QUERY PLAN'][0]?.Plan;
    t.ok(plan, `${what}: explained`);
    const all = plan ? nodes(plan) : [];
    const removed = all.reduce((n, p) => n + (p['Rows Removed by Join Filter'] ?? 0), 0);
    t.ok(removed < EVENTS, `${what}: no join compares events with acknowledgments wholesale (${removed} rows removed by join filters)`);
    const ackScans = all.filter((p) => p['Relation Name'] === 'event_acknowledgments');
    t.ok(ackScans.length > 0, `${what}: the acknowledgments are read`);
    // A look-up by key: an index scan on the event id that finds at most one row per loop (EXPLAIN
    // reports rows per loop); a wholesale read finds them all at once, or scans them per event.
    for (const scan of ackScans) {
      const desc = `${scan['Node Type']} on ${scan['Index Cond'] ?? 'no index condition'}, ${scan['Actual Rows']} rows per loop x ${scan['Actual Loops']} loops`;
      t.match(scan['Node Type'], /^Index (Only )?Scan$/, `${what}: an index scan (${desc})`);
      t.match(scan['Index Cond'] ?? '', /event_id = e\.id/, `${what}: keyed on the event (${desc})`);
      t.ok((scan['Actual Rows'] ?? 0) <= 1, `${what}: at most one acknowledgment per event (${desc})`);
    }
  }

  // And the results: the count, and the page (the user's first 51 events after the acknowledged ones).
  const count = await db.query<{ n: string }>(statements.count.text, statements.count.values);
  t.equal(Number(count.rows[0]?.n), EVENTS - ACKED, 'the count leaves out exactly the acknowledged events');
  const page = await db.query<{ id: string }>(statements.page.text, statements.page.values);
  const expected = await db.query<{ id: string }>(
    'SELECT e.id::text AS id FROM public.outbox_events AS e WHERE e.tenant = $1 ORDER BY e.id OFFSET $2 LIMIT 51',
    [TENANT, ACKED],
  );
  t.same(page.rows.map((r) => r.id), expected.rows.map((r) => r.id), 'the page skips exactly the acknowledged events');
});

/**
 * 3. What capture costs the writer: concurrent connections doing single-row INSERT transactions for a
 * fixed time, without the trigger and with it, under the two notify settings the trigger reads:
 * `always` (a NOTIFY per capturing statement: what a relay in notify mode always asks for) and `idle`
 * with relay_idle = false (what the default notify mode amounts to while the relay is busy, i.e.
 * under load: no NOTIFY). Then 100-row INSERT statements, rows/s with and without the trigger. Each
 * phase starts from empty tables after a CHECKPOINT. A LISTEN connection counts the notifications, and
 * a last check shows that wakeups still work once the relay says it is idle.
 *
 * A reference phase per statement shape runs a lower bound for any trigger-based capture on this
 * machine: a plain statement-level trigger that inserts each new row as JSON into a table with only
 * a primary key (no SECURITY DEFINER or pinned settings, no fan-out queue, no seed indexes, no
 * NOTIFY). It is not a product; it shows how much of the capture cost is the machine's.
 */
import pg from 'pg';
import type { Ctx, WriterFigures } from '../context.js';
import { note, sleep } from '../lifecycle.js';
import { checkpoint, createTenant, ROW_DATA, runWriters, setCapture, setNotify } from '../workload.js';
import { round } from './common.js';

const TENANT = 'bench_tenant';

/** The reference capture (see the header): created once per run, in its own schema. */
const REFERENCE_SQL = `
CREATE SCHEMA bench_reference;
CREATE TABLE bench_reference.events (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant text NOT NULL, event_type text NOT NULL, aggregate_id text NOT NULL,
  payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION bench_reference.capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO bench_reference.events (tenant, event_type, aggregate_id, payload)
  SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME || '_insert', n.id::text, to_jsonb(n.*) FROM reference_new AS n;
  RETURN NULL;
END $$;`;
const REFERENCE_ON = `CREATE TRIGGER bench_reference_capture AFTER INSERT ON ${TENANT}.items
  REFERENCING NEW TABLE AS reference_new FOR EACH STATEMENT EXECUTE FUNCTION bench_reference.capture()`;
const REFERENCE_OFF = `DROP TRIGGER IF EXISTS bench_reference_capture ON ${TENANT}.items`;

type Capture = 'none' | 'trigger' | 'reference';

export async function captureSection(ctx: Ctx): Promise<void> {
  const db = await ctx.server.createDatabase('capture');
  const listener = new pg.Client({ connectionString: db.url });
  listener.on('error', () => undefined);
  try {
    await createTenant(db.pool, TENANT, { capture: false });
    await listener.connect();
    let notifications = 0;
    listener.on('notification', () => notifications++);
    await listener.query('LISTEN outbox_wakeup');

    const { writers, captureSeconds } = ctx.opts;
    const single = { sql: `INSERT INTO ${TENANT}.items (data) VALUES ($1)`, params: [ROW_DATA], rowsPerStatement: 1 };
    const multi = { sql: `INSERT INTO ${TENANT}.items (data) SELECT $1 FROM generate_series(1, 100)`, params: [ROW_DATA], rowsPerStatement: 100 };

    await db.pool.query(REFERENCE_SQL);
    const phase = async (name: string, capture: Capture, mode: 'always' | 'idle', relayIdle: boolean, w: typeof single, seconds = captureSeconds): Promise<WriterFigures> => {
      await setCapture(db.pool, TENANT, capture === 'trigger');
      await db.pool.query(capture === 'reference' ? REFERENCE_ON : REFERENCE_OFF);
      await setNotify(db.pool, mode, relayIdle);
      await db.pool.query(`TRUNCATE ${TENANT}.items, public.outbox_events, public.outbox_fanout_queue, bench_reference.events CASCADE`);
      await checkpoint(db.pool);
      await sleep(200);
      notifications = 0;
      const r = await runWriters(db.url, { connections: writers, durationMs: seconds * 1000, ...w });
      await sleep(200); // let the last notifications arrive
      const f: WriterFigures = {
        statements: r.statements,
        rows: r.rows,
        seconds: round(r.seconds, 2),
        perSecond: round(r.perSecond),
        rowsPerSecond: round(r.rowsPerSecond),
        notifications,
      };
      note(`  ${name}: ${f.perSecond.toLocaleString('en-US')} statements/s, ${f.rowsPerSecond.toLocaleString('en-US')} rows/s, ${notifications} notifications`);
      return f;
    };

    note(`3. capture cost: ${writers} writers, ${captureSeconds} s per phase`);
    await phase('warm-up', 'none', 'always', true, single, Math.min(2, captureSeconds));
    const singleNone = await phase('single-row, no trigger', 'none', 'always', true, single);
    const singleAlways = await phase('single-row, trigger, notify always', 'trigger', 'always', true, single);
    const singleIdle = await phase('single-row, trigger, notify idle (relay busy)', 'trigger', 'idle', false, single);
    const singleReference = await phase('single-row, reference trigger', 'reference', 'idle', false, single);
    const multiNone = await phase('100-row, no trigger', 'none', 'always', true, multi);
    const multiIdle = await phase('100-row, trigger, notify idle (relay busy)', 'trigger', 'idle', false, multi);
    const multiAlways = await phase('100-row, trigger, notify always', 'trigger', 'always', true, multi);
    const multiReference = await phase('100-row, reference trigger', 'reference', 'idle', false, multi);
    await db.pool.query(REFERENCE_OFF);
    await setCapture(db.pool, TENANT, true);

    // Wakeups still work: once a relay flags itself idle, the next capturing commit notifies.
    await setNotify(db.pool, 'idle', true);
    notifications = 0;
    await db.pool.query(`INSERT INTO ${TENANT}.items (data) VALUES ($1)`, [ROW_DATA]);
    const deadline = Date.now() + 2_000;
    while (notifications === 0 && Date.now() < deadline) await sleep(20);

    ctx.results.capture = {
      connections: writers,
      single: { none: singleNone, always: singleAlways, idleBusy: singleIdle, reference: singleReference },
      multi: { none: multiNone, idleBusy: multiIdle, always: multiAlways, reference: multiReference },
      wakeupWhenIdle: notifications > 0,
    };
  } finally {
    await listener.end().catch(() => undefined);
    await db.drop();
  }
}

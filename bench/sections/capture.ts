/**
 * 3. What capture costs the writer: concurrent connections doing single-row INSERT transactions for a
 * fixed time, without the trigger and with it, under the two notify settings the trigger reads:
 * `always` (a NOTIFY per capturing statement: what a relay in notify mode always asks for) and `idle`
 * with relay_idle = false (what the default notify mode amounts to while the relay is busy, i.e.
 * under load: no NOTIFY). Then 100-row INSERT statements, rows/s with and without the trigger. Each
 * phase starts from empty tables after a CHECKPOINT. A LISTEN connection counts the notifications, and
 * a last check shows that wakeups still work once the relay says it is idle.
 */
import pg from 'pg';
import type { Ctx, WriterFigures } from '../context.js';
import { note, sleep } from '../lifecycle.js';
import { checkpoint, createTenant, ROW_DATA, runWriters, setCapture, setNotify } from '../workload.js';
import { round } from './common.js';

const TENANT = 'bench_tenant';

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

    const phase = async (name: string, trigger: boolean, mode: 'always' | 'idle', relayIdle: boolean, w: typeof single, seconds = captureSeconds): Promise<WriterFigures> => {
      await setCapture(db.pool, TENANT, trigger);
      await setNotify(db.pool, mode, relayIdle);
      await db.pool.query(`TRUNCATE ${TENANT}.items, public.outbox_events, public.outbox_fanout_queue CASCADE`);
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
    await phase('warm-up', false, 'always', true, single, Math.min(2, captureSeconds));
    const singleNone = await phase('single-row, no trigger', false, 'always', true, single);
    const singleAlways = await phase('single-row, trigger, notify always', true, 'always', true, single);
    const singleIdle = await phase('single-row, trigger, notify idle (relay busy)', true, 'idle', false, single);
    const multiNone = await phase('100-row, no trigger', false, 'always', true, multi);
    const multiIdle = await phase('100-row, trigger, notify idle (relay busy)', true, 'idle', false, multi);
    const multiAlways = await phase('100-row, trigger, notify always', true, 'always', true, multi);

    // Wakeups still work: once a relay flags itself idle, the next capturing commit notifies.
    await setNotify(db.pool, 'idle', true);
    notifications = 0;
    await db.pool.query(`INSERT INTO ${TENANT}.items (data) VALUES ($1)`, [ROW_DATA]);
    const deadline = Date.now() + 2_000;
    while (notifications === 0 && Date.now() < deadline) await sleep(20);

    ctx.results.capture = {
      connections: writers,
      single: { none: singleNone, always: singleAlways, idleBusy: singleIdle },
      multi: { none: multiNone, idleBusy: multiIdle, always: multiAlways },
      wakeupWhenIdle: notifications > 0,
    };
  } finally {
    await listener.end().catch(() => undefined);
    await db.drop();
  }
}

/**
 * Retention on a few hundred thousand events: `outbox-relay cleanup` removes exactly the processed
 * events older than RETENTION_DAYS (with their acknowledgments) and the events whose deliveries all
 * died longer than RETENTION_DEAD_DAYS ago (with deliveries and acknowledgments); pending, recent and
 * live-delivery events stay; the printed counts are the real ones. Meanwhile a writer going through
 * the capture triggers and a relay delivering keep making progress and nobody waits on its locks; a
 * second cleanup at the same time skips. `status` prints the seed's tables, `--json` parses.
 */
import t from 'tap';
import pg from 'pg';
import { runCli, type CliResult } from './helpers/cli.js';
import { freshDatabase, type TestDatabase } from './helpers/db.js';
import { startReceiver } from './helpers/receiver.js';
import { count, createTenant, spawnRelay, startRelay, subscribe, tenantName, waitFor, writeAll } from './helpers/relay.js';

const DAYS = 30;
const DEAD_DAYS = 90;
const RETENTION_LOCK_KEY = 7411201007n;

/** The seeded categories: how many events, and what retention must do with them. */
const N = {
  A: 160_000, // processed 31+ days ago: removed with their acknowledgments
  B: 10_000, // created 40 days ago, processed 10 days ago: stays
  C: 30_000, // created and processed 5 days ago: stays
  D: 5_000, // pending, 40 days old, a live delivery retrying tomorrow: stays
  D2: 1_000, // pending, 100 days old, a live delivery: stays
  E: 30_000, // every delivery dead, 100 days old: removed with deliveries and acknowledgments
  F: 10_000, // every delivery dead, 60 days old (younger than the dead retention): stays
  G: 2_000, // 100 days old, one delivery dead and one live: stays
} as const;
type Category = keyof typeof N;
const REMOVED: readonly Category[] = ['A', 'E'];

/** Inserts one category of events directly (as old rows would be), tagged in the payload. */
function seedEvents(tenant: string, cat: Category, created: string, processed: string, attempts: string): string {
  return `
    INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, attempts, max_attempts, processed_at, created_at, updated_at)
    SELECT '${tenant}', 'vendors_update', '${cat}-' || g, 'vendors', jsonb_build_object('cat', '${cat}', 'g', g),
           ${attempts}, 5, ${processed}, c, c
    FROM generate_series(1, ${N[cat]}) AS g, LATERAL (SELECT ${created} AS c) AS x`;
}

function seedDeliveries(sub: number, cats: Category[], state: 'ready' | 'dead', extra = 'true'): string {
  return `
    INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state, attempts, next_attempt_at, last_attempt_at, last_status, last_error, created_at)
    SELECT e.id, ${sub}, public.outbox_lane(e.aggregate_type, e.aggregate_id::text), '${state}',
           ${state === 'dead' ? 5 : 1}, ${state === 'dead' ? 'e.created_at' : "now() + interval '1 day'"},
           e.created_at, 500, 'http_status: HTTP 500', e.created_at
    FROM public.outbox_events AS e
    WHERE e.payload->>'cat' IN (${cats.map((c) => `'${c}'`).join(', ')}) AND ${extra}`;
}

function seedAcks(user: number, cats: Category[], status: string, source: string, extra = 'true'): string {
  return `
    INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, processor, status, processed_at, source)
    SELECT e.id, ${user}, e.tenant, 'flowgram.ai', '${status}', coalesce(e.processed_at, e.created_at), '${source}'
    FROM public.outbox_events AS e
    WHERE e.payload->>'cat' IN (${cats.map((c) => `'${c}'`).join(', ')}) AND ${extra}`;
}

/** Events, acknowledgments and deliveries per category. */
async function census(db: TestDatabase): Promise<Record<string, { events: number; acks: number; deliveries: number }>> {
  const { rows } = await db.query<{ cat: string; events: number; acks: number; deliveries: number }>(`
    SELECT e.payload->>'cat' AS cat, count(*)::int AS events,
           coalesce(sum((SELECT count(*) FROM public.event_acknowledgments AS a WHERE a.event_id = e.id)), 0)::int AS acks,
           coalesce(sum((SELECT count(*) FROM public.outbox_deliveries AS d WHERE d.event_id = e.id)), 0)::int AS deliveries
    FROM public.outbox_events AS e WHERE e.payload ? 'cat' GROUP BY 1`);
  const out: Record<string, { events: number; acks: number; deliveries: number }> = {};
  for (const c of Object.keys(N)) out[c] = { events: 0, acks: 0, deliveries: 0 };
  for (const r of rows) out[r.cat] = { events: r.events, acks: r.acks, deliveries: r.deliveries };
  return out;
}

const retentionEnv = (url: string, batch: number) => ({
  DATABASE_URL: url,
  RETENTION_DAYS: String(DAYS),
  RETENTION_DEAD_DAYS: String(DEAD_DAYS),
  RETENTION_BATCH_SIZE: String(batch),
  LOG_LEVEL: 'warn',
});

t.test('cleanup on a few hundred thousand events: the right rows go, the counts are true, writers and the relay keep going, a second cleanup skips', async (t) => {
  const db = await freshDatabase(t);
  const S = tenantName('tret'); // the seeded history
  const L = tenantName('tlive'); // live traffic during the cleanup
  await createTenant(db, L);
  const recv = await startReceiver(t);
  const s1 = await subscribe(db, { tenant: S, userId: 1, url: recv.url('/s1') });
  const s2 = await subscribe(db, { tenant: S, userId: 2, url: recv.url('/s2') });
  const live = await subscribe(db, { tenant: L, userId: 1, url: recv.url('/live') });
  recv.secrets.push(s1.secret, s2.secret, live.secret);

  // The seed, set-based. `g` spreads creation times so that batches walk through time.
  const seed = new pg.Client({ connectionString: db.url });
  await seed.connect();
  try {
    const statements = [
      seedEvents(S, 'A', "now() - interval '31 days' - g * interval '10 seconds'", "c + interval '1 minute'", '1'),
      seedEvents(S, 'B', "now() - interval '40 days' - g * interval '1 second'", "now() - interval '10 days'", '1'),
      seedEvents(S, 'C', "now() - interval '5 days' - g * interval '1 second'", "c + interval '1 minute'", '1'),
      seedEvents(S, 'D', "now() - interval '40 days' - g * interval '1 second'", 'NULL', '1'),
      seedEvents(S, 'D2', "now() - interval '100 days' - g * interval '1 second'", 'NULL', '1'),
      seedEvents(S, 'E', "now() - interval '100 days' - g * interval '10 seconds'", 'NULL', '5'),
      seedEvents(S, 'F', "now() - interval '60 days' - g * interval '1 second'", 'NULL', '5'),
      seedEvents(S, 'G', "now() - interval '100 days' - g * interval '1 second'", 'NULL', '5'),
      // Acknowledgments: the relay's for user 1, some by pull for user 2.
      seedAcks(1, ['A', 'B', 'C'], 'processed', 'relay'),
      seedAcks(2, ['A', 'B', 'C'], 'processed', 'pull', "(e.payload->>'g')::int % 4 = 0"),
      seedAcks(1, ['E', 'F', 'G'], 'failed', 'relay'),
      seedAcks(2, ['E'], 'processed', 'pull', "(e.payload->>'g')::int % 5 = 0"),
      // Deliveries: live ones retry tomorrow (the running relay leaves them alone); dead ones stay dead.
      seedDeliveries(s1.id, ['D', 'D2'], 'ready'),
      seedDeliveries(s1.id, ['E', 'F', 'G'], 'dead'),
      seedDeliveries(s2.id, ['E'], 'dead', "(e.payload->>'g')::int % 3 = 0"),
      seedDeliveries(s2.id, ['G'], 'ready'),
      'ANALYZE public.outbox_events, public.event_acknowledgments, public.outbox_deliveries',
    ];
    for (const s of statements) await seed.query(s);
  } finally {
    await seed.end();
  }
  const before = await census(db);
  const total = Object.values(N).reduce((a, b) => a + b, 0);
  t.equal(Object.values(before).reduce((a, c) => a + c.events, 0), total, `${total} events seeded`);
  t.same(
    { A: before.A?.acks, E: before.E?.acks, Edeliveries: before.E?.deliveries },
    { A: N.A + N.A / 4, E: N.E + N.E / 5, Edeliveries: N.E + N.E / 3 },
    'with acknowledgments and deliveries',
  );
  const expected = {
    processed: N.A,
    dead: N.E,
    acks: REMOVED.reduce((a, c) => a + (before[c]?.acks ?? 0), 0),
    deliveries: REMOVED.reduce((a, c) => a + (before[c]?.deliveries ?? 0), 0),
  };

  // A relay delivering, and a writer inserting through the capture trigger, all along.
  const relay = spawnRelay(t, db.url, { RELAY_WORKER_ID: 'retention-relay' });
  const writer = new pg.Client({ connectionString: db.url });
  await writer.connect();
  t.teardown(() => writer.end().catch(() => undefined));
  const statements: Array<{ start: number; end: number }> = [];
  const writerErrors: string[] = [];
  let writing = true;
  let nextId = 1;
  const PER = 5;
  // Paced and bounded: the point is that writes keep completing while the cleanup runs, not load.
  // Unpaced, a fast server let the writer capture ~350,000 events during a slow (contended) cleanup,
  // more than the relay could deliver before the final check's deadline.
  const PACE_MS = 20;
  const MAX_STATEMENTS = 6_000; // a safety cap (at least 120 s of writing); the cleanup's end stops it
  const writerDone = (async () => {
    while (writing && statements.length < MAX_STATEMENTS) {
      await new Promise((r) => setTimeout(r, PACE_MS));
      const start = Date.now();
      try {
        await writer.query(`INSERT INTO ${L}.vendors (id, name) SELECT g, 'w' || g FROM generate_series($1::int, $2::int) AS g`, [nextId, nextId + PER - 1]);
        nextId += PER;
        statements.push({ start, end: Date.now() });
      } catch (err) {
        writerErrors.push((err as Error).message);
        return;
      }
    }
  })();
  await waitFor(() => recv.at('/live').length >= 20, 30_000, 'the relay to deliver live traffic', relay.diag);

  // A watcher: is anyone waiting for a lock that the cleanup holds?
  const watcher = new pg.Client({ connectionString: db.url });
  await watcher.connect();
  t.teardown(() => watcher.end().catch(() => undefined));
  let lockSeenAt = 0;
  let watching = true;
  const blocked: string[] = [];
  let samples = 0;
  const watchDone = (async () => {
    while (watching) {
      const { rows } = await watcher.query<{ held: boolean; blocked: string | null }>(`
        SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                         AND ((classid::bigint << 32) | objid::bigint) = $1) AS held,
               (SELECT string_agg(a.application_name || ': ' || left(a.query, 80), '; ')
                  FROM pg_stat_activity AS a
                  WHERE a.datname = current_database()
                    AND EXISTS (SELECT 1 FROM pg_stat_activity AS c
                                WHERE c.application_name = 'outbox-relay-cleanup' AND c.pid = ANY (pg_blocking_pids(a.pid)))) AS blocked`,
        [String(RETENTION_LOCK_KEY)]);
      samples++;
      if (rows[0]?.held && !lockSeenAt) lockSeenAt = Date.now();
      if (rows[0]?.blocked) blocked.push(rows[0].blocked);
      await new Promise((r) => setTimeout(r, 50));
    }
  })();

  const env = retentionEnv(db.url, 1_000);
  const first = runCli(['cleanup'], env, { timeoutMs: 180_000 });
  let firstEndedAt = 0;
  void first.then(() => (firstEndedAt = Date.now()));
  await waitFor(() => lockSeenAt > 0 || firstEndedAt > 0, 60_000, 'the first cleanup to take the retention lock');
  // A second cleanup while the first one runs: it skips.
  const second = await runCli(['cleanup'], env);
  const secondWhileFirstRan = firstEndedAt === 0;
  const firstResult: CliResult = await first;
  const window = { from: lockSeenAt, to: firstEndedAt };
  const progress = {
    writerStatements: statements.filter((s) => s.start >= window.from && s.end <= window.to).length,
    deliveries: recv.at('/live').filter((r) => r.receivedAt >= window.from && r.receivedAt <= window.to).length,
  };
  writing = false;
  await writerDone;
  watching = false;
  await watchDone;

  t.equal(firstResult.code, 0, `cleanup exits 0 ${firstResult.stderr}`);
  t.ok(secondWhileFirstRan, `the second cleanup ran while the first held the lock (first took ${window.to - window.from} ms)`);
  t.equal(second.code, 0, `the second cleanup exits 0 ${second.stderr}`);
  t.match(second.stdout, /^skipped: another replica is running retention right now/, `and skips: ${second.stdout.trim()}`);

  // The printed counts.
  const m = /^removed (\d+) processed events \(older than 30 days\), (\d+) events with dead deliveries \(older than 90 days\), (\d+) acknowledgments and (\d+) deliveries in (\d+) batches/.exec(firstResult.stdout);
  t.ok(m, `the result line: ${firstResult.stdout.trim()}`);
  t.same(
    { processed: Number(m?.[1]), dead: Number(m?.[2]), acks: Number(m?.[3]), deliveries: Number(m?.[4]) },
    expected,
    'printed: the processed and dead events, acknowledgments and deliveries that really went',
  );
  t.ok(Number(m?.[5]) >= (N.A + N.E) / 1_000, `in batches of at most RETENTION_BATCH_SIZE (${m?.[5]} batches)`);

  // Exactly the right rows.
  const after = await census(db);
  for (const c of Object.keys(N) as Category[]) {
    if (REMOVED.includes(c)) t.same(after[c], { events: 0, acks: 0, deliveries: 0 }, `category ${c}: removed with its acknowledgments and deliveries`);
    else t.same(after[c], before[c], `category ${c}: every event, acknowledgment and delivery stays (${N[c]} events)`);
  }
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries AS d WHERE NOT EXISTS (SELECT 1 FROM public.outbox_events AS e WHERE e.id = d.event_id)'), 0, 'no delivery lost its event');

  // Writers and the relay were not blocked.
  t.same(writerErrors, [], 'no writer statement failed');
  t.ok(progress.writerStatements >= 3, `writer statements kept completing during the cleanup (${progress.writerStatements} in ${window.to - window.from} ms)`);
  t.ok(progress.deliveries >= 3, `the relay kept delivering during the cleanup (${progress.deliveries})`);
  t.ok(samples >= 3, `the lock watcher looked ${samples} times`);
  t.same(blocked, [], 'nobody ever waited for a lock the cleanup held');
  const liveEvents = await count(db, 'SELECT count(*)::int AS n FROM public.outbox_events WHERE tenant = $1', [L]);
  t.equal(liveEvents, nextId - 1, 'every event the writer captured is there');
  await waitFor(async () => recv.at('/live').filter((r) => r.status === 200).length >= liveEvents, 120_000, 'the relay to deliver all live events', relay.diag);
  t.pass('and all of them were delivered');

  // Again: nothing left to do; --json is one document.
  const again = await runCli(['cleanup', '--json'], env);
  t.equal(again.code, 0);
  const json = JSON.parse(again.stdout) as Record<string, unknown>;
  t.match(json, { skipped: false, processedEvents: 0, deadEvents: 0, acknowledgments: 0, deliveries: 0 }, 'a second run removes nothing');
  t.equal(again.stderr, '', 'the result is printed once: no "retention finished" log line on stderr');

  // Old events still waiting for fan-out are not "dead": they stay.
  relay.kill('SIGTERM');
  t.equal((await relay.exited).code, 0);
  await db.query(`
    WITH ev AS (
      INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, created_at, updated_at)
      SELECT '${S}', 'vendors_update', 'Q-' || g, 'vendors', jsonb_build_object('cat', 'Q', 'g', g), now() - interval '200 days', now() - interval '200 days'
      FROM generate_series(1, 500) AS g RETURNING id)
    INSERT INTO public.outbox_fanout_queue (event_id) SELECT id FROM ev`);
  const queued = await runCli(['cleanup', '--json'], env);
  t.equal(queued.code, 0);
  t.match(JSON.parse(queued.stdout), { processedEvents: 0, deadEvents: 0 }, 'events waiting for fan-out are never removed');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.outbox_events WHERE payload->>'cat' = 'Q'"), 500);

  // status: the seed's monitoring queries as tables, and as JSON.
  const st = await runCli(['status'], { DATABASE_URL: db.url });
  t.equal(st.code, 0, `status ${st.stderr}`);
  for (const heading of ['EVENTS', 'ACKNOWLEDGMENTS', 'AVERAGE PROCESSING TIME', 'LAG', 'SUBSCRIPTIONS NEEDING ATTENTION']) {
    t.match(st.stdout, new RegExp(`^${heading}$`, 'm'), `status prints ${heading}`);
  }
  t.match(st.stdout, /TENANT\s+EVENT TYPE\s+TOTAL\s+PROCESSED\s+PENDING\s+FAILED/, 'the seed\'s event statistics columns');
  t.match(st.stdout, /USER\s+PROCESSOR\s+STATUS\s+COUNT/, 'the seed\'s acknowledgment statistics columns');
  t.match(st.stdout, new RegExp(`^\\s*${S}\\s+vendors_update\\s+${total - N.A - N.E + 500}\\s`, 'm'), 'the seeded tenant\'s row with its remaining events');
  const sj = await runCli(['status', '--json'], { DATABASE_URL: db.url });
  t.equal(sj.code, 0);
  const report = JSON.parse(sj.stdout) as { events: Array<{ tenant: string; event_type: string; total_events: number; processed: number; pending: number; failed: number }>; acknowledgments: unknown[]; lag: Array<{ tenant: string; unprocessed: number }> };
  // The same figures as the seed's query run directly.
  const { rows: seedStats } = await db.query<{ tenant: string; event_type: string; total_events: number; processed: number; pending: number; failed: number }>(`
    SELECT tenant, event_type, COUNT(*)::int as total_events,
           COUNT(CASE WHEN processed_at IS NOT NULL THEN 1 END)::int as processed,
           COUNT(CASE WHEN processed_at IS NULL AND attempts < max_attempts THEN 1 END)::int as pending,
           COUNT(CASE WHEN attempts >= max_attempts THEN 1 END)::int as failed
    FROM outbox_events GROUP BY tenant, event_type ORDER BY tenant, event_type`);
  t.same(report.events, seedStats, 'status --json: event statistics equal the seed\'s query');
  const mine = report.events.find((e) => e.tenant === S);
  t.same(mine && { processed: mine.processed, failed: mine.failed }, { processed: N.B + N.C, failed: N.F + N.G }, 'processed and failed as seeded');
  t.ok(report.acknowledgments.length > 0, 'acknowledgment statistics are there');
  t.equal(report.lag.find((l) => l.tenant === S)?.unprocessed, N.D + N.D2 + N.G + 500,
    'the lag counts the events on their way (a live delivery, or queued), not those whose deliveries all died');
});

t.test('status LAG measures as the metric does: a live delivery from when it was queued (replay included), a queued event from its capture', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('lag');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  const event = async (type: string, age: string) => {
    const { rows } = await db.query<{ id: string }>(`
      INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, created_at, updated_at)
      VALUES ($1, $2, 'v', 'vendors', '{}', now() - $3::interval, now() - $3::interval) RETURNING id::text`, [T, type, age]);
    return rows[0]?.id as string;
  };
  // Last month: one event whose delivery died, one delivered (no delivery row left, processed).
  const dead = await event('vendors_update', '30 days');
  await db.query("INSERT INTO public.outbox_deliveries (event_id, subscription_id, state, attempts, created_at) VALUES ($1, $2, 'dead', 20, now() - interval '30 days')", [dead, sub.id]);
  await db.query('UPDATE public.outbox_events SET attempts = max_attempts WHERE id = $1', [dead]);
  const delivered = await event('vendors_insert', '30 days');
  await db.query('UPDATE public.outbox_events SET processed_at = now() - interval \'30 days\' WHERE id = $1', [delivered]);
  const lag = async () => {
    const res = await runCli(['status', '--json'], { DATABASE_URL: db.url });
    t.equal(res.code, 0, res.stderr);
    return (JSON.parse(res.stdout) as { lag: Array<{ tenant: string; unprocessed: number; oldest_seconds: number }> }).lag.find((l) => l.tenant === T);
  };
  t.equal(await lag(), undefined, 'a dead delivery is not lag');

  const replayDead = await runCli(['replay', '--subscription', String(sub.id), '--event-type', 'vendors_update'], { DATABASE_URL: db.url });
  t.equal(replayDead.code, 0, replayDead.stderr);
  const afterDead = await lag();
  t.equal(afterDead?.unprocessed, 1, 'the replayed dead delivery is on its way');
  t.ok(afterDead && afterDead.oldest_seconds < 600, `aged from the replay, not from its first fan-out 30 days ago (${afterDead?.oldest_seconds} s)`);

  const replayDelivered = await runCli(['replay', '--subscription', String(sub.id), '--event-type', 'vendors_insert', '--delivered'], { DATABASE_URL: db.url });
  t.equal(replayDelivered.code, 0, replayDelivered.stderr);
  const afterDelivered = await lag();
  t.equal(afterDelivered?.unprocessed, 2, 'and the re-sent delivered one');
  t.ok(afterDelivered && afterDelivered.oldest_seconds < 600, `both aged from the replay (${afterDelivered?.oldest_seconds} s)`);

  // Waiting for fan-out since its capture two hours ago.
  const queued = await event('vendors_update', '2 hours');
  await db.query('INSERT INTO public.outbox_fanout_queue (event_id) VALUES ($1)', [queued]);
  const withQueued = await lag();
  t.equal(withQueued?.unprocessed, 3, 'and the queued one');
  t.ok(withQueued && withQueued.oldest_seconds >= 7200 && withQueued.oldest_seconds < 7200 + 600, `the oldest is now the queued event, aged from its capture (${withQueued?.oldest_seconds} s)`);
});

t.test('retention does not delete an event that replay is sending again: replay locks its events first', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('rr');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  // Delivered and processed 40 days ago: retention's to delete, unless replay --delivered sends it again.
  const { rows } = await db.query<{ id: string }>(`
    INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, created_at, updated_at, processed_at)
    VALUES ($1, 'vendors_update', '1', 'vendors', '{}', now() - interval '40 days', now() - interval '40 days', now() - interval '40 days')
    RETURNING id::text`, [T]);
  const id = rows[0]?.id as string;
  // Another session holds an uncommitted delivery of the same key, so replay stops in the middle of
  // its statement (at its insert) for as long as this session likes: the window retention used to
  // fall into, between replay choosing the event and marking it pending again.
  const other = new pg.Client({ connectionString: db.url });
  await other.connect();
  t.teardown(() => other.end().catch(() => undefined));
  await other.query('BEGIN');
  await other.query("INSERT INTO public.outbox_deliveries (event_id, subscription_id, state) VALUES ($1, $2, 'dead')", [id, sub.id]);
  const replaying = runCli(['replay', '--delivered', '--tenant', T, '--json'], { DATABASE_URL: db.url });
  await waitFor(async () => (await count(db,
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%outbox_replay%'")) === 1,
  15_000, 'replay to wait inside its statement');
  const cleanup = await runCli(['cleanup', '--json'], retentionEnv(db.url, 100));
  t.equal(cleanup.code, 0, cleanup.stderr);
  t.match(JSON.parse(cleanup.stdout), { processedEvents: 0 }, 'retention left the event replay holds');
  await other.query('ROLLBACK');
  const replayed = await replaying;
  t.equal(replayed.code, 0, replayed.stderr);
  t.same(JSON.parse(replayed.stdout), { queued: 1 }, 'replay queued it');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_events WHERE id = $1 AND processed_at IS NULL', [id]), 1, 'the event is there, pending again');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE event_id = $1 AND state = 'ready'", [id]), 1, 'with its new delivery');
});

/**
 * An application's transaction, left open, that acknowledged the event by pull (user 7): its insert
 * holds FOR KEY SHARE on the event through the foreign key, which FOR UPDATE would wait for.
 */
async function openAcknowledgment(t: { teardown: (fn: () => Promise<void>) => void }, url: string, eventId: string, tenant: string): Promise<pg.Client> {
  const app = new pg.Client({ connectionString: url });
  await app.connect();
  t.teardown(() => app.end().catch(() => undefined));
  await app.query('BEGIN');
  await app.query("INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, processor, status, source) VALUES ($1, 7, $2, 'flowgram.ai', 'processed', 'pull')", [eventId, tenant]);
  return app;
}

t.test('replay does not wait for an open transaction that acknowledged one of its events', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('ra');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  const { rows } = await db.query<{ id: string }>(`
    INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, processed_at)
    VALUES ($1, 'vendors_update', '1', 'vendors', '{}', now()) RETURNING id::text`, [T]);
  const id = rows[0]?.id as string;
  const app = await openAcknowledgment(t, db.url, id, T);
  const replayer = new pg.Client({ connectionString: db.url });
  await replayer.connect();
  t.teardown(() => replayer.end().catch(() => undefined));
  await replayer.query('BEGIN');
  // A lock wait fails with 55P03 instead of hanging the test.
  await replayer.query("SET LOCAL lock_timeout = '5s'");
  const res = await replayer.query<{ queued: number }>(
    "SELECT queued FROM public.outbox_replay('delivered', NULL, $1, NULL, NULL, NULL, 0, 100)", [T]);
  t.same(res.rows, [{ queued: 1 }], 'replay queued the event without waiting');
  await replayer.query('COMMIT');
  await app.query('COMMIT');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE event_id = $1', [id]), 1, 'the acknowledgment committed too');
});

t.test('outcomes do not wait for an open transaction that acknowledged their event', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('oa');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  // Two subscriptions: each outcome finds the other's delivery and locks the event (sql/021).
  for (const userId of [1, 2]) recv.secrets.push((await subscribe(db, { tenant: T, userId, url: recv.url() })).secret);
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) VALUES (1, 'a')`]);
  const id = String((await db.query<{ id: string }>('SELECT id::text FROM public.outbox_events')).rows[0]?.id);
  const app = await openAcknowledgment(t, db.url, id, T);
  const relay = await startRelay(t, db.url);
  await waitFor(() => recv.requests.length >= 2, 15_000, 'both deliveries sent', () => ({ requests: recv.requests.length }));
  // Before 021 both outcomes waited here, for as long as the application's transaction stayed open.
  await waitFor(async () => (await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE source = 'relay'")) === 2,
    15_000, "both outcomes recorded while the application's transaction is still open");
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_events WHERE processed_at IS NOT NULL'), 1, 'the event rolled up as processed');
  await app.query('COMMIT');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE event_id = $1', [id]), 3, "and the application's acknowledgment committed beside them");
  t.same(relay.logs.errors().map((l) => l.msg), [], 'no error logged');
});

/**
 * `outbox-relay migrate` and `reset-db` against real, empty databases; the schema they create
 * against the seed's contract; the seed's troubleshooting and monitoring queries, run unchanged.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import t from 'tap';
import { tenantHash } from '../src/capture/tenantHash.js';
import { loadMigrations, migrate, type Migration } from '../src/db/migrate.js';
import { runCli } from './helpers/cli.js';
import { adminUrl, freshDatabase, type TestDatabase } from './helpers/db.js';

/** The type of a subtest's `t` (the callback of the last `t.test` overload). */
type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const MIGRATIONS = loadMigrations();
const N = MIGRATIONS.length;

async function withClient<T>(db: TestDatabase, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

async function appliedRows(db: TestDatabase): Promise<Array<{ version: number; name: string }>> {
  const { rows } = await db.query<{ version: number; name: string }>('SELECT version, name FROM public.outbox_relay_migrations ORDER BY version');
  return rows;
}

/** Names of every object in the database outside the system schemas: what migrate (and users) created. */
async function catalog(db: TestDatabase): Promise<Record<string, string[]>> {
  const q = async (sql: string) => (await db.query<{ x: string }>(sql)).rows.map((r) => r.x);
  const userNs = `n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'`;
  return {
    schemas: await q(`SELECT n.nspname::text AS x FROM pg_namespace n WHERE ${userNs} ORDER BY 1`),
    relations: await q(`SELECT n.nspname || '.' || c.relname || ':' || c.relkind::text AS x FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE ${userNs} ORDER BY 1`),
    functions: await q(`SELECT p.oid::regprocedure::text AS x FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE ${userNs} ORDER BY 1`),
    types: await q(`SELECT n.nspname || '.' || t.typname AS x FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE ${userNs} ORDER BY 1`),
    constraints: await q(`SELECT n.nspname || '.' || c.conname || ':' || pg_get_constraintdef(c.oid) AS x FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace WHERE ${userNs} ORDER BY 1`),
    triggers: await q(`SELECT c.relname || ':' || t.tgname AS x FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal ORDER BY 1`),
    eventTriggers: await q(`SELECT evtname::text AS x FROM pg_event_trigger ORDER BY 1`),
  };
}

/** A login role with a random name (roles are cluster-wide), dropped at teardown. */
async function tempRole(t: Tap, db: TestDatabase): Promise<string> {
  const name = `outbox_user_${randomBytes(5).toString('hex')}`;
  await db.query(`CREATE ROLE ${name} NOLOGIN`);
  t.teardown(async () => {
    await db.query(`DROP OWNED BY ${name}`).catch(() => undefined);
    const a = new pg.Client({ connectionString: adminUrl() });
    await a.connect();
    try {
      await a.query(`DROP ROLE IF EXISTS ${name}`);
    } finally {
      await a.end();
    }
  });
  return name;
}

t.test('migrate via the CLI on an empty database, twice', async (t) => {
  const db = await freshDatabase(t, { migrated: false });
  const env = { DATABASE_URL: db.url };
  const first = await runCli(['migrate'], env);
  t.equal(first.code, 0, `first run exits 0 (${first.stderr})`);
  t.match(first.stdout, new RegExp(`^applied 001_outbox_core, 002_relay_queue, 003_capture, 004_tenant_registry.* to 127\\.0\\.0\\.1:\\d+/${db.name} \\(${N} migrations applied in all\\)\\n$`), 'names the database it migrated');
  t.same(await appliedRows(db), MIGRATIONS.map((m) => ({ version: m.version, name: m.name })), 'every migration recorded once, in order');

  const second = await runCli(['migrate'], env);
  t.equal(second.code, 0, 'second run exits 0');
  t.match(second.stdout, new RegExp(`^database 127\\.0\\.0\\.1:\\d+/${db.name} is up to date \\(${N} migrations applied\\)\\n$`), 'second run says up to date');
  t.equal(second.stderr, '', 'nothing on stderr');

  const json = await runCli(['migrate', '--json'], env);
  t.equal(json.code, 0);
  t.same(JSON.parse(json.stdout), { applied: [], total: N }, '--json: one document');
  t.same(await appliedRows(db), MIGRATIONS.map((m) => ({ version: m.version, name: m.name })), 'nothing applied twice');

  const { rows } = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_event_trigger WHERE evtname = 'outbox_capture_new_tables'`);
  t.equal(rows[0]?.n, 1, 'the event trigger exists (we are a superuser)');

  const fresh = await freshDatabase(t, { migrated: false });
  const asJson = await runCli(['migrate', '--json'], { DATABASE_URL: fresh.url });
  t.equal(asJson.code, 0);
  t.same(JSON.parse(asJson.stdout), { applied: MIGRATIONS.map((m) => ({ version: m.version, name: m.name })), total: N }, '--json on an empty database lists every migration');
});

t.test('three concurrent migrate runs on an empty database: all succeed, one applies', async (t) => {
  const db = await freshDatabase(t, { migrated: false });
  const runs = await Promise.all([1, 2, 3].map(() => runCli(['migrate', '--json'], { DATABASE_URL: db.url })));
  runs.forEach((r, i) => t.equal(r.code, 0, `run ${i + 1} exits 0 (${r.stderr.trim()})`));
  const applied = runs.map((r) => (JSON.parse(r.stdout) as { applied: unknown[] }).applied.length).sort();
  t.same(applied, [0, 0, N], 'exactly one run applied the migrations, the others found nothing to do');
  t.same(await appliedRows(db), MIGRATIONS.map((m) => ({ version: m.version, name: m.name })), 'each migration recorded once');
  const { rows } = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_event_trigger WHERE evtname = 'outbox_capture_new_tables'`);
  t.equal(rows[0]?.n, 1);
  const { rows: locks } = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`);
  t.equal(locks[0]?.n, 0, 'no advisory lock left behind');
});

t.test('the schema matches the seed in PostgreSQL spelling', async (t) => {
  const db = await freshDatabase(t);
  type Col = { column_name: string; data_type: string; udt_name: string; len: number | null; is_nullable: string; is_identity: string; identity_generation: string | null; column_default: string | null; is_generated: string };
  const columns = async (table: string) => {
    const { rows } = await db.query<Col>(`
      SELECT column_name, data_type, udt_name, character_maximum_length AS len, is_nullable, is_identity, identity_generation, column_default, is_generated
      FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1`, [table]);
    return new Map(rows.map((r) => [r.column_name, r]));
  };

  const ev = await columns('outbox_events');
  t.match(ev.get('id'), { data_type: 'bigint', is_identity: 'YES', identity_generation: 'ALWAYS', is_nullable: 'NO' }, 'id: bigint identity');
  t.match(ev.get('tenant'), { data_type: 'character varying', is_nullable: 'NO' });
  t.ok((ev.get('tenant')?.len ?? 0) >= 63, 'tenant holds any PostgreSQL identifier (63)');
  t.match(ev.get('event_type'), { data_type: 'character varying', len: 100, is_nullable: 'NO' });
  t.ok(ev.get('aggregate_id')?.data_type === 'text' || (ev.get('aggregate_id')?.len ?? 0) >= 100, 'aggregate_id widened');
  t.equal(ev.get('aggregate_id')?.is_nullable, 'NO');
  t.match(ev.get('aggregate_type'), { data_type: 'character varying', len: 100, is_nullable: 'NO' });
  t.match(ev.get('payload'), { data_type: 'jsonb', is_nullable: 'NO' });
  t.match(ev.get('attempts'), { data_type: 'integer', column_default: '0' });
  t.match(ev.get('max_attempts'), { data_type: 'integer' });
  t.match(ev.get('available_at'), { data_type: 'timestamp with time zone', column_default: 'now()' });
  t.match(ev.get('processed_at'), { data_type: 'timestamp with time zone', is_nullable: 'YES', column_default: null });
  t.match(ev.get('dedupe_key'), { data_type: 'character varying', len: 255 });
  t.match(ev.get('created_at'), { data_type: 'timestamp with time zone', column_default: 'now()' });
  t.match(ev.get('updated_at'), { data_type: 'timestamp with time zone', column_default: 'now()' });
  t.match(ev.get('status'), { data_type: 'text', is_generated: 'ALWAYS' }, 'status is derived (generated)');

  const ack = await columns('event_acknowledgments');
  t.match(ack.get('id'), { data_type: 'bigint', is_identity: 'YES' });
  t.match(ack.get('event_id'), { data_type: 'bigint' });
  t.match(ack.get('user_id'), { data_type: 'integer', is_nullable: 'NO' });
  t.match(ack.get('tenant'), { data_type: 'character varying', is_nullable: 'NO' });
  t.match(ack.get('processor'), { data_type: 'character varying', len: 100, column_default: "'flowgram.ai'::character varying" });
  t.match(ack.get('status'), { data_type: 'USER-DEFINED', udt_name: 'acknowledgment_status', column_default: "'processed'::acknowledgment_status" });
  t.match(ack.get('processed_at'), { data_type: 'timestamp with time zone', column_default: 'now()' });
  t.match(ack.get('metadata'), { data_type: 'jsonb' });
  t.match(ack.get('created_at'), { data_type: 'timestamp with time zone' });
  t.match(ack.get('updated_at'), { data_type: 'timestamp with time zone' });

  const { rows: naive } = await db.query<{ c: string }>(`
    SELECT table_name || '.' || column_name AS c FROM information_schema.columns
    WHERE table_schema = 'public' AND data_type = 'timestamp without time zone'`);
  t.same(naive, [], 'no timestamp without time zone anywhere');

  const { rows: labels } = await db.query<{ l: string }>(`SELECT unnest(enum_range(NULL::public.acknowledgment_status))::text AS l`);
  t.same(labels.map((r) => r.l), ['processed', 'failed', 'skipped', 'in_progress'], 'acknowledgment_status enum');

  const { rows: uq } = await db.query<{ def: string }>(`
    SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint
    WHERE conname = 'unique_event_user_acknowledgment' AND conrelid = 'public.event_acknowledgments'::regclass AND contype = 'u'`);
  t.same(uq.map((r) => r.def), ['UNIQUE (event_id, user_id)'], 'unique_event_user_acknowledgment');
  const { rows: fk } = await db.query<{ def: string }>(`
    SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE conrelid = 'public.event_acknowledgments'::regclass AND contype = 'f'`);
  t.same(fk.map((r) => r.def), ['FOREIGN KEY (event_id) REFERENCES outbox_events(id) ON DELETE CASCADE']);

  const { rows: idx } = await db.query<{ name: string; def: string }>(`
    SELECT indexname AS name, indexdef AS def FROM pg_indexes WHERE schemaname = 'public' AND tablename IN ('outbox_events', 'event_acknowledgments')`);
  const index = new Map(idx.map((r) => [r.name, r.def]));
  t.match(index.get('idx_outbox_tenant_status'), /ON public\.outbox_events USING btree \(tenant, processed_at, available_at\)$/);
  t.match(index.get('idx_outbox_event_type'), /ON public\.outbox_events USING btree \(event_type\)$/);
  t.match(index.get('idx_outbox_created_at'), /ON public\.outbox_events USING btree \(created_at\)$/);
  t.match(index.get('idx_event_ack_user_tenant'), /ON public\.event_acknowledgments USING btree \(user_id, tenant\)$/);
  t.match(index.get('idx_event_ack_processed_at'), /ON public\.event_acknowledgments USING btree \(processed_at\)$/);
  t.ok(idx.some((r) => /ON public\.outbox_events .* WHERE \(processed_at IS NULL\)$/.test(r.def)), 'a partial index on unprocessed rows');
  t.ok(idx.some((r) => /UNIQUE INDEX .* ON public\.outbox_events USING btree \(dedupe_key\)$/.test(r.def)), 'dedupe_key is unique');

  // The constraints act.
  const { rows: e } = await db.query<{ id: string }>(`
    INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload) VALUES ('t', 'x_insert', '1', 'x', '{}') RETURNING id::text`);
  const id = e[0]?.id;
  await db.query(`INSERT INTO public.event_acknowledgments (event_id, user_id, tenant) VALUES ($1, 101, 't')`, [id]);
  await t.rejects(db.query(`INSERT INTO public.event_acknowledgments (event_id, user_id, tenant) VALUES ($1, 101, 't')`, [id]),
    { code: '23505', constraint: 'unique_event_user_acknowledgment' }, 'one acknowledgment per event and user');
  await t.rejects(db.query(`INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, status) VALUES ($1, 102, 't', 'done')`, [id]),
    { code: '22P02' }, 'status outside the enum refused');
  await t.rejects(db.query(`INSERT INTO public.outbox_events (id, tenant, event_type, aggregate_id, aggregate_type, payload) VALUES (999, 't', 'x', '1', 'x', '{}')`),
    { code: '428C9' }, 'ids are generated always');
  await t.rejects(db.query(`INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, dedupe_key)
    VALUES ('t', 'x', '1', 'x', '{}', 'k'), ('t', 'x', '2', 'x', '{}', 'k')`), { code: '23505' }, 'dedupe_key unique');
  await db.query('DELETE FROM public.outbox_events WHERE id = $1', [id]);
  const { rows: left } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM public.event_acknowledgments');
  t.equal(left[0]?.n, 0, 'acknowledgments go with their event (ON DELETE CASCADE)');
});

t.test('status derives pending | processed | failed', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload, attempts, max_attempts, processed_at) VALUES
      ('t', 'x_insert', '1', 'x', '{}', 0, 5, NULL),
      ('t', 'x_insert', '2', 'x', '{}', 4, 5, NULL),
      ('t', 'x_insert', '3', 'x', '{}', 1, 5, now()),
      ('t', 'x_insert', '4', 'x', '{}', 5, 5, NULL),
      ('t', 'x_insert', '5', 'x', '{}', 7, 5, NULL),
      ('t', 'x_insert', '6', 'x', '{}', 5, 5, now())`);
  const status = async () => (await db.query<{ s: string }>('SELECT status AS s FROM public.outbox_events ORDER BY aggregate_id')).rows.map((r) => r.s);
  t.same(await status(), ['pending', 'pending', 'processed', 'failed', 'failed', 'processed']);
  await db.query(`UPDATE public.outbox_events SET processed_at = now() WHERE aggregate_id = '1'`);
  await db.query(`UPDATE public.outbox_events SET attempts = 5 WHERE aggregate_id = '2'`);
  await db.query(`UPDATE public.outbox_events SET attempts = 0, max_attempts = 20 WHERE aggregate_id = '4'`);
  t.same(await status(), ['processed', 'failed', 'processed', 'pending', 'failed', 'processed'], 'follows every change of its inputs');
  await t.rejects(db.query(`UPDATE public.outbox_events SET status = 'processed'`), { code: '428C9' }, 'status cannot be written');
  const { rows } = await db.query<{ s: string; n: number }>(`SELECT status AS s, count(*)::int AS n FROM public.outbox_events WHERE status = 'failed' GROUP BY 1`);
  t.same(rows, [{ s: 'failed', n: 2 }], 'filterable');
});

t.test('an edited, unknown or failing migration is detected', async (t) => {
  const db = await freshDatabase(t);
  await withClient(db, async (c) => {
    const edited: Migration[] = MIGRATIONS.map((m) => (m.version === 1 ? { ...m, sql: `${m.sql}\n-- edited`, checksum: 'x'.repeat(64) } : m));
    await t.rejects(migrate(c, edited), { code: 'E_MIGRATION', message: /migration 001_outbox_core was changed after it was applied \(checksum differs\)/ });

    // A newer database than this outbox-relay.
    await c.query(`INSERT INTO public.outbox_relay_migrations (version, name, checksum) VALUES (99, 'from_the_future', 'x')`);
    await t.rejects(migrate(c), { message: /has migration 099_from_the_future that this version of outbox-relay does not know/ });
    await c.query('DELETE FROM public.outbox_relay_migrations WHERE version = 99');

    // A new migration that fails half-way is rolled back entirely.
    const bad: Migration = { version: N + 1, name: 'broken', sql: 'CREATE TABLE public.half_done (id integer); SELECT 1 / 0;', checksum: 'b'.repeat(64) };
    await t.rejects(migrate(c, [...MIGRATIONS, bad]), { message: new RegExp(`migration ${String(N + 1).padStart(3, '0')}_broken failed and was rolled back: division by zero`) });
    const { rows } = await c.query<{ t: string | null }>(`SELECT to_regclass('public.half_done')::text AS t`);
    t.equal(rows[0]?.t, null, 'nothing of it remains');
    t.equal((await appliedRows(db)).length, N, 'and it is not recorded');
    const { rows: locks } = await c.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()`);
    t.equal(locks[0]?.n, 0, 'the migration lock is released after a failure');

    // A good new migration: only it is applied.
    const good: Migration = { version: N + 1, name: 'extra', sql: 'CREATE TABLE public.extra_test (id integer)', checksum: 'c'.repeat(64) };
    const res = await migrate(c, [...MIGRATIONS, good]);
    t.same(res, { applied: [{ version: N + 1, name: 'extra' }], alreadyApplied: N });
    t.same(await migrate(c, [...MIGRATIONS, good]), { applied: [], alreadyApplied: N + 1 }, 'idempotent');
  });
  // The CLI says the same in one line, naming the file.
  await db.query(`DELETE FROM public.outbox_relay_migrations WHERE version = ${N + 1}`);
  await db.query(`UPDATE public.outbox_relay_migrations SET checksum = 'tampered' WHERE version = 2`);
  const cli = await runCli(['migrate'], { DATABASE_URL: db.url });
  t.equal(cli.code, 1);
  t.match(cli.stderr, /^outbox-relay: error: migration 002_relay_queue was changed after it was applied \(checksum differs\); restore the original file\n$/);
});

// The seed's queries, copied verbatim; only 'your_tenant_hash' / your_tenant_hash (and your_user, a
// role name) are substituted.
const TROUBLESHOOTING = [
  `SELECT trigger_name FROM information_schema.triggers
   WHERE event_object_schema = 'your_tenant_hash';`,
  `SELECT proname FROM pg_proc WHERE proname = 'create_outbox_event';`,
  `SELECT tenant, COUNT(*) FROM outbox_events GROUP BY tenant;`,
  `GRANT USAGE ON SCHEMA your_tenant_hash TO your_user;`,
  `GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA your_tenant_hash TO your_user;`,
  `SELECT status, COUNT(*) FROM outbox_events GROUP BY status;`,
  `SELECT * FROM outbox_events WHERE processed_at IS NULL ORDER BY created_at;`,
];

const MONITORING = [
  `-- Event processing statistics
SELECT
  tenant,
  event_type,
  COUNT(*) as total_events,
  COUNT(CASE WHEN processed_at IS NOT NULL THEN 1 END) as processed,
  COUNT(CASE WHEN processed_at IS NULL AND attempts < max_attempts THEN 1 END) as pending,
  COUNT(CASE WHEN attempts >= max_attempts THEN 1 END) as failed
FROM outbox_events
GROUP BY tenant, event_type;`,
  `-- User acknowledgment statistics
SELECT
  user_id,
  processor,
  status,
  COUNT(*) as acknowledgment_count
FROM event_acknowledgments
GROUP BY user_id, processor, status;`,
  `-- Performance monitoring
SELECT
  event_type,
  AVG(EXTRACT(EPOCH FROM (processed_at - created_at))) as avg_processing_time_seconds
FROM outbox_events
WHERE processed_at IS NOT NULL
GROUP BY event_type;`,
];

t.test('the seed\'s troubleshooting and monitoring queries run unchanged', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantHash(42, { salt: 'seed-queries-salt', entropySource: 'seed-queries-entropy' });
  const user = await tempRole(t, db);
  await db.query(`CREATE SCHEMA ${tenant}; CREATE TABLE ${tenant}.vendors (id integer PRIMARY KEY, vendor_name text)`);
  const install = await runCli(['triggers', 'install', '--schema', tenant], { DATABASE_URL: db.url });
  t.equal(install.code, 0, install.stderr);
  await db.query(`INSERT INTO ${tenant}.vendors SELECT g, 'v' || g FROM generate_series(1, 4) g`);
  await db.query(`UPDATE ${tenant}.vendors SET vendor_name = 'New Name' WHERE id = 1`);
  // Outcomes as the relay records them: processed (2 s after creation), failed (out of attempts), pending.
  await db.query(`UPDATE public.outbox_events SET processed_at = created_at + interval '2 seconds', attempts = 1 WHERE aggregate_id IN ('1', '2') AND event_type = 'vendors_insert'`);
  await db.query(`UPDATE public.outbox_events SET attempts = max_attempts WHERE aggregate_id = '3'`);
  await db.query(`UPDATE public.outbox_events SET attempts = 1 WHERE aggregate_id = '4'`);
  const { rows: ev } = await db.query<{ id: string }>(`SELECT id::text FROM public.outbox_events ORDER BY id LIMIT 2`);
  await db.query(`INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, status) VALUES ($1, 101, $3, 'processed'), ($2, 101, $3, 'failed'), ($1, 102, $3, 'processed')`,
    [ev[0]?.id, ev[1]?.id, tenant]);

  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  t.teardown(() => c.end());
  const run = async (sql: string) => c.query(sql.replace(/your_tenant_hash/g, tenant).replace(/your_user/g, user));

  const [triggers, fn, byTenant, grantUsage, grantAll, byStatus, unprocessed] = TROUBLESHOOTING;
  const trig = await run(triggers as string);
  t.same(trig.rows.map((r: { trigger_name: string }) => r.trigger_name).sort(), ['outbox_capture_delete', 'outbox_capture_insert', 'outbox_capture_update'], 'the capture triggers are listed');
  await t.resolves(run(fn as string), 'the function query runs');
  t.same((await run(byTenant as string)).rows, [{ tenant, count: '5' }], 'one tenant, five events');
  await run(grantUsage as string);
  await run(grantAll as string);
  const { rows: priv } = await db.query<{ ok: boolean }>(`SELECT has_schema_privilege($1, $2, 'USAGE') AND has_table_privilege($1, $3, 'INSERT') AS ok`, [user, tenant, `${tenant}.vendors`]);
  t.equal(priv[0]?.ok, true, 'the grants took effect');
  const statuses = Object.fromEntries((await run(byStatus as string)).rows.map((r: { status: string; count: string }) => [r.status, Number(r.count)]));
  t.same(statuses, { processed: 2, failed: 1, pending: 2 }, 'status groups');
  const pend = await run(unprocessed as string);
  t.equal(pend.rows.length, 3, 'unprocessed events listed');
  t.ok(pend.rows.every((r: { processed_at: unknown }) => r.processed_at === null));

  const [stats, acks, perf] = MONITORING;
  const { rows: st } = await run(stats as string);
  const byType = new Map(st.map((r: { event_type: string }) => [r.event_type, r]));
  t.match(byType.get('vendors_insert'), { tenant, total_events: '4', processed: '2', pending: '1', failed: '1' });
  t.match(byType.get('vendors_update'), { tenant, total_events: '1', processed: '0', pending: '1', failed: '0' });
  const { rows: derived } = await db.query<{ event_type: string; processed: string; pending: string; failed: string }>(`
    SELECT event_type, count(*) FILTER (WHERE status = 'processed')::text AS processed, count(*) FILTER (WHERE status = 'pending')::text AS pending,
           count(*) FILTER (WHERE status = 'failed')::text AS failed FROM public.outbox_events GROUP BY event_type`);
  for (const d of derived) t.match(byType.get(d.event_type), { processed: d.processed, pending: d.pending, failed: d.failed }, `${d.event_type}: the seed's counts agree with status`);
  const { rows: ackRows } = await run(acks as string);
  t.same(ackRows.map((r: { user_id: number; processor: string; status: string; acknowledgment_count: string }) => `${r.user_id}/${r.processor}/${r.status}/${r.acknowledgment_count}`).sort(),
    ['101/flowgram.ai/failed/1', '101/flowgram.ai/processed/1', '102/flowgram.ai/processed/1']);
  const { rows: pf } = await run(perf as string);
  t.equal(pf.length, 1);
  t.equal(Number(pf[0]?.avg_processing_time_seconds), 2, 'average processing time in seconds');

  // The unprocessed-events query can use the partial index.
  await c.query('BEGIN');
  await c.query('SET LOCAL enable_seqscan = off');
  const plan = (await c.query(`EXPLAIN ${unprocessed as string}`)).rows.map((r: { 'QUERY PLAN': string }) => r['QUERY PLAN']).join('\n');
  await c.query('COMMIT');
  t.match(plan, /idx_outbox_unprocessed/, 'uses the partial index of unprocessed rows');
  const env = await runCli(['validate-env'], {});
  t.equal(env.code, 0, 'npm run validate-env (the seed\'s other troubleshooting step) passes outside production');
});

t.test('reset-db drops everything of ours, keeps tenant data, and migrates again', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, v text); INSERT INTO tenant_a.items VALUES (1, 'kept')`);
  const clean = await catalog(db);
  t.ok(clean.functions?.some((f) => f.startsWith('outbox_capture(')), 'the snapshot sees our objects');

  const env = { DATABASE_URL: db.url, NODE_ENV: 'development' };
  t.equal((await runCli(['triggers', 'install', '--all-schemas'], env)).code, 0);
  await db.query(`INSERT INTO tenant_a.items VALUES (2, 'x')`);
  await db.query(`CREATE SCHEMA tenant_b; CREATE TABLE tenant_b.later (id integer PRIMARY KEY)`);
  await db.query(`INSERT INTO public.outbox_tenants VALUES (42, 'tenant_a')`);
  const dirty = await catalog(db);
  t.ok(dirty.triggers?.includes('items:outbox_capture_insert'), 'tenant tables carry capture triggers before');

  const prod = await runCli(['reset-db'], { ...env, NODE_ENV: 'production' });
  t.equal(prod.code, 78, 'refused in production (a configuration error: exit 78)');
  t.match(prod.stderr, /^outbox-relay: error: refusing to reset the database with NODE_ENV=production\n$/);
  t.same(await catalog(db), dirty, 'and nothing changed');

  const res = await runCli(['reset-db', '--json'], env);
  t.equal(res.code, 0, `reset-db exits 0 (${res.stderr.trim()})`);
  const out = JSON.parse(res.stdout) as { reset: boolean; applied: unknown[] };
  t.equal(out.reset, true, '--json parses');
  t.equal(out.applied.length, N, 'every migration applied again');

  await db.query('DROP SCHEMA tenant_b CASCADE'); // created after the clean snapshot
  const after = await catalog(db);
  t.same(after, clean, 'exactly what migrate creates, plus the tenant tables; nothing left over');
  const { rows: tenantTriggers } = await db.query(`SELECT tgname FROM pg_trigger WHERE tgrelid = 'tenant_a.items'::regclass`);
  t.same(tenantTriggers, [], 'no capture triggers on tenant tables');
  const { rows } = await db.query<{ events: number; tenants: number; schemas: number; items: number }>(`
    SELECT (SELECT count(*)::int FROM public.outbox_events) AS events, (SELECT count(*)::int FROM public.outbox_tenants) AS tenants,
           (SELECT count(*)::int FROM public.outbox_capture_schemas) AS schemas, (SELECT count(*)::int FROM tenant_a.items) AS items`);
  t.same(rows[0], { events: 0, tenants: 0, schemas: 0, items: 2 }, 'outbox data gone, tenant data kept');
  await db.query(`INSERT INTO tenant_a.items VALUES (3, 'y')`);
  const { rows: ev } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM public.outbox_events');
  t.equal(ev[0]?.n, 0, 'nothing is captured until triggers are installed again');

  const text = await runCli(['reset-db'], env);
  t.equal(text.code, 0);
  t.match(text.stdout, new RegExp(`^database reset: all outbox data and capture triggers dropped, ${N} migrations applied\\n$`));
});

t.test('migrate against a database that is not there: one clear line', async (t) => {
  const base = new URL(adminUrl());
  base.pathname = `/outbox_missing_${randomBytes(4).toString('hex')}`;
  const res = await runCli(['migrate'], { DATABASE_URL: base.toString() });
  t.equal(res.code, 69, 'EX_UNAVAILABLE');
  t.match(res.stderr, /^outbox-relay: error: .*does not exist.*\n$/);
  t.notMatch(res.stderr, /password|:\/\/[^@]*:[^@]*@/, 'no credentials in the message');
});

t.test('migrate on a current database needs no CREATE privilege (a relay role may run it at start)', async (t) => {
  const db = await freshDatabase(t);
  const role = `outbox_t_relay_${randomBytes(4).toString('hex')}`;
  // A password: an embedded PostgreSQL authenticates by password, not trust.
  await db.query(`CREATE ROLE ${role} LOGIN PASSWORD 'relay-role-pw'`);
  t.teardown(async () => {
    await db.query(`DROP OWNED BY ${role}`).catch(() => undefined);
    await db.query(`DROP ROLE IF EXISTS ${role}`).catch(() => undefined);
  });
  // Reads the bookkeeping; no CREATE on schema public (PostgreSQL 15 and later grant none by default).
  await db.query(`REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT SELECT ON public.outbox_relay_migrations TO ${role}`);
  const url = new URL(db.url);
  url.username = role;
  url.password = 'relay-role-pw';
  const res = await runCli(['migrate'], { DATABASE_URL: url.toString() });
  t.equal(res.code, 0, `exit 0 (${res.stderr})`);
  t.match(res.stdout, /is up to date/, 'says the database is up to date');
});

t.test('a command on a schema older than this version says to migrate instead of only quoting PostgreSQL', async (t) => {
  const db = await freshDatabase(t);
  // What a database one migration behind looks like to `status` (018 added the column).
  await db.query('ALTER TABLE public.outbox_circuit_states DROP COLUMN seen_at');
  const res = await runCli(['status'], { DATABASE_URL: db.url });
  t.equal(res.code, 1);
  t.match(res.stderr, /PostgreSQL error 42703: column c\.seen_at does not exist \(the database schema may be older than this version of outbox-relay: run "outbox-relay migrate"\)/, res.stderr.trim());
});

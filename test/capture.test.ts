/**
 * Change capture (sql/003_capture.sql, its function replaced by sql/009_lean_capture.sql): the events
 * the triggers write, their payload, aggregate keys and notifications, against a real PostgreSQL.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import t from 'tap';
import { installSchema } from '../src/capture/triggers.js';
import { runCli } from './helpers/cli.js';
import { adminUrl, freshDatabase, type TestDatabase } from './helpers/db.js';

/** The type of a subtest's `t` (the callback of the last `t.test` overload). */
type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

interface EventRow {
  id: string;
  tenant: string;
  event_type: string;
  aggregate_id: string;
  aggregate_type: string;
  payload: {
    operation: string;
    table: string;
    schema: string;
    timestamp: string;
    old_data: Record<string, unknown> | null;
    new_data: Record<string, unknown> | null;
    changed_fields: Record<string, unknown> | null;
  };
  dedupe_key: string | null;
  attempts: number;
  processed_at: Date | null;
  status: string;
  payload_matches_created_at: boolean;
}

const EVENT_COLUMNS = `id::text, tenant, event_type, aggregate_id, aggregate_type, payload, dedupe_key, attempts, processed_at, status,
  (payload->>'timestamp')::timestamptz = created_at AS payload_matches_created_at`;

/** A client or the test database: anything with a query method. */
interface Queryable {
  query<R extends pg.QueryResultRow = pg.QueryResultRow>(sql: string, params?: unknown[]): Promise<pg.QueryResult<R>>;
}

async function events(q: Queryable, where = 'true', params: unknown[] = []): Promise<EventRow[]> {
  const { rows } = await q.query<EventRow>(`SELECT ${EVENT_COLUMNS} FROM public.outbox_events WHERE ${where} ORDER BY outbox_events.id`, params);
  return rows;
}

async function eventCount(q: Queryable, where = 'true'): Promise<number> {
  const { rows } = await q.query<{ n: number }>(`SELECT count(*)::int AS n FROM public.outbox_events WHERE ${where}`);
  return rows[0]?.n ?? -1;
}

/** A connected client on the test database, closed at teardown. */
async function connect(t: Tap, url: string): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url });
  c.on('error', () => undefined);
  await c.connect();
  t.teardown(() => c.end().catch(() => undefined));
  return c;
}

/** Installs capture on a whole schema through the library (the CLI path is tested separately). */
async function capture(db: TestDatabase, schema: string, tables: string[] = []): Promise<void> {
  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  try {
    await installSchema(c, schema, tables);
  } finally {
    await c.end();
  }
}

/**
 * A LISTEN client on outbox_wakeup. `drain()` sends a sentinel notification and waits for it: as
 * notifications are delivered in commit order, everything committed before has arrived by then.
 */
async function listen(t: Tap, db: TestDatabase): Promise<{ drain: () => Promise<string[]> }> {
  const c = await connect(t, db.url);
  let received: string[] = [];
  const waiting = new Map<string, () => void>();
  c.on('notification', (n) => {
    if (n.channel !== 'outbox_wakeup') return;
    const payload = n.payload ?? '';
    const done = waiting.get(payload);
    if (done) done();
    else received.push(payload);
  });
  await c.query('LISTEN outbox_wakeup');
  return {
    async drain() {
      const tag = `sentinel-${randomBytes(6).toString('hex')}`;
      const arrived = new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('sentinel notification did not arrive within 15 s')), 15_000);
        waiting.set(tag, () => {
          clearTimeout(timer);
          waiting.delete(tag);
          resolve();
        });
      });
      await db.query('SELECT pg_notify($1, $2)', ['outbox_wakeup', tag]);
      await arrived;
      const out = received;
      received = [];
      return out;
    },
  };
}

/** A login role with a random name (roles are cluster-wide), dropped at teardown. */
async function tempRole(t: Tap, db: TestDatabase): Promise<{ name: string; url: string }> {
  const name = `outbox_writer_${randomBytes(5).toString('hex')}`;
  const password = randomBytes(12).toString('hex');
  await db.query(`CREATE ROLE ${name} LOGIN PASSWORD '${password}' NOSUPERUSER NOCREATEDB NOCREATEROLE`);
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
  const u = new URL(db.url);
  u.username = name;
  u.password = password;
  return { name, url: u.toString() };
}

const TIMESTAMP_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?\+00:00$/;
const PAYLOAD_KEYS = ['changed_fields', 'new_data', 'old_data', 'operation', 'schema', 'table', 'timestamp'];

t.test('acceptance: triggers install, then insert, update, no-op update and delete of one row give exactly three events', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_a;
    CREATE TABLE tenant_a.vendors (id integer PRIMARY KEY, vendor_name text NOT NULL, rating numeric, tags text[], seen_at timestamptz)`);
  const res = await runCli(['triggers', 'install', '--schema', 'tenant_a'], { DATABASE_URL: db.url });
  t.equal(res.code, 0, `install exits 0 (${res.stderr})`);
  t.match(res.stdout, /captured tenant_a\.vendors/);

  const { rows: trig } = await db.query<{ tgname: string; tgtype: number; fn: string; nargs: number; newtable: string | null; oldtable: string | null }>(`
    SELECT t.tgname, t.tgtype, t.tgfoid::regprocedure::text AS fn, t.tgnargs AS nargs, t.tgnewtable AS newtable, t.tgoldtable AS oldtable
    FROM pg_trigger t WHERE t.tgrelid = 'tenant_a.vendors'::regclass AND NOT t.tgisinternal ORDER BY t.tgname`);
  t.same(trig.map((r) => r.tgname), ['outbox_capture_delete', 'outbox_capture_insert', 'outbox_capture_update'], 'exactly the three capture triggers');
  for (const r of trig) {
    t.equal(r.fn, 'outbox_capture()', `${r.tgname} calls public.outbox_capture`);
    t.equal(r.tgtype & 1, 0, `${r.tgname} is statement-level`);
    t.equal(r.tgtype & 2, 0, `${r.tgname} is AFTER`);
    t.equal(r.nargs, 1, `${r.tgname} gets the key column`);
  }
  t.equal(trig.find((r) => r.tgname === 'outbox_capture_update')?.oldtable, 'outbox_old', 'update trigger has an old transition table');
  t.equal(trig.find((r) => r.tgname === 'outbox_capture_update')?.newtable, 'outbox_new', 'update trigger has a new transition table');

  // The function is SECURITY DEFINER with search_path and TimeZone pinned.
  const { rows: fn } = await db.query<{ prosecdef: boolean; proconfig: string[] }>(
    `SELECT prosecdef, proconfig FROM pg_proc WHERE oid = 'public.outbox_capture()'::regprocedure`);
  t.equal(fn[0]?.prosecdef, true, 'SECURITY DEFINER');
  t.ok(fn[0]?.proconfig.some((s) => /^search_path=pg_catalog,\s*pg_temp$/.test(s)), 'search_path pinned');
  t.ok(fn[0]?.proconfig.includes('TimeZone=UTC'), 'TimeZone pinned to UTC');

  // The writer's session uses another time zone: the payload is still in UTC.
  const w = await connect(t, db.url);
  await w.query(`SET TimeZone = 'America/New_York'`);
  await w.query('BEGIN');
  await w.query(`INSERT INTO tenant_a.vendors VALUES (1, 'Old Name', 4.50, '{a,b}', '2025-01-06 10:30:00+00')`);
  await w.query('COMMIT');
  await w.query(`UPDATE tenant_a.vendors SET vendor_name = 'New Name' WHERE id = 1`);
  const noop = await w.query(`UPDATE tenant_a.vendors SET vendor_name = 'New Name' WHERE id = 1`);
  t.equal(noop.rowCount, 1, 'the no-op update did touch the row');
  await w.query(`UPDATE tenant_a.vendors SET vendor_name = vendor_name, rating = rating WHERE id = 1`);
  await w.query('DELETE FROM tenant_a.vendors WHERE id = 1');

  const ev = await events(db);
  t.equal(ev.length, 3, 'exactly three events');
  const [ins, upd, del] = ev;
  if (!ins || !upd || !del) return;

  const row1 = { id: 1, vendor_name: 'Old Name', rating: 4.5, tags: ['a', 'b'], seen_at: '2025-01-06T10:30:00+00:00' };
  t.match(ins, { tenant: 'tenant_a', event_type: 'vendors_insert', aggregate_id: '1', aggregate_type: 'vendors', attempts: 0, processed_at: null, status: 'pending' });
  t.same(Object.keys(ins.payload).sort(), PAYLOAD_KEYS, 'payload has exactly the seven keys');
  t.same(ins.payload, { operation: 'INSERT', table: 'vendors', schema: 'tenant_a', timestamp: ins.payload.timestamp, old_data: null, new_data: row1, changed_fields: null });
  t.match(ins.payload.timestamp, TIMESTAMP_UTC, 'timestamp rendered in UTC');
  t.equal(ins.payload_matches_created_at, true, 'payload timestamp is the transaction time');
  t.equal(ins.dedupe_key, null, 'captured events carry no dedupe key (as the seed\'s trigger): a statement trigger never meets a duplicate');

  const row2 = { ...row1, vendor_name: 'New Name' };
  t.match(upd, { tenant: 'tenant_a', event_type: 'vendors_update', aggregate_id: '1', aggregate_type: 'vendors' });
  t.same(upd.payload, { operation: 'UPDATE', table: 'vendors', schema: 'tenant_a', timestamp: upd.payload.timestamp, old_data: row1, new_data: row2, changed_fields: { vendor_name: 'New Name' } });
  t.equal(upd.dedupe_key, null);

  t.match(del, { tenant: 'tenant_a', event_type: 'vendors_delete', aggregate_id: '1', aggregate_type: 'vendors' });
  t.same(del.payload, { operation: 'DELETE', table: 'vendors', schema: 'tenant_a', timestamp: del.payload.timestamp, old_data: row2, new_data: null, changed_fields: null });
  t.equal(del.dedupe_key, null);
  t.ok(Number(ins.id) < Number(upd.id) && Number(upd.id) < Number(del.id), 'ids in change order');
});

t.test('composite keys are encoded as a JSON array in key order, unambiguously', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_c;
    CREATE TABLE tenant_c.memberships (note text, org_id integer, code text, PRIMARY KEY (code, org_id))`);
  await capture(db, 'tenant_c');
  await db.query(`INSERT INTO tenant_c.memberships VALUES ('x', 1, 'a,b'), ('y', 1, 'a'), ('z', 2, 'q"u]o,te')`);
  await db.query(`UPDATE tenant_c.memberships SET note = 'w' WHERE code = 'a'`);
  await db.query(`DELETE FROM tenant_c.memberships WHERE org_id = 2`);
  const ev = await events(db);
  t.equal(ev.length, 5);
  const ids = ev.map((e) => e.aggregate_id);
  t.same(ids.slice(0, 3).map((s) => JSON.parse(s)).sort(), [['a', 1], ['a,b', 1], ['q"u]o,te', 2]].sort(), 'each key is a JSON array (code, org_id)');
  t.equal(new Set(ids.slice(0, 3)).size, 3, 'distinct keys give distinct aggregate ids');
  t.same(JSON.parse(ev[3]?.aggregate_id ?? 'null'), ['a', 1], 'update keyed by the composite key');
  t.same(ev[3]?.payload.changed_fields, { note: 'w' });
  t.same(JSON.parse(ev[4]?.aggregate_id ?? 'null'), ['q"u]o,te', 2], 'delete keyed by the old row');
  t.equal(ev[4]?.event_type, 'memberships_delete');
});

t.test('an update that changes the primary key is a delete of the old key and an insert of the new one', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, name text)`);
  await capture(db, 'tenant_a');
  await db.query(`INSERT INTO tenant_a.items VALUES (1, 'one')`);
  await db.query(`UPDATE tenant_a.items SET id = 7 WHERE id = 1`);
  const ev = (await events(db)).slice(1);
  t.equal(ev.length, 2, 'two events for the key change');
  const del = ev.find((e) => e.event_type === 'items_delete');
  const ins = ev.find((e) => e.event_type === 'items_insert');
  t.match(del, { aggregate_id: '1', payload: { operation: 'DELETE', old_data: { id: 1, name: 'one' }, new_data: null, changed_fields: null } });
  t.match(ins, { aggregate_id: '7', payload: { operation: 'INSERT', old_data: null, new_data: { id: 7, name: 'one' }, changed_fields: null } });
  t.equal(del?.payload.new_data, null);
  t.equal(ins?.payload.old_data, null);

  // A shift of several keys in one statement (a deferrable key allows the overlap): the keyed
  // aggregates end up in the right state.
  await db.query(`CREATE TABLE tenant_a.shift (id integer PRIMARY KEY DEFERRABLE, name text)`);
  await capture(db, 'tenant_a', ['shift']);
  await db.query(`INSERT INTO tenant_a.shift VALUES (1, 'a'), (2, 'b'), (3, 'c')`);
  await db.query(`DELETE FROM public.outbox_events`);
  await db.query(`UPDATE tenant_a.shift SET id = id + 1`);
  const shift = await events(db);
  const byKey = new Map(shift.map((e) => [e.aggregate_id, e]));
  t.equal(shift.length, 4, 'delete 1, update 2, update 3, insert 4');
  t.equal(byKey.get('1')?.event_type, 'shift_delete');
  t.same(byKey.get('2')?.payload.new_data, { id: 2, name: 'a' });
  t.same(byKey.get('3')?.payload.changed_fields, { name: 'b' });
  t.equal(byKey.get('4')?.event_type, 'shift_insert');
  t.same(byKey.get('4')?.payload.new_data, { id: 4, name: 'c' });
});

t.test('every data type survives as PostgreSQL renders it, and no data makes the writer fail', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_b;
    CREATE TYPE tenant_b.mood AS ENUM ('sad', 'happy');
    CREATE TYPE tenant_b.pair AS (a integer, b text);
    CREATE DOMAIN tenant_b.posint AS integer CHECK (VALUE > 0);
    CREATE TABLE tenant_b.everything (
      k text PRIMARY KEY,
      num numeric, n_nan numeric, n_scale numeric, f8 float8, f8_nan float8, f4 real, i8 bigint, i2 smallint,
      arr integer[], tarr text[], md integer[], tsarr timestamptz[],
      j jsonb, js json, b bytea, nul text, ts timestamp, tstz timestamptz, d date, yes boolean, no boolean,
      big text, u uuid, iv interval, ip inet, mood tenant_b.mood, pr tenant_b.pair, dom tenant_b.posint,
      rng int4range, tsrng tstzrange, tsv tsvector, xml_v xml, bits bit varying, ch char(5), pt point,
      "Weird Col" text, "quo""te" text
    )`);
  await capture(db, 'tenant_b');

  const longKey = 'long-key/'.repeat(20_000); // 180,000 characters (compressed in the index)
  const digits = '123456789012345678901234567890123456789012345678901234567890.000000000000000000000000000000000000001';
  const w = await connect(t, db.url);
  // Odd session settings of the writer must not change what the payload looks like.
  await w.query(`SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'; SET extra_float_digits = -10`);
  const values = `
      $1, '${digits}', 'NaN', 1.10, 1.0000000000000002, 'NaN', 3.25, 9223372036854775807, -32768,
      '{1,NULL,3}', '{"a,b","c\\"d",NULL,"{x}"}', '{{1,2},{3,4}}', ARRAY['2025-01-01 00:00:00+00'::timestamptz, 'infinity'],
      '{"nested": {"a": [1, 2.50, {"b": null}]}, "big": 123456789012345678901234567890}', '{"b": 1, "a": [true]}',
      '\\x00ff10', NULL, 'infinity', '-infinity', 'infinity', true, false,
      repeat('0123456789abcdef', 393216), 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 day 02:03:04.5', '192.168.0.1/24', 'happy',
      ROW(1, 'x,y'), 5, '[1,10)', '[2025-01-01 00:00+00,2025-02-01 00:00+00)', 'fat cat', '<a>b</a>', B'1011', 'ab', '(1.5,2)', 'w', 'q'`;
  await w.query(`INSERT INTO tenant_b.everything VALUES (${values})`, [longKey]);
  await w.query(`INSERT INTO tenant_b.everything (k) VALUES ('only-key')`);
  await w.query(`UPDATE tenant_b.everything SET big = big || '!', n_nan = 'NaN', num = num + 1 WHERE k = $1`, [longKey]);
  await w.query(`UPDATE tenant_b.everything SET n_nan = 'NaN' WHERE k = $1`, [longKey]); // NaN = NaN: no change
  await w.query(`UPDATE tenant_b.everything SET n_scale = 1.100 WHERE k = $1`, [longKey]); // same value, new scale
  await w.query(`DELETE FROM tenant_b.everything`);

  // What PostgreSQL renders, with the capture function's fixed settings.
  const v = await connect(t, db.url);
  await v.query(`SET TimeZone = 'UTC'`);
  const ev = await events(v);
  t.same(ev.map((e) => e.event_type), ['everything_insert', 'everything_insert', 'everything_update', 'everything_update', 'everything_delete', 'everything_delete'],
    'inserts, two real updates (value; scale), deletes; the NaN->NaN update gave nothing');
  t.ok(ev[0]?.aggregate_id === longKey, 'a 180,000-character key is the aggregate id, unchanged');
  t.same(Object.keys(ev[2]?.payload.changed_fields ?? {}).sort(), ['big', 'num'], 'changed_fields: exactly big and num');
  t.same(Object.keys(ev[3]?.payload.changed_fields ?? {}), ['n_scale'], 'a change of numeric scale is a change');

  // The inserted row, rendered again now by to_jsonb, equals new_data of the insert event.
  await v.query('BEGIN');
  await v.query(`SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; SET LOCAL bytea_output = 'hex'; SET LOCAL extra_float_digits = 1`);
  await v.query(`CREATE TEMP TABLE again (LIKE tenant_b.everything) ON COMMIT DROP`);
  await v.query(`INSERT INTO again VALUES (${values})`, [longKey]);
  const { rows: cmp } = await v.query<{ same: boolean; diff: string | null }>(`
    SELECT e.payload->'new_data' = to_jsonb(a) AS same,
           (SELECT string_agg(x.key, ',') FROM jsonb_each(to_jsonb(a)) x WHERE x.value IS DISTINCT FROM e.payload->'new_data'->x.key) AS diff
    FROM public.outbox_events e, again a WHERE e.id = $1`, [ev[0]?.id]);
  await v.query('COMMIT');
  t.equal(cmp[0]?.same, true, `new_data is to_jsonb(row) (differs in: ${cmp[0]?.diff ?? 'nothing'})`);

  const { rows } = await v.query<Record<string, unknown>>(`
    SELECT p->>'num' AS n, jsonb_typeof(p->'num') AS n_type, p->'n_nan' AS n_nan, p->'n_scale' AS n_scale, p->'f8' AS f8, p->'f8_nan' AS f8_nan,
           p->>'i8' AS i8, p->'arr' AS arr, p->'tarr' AS tarr, p->'md' AS md, p->'tsarr' AS tsarr,
           p->'j' AS j, p->'js' AS js, p->>'b' AS b, jsonb_typeof(p->'nul') AS nul, p ? 'nul' AS has_nul,
           p->>'ts' AS ts, p->>'tstz' AS tstz, p->>'d' AS d, p->'yes' AS yes, p->'no' AS no,
           length(p->>'big') AS big_len, p->>'iv' AS iv, p->'pr' AS pr, p->>'tsrng' AS tsrng, p->>'ch' AS ch,
           p->>'Weird Col' AS weird, p->>'quo"te' AS quote
    FROM (SELECT payload->'new_data' AS p FROM public.outbox_events WHERE id = $1) s`, [ev[0]?.id]);
  const r = rows[0] ?? {};
  t.equal(r.n, digits, 'numeric keeps every digit');
  t.equal(r.n_type, 'number', 'numeric is a JSON number');
  t.same(r.n_nan, 'NaN', 'NaN numeric becomes the string "NaN"');
  t.same(r.n_scale, 1.1, 'numeric scale');
  t.same(r.f8, 1.0000000000000002, 'float8 shortest exact rendering, whatever extra_float_digits the writer had');
  t.same(r.f8_nan, 'NaN');
  t.equal(r.i8, '9223372036854775807', 'bigint exact');
  t.same(r.arr, [1, null, 3], 'array with NULL');
  t.same(r.tarr, ['a,b', 'c"d', null, '{x}'], 'text array with awkward elements');
  t.same(r.md, [[1, 2], [3, 4]], 'multidimensional array');
  t.same(r.tsarr, ['2025-01-01T00:00:00+00:00', 'infinity'], 'timestamptz array in UTC');
  t.same(r.j, { nested: { a: [1, 2.5, { b: null }] }, big: 123456789012345678901234567890 }, 'jsonb nested as JSON');
  t.same(r.js, { a: [true], b: 1 }, 'json as JSON');
  t.equal(r.b, '\\x00ff10', 'bytea in hex, even though the writer set bytea_output=escape');
  t.equal(r.nul, 'null', 'NULL is a JSON null');
  t.equal(r.has_nul, true, 'the NULL column is present');
  t.equal(r.ts, 'infinity', 'infinite timestamp');
  t.equal(r.tstz, '-infinity', 'minus infinity timestamptz');
  t.equal(r.d, 'infinity', 'infinite date');
  t.same(r.yes, true);
  t.same(r.no, false);
  t.equal(Number(r.big_len), 16 * 393216, '6 MiB text value intact');
  t.equal(r.iv, '1 day 02:03:04.5', 'interval in the postgres style, though the writer used sql_standard');
  t.same(r.pr, { a: 1, b: 'x,y' }, 'composite type as an object');
  t.equal(r.tsrng, '["2025-01-01 00:00:00+00","2025-02-01 00:00:00+00")', 'range in ISO style and UTC, though the writer used SQL, DMY');
  t.equal(r.ch, 'ab   ', 'char(n) padded');
  t.equal(r.weird, 'w', 'column names with spaces');
  t.equal(r.quote, 'q', 'column names with quotes');

  const { rows: payloadText } = await v.query<{ t: string }>(`SELECT payload->>'timestamp' AS t FROM public.outbox_events WHERE id = $1`, [ev[0]?.id]);
  t.match(payloadText[0]?.t, TIMESTAMP_UTC, 'payload timestamp in UTC though the writer used Asia/Kolkata');
  t.equal(ev[1]?.aggregate_id, 'only-key');
  t.equal(ev[1]?.payload.new_data?.num, null);
});

t.test('column names that are also aliases inside the capture function are captured correctly', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_a;
    CREATE TABLE tenant_a.aliases (k integer PRIMARY KEY, n text, o text, x text, t text, j text, r text, p text, new_row text, old_row text)`);
  await capture(db, 'tenant_a');
  await db.query(`INSERT INTO tenant_a.aliases VALUES (1, 'n1', 'o1', 'x1', 't1', 'j1', 'r1', 'p1', 'nr1', 'or1'), (2, 'n2', 'o2', 'x2', 't2', 'j2', 'r2', 'p2', 'nr2', 'or2')`);
  await db.query(`UPDATE tenant_a.aliases SET x = 'x1b', n = 'n1b' WHERE k = 1`);
  await db.query(`DELETE FROM tenant_a.aliases WHERE k = 2`);
  const ev = await events(db);
  const row1 = { k: 1, n: 'n1', o: 'o1', x: 'x1', t: 't1', j: 'j1', r: 'r1', p: 'p1', new_row: 'nr1', old_row: 'or1' };
  t.same(ev.map((e) => `${e.event_type}/${e.aggregate_id}`), ['aliases_insert/1', 'aliases_insert/2', 'aliases_update/1', 'aliases_delete/2']);
  t.same(ev[0]?.payload.new_data, row1, 'insert: the whole row');
  t.same(ev[2]?.payload.old_data, row1, 'update: the whole old row');
  t.same(ev[2]?.payload.changed_fields, { n: 'n1b', x: 'x1b' }, 'update: changed fields');
  t.same(ev[3]?.payload.old_data?.o, 'o2', 'delete: the whole old row');
});

t.test('a 5,000-row INSERT … SELECT gives 5,000 events and one notification', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, v text)`);
  await capture(db, 'tenant_a');
  const l = await listen(t, db);
  t.same(await l.drain(), [], 'nothing before');
  await db.query(`INSERT INTO tenant_a.items SELECT g, 'v' || g FROM generate_series(1, 5000) g`);
  const notes = await l.drain();
  t.ok(notes.length >= 1 && notes.length <= 3, `at most a handful of notifications (got ${notes.length})`);
  t.equal(notes[0], 'tenant_a:items_insert', 'payload schema:table_op');
  const { rows } = await db.query<{ n: number; keys: number; aggs: number; types: number; minid: string; maxid: string }>(`
    SELECT count(*)::int AS n, count(dedupe_key)::int AS keys, count(DISTINCT aggregate_id)::int AS aggs,
           count(DISTINCT event_type)::int AS types, min(aggregate_id::int)::text AS minid, max(aggregate_id::int)::text AS maxid
    FROM public.outbox_events`);
  t.same(rows[0], { n: 5000, keys: 0, aggs: 5000, types: 1, minid: '1', maxid: '5000' }, '5,000 events, one per row, no dedupe keys');

  // Many rows in one UPDATE: one event per row that really changed, one notification.
  await db.query('DELETE FROM public.outbox_events');
  await db.query(`UPDATE tenant_a.items SET v = CASE WHEN id % 2 = 0 THEN v || '!' ELSE v END WHERE id <= 2000`);
  const upd = await l.drain();
  t.same(upd, ['tenant_a:items_update'], 'one notification for the UPDATE');
  const { rows: u } = await db.query<{ n: number; odd: number; good: number }>(`
    SELECT count(*)::int AS n, count(*) FILTER (WHERE aggregate_id::int % 2 = 1)::int AS odd,
           count(*) FILTER (WHERE payload->'changed_fields' = jsonb_build_object('v', 'v' || aggregate_id || '!'))::int AS good
    FROM public.outbox_events WHERE event_type = 'items_update'`);
  t.same(u[0], { n: 1000, odd: 0, good: 1000 }, '1,000 events for the 1,000 rows that changed, none for the unchanged');

  // A no-op UPDATE of every row: no events, no notification.
  await db.query('DELETE FROM public.outbox_events');
  await db.query(`UPDATE tenant_a.items SET v = v`);
  t.same(await l.drain(), [], 'no notification when nothing changed');
  t.equal(await eventCount(db), 0, 'no events when nothing changed');

  await db.query(`DELETE FROM tenant_a.items WHERE id > 100`);
  t.same(await l.drain(), ['tenant_a:items_delete'], 'one notification for a bulk DELETE');
  t.equal(await eventCount(db, `event_type = 'items_delete'`), 4900);
});

t.test('every real change is its own event, however the transaction makes it', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, v integer)`);
  await capture(db, 'tenant_a');
  await db.query(`INSERT INTO tenant_a.items VALUES (1, 0)`);
  await db.query('DELETE FROM public.outbox_events');
  const w = await connect(t, db.url);

  await w.query('BEGIN');
  await w.query('UPDATE tenant_a.items SET v = 1 WHERE id = 1');
  await w.query('UPDATE tenant_a.items SET v = 2 WHERE id = 1');
  await w.query('COMMIT');
  let ev = await events(db);
  t.same(ev.map((e) => e.payload.changed_fields), [{ v: 1 }, { v: 2 }], 'two changes of one row in one transaction: both captured');

  // Two changes inside one statement of the client (a function body): both captured.
  await db.query('DELETE FROM public.outbox_events');
  await w.query(`DO $$ BEGIN UPDATE tenant_a.items SET v = 3 WHERE id = 1; UPDATE tenant_a.items SET v = 4 WHERE id = 1; END $$`);
  ev = await events(db);
  t.same(ev.map((e) => e.payload.changed_fields), [{ v: 3 }, { v: 4 }], 'two changes in one DO block: both captured');

  // Session state the writer changes between two changes of a row loses nothing.
  await db.query('DELETE FROM public.outbox_events');
  await w.query('BEGIN');
  await w.query('UPDATE tenant_a.items SET v = 5 WHERE id = 1');
  await w.query('RESET ALL');
  await w.query('UPDATE tenant_a.items SET v = 6 WHERE id = 1');
  await w.query('COMMIT');
  ev = await events(db);
  t.same(ev.map((e) => e.payload.changed_fields), [{ v: 5 }, { v: 6 }], 'RESET ALL between two changes of a row: both captured');

  // A change rolled back to a savepoint leaves no event; the next change is captured.
  await db.query('DELETE FROM public.outbox_events');
  await w.query('BEGIN');
  await w.query('UPDATE tenant_a.items SET v = 10 WHERE id = 1');
  await w.query('SAVEPOINT s');
  await w.query('UPDATE tenant_a.items SET v = 11 WHERE id = 1');
  await w.query('ROLLBACK TO SAVEPOINT s');
  await w.query('UPDATE tenant_a.items SET v = 12 WHERE id = 1');
  await w.query('COMMIT');
  ev = await events(db);
  t.same(ev.map((e) => e.payload.changed_fields), [{ v: 10 }, { v: 12 }], 'savepoint rollback: only the kept changes');

  // A rolled-back transaction leaves nothing.
  await w.query('BEGIN');
  await w.query('UPDATE tenant_a.items SET v = 13 WHERE id = 1');
  await w.query('ROLLBACK');
  t.equal(await eventCount(db), 2, 'rolled back: no event');

  const { rows } = await db.query<{ keyed: number }>(`SELECT count(dedupe_key)::int AS keyed FROM public.outbox_events`);
  t.equal(rows[0]?.keyed, 0, 'captured events carry no dedupe key, so none can be refused as a duplicate');
});

t.test('tables created later in a captured schema are captured; one without a primary key only warns', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE SCHEMA other; CREATE TABLE tenant_a.first (id integer PRIMARY KEY)`);
  await capture(db, 'tenant_a');
  const c = await connect(t, db.url);
  const notices: string[] = [];
  c.on('notice', (n) => notices.push(`${n.severity ?? ''}: ${n.message ?? ''}`));

  const triggerCount = async (rel: string): Promise<number> =>
    (await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_trigger WHERE tgrelid = $1::regclass AND tgfoid = 'public.outbox_capture()'::regprocedure`, [rel])).rows[0]?.n ?? -1;

  await c.query(`CREATE TABLE tenant_a.later (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)`);
  t.equal(await triggerCount('tenant_a.later'), 3, 'a new table gets the three triggers');
  await c.query(`INSERT INTO tenant_a.later (v) VALUES ('x')`);
  t.equal(await eventCount(db, `event_type = 'later_insert' AND tenant = 'tenant_a' AND aggregate_id = '1'`), 1, 'and its changes are captured');
  t.same(notices, [], 'no warning for a table with a key');

  await c.query(`CREATE TABLE tenant_a.nokey (v text)`);
  t.equal(notices.length, 1, 'one notice');
  t.match(notices[0], /^WARNING: .*tenant_a\.nokey has no primary key/, 'a table without a key: a WARNING naming it');
  t.equal(await triggerCount('tenant_a.nokey'), 0, 'and no triggers');
  await c.query(`INSERT INTO tenant_a.nokey VALUES ('x')`);
  t.equal(await eventCount(db, `aggregate_type = 'nokey'`), 0, 'writes to it still work, uncaptured');

  await c.query(`ALTER TABLE tenant_a.nokey ADD COLUMN id serial PRIMARY KEY`);
  t.equal(await triggerCount('tenant_a.nokey'), 3, 'adding a primary key later captures it');
  await c.query(`INSERT INTO tenant_a.nokey (v) VALUES ('y')`);
  t.equal(await eventCount(db, `aggregate_type = 'nokey' AND aggregate_id = '2'`), 1);

  notices.length = 0;
  await c.query(`CREATE TABLE tenant_a.copied AS SELECT 1 AS x`);
  t.match(notices.join('\n'), /tenant_a\.copied has no primary key/, 'CREATE TABLE AS warns too');

  // The trigger keys follow a key change.
  await c.query(`CREATE TABLE tenant_a.rekeyed (a integer NOT NULL, b integer NOT NULL, CONSTRAINT rekeyed_pk PRIMARY KEY (a))`);
  await c.query(`ALTER TABLE tenant_a.rekeyed DROP CONSTRAINT rekeyed_pk, ADD PRIMARY KEY (a, b)`);
  await c.query(`INSERT INTO tenant_a.rekeyed VALUES (1, 2)`);
  t.equal((await events(db, `aggregate_type = 'rekeyed'`))[0]?.aggregate_id, '[1, 2]', 'new composite key used after ALTER TABLE');

  // An operator's DISABLE TRIGGER is itself an ALTER TABLE: it must stick.
  await c.query(`ALTER TABLE tenant_a.first DISABLE TRIGGER outbox_capture_insert`);
  const { rows: en } = await db.query<{ tgenabled: string }>(`SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'tenant_a.first'::regclass AND tgname = 'outbox_capture_insert'`);
  t.equal(en[0]?.tgenabled, 'D', 'a disabled capture trigger stays disabled');
  await c.query(`ALTER TABLE tenant_a.first ADD COLUMN note text`);
  t.equal(await triggerCount('tenant_a.first'), 3, 'other ALTER TABLEs keep the triggers');

  // Partitioned tables are captured through the parent.
  await c.query(`CREATE TABLE tenant_a.parted (id integer PRIMARY KEY, v text) PARTITION BY RANGE (id)`);
  await c.query(`CREATE TABLE tenant_a.parted_1 PARTITION OF tenant_a.parted FOR VALUES FROM (0) TO (100)`);
  t.equal(await triggerCount('tenant_a.parted'), 3, 'partitioned parent captured');
  t.equal(await triggerCount('tenant_a.parted_1'), 0, 'partition itself not (no double events)');
  await c.query(`INSERT INTO tenant_a.parted VALUES (5, 'x')`);
  t.equal(await eventCount(db, `event_type = 'parted_insert' AND aggregate_id = '5'`), 1, 'insert through the parent captured once');

  // Tables in schemas that are not captured stay alone.
  await c.query(`CREATE TABLE other.t (id integer PRIMARY KEY)`);
  t.equal(await triggerCount('other.t'), 0, 'a table in an uncaptured schema is not captured');
  await c.query(`CREATE TEMP TABLE tmp (id integer PRIMARY KEY)`);
  const { rows: tmp } = await c.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_trigger WHERE tgrelid = 'pg_temp.tmp'::regclass`);
  t.equal(tmp[0]?.n, 0, 'temporary tables are not captured');
});

t.test('a writer role with no grants on the outbox tables writes to a captured table and events appear', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, v text)`);
  await capture(db, 'tenant_a');
  const role = await tempRole(t, db);
  await db.query(`GRANT USAGE ON SCHEMA tenant_a TO ${role.name}; GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_a.items TO ${role.name}`);
  const { rows: priv } = await db.query<{ any: boolean }>(`
    SELECT bool_or(has_table_privilege($1, c.oid, 'SELECT') OR has_table_privilege($1, c.oid, 'INSERT')) AS any
    FROM pg_class c WHERE c.oid IN ('public.outbox_events'::regclass, 'public.outbox_relay_state'::regclass, 'public.event_acknowledgments'::regclass)`, [role.name]);
  t.equal(priv[0]?.any, false, 'the writer has no privilege on the tables capture uses');

  const w = await connect(t, role.url);
  t.equal((await w.query<{ u: string }>('SELECT current_user AS u')).rows[0]?.u, role.name);
  await t.rejects(w.query('SELECT 1 FROM public.outbox_events'), { code: '42501' }, 'it cannot read the outbox itself');
  await w.query(`SET search_path = tenant_a`);
  await w.query(`INSERT INTO items VALUES (1, 'a'), (2, 'b')`);
  await w.query(`UPDATE items SET v = 'c' WHERE id = 1`);
  await w.query(`DELETE FROM items WHERE id = 2`);
  const ev = await events(db);
  t.same(ev.map((e) => `${e.tenant}/${e.event_type}/${e.aggregate_id}`),
    ['tenant_a/items_insert/1', 'tenant_a/items_insert/2', 'tenant_a/items_update/1', 'tenant_a/items_delete/2'],
    'events written as the function owner, tenant = the table schema (not the writer\'s search_path)');

  // The same role creating a table in the captured schema (the event trigger runs as it): captured.
  await db.query(`GRANT CREATE ON SCHEMA tenant_a TO ${role.name}`);
  await w.query(`CREATE TABLE tenant_a.own_table (id integer PRIMARY KEY, v text)`);
  await w.query(`INSERT INTO tenant_a.own_table VALUES (1, 'mine')`);
  const own = await events(db, `aggregate_type = 'own_table'`);
  t.same(own.map((e) => `${e.tenant}/${e.event_type}/${e.aggregate_id}`), ['tenant_a/own_table_insert/1'], 'a table a non-superuser creates later is captured too');
});

t.test('notify_mode: always, idle (only while a relay is idle) and off', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, v text)`);
  await capture(db, 'tenant_a');
  const l = await listen(t, db);
  const setMode = (mode: string, idle: boolean) => db.query('UPDATE public.outbox_relay_state SET notify_mode = $1, relay_idle = $2', [mode, idle]);
  let id = 0;
  const write = async () => {
    id++;
    await db.query('INSERT INTO tenant_a.items VALUES ($1, $2)', [id, 'x']);
  };

  await setMode('always', false);
  await write();
  t.same(await l.drain(), ['tenant_a:items_insert'], 'always: notifies even when the relay is busy');
  await setMode('idle', true);
  await write();
  t.same(await l.drain(), ['tenant_a:items_insert'], 'idle: notifies while a relay is idle');
  await setMode('idle', false);
  await write();
  t.same(await l.drain(), [], 'idle: silent while the relay is busy');
  await setMode('off', true);
  await write();
  t.same(await l.drain(), [], 'off: never notifies');
  t.equal(await eventCount(db), 4, 'events are written in every mode');

  // One transaction with several statements: PostgreSQL folds identical notifications.
  await setMode('always', true);
  const c = await connect(t, db.url);
  await c.query('BEGIN');
  for (let i = 0; i < 5; i++) {
    id++;
    await c.query('INSERT INTO tenant_a.items VALUES ($1, $2)', [id, 'y']);
  }
  await c.query(`UPDATE tenant_a.items SET v = 'z' WHERE id = $1`, [id]);
  await c.query('COMMIT');
  t.same((await l.drain()).sort(), ['tenant_a:items_insert', 'tenant_a:items_update'], 'one notification per distinct payload per transaction');

  // No settings row at all (no relay ever wrote one and someone emptied the table): notify, and
  // stamp the default of 20 attempts.
  await db.query('DELETE FROM public.outbox_relay_state');
  await db.query('DELETE FROM public.outbox_events');
  await write();
  t.same(await l.drain(), ['tenant_a:items_insert'], 'no settings row: notifies');
  const { rows } = await db.query<{ max_attempts: number }>('SELECT max_attempts FROM public.outbox_events');
  t.same(rows, [{ max_attempts: 20 }], 'no settings row: max_attempts 20');
  await db.query(`INSERT INTO public.outbox_relay_state (notify_mode, relay_idle, max_attempts) VALUES ('idle', false, 7)`);
  await write();
  const { rows: stamped } = await db.query<{ max_attempts: number }>('SELECT max_attempts FROM public.outbox_events ORDER BY id DESC LIMIT 1');
  t.same(stamped, [{ max_attempts: 7 }], 'each event carries the max_attempts the relays set');
});

t.test('stale trigger arguments (the key column is gone): every change is captured, none paired with another row', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, v text)`);
  // As if the key had been renamed while no event trigger re-installed capture: the triggers name a
  // key column the rows no longer have.
  const triggers: Array<[string, string]> = [['INSERT', 'NEW TABLE AS outbox_new'], ['UPDATE', 'OLD TABLE AS outbox_old NEW TABLE AS outbox_new'], ['DELETE', 'OLD TABLE AS outbox_old']];
  for (const [op, ref] of triggers) {
    await db.query(`CREATE TRIGGER outbox_capture_${op.toLowerCase()} AFTER ${op} ON tenant_a.items REFERENCING ${ref} FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_capture('old_id')`);
  }
  await db.query(`INSERT INTO tenant_a.items SELECT g, 'v' || g FROM generate_series(1, 3) g`);
  t.equal(await eventCount(db, `event_type = 'items_insert'`), 3, 'three inserts, three events (003 kept one: they shared the empty key)');
  await db.query('DELETE FROM public.outbox_events');

  await db.query(`UPDATE tenant_a.items SET v = v || '!' WHERE id <= 2`);
  const ev = await events(db);
  t.same(ev.map((e) => e.event_type).sort(), ['items_delete', 'items_delete', 'items_insert', 'items_insert'],
    'two changed rows: each a delete and an insert, not 2 x 2 pairings of unrelated rows');
  t.same(ev.filter((e) => e.event_type === 'items_insert').map((e) => e.payload.new_data?.v).sort(), ['v1!', 'v2!'], 'the new data of both rows');
  await db.query('DELETE FROM public.outbox_events');
  await db.query(`UPDATE tenant_a.items SET v = v`);
  t.equal(await eventCount(db), 0, 'an update that changes nothing still makes no event');
});

t.test('re-running install is harmless: still three triggers and one event per change', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.items (id integer PRIMARY KEY, v text)`);
  for (let i = 0; i < 2; i++) {
    const res = await runCli(['triggers', 'install', '--schema', 'tenant_a'], { DATABASE_URL: db.url });
    t.equal(res.code, 0, `install run ${i + 1} exits 0`);
  }
  const before = await db.query<{ oid: string }>(`SELECT oid::text FROM pg_trigger WHERE tgrelid = 'tenant_a.items'::regclass ORDER BY oid`);
  const res = await runCli(['triggers', 'install', '--schema', 'tenant_a', '--table', 'items'], { DATABASE_URL: db.url });
  t.equal(res.code, 0, 'install of the named table exits 0');
  const after = await db.query<{ oid: string }>(`SELECT oid::text FROM pg_trigger WHERE tgrelid = 'tenant_a.items'::regclass ORDER BY oid`);
  t.equal(after.rows.length, 3, 'still exactly three triggers');
  t.same(after.rows, before.rows, 'up-to-date triggers are left as they are');
  await db.query(`INSERT INTO tenant_a.items VALUES (1, 'a')`);
  await db.query(`UPDATE tenant_a.items SET v = 'b'`);
  await db.query(`DELETE FROM tenant_a.items`);
  t.same((await events(db)).map((e) => e.event_type), ['items_insert', 'items_update', 'items_delete'], 'one event per change');
});

/**
 * `outbox-relay triggers install|remove|list`, run as a user would (the compiled CLI), against a real
 * PostgreSQL: refusals leave the database exactly as it was.
 */
import t from 'tap';
import { runCli, type CliResult } from './helpers/cli.js';
import { freshDatabase, type TestDatabase } from './helpers/db.js';
import { count } from './helpers/relay.js';

/** The type of a subtest's `t` (the callback of the last `t.test` overload). */
type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

/** Everything the trigger commands may change, as one comparable value. */
async function snapshot(db: TestDatabase): Promise<unknown> {
  const { rows: triggers } = await db.query(`
    SELECT n.nspname || '.' || c.relname || ':' || t.tgname || ':' || t.tgenabled::text AS trig
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE NOT t.tgisinternal ORDER BY 1`);
  const { rows: tables } = await db.query(`
    SELECT n.nspname || '.' || c.relname AS rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v') AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1`);
  const { rows: schemas } = await db.query('SELECT schema_name FROM public.outbox_capture_schemas ORDER BY 1');
  const { rows: settings } = await db.query('SELECT all_schemas, excluded_schemas FROM public.outbox_capture_settings');
  return { triggers, tables, schemas, settings };
}

async function captured(db: TestDatabase, rel: string): Promise<number> {
  const { rows } = await db.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM pg_trigger WHERE tgrelid = $1::regclass AND tgfoid = 'public.outbox_capture()'::regprocedure`, [rel]);
  return rows[0]?.n ?? -1;
}

/** A clear refusal: the exit status, one line on stderr matching `message`, nothing on stdout. */
function refused(t: Tap, res: CliResult, code: number, message: RegExp, what: string): void {
  t.equal(res.code, code, `${what}: exit ${code}`);
  t.match(res.stderr, message, `${what}: says why`);
  t.equal(res.stderr.trim().split('\n').length, 1, `${what}: one line (${res.stderr.trim()})`);
  t.notMatch(res.stderr, /\n\s+at /, `${what}: no stack trace`);
  t.equal(res.stdout, '', `${what}: nothing on stdout`);
}

t.test('malicious and invalid identifiers are refused with exit 2 and change nothing', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_a;
    CREATE TABLE tenant_a.items (id integer PRIMARY KEY);
    CREATE TABLE tenant_a.y (id integer PRIMARY KEY);
    CREATE TABLE public.y (id integer PRIMARY KEY);
    CREATE SCHEMA "my schema";
    CREATE TABLE "my schema".t (id integer PRIMARY KEY);
    CREATE TABLE tenant_a."my table" (id integer PRIMARY KEY)`);
  const env = { DATABASE_URL: db.url };
  const before = await snapshot(db);
  const evil = 'x"; drop table y; --';
  const long64 = 'a'.repeat(64);
  const cases: Array<[string, string[], RegExp]> = [
    ['malicious schema', ['triggers', 'install', '--schema', evil], /invalid schema name .*x\\"; drop table y; --.*: it may contain only letters, digits/],
    ['malicious table', ['triggers', 'install', '--schema', 'tenant_a', '--table', evil], /invalid table name/],
    ['malicious table after a good one', ['triggers', 'install', '--schema', 'tenant_a', '--table', 'items', '--table', evil], /invalid table name/],
    ['malicious exclude', ['triggers', 'install', '--all-schemas', '--exclude', evil], /invalid schema name/],
    ['malicious schema on remove', ['triggers', 'remove', '--schema', evil], /invalid schema name/],
    ['malicious table on remove', ['triggers', 'remove', '--schema', 'tenant_a', '--table', evil], /invalid table name/],
    ['empty schema', ['triggers', 'install', '--schema', ''], /invalid schema name "": it is empty/],
    ['empty table', ['triggers', 'install', '--schema', 'tenant_a', '--table', ''], /invalid table name "": it is empty/],
    ['64-byte schema', ['triggers', 'install', '--schema', long64], /longer than 63 bytes/],
    ['64-byte table', ['triggers', 'install', '--schema', 'tenant_a', '--table', long64], /longer than 63 bytes/],
    ['32 two-byte characters', ['triggers', 'install', '--schema', 'é'.repeat(32)], /longer than 63 bytes/],
    ['schema with a space', ['triggers', 'install', '--schema', 'my schema'], /invalid schema name "my schema"/],
    ['table with a space', ['triggers', 'install', '--schema', 'tenant_a', '--table', 'my table'], /invalid table name "my table"/],
    ['qualified name', ['triggers', 'install', '--schema', 'tenant_a', '--table', 'tenant_a.items'], /invalid table name/],
    ['newline', ['triggers', 'install', '--schema', 'tenant_a\ndrop'], /invalid schema name "tenant_a\\ndrop"/],
  ];
  // Refusals change nothing, so they can run side by side.
  const results = await Promise.all(cases.map(([, args]) => runCli(args, env)));
  cases.forEach(([what, , message], i) => refused(t, results[i] as CliResult, 2, message, what));
  t.same(await snapshot(db), before, 'no trigger, table, schema or setting changed');
  const { rows } = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_class WHERE relname = 'y' AND relkind = 'r'`);
  t.equal(rows[0]?.n, 2, 'the sentinel tables named y still exist');

  // A 63-byte name is PostgreSQL's limit and is accepted.
  const long63 = `t${'a'.repeat(62)}`;
  await db.query(`CREATE SCHEMA ${long63}; CREATE TABLE ${long63}.items (id integer PRIMARY KEY)`);
  const ok = await runCli(['triggers', 'install', '--schema', long63], env);
  t.equal(ok.code, 0, `a 63-byte schema name is fine (${ok.stderr})`);
  t.equal(await captured(db, `${long63}.items`), 3);
});

t.test('unknown schemas and tables, views, and tables without a primary key', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_a;
    CREATE TABLE tenant_a.items (id integer PRIMARY KEY);
    CREATE TABLE tenant_a.nokey (v text);
    CREATE VIEW tenant_a.items_view AS SELECT * FROM tenant_a.items`);
  const env = { DATABASE_URL: db.url };
  const before = await snapshot(db);
  const cases: Array<[string, string[], number, RegExp]> = [
    ['unknown schema', ['triggers', 'install', '--schema', 'nope'], 2, /schema "nope" does not exist/],
    ['unknown table', ['triggers', 'install', '--schema', 'tenant_a', '--table', 'nope'], 2, /table tenant_a\.nope does not exist/],
    ['names are exact, not case-folded', ['triggers', 'install', '--schema', 'Tenant_A'], 2, /schema "Tenant_A" does not exist/],
    ['a view', ['triggers', 'install', '--schema', 'tenant_a', '--table', 'items_view'], 2, /is not a table/],
    ['named table without a key', ['triggers', 'install', '--schema', 'tenant_a', '--table', 'nokey'], 2, /tenant_a\.nokey has no primary key/],
    ['a good and a bad table', ['triggers', 'install', '--schema', 'tenant_a', '--table', 'items', '--table', 'nokey'], 2, /no primary key/],
    ['remove: unknown schema', ['triggers', 'remove', '--schema', 'nope'], 2, /schema "nope" does not exist/],
    ['remove: unknown table', ['triggers', 'remove', '--schema', 'tenant_a', '--table', 'nope'], 2, /does not exist/],
    // outbox-relay's own tables are never captured (a trigger on outbox_events would feed itself).
    ['the outbox itself', ['triggers', 'install', '--schema', 'public', '--table', 'outbox_events'], 2, /table of outbox-relay itself/],
    ['a system schema', ['triggers', 'install', '--schema', 'pg_catalog'], 2, /pg_catalog is a system schema; its tables cannot be captured/],
    ['information_schema', ['triggers', 'install', '--schema', 'information_schema'], 2, /information_schema is a system schema/],
    // Option mistakes are usage errors too.
    ['no schema', ['triggers', 'install'], 2, /--schema S, or --all-schemas/],
    ['both', ['triggers', 'install', '--schema', 'tenant_a', '--all-schemas'], 2, /either --schema .* or --all-schemas/],
    ['exclude without all', ['triggers', 'install', '--schema', 'tenant_a', '--exclude', 'x'], 2, /--exclude goes with --all-schemas/],
    ['remove without target', ['triggers', 'remove'], 2, /--schema S, or --all/],
    ['unknown option', ['triggers', 'install', '--bogus'], 2, /unknown option '--bogus'/],
  ];
  const results = await Promise.all(cases.map(([, args]) => runCli(args, env)));
  cases.forEach(([what, , code, message], i) => refused(t, results[i] as CliResult, code, message, what));
  t.same(await snapshot(db), before, 'all or nothing: not even tenant_a.items was captured');
  const help = await runCli(['triggers', 'install', '--help'], env);
  t.equal(help.code, 0, '--help exits 0');
  t.match(help.stdout, /--all-schemas/);
});

t.test('whole-schema install skips a table without a key, with a warning', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_a;
    CREATE TABLE tenant_a.items (id integer PRIMARY KEY);
    CREATE TABLE tenant_a.orders (id integer, line integer, PRIMARY KEY (id, line));
    CREATE TABLE tenant_a.nokey (v text);
    CREATE TABLE public.app_table (id integer PRIMARY KEY)`);
  const env = { DATABASE_URL: db.url };
  const res = await runCli(['triggers', 'install', '--schema', 'tenant_a'], env);
  t.equal(res.code, 0, `exit 0 (${res.stderr})`);
  t.match(res.stdout, /captured tenant_a\.items/);
  t.match(res.stdout, /captured tenant_a\.orders/);
  t.match(res.stdout, /skipped\s+tenant_a\.nokey: no primary key/);
  t.match(res.stderr, /warning: tenant_a\.nokey has no primary key and is not captured/);
  t.equal(await captured(db, 'tenant_a.items'), 3);
  t.equal(await captured(db, 'tenant_a.orders'), 3);
  t.equal(await captured(db, 'tenant_a.nokey'), 0);

  const json = await runCli(['triggers', 'install', '--schema', 'tenant_a', '--json'], env);
  t.equal(json.code, 0);
  const report = JSON.parse(json.stdout) as { installed: unknown[]; skipped: Array<{ table: string; reason: string }>; schemas: string[] };
  t.same(report.installed, [{ schema: 'tenant_a', table: 'items' }, { schema: 'tenant_a', table: 'orders' }], '--json: the installed tables');
  t.same(report.skipped, [{ schema: 'tenant_a', table: 'nokey', reason: 'no primary key' }]);
  t.same(report.schemas, ['tenant_a']);

  // The public schema holds outbox-relay's own tables: they are skipped, the others captured.
  const pub = await runCli(['triggers', 'install', '--schema', 'public', '--json'], env);
  t.equal(pub.code, 0, `install --schema public exits 0 (${pub.stderr})`);
  const pr = JSON.parse(pub.stdout) as { installed: Array<{ table: string }>; skipped: Array<{ table: string; reason: string }> };
  t.same(pr.installed.map((x) => x.table), ['app_table'], 'only the application\'s table');
  t.ok(pr.skipped.some((s) => s.table === 'outbox_events' && /own table/.test(s.reason)), 'outbox_events skipped as our own');
  t.equal(await captured(db, 'public.outbox_events'), 0, 'outbox_events has no capture trigger');
  const listed = await runCli(['triggers', 'list', '--json'], env);
  const tables = (JSON.parse(listed.stdout) as { tables: Array<{ schema: string; table: string }> }).tables.filter((x) => x.schema === 'public').map((x) => x.table);
  t.same(tables, ['app_table'], 'list shows the captured public table, not outbox-relay\'s own tables as waiting for capture');
  await db.query(`INSERT INTO tenant_a.items VALUES (1)`);
  const { rows } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM public.outbox_events');
  t.equal(rows[0]?.n, 1, 'capture still writes exactly one event');
});

t.test('--all-schemas with --exclude; schemas created afterwards are captured', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.t (id integer PRIMARY KEY);
    CREATE SCHEMA tenant_b; CREATE TABLE tenant_b.t (id integer PRIMARY KEY);
    CREATE SCHEMA tenant_c; CREATE TABLE tenant_c.t (id integer PRIMARY KEY);
    CREATE TABLE public.app (id integer PRIMARY KEY)`);
  const env = { DATABASE_URL: db.url };
  const res = await runCli(['triggers', 'install', '--all-schemas', '--exclude', 'tenant_c'], env);
  t.equal(res.code, 0, `exit 0 (${res.stderr})`);
  t.equal(await captured(db, 'tenant_a.t'), 3);
  t.equal(await captured(db, 'tenant_b.t'), 3);
  t.equal(await captured(db, 'tenant_c.t'), 0, 'excluded schema left alone');
  t.equal(await captured(db, 'public.app'), 0, 'public is not a tenant schema');

  await db.query(`CREATE SCHEMA tenant_d; CREATE TABLE tenant_d.t (id integer PRIMARY KEY)`);
  t.equal(await captured(db, 'tenant_d.t'), 3, 'a schema created afterwards is captured');
  await db.query(`INSERT INTO tenant_d.t VALUES (1)`);
  const { rows } = await db.query<{ tenant: string }>('SELECT tenant FROM public.outbox_events');
  t.same(rows, [{ tenant: 'tenant_d' }], 'its changes become events');
  await db.query(`CREATE TABLE tenant_c.t2 (id integer PRIMARY KEY)`);
  t.equal(await captured(db, 'tenant_c.t2'), 0, 'new tables in an excluded schema stay uncaptured');

  const list = await runCli(['triggers', 'list', '--json'], env);
  t.equal(list.code, 0);
  const listing = JSON.parse(list.stdout) as { allSchemas: { enabled: boolean; excluded: string[] }; autoCapture: boolean };
  t.same(listing.allSchemas, { enabled: true, excluded: ['tenant_c'] });
  t.equal(listing.autoCapture, true);

  // Removing one schema by name while --all-schemas is on excludes it: its new tables stay uncaptured.
  const rm = await runCli(['triggers', 'remove', '--schema', 'tenant_b'], env);
  t.equal(rm.code, 0);
  t.equal(await captured(db, 'tenant_b.t'), 0);
  await db.query(`CREATE TABLE tenant_b.t3 (id integer PRIMARY KEY)`);
  t.equal(await captured(db, 'tenant_b.t3'), 0, 'a removed schema is not captured again by the next CREATE TABLE');
  // And installing it by name again takes it off the exclusions.
  const again = await runCli(['triggers', 'install', '--schema', 'tenant_b'], env);
  t.equal(again.code, 0);
  t.equal(await captured(db, 'tenant_b.t3'), 3);
  const { rows: st } = await db.query<{ excluded_schemas: string[] }>('SELECT excluded_schemas FROM public.outbox_capture_settings');
  t.same(st[0]?.excluded_schemas, ['tenant_c']);
});

t.test('remove --table, remove --schema, remove --all; list as text and JSON', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`
    CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.one (id integer PRIMARY KEY); CREATE TABLE tenant_a.two (a text, b integer, PRIMARY KEY (a, b));
    CREATE TABLE tenant_a.nokey (v text);
    CREATE SCHEMA tenant_b; CREATE TABLE tenant_b.one (id integer PRIMARY KEY)`);
  const env = { DATABASE_URL: db.url };
  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_a'], env)).code, 0);
  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_b', '--table', 'one'], env)).code, 0);

  const text = await runCli(['triggers', 'list'], env);
  t.equal(text.code, 0, text.stderr);
  const lines = text.stdout.split('\n');
  t.match(lines[0], /^SCHEMA\s+TABLE\s+CAPTURED\s+KEY\s+NOTE$/, 'a header');
  t.ok(lines.some((l) => /^tenant_a\s+one\s+yes\s+id$/.test(l)), 'tenant_a.one captured, key id');
  t.ok(lines.some((l) => /^tenant_a\s+two\s+yes\s+a,b$/.test(l)), 'composite key listed in key order');
  t.ok(lines.some((l) => /^tenant_a\s+nokey\s+no\s+not captured: no primary key$/.test(l)), 'the table without a key, with the reason');
  t.ok(lines.some((l) => /^tenant_b\s+one\s+yes\s+id$/.test(l)), 'a table captured by name');
  t.match(text.stdout, /schemas captured as a whole: tenant_a\n/);
  t.match(text.stdout, /tables created later in captured schemas are captured automatically/);

  const json = await runCli(['triggers', 'list', '--json'], env);
  t.equal(json.code, 0);
  const listing = JSON.parse(json.stdout) as { tables: Array<{ schema: string; table: string; captured: boolean; keyColumns: string[]; note: string }>; schemas: string[]; allSchemas: unknown; autoCapture: boolean };
  t.same(listing.tables, [
    { schema: 'tenant_a', table: 'nokey', captured: false, keyColumns: [], note: 'not captured: no primary key' },
    { schema: 'tenant_a', table: 'one', captured: true, keyColumns: ['id'], note: '' },
    { schema: 'tenant_a', table: 'two', captured: true, keyColumns: ['a', 'b'], note: '' },
    { schema: 'tenant_b', table: 'one', captured: true, keyColumns: ['id'], note: '' },
  ]);
  t.same(listing.schemas, ['tenant_a']);
  t.same(listing.allSchemas, { enabled: false, excluded: [] });
  t.equal(listing.autoCapture, true);

  // In a schema captured as a whole, removing one table excludes it: its triggers stay, disabled.
  // Removed ones came back at the table's next ALTER TABLE (the DDL event trigger re-creates them).
  const eventsOf = (table: string) => count(db, "SELECT count(*)::int AS n FROM public.outbox_events WHERE aggregate_type = $1", [table]);
  const rmTable = await runCli(['triggers', 'remove', '--schema', 'tenant_a', '--table', 'one'], env);
  t.equal(rmTable.code, 0, rmTable.stderr);
  t.match(rmTable.stdout, /disabled capture of tenant_a\.one \(its schema is captured as a whole/);
  const enabledTriggers = async (rel: string) => (await db.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM pg_trigger WHERE tgrelid = $1::regclass AND tgfoid = 'public.outbox_capture()'::regprocedure AND tgenabled <> 'D'", [rel])).rows[0]?.n;
  t.equal(await enabledTriggers('tenant_a.one'), 0, 'no capture trigger of tenant_a.one is enabled');
  t.equal(await enabledTriggers('tenant_a.two'), 3, 'the other table keeps its triggers');
  await db.query('ALTER TABLE tenant_a.one ADD COLUMN note text');
  await db.query('INSERT INTO tenant_a.one (id) VALUES (1)');
  t.equal(await eventsOf('one'), 0, 'an ALTER TABLE later does not bring capture back: the insert made no event');
  const partial = JSON.parse((await runCli(['triggers', 'list', '--json'], env)).stdout) as typeof listing;
  t.match(partial.tables.find((x) => x.table === 'one' && x.schema === 'tenant_a'),
    { captured: false, note: /capture disabled: "triggers install --schema tenant_a --table one" enables it/ }, 'list says it is disabled, and how to undo it');
  const again = await runCli(['triggers', 'install', '--schema', 'tenant_a'], env);
  t.equal(again.code, 0, again.stderr);
  t.match(again.stdout, /skipped\s+tenant_a\.one: capture disabled/, 'a whole-schema install keeps the exclusion, and says so');
  t.equal(await enabledTriggers('tenant_a.one'), 0);
  const back = await runCli(['triggers', 'install', '--schema', 'tenant_a', '--table', 'one'], env);
  t.equal(back.code, 0, back.stderr);
  await db.query('INSERT INTO tenant_a.one (id) VALUES (2)');
  t.equal(await eventsOf('one'), 1, 'an install by name enables it again');
  t.equal((await runCli(['triggers', 'remove', '--schema', 'tenant_a', '--table', 'one'], env)).code, 0, 'and it can be excluded again');

  const rmSchema = await runCli(['triggers', 'remove', '--schema', 'tenant_a', '--json'], env);
  t.equal(rmSchema.code, 0);
  t.same(JSON.parse(rmSchema.stdout), { removed: [{ schema: 'tenant_a', table: 'one' }, { schema: 'tenant_a', table: 'two' }], disabled: [], skipped: [], schemas: ['tenant_a'] },
    'removing the schema removes every table\'s triggers, disabled ones included');
  t.equal(await captured(db, 'tenant_a.one'), 0);
  t.equal(await captured(db, 'tenant_a.two'), 0);
  await db.query(`CREATE TABLE tenant_a.three (id integer PRIMARY KEY)`);
  t.equal(await captured(db, 'tenant_a.three'), 0, 'new tables of a removed schema are not captured');
  t.equal(await captured(db, 'tenant_b.one'), 3, 'other schemas untouched');

  t.equal((await runCli(['triggers', 'install', '--all-schemas'], env)).code, 0);
  const rmAll = await runCli(['triggers', 'remove', '--all'], env);
  t.equal(rmAll.code, 0);
  const { rows } = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_trigger WHERE tgfoid = 'public.outbox_capture()'::regprocedure`);
  t.equal(rows[0]?.n, 0, 'no capture trigger anywhere');
  const { rows: st } = await db.query<{ all_schemas: boolean }>('SELECT all_schemas FROM public.outbox_capture_settings');
  t.equal(st[0]?.all_schemas, false, '--all-schemas is off');
  await db.query(`CREATE SCHEMA tenant_e; CREATE TABLE tenant_e.t (id integer PRIMARY KEY)`);
  t.equal(await captured(db, 'tenant_e.t'), 0, 'and new schemas are no longer captured');
  const empty = await runCli(['triggers', 'list'], env);
  t.match(empty.stdout, /^no tables are captured\n/);
  const nothing = await runCli(['triggers', 'remove', '--schema', 'tenant_b', '--table', 'one'], env);
  t.equal(nothing.code, 0);
  t.match(nothing.stdout, /nothing was captured there/);
});

t.test('without the event trigger (installed only by a superuser), migrate and install say that new tables are not captured', async (t) => {
  const db = await freshDatabase(t);
  // What a migration by a non-superuser leaves: no (enabled) event trigger.
  await db.query('ALTER EVENT TRIGGER outbox_capture_new_tables DISABLE');
  await db.query('CREATE SCHEMA tenant_ne; CREATE TABLE tenant_ne.items (id int PRIMARY KEY)');
  const env = { DATABASE_URL: db.url };
  const migrate = await runCli(['migrate'], env);
  t.equal(migrate.code, 0, migrate.stderr);
  t.match(migrate.stderr, /warning: tables created later are NOT captured automatically \(the event trigger needs a superuser/, 'migrate warns');
  const install = await runCli(['triggers', 'install', '--schema', 'tenant_ne'], env);
  t.equal(install.code, 0, install.stderr);
  t.match(install.stdout, /^schemas captured as a whole: tenant_ne$/m, 'install does not claim new tables are included');
  t.notMatch(install.stdout, /new tables included/);
  t.match(install.stderr, /tables created later are NOT captured automatically/, 'and warns');
  const json = await runCli(['triggers', 'install', '--schema', 'tenant_ne', '--json'], env);
  t.match(JSON.parse(json.stdout), { schemas: ['tenant_ne'], autoCapture: false });
  // With the event trigger there: no warning, and the claim is made.
  await db.query('ALTER EVENT TRIGGER outbox_capture_new_tables ENABLE');
  const again = await runCli(['triggers', 'install', '--schema', 'tenant_ne'], env);
  t.match(again.stdout, /schemas captured as a whole \(new tables included\): tenant_ne/);
  t.equal(again.stderr, '');
  t.equal((await runCli(['migrate'], env)).stderr, '', 'migrate is quiet');
});

t.test('before migrate: a clear "run migrate first"', async (t) => {
  const db = await freshDatabase(t, { migrated: false });
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.t (id integer PRIMARY KEY)`);
  const env = { DATABASE_URL: db.url };
  const all = [['triggers', 'list'], ['triggers', 'install', '--schema', 'tenant_a'], ['triggers', 'remove', '--all']];
  const results = await Promise.all(all.map((args) => runCli(args, env)));
  all.forEach((args, i) => refused(t, results[i] as CliResult, 1, /run "outbox-relay migrate" first/, args.join(' ')));
  const { rows } = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_trigger WHERE NOT tgisinternal`);
  t.equal(rows[0]?.n, 0, 'nothing installed');
});

t.test('list names a table whose primary key changed since install, and install mends it', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.one (id integer PRIMARY KEY, v text)`);
  const env = { DATABASE_URL: db.url };
  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_a', '--table', 'one'], env)).code, 0);
  // Without the event trigger (a migration run without superuser), nothing re-installs capture.
  await db.query('ALTER EVENT TRIGGER outbox_capture_new_tables DISABLE');
  await db.query('ALTER TABLE tenant_a.one RENAME COLUMN id TO one_id');

  const listed = async () => {
    const res = await runCli(['triggers', 'list', '--json'], env);
    t.equal(res.code, 0, res.stderr);
    return (JSON.parse(res.stdout) as { tables: Array<{ schema: string; table: string; captured: boolean; keyColumns: string[]; note: string }> }).tables;
  };
  t.same(await listed(), [{ schema: 'tenant_a', table: 'one', captured: true, keyColumns: ['one_id'], note: 'the primary key changed since install: re-run triggers install' }]);
  const text = await runCli(['triggers', 'list'], env);
  t.match(text.stdout, /^tenant_a\s+one\s+yes\s+one_id\s+the primary key changed since install: re-run triggers install$/m, 'the text listing says so too');

  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_a', '--table', 'one'], env)).code, 0);
  t.same(await listed(), [{ schema: 'tenant_a', table: 'one', captured: true, keyColumns: ['one_id'], note: '' }], 'mended by install');
  await db.query(`INSERT INTO tenant_a.one VALUES (7, 'x')`);
  const { rows } = await db.query<{ aggregate_id: string }>('SELECT aggregate_id FROM public.outbox_events');
  t.same(rows, [{ aggregate_id: '7' }], 'events carry the key again');
});

t.test('list flags a captured parent in table inheritance, and excluding it leaves the children captured', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_i; CREATE TABLE tenant_i.parent (id integer PRIMARY KEY, v text);
    CREATE TABLE tenant_i.child (extra text) INHERITS (tenant_i.parent); ALTER TABLE tenant_i.child ADD PRIMARY KEY (id)`);
  const env = { DATABASE_URL: db.url };
  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_i'], env)).code, 0);
  const listed = async () => (JSON.parse((await runCli(['triggers', 'list', '--json'], env)).stdout) as { tables: Array<{ table: string; captured: boolean; note: string }> }).tables;
  const parent = (await listed()).find((x) => x.table === 'parent');
  t.match(parent, { captured: true, note: /has inheritance children: exclude it \("triggers remove --schema tenant_i --table parent"\) and capture the children/ }, 'the parent is flagged');
  t.match((await listed()).find((x) => x.table === 'child'), { captured: true, note: '' }, 'the child is not');
  t.equal((await runCli(['triggers', 'remove', '--schema', 'tenant_i', '--table', 'parent'], env)).code, 0);
  t.match((await listed()).find((x) => x.table === 'parent'), { captured: false, note: /capture disabled/ }, 'excluded');
  await db.query(`INSERT INTO tenant_i.parent VALUES (1, 'a'); INSERT INTO tenant_i.child VALUES (1, 'b', 'x'); UPDATE tenant_i.child SET v = 'c' WHERE id = 1`);
  const { rows } = await db.query<{ event_type: string }>('SELECT event_type FROM public.outbox_events ORDER BY id');
  t.same(rows.map((r) => r.event_type), ['child_insert', 'child_update'], 'writes to the child are captured once each, under its own name');
});

t.test('an exclusion survives a new primary key, a lost one and a missing trigger; a trigger disabled by hand stays so', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_x;
    CREATE TABLE tenant_x.kept (id integer PRIMARY KEY, v text);
    CREATE TABLE tenant_x.gone (id integer PRIMARY KEY, v text);
    CREATE TABLE tenant_x.part (id integer PRIMARY KEY, v text)`);
  const env = { DATABASE_URL: db.url };
  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_x'], env)).code, 0);
  for (const table of ['kept', 'gone']) {
    t.equal((await runCli(['triggers', 'remove', '--schema', 'tenant_x', '--table', table], env)).code, 0, `${table} excluded`);
  }
  const states = async (rel: string): Promise<string> => {
    const { rows } = await db.query<{ s: string }>(
      `SELECT string_agg(tgname || '=' || tgenabled::text, ',' ORDER BY tgname) AS s FROM pg_trigger
       WHERE tgrelid = $1::regclass AND tgfoid = 'public.outbox_capture()'::regprocedure`, [rel]);
    return rows[0]?.s ?? '';
  };
  const allDisabled = 'outbox_capture_delete=D,outbox_capture_insert=D,outbox_capture_update=D';

  // A new primary key makes the event trigger re-create the triggers (new arguments): still disabled.
  await db.query('ALTER TABLE tenant_x.kept DROP CONSTRAINT kept_pkey, ADD PRIMARY KEY (id, v)');
  t.equal(await states('tenant_x.kept'), allDisabled, 'a changed key keeps the exclusion');
  // The key lost, then a new one: the disabled triggers wait, and come back disabled.
  await db.query('ALTER TABLE tenant_x.gone DROP CONSTRAINT gone_pkey');
  t.equal(await states('tenant_x.gone'), allDisabled, 'no key: the disabled triggers stay');
  const keyless = (JSON.parse((await runCli(['triggers', 'list', '--json'], env)).stdout) as { tables: Array<{ table: string; note: string }> }).tables;
  t.match(keyless.find((x) => x.table === 'gone'), { note: /^capture disabled; no primary key: add one, then "triggers install --schema tenant_x --table gone" enables it$/ },
    'list says what including it again takes');
  const removeAgain = await runCli(['triggers', 'remove', '--schema', 'tenant_x', '--table', 'gone', '--json'], env);
  t.same(JSON.parse(removeAgain.stdout), { removed: [], disabled: [{ schema: 'tenant_x', table: 'gone' }], skipped: [], schemas: [] }, 'removing it again: still excluded');
  await db.query('ALTER TABLE tenant_x.gone ADD PRIMARY KEY (v)');
  t.equal(await states('tenant_x.gone'), allDisabled, 'a key again: still excluded');
  // One of an excluded table's triggers dropped by hand: the next ALTER TABLE re-creates it disabled.
  await db.query('DROP TRIGGER outbox_capture_update ON tenant_x.kept; ALTER TABLE tenant_x.kept ADD COLUMN w text');
  t.equal(await states('tenant_x.kept'), allDisabled, 'a missing trigger of an excluded table comes back disabled');

  // One trigger disabled by hand is not an exclusion: the rest keep capturing, a re-install keeps it.
  await db.query('ALTER TABLE tenant_x.part DISABLE TRIGGER outbox_capture_update');
  await db.query('ALTER TABLE tenant_x.part DROP CONSTRAINT part_pkey, ADD PRIMARY KEY (id, v)');
  t.equal(await states('tenant_x.part'), 'outbox_capture_delete=O,outbox_capture_insert=O,outbox_capture_update=D',
    'a re-created trigger keeps the state it had');
  const again = await runCli(['triggers', 'install', '--schema', 'tenant_x'], env);
  t.equal(again.code, 0, again.stderr);
  t.match(again.stdout, /skipped\s+tenant_x\.kept: capture disabled/, 'the excluded table is skipped');
  t.match(again.stdout, /^captured\s+tenant_x\.part \(partly: 1 of 3 triggers disabled by ALTER TABLE \.\.\. DISABLE TRIGGER; "triggers install --schema tenant_x --table part" enables them\)$/m,
    'a table with one trigger disabled by hand is not reported as excluded, nor as fully captured');
  t.match(again.stderr, /tenant_x\.part is only partly captured: 1 of its 3 capture triggers are disabled/, 'and a warning says so');
  t.notMatch(again.stderr, /tenant_x\.kept is only partly/, 'an excluded table is not partly captured');
  const againJson = JSON.parse((await runCli(['triggers', 'install', '--schema', 'tenant_x', '--json'], env)).stdout) as { partlyDisabled: unknown[] };
  t.same(againJson.partlyDisabled, [{ schema: 'tenant_x', table: 'part', disabled: 1, triggers: 3 }], 'JSON names it under partlyDisabled');
  const listed = (JSON.parse((await runCli(['triggers', 'list', '--json'], env)).stdout) as { tables: Array<{ table: string; captured: boolean; note: string }> }).tables;
  t.match(listed.find((x) => x.table === 'part'), { captured: false, note: /capture partly disabled \(1 of 3 triggers/ }, 'list says partly disabled');
  t.match(listed.find((x) => x.table === 'gone'), { captured: false, note: /^capture disabled/ }, 'list says disabled');

  await db.query(`INSERT INTO tenant_x.kept VALUES (1, 'a'); INSERT INTO tenant_x.gone VALUES (1, 'a');
    INSERT INTO tenant_x.part VALUES (1, 'a'); UPDATE tenant_x.part SET id = 1 WHERE id = 1`);
  const { rows } = await db.query<{ event_type: string }>('SELECT event_type FROM public.outbox_events ORDER BY id');
  t.same(rows.map((r) => r.event_type), ['part_insert'], 'only the enabled trigger captured');

  // A table without a key has no triggers to disable: say so rather than "nothing was captured".
  await db.query('CREATE TABLE tenant_x.nokey (v text)');
  const rmKeyless = await runCli(['triggers', 'remove', '--schema', 'tenant_x', '--table', 'nokey'], env);
  t.equal(rmKeyless.code, 0, rmKeyless.stderr);
  t.match(rmKeyless.stdout, /^not excluded: tenant_x\.nokey: no primary key, so not captured now; it will be once it has one: run this again after adding the key$/m, 'a table without a key: what to do');

  // Installing by name includes the table again: every trigger enabled.
  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_x', '--table', 'kept'], env)).code, 0);
  t.equal(await states('tenant_x.kept'), 'outbox_capture_delete=O,outbox_capture_insert=O,outbox_capture_update=O', 'install by name enables');
});

t.test('subscriptions add warns when every capture trigger of the tenant is disabled', async (t) => {
  const db = await freshDatabase(t);
  await db.query(`CREATE SCHEMA tenant_d; CREATE TABLE tenant_d.one (id integer PRIMARY KEY)`);
  const env = { DATABASE_URL: db.url };
  t.equal((await runCli(['triggers', 'install', '--schema', 'tenant_d', '--table', 'one'], env)).code, 0);
  await db.query('ALTER TABLE tenant_d.one DISABLE TRIGGER ALL');
  const added = await runCli(['subscriptions', 'add', '--tenant', 'tenant_d', '--user', '1', '--url', 'https://example.com/hook'], env);
  t.equal(added.code, 0, added.stderr);
  t.match(added.stderr, /nothing in schema "tenant_d" is captured/, 'disabled triggers do not count as capture');
  await db.query('ALTER TABLE tenant_d.one ENABLE TRIGGER ALL');
  const second = await runCli(['subscriptions', 'add', '--tenant', 'tenant_d', '--user', '2', '--url', 'https://example.com/hook'], env);
  t.equal(second.code, 0, second.stderr);
  t.notMatch(second.stderr, /is captured/, 'enabled triggers do');
});

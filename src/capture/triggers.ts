/**
 * Installs, removes and lists the capture triggers (the SQL lives in sql/003_capture.sql; this module
 * validates names, resolves "all tables of a schema" and reports what happened).
 */
import type pg from 'pg';
import { UsageError } from '../errors.js';
import { assertIdentifier, identifierProblem } from './identifiers.js';

export interface TableRef {
  schema: string;
  table: string;
}

export interface InstallReport {
  installed: TableRef[];
  /** Tables left alone, with the reason (no primary key, partition, odd name). */
  skipped: Array<TableRef & { reason: string }>;
  /** Schemas now captured as a whole (new tables included). */
  schemas: string[];
  /**
   * Installed tables of a whole-schema install with some (not all) capture triggers disabled by hand
   * (ALTER TABLE ... DISABLE TRIGGER): a non-strict install leaves them so; an install by name enables them.
   */
  partlyDisabled: Array<TableRef & { disabled: number; triggers: number }>;
}

/** The warning for a database without the event trigger (it needs a superuser to install). */
export const NO_AUTO_CAPTURE_WARNING =
  'tables created later are NOT captured automatically (the event trigger needs a superuser to install: run "outbox-relay migrate" once as a superuser); until then re-run "triggers install" after creating tables';

/** Whether the event trigger that captures tables created later in captured schemas is installed and enabled. */
export async function autoCaptureInstalled(client: pg.ClientBase): Promise<boolean> {
  const evt = await client.query(`SELECT 1 FROM pg_event_trigger WHERE evtname = 'outbox_capture_new_tables' AND evtenabled <> 'D'`);
  return (evt.rowCount ?? 0) > 0;
}

/** Base tables of a schema (partitioned parents included, partitions not). */
const SELECT_SCHEMA_TABLES = `
SELECT c.relname::text AS table
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname`;

/** Tenant schemas: everything but system schemas and public. */
const SELECT_TENANT_SCHEMAS = `
SELECT n.nspname::text AS schema
FROM pg_namespace AS n
WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname NOT IN ('information_schema', 'public')
  AND NOT (n.nspname = ANY ($1::text[]))
ORDER BY n.nspname`;

const SCHEMA_EXISTS = 'SELECT 1 FROM pg_namespace WHERE nspname = $1';

/** Has a primary key? (checked before install, so we can report instead of failing the batch). */
const HAS_PRIMARY_KEY = `
SELECT EXISTS (
  SELECT 1 FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace
  WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary) AS has_pk`;

const TABLE_KIND = `
SELECT c.relkind::text AS kind FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2`;

/**
 * $3 strict: re-create disabled triggers too. An install by table name is; a whole-schema install is
 * not, so that it keeps the tables excluded by `triggers remove --table` (their triggers disabled).
 */
const INSTALL = 'SELECT public.outbox_install_capture($1, $2, $3) AS installed';
/**
 * Whether a table is excluded: it has capture triggers and all of them are disabled. One trigger
 * disabled by hand (ALTER TABLE ... DISABLE TRIGGER outbox_capture_update) is not an exclusion.
 */
const EXCLUDED = `
SELECT coalesce(bool_and(t.tgenabled = 'D'), false) AS excluded
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND t.tgfoid = 'public.outbox_capture()'::regprocedure`;
const SCHEMA_CAPTURED = 'SELECT public.outbox_schema_is_captured($1) AS captured';
/** How many of a table's capture triggers there are, and how many are disabled. */
const TRIGGER_STATES = `
SELECT count(*)::int AS triggers, count(*) FILTER (WHERE t.tgenabled = 'D')::int AS disabled
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND t.tgfoid = 'public.outbox_capture()'::regprocedure`;
/**
 * Excludes one table of a schema captured as a whole: its triggers stay, disabled, because the DDL
 * event trigger re-creates missing ones at the next ALTER TABLE but leaves disabled ones alone.
 * The statement is built by format('%I'), never by hand.
 */
const DISABLE_DDL = `SELECT format('ALTER TABLE %I.%I DISABLE TRIGGER outbox_capture_insert, DISABLE TRIGGER outbox_capture_update, DISABLE TRIGGER outbox_capture_delete', $1::text, $2::text) AS ddl`;
const IS_OWN_TABLE = 'SELECT public.outbox_is_own_table($1, $2) AS own';
const REMOVE = 'SELECT public.outbox_remove_capture($1, $2) AS removed';
const REGISTER_SCHEMA = 'INSERT INTO public.outbox_capture_schemas (schema_name) VALUES ($1) ON CONFLICT DO NOTHING';
const UNREGISTER_SCHEMA = 'DELETE FROM public.outbox_capture_schemas WHERE schema_name = $1';
/** A schema captured (or no longer captured) by name is taken off (or put on) the --all-schemas exclusions. */
const UNEXCLUDE_SCHEMA = `
UPDATE public.outbox_capture_settings SET excluded_schemas = array_remove(excluded_schemas, $1), updated_at = now()
WHERE $1 = ANY (excluded_schemas)`;
const EXCLUDE_SCHEMA = `
UPDATE public.outbox_capture_settings SET excluded_schemas = array_append(excluded_schemas, $1), updated_at = now()
WHERE all_schemas AND NOT ($1 = ANY (excluded_schemas))`;
const SET_ALL_SCHEMAS = `
UPDATE public.outbox_capture_settings SET all_schemas = $1, excluded_schemas = $2::text[], updated_at = now()`;

async function inTransaction<T>(client: pg.ClientBase, fn: () => Promise<T>): Promise<T> {
  await client.query('BEGIN');
  try {
    const out = await fn();
    await client.query('COMMIT');
    return out;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

async function assertSchemaExists(client: pg.ClientBase, schema: string): Promise<void> {
  const { rowCount } = await client.query(SCHEMA_EXISTS, [schema]);
  if (!rowCount) throw new UsageError(`schema "${schema}" does not exist`);
}

async function schemaTables(client: pg.ClientBase, schema: string): Promise<string[]> {
  const { rows } = await client.query<{ table: string }>(SELECT_SCHEMA_TABLES, [schema]);
  return rows.map((r) => r.table);
}

/**
 * Installs capture on the named tables of a schema, or on all its tables (and, then, on tables created
 * there later). Named tables must exist and have a primary key; with no tables named, tables without
 * a key are reported as skipped. All or nothing: one transaction.
 */
export async function installSchema(client: pg.ClientBase, schema: string, tables: readonly string[] = []): Promise<InstallReport> {
  assertIdentifier('schema', schema);
  if (schema.startsWith('pg_') || schema === 'information_schema') throw new UsageError(`${schema} is a system schema; its tables cannot be captured`);
  tables.forEach((t) => assertIdentifier('table', t));
  return inTransaction(client, async () => {
    await assertSchemaExists(client, schema);
    const report: InstallReport = { installed: [], skipped: [], schemas: [], partlyDisabled: [] };
    await installTables(client, schema, tables, report);
    return report;
  });
}

async function installTables(client: pg.ClientBase, schema: string, tables: readonly string[], report: InstallReport): Promise<void> {
  const wholeSchema = tables.length === 0;
  const names = wholeSchema ? await schemaTables(client, schema) : tables;
  for (const table of names) {
    if (!wholeSchema) {
      const { rows } = await client.query<{ kind: string }>(TABLE_KIND, [schema, table]);
      const kind = rows[0]?.kind;
      if (!kind) throw new UsageError(`table ${schema}.${table} does not exist`);
      if (kind !== 'r' && kind !== 'p') throw new UsageError(`${schema}.${table} is not a table (a view or sequence cannot be captured)`);
    } else {
      const problem = identifierProblem(table);
      if (problem) {
        report.skipped.push({ schema, table, reason: `name ${problem}` });
        continue;
      }
    }
    const own = await client.query<{ own: boolean }>(IS_OWN_TABLE, [schema, table]);
    if (own.rows[0]?.own) {
      // A capture trigger on outbox_events would capture its own inserts, endlessly.
      if (!wholeSchema) throw new UsageError(`${schema}.${table} is a table of outbox-relay itself and cannot be captured`);
      report.skipped.push({ schema, table, reason: 'outbox-relay\'s own table' });
      continue;
    }
    if (wholeSchema && (await client.query<{ excluded: boolean }>(EXCLUDED, [schema, table])).rows[0]?.excluded) {
      report.skipped.push({ schema, table, reason: `capture disabled (triggers remove --table); "triggers install --schema ${schema} --table ${table}" enables it` });
      continue;
    }
    const { rows } = await client.query<{ has_pk: boolean }>(HAS_PRIMARY_KEY, [schema, table]);
    if (!rows[0]?.has_pk) {
      if (!wholeSchema) throw new UsageError(`table ${schema}.${table} has no primary key; add one before capturing it (events are keyed by the row's primary key)`);
      report.skipped.push({ schema, table, reason: 'no primary key' });
      continue;
    }
    const res = await client.query<{ installed: boolean }>(INSTALL, [schema, table, !wholeSchema]);
    if (!res.rows[0]?.installed) {
      report.skipped.push({ schema, table, reason: 'partition (captured through its parent)' });
      continue;
    }
    report.installed.push({ schema, table });
    if (wholeSchema) {
      const states = (await client.query<{ triggers: number; disabled: number }>(TRIGGER_STATES, [schema, table])).rows[0];
      if (states && states.disabled > 0) report.partlyDisabled.push({ schema, table, disabled: states.disabled, triggers: states.triggers });
    }
  }
  if (wholeSchema) {
    await client.query(REGISTER_SCHEMA, [schema]);
    await client.query(UNEXCLUDE_SCHEMA, [schema]);
    report.schemas.push(schema);
  }
}

/** Installs capture on every tenant schema (all but system schemas, public and `exclude`), now and later. */
export async function installAllSchemas(client: pg.ClientBase, exclude: readonly string[] = []): Promise<InstallReport> {
  exclude.forEach((s) => assertIdentifier('schema', s));
  return inTransaction(client, async () => {
    const { rows } = await client.query<{ schema: string }>(SELECT_TENANT_SCHEMAS, [exclude]);
    const report: InstallReport = { installed: [], skipped: [], schemas: [], partlyDisabled: [] };
    for (const { schema } of rows) {
      const problem = identifierProblem(schema);
      if (problem) {
        report.skipped.push({ schema, table: '*', reason: `schema name ${problem}` });
        continue;
      }
      await installTables(client, schema, [], report);
    }
    await client.query(SET_ALL_SCHEMAS, [true, exclude]);
    return report;
  });
}

export interface RemoveReport {
  removed: TableRef[];
  /** Tables of a schema captured as a whole, excluded: their triggers disabled, so that they stay off. */
  disabled: TableRef[];
  /** Named tables that could not be excluded, with the reason. */
  skipped: Array<TableRef & { reason: string }>;
  schemas: string[];
}

/**
 * Removes capture from the named tables, or from a whole schema (which also stops auto-capture there).
 * A named table of a schema captured as a whole is excluded instead: removed triggers would come back
 * at its next ALTER TABLE (the DDL event trigger), disabled ones stay as they are.
 */
export async function removeSchema(client: pg.ClientBase, schema: string, tables: readonly string[] = []): Promise<RemoveReport> {
  assertIdentifier('schema', schema);
  tables.forEach((t) => assertIdentifier('table', t));
  return inTransaction(client, async () => {
    await assertSchemaExists(client, schema);
    const report: RemoveReport = { removed: [], disabled: [], skipped: [], schemas: [] };
    const names = tables.length === 0 ? await schemaTables(client, schema) : tables;
    const wholeSchemaCaptured = tables.length > 0 && Boolean((await client.query<{ captured: boolean }>(SCHEMA_CAPTURED, [schema])).rows[0]?.captured);
    for (const table of names) {
      if (tables.length > 0) {
        const { rows } = await client.query<{ kind: string }>(TABLE_KIND, [schema, table]);
        if (!rows[0]) throw new UsageError(`table ${schema}.${table} does not exist`);
      }
      if (wholeSchemaCaptured) {
        // Non-strict: creates the triggers if missing, leaves them as they are otherwise (false: a
        // partition, captured through its parent, or no primary key).
        const ok = await client.query<{ installed: boolean }>(INSTALL, [schema, table, false]);
        if (ok.rows[0]?.installed) {
          const { rows } = await client.query<{ ddl: string }>(DISABLE_DDL, [schema, table]);
          await client.query(rows[0]?.ddl as string);
          report.disabled.push({ schema, table });
        } else if ((await client.query<{ excluded: boolean }>(EXCLUDED, [schema, table])).rows[0]?.excluded) {
          // Excluded before it lost its key: its disabled triggers keep the exclusion (sql/021).
          report.disabled.push({ schema, table });
        } else if (!(await client.query<{ has_pk: boolean }>(HAS_PRIMARY_KEY, [schema, table])).rows[0]?.has_pk) {
          // Nothing to disable: the table would be captured once it has a key.
          report.skipped.push({ schema, table, reason: 'no primary key, so not captured now; it will be once it has one: run this again after adding the key' });
        } else {
          report.skipped.push({ schema, table, reason: 'a partition: captured through its parent; exclude the parent' });
        }
        continue;
      }
      const res = await client.query<{ removed: boolean }>(REMOVE, [schema, table]);
      if (res.rows[0]?.removed) report.removed.push({ schema, table });
    }
    if (tables.length === 0) {
      await client.query(UNREGISTER_SCHEMA, [schema]);
      // With --all-schemas on, the schema would otherwise still be captured as a whole: new tables
      // there would get triggers again. Removing it by name excludes it.
      await client.query(EXCLUDE_SCHEMA, [schema]);
      report.schemas.push(schema);
    }
    return report;
  });
}

/** Removes capture everywhere and turns off --all-schemas. */
export async function removeAll(client: pg.ClientBase): Promise<RemoveReport> {
  return inTransaction(client, async () => {
    const { rows } = await client.query<TableRef>(SELECT_CAPTURED);
    const report: RemoveReport = { removed: [], disabled: [], skipped: [], schemas: [] };
    for (const r of rows) {
      await client.query(REMOVE, [r.schema, r.table]);
      report.removed.push({ schema: r.schema, table: r.table });
    }
    const del = await client.query<{ schema_name: string }>('DELETE FROM public.outbox_capture_schemas RETURNING schema_name');
    report.schemas.push(...del.rows.map((r) => r.schema_name));
    await client.query(SET_ALL_SCHEMAS, [false, []]);
    return report;
  });
}

/** Tables carrying our capture triggers. */
const SELECT_CAPTURED = `
SELECT DISTINCT n.nspname::text AS schema, c.relname::text AS table
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE t.tgfoid = 'public.outbox_capture()'::regprocedure
ORDER BY 1, 2`;

/**
 * Every table that is captured or should be: tables with our triggers, plus every table of a schema
 * captured as a whole (a table there without triggers is reported with the reason).
 */
const SELECT_CAPTURE_LIST = `
WITH captured_schemas AS (
  SELECT n.nspname::text AS schema FROM pg_namespace AS n WHERE public.outbox_schema_is_captured(n.nspname::text)
),
tables AS (
  SELECT n.nspname::text AS schema, c.relname::text AS table,
         (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgfoid = 'public.outbox_capture()'::regprocedure) AS triggers,
         (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgfoid = 'public.outbox_capture()'::regprocedure AND t.tgenabled = 'D') AS disabled,
         -- A parent in table inheritance (not partitioning): see README, Capture.
         EXISTS (SELECT 1 FROM pg_inherits AS i JOIN pg_class AS k ON k.oid = i.inhrelid WHERE i.inhparent = c.oid AND NOT k.relispartition) AS inheritance_parent,
         -- The primary key's columns in key order (NULL: no primary key).
         (SELECT array_agg(a.attname::text ORDER BY k.ord)
          FROM pg_index AS i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          WHERE i.indrelid = c.oid AND i.indisprimary) AS key_columns,
         n.nspname IN (SELECT schema FROM captured_schemas) AS schema_captured,
         c.oid
  FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
)
SELECT schema, "table", key_columns IS NOT NULL AS has_pk, triggers::int AS triggers, disabled::int AS disabled, inheritance_parent, schema_captured, key_columns,
       -- Triggers whose arguments (the key columns, as pg_trigger.tgargs encodes them: each name
       -- followed by a zero byte) no longer name the table's primary key.
       (SELECT count(*) FROM pg_trigger t
        WHERE t.tgrelid = tables.oid AND t.tgfoid = 'public.outbox_capture()'::regprocedure
          AND t.tgargs IS DISTINCT FROM (
              SELECT string_agg(convert_to(u.k, pg_catalog.getdatabaseencoding()) || decode('00', 'hex'), ''::bytea ORDER BY u.o)
              FROM unnest(key_columns) WITH ORDINALITY AS u(k, o)))::int AS stale
FROM tables
-- outbox-relay's own tables are never captured (install refuses them): not listed as waiting for it.
WHERE (triggers > 0 OR schema_captured) AND NOT public.outbox_is_own_table(schema, "table")
ORDER BY schema, "table"`;

export interface CaptureListing {
  tables: Array<TableRef & { captured: boolean; keyColumns: string[]; note: string }>;
  schemas: string[];
  allSchemas: { enabled: boolean; excluded: string[] };
  /** Whether tables created later are captured automatically (needs the event trigger). */
  autoCapture: boolean;
}

/** What is captured, per table, and whether new tables will be. */
export async function listCapture(client: pg.ClientBase): Promise<CaptureListing> {
  const { rows } = await client.query<{
    schema: string; table: string; has_pk: boolean; triggers: number; disabled: number; inheritance_parent: boolean; stale: number; schema_captured: boolean; key_columns: string[] | null;
  }>(SELECT_CAPTURE_LIST);
  const schemas = await client.query<{ schema_name: string }>('SELECT schema_name FROM public.outbox_capture_schemas ORDER BY 1');
  const settings = await client.query<{ all_schemas: boolean; excluded_schemas: string[] }>(
    'SELECT all_schemas, excluded_schemas FROM public.outbox_capture_settings',
  );
  const autoCapture = await autoCaptureInstalled(client);
  return {
    tables: rows.map((r) => {
      const captured = r.triggers === 3 && r.disabled === 0;
      let note = '';
      if (r.disabled > 0 && r.disabled === r.triggers) {
        note = r.has_pk
          ? `capture disabled: "triggers install --schema ${r.schema} --table ${r.table}" enables it`
          : `capture disabled; no primary key: add one, then "triggers install --schema ${r.schema} --table ${r.table}" enables it`;
      }
      else if (r.disabled > 0) note = `capture partly disabled (${r.disabled} of ${r.triggers} triggers, by ALTER TABLE ... DISABLE TRIGGER): "triggers install --schema ${r.schema} --table ${r.table}" enables them`;
      else if (!captured) note = !r.has_pk ? 'not captured: no primary key' : r.triggers > 0 ? 'partially captured: re-run triggers install' : 'not captured yet: run triggers install';
      // Still capturing, but naming key columns the table no longer has (changed while no event
      // trigger re-installed capture): events would carry an empty aggregate id.
      else if (r.stale > 0) note = 'the primary key changed since install: re-run triggers install';
      // Its statements reach the children's rows, whose keys may repeat the parent's: an UPDATE
      // through it can pair old and new rows wrongly (README, Capture: exclude it, capture the children).
      else if (r.inheritance_parent) note = `has inheritance children: exclude it ("triggers remove --schema ${r.schema} --table ${r.table}") and capture the children`;
      return { schema: r.schema, table: r.table, captured, keyColumns: r.key_columns ?? [], note };
    }),
    schemas: schemas.rows.map((r) => r.schema_name),
    allSchemas: { enabled: settings.rows[0]?.all_schemas ?? false, excluded: settings.rows[0]?.excluded_schemas ?? [] },
    autoCapture,
  };
}

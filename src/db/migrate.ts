/**
 * Applies the numbered SQL files of `sql/` in order, each in its own transaction, recorded in
 * `public.outbox_relay_migrations`. A session advisory lock serializes concurrent runs, so every
 * replica may run `migrate` at start: one applies, the others wait and find nothing left to do.
 */
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type pg from 'pg';
import { OutboxError } from '../errors.js';

/** Key of the advisory lock that serializes migrations (any constant unlikely to collide). */
export const MIGRATION_LOCK_KEY = 7_411_201_001n;

/** Where the package's SQL files live (../../sql from both src/db and dist/db). */
export const SQL_DIR = fileURLToPath(new URL('../../sql/', import.meta.url));

export interface Migration {
  version: number;
  name: string;
  sql: string;
  checksum: string;
}

export interface MigrationResult {
  applied: Array<{ version: number; name: string }>;
  alreadyApplied: number;
}

const FILE_PATTERN = /^(\d{3,})_([a-z0-9_]+)\.sql$/;

/** A migration as its file is named (001_outbox_core), so messages point at the file. */
export const label = (m: { version: number; name: string }): string => `${String(m.version).padStart(3, '0')}_${m.name}`;

/** The migrations shipped with this package, in order. */
export function loadMigrations(dir: string = SQL_DIR): Migration[] {
  const files = readdirSync(dir).filter((f) => f.endsWith('.sql')).sort();
  const out: Migration[] = [];
  for (const file of files) {
    const m = FILE_PATTERN.exec(file);
    if (!m || !m[1] || !m[2]) throw new OutboxError(`unexpected file in ${dir}: ${file} (expected NNN_name.sql)`, 'E_MIGRATION');
    const sql = readFileSync(`${dir}/${file}`, 'utf8');
    out.push({ version: Number(m[1]), name: m[2], sql, checksum: createHash('sha256').update(sql).digest('hex') });
  }
  out.forEach((mig, i) => {
    if (mig.version !== i + 1) throw new OutboxError(`migration numbering has a gap or duplicate at ${mig.version}_${mig.name}`, 'E_MIGRATION');
  });
  return out;
}

/** Creates the bookkeeping table; only ever called while holding the migration lock. */
const CREATE_MIGRATIONS_TABLE = `
CREATE TABLE IF NOT EXISTS public.outbox_relay_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)`;

/** Which versions are applied, with their checksums. */
const SELECT_APPLIED = 'SELECT version, name, checksum FROM public.outbox_relay_migrations ORDER BY version';

/** Records one applied migration (inside the migration's own transaction). */
const INSERT_APPLIED = 'INSERT INTO public.outbox_relay_migrations (version, name, checksum) VALUES ($1, $2, $3)';

/**
 * Applies every pending migration. Uses one dedicated client for the lock and the transactions.
 * Refuses to run when an applied migration's file has changed since (its checksum differs).
 */
export async function migrate(client: pg.ClientBase, migrations: Migration[] = loadMigrations()): Promise<MigrationResult> {
  await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_KEY.toString()]);
  try {
    // Only when missing: CREATE ... IF NOT EXISTS needs CREATE on the schema even when the table
    // exists, and a relay role without it may still run `migrate` (or `run --migrate`) on a current
    // database, as every replica may at start.
    const exists = await client.query<{ t: string | null }>("SELECT to_regclass('public.outbox_relay_migrations')::text AS t");
    if (!exists.rows[0]?.t) await client.query(CREATE_MIGRATIONS_TABLE);
    const { rows } = await client.query<{ version: number; name: string; checksum: string }>(SELECT_APPLIED);
    const applied = new Map(rows.map((r) => [r.version, r]));
    const known = new Set(migrations.map((m) => m.version));
    const unknown = rows.filter((r) => !known.has(r.version));
    if (unknown.length > 0) {
      throw new OutboxError(
        `the database has migration ${unknown.map(label).join(', ')} that this version of outbox-relay does not know; run a newer outbox-relay`,
        'E_MIGRATION',
      );
    }
    for (const m of migrations) {
      const done = applied.get(m.version);
      if (done && done.checksum !== m.checksum) {
        throw new OutboxError(`migration ${label(m)} was changed after it was applied (checksum differs); restore the original file`, 'E_MIGRATION');
      }
    }
    const result: MigrationResult = { applied: [], alreadyApplied: applied.size };
    for (const m of migrations) {
      if (applied.has(m.version)) continue;
      await client.query('BEGIN');
      try {
        await client.query(m.sql);
        await client.query(INSERT_APPLIED, [m.version, m.name, m.checksum]);
        await client.query('COMMIT');
      } catch (err) {
        await client.query('ROLLBACK').catch(() => undefined);
        const msg = err instanceof Error ? err.message : String(err);
        throw new OutboxError(`migration ${label(m)} failed and was rolled back: ${msg}`, 'E_MIGRATION', 1, { cause: err });
      }
      result.applied.push({ version: m.version, name: m.name });
    }
    return result;
  } finally {
    await client.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK_KEY.toString()]).catch(() => undefined);
  }
}

/** Versions applied so far (empty when the database was never migrated). */
export async function appliedVersions(client: pg.ClientBase): Promise<number[]> {
  const { rows } = await client.query<{ version: number }>(
    `SELECT version FROM public.outbox_relay_migrations ORDER BY version`,
  ).catch((err: { code?: string }) => {
    if (err.code === '42P01') return { rows: [] as Array<{ version: number }> };
    throw err;
  });
  return rows.map((r) => r.version);
}

/**
 * The error for a schema behind this version's migrations (none when it is current): the same
 * words for `run` (src/daemon/schemaCheck.ts) and for every command (src/cli/requireSchema.ts).
 */
export function missingMigrationsError(expected: readonly Migration[], applied: readonly number[], hint = 'run "outbox-relay migrate"'): OutboxError | undefined {
  const missing = expected.filter((m) => !applied.includes(m.version));
  if (missing.length === 0) return undefined;
  return new OutboxError(
    `the database schema is missing migration${missing.length > 1 ? 's' : ''} ${missing.map(label).join(', ')} of this version; ${hint}`,
    'E_NOT_MIGRATED',
  );
}

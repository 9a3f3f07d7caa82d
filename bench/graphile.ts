/**
 * Setting up the graphile-worker peer in its own database: its migrations, jobs carrying the same
 * event body our relay sends (bulk through graphile_worker.add_jobs, its documented batch path), and
 * for latency a row trigger that calls graphile_worker.add_job per row (its documented way to enqueue
 * from the database).
 */
import gw from 'graphile-worker';
import type pg from 'pg';
import { throwIfCancelled } from './lifecycle.js';
import { rowDataSql } from './workload.js';

const quietLogger = new gw.Logger(() => (level, message) => {
  if (level === 'error') process.stderr.write(`graphile-worker (setup): ${message}\n`);
});

export const GRAPHILE_VERSION_RANGE = '0.16';

export async function graphileVersion(): Promise<string> {
  const { createRequire } = await import('node:module');
  const require = createRequire(import.meta.url);
  return (require('graphile-worker/package.json') as { version: string }).version;
}

export async function installGraphile(url: string): Promise<void> {
  await gw.runMigrations({ connectionString: url, logger: quietLogger });
}

/** The webhook body our relay would send for row `rowExpr` (a json row) with id `idExpr`. */
function eventJson(tenant: string, idExpr: string, rowJson: string): string {
  const lit = `'${tenant.replace(/'/g, "''")}'`;
  return `json_build_object(
    'id', (${idExpr})::text, 'tenant', ${lit}, 'event_type', 'items_insert', 'aggregate_id', (${idExpr})::text, 'aggregate_type', 'items',
    'payload', json_build_object('operation', 'INSERT', 'table', 'items', 'schema', ${lit}, 'timestamp', now(),
                                 'old_data', NULL, 'new_data', ${rowJson}, 'changed_fields', NULL),
    'created_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))`;
}

const JOB_CHUNK = 5_000;

/** Queues `count` jobs for rows first.. in chunks through graphile_worker.add_jobs; returns jobs/s. */
export async function addJobsBulk(pool: pg.Pool, tenant: string, first: number, count: number): Promise<number> {
  const t0 = performance.now();
  for (let from = first; from < first + count; from += JOB_CHUNK) {
    throwIfCancelled();
    const to = Math.min(first + count - 1, from + JOB_CHUNK - 1);
    await pool.query(
      `SELECT count(*) FROM graphile_worker.add_jobs((
         SELECT array_agg(ROW('post', ${eventJson(tenant, 'g', `json_build_object('id', g, 'data', ${rowDataSql('g')}, 'seq', 0)`)},
                              NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec ORDER BY g)
         FROM generate_series($1::bigint, $2::bigint) AS g))`,
      [from, to],
    );
  }
  return count / ((performance.now() - t0) / 1000);
}

/** A row trigger on <tenant>.items that enqueues one `post` job per inserted row. */
export async function installEnqueueTrigger(pool: pg.Pool, tenant: string): Promise<void> {
  const t = `"${tenant.replace(/"/g, '""')}"`;
  await pool.query(`
    CREATE FUNCTION ${t}.enqueue_webhook() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
      PERFORM graphile_worker.add_job('post', ${eventJson(tenant, 'NEW.id', 'to_json(NEW)')});
      RETURN NULL;
    END
    $fn$;
    CREATE TRIGGER enqueue_webhook AFTER INSERT ON ${t}.items FOR EACH ROW EXECUTE FUNCTION ${t}.enqueue_webhook();
  `);
}

export async function pendingJobs(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: string }>('SELECT count(*) AS n FROM graphile_worker.jobs');
  return Number(rows[0]?.n ?? 0);
}

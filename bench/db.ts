/**
 * The PostgreSQL the benchmark runs against: BENCH_DATABASE_URL (a server on which each section
 * creates and drops its own database), or else an embedded PostgreSQL with default, durable settings
 * started for this run. Every database created here is dropped at the end, even on failure.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { startEmbeddedPostgres } from '../src/db/embeddedPostgres.js';
import { loadMigrations, migrate } from '../src/db/migrate.js';
import { note, onCleanup } from './lifecycle.js';
import { parentPid } from './procstat.js';

/** The repository root (this file runs from build/bench/). */
export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));

export interface BenchDb {
  name: string;
  url: string;
  /** A small pool for the section's own setup and checks (writers open their own connections). */
  pool: pg.Pool;
  drop(): Promise<void>;
}

export interface DbServer {
  kind: 'external' | 'embedded';
  version: string;
  settings: Record<string, string>;
  /** The postmaster's pid when the server runs on this machine (for CPU accounting), else null. */
  postmasterPid: number | null;
  /** A fresh database, migrated unless `migrated` is false; dropped at the end of the run at the latest. */
  createDatabase(label: string, options?: { migrated?: boolean }): Promise<BenchDb>;
}

function withDatabase(url: string, name: string): string {
  const u = new URL(url);
  u.pathname = `/${name}`;
  return u.toString();
}

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined);
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

function isLocal(url: string): boolean {
  const host = new URL(url).hostname.replace(/^\[|\]$/g, '');
  return host === '' || host === 'localhost' || host === '::1' || host.startsWith('127.');
}

function commOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

const runId = `${process.pid.toString(36)}${randomBytes(2).toString('hex')}`;

export async function openServer(benchUrl: string | undefined): Promise<DbServer> {
  let adminUrl = benchUrl;
  let kind: DbServer['kind'] = 'external';
  if (!adminUrl) {
    note('starting an embedded PostgreSQL (durable default settings; BENCH_DATABASE_URL selects another server)');
    const server = await startEmbeddedPostgres({});
    onCleanup('embedded PostgreSQL', () => server.destroy());
    adminUrl = server.url;
    kind = 'embedded';
  }
  const admin = adminUrl;
  const facts = await withClient(admin, async (c) => {
    const { rows } = await c.query<{ name: string; setting: string }>(
      `SELECT name, current_setting(name) AS setting FROM pg_settings
       WHERE name IN ('server_version', 'fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'max_connections', 'max_wal_size', 'wal_level')`,
    );
    // The postmaster is our backend's parent (read while the backend is still there).
    const pid = (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid;
    const ppid = pid && isLocal(admin) ? parentPid(pid) : undefined;
    return { settings: Object.fromEntries(rows.map((r) => [r.name, r.setting])), postmasterPid: ppid && commOf(ppid).startsWith('postgres') ? ppid : null };
  });
  const postmasterPid = facts.postmasterPid;
  const { server_version: version = 'unknown', ...settings } = facts.settings;
  return {
    kind,
    version,
    settings,
    postmasterPid,
    async createDatabase(label, options = {}) {
      const name = `outbox_bench_${label}_${runId}`.toLowerCase().replace(/[^a-z0-9_]/g, '_').slice(0, 63);
      await withClient(admin, (c) => c.query(`CREATE DATABASE ${c.escapeIdentifier(name)}`));
      const url = withDatabase(admin, name);
      const pool = new pg.Pool({ connectionString: url, max: 6 });
      pool.on('error', () => undefined);
      const drop = onCleanup(`database ${name}`, async () => {
        await pool.end().catch(() => undefined);
        await withClient(admin, (c) => c.query(`DROP DATABASE IF EXISTS ${c.escapeIdentifier(name)} WITH (FORCE)`));
      });
      if (options.migrated !== false) {
        await withClient(url, (c) => migrate(c, loadMigrations(join(REPO_ROOT, 'sql'))));
      }
      return { name, url, pool, drop };
    },
  };
}

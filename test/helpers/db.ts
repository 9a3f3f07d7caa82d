/**
 * Test databases: each test file gets its own, cloned from the template that scripts/test.mjs
 * migrated once (or created empty), and dropped when the test ends. Pools made here are closed at
 * teardown, so a leaked connection cannot keep a database alive.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';

export interface TestContext {
  teardown(fn: () => unknown): void;
}

export function adminUrl(): string {
  const url = process.env.TEST_DATABASE_URL;
  if (!url) throw new Error('TEST_DATABASE_URL is not set: run the suite with "npm test" (it starts PostgreSQL if needed)');
  return url;
}

export function databaseUrl(name: string, base = adminUrl()): string {
  const u = new URL(base);
  u.pathname = `/${name}`;
  return u.toString();
}

async function admin<T>(fn: (c: pg.Client) => Promise<T>, base = adminUrl()): Promise<T> {
  const c = new pg.Client({ connectionString: base });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

export interface TestDatabase {
  name: string;
  url: string;
  /** A pool on this database, closed at teardown. */
  pool(options?: pg.PoolConfig): pg.Pool;
  /** One query on a short-lived connection. */
  query<R extends pg.QueryResultRow = pg.QueryResultRow>(sql: string, params?: unknown[]): Promise<pg.QueryResult<R>>;
}

/**
 * A fresh database for this test: migrated (cloned from the template) unless `migrated: false`.
 * `base` points at another server (a test's own embedded PostgreSQL).
 */
export async function freshDatabase(t: TestContext, options: { migrated?: boolean; base?: string } = {}): Promise<TestDatabase> {
  const base = options.base ?? adminUrl();
  const name = `outbox_t_${process.env.OUTBOX_TEST_RUN_ID ?? 'x'}_${randomBytes(5).toString('hex')}`;
  const template = options.migrated === false ? undefined : process.env.OUTBOX_TEST_TEMPLATE;
  if (options.migrated !== false && !template) throw new Error('OUTBOX_TEST_TEMPLATE is not set: run the suite with "npm test"');
  await admin(async (c) => {
    await c.query(`CREATE DATABASE ${c.escapeIdentifier(name)}${template && !options.base ? ` TEMPLATE ${c.escapeIdentifier(template)}` : ''}`);
  }, base);
  const url = databaseUrl(name, base);
  if (template && options.base) {
    // Another server has no template: migrate this database directly.
    const { migrate } = await import('../../src/db/migrate.js');
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    await migrate(c).finally(() => c.end());
  }
  const pools: pg.Pool[] = [];
  t.teardown(async () => {
    await Promise.all(pools.map((p) => p.end().catch(() => undefined)));
    await admin((c) => c.query(`DROP DATABASE IF EXISTS ${c.escapeIdentifier(name)} WITH (FORCE)`), base).catch(() => undefined);
  });
  return {
    name,
    url,
    pool(opts = {}) {
      const p = new pg.Pool({ connectionString: url, max: 5, ...opts });
      p.on('error', () => undefined);
      pools.push(p);
      return p;
    },
    async query(sql, params) {
      const c = new pg.Client({ connectionString: url });
      await c.connect();
      try {
        return await c.query(sql, params);
      } finally {
        await c.end();
      }
    },
  };
}

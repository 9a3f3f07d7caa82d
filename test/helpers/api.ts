/**
 * Shared pieces of the pull API's tests: a database role of the sidecar's kind (unique name, dropped
 * at teardown: roles belong to the whole cluster), an ApiServer on port 0 connected as that role,
 * tokens, and a snapshot of the tables an attacker must not be able to change.
 */
import { createHmac, randomBytes } from 'node:crypto';
import pg from 'pg';
import { authSettings, mintToken } from '../../src/api/auth.js';
import { createApiRole } from '../../src/api/createRole.js';
import type { ApiQueries } from '../../src/api/eventStore.js';
import { ApiServer } from '../../src/api/server.js';
import type { CursorAdvancerOptions } from '../../src/api/cursorAdvancer.js';
import { loadConfig } from '../../src/config/load.js';
import type { Config } from '../../src/config/schema.js';
import { createLogger } from '../../src/log.js';
import { adminUrl, databaseUrl, type TestContext, type TestDatabase } from './db.js';
import { LogLines } from './logLines.js';

export { LogLines };


/** Polls `cond` until it holds; fails with `what` (and `describe()`) after `timeoutMs`. */
export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string, describe?: () => unknown): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${describe ? ` (${JSON.stringify(describe())})` : ''}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A tenant schema with two captured tables, vendors and projects (id integer primary key). */
export async function createTenant(db: TestDatabase, schema: string): Promise<void> {
  await db.query(`
    CREATE SCHEMA ${schema};
    CREATE TABLE ${schema}.vendors (id integer PRIMARY KEY, name text NOT NULL);
    CREATE TABLE ${schema}.projects (id integer PRIMARY KEY, title text NOT NULL);
    SELECT public.outbox_install_capture('${schema}', 'vendors'), public.outbox_install_capture('${schema}', 'projects');
  `);
}

export interface ApiRole {
  name: string;
  password: string;
  /** The test database's URL, logging in as this role. */
  url: string;
}

/**
 * A sidecar role in the test database, made by createApiRole as `outbox-relay api create-role` does.
 * Dropped at teardown (its privileges in the test database first).
 */
export async function createTestApiRole(t: TestContext, db: TestDatabase): Promise<ApiRole> {
  const name = `outbox_api_t_${randomBytes(6).toString('hex')}`;
  const password = randomBytes(18).toString('base64url');
  const admin = new pg.Client({ connectionString: db.url });
  await admin.connect();
  try {
    await createApiRole(admin, { name, password });
  } finally {
    await admin.end();
  }
  t.teardown(async () => {
    const c = new pg.Client({ connectionString: db.url });
    try {
      await c.connect();
      await c.query(`DROP OWNED BY ${c.escapeIdentifier(name)}`);
    } catch {
      // The database is already gone, and the role's privileges with it.
    } finally {
      await c.end().catch(() => undefined);
    }
    const a = new pg.Client({ connectionString: adminUrl() });
    await a.connect();
    try {
      await a.query(`DROP ROLE IF EXISTS ${a.escapeIdentifier(name)}`);
    } finally {
      await a.end();
    }
  });
  const u = new URL(databaseUrl(db.name));
  u.username = name;
  u.password = password;
  return { name, password, url: u.toString() };
}

export const JWT_SECRET = randomBytes(32).toString('hex');

/** The API's configuration for a test: port 0, a random JWT_SECRET, and `extra` settings. */
export function apiConfig(databaseUrlForApi: string, extra: Record<string, string> = {}): Config {
  return loadConfig({
    env: {
      NODE_ENV: 'test',
      LOG_LEVEL: 'info',
      DATABASE_URL: databaseUrlForApi,
      JWT_SECRET,
      PORT: '0',
      API_HOST: '127.0.0.1',
      ...extra,
    },
  });
}

export interface RunningApi {
  server: ApiServer;
  config: Config;
  base: string;
  pool: pg.Pool;
  logs: LogLines;
  /** A token for (tenant, user), signed with the test's JWT_SECRET. */
  token(tenant: string, userId: number, ttlSeconds?: number): Promise<string>;
  /** fetch() against the API with a bearer token (or none). */
  request(path: string, init?: { method?: string; token?: string | undefined; body?: string; headers?: Record<string, string> }): Promise<{ status: number; headers: Headers; text: string; json: any }>;
}

export interface StartApiOptions {
  /** Connect as this URL (default: the role's). */
  url?: string;
  env?: Record<string, string>;
  queries?: ApiQueries;
  cursor?: Omit<CursorAdvancerOptions, 'store' | 'logger'>;
}

/** An ApiServer on 127.0.0.1:0, stopped (and its pool closed) at teardown. */
export async function startApi(t: TestContext, db: TestDatabase, role: ApiRole | undefined, options: StartApiOptions = {}): Promise<RunningApi> {
  const url = options.url ?? role?.url ?? db.url;
  const config = apiConfig(url, options.env);
  const pool = db.pool({ connectionString: url, max: 5, statement_timeout: config.api.requestTimeoutMs });
  const logs = new LogLines();
  const logger = createLogger({ level: config.log.level, destination: logs.stream });
  const server = new ApiServer({ config, pool, logger, ...(options.queries ? { queries: options.queries } : {}), ...(options.cursor ? { cursor: options.cursor } : {}) });
  const address = await server.listen(0, '127.0.0.1');
  t.teardown(() => server.stop(2_000));
  const base = `http://127.0.0.1:${address.port}`;
  return {
    server,
    config,
    base,
    pool,
    logs,
    token: async (tenant, userId, ttlSeconds = 600) => (await mintToken({ tenant, userId, ttlSeconds }, authSettings(config))).token,
    request: async (path, init = {}) => {
      const headers: Record<string, string> = { ...(init.headers ?? {}) };
      if (init.token !== undefined) headers.authorization = `Bearer ${init.token}`;
      if (init.body !== undefined && !Object.keys(headers).some((h) => h.toLowerCase() === 'content-type')) headers['content-type'] = 'application/json';
      const res = await fetch(`${base}${path}`, { method: init.method ?? 'GET', headers, ...(init.body !== undefined ? { body: init.body } : {}) });
      const text = await res.text();
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        json = undefined;
      }
      return { status: res.status, headers: res.headers, text, json };
    },
  };
}

/** A JWT built by hand (for tokens jose would refuse to make: alg none, odd headers). */
export function handmadeJwt(header: object, payload: object, secret: string | undefined): string {
  const enc = (o: object): string => Buffer.from(JSON.stringify(o)).toString('base64url');
  const signingInput = `${enc(header)}.${enc(payload)}`;
  const signature = secret === undefined ? '' : createHmac('sha256', Buffer.from(secret, 'utf8')).update(signingInput).digest('base64url');
  return `${signingInput}.${signature}`;
}

/** Seconds since the epoch. */
export function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/**
 * A fingerprint of everything a request could change: events, acknowledgments, cursors. Equal
 * fingerprints before and after = the database is unchanged.
 */
export async function fingerprint(db: TestDatabase): Promise<string> {
  const { rows } = await db.query<{ f: string }>(`
    SELECT md5(coalesce((SELECT string_agg(e::text, '|' ORDER BY e.id) FROM public.outbox_events AS e), '') || '#' ||
               coalesce((SELECT string_agg(a::text, '|' ORDER BY a.id) FROM public.event_acknowledgments AS a), '') || '#' ||
               coalesce((SELECT string_agg(c::text, '|' ORDER BY c.tenant, c.user_id) FROM public.outbox_pull_cursors AS c), '')) AS f`);
  return rows[0]?.f ?? '';
}

/** Inserts `n` events of `tenant` directly (as the owner), returning their ids. */
export async function insertEvents(db: TestDatabase, tenant: string, n: number, eventType = 'vendors_update', aggregateType = 'vendors'): Promise<string[]> {
  const { rows } = await db.query<{ id: string }>(
    `INSERT INTO public.outbox_events (tenant, event_type, aggregate_id, aggregate_type, payload)
     SELECT $1, $3, i::text, $4, jsonb_build_object('operation', 'UPDATE', 'n', i)
     FROM generate_series(1, $2::int) AS i
     RETURNING id::text AS id`,
    [tenant, n, eventType, aggregateType],
  );
  return rows.map((r) => r.id);
}

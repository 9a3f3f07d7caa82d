/**
 * `outbox-relay api create-role`: the sidecar's own database role. Roles belong to the whole cluster
 * and grants to one database, so this is a command (run by the owner, once per database, as often as
 * you like) rather than a migration. It creates the role when missing (LOGIN, no superuser, no
 * BYPASSRLS), optionally sets its password (as a SCRAM verifier computed here), grants exactly what the
 * sidecar needs in the current database, and registers the role so that row-level security confines it.
 * Identifiers are quoted by PostgreSQL's format('%I'); values are parameters.
 */
import type pg from 'pg';
import { OutboxError, UsageError } from '../errors.js';
import { scramSha256Verifier } from './scram.js';

export interface CreateRoleOptions {
  name: string;
  password?: string | undefined;
}

export interface CreateRoleResult {
  role: string;
  database: string;
  created: boolean;
  passwordSet: boolean;
}

/** Lower-case identifiers only: no quoting surprises in DB_USER, pg_hba.conf or psql. */
export const ROLE_NAME_PATTERN = /^[a-z_][a-z0-9_]{0,62}$/;

/** Builds a statement text server-side: format() quotes identifiers (%I) and literals (%L). */
export async function formatSql(client: pg.ClientBase, template: string, ...args: string[]): Promise<string> {
  const params = args.map((_, i) => `$${i + 1}::text`).join(', ');
  const { rows } = await client.query<{ sql: string }>(`SELECT format($${args.length + 1}::text, ${params}) AS sql`, [...args, template]);
  return (rows[0] as { sql: string }).sql;
}

/**
 * What the sidecar may do, in the current database: read events, write its own acknowledgments and
 * cursors. `on` is a format() template; the database's name fills its %I where it has one.
 */
const API_ROLE_RIGHTS: ReadonlyArray<{ privileges: string; on: string }> = [
  { privileges: 'CONNECT', on: 'DATABASE %I' },
  { privileges: 'USAGE', on: 'SCHEMA public' },
  { privileges: 'SELECT', on: 'public.outbox_events, public.outbox_relay_migrations' },
  { privileges: 'SELECT, INSERT, UPDATE', on: 'public.event_acknowledgments, public.outbox_pull_cursors' },
  // The pull cursors read the id sequence's position (sql/007, outbox_pull_advance).
  { privileges: 'SELECT', on: 'SEQUENCE public.outbox_events_id_seq' },
];

/** GRANT (or REVOKE) every right of API_ROLE_RIGHTS to (from) the role, in the current database. */
export async function applyApiRoleRights(client: pg.ClientBase, action: 'GRANT' | 'REVOKE', role: string, database: string): Promise<void> {
  for (const r of API_ROLE_RIGHTS) {
    const template = `${action} ${r.privileges} ON ${r.on} ${action === 'GRANT' ? 'TO' : 'FROM'} %I`;
    const args = r.on.includes('%I') ? [database, role] : [role];
    await client.query(await formatSql(client, template, ...args));
  }
}

/**
 * What a role already holds in this database beyond what GRANTS gives (by name, not through
 * PUBLIC): relations it owns or was granted, functions it may execute (outbox_write_event, say),
 * schemas it owns or was granted (but USAGE on public), and the roles it is a member of. At most
 * three, described. Nothing for a role already registered.
 */
const FOREIGN_RIGHTS = `
WITH r AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1),
held AS (
  SELECT 'table ' || c.oid::regclass::text AS what
  FROM pg_catalog.pg_class AS c
  LEFT JOIN LATERAL pg_catalog.aclexplode(c.relacl) AS a ON true
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
    AND (c.relowner = (SELECT oid FROM r) OR a.grantee = (SELECT oid FROM r))
    AND c.oid NOT IN ('public.outbox_events'::regclass, 'public.outbox_relay_migrations'::regclass,
                      'public.event_acknowledgments'::regclass, 'public.outbox_pull_cursors'::regclass,
                      'public.outbox_events_id_seq'::regclass)
  UNION
  SELECT 'function ' || p.oid::regprocedure::text
  FROM pg_catalog.pg_proc AS p
  LEFT JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS a ON true
  WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
    AND (p.proowner = (SELECT oid FROM r) OR a.grantee = (SELECT oid FROM r))
  UNION
  SELECT 'schema ' || n.nspname::text
  FROM pg_catalog.pg_namespace AS n
  LEFT JOIN LATERAL pg_catalog.aclexplode(n.nspacl) AS a ON true
  WHERE (n.nspowner = (SELECT oid FROM r) OR (a.grantee = (SELECT oid FROM r) AND NOT (n.nspname = 'public' AND a.privilege_type = 'USAGE')))
  UNION
  SELECT 'membership in ' || g.rolname::text
  FROM pg_catalog.pg_auth_members AS m JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid
  WHERE m.member = (SELECT oid FROM r)
)
SELECT h.what FROM held AS h
WHERE NOT EXISTS (SELECT 1 FROM public.outbox_api_roles AS x WHERE x.role_name = $1)
ORDER BY 1
LIMIT 3`;

/** Refuses a role name outside ROLE_NAME_PATTERN or in PostgreSQL's reserved pg_ prefix. */
export function checkRoleName(name: string): void {
  if (!ROLE_NAME_PATTERN.test(name) || name.startsWith('pg_')) {
    throw new UsageError(`role name ${JSON.stringify(name)} is not allowed: use lower-case letters, digits and _ (not starting with pg_), at most 63`);
  }
}

export async function createApiRole(client: pg.ClientBase, o: CreateRoleOptions): Promise<CreateRoleResult> {
  checkRoleName(o.name);
  const verifier = o.password === undefined ? undefined : scramSha256Verifier(o.password);

  const { rows: ctx } = await client.query<{ db: string; me: string; owner: string | null; migrated: boolean }>(
    `SELECT current_database()::text AS db, current_user::text AS me,
            (SELECT pg_catalog.pg_get_userbyid(c.relowner)::text FROM pg_catalog.pg_class AS c
             WHERE c.oid = to_regclass('public.outbox_events')) AS owner,
            to_regclass('public.outbox_api_roles') IS NOT NULL AS migrated`,
  );
  const { db, me, owner, migrated } = ctx[0] as { db: string; me: string; owner: string | null; migrated: boolean };
  if (!migrated) throw new OutboxError('the pull API tables are not installed in this database; run "outbox-relay migrate" first', 'E_NOT_MIGRATED');
  if (o.name === me || o.name === owner) {
    throw new UsageError(`role "${o.name}" runs or owns the outbox itself; the sidecar needs a role of its own (row-level security would confine the relay too)`);
  }

  await client.query('BEGIN');
  try {
    const { rows } = await client.query<{ rolsuper: boolean; rolbypassrls: boolean }>(
      'SELECT rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = $1',
      [o.name],
    );
    const existing = rows[0];
    if (existing && (existing.rolsuper || existing.rolbypassrls)) {
      throw new UsageError(`role "${o.name}" exists and is ${existing.rolsuper ? 'a superuser' : 'BYPASSRLS'}: row-level security cannot confine it; choose another name`);
    }
    if (existing) {
      // An existing role not registered yet that holds other rights here is somebody's application
      // role: registered, row-level security would confine it to the pull API's view and break its
      // own writes to the outbox tables (outbox_write_event refuses API roles).
      const { rows: foreign } = await client.query<{ what: string }>(FOREIGN_RIGHTS, [o.name]);
      if (foreign.length > 0) {
        throw new UsageError(
          `role "${o.name}" already holds ${foreign.map((r) => r.what).join(', ')}${foreign.length === 3 ? ', …' : ''}: it looks like an application role, which registering would confine to the pull API's view; the sidecar needs a role of its own, so choose another --name`,
        );
      }
    }
    if (!existing) {
      await client.query(await formatSql(client, 'CREATE ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS', o.name));
    }
    if (verifier !== undefined) {
      await client.query(await formatSql(client, 'ALTER ROLE %I WITH LOGIN PASSWORD %L', o.name, verifier));
    }
    await applyApiRoleRights(client, 'GRANT', o.name, db);
    await client.query('INSERT INTO public.outbox_api_roles (role_name) VALUES ($1) ON CONFLICT (role_name) DO NOTHING', [o.name]);
    await client.query('COMMIT');
    return { role: o.name, database: db, created: !existing, passwordSet: verifier !== undefined };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    // Two runs at once: the other one created the role first. Running again finds it.
    if ((err as { code?: string }).code === '42710') throw new OutboxError(`role "${o.name}" was created concurrently; run the command again`, 'E_CONCURRENT');
    throw err;
  }
}

/**
 * `outbox-relay api drop-role`: undoes `api create-role` in the current database. It revokes what
 * create-role granted and removes the registration; with `--drop`, it also drops the role from the
 * cluster, which PostgreSQL refuses while the role holds rights in another database (create-role
 * runs once per database). All or nothing: a refusal changes nothing. Acknowledgments and pull
 * cursors the role wrote are rows of the outbox tables, not the role's objects, and stay.
 */
import type pg from 'pg';
import { OutboxError, UsageError } from '../errors.js';
import { applyApiRoleRights, checkRoleName, formatSql } from './createRole.js';

export interface DropRoleOptions {
  name: string;
  /** Also DROP ROLE (cluster-wide). */
  drop: boolean;
  /** Go ahead although sessions are connected as the role (a running sidecar then fails its requests). */
  force?: boolean;
}

export interface DropRoleResult {
  role: string;
  database: string;
  dropped: boolean;
}

export async function dropApiRole(client: pg.ClientBase, o: DropRoleOptions): Promise<DropRoleResult> {
  checkRoleName(o.name);
  const { rows: ctx } = await client.query<{ db: string; migrated: boolean }>(
    "SELECT current_database()::text AS db, to_regclass('public.outbox_api_roles') IS NOT NULL AS migrated",
  );
  const { db, migrated } = ctx[0] as { db: string; migrated: boolean };
  if (!migrated) throw new OutboxError('the pull API tables are not installed in this database; run "outbox-relay migrate" first', 'E_NOT_MIGRATED');

  // A sidecar still connected as the role would answer every request with an error from now on:
  // one on this database (what unregistering takes away), or on any (what dropping the role does).
  const { rows: sessions } = await client.query<{ n: number; databases: string }>(
    `SELECT count(*)::int AS n, string_agg(DISTINCT datname::text, ', ') AS databases FROM pg_catalog.pg_stat_activity
     WHERE usename = $1 AND ($2 OR datname = current_database())`,
    [o.name, o.drop],
  );
  const connected = sessions[0]?.n ?? 0;
  if (connected > 0 && !o.force) {
    throw new UsageError(
      `${connected} session(s) are connected as role "${o.name}" (database ${sessions[0]?.databases ?? '?'}): stop the sidecars that use it first, or pass --force; nothing changed`,
    );
  }

  await client.query('BEGIN');
  try {
    const { rowCount } = await client.query('DELETE FROM public.outbox_api_roles WHERE role_name = $1', [o.name]);
    const exists = (await client.query('SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1', [o.name])).rowCount === 1;
    if (!rowCount) {
      throw new UsageError(`role "${o.name}" is not a registered pull API role in database ${db} (api create-role registers one); nothing changed`);
    }
    if (exists) await applyApiRoleRights(client, 'REVOKE', o.name, db);
    if (o.drop && exists) await client.query(await formatSql(client, 'DROP ROLE %I', o.name));
    await client.query('COMMIT');
    return { role: o.name, database: db, dropped: o.drop && exists };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    const e = err as { code?: string; detail?: string };
    if (e.code === '2BP01') {
      // "role ... cannot be dropped because some objects depend on it", detail: what, where.
      throw new OutboxError(
        `role "${o.name}" cannot be dropped: it still holds rights elsewhere (${(e.detail ?? 'see PostgreSQL\'s log').replace(/\n/g, '; ')}). ` +
          `Run "outbox-relay api drop-role --name ${o.name}" against each other database first; nothing changed here`,
        'E_ROLE_IN_USE',
      );
    }
    throw err;
  }
}

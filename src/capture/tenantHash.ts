/**
 * The seed's getTenantHash: a tenant id's schema name. Deterministic, keyed with TENANT_HASH_SALT and
 * TENANT_ENTROPY_SOURCE (HMAC-SHA256), 16 characters, always a valid unquoted PostgreSQL identifier:
 * a lower-case letter, then 15 lower-case letters or digits (about 82 bits).
 */
import { createHmac } from 'node:crypto';
import type pg from 'pg';
import { ConfigError, OutboxError, UsageError } from '../errors.js';

export const TENANT_HASH_LENGTH = 16;
const FIRST = 'abcdefghijklmnopqrstuvwxyz';
const REST = 'abcdefghijklmnopqrstuvwxyz0123456789';

export interface TenantHashKey {
  salt: string;
  entropySource: string;
}

/** Parses a tenant id: a positive integer up to 2^53-1, as a number or a decimal string. */
export function parseTenantId(input: string | number): number {
  const text = typeof input === 'number' ? String(input) : input.trim();
  if (!/^[1-9][0-9]{0,15}$/.test(text)) {
    throw new UsageError(`invalid tenant id ${JSON.stringify(String(input))}: expected a positive integer`);
  }
  const id = Number(text);
  if (!Number.isSafeInteger(id)) throw new UsageError(`invalid tenant id ${text}: larger than ${Number.MAX_SAFE_INTEGER}`);
  return id;
}

/** The schema name of a tenant. Throws when the key is incomplete. */
export function tenantHash(tenantId: string | number, key: TenantHashKey): string {
  const id = parseTenantId(tenantId);
  const missing = [!key.salt && 'TENANT_HASH_SALT', !key.entropySource && 'TENANT_ENTROPY_SOURCE'].filter(Boolean);
  if (missing.length > 0) throw new ConfigError(`${missing.join(' and ')} must be set to compute tenant hashes`);
  // Length-prefix the salt so that ("ab", "c") and ("a", "bc") are different keys.
  const hmacKey = `${key.salt.length}:${key.salt}:${key.entropySource}`;
  const digest = createHmac('sha256', hmacKey).update(`tenant:${id}`).digest();
  let n = BigInt(`0x${digest.toString('hex')}`);
  let out = FIRST[Number(n % 26n)] as string;
  n /= 26n;
  for (let i = 1; i < TENANT_HASH_LENGTH; i++) {
    out += REST[Number(n % 36n)];
    n /= 36n;
  }
  return out;
}

export type SchemaOwnership =
  | { state: 'free' }
  | { state: 'registered'; tenantId: number }
  | { state: 'collision'; tenantId: number }
  | { state: 'unregistered-schema' }
  /** The tenant is registered under another schema name: the hash key must have changed. */
  | { state: 'key-changed'; registeredSchema: string };

/**
 * Who holds a tenant's schema name: nobody, this tenant, another tenant, or an unregistered schema;
 * or this tenant already holds another name (its hash key changed).
 */
export async function checkTenantSchema(client: pg.ClientBase, tenantId: number, schemaName: string): Promise<SchemaOwnership> {
  const reg = await client.query<{ tenant_id: string }>(
    'SELECT tenant_id::text FROM public.outbox_tenants WHERE schema_name = $1',
    [schemaName],
  );
  const owner = reg.rows[0];
  if (owner) {
    const ownerId = Number(owner.tenant_id);
    return ownerId === tenantId ? { state: 'registered', tenantId } : { state: 'collision', tenantId: ownerId };
  }
  const mine = await client.query<{ schema_name: string }>('SELECT schema_name FROM public.outbox_tenants WHERE tenant_id = $1', [tenantId]);
  if (mine.rows[0]) return { state: 'key-changed', registeredSchema: mine.rows[0].schema_name };
  const ns = await client.query('SELECT 1 FROM pg_namespace WHERE nspname = $1', [schemaName]);
  return ns.rowCount ? { state: 'unregistered-schema' } : { state: 'free' };
}

/**
 * Records that `schemaName` belongs to `tenantId`. A collision (the name belongs to another tenant,
 * or this tenant is registered under another name) is an error; registering twice is harmless.
 */
export async function registerTenant(client: pg.ClientBase, tenantId: number, schemaName: string): Promise<SchemaOwnership> {
  const before = await checkTenantSchema(client, tenantId, schemaName);
  if (before.state === 'collision') throw collisionError(tenantId, schemaName, before.tenantId);
  if (before.state === 'key-changed') throw keyChangedError(tenantId, before.registeredSchema);
  if (before.state === 'registered') return before;
  try {
    const res = await client.query(
      'INSERT INTO public.outbox_tenants (tenant_id, schema_name) VALUES ($1, $2) ON CONFLICT (tenant_id) DO NOTHING',
      [tenantId, schemaName],
    );
    if (res.rowCount === 0) {
      // Registered concurrently: under this name (fine) or another one (the key differs).
      const other = await client.query<{ schema_name: string }>('SELECT schema_name FROM public.outbox_tenants WHERE tenant_id = $1', [tenantId]);
      const registered = other.rows[0]?.schema_name;
      if (registered !== schemaName) throw keyChangedError(tenantId, registered ?? '?');
    }
  } catch (err) {
    if ((err as { code?: string }).code === '23505') {
      const now = await checkTenantSchema(client, tenantId, schemaName);
      if (now.state === 'collision') throw collisionError(tenantId, schemaName, now.tenantId);
    }
    throw err;
  }
  return { state: 'registered', tenantId };
}

export function keyChangedError(tenantId: number, registeredSchema: string): OutboxError {
  return new OutboxError(
    `tenant ${tenantId} is already registered with schema "${registeredSchema}"; its hash key (TENANT_HASH_SALT / TENANT_ENTROPY_SOURCE) must have changed`,
    'E_TENANT_KEY_CHANGED',
  );
}

function collisionError(tenantId: number, schemaName: string, ownerId: number): OutboxError {
  return new OutboxError(
    `tenant hash collision: schema "${schemaName}" for tenant ${tenantId} already belongs to tenant ${ownerId}; refusing to put two tenants on one schema`,
    'E_TENANT_COLLISION',
  );
}

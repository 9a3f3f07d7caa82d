/**
 * Subscriptions: create, list, enable, disable, rotate secrets, replay. Validation happens here
 * (identifiers, URLs, filters, secrets); the SQL is parameterized, and queue changes go through the
 * functions of sql/006 that hold the lane lock.
 */
import type pg from 'pg';
import { assertIdentifier } from '../capture/identifiers.js';
import { ConfigError, UsageError } from '../errors.js';
import { parseEventFilter } from '../relay/eventFilter.js';
import { generateSigningSecret, secretKey } from '../webhook/secret.js';
import { validateWebhookUrl, type UrlPolicy } from '../webhook/validateUrl.js';
import { type SecretCipher, plainCipher, storedKeyId } from './secretCipher.js';

/** Channel on which relays hear that subscriptions changed (they reload at once). */
export const SUBSCRIPTIONS_CHANNEL = 'outbox_subscriptions';

export type Ordering = 'aggregate' | 'none';

export interface NewSubscription {
  tenant: string;
  userId: number | string;
  url: string;
  processor?: string;
  events?: string;
  secret?: string;
  ordering?: string;
  maxInFlight?: number | string;
  timeoutMs?: number | string;
}

export interface SubscriptionDefaults {
  maxInFlight: number;
  timeoutMs: number;
}

export interface SubscriptionRow {
  id: number;
  tenant: string;
  userId: number;
  processor: string;
  url: string;
  eventTypes: string[];
  ordering: Ordering;
  maxInFlight: number;
  timeoutMs: number;
  enabled: boolean;
  disabledReason: string | null;
  createdAt: string;
  pending: number;
  dead: number;
  secrets: number;
}

function parseIntIn(name: string, value: number | string, min: number, max: number): number {
  const text = String(value).trim();
  if (!/^\d+$/.test(text)) throw new UsageError(`${name} must be a whole number from ${min} to ${max}, got ${JSON.stringify(String(value))}`);
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`${name} must be from ${min} to ${max}, got ${n}`);
  return n;
}

/** A user id as the seed has them: a positive 32-bit integer. */
export function parseUserId(value: number | string): number {
  return parseIntIn('user id', value, 1, 2_147_483_647);
}

export function parseSubscriptionId(value: number | string): number {
  return parseIntIn('subscription id', value, 1, Number.MAX_SAFE_INTEGER);
}

/** A subscription's in-flight limit and request timeout: the bounds of the table's CHECK constraints. */
const parseMaxInFlight = (value: number | string): number => parseIntIn('max in-flight', value, 1, 1000);
const parseTimeoutMs = (value: number | string): number => parseIntIn('timeout (ms)', value, 100, 600_000);

function parseOrdering(value: string | undefined): Ordering {
  if (value === undefined || value === 'aggregate') return 'aggregate';
  if (value === 'none') return 'none';
  throw new UsageError(`ordering must be "aggregate" or "none", got ${JSON.stringify(value)}`);
}

function parseProcessor(value: string | undefined): string {
  const p = value ?? 'flowgram.ai';
  if (p.length < 1 || p.length > 100 || /[\u0000-\u001f]/.test(p)) throw new UsageError('processor must be 1 to 100 printable characters');
  return p;
}

async function notifyChanged(client: pg.ClientBase): Promise<void> {
  await client.query('SELECT pg_notify($1, $2)', [SUBSCRIPTIONS_CHANNEL, 'changed']);
}

const INSERT_SUBSCRIPTION = `
INSERT INTO public.outbox_subscriptions (tenant, user_id, processor, url, event_types, ordering, max_in_flight, timeout_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING id`;

const INSERT_SECRET = 'INSERT INTO public.outbox_subscription_secrets (subscription_id, secret, expires_at) VALUES ($1, $2, $3)';

/**
 * Creates a subscription and returns its id and secret (the only time the secret is shown).
 * One subscription per (tenant, user): acknowledgments are unique per event and user.
 */
/**
 * Outside production a secret may be stored plain (no OUTBOX_ENCRYPTION_KEYS). Not beside encrypted
 * ones, though: those were written with a key that this command was simply not given, and a plain
 * secret among them is one the operator believes encrypted.
 */
async function refusePlainBesideEncrypted(client: pg.ClientBase, cipher: SecretCipher): Promise<void> {
  if (cipher.encrypts) return;
  const { rowCount } = await client.query("SELECT 1 FROM public.outbox_subscription_secrets WHERE starts_with(secret, 'enc:') LIMIT 1");
  if (rowCount) {
    throw new ConfigError(
      'the signing secrets in this database are encrypted, but OUTBOX_ENCRYPTION_KEYS is not set: give this command the relays\' key list (a new secret would otherwise be stored in plain text beside them)',
    );
  }
}

export async function addSubscription(
  client: pg.ClientBase,
  input: NewSubscription,
  policy: UrlPolicy,
  defaults: SubscriptionDefaults,
  cipher: SecretCipher = plainCipher,
): Promise<{ id: number; secret: string }> {
  const tenant = assertIdentifier('schema', input.tenant);
  const userId = parseUserId(input.userId);
  const url = validateWebhookUrl(input.url, policy).toString();
  const processor = parseProcessor(input.processor);
  const events = parseEventFilter(input.events);
  const ordering = parseOrdering(input.ordering);
  const maxInFlight = input.maxInFlight === undefined ? defaults.maxInFlight : parseMaxInFlight(input.maxInFlight);
  const timeoutMs = input.timeoutMs === undefined ? defaults.timeoutMs : parseTimeoutMs(input.timeoutMs);
  const secret = input.secret ?? generateSigningSecret();
  secretKey(secret);
  await client.query('BEGIN');
  try {
    const { rows } = await client.query<{ id: string }>(INSERT_SUBSCRIPTION, [tenant, userId, processor, url, events, ordering, maxInFlight, timeoutMs]);
    const id = Number(rows[0]?.id);
    await refusePlainBesideEncrypted(client, cipher);
    await client.query(INSERT_SECRET, [id, cipher.encrypt(secret), null]);
    await notifyChanged(client);
    await client.query('COMMIT');
    return { id, secret };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    if ((err as { code?: string }).code === '23505') {
      const { rows } = await client.query<{ id: string }>('SELECT id FROM public.outbox_subscriptions WHERE tenant = $1 AND user_id = $2', [tenant, userId]);
      throw new UsageError(
        `user ${userId} already has subscription ${rows[0]?.id ?? '?'} in tenant ${tenant}; acknowledgments are per event and user, so a user has one subscription per tenant (use a separate user id per receiver)`,
      );
    }
    throw err;
  }
}

const SELECT_SUBSCRIPTIONS = `
SELECT s.id::int, s.tenant, s.user_id AS "userId", s.processor, s.url, s.event_types AS "eventTypes", s.ordering,
       s.max_in_flight AS "maxInFlight", s.timeout_ms AS "timeoutMs", s.enabled, s.disabled_reason AS "disabledReason",
       to_char(s.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS "createdAt",
       (SELECT count(*)::int FROM public.outbox_deliveries d WHERE d.subscription_id = s.id AND d.state <> 'dead') AS pending,
       (SELECT count(*)::int FROM public.outbox_deliveries d WHERE d.subscription_id = s.id AND d.state = 'dead') AS dead,
       (SELECT count(*)::int FROM public.outbox_subscription_secrets k WHERE k.subscription_id = s.id
          AND (k.expires_at IS NULL OR k.expires_at > now())) AS secrets
FROM public.outbox_subscriptions s
WHERE ($1::text IS NULL OR s.tenant = $1)
ORDER BY s.id`;

export async function listSubscriptions(client: pg.ClientBase, tenant?: string): Promise<SubscriptionRow[]> {
  if (tenant !== undefined) assertIdentifier('schema', tenant);
  const { rows } = await client.query<SubscriptionRow>(SELECT_SUBSCRIPTIONS, [tenant ?? null]);
  return rows;
}

async function requireSubscription(client: pg.ClientBase, id: number): Promise<{ enabled: boolean }> {
  const { rows } = await client.query<{ enabled: boolean }>('SELECT enabled FROM public.outbox_subscriptions WHERE id = $1', [id]);
  if (!rows[0]) throw new UsageError(`subscription ${id} does not exist`);
  return rows[0];
}

/** What `subscriptions update` may change (tenant, user and ordering are fixed: see updateSubscription). */
export interface SubscriptionChanges {
  url?: string | undefined;
  processor?: string | undefined;
  events?: string | undefined;
  maxInFlight?: number | string | undefined;
  timeoutMs?: number | string | undefined;
}

const UPDATE_SUBSCRIPTION = `
UPDATE public.outbox_subscriptions
SET url = coalesce($2, url), processor = coalesce($3, processor), event_types = coalesce($4, event_types),
    max_in_flight = coalesce($5, max_in_flight), timeout_ms = coalesce($6, timeout_ms), updated_at = now()
WHERE id = $1`;

/**
 * Changes a subscription's URL, processor, event filter, in-flight limit or timeout; running relays
 * pick the change up at once (NOTIFY). Deliveries not yet sent, retries included, go to the new URL
 * with their webhook-id unchanged; a new filter applies to events fanned out from now on. Tenant and
 * user are the subscription's identity (acknowledgments are written as that user), and ordering
 * decides how pending deliveries were queued, so those are not changed here: add another
 * subscription instead. Returns the names of the fields given.
 */
export async function updateSubscription(client: pg.ClientBase, idInput: number | string, changes: SubscriptionChanges, policy: UrlPolicy): Promise<string[]> {
  const id = parseSubscriptionId(idInput);
  const url = changes.url === undefined ? null : validateWebhookUrl(changes.url, policy).toString();
  const processor = changes.processor === undefined ? null : parseProcessor(changes.processor);
  const events = changes.events === undefined ? null : parseEventFilter(changes.events);
  const maxInFlight = changes.maxInFlight === undefined ? null : parseMaxInFlight(changes.maxInFlight);
  const timeoutMs = changes.timeoutMs === undefined ? null : parseTimeoutMs(changes.timeoutMs);
  const given = Object.entries({ url, processor, events, maxInFlight, timeoutMs }).filter(([, v]) => v !== null).map(([k]) => k);
  if (given.length === 0) throw new UsageError('nothing to change: give at least one of --url, --events, --processor, --max-in-flight, --timeout-ms');
  const { rowCount } = await client.query(UPDATE_SUBSCRIPTION, [id, url, processor, events, maxInFlight, timeoutMs]);
  if (!rowCount) throw new UsageError(`subscription ${id} does not exist`);
  await notifyChanged(client);
  return given;
}

/** Enables a subscription; deliveries kept by a 410 Gone resume. */
export async function enableSubscription(client: pg.ClientBase, idInput: number | string): Promise<void> {
  const id = parseSubscriptionId(idInput);
  await requireSubscription(client, id);
  await client.query(
    'UPDATE public.outbox_subscriptions SET enabled = true, disabled_reason = NULL, disabled_at = NULL, updated_at = now() WHERE id = $1',
    [id],
  );
  await notifyChanged(client);
}

/** Disables a subscription; its pending deliveries end as dead (replayable). Returns how many. */
export async function disableSubscription(client: pg.ClientBase, idInput: number | string, reason?: string): Promise<number> {
  const id = parseSubscriptionId(idInput);
  await requireSubscription(client, id);
  // Disabled already (by a 410 Gone, say) and no new reason given: the reason it has stays.
  const { rows } = await client.query<{ n: number }>(
    `SELECT public.outbox_disable_subscription($1, coalesce($2, (SELECT s.disabled_reason FROM public.outbox_subscriptions AS s WHERE s.id = $1 AND NOT s.enabled), 'disabled by an operator')) AS n`,
    [id, reason ?? null],
  );
  await notifyChanged(client);
  return rows[0]?.n ?? 0;
}

/**
 * Removes a disabled subscription with its deliveries, circuit states and secrets (sql/016); the
 * user's acknowledgments stay. Returns how many deliveries went with it.
 */
export async function removeSubscription(client: pg.ClientBase, idInput: number | string): Promise<number> {
  const id = parseSubscriptionId(idInput);
  let removed: number;
  try {
    const { rows } = await client.query<{ n: number }>('SELECT public.outbox_remove_subscription($1) AS n', [id]);
    removed = rows[0]?.n ?? 0;
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'P0002') throw new UsageError(`subscription ${id} does not exist`);
    if (code === '55006') {
      throw new UsageError(`subscription ${id} is enabled; disable it first (outbox-relay subscriptions disable ${id}), so that nothing is sent to it while it is removed`);
    }
    throw err;
  }
  await notifyChanged(client);
  return removed;
}

/**
 * A new signing secret; the previous ones keep signing until `graceMs` from now, so receivers can
 * switch without rejecting anything. Returns the new secret (shown once).
 */
export async function rotateSecret(client: pg.ClientBase, idInput: number | string, graceMs: number, newSecret?: string, cipher: SecretCipher = plainCipher): Promise<{ secret: string; previousValidUntil: string }> {
  const id = parseSubscriptionId(idInput);
  const secret = newSecret ?? generateSigningSecret();
  secretKey(secret);
  await client.query('BEGIN');
  try {
    const { rowCount } = await client.query('SELECT 1 FROM public.outbox_subscriptions WHERE id = $1 FOR UPDATE', [id]);
    if (!rowCount) throw new UsageError(`subscription ${id} does not exist`);
    const { rows } = await client.query<{ until: string }>(
      `UPDATE public.outbox_subscription_secrets
       SET expires_at = least(coalesce(expires_at, 'infinity'), now() + $2 * interval '1 millisecond')
       WHERE subscription_id = $1 AND (expires_at IS NULL OR expires_at > now())
       RETURNING to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS until`,
      [id, graceMs],
    );
    // Secrets that stopped signing long ago are of no further use.
    await client.query("DELETE FROM public.outbox_subscription_secrets WHERE subscription_id = $1 AND expires_at < now() - interval '7 days'", [id]);
    await refusePlainBesideEncrypted(client, cipher);
    await client.query(INSERT_SECRET, [id, cipher.encrypt(secret), null]);
    await notifyChanged(client);
    await client.query('COMMIT');
    return { secret, previousValidUntil: rows[0]?.until ?? '' };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

export interface ReplayFilter {
  mode: 'dead' | 'delivered';
  subscriptionIds?: number[];
  tenant?: string;
  eventTypes?: string[];
  since?: Date;
  until?: Date;
}

/** Requeues in bounded batches (each one short transaction); returns how many deliveries were queued. */
export async function replay(client: pg.ClientBase, filter: ReplayFilter, batchSize = 5_000): Promise<number> {
  if (filter.tenant !== undefined) assertIdentifier('schema', filter.tenant);
  if (!filter.subscriptionIds?.length && filter.tenant === undefined) {
    throw new UsageError('replay needs --subscription or --tenant (replaying every tenant at once is almost never meant)');
  }
  if (filter.since && filter.until && filter.since >= filter.until) throw new UsageError('--since must be before --until');
  if (filter.subscriptionIds?.length) {
    const { rows } = await client.query<{ id: number }>('SELECT id::int FROM public.outbox_subscriptions WHERE id = ANY($1::bigint[])', [filter.subscriptionIds]);
    const found = new Set(rows.map((r) => r.id));
    const missing = filter.subscriptionIds.filter((id) => !found.has(id));
    if (missing.length) throw new UsageError(`subscription ${missing.join(', ')} does not exist`);
  }
  let cursor = '0';
  let total = 0;
  for (;;) {
    const { rows } = await client.query<{ queued: number; last_event_id: string | null }>(
      'SELECT queued, last_event_id FROM public.outbox_replay($1, $2, $3, $4, $5, $6, $7, $8)',
      [
        filter.mode,
        filter.subscriptionIds?.length ? filter.subscriptionIds : null,
        filter.tenant ?? null,
        filter.eventTypes?.length ? filter.eventTypes : null,
        filter.since ?? null,
        filter.until ?? null,
        cursor,
        batchSize,
      ],
    );
    const row = rows[0];
    if (!row || row.last_event_id === null) break;
    total += row.queued;
    cursor = row.last_event_id;
  }
  if (total > 0) await notifyChanged(client);
  return total;
}


/**
 * Encrypts every stored signing secret with the current key (the first of OUTBOX_ENCRYPTION_KEYS):
 * plain ones after encryption is turned on, and ones under an older key after a rotation. One
 * transaction; returns how many changed.
 */
export async function reencryptSecrets(client: pg.ClientBase, cipher: SecretCipher): Promise<{ updated: number; total: number }> {
  if (!cipher.encrypts) throw new UsageError('set OUTBOX_ENCRYPTION_KEYS first: there is no key to encrypt with');
  const current = storedKeyId(cipher.encrypt('probe'));
  await client.query('BEGIN');
  try {
    const { rows } = await client.query<{ id: string; secret: string }>('SELECT id, secret FROM public.outbox_subscription_secrets ORDER BY id FOR UPDATE');
    let updated = 0;
    for (const row of rows) {
      if (storedKeyId(row.secret) === current) continue;
      await client.query('UPDATE public.outbox_subscription_secrets SET secret = $2 WHERE id = $1', [row.id, cipher.encrypt(cipher.decrypt(row.secret))]);
      updated++;
    }
    if (updated > 0) await notifyChanged(client);
    await client.query('COMMIT');
    return { updated, total: rows.length };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

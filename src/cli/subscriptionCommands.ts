/** `subscriptions add|list|update|enable|disable|rotate-secret|reencrypt` and `replay`. */
import { type Command, Option } from 'commander';
import { UsageError } from '../errors.js';
import { OPEN_CIRCUITS } from '../maintenance/status.js';
import { parseEventFilter } from '../relay/eventFilter.js';
import {
  addSubscription,
  disableSubscription,
  enableSubscription,
  listSubscriptions,
  parseSubscriptionId,
  replay,
  reencryptSecrets,
  removeSubscription,
  rotateSecret,
  updateSubscription,
} from '../subscriptions/store.js';
import type { CommandContext } from './context.js';
import { requireMigrated } from './requireSchema.js';
import { renderTable } from './table.js';
import { secretCipherFor } from './cipher.js';

const collect = (value: string, previous: string[]): string[] => [...previous, value];

function parseTime(name: string, value: string | undefined): Date | undefined {
  if (value === undefined) return undefined;
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) throw new UsageError(`${name} must be an ISO 8601 time such as 2026-11-26T10:00:00Z, got ${JSON.stringify(value)}`);
  return d;
}

/** Whether a tenant's schema exists and anything in it is captured (a table's triggers, or the whole schema). */
const TENANT_CAPTURED = `
WITH n AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)
SELECT EXISTS (SELECT 1 FROM n) AS exists,
       public.outbox_schema_is_captured($1)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t JOIN pg_catalog.pg_class AS r ON r.oid = t.tgrelid
                  WHERE r.relnamespace IN (SELECT oid FROM n) AND t.tgfoid = 'public.outbox_capture()'::regprocedure
                    AND t.tgenabled <> 'D') AS captured`;

export function registerSubscriptionCommands(program: Command, ctx: () => CommandContext): void {
  const subs = program.command('subscriptions').description('webhook subscriptions: one per tenant and delivering user');

  subs
    .command('add')
    .description('subscribe a URL to a tenant\'s events, delivered as a user (prints the id and, once, the signing secret)')
    .requiredOption('--tenant <schema>', 'tenant (its schema name) (required)')
    .requiredOption('--user <id>', 'the user the relay acknowledges as (integer) (required)')
    .requiredOption('--url <url>', 'where to POST (https; http outside production) (required)')
    .option('--processor <name>', 'processor name written in acknowledgments', 'flowgram.ai')
    .option('--events <filter>', 'event types, comma-separated, "*" wildcards (e.g. "vendors_*,projects_update"); default all')
    .option('--secret <whsec>', 'signing secret to use (default: a new random one)')
    .option('--ordering <mode>', '"aggregate" (one aggregate\'s events in commit order) or "none" (fastest)', 'aggregate')
    .option('--max-in-flight <n>', 'concurrent requests per relay replica')
    .option('--timeout-ms <ms>', 'request timeout')
    .option('--json', 'print {"id":…,"secret":…}')
    .action(async (opts: { tenant: string; user: string; url: string; processor: string; events?: string; secret?: string; ordering: string; maxInFlight?: string; timeoutMs?: string; json?: boolean }) => {
      const c = ctx();
      const cfg = c.config;
      const { result, captured } = await c.withClient(async (client) => {
        await requireMigrated(client);
        const added = await addSubscription(
          client,
          { tenant: opts.tenant, userId: opts.user, url: opts.url, processor: opts.processor, events: opts.events, secret: opts.secret, ordering: opts.ordering, maxInFlight: opts.maxInFlight, timeoutMs: opts.timeoutMs },
          { production: cfg.env === 'production', allowHttp: cfg.webhook.allowHttp, allowPrivateTargets: cfg.webhook.allowPrivateTargets },
          { maxInFlight: cfg.webhook.maxInFlight, timeoutMs: cfg.webhook.timeoutMs },
          secretCipherFor(c),
        );
        // After the commit: the secret is shown once, so this check may never lose it.
        const { rows } = await client.query<{ exists: boolean; captured: boolean }>(TENANT_CAPTURED, [opts.tenant]).catch(() => ({ rows: [] }));
        return { result: added, captured: rows[0] ?? { exists: true, captured: true } };
      });
      c.print(opts.json, result, () => `subscription ${result.id} created\nsigning secret (shown once, give it to the receiver): ${result.secret}`);
      // A typo in --tenant gives a subscription that never receives anything: say so (not an error:
      // the schema may come later, or the application may write its events itself).
      if (!captured.exists || !captured.captured) {
        c.warn(
          `${captured.exists ? `nothing in schema "${opts.tenant}" is captured` : `schema "${opts.tenant}" does not exist in this database`}: ` +
            `the subscription receives events only once its tables are captured ("outbox-relay triggers install --schema ${opts.tenant}") or the application writes them with public.outbox_write_event`,
        );
      }
    });

  subs
    .command('list')
    .description('list subscriptions with their pending and dead deliveries (never their secrets)')
    .option('--tenant <schema>', 'only this tenant')
    .option('--json', 'print as JSON')
    .action(async (opts: { tenant?: string; json?: boolean }) => {
      const c = ctx();
      const rows = await c.withClient(async (client) => {
        await requireMigrated(client);
        return listSubscriptions(client, opts.tenant);
      });
      c.print(opts.json, rows, () =>
        rows.length === 0
          ? 'no subscriptions'
          : renderTable(
              ['ID', 'TENANT', 'USER', 'URL', 'EVENTS', 'ORDERING', 'ENABLED', 'PENDING', 'DEAD'],
              rows.map((r) => [r.id, r.tenant, r.userId, r.url, r.eventTypes.length ? r.eventTypes.join(',') : '*', r.ordering, r.enabled ? 'yes' : `no (${r.disabledReason ?? ''})`, r.pending, r.dead]),
            ),
      );
    });

  subs
    .command('update')
    .description('change a subscription\'s URL, event filter, processor, in-flight limit or timeout (tenant, user and ordering stay: add another subscription for those); unsent deliveries and retries go to the new URL')
    .argument('<id>', 'subscription id')
    .option('--url <url>', 'where to POST from now on (https; http outside production)')
    .option('--events <filter>', 'event types, comma-separated, "*" wildcards; "*" for all (applies to events fanned out from now on)')
    .option('--processor <name>', 'processor name written in acknowledgments')
    .option('--max-in-flight <n>', 'concurrent requests per relay replica')
    .option('--timeout-ms <ms>', 'request timeout')
    .option('--json', 'print the subscription as listed, after the change')
    // Not changeable; named so that trying says why instead of "unknown option".
    .addOption(new Option('--tenant <schema>').hideHelp())
    .addOption(new Option('--user <id>').hideHelp())
    .addOption(new Option('--ordering <mode>').hideHelp())
    .action(async (id: string, opts: { url?: string; events?: string; processor?: string; maxInFlight?: string; timeoutMs?: string; json?: boolean; tenant?: string; user?: string; ordering?: string }) => {
      const fixed = (['tenant', 'user', 'ordering'] as const).filter((k) => opts[k] !== undefined);
      if (fixed.length > 0) {
        throw new UsageError(
          `a subscription's ${fixed.join(' and ')} cannot be changed (its identity and how its pending deliveries were queued): disable it, remove it and add it again (outbox-relay subscriptions disable ${id}; subscriptions remove ${id}; subscriptions add …)`,
        );
      }
      const c = ctx();
      const cfg = c.config;
      const sid = parseSubscriptionId(id);
      const { changed, row } = await c.withClient(async (client) => {
        await requireMigrated(client);
        const fields = await updateSubscription(
          client,
          sid,
          { url: opts.url, events: opts.events, processor: opts.processor, maxInFlight: opts.maxInFlight, timeoutMs: opts.timeoutMs },
          { production: cfg.env === 'production', allowHttp: cfg.webhook.allowHttp, allowPrivateTargets: cfg.webhook.allowPrivateTargets },
        );
        return { changed: fields, row: (await listSubscriptions(client)).find((r) => r.id === sid) };
      });
      c.print(opts.json, row, () => `subscription ${sid} updated: ${changed.join(', ')}`);
    });

  subs
    .command('enable')
    .description('enable a subscription (deliveries kept after a 410 Gone resume)')
    .argument('<id>', 'subscription id')
    .option('--json', 'print as JSON')
    .action(async (id: string, opts: { json?: boolean }) => {
      const c = ctx();
      const sid = parseSubscriptionId(id);
      await c.withClient(async (client) => {
        await requireMigrated(client);
        await enableSubscription(client, sid);
      });
      c.print(opts.json, { id: sid, enabled: true }, () => `subscription ${sid} enabled`);
    });

  subs
    .command('disable')
    .description('disable a subscription: it receives nothing; its pending deliveries end as dead (requeue them with "replay")')
    .argument('<id>', 'subscription id')
    .option('--reason <text>', 'why (shown in list and in the dead deliveries; default "disabled by an operator", or the reason it was disabled for already)')
    .option('--json', 'print as JSON')
    .action(async (id: string, opts: { reason?: string; json?: boolean }) => {
      const c = ctx();
      const sid = parseSubscriptionId(id);
      const ended = await c.withClient(async (client) => {
        await requireMigrated(client);
        return disableSubscription(client, sid, opts.reason?.slice(0, 200));
      });
      c.print(opts.json, { id: sid, enabled: false, deadDeliveries: ended }, () =>
        `subscription ${sid} disabled${ended ? `; ${ended} pending deliveries are now dead (requeue: outbox-relay replay --subscription ${sid}, after enabling it)` : ''}`,
      );
    });

  subs
    .command('remove')
    .description('remove a disabled subscription with its deliveries and secrets (the user\'s acknowledgments stay); then the user may subscribe again')
    .argument('<id>', 'subscription id')
    .option('--json', 'print as JSON')
    .action(async (id: string, opts: { json?: boolean }) => {
      const c = ctx();
      const sid = parseSubscriptionId(id);
      const removed = await c.withClient(async (client) => {
        await requireMigrated(client);
        return removeSubscription(client, sid);
      });
      c.print(opts.json, { id: sid, removed: true, deliveries: removed }, () =>
        `subscription ${sid} removed${removed ? `, with ${removed} undelivered (dead) deliveries` : ''}`,
      );
    });

  subs
    .command('rotate-secret')
    .description('new signing secret; the old one keeps signing beside it for the grace period (WEBHOOK_SECRET_GRACE_MS)')
    .argument('<id>', 'subscription id')
    .option('--secret <whsec>', 'the new secret (default: a new random one)')
    .option('--grace-ms <ms>', 'how long the old secret keeps signing')
    .option('--json', 'print {"id":…,"secret":…,"previousValidUntil":…}')
    .action(async (id: string, opts: { secret?: string; graceMs?: string; json?: boolean }) => {
      const c = ctx();
      const sid = parseSubscriptionId(id);
      let grace = c.config.webhook.secretGraceMs;
      if (opts.graceMs !== undefined) {
        if (!/^\d+$/.test(opts.graceMs)) throw new UsageError(`--grace-ms must be a whole number of milliseconds, got ${JSON.stringify(opts.graceMs)}`);
        grace = Number(opts.graceMs);
      }
      const res = await c.withClient(async (client) => {
        await requireMigrated(client);
        return rotateSecret(client, sid, grace, opts.secret, secretCipherFor(c));
      });
      c.print(opts.json, { id: sid, ...res }, () =>
        `new signing secret of subscription ${sid} (shown once): ${res.secret}\n${grace > 0 && res.previousValidUntil ? `the previous secret signs too until ${res.previousValidUntil}` : 'the previous secret no longer signs'}`);
    });

  subs
    .command('reencrypt')
    .description('encrypt every stored signing secret with the current key (after turning encryption on, or after putting a new key first in OUTBOX_ENCRYPTION_KEYS)')
    .option('--json', 'print {"updated":N,"total":M}')
    .action(async (opts: { json?: boolean }) => {
      const c = ctx();
      const cipher = secretCipherFor(c);
      const res = await c.withClient(async (client) => {
        await requireMigrated(client);
        return reencryptSecrets(client, cipher);
      });
      c.print(opts.json, res, () => `${res.updated} of ${res.total} signing secrets re-encrypted with the current key`);
    });

  program
    .command('replay')
    .description('requeue dead deliveries (default), or re-send already delivered events with --delivered; prints how many')
    .option('--subscription <id>', 'a subscription (repeatable)', collect, [])
    .option('--tenant <schema>', 'events of this tenant')
    .option('--event-type <filter>', 'event types, comma-separated, "*" wildcards')
    .option('--since <time>', 'events created at or after (ISO 8601)')
    .option('--until <time>', 'events created before (ISO 8601)')
    .option('--delivered', 're-send events that were delivered (or predate the subscription) instead of requeuing dead ones')
    .option('--json', 'print {"queued":N}')
    .action(async (opts: { subscription: string[]; tenant?: string; eventType?: string; since?: string; until?: string; delivered?: boolean; json?: boolean }) => {
      const c = ctx();
      const subscriptionIds = opts.subscription.map((s) => parseSubscriptionId(s));
      const eventTypes = opts.eventType !== undefined ? parseEventFilter(opts.eventType) : undefined;
      const since = parseTime('--since', opts.since);
      const until = parseTime('--until', opts.until);
      const { queued, disabled, open } = await c.withClient(async (client) => {
        await requireMigrated(client);
        const { rows } = await client.query<{ id: number }>('SELECT id::int FROM public.outbox_subscriptions WHERE id = ANY($1::bigint[]) AND NOT enabled ORDER BY id', [subscriptionIds]);
        const n = await replay(client, {
          mode: opts.delivered ? 'delivered' : 'dead',
          subscriptionIds,
          ...(opts.tenant !== undefined ? { tenant: opts.tenant } : {}),
          ...(eventTypes ? { eventTypes } : {}),
          ...(since ? { since } : {}),
          ...(until ? { until } : {}),
        });
        const { rows: open } = await client.query<{ id: number; relays: number; probeAt: string | null }>(OPEN_CIRCUITS, [subscriptionIds, opts.tenant ?? null]);
        return { queued: n, disabled: rows.map((r) => r.id), open };
      });
      c.print(opts.json, { queued }, () => `${queued} deliveries queued`);
      for (const id of disabled) c.warn(`subscription ${id} is disabled: its deliveries wait until "outbox-relay subscriptions enable ${id}"`);
      if (queued > 0) {
        for (const o of open) {
          c.warn(`subscription ${o.id}'s circuit is open on ${o.relays} relay(s): its deliveries go once a probe${o.probeAt ? ` (next at ${o.probeAt})` : ''} finds the receiver answering`);
        }
      }
    });
}

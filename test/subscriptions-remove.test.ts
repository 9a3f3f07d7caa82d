/**
 * `subscriptions remove` (sql/016): only a disabled subscription; its deliveries (kept pending by a
 * 410 Gone, or dead), circuit states and secrets go with it, its user's acknowledgments stay (as
 * 'failed' for what it never received), the other subscription of the tenant is untouched, the
 * events it leaves behind are neither sent again nor kept for ever, and the user may subscribe again.
 */
import t from 'tap';
import { createLogger } from '../src/log.js';
import { runRetention } from '../src/maintenance/retention.js';
import { REQUEUE_STRANDED_SQL } from '../src/maintenance/strandedSweep.js';
import { runCli } from './helpers/cli.js';
import { freshDatabase } from './helpers/db.js';
import { answer, startReceiver } from './helpers/receiver.js';
import { count, createTenant, expectedWebhookId, startRelay, subscribe, tenantName, waitFor, writeAll } from './helpers/relay.js';

t.test('remove: refused while enabled; a 410-disabled subscription goes with its kept deliveries; history stays', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('rm');
  await createTenant(db, tenant);
  const good = await startReceiver(t);
  const gone = await startReceiver(t, { respond: (_r, res) => answer(res, 410) });
  const keep = await subscribe(db, { tenant, userId: 1, url: good.url('/keep') });
  const drop = await subscribe(db, { tenant, userId: 2, url: gone.url('/drop') });
  good.secrets.push(keep.secret);
  const env = { DATABASE_URL: db.url };

  const enabled = await runCli(['subscriptions', 'remove', String(drop.id)], env);
  t.equal(enabled.code, 2, 'an enabled subscription is not removed (usage error)');
  t.match(enabled.stderr, new RegExp(`subscription ${drop.id} is enabled; disable it first \\(outbox-relay subscriptions disable ${drop.id}\\)`));
  const missing = await runCli(['subscriptions', 'remove', '999999'], env);
  t.equal(missing.code, 2);
  t.match(missing.stderr, /subscription 999999 does not exist/);
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_subscriptions'), 2, 'both subscriptions still there');

  const relay = await startRelay(t, db.url);
  const EVENTS = 5;
  await writeAll(db, [`INSERT INTO ${tenant}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, ${EVENTS}) g`]);
  await waitFor(() => good.delivered.size === EVENTS, 15_000, 'the healthy subscription to receive every event');
  await waitFor(async () => (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_subscriptions WHERE id = $1 AND NOT enabled', [drop.id])) === 1,
    15_000, 'the 410 to disable the other');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE subscription_id = $1 AND state <> 'dead'", [drop.id]), EVENTS,
    'its deliveries are kept pending, as a 410 does');

  // The user acknowledged one of them by pull: the relay never overwrites that, so this event will
  // carry no relay acknowledgment after the removal (and must still not be sent again).
  const pulled = (await db.query<{ id: string }>('SELECT min(id)::text AS id FROM public.outbox_events WHERE tenant = $1', [tenant])).rows[0]!.id;
  await db.query("INSERT INTO public.event_acknowledgments (event_id, user_id, tenant, processor, status, source) VALUES ($1, 2, $2, 'flowgram.ai', 'processed', 'pull')", [pulled, tenant]);

  const removed = await runCli(['subscriptions', 'remove', String(drop.id), '--json'], env);
  t.equal(removed.code, 0, removed.stderr);
  t.same(JSON.parse(removed.stdout), { id: drop.id, removed: true, deliveries: EVENTS }, 'it says how many deliveries went with it');
  for (const table of ['outbox_deliveries', 'outbox_subscription_secrets', 'outbox_circuit_states']) {
    t.equal(await count(db, `SELECT count(*)::int AS n FROM public.${table} WHERE subscription_id = $1`, [drop.id]), 0, `nothing of it left in ${table}`);
  }
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_subscriptions WHERE id = $1', [drop.id]), 0, 'the subscription is gone');
  const acks = await db.query<{ status: string; error: string }>(
    "SELECT status::text, metadata->>'error' AS error FROM public.event_acknowledgments WHERE user_id = 2 AND source = 'relay'");
  t.equal(acks.rows.length, EVENTS - 1, 'its user has a relay acknowledgment per event it never received (but the one it acknowledged by pull)');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE user_id = 2 AND source = 'pull'"), 1, 'its pull acknowledgment is untouched');
  t.ok(acks.rows.every((a) => a.status === 'failed' && /subscription removed/.test(a.error)), "each 'failed', saying why");
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE user_id = 1 AND status = 'processed'"), EVENTS,
    "the other subscription's acknowledgments are untouched");
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.outbox_events WHERE tenant = $1 AND status = 'failed'", [tenant]), EVENTS,
    'the events roll up as failed (one of their receivers never got them)');

  // Left behind: not stranded (never sent again), and deleted by retention after RETENTION_DEAD_DAYS.
  t.equal((await db.query<{ n: number }>(REQUEUE_STRANDED_SQL, ['0 seconds', 1000, null, null])).rows[0]!.n, 0, 'the sweep does not queue them again');
  const list = await runCli(['subscriptions', 'list', '--json'], env);
  t.same((JSON.parse(list.stdout) as Array<{ id: number }>).map((s) => s.id), [keep.id], 'list shows the remaining subscription only');

  // The user may subscribe again (one subscription per tenant and user); the relay serves it.
  const again = await runCli(['subscriptions', 'add', '--tenant', tenant, '--user', '2', '--url', good.url('/again'), '--ordering', 'none', '--json'],
    { ...env, WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true' });
  t.equal(again.code, 0, 'the user subscribes again');
  const fresh = JSON.parse(again.stdout) as { id: number; secret: string };
  good.secrets.push(fresh.secret);
  await writeAll(db, [`INSERT INTO ${tenant}.vendors (id, name) VALUES (100, 'after')`]);
  await waitFor(() => good.at('/again').length === 1 && good.at('/keep').length === EVENTS + 1, 15_000, 'the new event to reach both subscriptions');
  const newEvent = (await db.query<{ id: string }>(`SELECT id::text FROM public.outbox_events WHERE tenant = $1 AND aggregate_id = '100'`, [tenant])).rows[0]!.id;
  t.ok(good.delivered.has(expectedWebhookId(newEvent, fresh.id)), 'the new subscription receives events from then on');
  t.equal(gone.requests.length >= 1, true, 'the removed receiver was only ever asked before it answered 410');
  const goneBefore = gone.requests.length;
  await relay.stop();
  t.equal(gone.requests.length, goneBefore, 'and never again');

  const pool = db.pool();
  const logger = createLogger({ level: 'silent' });
  const notYet = await runRetention(pool, { days: 30, deadDays: 90, batchSize: 100, logger });
  t.equal(notYet.deadEvents, 0, 'young events stay');
  const later = await runRetention(pool, { days: 30, deadDays: 90, batchSize: 100, logger, now: new Date(Date.now() + 91 * 86_400_000) });
  t.equal(later.deadEvents, EVENTS, 'after RETENTION_DEAD_DAYS retention deletes the events whose receivers are gone');
});

t.test('disabling a disabled subscription again keeps its reason unless a new one is given', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('dr');
  await createTenant(db, tenant);
  const sub = await subscribe(db, { tenant, userId: 1, url: 'https://example.com/hook' });
  const env = { DATABASE_URL: db.url };
  const reason = async () => (await db.query<{ r: string }>('SELECT disabled_reason AS r FROM public.outbox_subscriptions WHERE id = $1', [sub.id])).rows[0]?.r;
  t.equal((await runCli(['subscriptions', 'disable', String(sub.id)], env)).code, 0);
  t.equal(await reason(), 'disabled by an operator', 'the default reason');
  // As a 410 Gone leaves it.
  await db.query("UPDATE public.outbox_subscriptions SET disabled_reason = 'receiver answered 410 Gone' WHERE id = $1", [sub.id]);
  t.equal((await runCli(['subscriptions', 'disable', String(sub.id)], env)).code, 0);
  t.equal(await reason(), 'receiver answered 410 Gone', 'a second disable without --reason keeps the reason it had');
  t.equal((await runCli(['subscriptions', 'disable', String(sub.id), '--reason', 'moved to a new URL'], env)).code, 0);
  t.equal(await reason(), 'moved to a new URL', 'a new --reason replaces it');
});

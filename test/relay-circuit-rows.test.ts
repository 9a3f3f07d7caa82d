/**
 * What `status` shows as open circuits (public.outbox_circuit_states) stays true: a new URL resets
 * the subscription's circuit (and the waiting deliveries go out at once, not after the cool-down), a
 * disabled subscription's circuit goes, and rows left by a relay on this host that is gone (kill -9)
 * are cleared when a relay starts.
 */
import { hostname } from 'node:os';
import t from 'tap';
import { runCli } from './helpers/cli.js';
import { freshDatabase } from './helpers/db.js';
import { answer, startReceiver } from './helpers/receiver.js';
import { count, createTenant, startRelay, subscribe, tenantName, waitFor, writeAll } from './helpers/relay.js';

const OPEN_LONG = {
  CIRCUIT_FAILURE_THRESHOLD: '2',
  CIRCUIT_COOLDOWN_MS: '600000',
  CIRCUIT_MAX_COOLDOWN_MS: '600000',
  RETRY_MAX_ATTEMPTS: '20',
};

t.test('a new URL resets the circuit; disabling clears it; rows of relays gone from this host are cleared at start', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('cb');
  await createTenant(db, tenant);
  const bad = await startReceiver(t, { respond: (_r, res) => answer(res, 500, 'broken') });
  const good = await startReceiver(t);
  const moved = await subscribe(db, { tenant, userId: 1, url: bad.url('/moved') });
  const dropped = await subscribe(db, { tenant, userId: 2, url: bad.url('/dropped') });
  good.secrets.push(moved.secret);

  // Rows as a relay killed with -9 on this host leaves them, beside ones that must stay.
  const gone = `${hostname()}:999999999`;
  const alive = `${hostname()}:${process.pid}`;
  for (const worker of [gone, alive, 'another-host:1']) {
    await db.query("INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state, probe_at, changed_at) VALUES ($1, $2, 'open', now(), now())", [moved.id, worker]);
  }
  await startRelay(t, db.url, OPEN_LONG);
  const workers = (await db.query<{ worker_id: string }>('SELECT worker_id FROM public.outbox_circuit_states ORDER BY 1')).rows.map((r) => r.worker_id);
  t.same(workers, [alive, 'another-host:1'].sort(), 'the row of the stopped local relay is gone; a live pid and another host are not judged');
  await db.query('DELETE FROM public.outbox_circuit_states');

  await writeAll(db, [`INSERT INTO ${tenant}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 3) g`]);
  const openRows = (id: number) => count(db, "SELECT count(*)::int AS n FROM public.outbox_circuit_states WHERE subscription_id = $1 AND state = 'open'", [id]);
  await waitFor(async () => (await openRows(moved.id)) === 1 && (await openRows(dropped.id)) === 1, 15_000, 'both circuits to open',
    () => ({ bad: bad.requests.length }));

  // The receiver moved: with a 10-minute cool-down, only a reset circuit sends before then.
  const update = await runCli(['subscriptions', 'update', String(moved.id), '--url', good.url('/moved'), '--json'], { DATABASE_URL: db.url, WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true' });
  t.equal(update.code, 0, 'update accepted');
  await waitFor(() => good.delivered.size === 3, 15_000, 'the three events to reach the new URL at once', () => ({ good: good.requests.length }));
  await waitFor(async () => (await openRows(moved.id)) === 0, 10_000, 'its open circuit to leave status');

  const disable = await runCli(['subscriptions', 'disable', String(dropped.id)], { DATABASE_URL: db.url });
  t.equal(disable.code, 0, 'disable accepted');
  await waitFor(async () => (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_circuit_states WHERE subscription_id = $1', [dropped.id])) === 0,
    15_000, 'the disabled subscription\'s circuit to leave status');
  t.pass('no stale circuit is left');
});

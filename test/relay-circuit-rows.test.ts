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
  const relay = await startRelay(t, db.url, OPEN_LONG);
  // (Its own row may be there too: the open rows make it start that circuit half-open, and its first
  // heartbeat records that.)
  const workers = (await db.query<{ worker_id: string }>('SELECT worker_id FROM public.outbox_circuit_states WHERE worker_id <> $1 ORDER BY 1', [relay.config.relay.workerId])).rows.map((r) => r.worker_id);
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

t.test('circuit rows say when a relay last vouched for them: status hides old ones, relays delete very old ones, and rewrite their own', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('cs');
  await createTenant(db, tenant);
  const bad = await startReceiver(t, { respond: (_r, res) => answer(res, 500, 'broken') });
  const sub = await subscribe(db, { tenant, userId: 1, url: bad.url('/hook') });
  // Rows of relays in other containers (another hostname each): one gone 11 minutes ago, one gone
  // 3 minutes ago, and one that vouched for its row just now.
  const rows: Array<[string, string]> = [['gone-long:1', '11 minutes'], ['gone-lately:1', '3 minutes'], ['alive:1', '0 seconds']];
  for (const [worker, age] of rows) {
    await db.query("INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state, probe_at, changed_at, seen_at) VALUES ($1, $2, 'open', now(), now() - $3::interval, now() - $3::interval)",
      [sub.id, worker, age]);
  }
  const statusCircuits = async () => {
    const res = await runCli(['status', '--json'], { DATABASE_URL: db.url });
    t.equal(res.code, 0, 'status runs');
    const report = JSON.parse(res.stdout) as { attention: Array<{ id: number; circuits: Array<{ worker: string }> | null }> };
    return (report.attention.find((a) => a.id === sub.id)?.circuits ?? []).map((c) => c.worker).sort();
  };
  t.same(await statusCircuits(), ['alive:1'],
    'status shows only the row seen in the last 2 minutes');

  // replay says what its deliveries wait for: the circuit open on a live relay (not the one gone).
  await writeAll(db, [`INSERT INTO ${tenant}.vendors (id, name) VALUES (100, 'dead')`]);
  await db.query(`WITH q AS (DELETE FROM public.outbox_fanout_queue RETURNING event_id)
                  INSERT INTO public.outbox_deliveries (event_id, subscription_id, state, attempts) SELECT event_id, $1, 'dead', 5 FROM q`, [sub.id]);
  // Another subscription of the tenant, with a circuit open too: replay did not choose it.
  const other = await subscribe(db, { tenant, userId: 2, url: bad.url('/other') });
  await db.query("INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state, probe_at, changed_at, seen_at) VALUES ($1, 'other:1', 'open', now(), now(), now())", [other.id]);
  const replayed = await runCli(['replay', '--subscription', String(sub.id), '--tenant', tenant], { DATABASE_URL: db.url });
  t.equal(replayed.code, 0, replayed.stderr);
  t.notMatch(replayed.stderr, new RegExp(`subscription ${other.id}'s`), 'with --subscription and --tenant, only the chosen subscription\'s circuit is named');
  await db.query('DELETE FROM public.outbox_circuit_states WHERE subscription_id = $1', [other.id]);
  await db.query('UPDATE public.outbox_subscriptions SET enabled = false WHERE id = $1', [other.id]); // out of the way of what follows
  t.match(replayed.stdout, /^1 deliveries queued$/m);
  t.match(replayed.stderr, new RegExp(`subscription ${sub.id}'s circuit is open on 1 relay\\(s\\): its deliveries go once a probe \\(next at \\d{4}-\\d\\d-\\d\\dT[0-9:]+Z\\) finds the receiver answering`),
    `replay names the open circuit: ${replayed.stderr.trim()}`);
  await db.query('DELETE FROM public.outbox_deliveries');

  const relay = await startRelay(t, db.url, OPEN_LONG);
  const workers = async () => (await db.query<{ worker_id: string }>('SELECT worker_id FROM public.outbox_circuit_states ORDER BY 1')).rows.map((r) => r.worker_id);
  const own = relay.config.relay.workerId;
  await waitFor(async () => !(await workers()).includes('gone-long:1'), 10_000, 'the heartbeat at start to delete the row unseen for 10 minutes');
  t.same((await workers()).filter((w) => w !== own), ['alive:1', 'gone-lately:1'], 'rows seen more lately are left to expire');

  // This relay's own circuit opens; a row lost (deleted by hand, a failed write) is written again by
  // its next heartbeat, and one it does not vouch for any more goes.
  await writeAll(db, [`INSERT INTO ${tenant}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 3) g`]);
  await waitFor(async () => (await count(db, "SELECT count(*)::int AS n FROM public.outbox_circuit_states WHERE worker_id = $1 AND state = 'open'", [own])) === 1,
    15_000, 'its circuit to open and be recorded');
  t.same(await statusCircuits(), ['alive:1', own].sort(), 'status shows it beside the live row of the other relay');
  await db.query('DELETE FROM public.outbox_circuit_states WHERE worker_id = $1', [own]);
  await db.query("INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state) VALUES ($1 + 1000, $2, 'open')", [sub.id, own]);
  await relay.daemon.circuits.sync();
  const { rows: mine } = await db.query<{ subscription_id: string; state: string; fresh: boolean }>(
    "SELECT subscription_id::text, state, seen_at > now() - interval '5 seconds' AS fresh FROM public.outbox_circuit_states WHERE worker_id = $1", [own]);
  t.same(mine, [{ subscription_id: String(sub.id), state: 'open', fresh: true }], 'a heartbeat writes its open circuit again and drops the row it does not vouch for');
});

t.test('a relay that starts while another has a subscription\'s circuit open sends one probe first, not one attempt per due delivery', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('cp');
  await createTenant(db, tenant);
  const down = await startReceiver(t, { respond: (_r, res) => answer(res, 503, 'down') });
  const back = await startReceiver(t);
  const dead = await subscribe(db, { tenant, userId: 1, url: down.url('/down') });
  const healed = await subscribe(db, { tenant, userId: 2, url: back.url('/back') });
  back.secrets.push(healed.secret);
  // Another relay (another container) has both circuits open, and vouched for that just now.
  for (const id of [dead.id, healed.id]) {
    await db.query("INSERT INTO public.outbox_circuit_states (subscription_id, worker_id, state, probe_at) VALUES ($1, 'other-relay:1', 'open', now() + interval '1 minute')", [id]);
  }
  await writeAll(db, [`INSERT INTO ${tenant}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 6) g`]);
  // A threshold of 10: a closed circuit would send all six to the dead receiver before opening.
  const relay = await startRelay(t, db.url, { ...OPEN_LONG, CIRCUIT_FAILURE_THRESHOLD: '10', LOG_LEVEL: 'info' });
  await waitFor(() => back.delivered.size === 6, 15_000, 'the healed receiver to get everything once its probe succeeded', () => ({ back: back.requests.length }));
  await waitFor(() => down.requests.length >= 1, 5_000, 'the probe to the dead receiver');
  await new Promise((r) => setTimeout(r, 1_000));
  t.equal(down.requests.length, 1, 'the dead receiver got one probe, then the circuit opened (not six attempts)');
  t.equal(relay.logs.lines.filter((l) => l.msg === 'circuit starts half-open: a relay had it open lately, so one probe goes first').length, 2, 'logged for each');
  t.same(relay.relay.circuits().map((c) => [c.subscriptionId, c.state]).sort(), [[dead.id, 'open'], [healed.id, 'closed']].sort(), 'open for the dead one, closed for the healed one');
});

t.test('a relay restarted during an outage starts the circuit its predecessor had open half-open', async (t) => {
  const db = await freshDatabase(t);
  const tenant = tenantName('cr');
  await createTenant(db, tenant);
  const down = await startReceiver(t, { respond: (_r, res) => answer(res, 503, 'down') });
  const sub = await subscribe(db, { tenant, userId: 1, url: down.url('/down') });
  const first = await startRelay(t, db.url, { ...OPEN_LONG, CIRCUIT_FAILURE_THRESHOLD: '2' });
  await writeAll(db, [`INSERT INTO ${tenant}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 6) g`]);
  await waitFor(() => first.relay.circuits().some((c) => c.subscriptionId === sub.id && c.state === 'open'), 10_000, 'the circuit to open');
  await first.stop();
  const statusCircuits = async () => {
    const res = await runCli(['status', '--json'], { DATABASE_URL: db.url });
    return (JSON.parse(res.stdout) as { attention: Array<{ id: number; circuits: unknown[] | null }> }).attention.find((a) => a.id === sub.id)?.circuits ?? null;
  };
  t.equal(await statusCircuits(), null, 'a graceful stop takes its circuits out of status');
  const before = down.requests.length;
  // A new process (a new worker id), as a rollout or a restart gives.
  const second = await startRelay(t, db.url, { ...OPEN_LONG, CIRCUIT_FAILURE_THRESHOLD: '10', LOG_LEVEL: 'info' });
  await waitFor(() => down.requests.length > before, 10_000, 'the probe');
  await new Promise((r) => setTimeout(r, 1_000));
  t.equal(down.requests.length - before, 1, 'one probe, not one attempt per due delivery (a closed circuit with threshold 10 would send all six)');
  t.ok(second.logs.lines.some((l) => l.msg === 'circuit starts half-open: a relay had it open lately, so one probe goes first'), 'and says why');
});

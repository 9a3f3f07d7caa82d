/**
 * Ordering and isolation (invariants 4 and 5): per-aggregate commit order under a receiver that
 * fails every first attempt, a retrying aggregate holding back only itself, ordering 'none', and a
 * dead subscriber beside a healthy one (the healthy one unaffected, the circuit open).
 */
import t from 'tap';
import type { CircuitState } from '../src/relay/circuitBreaker.js';
import { freshDatabase, type TestDatabase } from './helpers/db.js';
import { answer, startReceiver, type ReceivedRequest } from './helpers/receiver.js';
import { count, createTenant, expectedWebhookId, startRelay, subscribe, tenantName, unprocessed, waitFor, writeAll } from './helpers/relay.js';

interface Body {
  id: string;
  aggregate_id: string;
  event_type: string;
  payload: { new_data: { seq: number } | null };
}
const parse = (r: ReceivedRequest) => JSON.parse(r.body) as Body;

async function eventsByAggregate(db: TestDatabase, tenant: string): Promise<Map<string, string[]>> {
  const { rows } = await db.query<{ id: string; aggregate_id: string }>(
    'SELECT id::text, aggregate_id FROM public.outbox_events WHERE tenant = $1 ORDER BY outbox_events.id', [tenant]);
  const m = new Map<string, string[]>();
  for (const r of rows) m.set(r.aggregate_id, [...(m.get(r.aggregate_id) ?? []), r.id]);
  return m;
}

/** Interleaved single-row transactions: for each step, every aggregate changes once (commit order = statement order). */
function interleavedWrites(tenant: string, aggregates: number, steps: number, firstId = 1): string[] {
  const out: string[] = [];
  const last = firstId + aggregates - 1;
  for (let v = firstId; v <= last; v++) out.push(`INSERT INTO ${tenant}.vendors (id, name, seq) VALUES (${v}, 'v${v}', 0)`);
  for (let k = 1; k < steps; k++) for (let v = firstId; v <= last; v++) out.push(`UPDATE ${tenant}.vendors SET seq = ${k} WHERE id = ${v}`);
  return out;
}

t.test('ordering aggregate: one aggregate\'s events arrive in commit order although every first attempt fails', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('to');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), ordering: 'aggregate' });
  recv.secrets.push(sub.secret);
  recv.respond = (r, res) => answer(res, r.attempt === 1 ? 500 : 200);
  await startRelay(t, db.url, { CIRCUIT_FAILURE_THRESHOLD: '1000' });
  const AGGREGATES = 10;
  const STEPS = 8;
  await writeAll(db, interleavedWrites(T, AGGREGATES, STEPS));
  const expected = await eventsByAggregate(db, T);
  const total = AGGREGATES * STEPS;
  await waitFor(async () => recv.delivered.size === total && (await unprocessed(db)) === 0, 30_000, 'every event delivered', () => recv.delivered.size);

  for (const [agg, ids] of expected) {
    const reqs = recv.requests.filter((r) => parse(r).aggregate_id === agg);
    const okOrder = [...recv.delivered.values()].filter((r) => parse(r).aggregate_id === agg).sort((a, b) => a.seq - b.seq);
    t.same(okOrder.map((r) => parse(r).id), ids, `aggregate ${agg}: delivered in commit order`);
    t.same(okOrder.map((r) => parse(r).payload.new_data?.seq), [...Array(STEPS).keys()], `aggregate ${agg}: seq 0..${STEPS - 1}`);
    // Every attempt, failed ones included: the next event is not even tried before the previous succeeded.
    const attempts = reqs.sort((a, b) => a.seq - b.seq).map((r) => parse(r).id);
    t.same(attempts, ids.flatMap((id) => [id, id]), `aggregate ${agg}: a retrying event holds back the later ones (fail, retry, next)`);
  }
  t.ok(recv.requests.every((r) => r.verified), 'all signed');
  t.equal(recv.requests.length, 2 * total, 'two attempts per event, no more');
});

t.test('a retrying aggregate holds back only itself; with ordering none nothing is held back', async (t) => {
  const db = await freshDatabase(t);
  const A = tenantName('toa');
  const N = tenantName('ton');
  await createTenant(db, A);
  await createTenant(db, N);
  const recvA = await startReceiver(t);
  const recvN = await startReceiver(t);
  const subA = await subscribe(db, { tenant: A, userId: 1, url: recvA.url(), ordering: 'aggregate' });
  const subN = await subscribe(db, { tenant: N, userId: 1, url: recvN.url(), ordering: 'none' });
  recvA.secrets.push(subA.secret);
  recvN.secrets.push(subN.secret);
  // Vendor 1 is "stuck": every attempt fails until released. Everything else: first attempt fails, then ok.
  let released = false;
  const respond = (r: ReceivedRequest, res: Parameters<typeof answer>[0]) => {
    if (parse(r).aggregate_id === '1' && !released) return answer(res, 503);
    answer(res, r.attempt === 1 ? 500 : 200);
  };
  recvA.respond = respond;
  recvN.respond = respond;
  await startRelay(t, db.url, { CIRCUIT_FAILURE_THRESHOLD: '1000', RETRY_MAX_ATTEMPTS: '100', RETRY_MAX_MS: '200' });
  // The stuck aggregate's events come first in commit order, then the rest.
  const writes = (T: string) => [
    `INSERT INTO ${T}.vendors (id, name, seq) VALUES (1, 'stuck', 0)`,
    `UPDATE ${T}.vendors SET seq = 1 WHERE id = 1`,
    `UPDATE ${T}.vendors SET seq = 2 WHERE id = 1`,
    ...interleavedWrites(T, 6, 3, 2),
  ];
  await writeAll(db, [...writes(A), ...writes(N)]);
  const expA = await eventsByAggregate(db, A);
  const expN = await eventsByAggregate(db, N);
  const othersA = [...expA].filter(([agg]) => agg !== '1').flatMap(([, ids]) => ids);
  const othersN = [...expN].filter(([agg]) => agg !== '1').flatMap(([, ids]) => ids);
  t.equal(othersA.length, 18);

  // While vendor 1 keeps failing, everything else flows.
  const deliveredEvents = (recv: typeof recvA) => new Set([...recv.delivered.values()].map((r) => parse(r).id));
  await waitFor(() => othersA.every((id) => deliveredEvents(recvA).has(id)) && othersN.every((id) => deliveredEvents(recvN).has(id)), 20_000,
    'the other aggregates to be delivered while vendor 1 retries');
  const stuckA = expA.get('1') as string[];
  const stuckN = expN.get('1') as string[];
  t.notOk(stuckA.some((id) => deliveredEvents(recvA).has(id)), 'aggregate: vendor 1 not delivered yet');
  t.same(new Set(recvA.requests.filter((r) => parse(r).aggregate_id === '1').map((r) => parse(r).id)), new Set([stuckA[0]]),
    'aggregate: only the head of vendor 1 was tried; its later events wait');
  t.same(new Set(recvN.requests.filter((r) => parse(r).aggregate_id === '1').map((r) => parse(r).id)), new Set(stuckN),
    'ordering none: all of vendor 1\'s events are tried at once, none held back');
  t.ok(recvA.requests.filter((r) => parse(r).aggregate_id === '1').length >= 2, 'vendor 1 is being retried');

  released = true;
  await waitFor(async () => recvA.delivered.size === othersA.length + 3 && recvN.delivered.size === othersN.length + 3 && (await unprocessed(db)) === 0,
    20_000, 'vendor 1 to be delivered once released');
  const okA = [...recvA.delivered.values()].filter((r) => parse(r).aggregate_id === '1').sort((a, b) => a.seq - b.seq).map((r) => parse(r).id);
  t.same(okA, stuckA, 'aggregate: vendor 1 delivered in commit order after its retries');
  t.same([...recvN.delivered.keys()].sort(), [...expN.values()].flat().map((id) => expectedWebhookId(id, subN.id)).sort(), 'ordering none: everything delivered');
});

t.test('a dead subscriber beside a healthy one: the healthy one gets everything while the dead one times out; its circuit opens', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tx');
  await createTenant(db, T);
  const healthy = await startReceiver(t);
  const dead = await startReceiver(t, { respond: () => undefined }); // accepts, reads, never answers
  const subH = await subscribe(db, { tenant: T, userId: 1, url: healthy.url('/ok'), ordering: 'aggregate' });
  const subD = await subscribe(db, { tenant: T, userId: 2, url: dead.url('/dead'), ordering: 'aggregate', maxInFlight: 8, timeoutMs: 500 });
  healthy.secrets.push(subH.secret);
  dead.secrets.push(subD.secret);
  const relay = await startRelay(t, db.url, {
    RETRY_MAX_ATTEMPTS: '5',
    CIRCUIT_FAILURE_THRESHOLD: '5',
    CIRCUIT_COOLDOWN_MS: '500',
    CIRCUIT_MAX_COOLDOWN_MS: '2000',
  });
  const circuits: Array<{ sub: number; state: CircuitState }> = [];
  relay.relay.on('circuit', (sub, _tenant, state) => circuits.push({ sub, state }));
  // Failed attempts to the healthy subscriber, for the failure message should there be any.
  const healthyFailures: unknown[] = [];
  relay.relay.on('attempt', (a) => {
    if (a.subscriptionId === subH.id && !a.result.ok) healthyFailures.push({ event: a.eventId, attempt: a.attempt, error: a.result.error, ms: a.result.durationMs });
  });

  const N = 400;
  const batch = (from: number, to: number) => {
    const out: string[] = [];
    for (let i = from; i <= to; i += 50) out.push(`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(${i}, ${Math.min(i + 49, to)}) g`);
    return out;
  };
  const liveDead = () => count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE subscription_id = $1 AND state <> 'dead'", [subD.id]);
  const opened = () => circuits.filter((c) => c.sub === subD.id && c.state === 'open').length;

  // Phase 1: the first half. The healthy subscriber gets all of it while the dead one is still timing out.
  await writeAll(db, batch(1, N / 2));
  await waitFor(() => healthy.delivered.size === N / 2, 30_000, 'the healthy subscriber to receive the first half', () => ({ healthy: healthy.delivered.size, dead: dead.requests.length }));
  t.equal(await liveDead(), N / 2, 'meanwhile every delivery of the dead subscriber is still pending');
  t.ok(dead.requests.length > 0, `the dead subscriber is being tried (${dead.requests.length} requests so far)`);

  // Phase 2: its circuit opens; the second half flows to the healthy one all the same.
  await waitFor(() => opened() >= 1, 15_000, 'the dead subscription\'s circuit to open');
  await writeAll(db, batch(N / 2 + 1, N));
  await waitFor(() => healthy.delivered.size === N, 30_000, 'the healthy subscriber to receive everything', () => ({ healthy: healthy.delivered.size, dead: dead.requests.length }));
  t.equal(await liveDead(), N, 'when the healthy one has everything, the dead one still has every delivery pending');
  t.equal(dead.delivered.size, 0, 'nothing was delivered to the dead subscriber');
  t.same(healthy.requests.length, N, 'the healthy subscriber got each event once', { failures: healthyFailures.slice(0, 10) });
  t.ok(healthy.requests.every((r) => r.verified), 'signed');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE user_id = 1'), N, 'the healthy user acknowledged every event');
  t.notOk(circuits.some((c) => c.sub === subH.id), 'the healthy subscription\'s circuit never moved');

  // Phase 3: half-open probes fail and the circuit re-opens: a trickle of requests, not one per event per attempt.
  await waitFor(() => opened() >= 3, 20_000, 'two failed half-open probes', () => circuits);
  const state = relay.relay.circuits().find((c) => c.subscriptionId === subD.id)?.state;
  t.not(state, 'closed', `the dead subscription's circuit is not closed (${state})`);
  const requests = dead.requests.length;
  t.ok(requests < N / 4, `requests to the dead subscriber stay far below events x attempts (${requests} << ${N} x 5)`);
  t.ok(dead.requests.every((r) => r.verified && !r.answered), 'each of them signed, and timed out');
  await waitFor(async () => (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE subscription_id = $1 AND locked_by IS NOT NULL', [subD.id])) <= 1,
    10_000, 'leases claimed ahead to be given back while the circuit is open');
  const { rows } = await db.query<{ attempts: number; dead: number }>(
    "SELECT coalesce(sum(attempts), 0)::int AS attempts, count(*) FILTER (WHERE state = 'dead')::int AS dead FROM public.outbox_deliveries WHERE subscription_id = $1", [subD.id]);
  t.ok((rows[0]?.attempts ?? 0) <= dead.requests.length + 1, `attempts counted = requests sent (${rows[0]?.attempts} <= ${dead.requests.length} + a probe in flight): none burned while open`);
  t.equal(rows[0]?.dead, 0, 'no delivery of the dead subscriber died: they wait for it');
});

/**
 * Faults and lifecycle of the relay as a process (`node dist/cli.js run`): kill -9 mid-stream, a
 * PostgreSQL restart mid-stream (on a private embedded server), three replicas side by side, a clean
 * SIGTERM, standby (ENABLE_OUTBOX_PROCESSING=false), and rows with huge or odd data.
 * Invariants 1, 2 and 6: nothing lost, duplicates bounded by work in flight, any number of replicas.
 */
import t from 'tap';
import { startEmbeddedPostgres } from '../src/db/embeddedPostgres.js';
import { freshDatabase } from './helpers/db.js';
import { answer, startReceiver, type ReceivedRequest, type Receiver } from './helpers/receiver.js';
import { byWebhookId, count, createTenant, eventIds, expectedWebhookId, spawnRelay, startRelay, subscribe, tenantName, unprocessed, waitFor, writeAll } from './helpers/relay.js';

/** Bulk inserts of `rows` vendors in statements of `per` rows, from id `first`. */
function bulkInserts(tenant: string, first: number, rows: number, per = 50): string[] {
  const out: string[] = [];
  for (let i = first; i < first + rows; i += per) {
    out.push(`INSERT INTO ${tenant}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(${i}, ${Math.min(i + per, first + rows) - 1}) g`);
  }
  return out;
}

/** A receiver that answers 200 after `delayMs` (so that work is in flight), verifying signatures. */
function slowOk(recv: Receiver, delayMs: number): void {
  recv.respond = (r, res) => {
    setTimeout(() => answer(res, r.verified ? 200 : 401), delayMs);
  };
}

/** Duplicates: requests beyond the first per webhook-id. */
const duplicates = (reqs: readonly ReceivedRequest[]) => reqs.length - byWebhookId(reqs).size;

t.test('kill -9 mid-stream, then a new relay: nothing lost, duplicates bounded by work in flight', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tk');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const MAX_IN_FLIGHT = 16;
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), maxInFlight: MAX_IN_FLIGHT, timeoutMs: 500 });
  recv.secrets.push(sub.secret);
  slowOk(recv, 3);
  const env = { RELAY_LEASE_MS: '1500', LOG_LEVEL: 'info' };
  const N = 2000;
  await writeAll(db, bulkInserts(T, 1, N / 2));
  const first = spawnRelay(t, db.url, env);
  let killedAt = -1;
  const respond = recv.respond;
  recv.respond = (r, res, raw) => {
    // kill -9 from inside the stream: at the 300th request, with more in flight and queued.
    if (r.seq === 300 && first.running) {
      killedAt = recv.delivered.size;
      first.kill('SIGKILL');
    }
    return respond(r, res, raw);
  };
  const writing = writeAll(db, bulkInserts(T, N / 2 + 1, N / 2)); // the writer goes on meanwhile
  const exit = await first.exited;
  t.equal(exit.signal, 'SIGKILL', 'the first relay was killed with SIGKILL');
  t.ok(killedAt >= 0 && killedAt < N, `it was killed mid-stream (${killedAt} of ${N} delivered)`);
  await writing;
  const second = spawnRelay(t, db.url, env);
  const ids = await eventIds(db, T);
  t.equal(ids.length, N);
  await waitFor(async () => recv.delivered.size === N && (await unprocessed(db)) === 0, 45_000, 'every event delivered by the second relay',
    () => ({ delivered: recv.delivered.size, requests: recv.requests.length, relay: second.diag() }));
  t.same([...recv.delivered.keys()].sort(), ids.map((id) => expectedWebhookId(id, sub.id)).sort(), 'nothing lost: every event arrived');
  const dupes = duplicates(recv.requests);
  t.ok(dupes <= 2 * MAX_IN_FLIGHT, `duplicates (${dupes}) bounded by the work in flight at the crash (<= ${2 * MAX_IN_FLIGHT} claimed)`);
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries'), 0, 'the queue is empty');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed'"), N, 'every event acknowledged');
  t.ok(second.running, 'the second relay is running');
  t.ok(recv.requests.every((r) => r.verified), 'all signed');
  second.kill('SIGTERM');
  t.equal((await second.exited).code, 0, 'and stops cleanly');
});

t.test('PostgreSQL restart mid-stream: nothing lost, the relay reconnects and does not exit', async (t) => {
  const server = await startEmbeddedPostgres({ fast: true });
  t.teardown(() => server.destroy().catch(() => undefined));
  const db = await freshDatabase(t, { base: server.url });
  const T = tenantName('tpg');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const MAX_IN_FLIGHT = 16;
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), maxInFlight: MAX_IN_FLIGHT, timeoutMs: 500 });
  recv.secrets.push(sub.secret);
  slowOk(recv, 3);
  const relay = spawnRelay(t, db.url, { RELAY_LEASE_MS: '1500', LOG_LEVEL: 'info' });
  const N1 = 1000;
  const N2 = 300;
  await writeAll(db, bulkInserts(T, 1, N1));
  let restarted: Promise<void> | undefined;
  let stoppedAt = -1;
  const respond = recv.respond;
  recv.respond = (r, res, raw) => {
    if (r.seq === 200 && !restarted) {
      stoppedAt = recv.delivered.size;
      // Stop PostgreSQL mid-stream; start it again once the relay has noticed.
      restarted = (async () => {
        await server.stop();
        await relay.waitForLog(/database error|LISTEN connection lost/, 20_000);
        await server.start();
      })();
    }
    return respond(r, res, raw);
  };
  await waitFor(() => restarted !== undefined, 30_000, 'the stream to reach the restart point', relay.diag);
  await restarted;
  t.ok(stoppedAt < N1, `PostgreSQL stopped mid-stream (${stoppedAt} of ${N1} delivered)`);
  t.ok(relay.running, 'the relay survived the outage');
  await writeAll(db, bulkInserts(T, N1 + 1, N2));
  const ids = await eventIds(db, T);
  t.equal(ids.length, N1 + N2);
  await waitFor(async () => recv.delivered.size === ids.length && (await unprocessed(db)) === 0, 60_000, 'every event delivered after the restart',
    () => ({ delivered: recv.delivered.size, requests: recv.requests.length, relay: relay.diag() }));
  t.same([...recv.delivered.keys()].sort(), ids.map((id) => expectedWebhookId(id, sub.id)).sort(), 'nothing lost: events from before, during and after the restart');
  const dupes = duplicates(recv.requests);
  t.ok(dupes <= 2 * MAX_IN_FLIGHT, `duplicates (${dupes}) bounded by the work in flight (<= ${2 * MAX_IN_FLIGHT})`);
  t.ok(relay.running, 'the relay process did not exit');
  await waitFor(() => relay.logs.lines.filter((l) => l.msg === 'listening for wakeups').length >= 2, 20_000, 'LISTEN to reconnect');
  t.pass('LISTEN reconnected');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries'), 0, 'the queue is empty');
  relay.kill('SIGTERM');
  t.equal((await relay.exited).code, 0, 'and it still stops cleanly');
});

t.test('three relays side by side deliver every event exactly once, in aggregate order, without crashes', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('t3');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const subNone = await subscribe(db, { tenant: T, userId: 1, url: recv.url('/none'), ordering: 'none', maxInFlight: 8 });
  const subAgg = await subscribe(db, { tenant: T, userId: 2, url: recv.url('/agg'), ordering: 'aggregate', maxInFlight: 8 });
  recv.secrets.push(subNone.secret, subAgg.secret);
  slowOk(recv, 1);
  const relays = [1, 2, 3].map((i) => spawnRelay(t, db.url, { RELAY_WORKER_ID: `replica-${i}` }));
  // Single-row transactions that change 60 aggregates 5 times each (interleaved), and bulk inserts.
  const statements: string[] = [];
  for (let v = 1; v <= 60; v++) statements.push(`INSERT INTO ${T}.vendors (id, name, seq) VALUES (${v}, 'v', 0)`);
  for (let k = 1; k < 5; k++) for (let v = 1; v <= 60; v++) statements.push(`UPDATE ${T}.vendors SET seq = ${k} WHERE id = ${v}`);
  statements.push(...bulkInserts(T, 1000, 1200, 100));
  await writeAll(db, statements);
  const ids = await eventIds(db, T);
  t.equal(ids.length, 300 + 1200);
  await waitFor(async () => recv.delivered.size === 2 * ids.length && (await unprocessed(db)) === 0, 60_000, 'every delivery',
    () => ({ delivered: recv.delivered.size, requests: recv.requests.length, relays: relays.map((r) => r.diag()) }));
  for (const [path, sub] of [['/none', subNone], ['/agg', subAgg]] as const) {
    const reqs = recv.at(path);
    t.same([...byWebhookId(reqs).keys()].sort(), ids.map((id) => expectedWebhookId(id, sub.id)).sort(), `${path}: every event`);
    t.equal(reqs.length, ids.length, `${path}: exactly once (${duplicates(reqs)} duplicates)`);
  }
  // Per-aggregate order for the ordered subscription, across replicas.
  const bodies = recv.at('/agg').map((r) => JSON.parse(r.body) as { id: string; aggregate_id: string; payload: { new_data: { seq: number } } });
  let outOfOrder = 0;
  for (let v = 1; v <= 60; v++) {
    const seqs = bodies.filter((b) => b.aggregate_id === String(v)).map((b) => b.payload.new_data.seq);
    if (JSON.stringify(seqs) !== JSON.stringify([0, 1, 2, 3, 4])) outOfOrder++;
  }
  t.equal(outOfOrder, 0, 'ordering aggregate: every aggregate\'s events in commit order across three replicas');
  t.ok(relays.every((r) => r.running), 'all three replicas still running');
  t.same(relays.flatMap((r) => r.logs.errors()), [], 'no errors logged');
  for (const r of relays) r.kill('SIGTERM');
  const exits = await Promise.all(relays.map((r) => r.exited));
  t.same(exits.map((e) => e.code), [0, 0, 0], 'each stops cleanly');
});

t.test('SIGTERM: in-flight deliveries finish, unsent leases are given back, exit 0', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tt');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), maxInFlight: 4, timeoutMs: 5000 });
  recv.secrets.push(sub.secret);
  slowOk(recv, 700);
  const env = { LOG_LEVEL: 'info', WEBHOOK_TIMEOUT_MS: '5000', RELAY_LEASE_MS: '30000', RELAY_SHUTDOWN_TIMEOUT_MS: '10000' };
  const relay = spawnRelay(t, db.url, env);
  await writeAll(db, bulkInserts(T, 1, 20));
  await waitFor(() => recv.pending === 4, 15_000, 'four requests in flight', relay.diag);
  relay.kill('SIGTERM');
  const exit = await relay.exited;
  t.equal(exit.code, 0, 'exit 0');
  t.ok(relay.logs.has('relay stopped'), '"relay stopped" logged');
  t.ok(relay.logs.has(/stopping/), 'the signal was acknowledged in the log');
  const inFlight = recv.requests.slice(0, 4);
  t.ok(inFlight.every((r) => r.answered && r.status === 200 && !r.abandoned), 'the in-flight requests were allowed to finish');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed'"), recv.requests.length, 'and their outcomes were recorded before exit');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE locked_by IS NOT NULL'), 0, 'no lease left held');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE attempts > 0'), 0, 'deliveries claimed but never sent do not count an attempt');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE next_attempt_at > now()'), 0, 'and are due at once, for whoever comes next');

  // The next relay (lease 30 s: only released leases can be picked up at once) finishes the job, with no duplicate.
  const next = spawnRelay(t, db.url, env);
  const ids = await eventIds(db, T);
  await waitFor(async () => recv.delivered.size === ids.length && (await unprocessed(db)) === 0, 30_000, 'the rest to be delivered by the next relay', next.diag);
  t.equal(recv.requests.length, ids.length, 'every event exactly once across the stop');
  next.kill('SIGTERM');
  t.equal((await next.exited).code, 0);
});

t.test('a second signal exits at once, whatever is in flight', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('t2s');
  await createTenant(db, T);
  const recv = await startReceiver(t, { respond: () => undefined }); // never answers
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), timeoutMs: 60_000 });
  recv.secrets.push(sub.secret);
  const relay = spawnRelay(t, db.url, { LOG_LEVEL: 'info', WEBHOOK_TIMEOUT_MS: '60000', RELAY_LEASE_MS: '200000', RELAY_SHUTDOWN_TIMEOUT_MS: '120000' });
  await writeAll(db, bulkInserts(T, 1, 3));
  await waitFor(() => recv.pending === 3, 15_000, 'three requests hanging', relay.diag);
  relay.kill('SIGTERM');
  await relay.waitForLog(/stopping/, 10_000);
  t.ok(relay.running, 'after one SIGTERM the relay waits for its in-flight requests');
  relay.kill('SIGTERM');
  const exit = await relay.exited;
  t.equal(exit.code, 143, 'the second SIGTERM exits at once with 128 + 15');
  // Nothing is lost: the leases expire (here: released by nobody), the work stays in the queue.
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries'), 3, 'the three deliveries are still queued');
});

t.test('ENABLE_OUTBOX_PROCESSING=false: connected, claims nothing', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tsb');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  recv.secrets.push(sub.secret);
  const standby = spawnRelay(t, db.url, { ENABLE_OUTBOX_PROCESSING: 'false', LOG_LEVEL: 'info', DB_APPLICATION_NAME: 'outbox-relay-standby' });
  await standby.waitForLog(/standby/, 15_000);
  await writeAll(db, bulkInserts(T, 1, 10));
  // Nothing to await here: absence is shown over several poll intervals (RELAY_POLL_INTERVAL_MS=200).
  await new Promise((r) => setTimeout(r, 1500));
  t.equal(recv.requests.length, 0, 'nothing was sent');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_fanout_queue'), 10, 'nothing was fanned out (all ten still in the fan-out queue)');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_events WHERE processed_at IS NOT NULL'), 0, 'nothing processed');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries'), 0, 'nothing claimed');
  t.ok(standby.running, 'the standby relay keeps running');
  t.ok(await count(db, "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'outbox-relay-standby'") >= 1,
    'and is connected');
  standby.kill('SIGTERM');
  t.equal((await standby.exited).code, 0, 'stops with exit 0');

  const active = spawnRelay(t, db.url, {});
  await waitFor(async () => recv.delivered.size === 10 && (await unprocessed(db)) === 0, 15_000, 'an active relay to deliver the backlog', active.diag);
  active.kill('SIGTERM');
  t.equal((await active.exited).code, 0);
});

t.test('rows with huge or odd data are delivered intact (numeric digit-exact)', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('todd');
  await db.query(`CREATE SCHEMA ${T};
    CREATE TABLE ${T}.odd (id text PRIMARY KEY, big text, uni text, bin bytea, num numeric, frac numeric, neg numeric, f float8, doc jsonb, arr integer[]);
    SELECT public.outbox_install_capture('${T}', 'odd');`);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  recv.secrets.push(sub.secret);
  const relay = await startRelay(t, db.url, { WEBHOOK_TIMEOUT_MS: '5000', RELAY_LEASE_MS: '10000' });

  const id = 'ключ 🔑 "quoted" \\back/slash';
  const big = 'αβγ-0123456789-'.repeat(Math.ceil(1_048_576 / 15)).slice(0, 1_048_576); // 1 Mi characters, multibyte
  const uni = '😀 👩‍👩‍👧 עברית العربية e\u0301 \u2028\u2029 \t\n\r "q" \\ \u0001\u001f \uFFFD 𝔘𝔫𝔦';
  const bin = Buffer.from(Array.from({ length: 4096 }, (_, i) => (i % 255) + 1)); // every byte value but NUL
  const num = '1234567890'.repeat(10); // 100 digits
  const frac = `${'9'.repeat(60)}.${'0'.repeat(39)}1`; // 100 digits with a fraction
  const neg = `-0.${'0'.repeat(98)}7`; // 100 digits after the point
  const docBig = '123456789012345678901234567890.000000000000000000001';
  await db.query(
    `INSERT INTO ${T}.odd (id, big, uni, bin, num, frac, neg, f, doc, arr) VALUES ($1, $2, $3, $4, $5::numeric, $6::numeric, $7::numeric, 0.1::float8 + 0.2::float8, $8::jsonb, '{1,-2,3}')`,
    [id, big, uni, bin, num, frac, neg, `{"nested": {"list": [1, "two", null, true, {"deep": "é"}]}, "big": ${docBig}}`],
  );
  await db.query(`UPDATE ${T}.odd SET big = upper(big), num = num + 1 WHERE id = $1`, [id]);
  await db.query(`DELETE FROM ${T}.odd WHERE id = $1`, [id]);

  const { rows: events } = await db.query<{ id: string; payload: string; event_type: string }>(
    'SELECT id::text, payload::text AS payload, event_type FROM public.outbox_events WHERE tenant = $1 ORDER BY outbox_events.id', [T]);
  t.same(events.map((e) => e.event_type), ['odd_insert', 'odd_update', 'odd_delete']);
  await waitFor(async () => recv.delivered.size === 3 && (await unprocessed(db)) === 0, 30_000, 'the three events', () => recv.requests.length);
  t.equal(recv.requests.length, 3, 'each once, first time');
  t.ok(recv.requests.every((r) => r.verified), 'multi-megabyte bodies verify with standardwebhooks');
  const byEvent = new Map([...recv.delivered.values()].map((r) => [(JSON.parse(r.body) as { id: string }).id, r]));
  for (const e of events) {
    const r = byEvent.get(e.id) as ReceivedRequest;
    t.ok(r.body.includes(`,"payload":${e.payload},"created_at":`), `${e.event_type}: the payload arrives byte for byte as PostgreSQL stored it (${Math.round(r.body.length / 1024)} KiB)`);
  }
  const insert = JSON.parse(byEvent.get(events[0]!.id)!.body) as { aggregate_id: string; payload: { new_data: Record<string, unknown> } };
  const nd = insert.payload.new_data;
  t.equal(insert.aggregate_id, id, 'unicode, quotes and backslashes in the key survive');
  t.equal(nd.big, big, '1 MB of multibyte text intact');
  t.equal(nd.uni, uni, 'unicode, line separators and control characters intact');
  t.equal(nd.bin, `\\x${bin.toString('hex')}`, 'bytea arrives as hex, every byte');
  t.same(nd.arr, [1, -2, 3]);
  t.equal(nd.f, 0.30000000000000004, 'float8 shortest-exact');
  const rawInsert = byEvent.get(events[0]!.id)!.body;
  t.match(rawInsert, new RegExp(`"num": ${num}[,}]`), 'numeric(100 digits) digit-exact in the body');
  t.match(rawInsert, new RegExp(`"frac": ${frac.replace('.', '\\.')}[,}]`), 'numeric with a 40-digit fraction digit-exact');
  t.match(rawInsert, new RegExp(`"neg": ${neg.replace('.', '\\.')}[,}]`), 'tiny negative numeric digit-exact');
  t.match(rawInsert, new RegExp(`"big": ${docBig.replace('.', '\\.')}[,}]`), 'a big number inside a jsonb column digit-exact');
  const rawUpdate = byEvent.get(events[1]!.id)!.body;
  t.match(rawUpdate, new RegExp(`"num": ${num.slice(0, -1)}1[,}]`), 'the updated numeric (…0 + 1) digit-exact');
  t.same(relay.logs.errors(), [], 'no errors logged');
});

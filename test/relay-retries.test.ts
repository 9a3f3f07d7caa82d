/**
 * Retries and failure outcomes of the relay against real local receivers: 5xx then success,
 * Retry-After (honoured, absurd values capped or ignored), 410 Gone, dead deliveries and `replay`,
 * and receivers that misbehave (slow, reset, huge body, redirect). `subscriptions add` and `update`
 * are in subscriptions-update.test.ts.
 */
import type http from 'node:http';
import t from 'tap';
import { runCli } from './helpers/cli.js';
import { freshDatabase } from './helpers/db.js';
import { answer, startReceiver, type ReceivedRequest } from './helpers/receiver.js';
import { byWebhookId, count, createTenant, eventIds, expectedWebhookId, startRelay, subscribe, tenantName, unprocessed, waitFor, writeAll } from './helpers/relay.js';

/** No circuit breaker in these tests: every attempt must reach the receiver. */
const NO_CIRCUIT = { CIRCUIT_FAILURE_THRESHOLD: '1000' };

/** The aggregate (vendor id) a request is about. */
const aggregateOf = (r: ReceivedRequest) => (JSON.parse(r.body) as { aggregate_id: string }).aggregate_id;

/** Streams `total` bytes as the response, honouring backpressure; stops when the client goes away. */
function streamHuge(res: http.ServerResponse, status: number, total: number, sent: { bytes: number }): void {
  res.writeHead(status, { 'content-type': 'application/octet-stream', 'content-length': String(total) });
  const chunk = Buffer.alloc(64 * 1024, 0x78);
  const pump = (): void => {
    while (sent.bytes < total && !res.destroyed) {
      const piece = total - sent.bytes >= chunk.length ? chunk : chunk.subarray(0, total - sent.bytes);
      sent.bytes += piece.length;
      if (!res.write(piece)) {
        res.once('drain', pump);
        return;
      }
    }
    if (!res.destroyed) res.end();
  };
  pump();
}

t.test('a 500 is retried and the event delivered once', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('t5');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  recv.secrets.push(sub.secret);
  recv.respond = (r, res) => answer(res, r.attempt === 1 ? 500 : 200, r.attempt === 1 ? 'boom' : 'ok');
  await startRelay(t, db.url, NO_CIRCUIT);
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 10) g`, `UPDATE ${T}.vendors SET name = 'x' WHERE id = 1`]);
  const ids = await eventIds(db, T);
  await waitFor(async () => recv.delivered.size === ids.length && (await unprocessed(db)) === 0, 20_000, 'all delivered', () => recv.delivered.size);
  const groups = byWebhookId(recv.requests);
  t.same([...groups.keys()].sort(), ids.map((id) => expectedWebhookId(id, sub.id)).sort(), 'every event, by its webhook-id');
  t.ok([...groups.values()].every((l) => l.length === 2 && l[0]?.status === 500 && l[1]?.status === 200), 'each: one 500, then one 200, and nothing more');
  t.ok(recv.requests.every((r) => r.verified), 'retries are signed too');
  const { rows: ev } = await db.query<{ attempts: number; status: string }>('SELECT attempts, status FROM public.outbox_events WHERE tenant = $1', [T]);
  t.ok(ev.every((e) => e.attempts === 2 && e.status === 'processed'), 'roll-up: attempts 2, processed');
  const { rows: acks } = await db.query<{ status: string; metadata: { attempts: number; http_status: number } }>('SELECT status::text, metadata FROM public.event_acknowledgments');
  t.equal(acks.length, ids.length);
  t.ok(acks.every((a) => a.status === 'processed' && a.metadata.attempts === 2 && a.metadata.http_status === 200), 'acks record the attempt that succeeded');
});

t.test('Retry-After is honoured; absurd values are capped or ignored without harm', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tra');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  recv.secrets.push(sub.secret);
  const CAP = 1500;
  // By vendor id: the Retry-After of the first answer (429), and what it must mean.
  const cases: Record<string, { value: string; expect: 'honoured' | 'capped' | 'ignored' }> = {
    1: { value: '1', expect: 'honoured' },
    2: { value: '999999999', expect: 'capped' },
    3: { value: '99999999999999999999999999', expect: 'capped' },
    4: { value: 'Fri, 31 Dec 9999 23:59:59 GMT', expect: 'capped' },
    5: { value: 'Thu, 01 Jan 1970 00:00:00 GMT', expect: 'ignored' }, // in the past: now
    6: { value: 'soon', expect: 'ignored' },
    7: { value: 'Retry 3000', expect: 'ignored' }, // junk that a lenient date parser reads as the year 3000
    8: { value: '-5', expect: 'ignored' },
    9: { value: '1.5', expect: 'ignored' },
    10: { value: '\u00ff\u00fe', expect: 'ignored' },
  };
  recv.respond = (r, res) => {
    const c = cases[aggregateOf(r)];
    if (r.attempt === 1 && c) {
      res.writeHead(429, { 'retry-after': c.value });
      res.end('slow down');
    } else answer(res, 200);
  };
  const relay = await startRelay(t, db.url, { ...NO_CIRCUIT, RETRY_AFTER_MAX_MS: String(CAP) });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, ${Object.keys(cases).length}) g`]);
  await waitFor(async () => recv.delivered.size === Object.keys(cases).length && (await unprocessed(db)) === 0, 20_000, 'all delivered', () => recv.delivered.size);
  for (const [vendor, c] of Object.entries(cases)) {
    const reqs = recv.requests.filter((r) => aggregateOf(r) === vendor);
    t.equal(reqs.length, 2, `Retry-After ${JSON.stringify(c.value)}: one 429, one retry`);
    const gap = (reqs[1]?.receivedAt ?? 0) - (reqs[0]?.receivedAt ?? 0);
    if (c.expect === 'honoured') t.ok(gap >= 900, `Retry-After: 1 -> not retried before ~1 s (after ${gap} ms)`);
    else if (c.expect === 'capped') t.ok(gap >= CAP - 100 && gap < 10_000, `Retry-After ${JSON.stringify(c.value)} capped at ${CAP} ms (after ${gap} ms)`);
    else t.ok(gap < CAP - 100, `Retry-After ${JSON.stringify(c.value)} ignored: ordinary backoff (after ${gap} ms)`);
  }
  t.same(relay.logs.errors(), [], 'no errors logged');
});

t.test('410 Gone disables the subscription and keeps its deliveries; enabling it delivers them', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tg');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  recv.secrets.push(sub.secret);
  let gone = true;
  recv.respond = (r, res) => answer(res, gone ? 410 : 200);
  const relay = await startRelay(t, db.url, NO_CIRCUIT);
  // One transaction: all six events are fanned out together. Written apart, the update's event could
  // come after the first 410 had disabled the subscription, and a disabled subscription receives
  // nothing new (seen once in CI on a slow run).
  await writeAll(db, [
    'BEGIN',
    `INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 5) g`,
    `UPDATE ${T}.vendors SET name = 'second' WHERE id = 1`,
    'COMMIT',
  ]);
  const ids = await eventIds(db, T);
  await waitFor(
    async () => (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_subscriptions WHERE id = $1 AND NOT enabled', [sub.id])) === 1
      && (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE locked_by IS NOT NULL')) === 0,
    15_000, 'the subscription to be disabled and its leases given back');
  const { rows: [s] } = await db.query<{ disabled_reason: string }>('SELECT disabled_reason FROM public.outbox_subscriptions WHERE id = $1', [sub.id]);
  t.match(s?.disabled_reason, /410/, 'disabled_reason names the 410');
  const { rows: deliveries } = await db.query<{ state: string; attempts: number }>('SELECT state::text, attempts FROM public.outbox_deliveries WHERE subscription_id = $1', [sub.id]);
  t.equal(deliveries.length, ids.length, 'every delivery kept');
  t.ok(deliveries.every((d) => d.state !== 'dead'), 'none of them dead');
  t.ok(deliveries.every((d) => d.attempts === 0), 'a 410 burns no attempt');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.outbox_events WHERE status <> 'pending'"), 0, 'the events are still pending');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.event_acknowledgments'), 0, 'and not acknowledged');
  t.ok(relay.logs.has(/410 Gone/), 'the relay says why it stopped');
  const sentWhileGone = recv.requests.length;
  t.ok(sentWhileGone >= 1 && sentWhileGone <= ids.length, `the relay stopped sending after the 410 (${sentWhileGone} requests)`);
  t.equal(relay.logs.lines.filter((l) => /410 Gone: subscription disabled/.test(String(l.msg))).length, 1, `the disabling is said once, though ${sentWhileGone} requests were answered 410`);
  const replayed = await runCli(['replay', '--subscription', String(sub.id), '--delivered'], { DATABASE_URL: db.url });
  t.equal(replayed.code, 0, replayed.stderr);
  t.match(replayed.stderr, new RegExp(`subscription ${sub.id} is disabled: its deliveries wait until "outbox-relay subscriptions enable ${sub.id}"`), 'replay says a disabled subscription is not sent to');

  gone = false;
  const res = await runCli(['subscriptions', 'enable', String(sub.id)], { DATABASE_URL: db.url });
  t.equal(res.code, 0, res.stderr);
  await waitFor(async () => recv.delivered.size === ids.length && (await unprocessed(db)) === 0, 15_000, 'the kept deliveries to arrive after enable', () => recv.delivered.size);
  t.same([...recv.delivered.keys()].sort(), ids.map((id) => expectedWebhookId(id, sub.id)).sort(), 'every kept delivery arrived');
  const v1 = [...recv.delivered.values()].filter((r) => aggregateOf(r) === '1').map((r) => (JSON.parse(r.body) as { event_type: string }).event_type);
  t.same(v1, ['vendors_insert', 'vendors_update'], 'in aggregate order');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed' AND source = 'relay'"), ids.length, 'acknowledged');
});

t.test('out of attempts: dead delivery, failed ack, failed event; replay requeues and delivers it', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('td');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 3, url: recv.url() });
  recv.secrets.push(sub.secret);
  let failing = true;
  recv.respond = (r, res) => answer(res, failing ? 500 : 200, failing ? 'down' : 'ok');
  await startRelay(t, db.url, { ...NO_CIRCUIT, RETRY_MAX_ATTEMPTS: '3' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 4) g`]);
  const ids = await eventIds(db, T);
  await waitFor(async () => (await count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE state = 'dead'")) === ids.length, 20_000, 'the deliveries to die');
  const groups = byWebhookId(recv.requests);
  t.same([...groups.values()].map((l) => l.length), ids.map(() => 3), 'each event tried exactly RETRY_MAX_ATTEMPTS (3) times');
  const { rows: ev } = await db.query<{ status: string; attempts: number; max_attempts: number; processed_at: Date | null }>(
    'SELECT status, attempts, max_attempts, processed_at FROM public.outbox_events WHERE tenant = $1', [T]);
  t.ok(ev.every((e) => e.status === 'failed' && e.attempts === 3 && e.max_attempts === 3 && e.processed_at === null), 'events: status failed, attempts = max_attempts, not processed');
  const { rows: acks } = await db.query<{ status: string; source: string; user_id: number; metadata: Record<string, unknown> }>(
    'SELECT status::text, source, user_id, metadata FROM public.event_acknowledgments');
  t.equal(acks.length, ids.length);
  t.ok(acks.every((a) => a.status === 'failed' && a.source === 'relay' && a.user_id === 3 && a.metadata.http_status === 500 && a.metadata.attempts === 3 && a.metadata.subscription_id === sub.id && /500/.test(String(a.metadata.error))),
    'acks: failed, as the subscription\'s user, with status, attempts and error', { acks });
  const list = await runCli(['subscriptions', 'list', '--json'], { DATABASE_URL: db.url });
  t.match(JSON.parse(list.stdout), [{ id: sub.id, dead: ids.length, pending: 0 }], 'subscriptions list shows the dead deliveries');

  failing = false;
  const before = recv.requests.length;
  const res = await runCli(['replay', '--subscription', String(sub.id)], { DATABASE_URL: db.url });
  t.equal(res.code, 0, res.stderr);
  t.match(res.stdout, new RegExp(`^${ids.length} deliveries queued`, 'm'), 'replay prints how many it requeued');
  await waitFor(async () => recv.delivered.size === ids.length && (await unprocessed(db)) === 0, 15_000, 'the replayed deliveries');
  t.equal(recv.requests.length - before, ids.length, 'each sent once more');
  t.ok([...recv.delivered.values()].every((r, i, all) => all.filter((x) => x.webhookId === r.webhookId).length === 1 && groups.has(r.webhookId)), 'with the webhook-ids of the first attempts');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed'"), ids.length, 'acks now processed');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.outbox_events WHERE status = 'processed'"), ids.length, 'events processed');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries'), 0, 'no delivery left');
  const again = await runCli(['replay', '--subscription', String(sub.id), '--json'], { DATABASE_URL: db.url });
  t.same(JSON.parse(again.stdout), { queued: 0 }, 'a second replay finds nothing dead');
});

t.test('a delivery whose event was deleted is dropped at claim and does not hold the subscription\'s slots', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('to');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  // One slot: the relay leases at most 2 deliveries at a time, so two orphans would take them all.
  const sub = await subscribe(db, { tenant: T, userId: 4, url: recv.url(), maxInFlight: 1 });
  recv.secrets.push(sub.secret);
  // What an operator's DELETE of event rows leaves behind (deliveries have no foreign key): due
  // deliveries, older than any other, whose event does not exist.
  await db.query(`INSERT INTO public.outbox_deliveries (event_id, subscription_id, state, next_attempt_at)
                  VALUES (900000001, $1, 'ready', now() - interval '1 hour'), (900000002, $1, 'ready', now() - interval '1 hour')`, [sub.id]);
  await writeAll(db, [
    `INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 6) g`,
    `UPDATE ${T}.vendors SET name = 'second' WHERE id = 6`,
  ]);
  const ids = await eventIds(db, T);
  // And one at the head of vendor 6's ordering lane: both of vendor 6's events queue behind it
  // (waiting) when they are fanned out, and only its removal can let them go.
  const { rows: [lane] } = await db.query<{ lane: string }>(
    "SELECT public.outbox_lane(aggregate_type, aggregate_id)::text AS lane FROM public.outbox_events WHERE tenant = $1 AND aggregate_id = '6' LIMIT 1", [T]);
  await db.query(`INSERT INTO public.outbox_deliveries (event_id, subscription_id, lane, state, next_attempt_at)
                  VALUES (900000003, $1, $2, 'ready', now() - interval '1 hour')`, [sub.id, lane?.lane]);
  await startRelay(t, db.url, NO_CIRCUIT);
  await waitFor(async () => recv.delivered.size === ids.length && (await unprocessed(db)) === 0, 15_000, 'every real event delivered',
    async () => ({ delivered: recv.delivered.size, deliveries: (await db.query('SELECT event_id, state, locked_by FROM public.outbox_deliveries')).rows }));
  t.equal(recv.requests.length, ids.length, 'each real event sent once, nothing for the orphans');
  const v6 = [...recv.delivered.values()].filter((r) => aggregateOf(r) === '6').map((r) => (JSON.parse(r.body) as { event_type: string }).event_type);
  t.same(v6, ['vendors_insert', 'vendors_update'], 'the lane behind the orphaned head moved on, in order');
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries'), 0, 'the orphaned deliveries are gone, not locked and skipped forever');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed'"), ids.length, 'every real event acknowledged');
});

t.test('an outcome that cannot be recorded (its event deleted while it was sent) does not stop the others being recorded', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tp');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 5, url: recv.url(), timeoutMs: 500 });
  recv.secrets.push(sub.secret);
  // The first event's request is held until the test lets it go; everything else is answered at once.
  let release: () => void = () => undefined;
  const held = new Promise<void>((r) => (release = r));
  recv.respond = async (r, res) => {
    if (aggregateOf(r) === '1') await held;
    answer(res, 200, 'ok');
  };
  // The lease (8 s) outlasts the wait for the other outcomes below (6 s): without the isolation of
  // the refused outcome, they would only be recorded once the lease ran out and a claim dropped the
  // orphaned delivery (sql/014), which unblocks the batch.
  const relay = await startRelay(t, db.url, { ...NO_CIRCUIT, RELAY_LEASE_MS: '8000' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) VALUES (1, 'held')`]);
  const [heldId] = await eventIds(db, T);
  await waitFor(() => recv.pending === 1, 10_000, 'the first request to be held');
  // Its event row goes away while the request is out (no acknowledgment can reference it now).
  await db.query('DELETE FROM public.outbox_events WHERE id = $1', [heldId]);
  // More outcomes queue up behind it, in the same batch once it is answered.
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(2, 11) g`]);
  release();
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'w' || g FROM generate_series(12, 21) g`]);
  const ids = await eventIds(db, T);
  t.equal(ids.length, 20, 'twenty more events');
  await waitFor(async () => (await unprocessed(db)) === 0 && (await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed'")) === 20,
    6_000, 'the other outcomes to be recorded, well before the lease of the refused one runs out', async () => ({ unprocessed: await unprocessed(db), errors: relay.logs.errors().map((l) => l.msg) }));
  const givenUp = relay.logs.errors().filter((l) => /cannot be recorded and is given up/.test(String(l.msg)));
  t.equal(givenUp.length, 1, 'one outcome given up, logged as an error');
  t.match(givenUp[0], { eventId: heldId, subscription: sub.id, code: '23503' }, 'naming the delivery and the refusal');
  // Its lease runs out; the next claim finds the delivery without its event and drops it (sql/014).
  await waitFor(async () => (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries')) === 0, 15_000, 'the orphaned delivery to be dropped');
  t.equal(recv.requests.filter((r) => aggregateOf(r) === '1').length, 1, 'the deleted event was not sent again');
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed'"), 20, 'every other event acknowledged');
});

t.test('slow, resetting, huge and redirecting receivers: handled, nothing lost, the relay keeps running', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tb');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const HUGE = 50 * 1024 * 1024;
  const hugeSent: Array<{ bytes: number }> = [];
  recv.respond = (r, res, raw) => {
    if (r.path === '/slow') {
      if (r.attempt === 1) return; // never answers: the subscription's timeout (1 s) ends it
      answer(res, 200);
    } else if (r.path === '/reset') {
      if (r.attempt === 1) {
        const sock = raw.socket as typeof raw.socket & { resetAndDestroy?: () => void };
        if (sock.resetAndDestroy) sock.resetAndDestroy();
        else sock.destroy();
      } else answer(res, 200);
    } else if (r.path === '/huge') {
      const sent = { bytes: 0 };
      hugeSent.push(sent);
      streamHuge(res, r.attempt === 1 ? 500 : 200, HUGE, sent);
    } else if (r.path === '/redirect') {
      answer(res, 302, '', { location: recv.url('/target') });
    } else answer(res, 200);
  };
  const subs: Record<string, { id: number; secret: string }> = {};
  let user = 1;
  for (const p of ['/slow', '/reset', '/huge', '/redirect']) subs[p] = await subscribe(db, { tenant: T, userId: user++, url: recv.url(p), timeoutMs: p === '/slow' ? 1000 : 5000 });
  recv.secrets.push(...Object.values(subs).map((s) => s.secret));
  const relay = await startRelay(t, db.url, { ...NO_CIRCUIT, RETRY_MAX_ATTEMPTS: '3' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 3) g`]);
  const ids = await eventIds(db, T);
  // Fanned out (nothing left in the fan-out queue) and every delivery finished: before the fan-out
  // there are no deliveries at all, which must not count as finished.
  const settled = async () => (await count(db,
    "SELECT (SELECT count(*) FROM public.outbox_fanout_queue) + (SELECT count(*) FROM public.outbox_deliveries WHERE state <> 'dead') AS n")) === 0;
  await waitFor(settled, 30_000, 'every delivery to finish', () => ({ requests: recv.requests.length, delivered: recv.delivered.size }));

  // What the relay recorded as delivered (a 200 whose huge body the relay cut short never "finishes" at the receiver).
  const deliveredTo = async (subId: number) => {
    const { rows } = await db.query<{ event_id: string; attempts: number }>(
      "SELECT event_id::text, (metadata->>'attempts')::int AS attempts FROM public.event_acknowledgments WHERE status = 'processed' AND (metadata->>'subscription_id')::bigint = $1 ORDER BY 1",
      [subId]);
    return rows;
  };
  for (const p of ['/slow', '/reset', '/huge']) {
    const sub = subs[p] as { id: number };
    const acked = await deliveredTo(sub.id);
    t.same(acked.map((a) => a.event_id).sort(), [...ids].sort(), `${p}: every event delivered`);
    t.ok(acked.every((a) => a.attempts === 2), `${p}: on the second attempt`);
    const groups = byWebhookId(recv.at(p));
    t.same([...groups.keys()].sort(), ids.map((id) => expectedWebhookId(id, sub.id)).sort(), `${p}: the receiver saw every event`);
    t.ok([...groups.values()].every((l) => l.length === 2), `${p}: exactly two attempts each`);
  }
  t.ok(recv.at('/slow').filter((r) => r.attempt === 1).every((r) => r.abandoned), 'slow: the relay gave up on the first attempts (timeout)');
  t.ok(hugeSent.every((s) => s.bytes < HUGE), `huge: the relay stopped reading each 50 MB body early (${hugeSent.map((s) => Math.round(s.bytes / 1024)).join(', ')} KiB sent)`);

  const redirect = subs['/redirect'] as { id: number };
  t.equal(recv.at('/target').length, 0, 'redirect: never followed');
  t.same([...byWebhookId(recv.at('/redirect')).values()].map((l) => l.length), [3, 3, 3], 'redirect: a failure every time, up to the attempt limit');
  const { rows: dead } = await db.query<{ last_status: number; last_error: string }>(
    "SELECT last_status, last_error FROM public.outbox_deliveries WHERE state = 'dead' AND subscription_id = $1", [redirect.id]);
  t.equal(dead.length, ids.length, 'redirect: dead deliveries, visible for replay');
  t.ok(dead.every((d) => d.last_status === 302 && /redirect/i.test(d.last_error)), 'with the 302 and the reason recorded');

  const { rows: errs } = await db.query<{ last_error: string | null }>('SELECT last_error FROM public.outbox_deliveries');
  t.equal(errs.length, ids.length, 'nothing else is left in the queue');
  t.same(relay.logs.errors(), [], 'no errors logged');
  // Still running: a new event goes through to every well-behaved subscription.
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) VALUES (100, 'still alive')`]);
  const [newest] = (await eventIds(db, T)).slice(-1);
  await waitFor(async () => (await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE event_id = $1 AND status = 'processed'", [newest])) === 3,
    15_000, 'a new event to be delivered');
  t.pass('the relay kept running');
});

t.test('a receiver slower than the lease but within the subscription\'s timeout gets each event once', async (t) => {
  // RELAY_LEASE_MS (1500) exceeds WEBHOOK_TIMEOUT_MS (500) as the config requires, but a subscription
  // may have its own, longer timeout (subscriptions add --timeout-ms, up to 10 minutes).
  const db = await freshDatabase(t);
  const T = tenantName('tl');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), timeoutMs: 3000 });
  recv.secrets.push(sub.secret);
  recv.respond = (r, res) => {
    setTimeout(() => answer(res, 200), 2000); // within the subscription's 3 s timeout
  };
  const relay = await startRelay(t, db.url, { ...NO_CIRCUIT, RELAY_LEASE_MS: '1500' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 2) g`]);
  await waitFor(async () => recv.requests.length >= 2 && (await unprocessed(db)) === 0, 10_000, 'both events delivered', async () => ({
    requests: recv.requests.length,
    answered200: recv.requests.filter((r) => r.status === 200).length,
    deliveries: (await db.query('SELECT attempts, state::text, last_error FROM public.outbox_deliveries ORDER BY event_id')).rows,
  }));
  t.equal(recv.requests.length, 2, `each event sent once, not again while its first attempt was still in flight (${recv.requests.length} requests)`);
  t.notOk(relay.logs.has(/not recorded/), 'no outcome was fenced off as stale');
});

t.test('a delivery claimed ahead is not sent twice because its lease ran out while it waited for a slot', async (t) => {
  // The minimum the config allows: lease = timeout + 1 s. With max in-flight 1 the relay claims two
  // (one sent, one queued); the queued one waits up to a timeout for the slot, then takes up to a timeout.
  const db = await freshDatabase(t);
  const T = tenantName('tq');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), timeoutMs: 2000, maxInFlight: 1, ordering: 'none' });
  recv.secrets.push(sub.secret);
  recv.respond = (r, res) => {
    setTimeout(() => answer(res, 200), 1800); // slow, but within the 2 s timeout
  };
  const relay = await startRelay(t, db.url, { ...NO_CIRCUIT, WEBHOOK_TIMEOUT_MS: '2000', RELAY_LEASE_MS: '3000' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 2) g`]);
  await waitFor(async () => recv.requests.length >= 2 && (await unprocessed(db)) === 0, 20_000, 'both events delivered');
  t.equal(recv.requests.length, 2, `each event sent once (${recv.requests.length} requests: ${[...byWebhookId(recv.requests).values()].map((l) => l.length).join(', ')})`);
  t.notOk(relay.logs.has(/not recorded/), 'no outcome was fenced off as stale');
});

t.test('when every outcome is refused (a constraint refuses them all), the relay stops giving outcomes up and waits for the fix', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tr');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 7, url: recv.url(), timeoutMs: 500 });
  recv.secrets.push(sub.secret);
  // An operator's constraint that no acknowledgment passes: every 'ok' outcome is refused (23514).
  await db.query('ALTER TABLE public.event_acknowledgments ADD CONSTRAINT test_refuse_all CHECK (false) NOT VALID');
  const relay = await startRelay(t, db.url, { ...NO_CIRCUIT, RELAY_LEASE_MS: '3000' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 20) g`]);
  const ids = await eventIds(db, T);
  await waitFor(() => relay.logs.has(/outcome after outcome is refused for its data/), 10_000, 'the relay to see that the refusals are systemic');
  const givenUpCount = () => relay.logs.errors().filter((l) => /cannot be recorded and is given up/.test(String(l.msg))).length;
  const givenUp = givenUpCount();
  t.ok(givenUp <= 8, `at most 8 outcomes given up before it stops giving up (${givenUp})`);
  // The refusal lasts more than two leases (3 s): the outcomes the relay holds keep their leases
  // (sql/022), so nothing held is claimed and sent again meanwhile.
  await new Promise((r) => setTimeout(r, 7_000));
  const held = await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE locked_by IS NOT NULL AND attempts = 1 AND next_attempt_at > now()');
  t.ok(held >= ids.length - givenUp, `the held outcomes are still leased, at their first attempt, after two lease periods (${held} of ${ids.length}, ${givenUp} given up)`);
  t.ok(recv.requests.length - ids.length <= givenUp, `nothing held was sent again while the refusal lasted (${recv.requests.length - ids.length} extra requests, ${givenUp} given up)`);
  await db.query('ALTER TABLE public.event_acknowledgments DROP CONSTRAINT test_refuse_all');
  await waitFor(async () => (await unprocessed(db)) === 0, 20_000, 'every event recorded once the constraint is gone', async () => ({ unprocessed: await unprocessed(db) }));
  t.equal(await count(db, "SELECT count(*)::int AS n FROM public.event_acknowledgments WHERE status = 'processed'"), ids.length, 'every event acknowledged');
  const extra = recv.requests.length - ids.length;
  t.equal(givenUpCount(), givenUp, 'nothing more was given up once the refusals were seen to be systemic');
  t.ok(extra <= givenUp, `re-sent at most the given-up ones (${extra} extra requests, ${givenUp} given up)`);
});

t.test('outbox_extend_leases keeps only this worker\'s current leases, never shortens one and never waits for a lock', async (t) => {
  const db = await freshDatabase(t);
  // outbox_deliveries has no foreign keys: rows stand on their own here.
  await db.query(`INSERT INTO public.outbox_deliveries (event_id, subscription_id, state, attempts, locked_by, next_attempt_at) VALUES
    (1, 1, 'ready', 2, 'w1', now() + interval '1 second'),  -- held by w1 at attempt 2: extended
    (2, 1, 'ready', 2, 'w2', now() + interval '1 second'),  -- another worker's
    (3, 1, 'ready', 3, 'w1', now() + interval '1 second'),  -- claimed again since (attempt 3)
    (4, 1, 'dead',  2, 'w1', now() + interval '1 second'),  -- dead
    (5, 1, 'ready', 2, 'w1', now() + interval '1 hour'),    -- a lease already longer: kept
    (6, 1, 'ready', 2, 'w1', now() + interval '1 second')   -- locked by another transaction: skipped`);
  const pool = db.pool({ max: 2 });
  const locker = await pool.connect();
  t.teardown(() => locker.release());
  await locker.query('BEGIN');
  await locker.query('SELECT 1 FROM public.outbox_deliveries WHERE event_id = 6 FOR UPDATE');
  const client = await pool.connect();
  t.teardown(() => client.release());
  await client.query("SET statement_timeout = '5s'");
  const { rows } = await client.query<{ n: number }>(
    "SELECT public.outbox_extend_leases('w1', ARRAY[1,2,3,4,5,6]::bigint[], ARRAY[1,1,1,1,1,1]::bigint[], ARRAY[2,2,2,2,2,2], ARRAY[60000,60000,60000,60000,60000,60000]) AS n",
  );
  t.equal(rows[0]?.n, 2, 'two leases kept: the current one and the longer one');
  await locker.query('ROLLBACK');
  const { rows: after } = await db.query<{ event_id: string; secs: number }>(
    'SELECT event_id::text, round(extract(epoch FROM next_attempt_at - now()))::int AS secs FROM public.outbox_deliveries ORDER BY event_id',
  );
  const secs = Object.fromEntries(after.map((r) => [r.event_id, r.secs]));
  t.ok((secs['1'] ?? 0) >= 55 && (secs['1'] ?? 0) <= 60, `the current lease now ends in a minute (${secs['1']} s)`);
  t.ok([secs['2'], secs['3'], secs['4'], secs['6']].every((s) => s !== undefined && s <= 1), 'another worker\'s, a newer attempt\'s, a dead one\'s and a locked one\'s are untouched');
  t.ok((secs['5'] ?? 0) > 3500, 'a longer lease is not shortened');
});

t.test('an event queued again after its fan-out is dropped from the queue: no stall, no resend, no change of its state', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tq');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const ok = await subscribe(db, { tenant: T, userId: 6, url: recv.url('/ok') });
  const flaky = await subscribe(db, { tenant: T, userId: 7, url: recv.url('/flaky') });
  recv.secrets.push(ok.secret, flaky.secret);
  // Vendor 1's first event fails at /flaky: that delivery dies after one attempt and stays (dead);
  // /ok gets it (its delivery row is deleted).
  const typeOf = (r: ReceivedRequest) => (JSON.parse(r.body) as { event_type: string }).event_type;
  recv.respond = (r, res) => answer(res, r.path === '/flaky' && aggregateOf(r) === '1' && typeOf(r) === 'vendors_insert' ? 500 : 200, 'x');
  const relay = await startRelay(t, db.url, { ...NO_CIRCUIT, RETRY_MAX_ATTEMPTS: '1' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 3) g`]);
  const dead = () => count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE state = 'dead'");
  await waitFor(async () => recv.delivered.size === 5 && (await dead()) === 1, 10_000, 'five deliveries made, one dead',
    async () => ({ delivered: recv.delivered.size, d: (await db.query('SELECT state, attempts FROM public.outbox_deliveries')).rows, errors: relay.logs.errors().map((l) => l.msg) }));
  const [failedId] = await eventIds(db, T);
  const stateOf = async () => (await db.query<{ status: string; processed: boolean }>(
    'SELECT status::text, processed_at IS NOT NULL AS processed FROM public.outbox_events WHERE id = $1', [failedId])).rows[0];
  t.same(await stateOf(), { status: 'failed', processed: false }, 'the event failed (one subscription\'s delivery died)');

  // What a hand-made INSERT into the queue (or a restored dump) can leave: the fanned-out event
  // queued again, beside new events in the same batch, one of them on the same aggregate. Its
  // dead delivery used to break the deliveries' primary key at every poll (nothing more was fanned
  // out or claimed, for any subscription), and /ok, whose delivery was done, got it a second time.
  const requests = recv.requests.length;
  await writeAll(db, ['BEGIN', `INSERT INTO public.outbox_fanout_queue (event_id) VALUES (${Number(failedId)})`,
    `INSERT INTO ${T}.vendors (id, name) SELECT g, 'w' || g FROM generate_series(4, 8) g`,
    `UPDATE ${T}.vendors SET name = 'again' WHERE id = 1`, 'COMMIT']);
  const queued = () => count(db, 'SELECT count(*)::int AS n FROM public.outbox_fanout_queue');
  // Answered is not yet recorded: the outcomes of the last requests may still be on their way.
  const live = () => count(db, "SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE state <> 'dead'");
  await waitFor(async () => recv.delivered.size === 17 && (await queued()) === 0 && (await live()) === 0, 10_000,
    'the six new events delivered to both, their outcomes recorded and the queue empty',
    async () => ({ delivered: recv.delivered.size, errors: relay.logs.errors().map((l) => l.msg) }));
  t.equal(recv.requests.length - requests, 12, 'only the new events were sent, the one queued again to neither subscription');
  t.ok([...recv.delivered.values()].some((r) => r.path === '/flaky' && aggregateOf(r) === '1' && typeOf(r) === 'vendors_update'),
    'vendor 1\'s next event went (it did not wait behind a delivery that was never written)');
  const { rows: left } = await db.query<{ subscription_id: string; state: string; attempts: number }>('SELECT subscription_id::text, state, attempts FROM public.outbox_deliveries');
  t.same(left, [{ subscription_id: String(flaky.id), state: 'dead', attempts: 1 }], 'its dead delivery is left as it was');
  t.same(await stateOf(), { status: 'failed', processed: false }, 'and the event is still failed');

  // Both subscriptions disabled, then the event queued again: no subscription matches it now, and
  // it used to be marked processed as "matched by none".
  for (const id of [ok.id, flaky.id]) await db.query('SELECT public.outbox_disable_subscription($1, $2)', [id, 'test']);
  await db.query('INSERT INTO public.outbox_fanout_queue (event_id) VALUES ($1)', [failedId]);
  await waitFor(async () => (await queued()) === 0, 10_000, 'the queue entry to be taken');
  t.same(await stateOf(), { status: 'failed', processed: false }, 'a failed event stays failed');
  t.same(relay.logs.errors().map((l) => l.msg), [], 'no error logged');
});

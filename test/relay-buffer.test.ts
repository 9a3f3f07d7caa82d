/**
 * RELAY_BUFFER_BYTES (sql/019): a relay holds at most that many payload bytes in deliveries it
 * leased and has not finished sending, plus one; the leases over the budget go back at once without
 * an attempt counted, and everything is delivered once the receiver takes it. Large rows therefore
 * cost bounded memory instead of 2 x max_in_flight payloads per subscription.
 */
import t from 'tap';
import { freshDatabase } from './helpers/db.js';
import { startHoldingReceiver, startReceiver } from './helpers/receiver.js';
import { count, createTenant, startRelay, subscribe, tenantName, waitFor, writeAll } from './helpers/relay.js';

const ROW_CHARS = 300_000;
const ROWS = 20;

/**
 * 300 KB rows: of ASCII, or of a character that UTF-8 encodes in three bytes (the relay counts
 * bytes as the database does, not characters, which would let it hold about eleven).
 */
for (const [what, char, chars] of [['ASCII', 'x', ROW_CHARS], ['three-byte characters', '字', ROW_CHARS / 3]] as const) {
  t.test(`with RELAY_BUFFER_BYTES of 1 MiB and 300 KB rows (${what}), a relay holds four deliveries, not 64, and delivers them all`, async (t) => {
    const db = await freshDatabase(t);
    const T = tenantName('buf');
    await createTenant(db, T);
    const holding = await startHoldingReceiver(t);
    const { recv } = holding;
    const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), maxInFlight: 32, timeoutMs: 20_000 });
    recv.secrets.push(sub.secret);
    await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, repeat('${char}', ${chars}) FROM generate_series(1, ${ROWS}) g`]);
    const relay = await startRelay(t, db.url, { RELAY_BUFFER_BYTES: String(1024 * 1024), RELAY_LEASE_MS: '45000' });

    // 3 fit in the budget (900 KB); the next claim has 100 KB of room and takes one more (a claim
    // always takes its first); then there is no room, and no claim.
    await waitFor(() => recv.pending === 4, 10_000, 'four requests held by the receiver', () => ({ pending: recv.pending }));
    await new Promise((r) => setTimeout(r, 750));
    t.equal(recv.pending, 4, 'still four after a while: no more claimed');
    const leased = () => count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE locked_by IS NOT NULL AND next_attempt_at > now()');
    t.equal(await leased(), 4, 'four leases in the database');
    t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE attempts = 0 AND locked_by IS NULL'), ROWS - 4,
      'the leases over the budget went back without an attempt counted');

    holding.release();
    await waitFor(() => recv.delivered.size === ROWS, 20_000, 'every row delivered', () => ({ delivered: recv.delivered.size, pending: recv.pending }));
    t.ok(holding.maxPending <= 4, `never more than four requests at once (saw ${holding.maxPending})`);
    t.equal(recv.requests.length, ROWS, 'each once');
    t.ok(recv.requests.every((r) => r.verified && Buffer.byteLength(r.body) > ROW_CHARS), 'signed, and whole');
    // Answered is not yet recorded: wait for every outcome.
    await waitFor(async () => (await count(db, 'SELECT count(*)::int AS n FROM public.event_acknowledgments')) === ROWS, 10_000, 'every outcome recorded');
    const { rows: acks } = await db.query<{ attempts: string }>("SELECT metadata->>'attempts' AS attempts FROM public.event_acknowledgments");
    t.same([...new Set(acks.map((a) => a.attempts))], ['1'], 'each acknowledged at its first attempt');
    t.same(relay.logs.errors().map((l) => l.msg), [], 'no error logged');
  });
}

t.test('a payload larger than the whole budget still goes, alone', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('bug');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url() });
  recv.secrets.push(sub.secret);
  await startRelay(t, db.url, { RELAY_BUFFER_BYTES: '65536' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, repeat('y', 200000) FROM generate_series(1, 3) g`]);
  await waitFor(() => recv.delivered.size === 3, 15_000, 'the three large rows delivered', () => ({ delivered: recv.delivered.size }));
  t.equal(recv.requests.length, 3, 'each once');
});

t.test('the budget is per subscription: a receiver holding large payloads does not stop another tenant', async (t) => {
  const db = await freshDatabase(t);
  const A = tenantName('bua');
  const B = tenantName('bub');
  await createTenant(db, A);
  await createTenant(db, B);
  const { recv: slow, release } = await startHoldingReceiver(t);
  const fast = await startReceiver(t);
  const subA = await subscribe(db, { tenant: A, userId: 1, url: slow.url(), timeoutMs: 20_000 });
  const subB = await subscribe(db, { tenant: B, userId: 1, url: fast.url() });
  slow.secrets.push(subA.secret);
  fast.secrets.push(subB.secret);
  await writeAll(db, [`INSERT INTO ${A}.vendors (id, name) SELECT g, repeat('x', ${ROW_CHARS}) FROM generate_series(1, ${ROWS}) g`]);
  await startRelay(t, db.url, { RELAY_BUFFER_BYTES: String(1024 * 1024), RELAY_LEASE_MS: '45000' });
  await waitFor(() => slow.pending >= 2, 10_000, 'tenant A\'s receiver to hold its requests', () => ({ pending: slow.pending }));
  await writeAll(db, [`INSERT INTO ${B}.vendors (id, name) SELECT g, 'small' FROM generate_series(1, 50) g`]);
  await waitFor(() => fast.delivered.size === 50, 10_000, 'tenant B\'s 50 small events, while A\'s receiver holds its large ones',
    () => ({ fast: fast.delivered.size, slowPending: slow.pending }));
  t.ok(slow.pending <= 3, `tenant A holds at most its share, half of 1 MiB, plus one (${slow.pending} requests)`);
  release();
  await waitFor(() => slow.delivered.size === ROWS, 20_000, 'tenant A\'s rows once its receiver answers', () => ({ slow: slow.delivered.size }));
});

t.test('RELAY_BUFFER_BYTES=0 turns the bound off', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('buo');
  await createTenant(db, T);
  const { recv, release } = await startHoldingReceiver(t);
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), maxInFlight: 32, timeoutMs: 20_000 });
  recv.secrets.push(sub.secret);
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, repeat('x', ${ROW_CHARS}) FROM generate_series(1, ${ROWS}) g`]);
  await startRelay(t, db.url, { RELAY_BUFFER_BYTES: '0', RELAY_LEASE_MS: '45000' });
  await waitFor(() => recv.pending === ROWS, 10_000, 'every row in flight at once (only the slots limit it)', () => ({ pending: recv.pending }));
  release();
  await waitFor(() => recv.delivered.size === ROWS, 20_000, 'all delivered');
  t.pass('no bound');
});

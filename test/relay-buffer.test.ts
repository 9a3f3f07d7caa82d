/**
 * RELAY_BUFFER_BYTES (sql/019): a relay holds at most that many payload bytes in deliveries it
 * leased and has not finished sending, plus one; the leases over the budget go back at once without
 * an attempt counted, and everything is delivered once the receiver takes it. Large rows therefore
 * cost bounded memory instead of 2 x max_in_flight payloads per subscription.
 */
import t from 'tap';
import { freshDatabase } from './helpers/db.js';
import { answer, startReceiver } from './helpers/receiver.js';
import { count, createTenant, startRelay, subscribe, tenantName, waitFor, writeAll } from './helpers/relay.js';

const ROW_CHARS = 300_000;
const ROWS = 20;

t.test('with RELAY_BUFFER_BYTES of 1 MiB and 300 KB rows, a relay holds four deliveries, not 64, and delivers them all', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('buf');
  await createTenant(db, T);
  let release: () => void = () => undefined;
  const held = new Promise<void>((r) => (release = r));
  let maxPending = 0;
  const recv = await startReceiver(t, {
    respond: async (_r, res) => {
      maxPending = Math.max(maxPending, recv.pending);
      await held;
      answer(res, 200, 'ok');
    },
  });
  const sub = await subscribe(db, { tenant: T, userId: 1, url: recv.url(), maxInFlight: 32, timeoutMs: 20_000 });
  recv.secrets.push(sub.secret);
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, repeat('x', ${ROW_CHARS}) FROM generate_series(1, ${ROWS}) g`]);
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

  release();
  await waitFor(() => recv.delivered.size === ROWS, 20_000, 'every row delivered', () => ({ delivered: recv.delivered.size, pending: recv.pending }));
  t.ok(maxPending <= 4, `never more than four requests at once (saw ${maxPending})`);
  t.equal(recv.requests.length, ROWS, 'each once');
  t.ok(recv.requests.every((r) => r.verified && r.body.length > ROW_CHARS), 'signed, and whole');
  const { rows: acks } = await db.query<{ attempts: string }>("SELECT metadata->>'attempts' AS attempts FROM public.event_acknowledgments");
  t.same([...new Set(acks.map((a) => a.attempts))], ['1'], 'each acknowledged at its first attempt');
  t.same(relay.logs.errors().map((l) => l.msg), [], 'no error logged');
});

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

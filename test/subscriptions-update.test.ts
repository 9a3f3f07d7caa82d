/**
 * `subscriptions update` and `add` against a running relay: a corrected URL that pending retries
 * follow, a longer timeout that gives back deliveries queued under the old lease, and `add`
 * refusing invalid URLs and filters (exit 2, a clear message, nothing stored). Split from
 * relay-retries.test.ts, so that the two run side by side.
 */
import { randomBytes } from 'node:crypto';
import t from 'tap';
import { runCli, type CliResult } from './helpers/cli.js';
import { freshDatabase } from './helpers/db.js';
import { answer, startReceiver } from './helpers/receiver.js';
import { count, createTenant, eventIds, startRelay, subscribe, tenantName, unprocessed, waitFor, writeAll } from './helpers/relay.js';

const NO_CIRCUIT = { CIRCUIT_FAILURE_THRESHOLD: '1000' };

/** Runs tasks with at most `limit` at a time, results in order. */
async function inParallel<T>(tasks: Array<() => Promise<T>>, limit = 6): Promise<T[]> {
  const out: T[] = new Array(tasks.length);
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, async () => {
    while (next < tasks.length) {
      const i = next++;
      out[i] = await (tasks[i] as () => Promise<T>)();
    }
  }));
  return out;
}

t.test('subscriptions update moves a subscription to a corrected URL: pending retries follow it, bad input changes nothing', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tu');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  // A typo in the path: the receiver answers 404 there (retried), 200 at the right path.
  const sub = await subscribe(db, { tenant: T, userId: 6, url: recv.url('/hoks') });
  recv.secrets.push(sub.secret);
  recv.respond = (r, res) => answer(res, r.path === '/hooks' ? 200 : 404, r.path === '/hooks' ? 'ok' : 'no such hook');
  // Enough attempts, spaced out, that the deliveries are still retrying when the URL is corrected:
  // the refused updates below take ten CLI runs first, which took 50 s on a loaded CI machine (100
  // attempts at most 600 ms apart ran out there, and the deliveries died before the correction).
  await startRelay(t, db.url, { ...NO_CIRCUIT, RETRY_MAX_ATTEMPTS: '1000', RETRY_BASE_MS: '300', RETRY_MAX_MS: '1000' });
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 5) g`]);
  const ids = await eventIds(db, T);
  await waitFor(() => recv.at('/hoks').length >= ids.length, 10_000, 'attempts at the wrong URL');
  const env = { DATABASE_URL: db.url, WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true' };
  const before = await db.query('SELECT * FROM public.outbox_subscriptions WHERE id = $1', [sub.id]);

  const bad: Array<[string[], RegExp]> = [
    [[String(sub.id)], /nothing to change/],
    [[String(sub.id), '--url', 'ftp://example.com/x'], /scheme must be https/],
    [[String(sub.id), '--url', 'http://169.254.169.254/latest'], /private\/loopback\/link-local/],
    [[String(sub.id), '--events', 'vendors-*'], /invalid event filter/],
    [[String(sub.id), '--max-in-flight', '0'], /max in-flight must be from 1 to 1000/],
    [[String(sub.id), '--timeout-ms', 'soon'], /timeout \(ms\) must be a whole number/],
    [[String(sub.id), '--ordering', 'none'], /a subscription's ordering cannot be changed .*disable it, remove it and add it again/],
    [[String(sub.id), '--tenant', 'tenant_b', '--user', '9'], /a subscription's tenant and user cannot be changed/],
    [['999999', '--url', recv.url('/hooks')], /subscription 999999 does not exist/],
    [['abc', '--url', recv.url('/hooks')], /subscription id must be a whole number/],
  ];
  for (const [args, message] of bad) {
    // The loopback receiver is allowed as a target, except where the guard itself is tested.
    const res = await runCli(['subscriptions', 'update', ...args], args.some((a) => a.includes('169.254')) ? { DATABASE_URL: db.url } : env);
    t.equal(res.code, 2, `${args.join(' ')}: exit 2`);
    t.match(res.stderr, message, `${args.join(' ')}: says why`);
  }
  t.same((await db.query('SELECT * FROM public.outbox_subscriptions WHERE id = $1', [sub.id])).rows, before.rows, 'refused updates changed nothing');

  const res = await runCli(['subscriptions', 'update', String(sub.id), '--url', recv.url('/hooks'), '--max-in-flight', '4', '--events', 'vendors_*', '--json'], env);
  t.equal(res.code, 0, res.stderr);
  t.match(JSON.parse(res.stdout), { id: sub.id, url: recv.url('/hooks'), maxInFlight: 4, eventTypes: ['vendors_*'], tenant: T, userId: 6, ordering: 'aggregate' }, 'the subscription as listed, changed');
  await waitFor(async () => recv.delivered.size === ids.length && (await unprocessed(db)) === 0, 15_000, 'every event delivered at the corrected URL');
  t.ok([...recv.delivered.values()].every((r) => r.path === '/hooks'), 'all at the new URL');
  const firstIds = new Set(recv.at('/hoks').map((r) => r.webhookId));
  t.ok([...recv.delivered.values()].every((r) => firstIds.has(r.webhookId)), 'with the webhook-ids of the first attempts');
  // The new filter applies to what is captured from now on.
  await writeAll(db, [`INSERT INTO ${T}.projects (id, title) VALUES (1, 'not subscribed')`, `UPDATE ${T}.vendors SET name = 'x' WHERE id = 1`]);
  await waitFor(async () => (await unprocessed(db)) === 0 && recv.delivered.size === ids.length + 1, 10_000, 'the vendors update delivered');
  t.notOk(recv.requests.some((r) => r.body.includes('projects_insert')), 'a projects event is no longer sent');
  const text = await runCli(['subscriptions', 'update', String(sub.id), '--timeout-ms', '3000'], env);
  t.equal(text.stdout, `subscription ${sub.id} updated: timeoutMs\n`);
});

t.test('a longer timeout set by subscriptions update gives back the deliveries queued under the old lease', async (t) => {
  const db = await freshDatabase(t);
  const T = tenantName('tl');
  await createTenant(db, T);
  const recv = await startReceiver(t);
  // One slot: one delivery is sent (held here), one waits in the relay's prefetch queue.
  // The held request must not time out during the test: a 15 s timeout (8 s ran out on a loaded CI machine), raised to 30 s.
  const sub = await subscribe(db, { tenant: T, userId: 8, url: recv.url(), maxInFlight: 1, timeoutMs: 15000, ordering: 'none' });
  recv.secrets.push(sub.secret);
  let release: () => void = () => undefined;
  const held = new Promise<void>((r) => (release = r));
  recv.respond = async (r, res) => {
    if (r.seq === 0) await held;
    answer(res, 200, 'ok');
  };
  await startRelay(t, db.url, NO_CIRCUIT);
  await writeAll(db, [`INSERT INTO ${T}.vendors (id, name) SELECT g, 'v' || g FROM generate_series(1, 3) g`]);
  await waitFor(async () => recv.pending === 1 && (await count(db, 'SELECT count(*)::int AS n FROM public.outbox_deliveries WHERE locked_by IS NOT NULL')) === 2, 10_000, 'one delivery sent and one queued');
  const sentId = recv.requests[0]?.webhookId;
  const leased = async () => (await db.query<{ id: string; at: string }>(
    "SELECT 'msg_' || event_id || '_' || subscription_id AS id, last_attempt_at::text AS at FROM public.outbox_deliveries WHERE locked_by IS NOT NULL")).rows;
  const queued = (await leased()).find((r) => r.id !== sentId);
  t.ok(queued, 'the queued delivery is leased');
  const res = await runCli(['subscriptions', 'update', String(sub.id), '--timeout-ms', '30000'], { DATABASE_URL: db.url, WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true' });
  t.equal(res.code, 0, res.stderr);
  // Given back: its lease under the old timeout is gone (the next claim may take it or another one).
  await waitFor(async () => !(await leased()).some((r) => r.id === queued?.id && r.at === queued?.at), 5_000, 'the queued delivery to be given back',
    async () => ({ queued, now: await leased() }));
  t.equal(recv.pending, 1, 'the first request is still held');
  release();
  await waitFor(async () => recv.delivered.size === 3 && (await unprocessed(db)) === 0, 10_000, 'all three delivered');
  t.equal(recv.requests.length, 3, 'each sent once');
});

t.test('subscriptions add refuses invalid URLs and filters with exit 2 and a clear message', async (t) => {
  const db = await freshDatabase(t);
  const env = { DATABASE_URL: db.url };
  const base = ['subscriptions', 'add', '--tenant', 'tenant_x', '--user', '1'];
  const urlCases: Array<[string, RegExp]> = [
    ['not a url', /not an absolute URL/],
    ['ftp://example.com/hook', /scheme must be https/],
    ['javascript:alert(1)', /scheme must be https/],
    ['file:///etc/passwd', /scheme must be https/],
    ['https://user:pw@example.com/hook', /credentials/],
    ['https://example.com/hook#frag', /fragment/],
    [`https://example.com/${'a'.repeat(2100)}`, /longer than 2048/],
    ['http://127.0.0.1:8080/hook', /private\/loopback\/link-local/],
    ['http://169.254.169.254/latest/meta-data/', /private\/loopback\/link-local/],
    ['http://10.1.2.3/hook', /private\/loopback\/link-local/],
    ['http://[::1]/hook', /private\/loopback\/link-local/],
    ['http://[::ffff:127.0.0.1]/hook', /private\/loopback\/link-local/],
    ['http://[::127.0.0.1]/hook', /private\/loopback\/link-local/],
    ['http://2130706433/hook', /private\/loopback\/link-local/],
    ['http://localhost:3000/hook', /local name/],
  ];
  const results = await inParallel(urlCases.map(([url]) => () => runCli([...base, '--url', url], env)));
  for (const [i, [url, message]] of urlCases.entries()) {
    const res = results[i] as CliResult;
    t.equal(res.code, 2, `${url.slice(0, 60)}: exit 2`);
    const errors = res.stderr.split('\n').filter((l) => l.startsWith('outbox-relay: error:'));
    t.equal(errors.length, 1, 'one error line');
    t.match(errors[0], message, `${url.slice(0, 60)}: says why`);
    t.equal(res.stdout, '', 'nothing on stdout');
  }
  const filterCases = ['vendors-*', 'vendors_*;drop table x', 'vendors update', 'vendors_*,', 'v'.repeat(101), '%', 'vendors.*'];
  const filterResults = await inParallel(filterCases.map((events) => () => runCli([...base, '--url', 'https://example.com/hook', '--events', events], env)));
  for (const [i, events] of filterCases.entries()) {
    const res = filterResults[i] as CliResult;
    t.equal(res.code, 2, `filter ${JSON.stringify(events.slice(0, 40))}: exit 2`);
    t.match(res.stderr, /invalid event filter/, 'says it is the filter');
  }
  for (const events of ['', '  ']) {
    const res = await runCli([...base, '--url', 'https://example.com/hook', '--events', events], env);
    t.equal(res.code, 2, `an empty filter ${JSON.stringify(events)} (an unset variable) is refused, not read as "every event"`);
    t.match(res.stderr, /the event filter is empty: leave the option out, or give "\*"/, 'saying how to ask for every event');
  }
  const other: Array<[string[], RegExp]> = [
    [['--ordering', 'random'], /ordering must be/],
    [['--secret', 'not-a-secret'], /whsec_/],
    [['--max-in-flight', '0'], /max in-flight/],
  ];
  const otherResults = await inParallel(other.map(([args]) => () => runCli([...base, '--url', 'https://example.com/hook', ...args], env)));
  for (const [i, [args, message]] of other.entries()) {
    const res = otherResults[i] as CliResult;
    t.equal(res.code, 2, `${args.join(' ')}: exit 2`);
    t.match(res.stderr, message);
  }
  const badTenant = await runCli(['subscriptions', 'add', '--tenant', 'x; drop', '--user', '1', '--url', 'https://example.com/hook'], env);
  t.equal(badTenant.code, 2, 'a bad tenant name: exit 2');
  const prod = await runCli([...base, '--url', 'http://example.com/hook'], {
    ...env,
    NODE_ENV: 'production',
    OUTBOX_ENCRYPTION_KEYS: `k1:${randomBytes(32).toString('base64')}`, // required in production
  });
  t.equal(prod.code, 2, 'plain http in production is refused with exit 2');
  t.match(prod.stderr, /must use https in production/);
  t.equal(await count(db, 'SELECT count(*)::int AS n FROM public.outbox_subscriptions'), 0, 'no subscription was created');

  const okPrivate = await runCli([...base, '--url', 'http://127.0.0.1:9/hook', '--events', 'vendors_*,projects_update', '--json'], { ...env, WEBHOOK_ALLOW_PRIVATE_TARGETS: 'true' });
  t.equal(okPrivate.code, 0, `with WEBHOOK_ALLOW_PRIVATE_TARGETS=true a loopback target is accepted ${okPrivate.stderr}`);
  const { rows } = await db.query<{ event_types: string[] }>('SELECT event_types FROM public.outbox_subscriptions');
  t.same(rows[0]?.event_types, ['vendors_*', 'projects_update'], 'and the filter stored as given');
  t.match(okPrivate.stderr, /schema "tenant_x" does not exist in this database: the subscription receives events only once its tables are captured \("outbox-relay triggers install --schema tenant_x"\)/,
    'a tenant that does not exist is accepted with a warning (a typo would otherwise go unnoticed)');
  t.match(JSON.parse(okPrivate.stdout), { id: Number, secret: /^whsec_/ }, 'the warning goes to stderr: stdout stays one JSON document');
  await createTenant(db, 'tenant_y');
  const captured = await runCli(['subscriptions', 'add', '--tenant', 'tenant_y', '--user', '1', '--url', 'https://example.com/hook'], env);
  t.equal(captured.code, 0, captured.stderr);
  t.notMatch(captured.stderr, /does not exist|is captured/, 'no warning for a captured tenant');
  await db.query('CREATE SCHEMA tenant_z');
  const bare = await runCli(['subscriptions', 'add', '--tenant', 'tenant_z', '--user', '1', '--url', 'https://example.com/hook'], env);
  t.match(bare.stderr, /nothing in schema "tenant_z" is captured/, 'a schema with nothing captured gets its own warning');
});


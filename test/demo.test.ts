/**
 * `outbox-relay demo`, as a new user runs it: the whole pipeline in one command, ending with a
 * summary. Once against a database of the test server (--database-url), once with nothing given
 * (its own embedded PostgreSQL, what `npm run demo` does on a fresh clone).
 */
import t, { type Test } from 'tap';
import { runCli } from './helpers/cli.js';
import { freshDatabase } from './helpers/db.js';

interface Summary {
  written: number;
  delivered: number;
  badSignatures: number;
  duplicates: number;
  orderKept: boolean;
  acknowledgments: number;
  pending: number;
}

const num = (s: string | undefined): number => (s === undefined ? Number.NaN : Number(s.replace(/,/g, '')));

function parseSummary(stdout: string): Summary {
  const at = stdout.indexOf('demo summary');
  const text = at >= 0 ? stdout.slice(at) : '';
  return {
    written: num(/row changes written\s+([\d,]+)/.exec(text)?.[1]),
    delivered: num(/webhooks delivered\s+([\d,]+)/.exec(text)?.[1]),
    badSignatures: num(/bad signatures: (\d+)/.exec(text)?.[1]),
    duplicates: num(/duplicates\s+([\d,]+)/.exec(text)?.[1]),
    orderKept: /per-aggregate order\s+kept/.test(text),
    acknowledgments: num(/acknowledgments\s+([\d,]+) processed/.exec(text)?.[1]),
    pending: num(/still pending\s+([\d,]+)/.exec(text)?.[1]),
  };
}

function checkSummary(t: Test, stdout: string): void {
  const s = parseSummary(stdout);
  t.ok(s.written > 0, `rows were written (${s.written})`);
  t.ok(s.delivered > 0, `webhooks were delivered and verified (${s.delivered})`);
  t.equal(s.delivered, s.written, 'one webhook per row change: the summary shows nothing lost');
  t.equal(s.badSignatures, 0, 'no bad signatures');
  t.equal(s.duplicates, 0, 'no duplicates');
  t.ok(s.orderKept, 'per-aggregate order kept');
  t.equal(s.pending, 0, 'nothing left pending');
  t.equal(s.acknowledgments, s.delivered, 'one processed acknowledgment per delivered event');
}

t.test('demo --database-url: runs, stops after --duration, prints a true summary', async (t) => {
  const db = await freshDatabase(t);
  const r = await runCli(['demo', '--duration', '4', '--rate', '100', '--database-url', db.url], {}, { timeoutMs: 90_000 });
  t.equal(r.code, 0, `exit 0 (stderr: ${r.stderr.slice(0, 500)})`);
  t.match(r.stdout, /database ready/);
  checkSummary(t, r.stdout);
});

t.test('demo with nothing given starts its own PostgreSQL, as on a fresh clone', async (t) => {
  const r = await runCli(['demo', '--duration', '3', '--rate', '50'], {}, { timeoutMs: 150_000 });
  t.equal(r.code, 0, `exit 0 (stderr: ${r.stderr.slice(0, 500)})`);
  t.match(r.stdout, /starting an embedded PostgreSQL/);
  checkSummary(t, r.stdout);
});

t.test('demo refuses bad arguments with one clear line', async (t) => {
  const r = await runCli(['demo', '--rate', 'fast'], {}, { timeoutMs: 30_000 });
  t.equal(r.code, 2, 'usage error: exit 2');
  t.match(r.stderr, /--rate must be a number/);
  t.notMatch(r.stderr, /\n\s+at /, 'no stack trace');
});

#!/usr/bin/env node
// `npm test`: runs the tap suite against a real PostgreSQL.
//
// - TEST_DATABASE_URL set: that server (any database on it; we only create and drop our own ones).
// - otherwise: an embedded PostgreSQL started here once and stopped at the end, whatever happens.
//
// A template database is migrated once; each test file clones its own database from it (see
// test/helpers/db.ts), so files run in parallel. At the end the template and any database a crashed
// test file left behind are dropped, and the last line printed is "N passed, M failed" (assertions of
// every file, as tap counts them; a file that died before finishing counts as one more failure).
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';

const root = new URL('..', import.meta.url).pathname;
const { startEmbeddedPostgres } = await import(join(root, 'dist/db/embeddedPostgres.js'));
const { migrate } = await import(join(root, 'dist/db/migrate.js'));

const runId = `${process.pid}_${Date.now().toString(36)}`;
const resultsDir = join(root, '.tap', `results-${runId}`);
const templateName = `outbox_tpl_${runId}`;
let server;
let adminUrl = process.env.TEST_DATABASE_URL;

async function withAdmin(url, fn) {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

function dbUrl(base, name) {
  const u = new URL(base);
  u.pathname = `/${name}`;
  return u.toString();
}

async function cleanup() {
  if (adminUrl) {
    await withAdmin(adminUrl, async (c) => {
      const { rows } = await c.query(
        "SELECT datname FROM pg_database WHERE datname = $1 OR datname LIKE $2",
        [templateName, `outbox_t_${runId}%`],
      );
      for (const { datname } of rows) {
        await c.query(`DROP DATABASE IF EXISTS ${c.escapeIdentifier(datname)} WITH (FORCE)`).catch(() => undefined);
      }
    }).catch((err) => process.stderr.write(`test harness: cleanup failed: ${err.message}\n`));
  }
  if (server) await server.destroy().catch(() => undefined);
  server = undefined;
}

/** Counts the test points of every file from tap's saved per-file results. */
function countResults(dir) {
  let passed = 0;
  let failed = 0;
  const walk = (d) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (name.endsWith('.tap')) {
        const lines = readFileSync(p, 'utf8').split('\n');
        let filePassed = 0;
        let fileFailed = 0;
        let planned = false;
        // Count leaf assertions, as tap's own summary does: a point that closes a "# Subtest:" block
        // at the same indent is the subtest's summary, not an assertion.
        const open = [];
        for (const line of lines) {
          const indent = line.length - line.trimStart().length;
          const text = line.trimStart();
          if (text.startsWith('# Subtest:')) open.push(indent);
          else if (/^(not )?ok \d+/.test(text)) {
            if (open.length && open[open.length - 1] === indent) {
              open.pop();
              continue;
            }
            if (/# (SKIP|TODO)/i.test(text)) continue; // neither passed nor failed, as tap counts them
            if (text.startsWith('ok')) filePassed++;
            else fileFailed++;
          } else if (indent === 0 && /^1\.\.\d+/.test(text)) planned = true;
        }
        if (!planned && fileFailed === 0) fileFailed = 1; // the file died before finishing
        passed += filePassed;
        failed += fileFailed;
      }
    }
  };
  if (existsSync(dir)) walk(dir);
  return { passed, failed };
}

let child;
let tail = '';
let interrupted = false;
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    interrupted = true;
    if (child) child.kill(sig);
  });
}

let status = 1;
try {
  if (!adminUrl) {
    process.stderr.write('test harness: TEST_DATABASE_URL not set, starting an embedded PostgreSQL\n');
    server = await startEmbeddedPostgres({ fast: true, settings: { max_connections: 400 } });
    adminUrl = server.url;
  }
  const version = await withAdmin(adminUrl, async (c) => {
    await c.query(`CREATE DATABASE ${c.escapeIdentifier(templateName)}`);
    return (await c.query('SHOW server_version')).rows[0].server_version;
  });
  process.stderr.write(`test harness: PostgreSQL ${version}${server ? ' (embedded)' : ''}\n`);
  await withAdmin(dbUrl(adminUrl, templateName), (c) => migrate(c));

  // Our own results directory: concurrent runs in one checkout must not count each other's files.
  rmSync(resultsDir, { recursive: true, force: true });
  const args = [`--output-dir=${resultsDir}`, ...process.argv.slice(2)];
  status = await new Promise((resolve) => {
    child = spawn(join(root, 'node_modules/.bin/tap'), args, {
      cwd: root,
      stdio: ['inherit', 'pipe', 'inherit'],
      env: {
        ...process.env,
        TEST_DATABASE_URL: adminUrl,
        OUTBOX_TEST_TEMPLATE: templateName,
        OUTBOX_TEST_RUN_ID: runId,
        OUTBOX_TEST_PG_VERSION: version,
      },
    });
    // Pass tap's output through, keeping its closing summary ("# { total: N, pass: P, fail: F }").
    child.stdout.on('data', (chunk) => {
      process.stdout.write(chunk);
      tail = (tail + chunk.toString('utf8')).slice(-8192);
    });
    child.on('exit', (code, signal) => resolve(code ?? (signal ? 1 : 0)));
  });
} catch (err) {
  process.stderr.write(`test harness: ${err && err.message ? err.message : String(err)}\n`);
  status = 1;
} finally {
  await cleanup();
}
// tap's own summary is the count of record; the saved per-file results are the fallback when tap
// died before printing one (a file that died before finishing counts as a failure there).
const counted = countResults(resultsDir);
const summary = [...tail.matchAll(/^# \{ total: (\d+)(?:, pass: (\d+))?(?:, fail: (\d+))?/gm)].pop();
const passed = summary ? Number(summary[2] ?? 0) : counted.passed;
const failed = summary ? Math.max(Number(summary[3] ?? 0), counted.failed) : counted.failed;
rmSync(resultsDir, { recursive: true, force: true });
process.stdout.write(`${passed} passed, ${failed} failed\n`);
process.exit(interrupted ? 130 : status !== 0 ? status : failed > 0 ? 1 : 0);

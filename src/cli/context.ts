/**
 * What every command needs: the resolved configuration, a database client, a logger on stderr, and
 * one way to print results (text, or exactly one JSON document with --json).
 */
import pg from 'pg';
import { unknownEnvWarnings } from '../config/envTypos.js';
import { loadConfig, type Env } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { connectionOptions, describeTarget } from '../db/connection.js';
import { toOutboxError } from '../errors.js';
import { createLogger, type Logger } from '../log.js';

export interface GlobalOptions {
  config?: string;
}

export interface CliIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  env: Env;
}

export const processIo: CliIo = {
  stdout: (text) => process.stdout.write(text),
  stderr: (text) => process.stderr.write(text),
  env: process.env,
};

export class CommandContext {
  private cached?: Config;
  private cachedLogger?: Logger;

  constructor(
    readonly io: CliIo,
    readonly globals: GlobalOptions,
  ) {}

  /** The configuration, loaded on first use (commands that need none never fail on it). */
  get config(): Config {
    if (!this.cached) {
      this.cached = loadConfig({ configFile: this.globals.config, env: this.io.env });
      for (const w of unknownEnvWarnings(this.io.env)) this.warn(w);
    }
    return this.cached;
  }

  /** A logger writing JSON to stderr. */
  get logger(): Logger {
    this.cachedLogger ??= createLogger({ level: this.config.log.level, fd: 2 });
    return this.cachedLogger;
  }

  /** Prints a command's result: `data` as one JSON document with --json, else `text()`. */
  print(json: boolean | undefined, data: unknown, text: () => string): void {
    if (json) this.io.stdout(`${JSON.stringify(data, null, 2)}\n`);
    else {
      const out = text();
      if (out) this.io.stdout(out.endsWith('\n') ? out : `${out}\n`);
    }
  }

  /** A warning for the person at the terminal (stderr, one line). */
  warn(message: string): void {
    this.io.stderr(`outbox-relay: warning: ${message}\n`);
  }

  /** Runs `fn` with a connected client, closing it afterwards. Connection failures become one clear line. */
  async withClient<T>(fn: (client: pg.Client) => Promise<T>, applicationName = 'outbox-relay-cli'): Promise<T> {
    const client = new pg.Client(connectionOptions(this.config.database, applicationName));
    // An error event on an idle client would otherwise crash the process with a stack trace.
    client.on('error', () => undefined);
    try {
      await client.connect();
    } catch (err) {
      const e = toOutboxError(err);
      e.message = `${e.message} (database ${describeTarget(this.config.database)})`;
      throw e;
    }
    try {
      return await fn(client);
    } finally {
      await client.end().catch(() => undefined);
    }
  }
}

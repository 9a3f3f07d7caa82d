/** `migrate` and `reset-db`: apply the schema, or (outside production) drop and re-apply it. */
import { createInterface } from 'node:readline/promises';
import type { Command } from 'commander';
import { autoCaptureInstalled, NO_AUTO_CAPTURE_WARNING } from '../capture/triggers.js';
import { describeTarget } from '../db/connection.js';
import { migrate, loadMigrations } from '../db/migrate.js';
import { resetDatabase } from '../db/reset.js';
import { EXIT, OutboxError } from '../errors.js';
import type { CommandContext } from './context.js';

export function registerMigrateCommands(program: Command, ctx: () => CommandContext): void {
  program
    .command('migrate')
    .description('apply the SQL migrations in sql/ (idempotent; safe to run from several replicas at once)')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { json?: boolean }) => {
      const c = ctx();
      const migrations = loadMigrations();
      const { result, autoCapture } = await c.withClient(async (client) => {
        const applied = await migrate(client, migrations);
        return { result: applied, autoCapture: await autoCaptureInstalled(client) };
      }, 'outbox-relay-migrate');
      c.print(opts.json, { applied: result.applied, total: migrations.length }, () =>
        result.applied.length === 0
          ? `database ${describeTarget(c.config.database)} is up to date (${migrations.length} migrations applied)`
          : `applied ${result.applied.map((m) => `${String(m.version).padStart(3, '0')}_${m.name}`).join(', ')} to ${describeTarget(c.config.database)} (${migrations.length} migrations applied in all)`,
      );
      if (!autoCapture) c.warn(NO_AUTO_CAPTURE_WARNING);
    });

  program
    .command('reset-db')
    .description('drop every outbox-relay table, function and capture trigger, then migrate again (refused in production)')
    .option('--yes', 'do not ask for the database name at a terminal')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { json?: boolean; yes?: boolean }) => {
      const c = ctx();
      if (c.config.env === 'production') {
        throw new OutboxError('refusing to reset the database with NODE_ENV=production', 'E_REFUSED_IN_PRODUCTION', EXIT.config);
      }
      // NODE_ENV defaults to development, so production alone does not protect a database: at a
      // terminal, a person types the database's name back (scripts, with no terminal, are not asked).
      if (!opts.yes && process.stdin.isTTY) {
        const target = describeTarget(c.config.database);
        const name = target.slice(target.lastIndexOf('/') + 1);
        const typed = await ask(`reset-db drops every outbox event, acknowledgment, delivery and subscription in ${target}.\nType the database name (${name}) to go on: `);
        if (typed.trim() !== name) throw new OutboxError(`reset-db cancelled: "${typed.trim()}" is not ${name}; nothing was changed`, 'E_CANCELLED', EXIT.usage);
      }
      const migrations = loadMigrations();
      const result = await c.withClient(async (client) => {
        await resetDatabase(client);
        return migrate(client, migrations);
      }, 'outbox-relay-reset');
      c.print(opts.json, { reset: true, applied: result.applied }, () => `database reset: all outbox data and capture triggers dropped, ${result.applied.length} migrations applied`);
    });
}

/** One line from the terminal (stderr carries the question, so stdout stays the command's output). */
async function ask(question: string): Promise<string> {
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    return await rl.question(question);
  } catch (err) {
    // Ctrl-C or Ctrl-D at the question: a cancellation, not a failure.
    if ((err as { code?: string }).code === 'ABORT_ERR') throw new OutboxError('reset-db cancelled; nothing was changed', 'E_CANCELLED', EXIT.usage);
    throw err;
  } finally {
    rl.close();
  }
}

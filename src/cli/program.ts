/**
 * The command tree of `outbox-relay`, and running it against an io (the real process, or a test's).
 * Every error becomes one line on stderr and an exit status (configuration errors: 78); a stack trace
 * is printed only with OUTBOX_RELAY_DEBUG=1.
 */
import { Command, CommanderError } from 'commander';
import { CommandContext, processIo, type CliIo } from './context.js';
import { registerMigrateCommands } from './migrateCommands.js';
import { registerSecretCommands } from './secretCommands.js';
import { registerTenantCommands } from './tenantCommands.js';
import { registerTriggerCommands } from './triggerCommands.js';
import { registerSubscriptionCommands } from './subscriptionCommands.js';
import { registerRunCommand } from './runCommand.js';
import { registerApiCommands } from './apiCommands.js';
import { registerDemoCommand } from './demoCommand.js';
import { registerOpsCommands } from './opsCommands.js';
import { registerHealthcheckCommand } from './healthcheckCommand.js';
import { packageVersion } from './version.js';
import { EXIT, toOutboxError } from '../errors.js';


/** Builds the command tree. Exported for tests, which run commands in-process with their own io. */
export function buildProgram(io: CliIo): { program: Command; context: () => CommandContext } {
  const program = new Command();
  let context: CommandContext | undefined;
  const ctx = (): CommandContext => {
    context ??= new CommandContext(io, program.opts<{ config?: string }>());
    return context;
  };
  program
    .name('outbox-relay')
    .description('Turns row changes in a multi-tenant PostgreSQL database into signed webhooks.')
    .version(packageVersion(), '-V, --version')
    .option('-c, --config <file>', 'JSON configuration file (else CONFIG_FILE); the environment overrides it')
    .configureOutput({
      writeOut: (s) => io.stdout(s),
      writeErr: (s) => io.stderr(s),
      // One line: commander's message plus where to look.
      // (commander puts its "(Did you mean --x?)" suggestion on a line of its own: joined.)
      outputError: (s, write) => write(`outbox-relay: ${s.trim().replace(/\s*\n\s*/g, ' ')} (see --help)\n`),
    })
    .exitOverride();

  registerMigrateCommands(program, ctx);
  registerTriggerCommands(program, ctx);
  registerTenantCommands(program, ctx);
  registerSecretCommands(program, ctx);
  registerSubscriptionCommands(program, ctx);
  registerRunCommand(program, ctx);
  registerApiCommands(program, ctx);
  registerDemoCommand(program, ctx);
  registerOpsCommands(program, ctx);
  registerHealthcheckCommand(program, ctx);

  // Subcommands inherit output settings and the exit override, so usage errors are handled alike.
  const configure = (cmd: Command): void => {
    for (const sub of cmd.commands) {
      sub.exitOverride().configureOutput(program.configureOutput());
      configure(sub);
    }
  };
  configure(program);
  return { program, context: ctx };
}

/** Runs the CLI with `argv` (without node and script); resolves to the exit status. */
export async function runCli(argv: readonly string[], io: CliIo = processIo): Promise<number> {
  const { program } = buildProgram(io);
  if (argv.length === 0) {
    program.outputHelp();
    return EXIT.usage;
  }
  try {
    await program.parseAsync(argv as string[], { from: 'user' });
    return EXIT.ok;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version') return EXIT.ok;
      // 'commander.help' is both `help` (exit 0) and a missing subcommand (`triggers` alone: help on
      // stderr, exit 1): the latter is a usage error, like a bare `outbox-relay`.
      if (err.code === 'commander.help') return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
      // commander has already printed its one-line message.
      return EXIT.usage;
    }
    const e = toOutboxError(err);
    io.stderr(`outbox-relay: error: ${e.message.replace(/\s*\n\s*/g, ' ')}\n`);
    if (io.env.OUTBOX_RELAY_DEBUG === '1' && err instanceof Error && err.stack) io.stderr(`${err.stack}\n`);
    return e.exitCode;
  }
}


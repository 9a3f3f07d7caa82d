/** `run`: the relay daemon. Signals: the first SIGTERM/SIGINT stops gracefully, a second exits at once. */
import type { Command } from 'commander';
import { RelayDaemon } from '../daemon/relayDaemon.js';
import { createLogger } from '../log.js';
import type { CommandContext } from './context.js';
import { secretCipherFor } from './cipher.js';
import { packageVersion } from './version.js';
import { runUntilSignalled } from './untilSignalled.js';

export function registerRunCommand(program: Command, ctx: () => CommandContext): void {
  program
    .command('run')
    .description('run the relay daemon (logs JSON to stdout; stop with SIGTERM)')
    .option('--migrate', 'apply pending migrations first (safe with several replicas)')
    .action(async (opts: { migrate?: boolean }) => {
      const c = ctx();
      const config = c.config;
      const logger = createLogger({ level: config.log.level, fd: 1 });
      const daemon = new RelayDaemon({ config, logger, version: packageVersion(), migrate: Boolean(opts.migrate), cipher: secretCipherFor(c, (m) => logger.warn(m)) });
      await runUntilSignalled(daemon, logger, 'stopping: finishing in-flight deliveries');
      logger.flush();
    });
}

/** `run`: the relay daemon. Signals: the first SIGTERM/SIGINT stops gracefully, a second exits at once. */
import type { Command } from 'commander';
import { RelayDaemon } from '../daemon/relayDaemon.js';
import { createLogger } from '../log.js';
import type { CommandContext } from './context.js';
import { secretCipherFor } from './cipher.js';
import { packageVersion } from './version.js';

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
      let signals = 0;
      const stopped = new Promise<void>((resolve) => {
        const onSignal = (signal: NodeJS.Signals): void => {
          signals++;
          if (signals > 1) {
            logger.warn({ signal }, 'second signal: exiting now');
            process.exit(signal === 'SIGINT' ? 130 : 143);
          }
          logger.info({ signal }, 'stopping: finishing in-flight deliveries');
          void daemon.stop().then(resolve);
        };
        process.on('SIGTERM', onSignal);
        process.on('SIGINT', onSignal);
      });
      try {
        await daemon.start();
      } catch (err) {
        await daemon.stop();
        if (signals > 0) return;
        throw err;
      }
      await stopped;
      logger.flush();
    });
}

/**
 * The lifecycle both daemons share (`run`, `api`): start; on the first SIGTERM or SIGINT stop
 * gracefully; on a second one exit at once (130 for SIGINT, 143 for SIGTERM). A failed start stops
 * what was started and rethrows, unless a signal asked us to stop meanwhile (then it is no error).
 */
import type { Logger } from '../log.js';

export interface Service {
  start(): Promise<unknown>;
  stop(): Promise<void>;
}

/** Runs `service` until a signal stops it. `stopping` is logged at the first signal. */
export async function runUntilSignalled(service: Service, logger: Logger, stopping: string): Promise<void> {
  let signals = 0;
  const stopped = new Promise<void>((resolve) => {
    const onSignal = (signal: NodeJS.Signals): void => {
      signals++;
      if (signals > 1) {
        logger.warn({ signal }, 'second signal: exiting now');
        process.exit(signal === 'SIGINT' ? 130 : 143);
      }
      logger.info({ signal }, stopping);
      void service.stop().then(resolve);
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
  try {
    await service.start();
  } catch (err) {
    await service.stop();
    if (signals > 0) return;
    throw err;
  }
  await stopped;
}

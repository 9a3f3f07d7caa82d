/**
 * Log lines for delivery attempts, from the relay's events: one warn line per failed attempt (tenant,
 * subscription, event id, HTTP status, attempt, next attempt), debug per delivery. No URL, body,
 * header or secret is ever logged.
 */
import type { Logger } from '../log.js';
import type { Relay } from './relay.js';

export function logAttempts(relay: Relay, logger: Logger): void {
  relay.on('attempt', (a) => {
    const base = {
      tenant: a.tenant,
      subscription: a.subscriptionId,
      eventId: a.eventId,
      status: a.result.status ?? null,
      attempt: a.attempt,
      maxAttempts: a.maxAttempts,
      durationMs: a.result.durationMs,
    };
    switch (a.outcome.kind) {
      case 'ok':
        logger.debug(base, 'delivered');
        break;
      case 'retry':
        logger.warn(
          { ...base, error: a.result.error?.message, nextAttemptAt: new Date(Date.now() + a.outcome.delayMs).toISOString() },
          'delivery failed; will retry',
        );
        break;
      case 'dead':
        logger.warn({ ...base, error: a.result.error?.message }, 'delivery failed for the last time: it is dead (requeue with outbox-relay replay)');
        break;
      case 'gone':
        logger.warn(base, 'receiver answered 410 Gone');
        break;
    }
  });
}

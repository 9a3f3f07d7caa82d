/**
 * What an attempt's result means for its delivery: delivered, retry later (when), dead, or the
 * subscription is gone (410). Pure; the relay records the outcome with the next completion batch.
 */
import type { SendResult } from '../webhook/sendWebhook.js';
import { retryDelayMs, type BackoffPolicy } from './backoff.js';

export type OutcomeKind = 'ok' | 'retry' | 'dead' | 'gone';

export interface Outcome {
  kind: OutcomeKind;
  /** For 'retry': milliseconds until the next attempt. */
  delayMs: number;
}

export function decideOutcome(
  result: SendResult,
  attempt: number,
  maxAttempts: number,
  policy: BackoffPolicy,
  random: () => number = Math.random,
): Outcome {
  if (result.ok) return { kind: 'ok', delayMs: 0 };
  if (result.status === 410) return { kind: 'gone', delayMs: 0 };
  if (attempt >= maxAttempts) return { kind: 'dead', delayMs: 0 };
  const backoff = retryDelayMs(attempt, policy, random);
  // The receiver's Retry-After wins when it asks for longer than our backoff (already capped).
  const delayMs = result.retryAfterMs !== undefined ? Math.max(result.retryAfterMs, backoff) : backoff;
  return { kind: 'retry', delayMs };
}

/**
 * Retry delays: exponential with full jitter (AWS Architecture Blog, "Exponential Backoff And
 * Jitter"): a uniform draw in [0, min(max, base * 2^(attempt-1))]. Full jitter spreads the retries of
 * many failed deliveries so a recovering receiver is not hit by a synchronized wave.
 */
export interface BackoffPolicy {
  baseMs: number;
  maxMs: number;
}

/** The ceiling of the delay after attempt `attempt` (1-based) failed. */
export function backoffCeilingMs(attempt: number, policy: BackoffPolicy): number {
  const exp = Math.min(Math.max(attempt - 1, 0), 52);
  return Math.min(policy.maxMs, policy.baseMs * 2 ** exp);
}

/** The delay before the next attempt after attempt `attempt` failed. */
export function retryDelayMs(attempt: number, policy: BackoffPolicy, random: () => number = Math.random): number {
  return Math.floor(random() * backoffCeilingMs(attempt, policy));
}

/** Expected and worst-case time from the first attempt to the last, for documentation and checks. */
export function retrySpanMs(maxAttempts: number, policy: BackoffPolicy): { expected: number; worst: number } {
  let worst = 0;
  for (let a = 1; a < maxAttempts; a++) worst += backoffCeilingMs(a, policy);
  return { expected: worst / 2, worst };
}

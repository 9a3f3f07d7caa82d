/**
 * Per-subscription circuit breaker. Closed: requests flow. After `threshold` consecutive failures it
 * opens: the relay claims nothing for the subscription (so no attempts are burned) until the cool-down
 * ends; then half-open: one probe. A successful probe closes it; a failed one re-opens it with the
 * cool-down doubled (up to a maximum). A dead endpoint thus costs a trickle of probes, not one request
 * per event per attempt, and its deliveries wait instead of dying.
 */
export type CircuitState = 'closed' | 'open' | 'half-open';

export interface CircuitPolicy {
  threshold: number;
  cooldownMs: number;
  maxCooldownMs: number;
}

export class CircuitBreaker {
  private failures = 0;
  private openedAt = 0;
  private cooldown: number;
  private probing = false;
  private stateValue: CircuitState = 'closed';

  constructor(private readonly policy: CircuitPolicy, private readonly now: () => number = Date.now) {
    this.cooldown = policy.cooldownMs;
  }

  /** The current state (an open circuit turns half-open once its cool-down has passed). */
  get state(): CircuitState {
    if (this.stateValue === 'open' && this.now() - this.openedAt >= this.cooldown) this.stateValue = 'half-open';
    return this.stateValue;
  }

  /** When an open circuit will allow a probe (ms since epoch), or undefined when not open. */
  get retryAt(): number | undefined {
    return this.stateValue === 'open' ? this.openedAt + this.cooldown : undefined;
  }

  /** How many requests may start now, given `wanted` (closed: all; half-open: one probe; open: none). */
  allowance(wanted: number): number {
    switch (this.state) {
      case 'closed':
        return wanted;
      case 'half-open':
        return this.probing ? 0 : Math.min(1, wanted);
      case 'open':
        return 0;
    }
  }

  /** Call when a request starts (marks the half-open probe as taken). */
  onStart(): void {
    if (this.state === 'half-open') this.probing = true;
  }

  /**
   * Starts half-open (one probe first) instead of closed: for a subscription whose circuit another
   * relay has open, so that a relay that starts or restarts during an outage does not spend an
   * attempt of every due delivery on a receiver already known to be down.
   */
  startWithProbe(): void {
    if (this.stateValue === 'closed' && this.failures === 0) this.stateValue = 'half-open';
  }

  /** Records an outcome; returns the new state if it changed. */
  record(success: boolean): CircuitState | undefined {
    const before = this.state;
    if (success) {
      this.failures = 0;
      this.probing = false;
      this.cooldown = this.policy.cooldownMs;
      this.stateValue = 'closed';
    } else if (before === 'half-open') {
      this.probing = false;
      this.cooldown = Math.min(this.cooldown * 2, this.policy.maxCooldownMs);
      this.open();
    } else if (before === 'closed') {
      this.failures++;
      if (this.failures >= this.policy.threshold) this.open();
    }
    return this.state !== before ? this.state : undefined;
  }

  private open(): void {
    this.stateValue = 'open';
    this.openedAt = this.now();
  }
}

/**
 * A token bucket per key (a token holder, or an address sending bad tokens): `ratePerSecond` tokens
 * refill continuously up to `burst`; each request takes one. Pure in-memory state, bounded in size:
 * a bucket that has refilled completely is the same as no bucket, so idle keys are simply forgotten.
 */
export type Take = { ok: true } | { ok: false; retryAfterSeconds: number };

interface Bucket {
  tokens: number;
  /** When `tokens` was last brought up to date (ms, monotonic). */
  at: number;
}

export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private lastSweep: number;

  constructor(
    private readonly ratePerSecond: number,
    private readonly burst: number,
    private readonly maxKeys = 100_000,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.lastSweep = now();
  }

  /** Takes one token for `key`. A rate of 0 means no limit. */
  take(key: string): Take {
    if (this.ratePerSecond <= 0) return { ok: true };
    const now = this.now();
    this.sweep(now);
    const bucket = this.buckets.get(key) ?? { tokens: this.burst, at: now };
    bucket.tokens = Math.min(this.burst, bucket.tokens + ((now - bucket.at) * this.ratePerSecond) / 1000);
    bucket.at = now;
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      this.buckets.set(key, bucket);
      return { ok: true };
    }
    this.buckets.set(key, bucket);
    return { ok: false, retryAfterSeconds: Math.max(1, Math.ceil((1 - bucket.tokens) / this.ratePerSecond)) };
  }

  /** Forgets buckets that have refilled (at most once a second, or when there are too many). */
  private sweep(now: number): void {
    if (now - this.lastSweep < 1_000 && this.buckets.size < this.maxKeys) return;
    this.lastSweep = now;
    const refillMs = (this.burst / this.ratePerSecond) * 1000;
    for (const [key, b] of this.buckets) if (now - b.at >= refillMs) this.buckets.delete(key);
    // Still too many live keys (a flood of distinct keys): forget the oldest half. Forgetting a key
    // only ever lets it start again with a full bucket.
    if (this.buckets.size >= this.maxKeys) {
      let drop = Math.floor(this.buckets.size / 2);
      for (const key of this.buckets.keys()) {
        if (drop-- <= 0) break;
        this.buckets.delete(key);
      }
    }
  }

  /** Keys currently tracked (tests). */
  get size(): number {
    return this.buckets.size;
  }
}

/**
 * `pagination.total` for pages that are not the last: counting every matching event of a large tenant
 * is a scan, too slow to repeat on every poll. A count is computed once per key (tenant, user,
 * filters), shared by concurrent requests, served for `ttlMs`, and after that served stale while one
 * background refresh runs. Bounded in size (oldest keys forgotten first).
 */
interface Entry {
  value: number | undefined;
  at: number;
  pending: Promise<number> | undefined;
}

export class TotalCache {
  private readonly entries = new Map<string, Entry>();

  constructor(
    private readonly ttlMs: number,
    private readonly onError: (err: unknown) => void,
    private readonly maxEntries = 10_000,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /**
   * The count for `key`: cached if fresh; stale (with a refresh started) if old; else computed now
   * (one computation shared by every request waiting for the same key).
   */
  async get(key: string, compute: () => Promise<number>): Promise<number> {
    const entry = this.entries.get(key);
    if (entry?.value !== undefined) {
      if (this.now() - entry.at >= this.ttlMs && !entry.pending) {
        // Stale: refresh in the background; a failed refresh keeps the old value.
        this.start(entry, compute).catch(this.onError);
      }
      return entry.value;
    }
    if (entry?.pending) return entry.pending;
    const fresh: Entry = { value: undefined, at: 0, pending: undefined };
    this.remember(key, fresh);
    try {
      return await this.start(fresh, compute);
    } catch (err) {
      this.entries.delete(key);
      throw err;
    }
  }

  private start(entry: Entry, compute: () => Promise<number>): Promise<number> {
    entry.pending = compute().then(
      (n) => {
        entry.value = n;
        entry.at = this.now();
        entry.pending = undefined;
        return n;
      },
      (err: unknown) => {
        entry.pending = undefined;
        throw err;
      },
    );
    return entry.pending;
  }

  private remember(key: string, entry: Entry): void {
    if (this.entries.size >= this.maxEntries) {
      const oldest = this.entries.keys().next();
      if (!oldest.done) this.entries.delete(oldest.value);
    }
    this.entries.set(key, entry);
  }
}

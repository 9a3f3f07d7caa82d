/**
 * Background work that runs at start and then every interval, never twice at once (a run due while
 * the previous one still goes joins it), on a timer that does not keep the process alive. Used by the
 * queue sampler and the stranded-event sweep; each supplies its run, which handles its own errors.
 */
export class PeriodicTask<T> {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<T> | undefined;

  constructor(
    private readonly run: () => Promise<T>,
    private readonly intervalMs: number,
  ) {}

  start(): void {
    void this.now();
    this.timer = setInterval(() => void this.now(), this.intervalMs);
    this.timer.unref();
  }

  /** One run now, or the one already running. */
  now(): Promise<T> {
    this.running ??= this.run().finally(() => (this.running = undefined));
    return this.running;
  }

  /** No further runs; resolves once the current one (if any) has ended. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.running;
  }
}

/**
 * What the benchmark starts, it stops: a stack of cleanups run in reverse order at the end, on
 * failure and on Ctrl-C, plus a last-resort SIGKILL of every child process still running when this
 * process exits. One AbortSignal tells every wait and loop that the run is being cancelled.
 */
import type { ChildProcess } from 'node:child_process';

const controller = new AbortController();
/** Aborted on Ctrl-C / SIGTERM: every wait and loop of the benchmark checks it. */
export const cancelled: AbortSignal = controller.signal;

export class Cancelled extends Error {
  constructor() {
    super('cancelled');
  }
}

export function cancel(): void {
  controller.abort();
}

export function throwIfCancelled(): void {
  if (cancelled.aborted) throw new Cancelled();
}

interface CleanupEntry {
  name: string;
  fn: () => unknown;
}

const stack: CleanupEntry[] = [];

/** Registers a cleanup; returns a function that runs it now (once) and removes it from the stack. */
export function onCleanup(name: string, fn: () => unknown): () => Promise<void> {
  const entry: CleanupEntry = { name, fn };
  stack.push(entry);
  let done = false;
  return async () => {
    if (done) return;
    done = true;
    const i = stack.indexOf(entry);
    if (i >= 0) stack.splice(i, 1);
    await runOne(entry);
  };
}

async function runOne(entry: CleanupEntry, timeoutMs = 30_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      Promise.resolve().then(() => entry.fn()),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
  } catch (err) {
    note(`cleanup "${entry.name}" failed: ${err instanceof Error ? err.message : String(err)}`);
  } finally {
    if (timer) clearTimeout(timer);
  }
}

/** Runs every registered cleanup, newest first. */
export async function runAllCleanups(): Promise<void> {
  while (stack.length > 0) {
    const entry = stack.pop() as CleanupEntry;
    await runOne(entry);
  }
}

const children = new Set<ChildProcess>();

/** Child processes are SIGKILLed if this process exits while they still run (crash, second Ctrl-C). */
export function trackChild(child: ChildProcess): void {
  children.add(child);
  child.once('exit', () => children.delete(child));
}

export function killAllChildrenNow(): void {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
}

process.on('exit', killAllChildrenNow);

/** Progress lines go to stderr, so stdout carries only the results. */
export function note(message: string): void {
  const t = new Date().toISOString().slice(11, 19);
  process.stderr.write(`[bench ${t}] ${message}\n`);
}

/** Sleeps, or rejects with Cancelled on Ctrl-C. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve, reject) => {
    if (cancelled.aborted) {
      reject(new Cancelled());
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(new Cancelled());
    };
    const timer = setTimeout(() => {
      cancelled.removeEventListener('abort', onAbort);
      resolve();
    }, Math.max(0, ms));
    cancelled.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Polls `cond` every `everyMs` until it holds. Fails after `timeoutMs`, when `check` throws (a child
 * died), or on Ctrl-C. Bounded in time and so in count.
 */
export async function waitUntil(
  what: string,
  cond: () => boolean | Promise<boolean>,
  options: { timeoutMs: number; everyMs?: number; check?: () => void },
): Promise<void> {
  const deadline = Date.now() + options.timeoutMs;
  for (;;) {
    throwIfCancelled();
    options.check?.();
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${Math.round(options.timeoutMs / 1000)} s waiting for ${what}`);
    await sleep(options.everyMs ?? 50);
  }
}

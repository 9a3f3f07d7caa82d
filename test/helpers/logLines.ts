/** Captured JSON log lines (pino) of an in-process daemon, for tests that read what was logged. */
import { Writable } from 'node:stream';

/** Captured JSON log lines (pino). */
export class LogLines {
  readonly lines: Array<Record<string, unknown>> = [];
  private partial = '';
  readonly stream = new Writable({
    write: (chunk: Buffer, _enc, cb) => {
      this.push(chunk.toString('utf8'));
      cb();
    },
  });

  push(text: string): void {
    const parts = (this.partial + text).split('\n');
    this.partial = parts.pop() ?? '';
    for (const line of parts) {
      if (!line.trim()) continue;
      try {
        this.lines.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        this.lines.push({ msg: line, unparsed: true });
      }
    }
  }

  has(msg: string | RegExp): boolean {
    return this.lines.some((l) => (typeof msg === 'string' ? l.msg === msg : msg.test(String(l.msg))));
  }

  /** Lines at level error (50) or above. */
  errors(): Array<Record<string, unknown>> {
    return this.lines.filter((l) => typeof l.level === 'number' && l.level >= 50);
  }
}

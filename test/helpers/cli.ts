/**
 * Runs the real executable (`node dist/cli.js`, as a user would) with a controlled environment.
 */
import { fileURLToPath } from 'node:url';
import { runProcess } from './process.js';

export const CLI = fileURLToPath(new URL('../../dist/cli.js', import.meta.url));

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Environment for a CLI run: PATH and HOME only, plus what the test gives (no stray DB_* from the shell). */
export function cleanEnv(extra: Record<string, string | undefined> = {}): Record<string, string> {
  const env: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? '/tmp', NODE_ENV: 'test', LOG_LEVEL: 'warn' };
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

export function runCli(args: string[], env: Record<string, string | undefined> = {}, options: { cwd?: string; input?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  return runProcess(process.execPath, [CLI, ...args], { env: cleanEnv(env), cwd: options.cwd, input: options.input ?? '', timeoutMs: options.timeoutMs });
}

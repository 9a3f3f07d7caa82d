#!/usr/bin/env node
/**
 * The `outbox-relay` executable. Side effects live here and only here: the process's argv, exit
 * status and (for the daemons) signal handlers.
 */
import { runCli } from './cli/program.js';

runCli(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`outbox-relay: error: ${String(err)}\n`);
    process.exitCode = 1;
  },
);

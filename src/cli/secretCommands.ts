/** `generate-secrets` and `validate-env`, as in the seed's deployment workflow. */
import { constants, openSync, renameSync, writeSync, closeSync, fsyncSync } from 'node:fs';
import type { Command } from 'commander';
import { ALL_SECRET_KEYS, ENCRYPTION_KEYS_ENV, generateSecrets, keyringWarnings, SECRET_SPECS, secretProblems } from '../config/secrets.js';
import { unknownEnvWarnings } from '../config/envTypos.js';
import { loadConfig } from '../config/load.js';
import { ConfigError, OutboxError } from '../errors.js';
import type { CommandContext } from './context.js';

function envFileText(secrets: Array<{ env: string; value: string }>): string {
  const stamp = new Date().toISOString();
  return [`# outbox-relay secrets, generated ${stamp}. Keep this file private (mode 0600).`, ...secrets.map((s) => `${s.env}=${s.value}`), ''].join('\n');
}

/** Writes `text` to `path` with mode 0600: exclusively (refusing an existing file) unless `force`. */
function writeSecretFile(path: string, text: string, force: boolean): void {
  if (!force) {
    let fd: number;
    try {
      fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') throw new OutboxError(`${path} already exists; use --force to overwrite it`, 'E_EXISTS');
      throw new OutboxError(`cannot write ${path} (${code ?? 'error'})`, 'E_WRITE');
    }
    writeSync(fd, text);
    fsyncSync(fd);
    closeSync(fd);
    return;
  }
  // Overwrite atomically: a new file with mode 0600 from the start, then rename over the old one.
  const tmp = `${path}.${process.pid}.tmp`;
  try {
    const fd = openSync(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
    writeSync(fd, text);
    fsyncSync(fd);
    closeSync(fd);
    renameSync(tmp, path);
  } catch (err) {
    throw new OutboxError(`cannot write ${path} (${(err as NodeJS.ErrnoException).code ?? 'error'})`, 'E_WRITE');
  }
}

export function registerSecretCommands(program: Command, ctx: () => CommandContext): void {
  program
    .command('generate-secrets')
    .description('print fresh secrets (JWT_SECRET, REFRESH_TOKEN_SECRET, TENANT_HASH_SALT, TENANT_ENTROPY_SOURCE, OUTBOX_ENCRYPTION_KEYS), or write them to an env file')
    .option('--write-file [path]', 'write an env file with mode 0600 (default path: .env.production)')
    .option('--force', 'overwrite an existing file')
    .option('--json', 'print the secrets as one JSON object')
    .action((opts: { writeFile?: string | boolean; force?: boolean; json?: boolean }) => {
      const c = ctx();
      const secrets = generateSecrets();
      if (opts.writeFile !== undefined) {
        const path = typeof opts.writeFile === 'string' ? opts.writeFile : '.env.production';
        writeSecretFile(path, envFileText(secrets), Boolean(opts.force));
        c.print(opts.json, { written: path, names: secrets.map((s) => s.env) }, () => `wrote ${secrets.length} secrets to ${path} (mode 0600)`);
        return;
      }
      c.print(opts.json, Object.fromEntries(secrets.map((s) => [s.env, s.value])), () => envFileText(secrets));
    });

  program
    .command('validate-env')
    .description('check the configuration and secrets; with NODE_ENV=production every secret must be present and strong. Reports every problem at once')
    .option('--json', 'print the result as JSON')
    .action((opts: { json?: boolean }) => {
      const c = ctx();
      let problems: string[] = [];
      let env = 'unknown';
      for (const w of unknownEnvWarnings(c.io.env)) c.warn(w);
      try {
        const config = loadConfig({
          configFile: c.globals.config,
          env: c.io.env,
          checks: (loaded) => {
            env = loaded.env;
            return secretProblems(loaded, loaded.env === 'production' ? ALL_SECRET_KEYS : []);
          },
        });
        for (const w of keyringWarnings(config)) c.warn(w);
        if (config.env !== 'production') {
          const missing = SECRET_SPECS.filter((s) => !config.secrets[s.key]).map((s) => s.env);
          if (!config.secrets.encryptionKeys) missing.push(ENCRYPTION_KEYS_ENV);
          if (missing.length) c.warn(`not set (required in production): ${missing.join(', ')}`);
        }
      } catch (err) {
        if (!(err instanceof ConfigError)) throw err;
        problems = [...err.problems];
      }
      if (problems.length > 0) {
        c.print(opts.json, { valid: false, env, problems }, () => `configuration is invalid:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
        throw new ConfigError(`${problems.length} configuration problem${problems.length === 1 ? '' : 's'} (listed above)`);
      }
      c.print(opts.json, { valid: true, env, problems: [] }, () => `configuration is valid (NODE_ENV=${env})`);
    });
}

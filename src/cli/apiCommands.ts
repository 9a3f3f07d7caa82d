/**
 * `api`: the optional pull API sidecar, and its helpers:
 *   outbox-relay api                                       serve on PORT (logs JSON to stdout; SIGTERM stops it)
 *   outbox-relay api token --tenant S --user U [--ttl 1h]  mint a bearer token (development, operations)
 *   outbox-relay api create-role [--name outbox_api] [--password-file F]
 *                                                          the sidecar's own database role (run per database)
 *   outbox-relay api drop-role --name R [--drop]           undo create-role in this database
 */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { authSettings, isTenantName, mintToken, parseTtl, parseUserId } from '../api/auth.js';
import { createApiRole } from '../api/createRole.js';
import { dropApiRole } from '../api/dropRole.js';
import { ApiSidecar } from '../api/sidecar.js';
import { secretProblems } from '../config/secrets.js';
import type { Config } from '../config/schema.js';
import { ConfigError, UsageError } from '../errors.js';
import { createLogger } from '../log.js';
import type { CommandContext } from './context.js';
import { requireMigrated } from './requireSchema.js';
import { runUntilSignalled } from './untilSignalled.js';

/** JWT_SECRET must be there (and strong, in production) for anything that signs or checks tokens. */
function requireJwtSecret(config: Config): void {
  const problems = secretProblems(config, ['jwtSecret']).filter((p) => p.includes('JWT_SECRET'));
  if (problems.length > 0) throw new ConfigError(problems);
}

function readPasswordFile(path: string): string {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new UsageError(`--password-file: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  const password = text.replace(/\r?\n$/, '');
  if (password === '') throw new UsageError(`--password-file: ${path} is empty`);
  if (!/^[\x20-\x7e]+$/.test(password)) throw new UsageError('--password-file: the password must be printable ASCII (one line)');
  return password;
}

export function registerApiCommands(program: Command, ctx: () => CommandContext): void {
  const api = program
    .command('api')
    .description('run the pull API sidecar on PORT: GET /api/outbox/events, PATCH /api/outbox/events/:id/acknowledge, GET /healthz (logs JSON to stdout; stop with SIGTERM)')
    .action(async () => {
      const c = ctx();
      const config = c.config;
      requireJwtSecret(config);
      const logger = createLogger({ level: config.log.level, fd: 1 }).child({ component: 'api' });
      const sidecar = new ApiSidecar({ config, logger });
      await runUntilSignalled(sidecar, logger, 'stopping: finishing requests in progress');
      logger.info('stopped');
      logger.flush();
    });

  api
    .command('token')
    .description('print a bearer token for the pull API, signed with JWT_SECRET (HS256; for development and operations: applications issue their own)')
    .requiredOption('--tenant <schema>', "the tenant's schema name (the token's tenant claim)")
    .requiredOption('--user <id>', 'the user id (an integer; the token\'s user claim)')
    .option('--ttl <duration>', 'lifetime: 90s, 15m, 1h, 7d or seconds (at most 366d)', '1h')
    .option('--json', 'print {token, tenant, user, expiresAt} as JSON')
    .action(async (opts: { tenant: string; user: string; ttl: string; json?: boolean }) => {
      const c = ctx();
      if (!isTenantName(opts.tenant)) throw new UsageError('--tenant must be a schema name of 1 to 63 characters');
      const userId = parseUserId(opts.user);
      if (userId === undefined) throw new UsageError('--user must be an integer user id');
      const ttl = parseTtl(opts.ttl);
      if (ttl === undefined) throw new UsageError('--ttl must be like 90s, 15m, 1h or 7d (1 second to 366 days)');
      requireJwtSecret(c.config);
      const { token, expiresAt } = await mintToken({ tenant: opts.tenant, userId, ttlSeconds: ttl }, authSettings(c.config));
      c.print(opts.json, { token, tenant: opts.tenant, user: userId, expiresAt: expiresAt.toISOString() }, () => token);
    });

  api
    .command('create-role')
    .description(
      "create (or update) the sidecar's own database role in this cluster, grant it what it needs in this database, and register it for row-level security; " +
        'idempotent, run it as the database owner once per database (and again after reset-db)',
    )
    .option('--name <role>', 'role name (lower case)', 'outbox_api')
    .option('--password-file <file>', 'set the role\'s password from this file (first line; stored as a SCRAM-SHA-256 verifier)')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { name: string; passwordFile?: string; json?: boolean }) => {
      const c = ctx();
      const password = opts.passwordFile === undefined ? undefined : readPasswordFile(opts.passwordFile);
      const result = await c.withClient(async (client) => {
        await requireMigrated(client);
        return createApiRole(client, { name: opts.name, password });
      });
      c.print(opts.json, result, () =>
        [
          `role ${result.role} ${result.created ? 'created' : 'already existed'}${result.passwordSet ? '; password set' : ''}`,
          `granted and registered in database ${result.database}: connect the sidecar as ${result.role} (the user of its DATABASE_URL, or DB_USER=${result.role} when DATABASE_URL is not set)`,
        ].join('\n'),
      );
      if (result.created && !result.passwordSet) c.warn(`role ${result.role} has no password; set one with --password-file unless pg_hba.conf authenticates it otherwise`);
    });

  api
    .command('drop-role')
    .description(
      'undo create-role in this database: revoke what it granted and unregister the role; with --drop, also drop the role from the cluster ' +
        '(refused while it holds rights in another database). Stop sidecars connecting as the role first',
    )
    .requiredOption('--name <role>', 'role name')
    .option('--drop', 'also DROP ROLE (cluster-wide)')
    .option('--force', 'even while sessions are connected as the role (their requests fail from then on)')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { name: string; drop?: boolean; force?: boolean; json?: boolean }) => {
      const c = ctx();
      const result = await c.withClient(async (client) => {
        await requireMigrated(client);
        return dropApiRole(client, { name: opts.name, drop: Boolean(opts.drop), force: Boolean(opts.force) });
      });
      c.print(opts.json, result, () =>
        `role ${result.role} unregistered and its rights revoked in database ${result.database}${result.dropped ? '; role dropped' : ''}`,
      );
    });
}

/** `tenants hash <id>`: a tenant's schema name, optionally checked and registered against the database. */
import type { Command } from 'commander';
import { checkTenantSchema, keyChangedError, parseTenantId, registerTenant, tenantHash, type SchemaOwnership } from '../capture/tenantHash.js';
import { ConfigError, OutboxError } from '../errors.js';
import { secretProblems } from '../config/secrets.js';
import type { CommandContext } from './context.js';
import { requireMigrated } from './requireSchema.js';

function describe(o: SchemaOwnership, schema: string): string {
  switch (o.state) {
    case 'free': return `schema "${schema}" is free`;
    case 'registered': return `schema "${schema}" is registered to this tenant`;
    case 'unregistered-schema': return `schema "${schema}" exists but is not registered to any tenant`;
    case 'collision': return `schema "${schema}" belongs to tenant ${o.tenantId}`;
    case 'key-changed': return `this tenant is registered with schema "${o.registeredSchema}", not "${schema}"`;
  }
}

export function registerTenantCommands(program: Command, ctx: () => CommandContext): void {
  const tenants = program.command('tenants').description('tenant schema names (the seed\'s getTenantHash)');
  tenants
    .command('hash')
    .description('print the 16-character schema name of a tenant id (keyed with TENANT_HASH_SALT and TENANT_ENTROPY_SOURCE)')
    .argument('<id>', 'tenant id (a positive integer)')
    .option('--check', 'also check the database: is the name free, this tenant\'s, or another tenant\'s (a collision)?')
    .option('--register', 'check, then record the name as this tenant\'s (a collision is refused)')
    .option('--json', 'print the result as JSON')
    .action(async (idArg: string, opts: { check?: boolean; register?: boolean; json?: boolean }) => {
      const id = parseTenantId(idArg);
      const c = ctx();
      const problems = secretProblems(c.config, ['tenantHashSalt', 'tenantEntropySource']).filter((p) => /TENANT_/.test(p));
      if (problems.length > 0) throw new ConfigError(problems);
      const schema = tenantHash(id, { salt: c.config.secrets.tenantHashSalt, entropySource: c.config.secrets.tenantEntropySource });
      let ownership: SchemaOwnership | undefined;
      if (opts.check || opts.register) {
        ownership = await c.withClient(async (client) => {
          await requireMigrated(client);
          return opts.register ? registerTenant(client, id, schema) : checkTenantSchema(client, id, schema);
        });
        if (ownership.state === 'collision') {
          throw new OutboxError(`tenant hash collision: ${describe(ownership, schema)}; refusing to put two tenants on one schema`, 'E_TENANT_COLLISION');
        }
        if (ownership.state === 'key-changed') throw keyChangedError(id, ownership.registeredSchema);
      }
      c.print(opts.json, { tenantId: id, schema, ...(ownership ? { ownership: ownership.state } : {}) }, () =>
        ownership ? `${schema}\n${describe(ownership, schema)}` : schema,
      );
      if (ownership?.state === 'unregistered-schema' && !opts.register) c.warn('use --register to record it as this tenant\'s');
    });
}

/** `triggers install|remove|list`: change capture on tenant tables. */
import { Command } from 'commander';
import { autoCaptureInstalled, installAllSchemas, installSchema, listCapture, NO_AUTO_CAPTURE_WARNING, removeAll, removeSchema } from '../capture/triggers.js';
import { UsageError } from '../errors.js';
import type { CommandContext } from './context.js';
import { requireMigrated } from './requireSchema.js';
import { renderTable } from './table.js';

const collect = (value: string, previous: string[]): string[] => [...previous, value];

export function registerTriggerCommands(program: Command, ctx: () => CommandContext): void {
  const triggers = program.command('triggers').description('install, remove and list change-capture triggers on tenant tables');

  triggers
    .command('install')
    .description('capture row changes of a schema\'s tables (all of them, and tables created there later, unless --table is given)')
    .option('--schema <schema>', 'tenant schema')
    .option('--table <table>', 'a table of the schema (repeatable); default: every table', collect, [])
    .option('--all-schemas', 'every tenant schema (all but system schemas and public), including schemas created later')
    .option('--exclude <schema>', 'with --all-schemas: a schema to leave out (repeatable)', collect, [])
    .option('--json', 'print the result as JSON')
    .action(async (opts: { schema?: string; table: string[]; allSchemas?: boolean; exclude: string[]; json?: boolean }) => {
      // `--schema ''` is a schema name (an invalid one, refused as such), not a missing option.
      if (opts.allSchemas && (opts.schema !== undefined || opts.table.length > 0)) throw new UsageError('use either --schema (with --table) or --all-schemas, not both');
      if (!opts.allSchemas && opts.schema === undefined) throw new UsageError('say which schema: --schema S, or --all-schemas');
      if (!opts.allSchemas && opts.exclude.length > 0) throw new UsageError('--exclude goes with --all-schemas');
      const c = ctx();
      const { report, autoCapture } = await c.withClient(async (client) => {
        await requireMigrated(client);
        const installed = opts.allSchemas ? await installAllSchemas(client, opts.exclude) : await installSchema(client, opts.schema as string, opts.table);
        return { report: installed, autoCapture: await autoCaptureInstalled(client) };
      });
      c.print(opts.json, { ...report, autoCapture }, () => {
        const partly = new Map(report.partlyDisabled.map((p) => [`${p.schema}.${p.table}`, p]));
        const lines = report.installed.map((t) => {
          const p = partly.get(`${t.schema}.${t.table}`);
          return `captured ${t.schema}.${t.table}${p ? ` (partly: ${p.disabled} of ${p.triggers} triggers disabled by ALTER TABLE ... DISABLE TRIGGER; "triggers install --schema ${p.schema} --table ${p.table}" enables them)` : ''}`;
        });
        lines.push(...report.skipped.map((t) => `skipped  ${t.schema}.${t.table}: ${t.reason}`));
        if (report.schemas.length > 0) lines.push(`schemas captured as a whole${autoCapture ? ' (new tables included)' : ''}: ${report.schemas.join(', ')}`);
        if (report.installed.length === 0 && report.skipped.length === 0) lines.push('no tables found');
        return lines.join('\n');
      });
      for (const s of report.skipped) if (s.reason === 'no primary key') c.warn(`${s.schema}.${s.table} has no primary key and is not captured`);
      for (const p of report.partlyDisabled) c.warn(`${p.schema}.${p.table} is only partly captured: ${p.disabled} of its ${p.triggers} capture triggers are disabled`);
      if (report.schemas.length > 0 && !autoCapture) c.warn(NO_AUTO_CAPTURE_WARNING);
    });

  triggers
    .command('remove')
    .description('stop capturing a schema\'s tables (or only the named ones), or everything with --all')
    .option('--schema <schema>', 'tenant schema')
    .option('--table <table>', 'a table of the schema (repeatable); default: every table', collect, [])
    .option('--all', 'remove capture from every table and turn off --all-schemas')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { schema?: string; table: string[]; all?: boolean; json?: boolean }) => {
      if (opts.all && opts.schema !== undefined) throw new UsageError('use either --schema or --all, not both');
      if (!opts.all && opts.schema === undefined) throw new UsageError('say which schema: --schema S, or --all');
      const c = ctx();
      const report = await c.withClient(async (client) => {
        await requireMigrated(client);
        return opts.all ? removeAll(client) : removeSchema(client, opts.schema as string, opts.table);
      });
      c.print(opts.json, report, () =>
        [
          ...report.removed.map((t) => `removed capture from ${t.schema}.${t.table}`),
          ...report.disabled.map((t) => `disabled capture of ${t.schema}.${t.table} (its schema is captured as a whole: the triggers stay, disabled, so that a later ALTER TABLE does not bring capture back; "triggers install --schema ${t.schema} --table ${t.table}" enables it)`),
          ...report.skipped.map((t) => `not excluded: ${t.schema}.${t.table}: ${t.reason}`),
          ...(report.schemas.length ? [`schemas no longer captured as a whole: ${report.schemas.join(', ')}`] : []),
          ...(report.removed.length === 0 && report.disabled.length === 0 && report.skipped.length === 0 && report.schemas.length === 0 ? ['nothing was captured there'] : []),
        ].join('\n'),
      );
    });

  triggers
    .command('list')
    .description('which tables of which schemas are captured, and whether new tables will be')
    .option('--json', 'print the result as JSON')
    .action(async (opts: { json?: boolean }) => {
      const c = ctx();
      const listing = await c.withClient(async (client) => {
        await requireMigrated(client);
        return listCapture(client);
      });
      c.print(opts.json, listing, () => {
        const table = listing.tables.length
          ? renderTable(
              ['SCHEMA', 'TABLE', 'CAPTURED', 'KEY', 'NOTE'],
              listing.tables.map((t) => [t.schema, t.table, t.captured ? 'yes' : 'no', t.keyColumns.join(','), t.note]),
            )
          : 'no tables are captured';
        const all = listing.allSchemas.enabled
          ? `all tenant schemas are captured${listing.allSchemas.excluded.length ? ` except ${listing.allSchemas.excluded.join(', ')}` : ''}`
          : `schemas captured as a whole: ${listing.schemas.length ? listing.schemas.join(', ') : 'none'}`;
        const auto = listing.autoCapture
          ? 'tables created later in captured schemas are captured automatically'
          : `WARNING: ${NO_AUTO_CAPTURE_WARNING}`;
        return `${table}\n\n${all}\n${auto}`;
      });
    });
}

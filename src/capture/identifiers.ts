/**
 * Validation of schema and table names given on the command line. We accept plain identifiers only
 * (letters, digits, `_`, `$`; up to 63 bytes): anything else is refused with a clear message before
 * it reaches the database, where names are in any case passed as parameters and quoted with %I.
 */
import { UsageError } from '../errors.js';

const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_$]*$/;

/** Why a name is not acceptable, or undefined when it is. */
export function identifierProblem(name: string): string | undefined {
  if (name.length === 0) return 'is empty';
  if (Buffer.byteLength(name, 'utf8') > 63) return 'is longer than 63 bytes (PostgreSQL\'s identifier limit)';
  if (!IDENTIFIER.test(name)) return 'may contain only letters, digits, "_" and "$", and must start with a letter or "_"';
  return undefined;
}

/** Throws a {@link UsageError} naming the argument when `name` is not a plain identifier. */
export function assertIdentifier(kind: 'schema' | 'table', name: string): string {
  const problem = identifierProblem(name);
  if (problem) throw new UsageError(`invalid ${kind} name ${JSON.stringify(name)}: it ${problem}`);
  return name;
}

/**
 * Environment variables that look like ours but are not (RETRY_MAX_ATEMPTS=3): a typo there is
 * otherwise silently ignored and the default applies. Only names under our own prefixes are looked
 * at, so other software's variables never draw a warning.
 */
import { schemaEntries, sensitiveEnvNames } from './schema.js';

/** Prefixes of this tool's variables; a name under one of them that we do not know is suspect. */
const PREFIXES = ['DB_', 'RETRY_', 'WEBHOOK_', 'RELAY_', 'OUTBOX_', 'API_', 'CIRCUIT_', 'RETENTION_', 'METRICS_', 'JWT_', 'TENANT_', 'LOG_'];

/** Variables read outside the schema. */
const OTHER_KNOWN = ['CONFIG_FILE', 'DATABASE_URL', 'NODE_ENV', 'PORT', 'CREDENTIALS_DIRECTORY'];

function knownNames(): Set<string> {
  const names = new Set<string>(OTHER_KNOWN);
  for (const e of schemaEntries()) if (e.leaf.env) names.add(e.leaf.env);
  for (const n of sensitiveEnvNames()) names.add(`${n}_FILE`);
  return names;
}

/** Levenshtein distance, for the suggestion. */
function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min((prev[j] as number) + 1, (cur[j - 1] as number) + 1, (prev[j - 1] as number) + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length] as number;
}

/** One line per unknown variable under our prefixes, with the closest known name when there is one. */
export function unknownEnvWarnings(env: Readonly<Record<string, string | undefined>>): string[] {
  const known = knownNames();
  const out: string[] = [];
  for (const name of Object.keys(env).sort()) {
    if (env[name] === undefined || known.has(name) || !PREFIXES.some((p) => name.startsWith(p))) continue;
    let best: string | undefined;
    let bestDistance = 4; // suggest only close names
    for (const k of known) {
      const d = distance(name, k);
      if (d < bestDistance) {
        best = k;
        bestDistance = d;
      }
    }
    out.push(`${name} is not a setting of outbox-relay and is ignored${best ? `; did you mean ${best}?` : ''}`);
  }
  return out;
}

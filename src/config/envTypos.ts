/**
 * Environment variables that look like ours but are not (RETRY_MAX_ATEMPTS=3): a typo there is
 * otherwise silently ignored and the default applies. Only names under our own prefixes are looked
 * at, so other software's variables never draw a warning.
 */
import { schemaEntries, sensitiveEnvNames } from './schema.js';

/** Prefixes only this tool uses: an unknown name under one of them is reported. */
const OWN_PREFIXES = ['RETRY_', 'WEBHOOK_', 'RELAY_', 'OUTBOX_', 'CIRCUIT_', 'RETENTION_', 'METRICS_'];
/**
 * Prefixes other software shares (an application's env file: DB_SSLMODE, JWT_EXPIRES_IN): an unknown
 * name under one of them is reported only when it is one edit from one of ours (DB_PASWORD).
 */
const SHARED_PREFIXES = ['DB_', 'API_', 'JWT_', 'TENANT_', 'LOG_'];
/** Names nobody types: Kubernetes service links (OUTBOX_RELAY_SERVICE_HOST, DB_PORT_5432_TCP_ADDR, DB_PORT=tcp://…). */
function isServiceLink(name: string, value: string): boolean {
  return /_SERVICE_(HOST|PORT)(_|$)/.test(name) || /_PORT_\d+_(TCP|UDP|SCTP)/.test(name) || (/_PORT$/.test(name) && /^(tcp|udp|sctp):\/\//.test(value));
}
/** Variables read outside the schema, and the test harness's. */
const OTHER_KNOWN = ['CONFIG_FILE', 'DATABASE_URL', 'NODE_ENV', 'PORT', 'CREDENTIALS_DIRECTORY', 'OUTBOX_RELAY_DEBUG'];
const OTHER_PREFIXES = ['OUTBOX_TEST_'];

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
    const value = env[name];
    if (value === undefined || known.has(name) || OTHER_PREFIXES.some((p) => name.startsWith(p)) || isServiceLink(name, value)) continue;
    const own = OWN_PREFIXES.some((p) => name.startsWith(p));
    if (!own && !SHARED_PREFIXES.some((p) => name.startsWith(p))) continue;
    let best: string | undefined;
    let bestDistance = own ? 4 : 2; // suggest only close names; under a shared prefix, report only one edit away
    for (const k of known) {
      const d = distance(name, k);
      if (d < bestDistance) {
        best = k;
        bestDistance = d;
      }
    }
    if (!own && !best) continue;
    out.push(`${name} is not a setting of outbox-relay and is ignored${best ? `; did you mean ${best}?` : ''}`);
  }
  return out;
}

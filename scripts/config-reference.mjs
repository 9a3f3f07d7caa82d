#!/usr/bin/env node
// Writes the configuration reference into README.md (between the config:start/config:end markers)
// from the convict schema in dist/config/schema.js, so the two cannot drift apart.
// `node scripts/config-reference.mjs --check` exits 1 when README.md is out of date (a test runs it).
import { readFileSync, writeFileSync } from 'node:fs';

const root = new URL('..', import.meta.url).pathname;
const { schemaEntries, BOUNDS } = await import(`${root}dist/config/schema.js`);

const fmt = (v) => {
  if (v === '') return '""';
  return `\`${typeof v === 'string' ? v : JSON.stringify(v)}\``;
};
const formatName = (f) => (Array.isArray(f) ? f.join(' \\| ') : f === String ? 'string' : f === Boolean ? 'boolean' : f === 'nat' ? 'integer ≥ 0' : f === 'port' ? 'port' : String(f));
// Limits checked at load beyond the format's (BOUNDS in src/config/schema.ts).
const typeName = (path, f) => {
  const b = BOUNDS[path];
  if (!b) return formatName(f);
  if (b.min !== undefined && b.max !== undefined) return `integer ${b.min}–${b.max}`;
  return b.min !== undefined ? `integer ≥ ${b.min}` : `integer 0–${b.max}`;
};

const rows = schemaEntries().map(({ path, leaf }) => {
  const env = leaf.env ? `\`${leaf.env}\`${leaf.sensitive ? ' (or `' + leaf.env + '_FILE`)' : ''}` : '';
  const def = leaf.sensitive ? '—' : fmt(leaf.default);
  return `| \`${path}\` | ${env} | ${typeName(path, leaf.format)} | ${def} | ${leaf.doc.replace(/\|/g, '\\|')} |`;
});
const table = ['| Key (config file) | Environment | Type | Default | Meaning |', '|---|---|---|---|---|', ...rows].join('\n');

const readmePath = `${root}README.md`;
const readme = readFileSync(readmePath, 'utf8');
const start = '<!-- config:start -->';
const end = '<!-- config:end -->';
const a = readme.indexOf(start);
const b = readme.indexOf(end);
if (a < 0 || b < a) {
  console.error('README.md has no config:start/config:end markers');
  process.exit(1);
}
const next = `${readme.slice(0, a + start.length)}\n${table}\n${readme.slice(b)}`;
if (process.argv.includes('--check')) {
  if (next !== readme) {
    console.error('README.md configuration reference is out of date: run `npm run docs`');
    process.exit(1);
  }
  console.log('README.md configuration reference is up to date');
} else {
  writeFileSync(readmePath, next);
  console.log(`README.md: configuration reference written (${rows.length} keys)`);
}

import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import t from 'tap';

const root = fileURLToPath(new URL('..', import.meta.url));

t.test('the README configuration reference matches the schema', async (t) => {
  const res = spawnSync(process.execPath, ['scripts/config-reference.mjs', '--check'], { cwd: root, encoding: 'utf8' });
  t.equal(res.status, 0, `${res.stdout}${res.stderr}(run \`npm run docs\`)`);
});

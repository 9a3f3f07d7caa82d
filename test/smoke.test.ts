import t from 'tap';
import { freshDatabase } from './helpers/db.js';
import { runCli } from './helpers/cli.js';

t.test('a fresh database is migrated and the CLI reaches it', async (t) => {
  const db = await freshDatabase(t);
  const { rows } = await db.query<{ n: string }>('SELECT count(*)::text AS n FROM public.outbox_relay_migrations');
  t.ok(Number(rows[0]?.n) >= 4, 'migrations recorded in the template clone');
  const res = await runCli(['migrate'], { DATABASE_URL: db.url });
  t.equal(res.code, 0, res.stderr);
  t.match(res.stdout, /up to date/);
});

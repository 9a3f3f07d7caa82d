/**
 * The enabled subscriptions a relay delivers to, with their decoded signing keys. Reloaded on a timer
 * and whenever a NOTIFY on outbox_subscriptions says something changed.
 */
import type pg from 'pg';
import type { SecretCipher } from '../subscriptions/secretCipher.js';
import { secretKey } from '../webhook/secret.js';

export interface ActiveSubscription {
  id: number;
  tenant: string;
  userId: number;
  processor: string;
  url: URL;
  ordering: 'aggregate' | 'none';
  maxInFlight: number;
  timeoutMs: number;
  /** Signing keys with their expiry (ms since epoch; Infinity for the current one). */
  keys: Array<{ key: Buffer; expiresAt: number }>;
}

/** Enabled subscriptions and their unexpired secrets. */
const SELECT_ACTIVE = `
SELECT s.id::int, s.tenant, s.user_id, s.processor, s.url, s.ordering, s.max_in_flight, s.timeout_ms,
       coalesce(json_agg(json_build_object('secret', k.secret, 'expires_at', extract(epoch FROM k.expires_at) * 1000) ORDER BY k.id DESC)
                FILTER (WHERE k.id IS NOT NULL), '[]') AS secrets
FROM public.outbox_subscriptions s
LEFT JOIN public.outbox_subscription_secrets k ON k.subscription_id = s.id AND (k.expires_at IS NULL OR k.expires_at > now())
WHERE s.enabled
GROUP BY s.id
ORDER BY s.id`;

interface Row {
  id: number;
  tenant: string;
  user_id: number;
  processor: string;
  url: string;
  ordering: 'aggregate' | 'none';
  max_in_flight: number;
  timeout_ms: number;
  secrets: Array<{ secret: string; expires_at: number | null }>;
}

export interface LoadProblem {
  subscriptionId: number;
  message: string;
}

/** Loads the active subscriptions; a subscription whose secret cannot be used is reported and left out. */
export async function loadActiveSubscriptions(db: pg.Pool | pg.ClientBase, cipher: SecretCipher): Promise<{ subscriptions: ActiveSubscription[]; problems: LoadProblem[] }> {
  const { rows } = await db.query<Row>(SELECT_ACTIVE);
  const subscriptions: ActiveSubscription[] = [];
  const problems: LoadProblem[] = [];
  for (const r of rows) {
    try {
      const keys = r.secrets.map((s) => ({ key: secretKey(cipher.decrypt(s.secret)), expiresAt: s.expires_at ?? Number.POSITIVE_INFINITY }));
      if (keys.length === 0) throw new Error('it has no current signing secret (run subscriptions rotate-secret)');
      subscriptions.push({
        id: r.id,
        tenant: r.tenant,
        userId: r.user_id,
        processor: r.processor,
        url: new URL(r.url),
        ordering: r.ordering,
        maxInFlight: r.max_in_flight,
        timeoutMs: r.timeout_ms,
        keys,
      });
    } catch (err) {
      problems.push({ subscriptionId: r.id, message: err instanceof Error ? err.message : String(err) });
    }
  }
  return { subscriptions, problems };
}

/** The keys that sign right now. */
export function signingKeys(sub: ActiveSubscription, now = Date.now()): Buffer[] {
  return sub.keys.filter((k) => k.expiresAt > now).map((k) => k.key);
}

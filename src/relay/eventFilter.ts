/**
 * Event-type filters of subscriptions: exact names and `*` wildcards ("vendors_*"), matched in SQL by
 * public.outbox_event_type_matches (sql/005). Validation here keeps them to what the matcher expects.
 */
import { UsageError } from '../errors.js';

const PATTERN = /^[A-Za-z0-9_*]{1,100}$/;

/**
 * Parses "vendors_*,projects_update" into a list; no filter (undefined) or "*" means every event. An
 * empty or blank filter is refused: it is what `--events "$UNSET_VARIABLE"` gives, and reading it as
 * "every event" would send a receiver event types it was meant not to get.
 */
export function parseEventFilter(input: string | undefined): string[] {
  if (input === undefined || input.trim() === '*') return [];
  if (input.trim() === '') throw new UsageError('the event filter is empty: leave the option out, or give "*", for every event type');
  const parts = input.split(',').map((p) => p.trim());
  for (const p of parts) {
    if (!PATTERN.test(p)) {
      throw new UsageError(`invalid event filter ${JSON.stringify(p)}: use event types like "vendors_update" or patterns like "vendors_*" (letters, digits, "_" and "*"), comma-separated`);
    }
  }
  return [...new Set(parts)];
}

/** The same match as the SQL function, for tests and for explaining a filter. */
export function eventTypeMatches(patterns: readonly string[], eventType: string): boolean {
  if (patterns.length === 0) return true;
  return patterns.some((p) => new RegExp(`^${p.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*')}$`).test(eventType));
}

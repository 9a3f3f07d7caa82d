/**
 * Retry-After (RFC 9110): delay-seconds or an HTTP-date. Returns milliseconds to wait, capped at
 * `capMs`; undefined for a missing or unparsable value. Absurd values (years) are cut to the cap,
 * dates in the past mean "now".
 */
export function parseRetryAfter(value: string | string[] | undefined, capMs: number, nowMs = Date.now()): number | undefined {
  const raw = Array.isArray(value) ? value[0] : value;
  if (raw === undefined) return undefined;
  const text = raw.trim();
  if (/^\d{1,12}$/.test(text)) return Math.min(Number(text) * 1000, capMs);
  if (!/[a-z]/i.test(text)) return undefined;
  const at = Date.parse(text);
  if (Number.isNaN(at)) return undefined;
  return Math.min(Math.max(at - nowMs, 0), capMs);
}

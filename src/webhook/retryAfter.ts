/**
 * Retry-After (RFC 9110 §10.2.3): delay-seconds or an HTTP-date. Returns milliseconds to wait, capped
 * at `capMs`; undefined for a missing or unparsable value. Absurd values (years, or more digits than
 * a number holds) are cut to the cap, dates in the past mean "now".
 *
 * HTTP-dates are recognized by their three RFC 9110 forms only (IMF-fixdate, RFC 850, asctime), read
 * as UTC. `Date.parse` alone is far too lenient for input from the network: it reads "Retry 3000" as
 * the year 3000 and "garbage 2" as 2001, so junk would pause a delivery for the whole cap.
 */
const MONTHS = ['jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec'];
const DAY = '(?:mon|tue|wed|thu|fri|sat|sun)';
const LONG_DAY = '(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)';
const MONTH = '(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)';
const TIME = '(\\d{2}):(\\d{2}):(\\d{2})';
/** Sun, 06 Nov 1994 08:49:37 GMT */
const IMF_FIXDATE = new RegExp(`^${DAY}, (\\d{2}) ${MONTH} (\\d{4}) ${TIME} GMT$`, 'i');
/** Sunday, 06-Nov-94 08:49:37 GMT */
const RFC850 = new RegExp(`^${LONG_DAY}, (\\d{2})-${MONTH}-(\\d{2}) ${TIME} GMT$`, 'i');
/** Sun Nov  6 08:49:37 1994 */
const ASCTIME = new RegExp(`^${DAY} ${MONTH} ([ \\d]\\d) ${TIME} (\\d{4})$`, 'i');

function utc(year: number, month: string, day: number, h: number, m: number, s: number): number | undefined {
  const mon = MONTHS.indexOf(month.toLowerCase());
  if (mon < 0 || day < 1 || day > 31 || h > 23 || m > 59 || s > 60) return undefined;
  return Date.UTC(year, mon, day, h, m, Math.min(s, 59));
}

/** An HTTP-date in one of RFC 9110's three forms, as ms since the epoch; undefined otherwise. */
export function parseHttpDate(text: string, nowMs = Date.now()): number | undefined {
  let m = IMF_FIXDATE.exec(text);
  if (m) return utc(Number(m[3]), m[2] as string, Number(m[1]), Number(m[4]), Number(m[5]), Number(m[6]));
  m = RFC850.exec(text);
  if (m) {
    // Two-digit years: the one that is not more than 50 years in the future (RFC 9110 §5.6.7).
    const yy = Number(m[3]);
    const thisYear = new Date(nowMs).getUTCFullYear();
    let year = Math.floor(thisYear / 100) * 100 + yy;
    if (year > thisYear + 50) year -= 100;
    return utc(year, m[2] as string, Number(m[1]), Number(m[4]), Number(m[5]), Number(m[6]));
  }
  m = ASCTIME.exec(text);
  if (m) return utc(Number(m[6]), m[1] as string, Number((m[2] as string).trim()), Number(m[3]), Number(m[4]), Number(m[5]));
  return undefined;
}

export function parseRetryAfter(value: string | string[] | undefined, capMs: number, nowMs = Date.now()): number | undefined {
  const raw = Array.isArray(value) ? value[0] : value;
  if (raw === undefined) return undefined;
  const text = raw.trim();
  // delay-seconds: any number of digits; more than a double holds is still "very long", i.e. the cap.
  if (/^\d+$/.test(text)) return Math.min(Number(text) * 1000, capMs);
  const at = parseHttpDate(text, nowMs);
  if (at === undefined || Number.isNaN(at)) return undefined;
  return Math.min(Math.max(at - nowMs, 0), capMs);
}

/**
 * Validation of the pull API's input, as the seed lists it. Pure functions: each returns a typed value
 * or throws a 400 {@link ApiError} whose message names the offending field. Values are never
 * "sanitized" into SQL: they become query parameters, and the only identifiers that reach SQL come
 * from the whitelists here (see README, "Why there is no sanitizeSQL").
 */
import { ApiError, invalidBody, invalidParameter, quoteForMessage } from './errors.js';

export const EVENT_STATUSES = ['pending', 'processed', 'failed', 'all'] as const;
export type EventStatusFilter = (typeof EVENT_STATUSES)[number];

export const ACK_STATUSES = ['processed', 'failed', 'skipped', 'in_progress'] as const;
export type AckStatus = (typeof ACK_STATUSES)[number];

/** Sortable columns. Never `payload`. */
export const ORDER_BY = ['id', 'created_at', 'event_type', 'aggregate_type', 'status'] as const;
export type OrderBy = (typeof ORDER_BY)[number];

export type OrderDir = 'ASC' | 'DESC';

/** Event types and aggregate types: letters, digits and underscores, 1 to 100 of them. */
export const NAME_PATTERN = /^[A-Za-z0-9_]{1,100}$/;

export const DEFAULT_LIMIT = 50;
export const MAX_LIMIT = 100;
/** Offsets beyond this are refused rather than sent to PostgreSQL (int4; far past any useful page). */
export const MAX_OFFSET = 2_147_483_647;

export const METADATA_MAX_DEPTH = 5;
export const METADATA_MAX_BYTES = 10 * 1024;
export const PROCESSOR_MAX_CHARS = 100;
export const DEFAULT_PROCESSOR = 'flowgram.ai';

/** The parameters of `GET /api/outbox/events`, validated and defaulted. */
export interface ListQuery {
  eventType: string | undefined;
  aggregateType: string | undefined;
  status: EventStatusFilter;
  excludeAcknowledged: boolean;
  limit: number;
  offset: number;
  orderBy: OrderBy;
  orderDir: OrderDir;
}

const LIST_PARAMS = new Set(['event_type', 'aggregate_type', 'status', 'exclude_acknowledged', 'limit', 'offset', 'order_by', 'order_dir']);

function oneOf<T extends string>(name: string, value: string, allowed: readonly T[]): T {
  if ((allowed as readonly string[]).includes(value)) return value as T;
  throw invalidParameter(`${name} must be one of ${allowed.join(', ')}`);
}

function wholeNumber(name: string, value: string, min: number, max: number): number {
  // Digits only: no sign, exponent, fraction, spaces or hex, and not so long that it loses precision.
  if (!/^[0-9]{1,10}$/.test(value)) throw invalidParameter(`${name} must be an integer from ${min} to ${max}`);
  const n = Number(value);
  if (n < min || n > max) throw invalidParameter(`${name} must be an integer from ${min} to ${max}`);
  return n;
}

/**
 * Parses the query string of `GET /api/outbox/events`. Unknown and repeated parameters are refused
 * (a typo such as `evnet_type` would otherwise silently return everything).
 */
export function parseListQuery(params: URLSearchParams): ListQuery {
  const seen = new Map<string, string>();
  for (const [name, value] of params) {
    if (!LIST_PARAMS.has(name)) throw new ApiError(400, 'unknown_parameter', `unknown query parameter ${quoteForMessage(name)}; allowed: ${[...LIST_PARAMS].join(', ')}`);
    if (seen.has(name)) throw invalidParameter(`${name} is given more than once`);
    seen.set(name, value);
  }
  const q: ListQuery = {
    eventType: undefined,
    aggregateType: undefined,
    status: 'all',
    excludeAcknowledged: false,
    limit: DEFAULT_LIMIT,
    offset: 0,
    orderBy: 'id',
    orderDir: 'ASC',
  };
  const eventType = seen.get('event_type');
  if (eventType !== undefined) {
    if (!NAME_PATTERN.test(eventType)) throw invalidParameter('event_type must be 1 to 100 letters, digits or underscores');
    q.eventType = eventType;
  }
  const aggregateType = seen.get('aggregate_type');
  if (aggregateType !== undefined) {
    if (!NAME_PATTERN.test(aggregateType)) throw invalidParameter('aggregate_type must be 1 to 100 letters, digits or underscores');
    q.aggregateType = aggregateType;
  }
  const status = seen.get('status');
  if (status !== undefined) q.status = oneOf('status', status, EVENT_STATUSES);
  const exclude = seen.get('exclude_acknowledged');
  if (exclude !== undefined) {
    if (exclude !== 'true' && exclude !== 'false') throw invalidParameter('exclude_acknowledged must be true or false');
    q.excludeAcknowledged = exclude === 'true';
  }
  const limit = seen.get('limit');
  if (limit !== undefined) q.limit = wholeNumber('limit', limit, 1, MAX_LIMIT);
  const offset = seen.get('offset');
  if (offset !== undefined) q.offset = wholeNumber('offset', offset, 0, MAX_OFFSET);
  const orderBy = seen.get('order_by');
  if (orderBy !== undefined) q.orderBy = oneOf('order_by', orderBy, ORDER_BY);
  const orderDir = seen.get('order_dir');
  if (orderDir !== undefined) q.orderDir = oneOf('order_dir', orderDir.toUpperCase(), ['ASC', 'DESC'] as const);
  return q;
}

/** Largest bigint: ids above it cannot exist. */
const MAX_BIGINT = 9_223_372_036_854_775_807n;

/** An event id from the path: a positive integer, returned as its decimal text (ids are bigint). */
export function parseEventId(segment: string): string {
  if (!/^[1-9][0-9]{0,18}$/.test(segment) || BigInt(segment) > MAX_BIGINT) {
    throw invalidParameter('event id must be a positive integer');
  }
  return segment;
}

/** The body of `PATCH /api/outbox/events/:id/acknowledge`, validated and defaulted. */
export interface AckBody {
  status: AckStatus;
  processor: string;
  /**
   * Whether the body carries metadata. Its value is taken by PostgreSQL from the raw body (so numbers
   * keep every digit); it was checked here.
   */
  hasMetadata: boolean;
}

const ACK_FIELDS = new Set(['status', 'processor', 'metadata']);

/** A UTF-16 surrogate without its partner (JSON allows "\ud800"; PostgreSQL's jsonb does not). */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** True for text PostgreSQL cannot store: NUL, and UTF-16 halves without their partner. */
function unstorable(s: string): boolean {
  return s.includes('\u0000') || LONE_SURROGATE.test(s);
}

/**
 * How deep a JSON value nests (a scalar is 0, `{}` is 1, `{"a":{}}` is 2), giving up past `limit`.
 * Iterative, so a hostile body cannot exhaust the stack. Also rejects text PostgreSQL cannot store.
 */
export function jsonDepth(value: unknown, limit: number): number {
  let deepest = 0;
  const stack: Array<{ v: unknown; d: number }> = [{ v: value, d: 0 }];
  while (stack.length > 0) {
    const { v, d } = stack.pop() as { v: unknown; d: number };
    if (typeof v === 'string') {
      if (unstorable(v)) throw invalidBody('metadata contains text that cannot be stored (NUL or an unpaired surrogate)');
      continue;
    }
    if (v === null || typeof v !== 'object') continue;
    const depth = d + 1;
    if (depth > deepest) deepest = depth;
    if (deepest > limit) return deepest;
    if (Array.isArray(v)) for (const item of v) stack.push({ v: item, d: depth });
    else {
      for (const [k, item] of Object.entries(v as Record<string, unknown>)) {
        if (unstorable(k)) throw invalidBody('metadata contains a key that cannot be stored (NUL or an unpaired surrogate)');
        stack.push({ v: item, d: depth });
      }
    }
  }
  return deepest;
}

/** Parses and checks an acknowledgment body (already read as UTF-8 text, within the body limit). */
export function parseAckBody(raw: string): AckBody {
  if (raw.trim() === '') throw invalidBody('request body must be a JSON object, like {"status":"processed"}');
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw) as unknown;
  } catch {
    throw invalidBody('request body is not valid JSON');
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw invalidBody('request body must be a JSON object, like {"status":"processed"}');
  }
  const body = parsed as Record<string, unknown>;
  for (const key of Object.keys(body)) {
    if (!ACK_FIELDS.has(key)) throw invalidBody(`unknown field ${quoteForMessage(key)}; allowed: status, processor, metadata`);
  }

  let status: AckStatus = 'processed';
  if (body.status !== undefined) {
    if (typeof body.status !== 'string' || !(ACK_STATUSES as readonly string[]).includes(body.status)) {
      throw invalidBody(`status must be one of ${ACK_STATUSES.join(', ')}`);
    }
    status = body.status as AckStatus;
  }

  let processor = DEFAULT_PROCESSOR;
  if (body.processor !== undefined) {
    if (typeof body.processor !== 'string') throw invalidBody('processor must be a string');
    const chars = [...body.processor].length;
    if (chars < 1 || chars > PROCESSOR_MAX_CHARS) throw invalidBody(`processor must be 1 to ${PROCESSOR_MAX_CHARS} characters`);
    if (unstorable(body.processor) || /[\u0000-\u001f\u007f]/.test(body.processor)) throw invalidBody('processor must not contain control characters');
    processor = body.processor;
  }

  const metadata = body.metadata;
  if (metadata !== undefined && metadata !== null) {
    if (typeof metadata !== 'object' || Array.isArray(metadata)) throw invalidBody('metadata must be a JSON object or null');
    if (jsonDepth(metadata, METADATA_MAX_DEPTH) > METADATA_MAX_DEPTH) throw invalidBody(`metadata must not nest more than ${METADATA_MAX_DEPTH} levels deep`);
    if (Buffer.byteLength(JSON.stringify(metadata), 'utf8') > METADATA_MAX_BYTES) throw invalidBody(`metadata must be at most ${METADATA_MAX_BYTES / 1024} KB`);
  }
  return { status, processor, hasMetadata: metadata !== undefined && metadata !== null };
}

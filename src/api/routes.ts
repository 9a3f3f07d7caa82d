/**
 * The pull API's endpoints, as the seed defines them:
 *   GET   /api/outbox/events                    a page of the caller's tenant's events
 *   PATCH /api/outbox/events/:id/acknowledge    the caller's acknowledgment of one event
 *   GET   /healthz                              liveness and database reachability (no token)
 */
import type { Principal } from './auth.js';
import type { CursorAdvancer } from './cursorAdvancer.js';
import { ApiError, notFound } from './errors.js';
import type { EventStore } from './eventStore.js';
import type { TotalCache } from './totalCache.js';
import { parseAckBody, parseListQuery, type ListQuery } from './validation.js';

export type Route =
  | { name: 'health'; allow: 'GET' }
  | { name: 'list'; allow: 'GET' }
  | { name: 'acknowledge'; allow: 'PATCH'; idSegment: string };

const ACK_PATH = /^\/api\/outbox\/events\/([^/]*)\/acknowledge$/;

/** The route of a path, or undefined (404). Methods are checked by the caller (405). */
export function matchRoute(pathname: string): Route | undefined {
  if (pathname === '/healthz') return { name: 'health', allow: 'GET' };
  if (pathname === '/api/outbox/events') return { name: 'list', allow: 'GET' };
  const m = ACK_PATH.exec(pathname);
  if (m) return { name: 'acknowledge', allow: 'PATCH', idSegment: m[1] ?? '' };
  return undefined;
}

export interface RouteContext {
  store: EventStore;
  totals: TotalCache;
  advancer: CursorAdvancer;
  /** 0: count on every request, in the page's snapshot. */
  totalCacheMs: number;
}

function totalKey(p: Principal, q: ListQuery): string {
  return [p.key, q.excludeAcknowledged ? 'x' : '', q.eventType ?? '', q.aggregateType ?? '', q.status].join('\u0000');
}

/** `GET /api/outbox/events`: `{events, pagination: {total, limit, offset, hasMore}}` as JSON text. */
export async function listEvents(ctx: RouteContext, p: Principal, params: URLSearchParams): Promise<string> {
  const q = parseListQuery(params);
  const exact = ctx.totalCacheMs === 0;
  const page = await ctx.store.listEvents(p, q, exact);
  if (q.excludeAcknowledged) ctx.advancer.touch(p);

  const seenUpTo = q.offset + page.events.length;
  let total: number;
  if (page.total !== undefined) total = page.total;
  else if (!page.hasMore && (page.events.length > 0 || q.offset === 0)) {
    // The last page tells the exact total for free.
    total = seenUpTo;
  } else {
    const counted = await ctx.totals.get(totalKey(p, q), () => ctx.store.countEvents(p, q));
    // A cached count may be a little old: keep it consistent with the page just read.
    total = page.hasMore ? Math.max(counted, seenUpTo + 1) : Math.min(counted, q.offset);
  }
  const pagination = JSON.stringify({ total, limit: q.limit, offset: q.offset, hasMore: page.hasMore });
  return `{"events":[${page.events.join(',')}],"pagination":${pagination}}`;
}

/**
 * `PATCH /api/outbox/events/:id/acknowledge`: the seed's success document as JSON text. `id` was
 * checked with parseEventId before the body was read.
 */
export async function acknowledgeEvent(ctx: RouteContext, p: Principal, id: string, rawBody: string): Promise<string> {
  const body = parseAckBody(rawBody);
  const ack = await ctx.store.acknowledge(p, id, body, rawBody);
  // Another tenant's event looks exactly like a missing one.
  if (ack === undefined) throw notFound(`event ${id} not found`);
  return `{"status":"success","message":"Event acknowledged successfully","acknowledgment":${ack}}`;
}

/** Thrown for a method the route does not serve. */
export function methodNotAllowed(route: Route): ApiError {
  return new ApiError(405, 'method_not_allowed', `use ${route.allow} for this path`, { allow: route.allow });
}

/**
 * The pull API's HTTP server (node:http: two endpoints need no framework). Per request, in order:
 * route (404/405), bearer token (401), rate limit per token holder (429), input checks (400/413/415),
 * then the endpoint, under a deadline (503). Every error is `{"error":{"code","message"}}`; nothing
 * internal (stack, SQL, PostgreSQL's message) reaches a client. One pino line per request, without
 * tokens or query strings.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type pg from 'pg';
import type { Config } from '../config/schema.js';
import { listenError } from '../errors.js';
import type { Logger } from '../log.js';
import { authSettings, TokenCache, type Principal } from './auth.js';
import { CursorAdvancer, type CursorAdvancerOptions } from './cursorAdvancer.js';
import { ApiError, notFound, quoteForMessage } from './errors.js';
import { defaultQueries, EventStore, type ApiQueries } from './eventStore.js';
import { hasBody, isJsonContentType, readBody, sendError, sendJson } from './http.js';
import { RateLimiter } from './rateLimiter.js';
import { acknowledgeEvent, listEvents, matchRoute, methodNotAllowed, type RouteContext } from './routes.js';
import { TotalCache } from './totalCache.js';
import { parseEventId } from './validation.js';

export interface ApiServerOptions {
  config: Config;
  /** Connected as the sidecar's own role (row-level security applies to it). */
  pool: pg.Pool;
  logger: Logger;
  /** Test doubles of the SQL. */
  queries?: ApiQueries;
  /** Cursor tuning (tests). */
  cursor?: Omit<CursorAdvancerOptions, 'store' | 'logger'>;
}

/** What a request did, for its log line. */
interface RequestState {
  path: string;
  principal: Principal | undefined;
  code: string | undefined;
}

/** SQLSTATEs of values PostgreSQL refused to store: the client's input, so a 400. */
const BAD_VALUE_SQLSTATES = new Set(['22P02', '22P05', '22003', '22021', '2202E', '22023', '22001', '54000', '54001']);
/**
 * SQLSTATEs after which the same request may succeed later: serialization and deadlock, lock and
 * connection limits, a server shutting down or starting, and a login or database refused (the
 * sidecar's role dropped or its password changed under it: the log names which).
 */
const RETRY_SQLSTATES = new Set(['40001', '40P01', '55P03', '53300', '57P01', '57P02', '57P03', '28000', '28P01', '3D000']);

/** Maps anything thrown by an endpoint to what the client may see. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  if (typeof code === 'string') {
    if (BAD_VALUE_SQLSTATES.has(code)) return new ApiError(400, 'invalid_body', 'request body holds a value that cannot be stored');
    if (code === '57014') return new ApiError(503, 'timeout', 'the database took too long; try again', { 'retry-after': '1' });
    if (RETRY_SQLSTATES.has(code) || code.startsWith('08')) return new ApiError(503, 'unavailable', 'the database is busy or unavailable; try again', { 'retry-after': '1' });
    if (!/^[0-9A-Z]{5}$/.test(code)) return new ApiError(503, 'unavailable', 'the database is unavailable; try again', { 'retry-after': '1' });
  }
  if (err instanceof Error && /timeout exceeded when trying to connect|Connection terminated|connect ECONNREFUSED/i.test(err.message)) {
    return new ApiError(503, 'unavailable', 'the database is unavailable; try again', { 'retry-after': '1' });
  }
  return new ApiError(500, 'internal', 'internal error');
}

/**
 * What /healthz says when the database probe fails: which kind of failure, not the server's message
 * (the endpoint needs no token). The sidecar's log has the detail of each request that failed.
 */
export function healthProblem(err: unknown): string {
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  if (code === '28P01' || code === '28000') return 'the database refused this service\'s login (its role or password)';
  if (code === '3D000') return 'the database does not exist';
  if (code === '57P03') return 'the database is starting up or shutting down';
  if (code === '53300') return 'the database has no free connections';
  return 'the database is unreachable';
}

export class ApiServer {
  readonly server: Server;
  readonly store: EventStore;
  readonly advancer: CursorAdvancer;
  private readonly ctx: RouteContext;
  private readonly tokens: TokenCache;
  private readonly limiter: RateLimiter;
  /** Bad tokens, per client address: a flood of forgeries is cut off like any other flood. */
  private readonly badTokenLimiter: RateLimiter;
  private readonly api: Config['api'];
  /** The last database probe of /healthz: what is wrong, or undefined when the database answered. */
  private health: { at: number; problem: Promise<string | undefined> } | undefined;
  private lastHealthProblem: string | undefined;
  private active = 0;
  private idle: (() => void) | undefined;
  private stopping: Promise<void> | undefined;

  constructor(private readonly options: ApiServerOptions) {
    const { config, pool, logger } = options;
    this.api = config.api;
    this.store = new EventStore(pool, options.queries ?? defaultQueries);
    this.advancer = new CursorAdvancer({ store: this.store, logger, ...options.cursor });
    this.ctx = {
      store: this.store,
      advancer: this.advancer,
      totals: new TotalCache(this.api.totalCacheMs, (err) => logger.warn({ err: err instanceof Error ? err.message : String(err) }, 'background count failed')),
      totalCacheMs: this.api.totalCacheMs,
    };
    this.tokens = new TokenCache(authSettings(config));
    this.limiter = new RateLimiter(this.api.rateLimitPerSecond, this.api.rateLimitBurst);
    this.badTokenLimiter = new RateLimiter(this.api.rateLimitPerSecond, this.api.rateLimitBurst);
    this.server = createServer(
      {
        // Node's own limit on receiving a request (408); ours below covers the whole exchange.
        requestTimeout: this.api.requestTimeoutMs,
        headersTimeout: Math.min(this.api.requestTimeoutMs, 30_000),
        keepAliveTimeout: 5_000,
        maxHeaderSize: 16_384,
      },
      (req, res) => this.handle(req, res),
    );
    this.server.on('clientError', (_err, socket) => {
      if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
      else socket.destroy();
    });
  }

  /** Starts listening (port 0: any free port); resolves to the bound address. */
  async listen(port = this.api.port, host = this.api.host): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      const fail = (err: unknown): void => reject(listenError(err, 'the pull API', host, port, 'PORT or API_HOST'));
      this.server.once('error', fail);
      this.server.listen(port, host, () => {
        this.server.off('error', fail);
        resolve();
      });
    });
    return this.server.address() as AddressInfo;
  }

  /**
   * Stops: no new connections, requests in progress finish (up to `deadlineMs`, then their
   * connections are cut), cursor steps in progress finish. Idempotent; the pool is the caller's.
   */
  stop(deadlineMs = this.api.requestTimeoutMs): Promise<void> {
    this.stopping ??= (async () => {
      const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
      this.server.closeIdleConnections();
      const drained = this.active === 0 ? Promise.resolve() : new Promise<void>((resolve) => (this.idle = resolve));
      let timer: NodeJS.Timeout | undefined;
      const deadline = new Promise<void>((resolve) => (timer = setTimeout(resolve, deadlineMs)));
      await Promise.race([drained, deadline]);
      clearTimeout(timer);
      this.server.closeAllConnections();
      await closed;
      await this.advancer.stop();
    })();
    return this.stopping;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const started = performance.now();
    const state: RequestState = { path: '', principal: undefined, code: undefined };
    this.active++;
    const timer = setTimeout(() => {
      if (res.headersSent) return;
      state.code = 'timeout';
      // The work goes on until its statement_timeout; the client is answered now, and told when to
      // try again (a busy sidecar or database usually clears within a second).
      sendError(res, new ApiError(503, 'timeout', 'request took too long', { 'retry-after': '1' }), { connection: 'close' });
    }, this.api.requestTimeoutMs);
    res.on('close', () => {
      clearTimeout(timer);
      this.active--;
      if (this.active === 0 && this.idle) this.idle();
      this.logRequest(req, res, state, performance.now() - started);
    });
    this.route(req, res, state).catch((err: unknown) => this.fail(req, res, state, err));
  }

  private async route(req: IncomingMessage, res: ServerResponse, state: RequestState): Promise<void> {
    let url: URL;
    try {
      url = new URL(req.url ?? '/', 'http://localhost');
    } catch {
      throw new ApiError(400, 'invalid_request', 'malformed request target');
    }
    state.path = url.pathname;
    const route = matchRoute(url.pathname);
    if (!route) throw notFound('no such endpoint');
    if (req.method !== route.allow) throw methodNotAllowed(route);
    if (route.name === 'health') return this.healthz(res);

    const principal = await this.authenticate(req);
    state.principal = principal;
    const take = this.limiter.take(principal.key);
    if (!take.ok) throw new ApiError(429, 'rate_limited', 'too many requests for this token; slow down', { 'retry-after': String(take.retryAfterSeconds) });

    if (route.name === 'list') {
      const body = await listEvents(this.ctx, principal, url.searchParams);
      if (!res.headersSent) sendJson(res, 200, body);
      return;
    }
    const id = parseEventId(route.idSegment);
    const unknown = [...url.searchParams.keys()][0];
    if (unknown !== undefined) throw new ApiError(400, 'unknown_parameter', `unknown query parameter ${quoteForMessage(unknown)}; this endpoint takes none`);
    // Every field of the body is optional: a request without a body and without a Content-Type
    // (`curl -X PATCH …`) acknowledges with the defaults. A body must be JSON and say so; a JSON
    // request with an empty body is still refused as not a JSON object.
    const noBody = req.headers['content-type'] === undefined && req.headers['transfer-encoding'] === undefined
      && (req.headers['content-length'] === undefined || req.headers['content-length'] === '0');
    if (!noBody && !isJsonContentType(req.headers['content-type'])) throw new ApiError(415, 'unsupported_media_type', 'Content-Type must be application/json');
    const raw = noBody ? '{}' : await readBody(req, this.api.bodyLimitBytes);
    const body = await acknowledgeEvent(this.ctx, principal, id, raw);
    if (!res.headersSent) sendJson(res, 200, body);
  }

  private async authenticate(req: IncomingMessage): Promise<Principal> {
    try {
      return await this.tokens.authenticate(req.headers.authorization);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        const take = this.badTokenLimiter.take(req.socket.remoteAddress ?? 'unknown');
        if (!take.ok) throw new ApiError(429, 'rate_limited', 'too many requests with invalid tokens; slow down', { 'retry-after': String(take.retryAfterSeconds) });
      }
      throw err;
    }
  }

  private async healthz(res: ServerResponse): Promise<void> {
    const now = performance.now();
    // One database round trip per second at most, however often probes come.
    if (!this.health || now - this.health.at > 1_000) {
      const ping = this.options.pool.query('SELECT 1').then(
        () => undefined,
        (err: unknown) => healthProblem(err),
      );
      const timeout = new Promise<string>((resolve) => setTimeout(() => resolve('the database did not answer within 2 s'), 2_000).unref());
      this.health = { at: now, problem: Promise.race([ping, timeout]) };
    }
    const problem = await this.health.problem;
    if (problem !== this.lastHealthProblem) {
      // Once per change, not per probe: the first failure and the recovery.
      if (problem) this.options.logger.warn({ problem }, 'health check failing');
      else this.options.logger.info('health check passing again');
      this.lastHealthProblem = problem;
    }
    if (!problem) sendJson(res, 200, '{"status":"ok"}');
    else throw new ApiError(503, 'unavailable', problem);
  }

  private fail(req: IncomingMessage, res: ServerResponse, state: RequestState, err: unknown): void {
    const apiErr = toApiError(err);
    state.code = apiErr.code;
    if (apiErr.status >= 500) {
      this.options.logger.error(
        { err: err instanceof Error ? err.message : String(err), sqlstate: (err as { code?: unknown } | null)?.code, path: state.path },
        'request failed',
      );
    }
    if (res.headersSent) {
      res.destroy();
      return;
    }
    // A body we did not read (refused early) would otherwise have to be drained from a keep-alive connection.
    const extra: Record<string, string> = hasBody(req) && !req.complete ? { connection: 'close' } : {};
    sendError(res, apiErr, extra);
  }

  private logRequest(req: IncomingMessage, res: ServerResponse, state: RequestState, ms: number): void {
    const status = res.headersSent ? res.statusCode : 0;
    const line = {
      method: req.method,
      path: state.path,
      status,
      ms: Math.round(ms * 10) / 10,
      ...(state.principal ? { tenant: state.principal.tenant, userId: state.principal.userId } : {}),
      ...(state.code ? { code: state.code } : {}),
    };
    if (status >= 500 || status === 0) this.options.logger.warn(line, 'request');
    else this.options.logger.info(line, 'request');
  }
}

/**
 * Sends one signed webhook. One undici Agent per relay keeps a keep-alive pool per origin; connect,
 * header and body timeouts plus an overall deadline bound every attempt; the response body is read
 * up to a small cap (for the error message) and the rest discarded; redirects are not followed.
 */
import { Agent, type Dispatcher } from 'undici';
import { isIP } from 'node:net';
import { BlockedAddressError, guardedLookup, isBlockedAddress } from './addressGuard.js';
import { parseRetryAfter } from './retryAfter.js';
import { signPayload } from './signPayload.js';

export interface SenderOptions {
  connectTimeoutMs: number;
  maxResponseBytes: number;
  allowPrivateTargets: boolean;
  retryAfterMaxMs: number;
  userAgent: string;
  /** Sockets per origin (the per-subscription in-flight limit bounds use further). */
  connectionsPerOrigin?: number;
}

export interface WebhookRequest {
  url: URL;
  webhookId: string;
  body: string;
  keys: readonly Buffer[];
  timeoutMs: number;
  signal?: AbortSignal;
}

export interface SendResult {
  /** True for 2xx only. */
  ok: boolean;
  /** HTTP status, when a response arrived. */
  status?: number;
  durationMs: number;
  /** Delay the receiver asked for (Retry-After, capped). */
  retryAfterMs?: number;
  /** Why the attempt failed: a stable code and a message (never containing secrets). */
  error?: { code: SendErrorCode; message: string };
}

export type SendErrorCode =
  | 'http_status'
  | 'redirect'
  | 'timeout'
  | 'connect_timeout'
  | 'connection'
  | 'dns'
  | 'blocked_address'
  | 'aborted'
  | 'internal';

function classify(err: unknown, timedOut: boolean, aborted: boolean): { code: SendErrorCode; message: string } {
  const e = err as { code?: string; message?: string; cause?: unknown; name?: string };
  const cause = e.cause as { code?: string; message?: string } | undefined;
  const message = String(e.message ?? err);
  if (err instanceof BlockedAddressError || cause instanceof BlockedAddressError) {
    return { code: 'blocked_address', message: (cause instanceof BlockedAddressError ? cause : (err as Error)).message };
  }
  if (timedOut) return { code: 'timeout', message: 'no complete response before the timeout' };
  if (aborted) return { code: 'aborted', message: 'the relay is shutting down' };
  const code = e.code ?? cause?.code;
  switch (code) {
    case 'UND_ERR_CONNECT_TIMEOUT':
      return { code: 'connect_timeout', message: 'connect timed out' };
    case 'UND_ERR_HEADERS_TIMEOUT':
    case 'UND_ERR_BODY_TIMEOUT':
      return { code: 'timeout', message: 'no complete response before the timeout' };
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return { code: 'dns', message: `name not resolved (${code})` };
    case 'ECONNREFUSED':
    case 'ECONNRESET':
    case 'EPIPE':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
    case 'UND_ERR_SOCKET':
    case 'UND_ERR_CLOSED':
      return { code: 'connection', message: `${code}: ${cause?.message ?? message}`.slice(0, 300) };
    default:
      return { code: 'connection', message: `${code ?? e.name ?? 'error'}: ${message}`.slice(0, 300) };
  }
}

/** Reads at most `cap` bytes of a response body, then drops the rest (closing the socket if needed). */
async function readCapped(body: Dispatcher.ResponseData['body'], cap: number): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    const buf = chunk as Buffer;
    if (size < cap) chunks.push(buf.subarray(0, cap - size));
    size += buf.length;
    if (size > cap) {
      body.destroy();
      break;
    }
  }
  return Buffer.concat(chunks).toString('utf8');
}

export class WebhookSender {
  private readonly agent: Agent;

  constructor(private readonly options: SenderOptions) {
    this.agent = new Agent({
      connections: options.connectionsPerOrigin ?? 256,
      pipelining: 1,
      keepAliveTimeout: 30_000,
      keepAliveMaxTimeout: 120_000,
      connect: {
        timeout: options.connectTimeoutMs,
        ...(options.allowPrivateTargets ? {} : { lookup: guardedLookup }),
      },
    });
  }

  /** One attempt. Never throws: every failure is a SendResult. */
  async send(req: WebhookRequest): Promise<SendResult> {
    const started = performance.now();
    const elapsed = () => Math.round(performance.now() - started);
    const host = req.url.hostname.replace(/^\[|\]$/g, '');
    if (!this.options.allowPrivateTargets && isIP(host) && isBlockedAddress(host)) {
      return { ok: false, durationMs: 0, error: { code: 'blocked_address', message: new BlockedAddressError(host, host).message } };
    }
    const timestamp = Math.floor(Date.now() / 1000);
    // One controller and one timer per attempt: the whole request (connect, headers, capped body)
    // must end within timeoutMs, and the relay's shutdown signal aborts it too. (AbortSignal.timeout
    // with AbortSignal.any costs several times more per request; it showed in profiles.)
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, req.timeoutMs);
    const onShutdown = (): void => controller.abort();
    req.signal?.addEventListener('abort', onShutdown, { once: true });
    const signal = controller.signal;
    try {
      const res = await this.agent.request({
        origin: req.url.origin,
        path: `${req.url.pathname}${req.url.search}`,
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          'user-agent': this.options.userAgent,
          'webhook-id': req.webhookId,
          'webhook-timestamp': String(timestamp),
          'webhook-signature': signPayload(req.webhookId, timestamp, req.body, req.keys),
        },
        body: req.body,
        headersTimeout: req.timeoutMs,
        bodyTimeout: req.timeoutMs,
        signal,
      });
      const snippet = await readCapped(res.body, this.options.maxResponseBytes);
      const status = res.statusCode;
      const durationMs = elapsed();
      if (status >= 200 && status < 300) return { ok: true, status, durationMs };
      const retryAfterMs = parseRetryAfter(res.headers['retry-after'], this.options.retryAfterMaxMs);
      const redirect = status >= 300 && status < 400;
      const detail = snippet.replace(/\s+/g, ' ').trim().slice(0, 200);
      return {
        ok: false,
        status,
        durationMs,
        ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
        error: redirect
          ? { code: 'redirect', message: `HTTP ${status}: redirects are not followed (update the subscription URL)` }
          : { code: 'http_status', message: `HTTP ${status}${detail ? `: ${detail}` : ''}` },
      };
    } catch (err) {
      return { ok: false, durationMs: elapsed(), error: classify(err, timedOut, req.signal?.aborted ?? false) };
    } finally {
      clearTimeout(timer);
      req.signal?.removeEventListener('abort', onShutdown);
    }
  }

  /** Waits for in-flight requests, then closes the sockets. */
  async close(): Promise<void> {
    await this.agent.close();
  }

  /** Aborts everything at once. */
  async destroy(): Promise<void> {
    await this.agent.destroy();
  }
}

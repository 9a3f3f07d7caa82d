/** Small node:http helpers of the pull API: bounded body reading and JSON responses. */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ApiError, errorBody } from './errors.js';

/** Does the request announce a body (that we may have to refuse unread)? */
export function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return (length !== undefined && length !== '0') || req.headers['transfer-encoding'] !== undefined;
}

/** Is the body JSON (`application/json`, optionally with a UTF-8 charset)? */
export function isJsonContentType(value: string | undefined): boolean {
  if (!value) return false;
  const [type, ...params] = value.split(';').map((s) => s.trim().toLowerCase());
  if (type !== 'application/json') return false;
  return params.every((p) => !p.startsWith('charset=') || p === 'charset=utf-8' || p === 'charset="utf-8"');
}

/**
 * Reads the whole body as UTF-8 text, refusing (413) a declared or actual size above `limit` and
 * (400) bytes that are not UTF-8. Stops reading as soon as the limit is passed.
 */
export function readBody(req: IncomingMessage, limit: number): Promise<string> {
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > limit) {
    return Promise.reject(new ApiError(413, 'payload_too_large', `request body must be at most ${limit} bytes`));
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = (err: ApiError | undefined, text?: string): void => {
      if (done) return;
      done = true;
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
      req.off('close', onClose);
      if (err) reject(err);
      else resolve(text ?? '');
    };
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > limit) {
        // Stop buffering; the response closes the connection (the rest of the body is never read).
        req.pause();
        finish(new ApiError(413, 'payload_too_large', `request body must be at most ${limit} bytes`));
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = (): void => {
      try {
        finish(undefined, new TextDecoder('utf-8', { fatal: true }).decode(Buffer.concat(chunks)));
      } catch {
        finish(new ApiError(400, 'invalid_body', 'request body is not valid UTF-8'));
      }
    };
    const onError = (): void => finish(new ApiError(400, 'invalid_request', 'request body could not be read'));
    // The client went away (or Node's request timeout cut it off) before the body was complete.
    const onClose = (): void => finish(new ApiError(400, 'invalid_request', 'request body is incomplete'));
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('close', onClose);
  });
}

const JSON_HEADERS = {
  'content-type': 'application/json; charset=utf-8',
  'cache-control': 'no-store',
  'x-content-type-options': 'nosniff',
} as const;

/** Sends a JSON text. */
export function sendJson(res: ServerResponse, status: number, body: string, headers: Readonly<Record<string, string>> = {}): void {
  res.writeHead(status, { ...JSON_HEADERS, 'content-length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

/** Sends an error as `{"error":{"code","message"}}`. */
export function sendError(res: ServerResponse, err: ApiError, extraHeaders: Readonly<Record<string, string>> = {}): void {
  sendJson(res, err.status, errorBody(err.code, err.message), { ...err.headers, ...extraHeaders });
}

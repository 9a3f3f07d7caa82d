/**
 * Errors of the pull API as the client sees them: an HTTP status and a JSON body
 * `{"error":{"code","message"}}` with a stable code. Nothing else (no stack, no SQL) reaches a client.
 */

/** Stable error codes (part of the API contract). */
export type ApiErrorCode =
  | 'invalid_request'
  | 'invalid_parameter'
  | 'unknown_parameter'
  | 'invalid_body'
  | 'unauthorized'
  | 'not_found'
  | 'method_not_allowed'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'rate_limited'
  | 'timeout'
  | 'unavailable'
  | 'internal';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: ApiErrorCode,
    message: string,
    /** Extra response headers (WWW-Authenticate, Retry-After, Allow). */
    readonly headers: Readonly<Record<string, string>> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

/** 400 naming what is wrong with a query parameter. */
export function invalidParameter(message: string): ApiError {
  return new ApiError(400, 'invalid_parameter', message);
}

/** 400 naming what is wrong with the request body. */
export function invalidBody(message: string): ApiError {
  return new ApiError(400, 'invalid_body', message);
}

/** 401 with the RFC 6750 challenge. */
export function unauthorized(message: string): ApiError {
  return new ApiError(401, 'unauthorized', message, { 'www-authenticate': 'Bearer realm="outbox", error="invalid_token"' });
}

export function notFound(message = 'not found'): ApiError {
  return new ApiError(404, 'not_found', message);
}

/** The JSON body of an error response. */
export function errorBody(code: ApiErrorCode, message: string): string {
  return JSON.stringify({ error: { code, message } });
}

/** A value quoted for an error message, cut short so that a hostile value cannot flood a response. */
export function quoteForMessage(value: string, max = 40): string {
  return JSON.stringify(value.length > max ? `${value.slice(0, max)}…` : value);
}

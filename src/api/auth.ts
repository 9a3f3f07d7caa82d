/**
 * Bearer tokens of the pull API: HS256 JWTs keyed with the UTF-8 bytes of JWT_SECRET, exactly as the
 * issuing application's `jsonwebtoken` signs them. The algorithm is pinned (no `none`, no RS/HS
 * confusion), `exp` is required, clock skew is small and configurable. The tenant and the user come
 * from the token only.
 */
import { errors as joseErrors, jwtVerify, SignJWT, type JWTPayload } from 'jose';
import type { Config } from '../config/schema.js';
import { unauthorized } from './errors.js';

/** Who a request acts as. */
export interface Principal {
  /** The tenant's schema name. */
  tenant: string;
  userId: number;
  /** One string per (tenant, user): the rate limiter's and caches' key. */
  key: string;
}

export interface AuthSettings {
  secret: Uint8Array;
  tenantClaim: string;
  userClaim: string;
  clockSkewSeconds: number;
  issuer: string | undefined;
  audience: string | undefined;
}

export function authSettings(config: Config): AuthSettings {
  return {
    secret: new TextEncoder().encode(config.secrets.jwtSecret),
    tenantClaim: config.api.jwtTenantClaim,
    userClaim: config.api.jwtUserClaim,
    clockSkewSeconds: config.api.jwtClockSkewSeconds,
    issuer: config.api.jwtIssuer || undefined,
    audience: config.api.jwtAudience || undefined,
  };
}

const ALGORITHM = 'HS256';
const INT4_MIN = -2_147_483_648;
const INT4_MAX = 2_147_483_647;

/** A tenant as tokens carry it: a schema name (1 to 63 characters, no control characters). */
export function isTenantName(value: unknown): value is string {
  return typeof value === 'string' && value.length >= 1 && value.length <= 63 && !/[\u0000-\u001f\u007f]/.test(value);
}

/** A user id as tokens carry it: an integer (int4), as a JSON number or as its decimal text. */
export function parseUserId(value: unknown): number | undefined {
  let n: number;
  if (typeof value === 'number') n = value;
  else if (typeof value === 'string' && /^-?(0|[1-9][0-9]{0,9})$/.test(value)) n = Number(value);
  else return undefined;
  return Number.isInteger(n) && n >= INT4_MIN && n <= INT4_MAX ? n : undefined;
}

export function principalKey(tenant: string, userId: number): string {
  return `${tenant}\u0000${userId}`;
}

/** The token of an `Authorization: Bearer <token>` header, or a 401. */
export function bearerToken(header: string | undefined): string {
  if (!header) throw unauthorized('missing bearer token (Authorization: Bearer <token>)');
  const m = /^Bearer +([A-Za-z0-9_\-.=+/]{1,8192})$/i.exec(header.trim());
  if (!m || !m[1]) throw unauthorized('malformed Authorization header (expected Bearer <token>)');
  return m[1];
}

/** Verifies a token and returns its principal, or throws a 401 (expired, bad signature, wrong claims). */
export async function verifyToken(token: string, s: AuthSettings): Promise<{ principal: Principal; expiresAt: number }> {
  let payload: JWTPayload;
  try {
    ({ payload } = await jwtVerify(token, s.secret, {
      algorithms: [ALGORITHM],
      requiredClaims: ['exp'],
      clockTolerance: s.clockSkewSeconds,
      ...(s.issuer ? { issuer: s.issuer } : {}),
      ...(s.audience ? { audience: s.audience } : {}),
    }));
  } catch (err) {
    if (err instanceof joseErrors.JWTExpired) throw unauthorized('token expired');
    throw unauthorized('invalid token');
  }
  const tenant = payload[s.tenantClaim];
  if (!isTenantName(tenant)) throw unauthorized(`token has no valid "${s.tenantClaim}" claim (the tenant's schema name)`);
  const userId = parseUserId(payload[s.userClaim]);
  if (userId === undefined) throw unauthorized(`token's "${s.userClaim}" claim is not an integer user id`);
  return { principal: { tenant, userId, key: principalKey(tenant, userId) }, expiresAt: (payload.exp as number) * 1000 };
}

/**
 * Verified tokens, remembered until they expire (a poller sends the same token many times a second;
 * an HMAC and a JSON parse per request would be wasted). Bounded; the oldest entries go first.
 */
export class TokenCache {
  private readonly entries = new Map<string, { principal: Principal; expiresAt: number }>();

  constructor(
    private readonly settings: AuthSettings,
    private readonly maxEntries = 10_000,
    private readonly now: () => number = Date.now,
  ) {}

  /** The principal of an Authorization header, or a 401. */
  async authenticate(header: string | undefined): Promise<Principal> {
    const token = bearerToken(header);
    const hit = this.entries.get(token);
    // Expiry is checked with the same leeway jwtVerify grants.
    if (hit && hit.expiresAt + this.settings.clockSkewSeconds * 1000 > this.now()) return hit.principal;
    if (hit) this.entries.delete(token);
    const verified = await verifyToken(token, this.settings);
    if (this.entries.size >= this.maxEntries) {
      const oldest = this.entries.keys().next();
      if (!oldest.done) this.entries.delete(oldest.value);
    }
    this.entries.set(token, verified);
    return verified.principal;
  }
}

export interface MintOptions {
  tenant: string;
  userId: number;
  ttlSeconds: number;
  /** Seconds since the epoch (tests). */
  now?: number;
}

/**
 * A token for `outbox-relay api token`: the configured tenant and user claims, `iat` and `exp`
 * (and `iss`/`aud` when configured). The user claim is a string when it is `sub` (RFC 7519 says so),
 * else a number.
 */
export async function mintToken(o: MintOptions, s: AuthSettings): Promise<{ token: string; expiresAt: Date }> {
  const iat = o.now ?? Math.floor(Date.now() / 1000);
  const exp = iat + o.ttlSeconds;
  const claims: JWTPayload = { [s.tenantClaim]: o.tenant, [s.userClaim]: s.userClaim === 'sub' ? String(o.userId) : o.userId };
  let jwt = new SignJWT(claims).setProtectedHeader({ alg: ALGORITHM, typ: 'JWT' }).setIssuedAt(iat).setExpirationTime(exp);
  if (s.issuer) jwt = jwt.setIssuer(s.issuer);
  if (s.audience) jwt = jwt.setAudience(s.audience);
  return { token: await jwt.sign(s.secret), expiresAt: new Date(exp * 1000) };
}

/** A token lifetime: `90s`, `15m`, `1h`, `7d` or plain seconds; 1 second to 366 days. */
export function parseTtl(text: string): number | undefined {
  const m = /^([0-9]{1,9})([smhd]?)$/.exec(text.trim());
  if (!m || !m[1]) return undefined;
  const unit = { '': 1, s: 1, m: 60, h: 3600, d: 86_400 }[m[2] ?? ''] ?? 1;
  const seconds = Number(m[1]) * unit;
  return seconds >= 1 && seconds <= 366 * 86_400 ? seconds : undefined;
}

/**
 * Validation of subscription URLs at creation: http(s) only (https only in production unless
 * WEBHOOK_ALLOW_HTTP), no credentials in the URL, a host, no fragment, sane length; IP-literal hosts
 * are checked against the SSRF guard here, names when they are resolved at send time.
 */
import { isIP } from 'node:net';
import { UsageError } from '../errors.js';
import { isBlockedAddress } from './addressGuard.js';

export interface UrlPolicy {
  production: boolean;
  allowHttp: boolean;
  allowPrivateTargets: boolean;
}

export function validateWebhookUrl(input: string, policy: UrlPolicy): URL {
  if (input.length > 2048) throw new UsageError('webhook URL is longer than 2048 characters');
  let url: URL;
  try {
    url = new URL(input);
  } catch {
    throw new UsageError(`invalid webhook URL ${JSON.stringify(input.slice(0, 200))}: not an absolute URL`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new UsageError(`invalid webhook URL: scheme must be https (or http), got ${url.protocol}`);
  if (url.protocol === 'http:' && policy.production && !policy.allowHttp) {
    throw new UsageError('webhook URL must use https in production (set WEBHOOK_ALLOW_HTTP=true to allow http)');
  }
  if (url.username || url.password) throw new UsageError('webhook URL must not contain credentials (user:password@); the signature authenticates the sender');
  if (!url.hostname) throw new UsageError('webhook URL has no host');
  if (url.hash) throw new UsageError('webhook URL must not contain a #fragment');
  const host = url.hostname.replace(/^\[|\]$/g, '');
  if (!policy.allowPrivateTargets) {
    if (isIP(host) && isBlockedAddress(host)) {
      throw new UsageError(`webhook URL points at ${host}, a private/loopback/link-local address; set WEBHOOK_ALLOW_PRIVATE_TARGETS=true to allow it`);
    }
    if (/^localhost$|\.localhost$|\.local$|\.internal$/i.test(host)) {
      throw new UsageError(`webhook URL host ${host} is a local name; set WEBHOOK_ALLOW_PRIVATE_TARGETS=true to allow it`);
    }
  }
  return url;
}

/**
 * Standard Webhooks signatures: HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>", base64,
 * prefixed "v1,"; one per active secret, space-separated (during a secret rotation both sign).
 */
import { createHmac } from 'node:crypto';

export function signPayload(webhookId: string, timestamp: number, body: string, keys: readonly Buffer[]): string {
  return keys
    .map((key) => `v1,${createHmac('sha256', key).update(`${webhookId}.${timestamp}.`).update(body).digest('base64')}`)
    .join(' ');
}

/** The webhook-id of an event sent to a subscription: the same on every attempt and every replay. */
export function webhookId(eventId: string | number | bigint, subscriptionId: string | number | bigint): string {
  return `msg_${eventId}_${subscriptionId}`;
}

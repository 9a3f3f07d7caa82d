/**
 * The pull API's database operations. Each is one statement that first confines itself to the
 * request's tenant and user (public.outbox_api_begin, for row-level security; see sql/007) and also
 * filters by the tenant itself: isolation holds twice, in one round trip. The query builders are
 * injectable so that a test can replace one with a double that forgets the tenant filter and watch
 * row-level security hold.
 */
import type pg from 'pg';
import { eventBody } from '../relay/eventBody.js';
import type { Principal } from './auth.js';
import { acknowledgeEventQuery, acknowledgmentJson, type AcknowledgeInput, type AcknowledgmentRow } from './sql/acknowledgeEvent.js';
import { advanceCursorQuery } from './sql/advanceCursor.js';
import { countEventsQuery } from './sql/countEvents.js';
import type { FilterInput } from './sql/eventFilters.js';
import { listEventsQuery, type EventRow } from './sql/listEvents.js';
import type { AckBody, ListQuery } from './validation.js';
import { withPoolClient } from '../db/connection.js';

/** The SQL the store runs, by operation. */
export interface ApiQueries {
  listEvents: (q: ListQuery, tenant: string, userId: number) => pg.QueryConfig;
  countEvents: (f: FilterInput, tenant: string, userId: number) => pg.QueryConfig;
  acknowledgeEvent: (i: AcknowledgeInput) => pg.QueryConfig;
}

export const defaultQueries: ApiQueries = {
  listEvents: listEventsQuery,
  countEvents: countEventsQuery,
  acknowledgeEvent: acknowledgeEventQuery,
};

/** One page: each event as JSON text (the webhook body plus `status`). */
export interface EventPage {
  events: string[];
  hasMore: boolean;
  /** With an exact count: all matching events, in the page's snapshot. */
  total?: number;
}

/** The API's event object: the webhook body (same bytes, same field order) with `status` added. */
export function eventJson(row: EventRow): string {
  const body = eventBody(row);
  return `${body.slice(0, -1)},"status":${JSON.stringify(row.status)}}`;
}

export class EventStore {
  constructor(
    private readonly pool: pg.Pool,
    private readonly queries: ApiQueries = defaultQueries,
  ) {}

  /**
   * A page of the principal's events. With `count`, also the number of all matching events, read in
   * the same snapshot (a read-only repeatable-read transaction), so that page and total agree.
   */
  async listEvents(p: Principal, q: ListQuery, count = false): Promise<EventPage> {
    const toPage = (rows: EventRow[]): EventPage => ({ events: rows.slice(0, q.limit).map(eventJson), hasMore: rows.length > q.limit });
    if (!count) {
      const { rows } = await this.pool.query<EventRow>(this.queries.listEvents(q, p.tenant, p.userId));
      return toPage(rows);
    }
    return withPoolClient(this.pool, async (client) => {
      try {
        await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
        const { rows } = await client.query<EventRow>(this.queries.listEvents(q, p.tenant, p.userId));
        const total = await this.count(client, q, p);
        await client.query('COMMIT');
        return { ...toPage(rows), total };
      } catch (err) {
        await client.query('ROLLBACK').catch(() => undefined);
        throw err;
      }
    });
  }

  /** How many of the principal's events match the filters. */
  async countEvents(p: Principal, f: FilterInput): Promise<number> {
    return this.count(this.pool, f, p);
  }

  /** Acknowledges an event as the principal; the acknowledgment as JSON text, or undefined (no such event in the tenant). */
  async acknowledge(p: Principal, eventId: string, body: AckBody, rawBody: string): Promise<string | undefined> {
    const { rows } = await this.pool.query<AcknowledgmentRow>(
      this.queries.acknowledgeEvent({
        tenant: p.tenant,
        eventId,
        userId: p.userId,
        processor: body.processor,
        status: body.status,
        // Only the metadata is read from it; without metadata, no need to send the body again.
        rawBody: body.hasMetadata ? rawBody : '{}',
      }),
    );
    return rows[0] ? acknowledgmentJson(rows[0]) : undefined;
  }

  /** One step of the principal's pull cursor; true when another step right away would move it further. */
  async advanceCursor(p: Principal, settleMs: number, chunk: number): Promise<boolean> {
    const { rows } = await this.pool.query<{ hidden_through: string | null; more: boolean }>(advanceCursorQuery(p.tenant, p.userId, settleMs, chunk));
    return Boolean(rows[0]?.more);
  }

  private async count(q: pg.Pool | pg.PoolClient, f: FilterInput, p: Principal): Promise<number> {
    const { rows } = await q.query<{ n: string }>(this.queries.countEvents(f, p.tenant, p.userId));
    return Number(rows[0]?.n ?? 0);
  }
}

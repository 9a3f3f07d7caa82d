/**
 * Drops everything outbox-relay created in a database (development only; the CLI refuses it in
 * production). Dropping the capture function with CASCADE removes the triggers on tenant tables.
 */
import type pg from 'pg';

/** Every object of ours, newest first. A test checks that nothing named outbox_* survives. */
const RESET_SQL = `
DROP EVENT TRIGGER IF EXISTS outbox_capture_new_tables;
DROP FUNCTION IF EXISTS public.outbox_capture_ddl() CASCADE;
DROP FUNCTION IF EXISTS public.outbox_capture() CASCADE;
DROP FUNCTION IF EXISTS public.outbox_install_capture(text, text, boolean) CASCADE;
DROP FUNCTION IF EXISTS public.outbox_remove_capture(text, text) CASCADE;
DROP FUNCTION IF EXISTS public.outbox_schema_is_captured(text) CASCADE;
DROP FUNCTION IF EXISTS public.outbox_changed_fields(jsonb, jsonb) CASCADE;
DROP FUNCTION IF EXISTS public.outbox_key_of(jsonb, text[]) CASCADE;
DROP TABLE IF EXISTS
  public.outbox_tenants,
  public.outbox_capture_settings,
  public.outbox_capture_schemas,
  public.outbox_relay_state,
  public.outbox_deliveries,
  public.outbox_subscription_secrets,
  public.outbox_subscriptions,
  public.event_acknowledgments,
  public.outbox_events,
  public.outbox_relay_migrations
  CASCADE;
DROP TYPE IF EXISTS public.outbox_delivery_state;
DROP TYPE IF EXISTS public.acknowledgment_status;
`;

export async function resetDatabase(client: pg.ClientBase): Promise<void> {
  await client.query('BEGIN');
  try {
    await client.query(RESET_SQL);
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

/**
 * LISTEN on a dedicated connection (never one from the pool: a pooled client would be handed to
 * queries and its LISTEN lost). Reconnects with capped, jittered backoff; a heartbeat checks that the
 * connection still listens (a half-open TCP connection otherwise goes unnoticed). After every
 * (re)connect the owner is told, so it can poll: notifications sent while we were away are lost, and
 * a NOTIFY is only ever a latency hint.
 */
import { EventEmitter } from 'node:events';
import pg from 'pg';
import type { Logger } from '../log.js';

export interface ListenerEvents {
  notification: [channel: string, payload: string];
  connected: [];
  disconnected: [error: string];
}

export interface ListenerOptions {
  connection: pg.ClientConfig;
  channels: readonly string[];
  logger: Logger;
  heartbeatMs?: number;
  maxBackoffMs?: number;
}

export class WakeupListener extends EventEmitter<ListenerEvents> {
  private client: pg.Client | undefined;
  private stopped = false;
  private attempt = 0;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private heartbeatTimer: NodeJS.Timeout | undefined;
  private upValue = false;

  constructor(private readonly options: ListenerOptions) {
    super();
  }

  /** True while connected and listening. */
  get up(): boolean {
    return this.upValue;
  }

  /** Connects (retrying in the background on failure); resolves after the first attempt. */
  async start(): Promise<void> {
    this.stopped = false;
    await this.connect();
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    const client = new pg.Client(this.options.connection);
    this.client = client;
    client.on('notification', (msg) => this.emit('notification', msg.channel, msg.payload ?? ''));
    client.on('error', (err) => this.lost(client, err.message));
    client.on('end', () => this.lost(client, 'connection ended'));
    try {
      await client.connect();
      for (const channel of this.options.channels) await client.query(`LISTEN ${client.escapeIdentifier(channel)}`);
    } catch (err) {
      this.lost(client, err instanceof Error ? err.message : String(err));
      return;
    }
    if (this.stopped || this.client !== client) return;
    this.attempt = 0;
    this.upValue = true;
    this.options.logger.info({ channels: this.options.channels }, 'listening for wakeups');
    this.emit('connected');
    this.heartbeatTimer = setInterval(() => void this.heartbeat(client), this.options.heartbeatMs ?? 15_000);
    this.heartbeatTimer.unref();
  }

  private async heartbeat(client: pg.Client): Promise<void> {
    try {
      const { rows } = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_listening_channels()');
      if ((rows[0]?.n ?? 0) < this.options.channels.length) throw new Error('not listening any more');
    } catch (err) {
      this.lost(client, `heartbeat failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  private lost(client: pg.Client, reason: string): void {
    if (this.client !== client) return; // an old connection's late event
    this.client = undefined;
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    const wasUp = this.upValue;
    this.upValue = false;
    client.removeAllListeners('notification');
    client.on('error', () => undefined);
    client.end().catch(() => undefined);
    if (this.stopped) return;
    if (wasUp) this.emit('disconnected', reason);
    const max = this.options.maxBackoffMs ?? 10_000;
    const delay = Math.min(max, 100 * 2 ** Math.min(this.attempt, 10)) * (0.5 + Math.random() / 2);
    this.attempt++;
    this.options.logger.warn({ reason, retryInMs: Math.round(delay), attempt: this.attempt }, 'LISTEN connection lost; reconnecting');
    this.reconnectTimer = setTimeout(() => void this.connect(), delay);
    this.reconnectTimer.unref();
  }

  /** Stops listening and closes the connection (idempotent). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    const client = this.client;
    this.client = undefined;
    this.upValue = false;
    if (client) {
      client.on('error', () => undefined);
      await client.end().catch(() => undefined);
    }
  }
}

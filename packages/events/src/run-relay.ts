/**
 * Runs an outbox relay for the life of a service: connects to NATS in the background (the
 * money path never waits for the bus), makes sure the stream exists, and keeps publishing.
 * The broker may be down at start or go away later; the relay waits and resumes.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import type pg from 'pg';
import { ensureEventStream, OutboxRelay, type RelayResidency, type RelayStats } from './relay.ts';
import type { EventStore } from './store.ts';

/** How long one attempt to reach the broker may take, and the wait between attempts. */
const FIRST_CONNECT_TIMEOUT_MS = 2000;
const FIRST_CONNECT_RETRY_MS = 1000;

export interface RunRelayOptions {
  pool: pg.Pool;
  store: EventStore;
  natsUrl: string;
  streamName: string;
  subjectPrefix: string;
  /** Withhold what the residency policy forbids at the broker's location (see `RelayOptions`). */
  residency?: RelayResidency;
  /** Called on every failure the relay recovers from by itself. */
  onError?: (error: unknown) => void;
  onConnected?: () => void;
}

export interface RunningRelay {
  stats(): RelayStats | null;
  stop(): Promise<void>;
}

export function runRelay(options: RunRelayOptions): RunningRelay {
  let nats: NatsConnection | null = null;
  let relay: OutboxRelay | null = null;
  let stopped = false;
  const stopping = new AbortController();
  const started = (async () => {
    // Our own loop for the first connection, so that stop() can end the wait at once; after
    // that the client reconnects by itself, without limit.
    for (;;) {
      try {
        nats = await connect({
          servers: options.natsUrl,
          name: 'ledgerline-relay',
          maxReconnectAttempts: -1,
          reconnectTimeWait: 500,
          timeout: FIRST_CONNECT_TIMEOUT_MS,
        });
        break;
      } catch (error) {
        options.onError?.(error);
        try {
          await sleep(FIRST_CONNECT_RETRY_MS, undefined, { signal: stopping.signal });
        } catch {
          return; // stopped while waiting
        }
      }
    }
    if (stopped) {
      await nats.close();
      return;
    }
    for (;;) {
      try {
        await ensureEventStream(nats, options.streamName, options.subjectPrefix);
        break;
      } catch (error) {
        options.onError?.(error);
        if (stopped) return;
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
    if (stopped) return;
    options.onConnected?.();
    relay = new OutboxRelay({
      pool: options.pool,
      store: options.store,
      nats,
      streamName: options.streamName,
      subjectPrefix: options.subjectPrefix,
      ...(options.residency === undefined ? {} : { residency: options.residency }),
      ...(options.onError === undefined ? {} : { onError: options.onError }),
    });
    relay.start();
  })().catch((error: unknown) => options.onError?.(error));
  return {
    stats: () => relay?.stats() ?? null,
    stop: async () => {
      stopped = true;
      stopping.abort();
      await relay?.stop();
      const connection: NatsConnection | null = nats;
      if (connection !== null && !connection.isClosed()) await connection.close();
      await started;
    },
  };
}

/**
 * A PROTOTYPE of a proposed API, for bench:events only (`--handler batch`); it is not part of
 * the events package. It measures what a batch handler would give:
 *
 *   new EventConsumer({ ..., handleBatch: async (events, tx) => { one set-based statement } })
 *
 * `handleBatch` would receive, in order, the events of one broker message that the inbox
 * claimed (the fresh ones), inside the same transaction as the inbox rows, instead of one
 * `handler(event, tx)` call (and typically one statement) per event. Everything else is the
 * EventConsumer's protocol: a durable pull consumer, one transaction per message with
 * `INSERT ... ON CONFLICT DO NOTHING RETURNING` on events.inbox, a double ack after the
 * commit, a nak with backoff on failure. The dead-letter path (retry one by one, then
 * dead-letter) is left out here: it would call `handleBatch` with one event at a time.
 */
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type ConsumerMessages, type JsMsg } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import type pg from 'pg';
import { decodeBatch, registerConsumer, type StoredEvent } from '../packages/events/src/index.ts';

export interface BatchConsumerOptions {
  pool: pg.Pool;
  nats: NatsConnection;
  name: string;
  streamName: string;
  filterSubject: string;
  handleBatch: (events: StoredEvent[], tx: pg.PoolClient) => Promise<void>;
  prefetchMessages: number;
  /** Partitions handled at once (1: one message at a time, as EventConsumer). */
  concurrency: number;
  afterCommit?: (events: StoredEvent[]) => void;
  onError?: (error: unknown) => void;
}

export interface BatchConsumerStats {
  messages: number;
  handled: number;
  duplicatesSkipped: number;
  redeliveries: number;
}

export class PrototypeBatchConsumer {
  readonly #o: BatchConsumerOptions;
  #messages: ConsumerMessages | null = null;
  #loop: Promise<void> | null = null;
  #stats: BatchConsumerStats = { messages: 0, handled: 0, duplicatesSkipped: 0, redeliveries: 0 };

  constructor(options: BatchConsumerOptions) {
    this.#o = options;
  }

  stats(): BatchConsumerStats {
    return { ...this.#stats };
  }

  async start(): Promise<void> {
    const o = this.#o;
    await registerConsumer(o.pool, o.name);
    const jsm = await jetstreamManager(o.nats);
    await jsm.consumers.add(o.streamName, {
      durable_name: o.name,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      filter_subject: o.filterSubject,
      ack_wait: 30_000_000_000,
      max_deliver: 6,
      max_ack_pending: o.prefetchMessages * 4,
    });
    const consumer = await jetstream(o.nats).consumers.get(o.streamName, o.name);
    const messages = await consumer.consume({ max_messages: o.prefetchMessages });
    this.#messages = messages;
    // Messages of one partition subject are handled in order, one at a time; up to
    // `concurrency` partitions are in flight at once (each stream lives in one partition).
    const chains = new Map<string, Promise<void>>();
    const inFlight = new Set<Promise<void>>();
    this.#loop = (async () => {
      for await (const msg of messages) {
        while (inFlight.size >= o.concurrency) await Promise.race(inFlight);
        const previous = chains.get(msg.subject) ?? Promise.resolve();
        const current = previous.then(() => this.#handle(msg));
        chains.set(msg.subject, current);
        inFlight.add(current);
        void current.finally(() => {
          inFlight.delete(current);
          if (chains.get(msg.subject) === current) chains.delete(msg.subject);
        });
      }
      await Promise.all(inFlight);
    })();
  }

  async #handle(msg: JsMsg): Promise<void> {
    const o = this.#o;
    this.#stats.messages += 1;
    if (msg.info.deliveryCount > 1) this.#stats.redeliveries += 1;
    let events: StoredEvent[];
    try {
      events = decodeBatch(msg.data);
    } catch (error) {
      o.onError?.(error);
      msg.term();
      return;
    }
    const client = await o.pool.connect();
    try {
      await client.query('BEGIN');
      const r = await client.query<{ event_id: string }>(
        `INSERT INTO events.inbox (consumer, event_id, position)
         SELECT $1, * FROM unnest($2::uuid[], $3::bigint[])
         ON CONFLICT DO NOTHING RETURNING event_id::text`,
        [o.name, events.map((e) => e.id), events.map((e) => e.position.toString())],
      );
      const fresh = new Set(r.rows.map((x) => x.event_id));
      const claimed = events.filter((e) => fresh.has(e.id));
      if (claimed.length > 0) await o.handleBatch(claimed, client);
      await client.query('COMMIT');
      this.#stats.handled += claimed.length;
      this.#stats.duplicatesSkipped += events.length - claimed.length;
      client.release();
    } catch (error) {
      await client.query('ROLLBACK').catch(() => {});
      client.release(true);
      o.onError?.(error);
      msg.nak(500);
      return;
    }
    o.afterCommit?.(events);
    await msg.ackAck();
  }

  async stop(): Promise<void> {
    const messages = this.#messages;
    this.#messages = null;
    if (messages !== null) await messages.close();
    await this.#loop;
  }
}

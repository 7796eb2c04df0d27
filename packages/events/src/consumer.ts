/**
 * A durable JetStream consumer whose handler runs inside a PostgreSQL transaction. The same
 * transaction records (consumer, event id) in the inbox, so a redelivered or republished
 * event is skipped: each event takes effect once, however often it arrives.
 *
 * Acknowledgement is a double ack (`ackAck`), sent only after the commit. If the process
 * dies between the two, the broker redelivers and the inbox drops the events.
 *
 * A failing batch is negatively acknowledged with a growing delay, up to `maxDeliver`
 * deliveries. On the last one each event is tried alone; those that still fail go to the
 * dead-letter stream (and `events.dead_letters`), the rest commit, and the message is acked.
 */
import { headers, type NatsConnection } from '@nats-io/transport-node';
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type ConsumerMessages, type JsMsg } from '@nats-io/jetstream';
import type pg from 'pg';
import type { StoredEvent } from './store.ts';
import { decodeBatch, MalformedBatchError } from './wire.ts';

export type EventHandler = (event: StoredEvent, tx: pg.PoolClient) => Promise<void>;
export type BatchEventHandler = (events: StoredEvent[], tx: pg.PoolClient) => Promise<void>;

export interface ConsumerOptions {
  pool: pg.Pool;
  nats: NatsConnection;
  /** Durable name: the consumer's identity in JetStream and in the inbox. */
  name: string;
  streamName: string;
  /** The events to receive, e.g. `ledgerline.events.>`. */
  filterSubject: string;
  /** Runs for each new event, in order, inside the batch's transaction. */
  handler?: EventHandler;
  /**
   * Instead of `handler`: receives every new event of one broker message at once, in order,
   * inside the inbox transaction, for set-based effects (one statement for many events). On
   * the dead-letter path it is called with one event at a time.
   */
  handleBatch?: BatchEventHandler;
  /** Deliveries of a message before its failing events are dead-lettered. */
  maxDeliver?: number;
  /** Delay before the n-th redelivery (the last entry repeats). */
  backoffMs?: readonly number[];
  /** How long the broker waits for an ack before redelivering. */
  ackWaitMs?: number;
  /** Messages pulled ahead of processing. */
  prefetchMessages?: number;
  /** Dead letters go to `<dlqSubjectPrefix>.<name>`; the stream must exist (ensureDeadLetterStream). */
  dlqSubjectPrefix?: string;
  /** Fault-injection hook for tests: runs after the commit, before the ack. */
  afterCommit?: (events: StoredEvent[]) => void | Promise<void>;
  onError?: (error: unknown) => void;
}

export interface ConsumerStats {
  messages: number;
  handled: number;
  duplicatesSkipped: number;
  redeliveries: number;
  deadLettered: number;
}

export async function ensureDeadLetterStream(nats: NatsConnection, streamName: string, subjectPrefix: string): Promise<void> {
  const jsm = await jetstreamManager(nats);
  try {
    await jsm.streams.info(streamName);
  } catch (error) {
    if (!/stream not found/i.test(String(error))) throw error;
    await jsm.streams.add({ name: streamName, subjects: [`${subjectPrefix}.>`], duplicate_window: 120_000_000_000 });
  }
}

export async function registerConsumer(db: Pick<pg.ClientBase, 'query'>, name: string): Promise<void> {
  await db.query('INSERT INTO events.consumers (name) VALUES ($1) ON CONFLICT DO NOTHING', [name]);
}

export class EventConsumer {
  readonly #o: Required<Omit<ConsumerOptions, 'afterCommit' | 'onError' | 'handler' | 'handleBatch'>> &
    Pick<ConsumerOptions, 'afterCommit' | 'onError'>;
  readonly #handleBatch: BatchEventHandler;
  #messages: ConsumerMessages | null = null;
  #loop: Promise<void> | null = null;
  #stats: ConsumerStats = { messages: 0, handled: 0, duplicatesSkipped: 0, redeliveries: 0, deadLettered: 0 };

  constructor(options: ConsumerOptions) {
    this.#o = {
      maxDeliver: 5,
      backoffMs: [100, 500, 2000, 5000],
      ackWaitMs: 30_000,
      prefetchMessages: 16,
      dlqSubjectPrefix: 'ledgerline.dlq',
      ...options,
    };
    if (!/^[a-z][a-z0-9_-]{0,62}$/.test(this.#o.name)) throw new RangeError(`consumer name ${this.#o.name} is not a valid durable name`);
    const { handler, handleBatch } = options;
    if ((handler === undefined) === (handleBatch === undefined)) {
      throw new TypeError('EventConsumer needs exactly one of handler and handleBatch');
    }
    this.#handleBatch =
      handleBatch ??
      (async (events, tx) => {
        for (const e of events) await (handler as EventHandler)(e, tx);
      });
  }

  stats(): ConsumerStats {
    return { ...this.#stats };
  }

  async start(): Promise<void> {
    await registerConsumer(this.#o.pool, this.#o.name);
    const jsm = await jetstreamManager(this.#o.nats);
    const config = {
      durable_name: this.#o.name,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      filter_subject: this.#o.filterSubject,
      ack_wait: this.#o.ackWaitMs * 1_000_000,
      // We count deliveries ourselves and dead-letter on the last one; the broker's own limit
      // is one higher so that it never drops a message we have not dealt with.
      max_deliver: this.#o.maxDeliver + 1,
      max_ack_pending: this.#o.prefetchMessages * 4,
    };
    try {
      await jsm.consumers.info(this.#o.streamName, this.#o.name);
      await jsm.consumers.update(this.#o.streamName, this.#o.name, config);
    } catch (error) {
      if (!/consumer not found/i.test(String(error))) throw error;
      await jsm.consumers.add(this.#o.streamName, config);
    }
    const consumer = await jetstream(this.#o.nats).consumers.get(this.#o.streamName, this.#o.name);
    this.#messages = await consumer.consume({ max_messages: this.#o.prefetchMessages });
    const messages = this.#messages;
    this.#loop = (async () => {
      for await (const msg of messages) {
        try {
          await this.#handle(msg);
        } catch (error) {
          // The database or the broker failed mid-message: nothing was acked, so the broker
          // redelivers after ack_wait, or sooner if the nak below gets through.
          this.#o.onError?.(error);
          try {
            msg.nak(this.#delayFor(msg.info.deliveryCount));
          } catch {
            // the connection is gone; redelivery will happen after ack_wait
          }
        }
      }
    })();
  }

  /** Stops pulling and waits for the message in hand to finish. */
  async stop(): Promise<void> {
    const messages = this.#messages;
    this.#messages = null;
    if (messages !== null) await messages.close();
    await this.#loop;
  }

  #delayFor(deliveryCount: number): number {
    const table = this.#o.backoffMs;
    return table[Math.min(deliveryCount - 1, table.length - 1)] ?? 1000;
  }

  async #handle(msg: JsMsg): Promise<void> {
    this.#stats.messages += 1;
    if (msg.info.deliveryCount > 1) this.#stats.redeliveries += 1;
    let events: StoredEvent[];
    try {
      events = decodeBatch(msg.data);
    } catch (error) {
      if (!(error instanceof MalformedBatchError)) throw error;
      // Not ours to retry: it will never parse. Keep it in the broker's logs and move on.
      this.#o.onError?.(error);
      msg.term(error.message);
      return;
    }
    try {
      await this.#apply(events);
    } catch (error) {
      if (msg.info.deliveryCount < this.#o.maxDeliver) {
        this.#o.onError?.(error);
        msg.nak(this.#delayFor(msg.info.deliveryCount));
        return;
      }
      await this.#applyOneByOne(events, msg.info.deliveryCount);
    }
    await this.#o.afterCommit?.(events);
    await msg.ackAck();
  }

  /** One transaction for the whole batch: inbox rows and the handler's effects. */
  async #apply(events: StoredEvent[]): Promise<void> {
    const client = await this.#o.pool.connect();
    let failed = false;
    try {
      await client.query('BEGIN');
      const fresh = await this.#claim(client, events);
      const claimed = events.filter((e) => fresh.has(e.id));
      if (claimed.length > 0) await this.#handleBatch(claimed, client);
      await client.query('COMMIT');
      this.#stats.handled += fresh.size;
      this.#stats.duplicatesSkipped += events.length - fresh.size;
    } catch (error) {
      failed = true;
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      client.release(failed ? true : undefined);
    }
  }

  async #claim(client: pg.PoolClient, events: StoredEvent[]): Promise<Set<string>> {
    const r = await client.query<{ event_id: string }>(
      `INSERT INTO events.inbox (consumer, event_id, position)
       SELECT $1, * FROM unnest($2::uuid[], $3::bigint[])
       ON CONFLICT DO NOTHING RETURNING event_id::text`,
      [this.#o.name, events.map((e) => e.id), events.map((e) => e.position.toString())],
    );
    return new Set(r.rows.map((x) => x.event_id));
  }

  async #applyOneByOne(events: StoredEvent[], attempts: number): Promise<void> {
    for (const e of events) {
      try {
        await this.#apply([e]);
      } catch (error) {
        await this.#deadLetter(e, attempts, error);
      }
    }
  }

  async #deadLetter(event: StoredEvent, attempts: number, error: unknown): Promise<void> {
    const reason = error instanceof Error ? error.message : String(error);
    await this.#o.pool.query(
      `INSERT INTO events.dead_letters (consumer, event_id, position, attempts, error) VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (consumer, event_id) DO UPDATE SET attempts = EXCLUDED.attempts, error = EXCLUDED.error, dead_at = now(), replayed_at = NULL`,
      [this.#o.name, event.id, event.position.toString(), attempts, reason.slice(0, 2000)],
    );
    const h = headers();
    h.set('Ledgerline-Error', reason.slice(0, 500).replace(/[\r\n]/g, ' '));
    await jetstream(this.#o.nats).publish(`${this.#o.dlqSubjectPrefix}.${this.#o.name}`, JSON.stringify(eventToJson(event)), {
      msgID: `${this.#o.name}:${event.id}:${attempts}`,
      headers: h,
    });
    this.#stats.deadLettered += 1;
  }
}

function eventToJson(e: StoredEvent): Record<string, unknown> {
  return { ...e, position: e.position.toString(), transactionId: e.transactionId.toString(), recordedAt: e.recordedAt.toISOString() };
}

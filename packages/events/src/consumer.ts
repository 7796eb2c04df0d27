/**
 * A durable JetStream consumer whose handler runs inside a PostgreSQL transaction. The same
 * transaction records (consumer, event id) in the inbox, so a redelivered or republished
 * event is skipped: each event takes effect once, however often it arrives.
 *
 * Acknowledgement is a double ack (`ackAck`), sent only after the commit. If the process
 * dies between the two, the broker redelivers and the inbox drops the events.
 *
 * Order. Messages are handled in lanes, one per subject, and the relay publishes each
 * partition on one subject (a stream lives in one partition). A lane handles its messages one
 * at a time, in the order the broker delivered them; up to `partitionConcurrency` lanes work
 * at once, so commit and ack round trips of different partitions overlap.
 *
 * Retries. A failing message is retried in place, with a growing delay, while its lane holds
 * back every later message of that subject: a retry never lets a later event of the same
 * partition (hence of the same stream) take effect first. The broker is not asked to
 * redeliver (a nak'ed message can come back after later ones); the message is kept alive with
 * `working()` instead. After `maxDeliver` attempts in this delivery each event is tried alone;
 * those that still fail go to the dead-letter stream (and `events.dead_letters`), the rest
 * commit, and the message is acked. Attempts count from 1 at each delivery, not from the
 * broker's delivery count: that count also grows for every message stop() gave back untried,
 * so carrying on from it let a few restarts dead-letter events tried fewer times than
 * `maxDeliver` (or not at all). A message delivered more than `maxDeliver` times (each
 * delivery ended with no verdict: a crash in the handler, a stop, say) has its events tried
 * one at a time, each recorded as a dead letter before it runs and un-recorded by its commit:
 * an event whose handler kills the process is found recorded at the next delivery and stays
 * dead, and the events after it are tried, each up to `maxDeliver` times. If even the dead
 * letter cannot be recorded (the database is down), the lane keeps the message and tries
 * again: it is never acked without its events being handled or dead-lettered. A failure that
 * says nothing about the events (`eventsNotAtFault`: a lost connection, the server going away,
 * a deadlock, a lock timeout) is retried the same way but does not count as an attempt, and an
 * event tried alone that meets one is not dead-lettered: the pass is retried. Only the
 * handler's own failures make an event dead (a connection error the handler meets on a
 * service of its own counts as transient too: the lane waits for it).
 *
 * What order does not survive: a crash (the messages in hand come back after `ackWaitMs`,
 * possibly after later ones a new instance has handled), and two instances of one durable
 * (they share its messages). stop() gives unhandled messages back in order, so a clean
 * restart keeps it.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { headers, type NatsConnection } from '@nats-io/transport-node';
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type ConsumerMessages, type JsMsg } from '@nats-io/jetstream';
import type pg from 'pg';
import type { StoredEvent } from './store.ts';
import { commit, databaseCannotNow, databaseSessionEnded, transientDatabaseError } from './transaction.ts';
import { storablePrefix } from './sql.ts';
import { decodeBatch } from './wire.ts';

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
  /**
   * Tries of a message in one delivery (the first and its retries in place) before its
   * failing events are tried alone and, failing again, dead-lettered. Past this many
   * deliveries without a verdict (crashes, stops) the events are tried one at a time, each
   * up to this many times. Failures that say nothing about the events (`eventsNotAtFault`)
   * do not count.
   */
  maxDeliver?: number;
  /** Delay before the n-th retry (the last entry repeats). */
  backoffMs?: readonly number[];
  /** How long the broker waits for an ack before redelivering. */
  ackWaitMs?: number;
  /** Messages pulled ahead of processing. */
  prefetchMessages?: number;
  /**
   * Lanes (subjects, i.e. partitions) handled at once, each holding one pool connection while
   * it works. 1 handles one message at a time across all partitions.
   */
  partitionConcurrency?: number;
  /**
   * Messages the broker lets this consumer hold unacknowledged: the bound on what waits in the
   * lanes (a lane held back by a retry keeps its messages). Default 4 × `prefetchMessages`.
   */
  maxAckPending?: number;
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
  /** Messages the broker delivered more than once (an ack that never arrived, a restart). */
  redeliveries: number;
  /** Attempts repeated in place after a failure, holding the message's lane. */
  retries: number;
  deadLettered: number;
  /** Messages that did not decode as a batch: recorded (events.undecodable_messages, the dead-letter stream) and acknowledged. */
  undecodable: number;
}

/** How a dead letter recorded before a try begins (#afterRepeatedDeliveries): the try has not finished. */
const LAST_TRY = 'recorded before a last try, alone';

/** How much of an undecodable message events.undecodable_messages keeps (the dead-letter stream keeps it all, or what fits). */
const UNDECODABLE_HEAD_BYTES = 4096;

/**
 * Most characters of an error's text stored in events.dead_letters and events.undecodable_messages,
 * as storablePrefix makes it: NUL (a handler's message may quote the bytes it choked on) and lone
 * surrogates, which PostgreSQL text refuses, become U+FFFD. Refused, the dead letter could never
 * be recorded, and the lane retried it for ever.
 */
const ERROR_CHARS_MAX = 2000;
/** Most bytes of an error's text in a dead letter's `Ledgerline-Error` header. */
const ERROR_HEADER_BYTES_MAX = 256;

const utf8 = new TextEncoder();

/** The longest prefix of well-formed `text` whose UTF-8 takes at most `maxBytes`; never a cut character. */
function utf8Prefix(text: string, maxBytes: number): string {
  return text.slice(0, utf8.encodeInto(text, new Uint8Array(maxBytes)).read);
}

/**
 * Whether a failure says nothing about the events that met it, so that it must not count
 * against them (they are not dead-lettered for it; their lane waits and tries again):
 *
 * - `transientDatabaseError`: the connection or the server failed (SQLSTATE class 08, class
 *   57P: an administrator, a crash or a shutdown ending the session, 53300 too many
 *   connections, a socket refused or reset, a client-side connect or query timeout), or the
 *   transaction lost a serialization race or a deadlock (40001, 40P01);
 * - 55P03 lock_not_available: a `lock_timeout` (or `NOWAIT`) gave up waiting for a lock that
 *   another session holds;
 * - the rest of class 53, insufficient resources: the server's disk, memory or limits, not the
 *   event (as the ledger engine classifies them);
 * - any error PostgreSQL raised at FATAL or PANIC severity: the session is over (a database
 *   that refuses connections, 55000; a role or password refused at connect, 28xxx; an
 *   idle-in-transaction timeout, 25P03), as `databaseUnreachable` in service-runtime reads it.
 *
 * Deliberately not: 57014 query_canceled. A `statement_timeout` is as often the event's own
 * cost (a handler's query that is slow for this event's data) as the server's load, and
 * treating it as transient would hold that event's partition for ever; it counts as an
 * attempt. A handler that waits for locks should bound the wait with `lock_timeout`.
 */
export function eventsNotAtFault(error: unknown): boolean {
  return transientDatabaseError(error) || databaseCannotNow(error) || databaseSessionEnded(error);
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

/**
 * Records `events` in `consumer`'s inbox inside the caller's transaction (EventConsumer's claim)
 * and returns the ids it took: those with no inbox row yet and not at or before the consumer's
 * inbox horizon (`pruneInbox`: handled, their rows pruned), except the ones the prune listed open (dead-lettered, or withheld by the relay), whose open rows go
 * with the claim. One statement, so one snapshot for the horizon and the rows: a prune
 * removes the rows its horizon covers only once every snapshot older than the horizon is
 * gone, so this statement sees either the rows or the horizon that replaced them, in any
 * isolation level.
 */
export async function claimEvents(db: Pick<pg.ClientBase, 'query'>, consumer: string, events: readonly StoredEvent[]): Promise<Set<string>> {
  // Ids and positions travel as comma-separated text: node-pg would quote and escape every
  // element of an array parameter, which cost several times the join here.
  const r = await db.query<{ event_id: string }>(
    `WITH h AS (SELECT transaction_id, position FROM events.inbox_horizons WHERE consumer = $1),
          u AS (SELECT * FROM unnest(string_to_array($2, ',')::uuid[], string_to_array($3, ',')::bigint[], string_to_array($4, ',')::xid8[])
                  AS u(event_id, position, transaction_id)),
          reopened AS (DELETE FROM events.inbox_open o USING u, h
                        WHERE o.consumer = $1 AND o.event_id = u.event_id AND (u.transaction_id, u.position) <= (h.transaction_id, h.position)
                        RETURNING o.event_id)
     INSERT INTO events.inbox (consumer, event_id, position)
     SELECT $1, u.event_id, u.position FROM u
      WHERE NOT EXISTS (SELECT 1 FROM h WHERE (u.transaction_id, u.position) <= (h.transaction_id, h.position))
         OR u.event_id IN (SELECT event_id FROM reopened)
     ON CONFLICT DO NOTHING RETURNING event_id::text`,
    [
      consumer,
      events.map((e) => e.id).join(','),
      events.map((e) => e.position.toString()).join(','),
      events.map((e) => e.transactionId.toString()).join(','),
    ],
  );
  return new Set(r.rows.map((x) => x.event_id));
}

/**
 * Registers a consumer, and records that an instance of this release (whose claim reads the
 * inbox horizon) has: `pruneInbox` refuses a consumer without that record.
 */
export async function registerConsumer(db: Pick<pg.ClientBase, 'query'>, name: string): Promise<void> {
  await db.query(
    `INSERT INTO events.consumers (name, horizon_claims_since) VALUES ($1, now())
     ON CONFLICT (name) DO UPDATE SET horizon_claims_since = coalesce(events.consumers.horizon_claims_since, EXCLUDED.horizon_claims_since)
     WHERE events.consumers.horizon_claims_since IS NULL`,
    [name],
  );
}

/**
 * How long a pull request waits at the broker. Short, because stop() waits for its own pull
 * requests to expire before it gives messages back (see there); an idle consumer re-pulls this
 * often, which costs nothing that matters.
 */
const PULL_EXPIRES_MS = 2000;
/** The broker starts a pull's expiry when the request arrives, a little after it was sent. */
const PULL_EXPIRY_MARGIN_MS = 250;

/** The messages of one subject, handled one at a time in delivery order. */
interface Lane {
  queue: JsMsg[];
  /** The message in hand, until it is acked or given back. */
  current: JsMsg | null;
}

/** Counts the lanes inside a transaction, so that at most `limit` hold a connection. */
class Slots {
  readonly #limit: number;
  #used = 0;
  readonly #waiting: Array<() => void> = [];
  /** Runs alone, one after another (runAlone). */
  #alone: Promise<unknown> = Promise.resolve();

  constructor(limit: number) {
    this.#limit = limit;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    await this.#acquire();
    try {
      return await fn();
    } finally {
      this.#release();
    }
  }

  /**
   * Runs `fn` holding every slot, so that no other lane handles an event meanwhile. Such runs
   * queue among themselves first, so two never hold part of the slots each.
   */
  runAlone<T>(fn: () => Promise<T>): Promise<T> {
    const turn = this.#alone.then(async () => {
      for (let i = 0; i < this.#limit; i += 1) await this.#acquire();
      try {
        return await fn();
      } finally {
        for (let i = 0; i < this.#limit; i += 1) this.#release();
      }
    });
    // The chain only orders the runs: each caller gets its own run's outcome from `turn`, and a
    // failed run must not stop the ones queued after it.
    this.#alone = turn.catch(() => {});
    return turn;
  }

  #acquire(): Promise<void> {
    if (this.#used < this.#limit) {
      this.#used += 1;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => this.#waiting.push(resolve));
  }

  /** Hands the slot straight to the next waiter, or frees it. */
  #release(): void {
    const next = this.#waiting.shift();
    if (next === undefined) this.#used -= 1;
    else next();
  }
}

export class EventConsumer {
  readonly #o: Required<Omit<ConsumerOptions, 'afterCommit' | 'onError' | 'handler' | 'handleBatch' | 'maxAckPending'>> &
    Pick<ConsumerOptions, 'afterCommit' | 'onError'> & { maxAckPending: number };
  readonly #handleBatch: BatchEventHandler;
  readonly #slots: Slots;
  readonly #lanes = new Map<string, Lane>();
  readonly #running = new Set<Promise<void>>();
  /** Messages not handled because of stop(), in each lane's order; nak'ed once the pull is closed. */
  readonly #handBack: JsMsg[] = [];
  /** Aborted by stop(): ends retry waits, so that a held lane gives its messages back at once. */
  #stopping = new AbortController();
  #messages: ConsumerMessages | null = null;
  #loop: Promise<void> | null = null;
  #stats: ConsumerStats = { messages: 0, handled: 0, duplicatesSkipped: 0, redeliveries: 0, retries: 0, deadLettered: 0, undecodable: 0 };

  constructor(options: ConsumerOptions) {
    const prefetchMessages = options.prefetchMessages ?? 16;
    this.#o = {
      maxDeliver: 5,
      backoffMs: [100, 500, 2000, 5000],
      ackWaitMs: 30_000,
      partitionConcurrency: 4,
      dlqSubjectPrefix: 'ledgerline.dlq',
      ...options,
      prefetchMessages,
      maxAckPending: options.maxAckPending ?? prefetchMessages * 4,
    };
    if (!/^[a-z][a-z0-9_-]{0,62}$/.test(this.#o.name)) throw new RangeError(`consumer name ${this.#o.name} is not a valid durable name`);
    const { handler, handleBatch } = options;
    if ((handler === undefined) === (handleBatch === undefined)) {
      throw new TypeError('EventConsumer needs exactly one of handler and handleBatch');
    }
    for (const [key, min] of [['maxDeliver', 1], ['partitionConcurrency', 1], ['prefetchMessages', 1], ['maxAckPending', 1]] as const) {
      if (!Number.isInteger(this.#o[key]) || this.#o[key] < min) throw new RangeError(`${key} must be an integer >= ${min}`);
    }
    this.#slots = new Slots(this.#o.partitionConcurrency);
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
    // Every claim reads the inbox horizon: against a schema without it (a consumer upgraded
    // before the migration ran), each claim would fail on the events and dead-letter them all.
    const schema = await this.#o.pool.query<{ ok: boolean }>("SELECT to_regclass('events.inbox_horizons') IS NOT NULL AS ok");
    if (schema.rows[0]?.ok !== true) {
      throw new Error('the events schema has no events.inbox_horizons (migration 1770600000000): run migrateEvents before starting a consumer');
    }
    await registerConsumer(this.#o.pool, this.#o.name);
    const jsm = await jetstreamManager(this.#o.nats);
    const config = {
      durable_name: this.#o.name,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      filter_subject: this.#o.filterSubject,
      ack_wait: this.#o.ackWaitMs * 1_000_000,
      // Retries happen in place, so the broker's count grows only when an ack never came (a
      // crash, an expired ack wait, a stop). The broker never gives up on a message: a limit
      // there would drop, with the message whose handler kills the process, every message
      // waiting behind it in the same lane, each of which also loses a delivery at each
      // crash. Past `maxDeliver` deliveries the consumer itself settles the message
      // (#afterRepeatedDeliveries).
      max_deliver: -1,
      max_ack_pending: this.#o.maxAckPending,
    };
    try {
      await jsm.consumers.info(this.#o.streamName, this.#o.name);
      await jsm.consumers.update(this.#o.streamName, this.#o.name, config);
    } catch (error) {
      if (!/consumer not found/i.test(String(error))) throw error;
      await jsm.consumers.add(this.#o.streamName, config);
    }
    const consumer = await jetstream(this.#o.nats).consumers.get(this.#o.streamName, this.#o.name);
    this.#stopping = new AbortController();
    this.#messages = await consumer.consume({ max_messages: this.#o.prefetchMessages, expires: PULL_EXPIRES_MS });
    const messages = this.#messages;
    this.#loop = (async () => {
      for await (const msg of messages) this.#enqueue(msg);
    })();
  }

  /**
   * Stops pulling, waits for each lane's message in hand to commit (or its retry wait to end),
   * and gives every message not handled back to the broker with a nak, in delivery order, so
   * that it is redelivered at once and ahead of later messages.
   */
  async stop(): Promise<void> {
    const messages = this.#messages;
    this.#messages = null;
    this.#stopping.abort();
    const closedAtMs = Date.now();
    if (messages !== null) await messages.close();
    await this.#loop;
    while (this.#running.size > 0) await Promise.all(this.#running);
    if (this.#handBack.length === 0) return;
    // Closing the iterator does not withdraw our pull requests from the broker (nats-server
    // 2.9 keeps them until they expire), and it would redeliver a nak'ed message into one of
    // them at once, where nobody reads it: lost until its ack wait runs out, and then behind
    // later messages. So nak only once they have expired.
    await sleep(Math.max(0, closedAtMs + PULL_EXPIRES_MS + PULL_EXPIRY_MARGIN_MS - Date.now()));
    for (const msg of this.#handBack.splice(0)) {
      try {
        msg.nak();
      } catch {
        // the connection is gone; redelivery will happen after ack_wait
      }
    }
  }

  #enqueue(msg: JsMsg): void {
    const lane = this.#lanes.get(msg.subject);
    if (lane !== undefined) {
      // Even when stopping: the lane gives its messages back in their order.
      lane.queue.push(msg);
      return;
    }
    if (this.#stopping.signal.aborted) {
      this.#handBack.push(msg);
      return;
    }
    const fresh: Lane = { queue: [msg], current: null };
    this.#lanes.set(msg.subject, fresh);
    const running = this.#runLane(msg.subject, fresh).finally(() => {
      this.#running.delete(running);
    });
    this.#running.add(running);
  }

  /** Works through a lane until it is empty; the lane ends with it (a new one starts on demand). */
  async #runLane(subject: string, lane: Lane): Promise<void> {
    for (;;) {
      const msg = lane.queue.shift();
      if (msg === undefined) {
        // In the same tick as the empty check, so that no message can join a finished lane.
        this.#lanes.delete(subject);
        return;
      }
      if (this.#stopping.signal.aborted) {
        this.#handBack.push(msg);
        continue;
      }
      lane.current = msg;
      try {
        await this.#handle(msg, lane);
      } catch (error) {
        // Only what follows the commit can fail here (the afterCommit hook, the ack): the
        // effects stand. Ask for the message again at once rather than after its ack wait; the
        // copy meets the inbox, which skips every event of it, and is acked. That it may come
        // after later messages does not matter: none of it takes effect again.
        this.#report(error);
        try {
          msg.nak();
        } catch {
          // the connection is gone; redelivery will happen after ack_wait
        }
      }
      lane.current = null;
    }
  }

  #delayFor(attempt: number): number {
    const table = this.#o.backoffMs;
    return table[Math.min(attempt - 1, table.length - 1)] ?? 1000;
  }

  async #handle(msg: JsMsg, lane: Lane): Promise<void> {
    this.#stats.messages += 1;
    if (msg.info.deliveryCount > 1) this.#stats.redeliveries += 1;
    let events: StoredEvent[];
    try {
      events = decodeBatch(msg.data);
    } catch (error) {
      // Not ours to retry: decoding is deterministic, so it will never parse.
      this.#report(error);
      await this.#deadLetterUndecodable(msg, error);
      return;
    }
    if (msg.info.deliveryCount > this.#o.maxDeliver) {
      // Every delivery before this one ended without a verdict: a crash, a stall past the ack
      // wait, a stop that gave it back. If the handler is what kills the process, running the
      // batch again would kill it again, for ever. So its events are tried one at a time, each
      // recorded as a dead letter before it runs (#afterRepeatedDeliveries).
      if (!(await this.#afterRepeatedDeliveries(events, msg.info.deliveryCount, msg.seq, lane))) {
        this.#handBack.push(msg);
        return;
      }
      await msg.ackAck();
      return;
    }
    // Attempts count from 1 at each delivery. Not from the broker's count: that one also grows
    // for each time stop() gave the message back, tried or not (a consumer restarted while a
    // lane was held hands back every message waiting in it), and carrying on from it let a
    // few restarts dead-letter events tried fewer than `maxDeliver` times, or never. A message
    // that keeps crashing the process still reaches the dead-letter path: past `maxDeliver`
    // deliveries, above. A failure that says nothing about the events is not an attempt, but
    // it still backs off further each time; the delay grows with the deliveries too.
    let attempt = 1;
    for (let tries = 1; ; tries += 1) {
      try {
        await this.#slots.run(() => this.#apply(events));
        break;
      } catch (error) {
        this.#report(error);
        if (!eventsNotAtFault(error)) {
          if (attempt >= this.#o.maxDeliver) {
            if (await this.#deadLetterPath(events, attempt, msg.seq, lane)) break;
            this.#handBack.push(msg);
            return;
          }
          attempt += 1;
        }
      }
      this.#stats.retries += 1;
      if (!(await this.#hold(this.#delayFor(msg.info.deliveryCount + tries - 1), lane))) {
        this.#handBack.push(msg);
        return;
      }
    }
    await this.#o.afterCommit?.(events);
    await msg.ackAck();
  }

  /**
   * Each event alone; the failing ones are dead-lettered. Repeated while recording a dead
   * letter fails (the inbox skips what already committed). False if stopped first.
   */
  async #deadLetterPath(events: StoredEvent[], attempts: number, sourceSeq: number, lane: Lane): Promise<boolean> {
    const delayMs = this.#delayFor(attempts);
    for (;;) {
      try {
        await this.#slots.run(() => this.#applyOneByOne(events, attempts, sourceSeq));
        return true;
      } catch (error) {
        this.#report(error);
      }
      if (!(await this.#hold(delayMs, lane))) return false;
    }
  }

  /**
   * A message delivered more than `maxDeliver` times (see #handle): its events not in the
   * inbox are tried one at a time, each recorded as a dead letter first, in a row its own
   * transaction removes when it commits, with no other lane handling events meanwhile. A record left by an earlier delivery means that try
   * never finished (the process died or stalled in the handler): that event stays dead, and is
   * not tried again. An event the handler refuses is tried again in place, up to `maxDeliver`
   * tries (its record removed before each wait, so that a stop meanwhile does not leave it
   * looking like a try that never finished), and then dead-lettered: the earlier deliveries
   * may all have been stops that gave the message back untried. Repeated while the database
   * refuses; false if stopped first.
   */
  async #afterRepeatedDeliveries(events: StoredEvent[], deliveries: number, sourceSeq: number, lane: Lane): Promise<boolean> {
    for (;;) {
      try {
        const r = await this.#o.pool.query<{ event_id: string; handled: boolean; tried_at: number | null }>(
          // Handled: an inbox row, or at or before the inbox horizon and not open.
          `SELECT e.id::text AS event_id, events.inbox_handled($1, e.id, e.transaction_id, e.position) AS handled,
                  CASE WHEN d.error LIKE $3 || '%' THEN d.attempts END AS tried_at
             FROM unnest(string_to_array($2, ',')::uuid[], string_to_array($4, ',')::xid8[], string_to_array($5, ',')::bigint[])
                    AS e(id, transaction_id, position)
             LEFT JOIN events.dead_letters d ON d.consumer = $1 AND d.event_id = e.id`,
          [
            this.#o.name,
            events.map((e) => e.id).join(','),
            LAST_TRY,
            events.map((e) => e.transactionId.toString()).join(','),
            events.map((e) => e.position.toString()).join(','),
          ],
        );
        const state = new Map(r.rows.map((x) => [x.event_id, x]));
        for (const e of events) {
          const s = state.get(e.id);
          if (s === undefined || s.handled) continue;
          if (s.tried_at !== null && s.tried_at < deliveries) {
            await this.#deadLetter(e, deliveries, sourceSeq, new Error(
              `the handler never finished it: the process died or stalled in it at delivery ${s.tried_at} of this message, after earlier deliveries without a verdict`,
            ));
            continue;
          }
          for (let tries = 1; ; tries += 1) {
            try {
              // Alone in the process, the record and the try: if the process dies before the
              // record is removed, this event's handler is what was running.
              await this.#slots.runAlone(async () => {
                await this.#recordDeadLetter(e, deliveries, `${LAST_TRY} (delivery ${deliveries}; the earlier ones ended without a verdict)`);
                await this.#apply([e], { settlesDeadLetter: true });
              });
              break;
            } catch (error) {
              if (eventsNotAtFault(error)) {
                // No verdict on the event: forget the record of this try, so that a later delivery
                // (after a stop, say) tries it again instead of taking it for one its handler
                // killed. Best effort: with the database still unreachable the record stays, and
                // the next try of this delivery replaces it; only a stop before that try leaves
                // it, and then the event is dead-lettered untried, to be replayed (events:dlq).
                await this.#forgetLastTry(e, deliveries).catch(() => {});
                throw error;
              }
              this.#report(error);
              if (tries >= this.#o.maxDeliver) {
                await this.#deadLetter(e, deliveries, sourceSeq, error);
                break;
              }
              // The handler finished, with a refusal: not a try that never finished. If this
              // throws (the database is gone), the pass is repeated, and this delivery's record
              // is no verdict to it (tried_at is not below `deliveries`).
              await this.#forgetLastTry(e, deliveries);
            }
            this.#stats.retries += 1;
            if (!(await this.#hold(this.#delayFor(tries), lane))) return false;
          }
        }
        return true;
      } catch (error) {
        this.#report(error);
      }
      if (!(await this.#hold(this.#delayFor(deliveries), lane))) return false;
    }
  }

  /**
   * Waits before a retry, keeping the lane's messages alive at the broker meanwhile (they are
   * not acked, and must not be redelivered elsewhere ahead of the retry). False if stopped.
   */
  async #hold(delayMs: number, lane: Lane): Promise<boolean> {
    const stepMs = Math.max(1, Math.floor(this.#o.ackWaitMs / 3));
    for (let left = delayMs; left > 0; left -= stepMs) {
      for (const m of [lane.current, ...lane.queue]) {
        try {
          m?.working();
        } catch {
          // the connection is gone; the broker redelivers after ack_wait, the inbox skips
        }
      }
      try {
        await sleep(Math.min(left, stepMs), undefined, { signal: this.#stopping.signal });
      } catch {
        return false;
      }
    }
    return !this.#stopping.signal.aborted;
  }

  /**
   * One transaction for the whole batch: inbox rows and the handler's effects, and with
   * `settlesDeadLetter` the removal of the events' dead-letter records (#afterRepeatedDeliveries).
   */
  async #apply(events: StoredEvent[], options: { settlesDeadLetter?: boolean } = {}): Promise<void> {
    const client = await this.#o.pool.connect();
    let failed = false;
    try {
      await client.query('BEGIN');
      const fresh = await this.#claim(client, events);
      // The claimed ones, each once: a message may carry an event twice (the relay never writes
      // one, but any publisher on the subject could), and the inbox takes it once.
      const claimed = fresh.size === events.length ? events : events.filter((e) => fresh.delete(e.id));
      if (claimed.length > 0) await this.#handleBatch(claimed, client);
      if (options.settlesDeadLetter === true) {
        await client.query('DELETE FROM events.dead_letters WHERE consumer = $1 AND event_id = ANY(string_to_array($2, \',\')::uuid[])', [
          this.#o.name,
          events.map((e) => e.id).join(','),
        ]);
      }
      await commit(client);
      // `claimed`, not `fresh`: the filter above empties `fresh` as it takes each event once.
      this.#stats.handled += claimed.length;
      this.#stats.duplicatesSkipped += events.length - claimed.length;
    } catch (error) {
      failed = true;
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      client.release(failed ? true : undefined);
    }
  }

  #claim(client: pg.PoolClient, events: StoredEvent[]): Promise<Set<string>> {
    return claimEvents(client, this.#o.name, events);
  }

  /** A transient database failure ends the pass (the caller retries it), dead-lettering nothing. */
  async #applyOneByOne(events: StoredEvent[], attempts: number, sourceSeq: number): Promise<void> {
    for (const e of events) {
      try {
        await this.#apply([e]);
      } catch (error) {
        if (eventsNotAtFault(error)) throw error;
        await this.#deadLetter(e, attempts, sourceSeq, error);
      }
    }
  }

  /**
   * A message that does not decode as a batch is recorded in events.undecodable_messages, its
   * bytes go to the dead-letter stream as they came, with where they came from
   * (`Ledgerline-Source-Subject`, `Ledgerline-Source-Sequence`) and why, and then it is
   * acknowledged. It names no event, so there is nothing to replay. Not `term()`: nats-server
   * 2.9 keeps a terminated message among the consumer's pending acks for good, which pins the
   * consumer's ack floor (reconciliation would then see it stuck before every later event) and
   * holds one of its `max_ack_pending` slots. If either record fails, the message is given back
   * and comes again later.
   */
  async #deadLetterUndecodable(msg: JsMsg, error: unknown): Promise<void> {
    const reason = `undecodable: ${error instanceof Error ? error.message : String(error)}`;
    try {
      // One row and one message id per source message: a redelivery before the ack adds neither.
      await this.#o.pool.query(
        `INSERT INTO events.undecodable_messages (consumer, stream_sequence, subject, error, size, head)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (consumer, stream_sequence) DO NOTHING`,
        [this.#o.name, String(msg.seq), msg.subject, storablePrefix(reason, ERROR_CHARS_MAX), msg.data.length, Buffer.from(msg.data.subarray(0, UNDECODABLE_HEAD_BYTES))],
      );
      await this.#publishDeadLetter(msg.data, `${this.#o.name}:undecodable:${msg.seq}`, reason, {
        'Ledgerline-Source-Subject': msg.subject,
        'Ledgerline-Source-Sequence': String(msg.seq),
      });
    } catch (recordError) {
      this.#report(recordError);
      try {
        msg.nak(this.#delayFor(msg.info.deliveryCount));
      } catch {
        // the connection is gone; the broker redelivers after ack_wait
      }
      return;
    }
    this.#stats.undecodable += 1;
    await msg.ackAck();
  }

  /**
   * Records and publishes a dead letter. Its message id names the stream sequence of the
   * message the event came in (`<consumer>:<event id>:<source sequence>`): the same dead
   * letter written again for the same copy (a pass repeated after a database failure, a
   * redelivery after a lost ack) is dropped by the dead-letter stream's duplicate window, while
   * the event dead-lettered again from another copy (a replay that fails again, a re-cut batch)
   * is a new message. An id made of the attempts, as it was, was the same for both, so a
   * replay that failed again within the window was dropped at the broker.
   */
  async #deadLetter(event: StoredEvent, attempts: number, sourceSeq: number, error: unknown): Promise<void> {
    const reason = error instanceof Error ? error.message : String(error);
    await this.#recordDeadLetter(event, attempts, reason);
    await this.#publishDeadLetter(JSON.stringify(eventToJson(event)), `${this.#o.name}:${event.id}:${sourceSeq}`, reason, {
      'Ledgerline-Source-Sequence': String(sourceSeq),
    });
    this.#stats.deadLettered += 1;
  }

  /**
   * Hands an error to `onError`. A hook that throws is the caller's bug, reported nowhere else;
   * it must not change what the consumer does next (skip a dead letter, leave a lane stuck).
   */
  #report(error: unknown): void {
    try {
      this.#o.onError?.(error);
    } catch {
      // ignored: see above
    }
  }

  /** Removes the record `#afterRepeatedDeliveries` wrote before this delivery's try of `event`, if it is still that record. */
  async #forgetLastTry(event: StoredEvent, deliveries: number): Promise<void> {
    await this.#o.pool.query(
      `DELETE FROM events.dead_letters WHERE consumer = $1 AND event_id = $2 AND attempts = $3 AND error LIKE $4 || '%' AND replayed_at IS NULL`,
      [this.#o.name, event.id, deliveries, LAST_TRY],
    );
  }

  /** The dead letter's row in events.dead_letters (the record events:dlq lists and replays from). */
  async #recordDeadLetter(event: StoredEvent, attempts: number, reason: string): Promise<void> {
    await this.#o.pool.query(
      `INSERT INTO events.dead_letters (consumer, event_id, position, attempts, error) VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (consumer, event_id) DO UPDATE SET attempts = EXCLUDED.attempts, error = EXCLUDED.error, dead_at = now(), replayed_at = NULL`,
      [this.#o.name, event.id, event.position.toString(), attempts, storablePrefix(reason, ERROR_CHARS_MAX)],
    );
  }

  /**
   * Puts a dead letter on this consumer's dead-letter subject, with the reason (at most
   * ERROR_HEADER_BYTES_MAX bytes of it) and `more` as headers. A body that would take the
   * message past the broker's `max_payload` is cut to fit and marked `Ledgerline-Truncated-From`
   * (its size): an event the store took near its size bound, or someone else's message near the
   * broker's, leaves too little room for these headers, and a refused publish was retried for
   * ever, holding the lane. The whole event stays in the event store, and events.dead_letters
   * names it (`events:dlq` replays from there); an undecodable message's first bytes are in
   * events.undecodable_messages.
   */
  async #publishDeadLetter(data: string | Uint8Array, msgID: string, reason: string, more: Record<string, string> = {}): Promise<void> {
    const fields: Array<[string, string]> = [['Ledgerline-Error', utf8Prefix(storablePrefix(reason, ERROR_CHARS_MAX).replace(/[\r\n]/g, ' '), ERROR_HEADER_BYTES_MAX)], ...Object.entries(more)];
    let body = typeof data === 'string' ? utf8.encode(data) : data;
    const payloadMax = this.#o.nats.info?.max_payload;
    if (payloadMax !== undefined) {
      // The headers as the client counts them against max_payload, with the message id the
      // JetStream client adds, and the mark itself at its widest.
      const marked: Array<[string, string]> = [...fields, ['Nats-Msg-Id', msgID], ['Ledgerline-Truncated-From', String(Number.MAX_SAFE_INTEGER)]];
      const headerBytes = Buffer.byteLength(`NATS/1.0\r\n${marked.map(([k, v]) => `${k}: ${v}\r\n`).join('')}\r\n`);
      if (body.length + headerBytes > payloadMax) {
        fields.push(['Ledgerline-Truncated-From', String(body.length)]);
        body = body.subarray(0, Math.max(0, payloadMax - headerBytes));
      }
    }
    const h = headers();
    for (const [name, value] of fields) h.set(name, value);
    await jetstream(this.#o.nats).publish(`${this.#o.dlqSubjectPrefix}.${this.#o.name}`, body, { msgID, headers: h });
  }
}

function eventToJson(e: StoredEvent): Record<string, unknown> {
  return { ...e, position: e.position.toString(), transactionId: e.transactionId.toString(), recordedAt: e.recordedAt.toISOString() };
}

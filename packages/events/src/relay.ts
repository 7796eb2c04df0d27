/**
 * The outbox relay: tails the event store in the global order and publishes to NATS
 * JetStream, checkpointing only after the broker has acknowledged.
 *
 * - Many events travel in one broker message (a batch), because JetStream acknowledges
 *   messages one at a time: batching is what gets the bus past tens of thousands of events
 *   a second. The message id is `<partition>:<first position>-<last position>` (see
 *   `messageId`), the same for the same batch however often it is published, so the broker
 *   drops a republished batch within its duplicate window. A batch that is cut differently
 *   after a restart gets a new id and is delivered again; consumers' inboxes drop the events
 *   they already handled.
 * - Each partition is published by one relay at a time: the holder of a PostgreSQL
 *   session advisory lock. Within a partition, events leave in the global order, on one
 *   connection, so every stream's events arrive in order.
 * - The broker being down only stops the loop: it waits, retries, and resumes from the
 *   checkpoint. Nothing is lost because nothing is checkpointed until acked.
 * - The relay passes events on without parsing them: it reads PostgreSQL's text and splices
 *   each event's JSON into the message (see `readOutbox`), which cut its CPU per event by a
 *   third against parsing the jsonb and serialising it again.
 * - With a residency policy (`residency`), events whose data region may not be at the broker's
 *   location are withheld: not published, recorded in `events.relay_withheld` by the same
 *   statement that moves the checkpoint past them, and counted. Which events are withheld is
 *   a function of the stored region tags and the policy, so a re-read round withholds the same.
 */
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { headers, type NatsConnection } from '@nats-io/transport-node';
import { jetstream, jetstreamManager, type JetStreamClient } from '@nats-io/jetstream';
import pg from 'pg';
import {
  CHECKPOINT_START,
  partitionByResidency,
  readPartition,
  type Checkpoint,
  type EventStore,
  type ResidencyPolicy,
  type ResidencyViolationError,
} from './store.ts';
import { withQueryTimeout } from './transaction.ts';
import { encodeEnvelopes, envelopeJson } from './wire.ts';

const { types: pgTypes } = pg;

/** The policy the relay enforces, and where its broker (the JetStream stream) lives, e.g. `us-east-1`. */
export interface RelayResidency {
  policy: ResidencyPolicy;
  location: string;
}

export interface RelayOptions {
  pool: pg.Pool;
  store: EventStore;
  nats: NatsConnection;
  /** JetStream stream name; created with `ensureEventStream` if missing. */
  streamName: string;
  /** Messages go to `<subjectPrefix>.p<partition>`. */
  subjectPrefix: string;
  /** Events read from PostgreSQL per round. */
  readBatchMax?: number;
  /** Events per broker message; also bounded by `messageBytesMax`. */
  eventsPerMessageMax?: number;
  messageBytesMax?: number;
  /** Wait when there is nothing to publish, or after a failure. */
  idleWaitMs?: number;
  failureWaitMsMax?: number;
  publishTimeoutMs?: number;
  /**
   * How long the session holding the partition locks may take to answer the check before each
   * round (a trivial statement) before the relay gives the partitions up and ends the session.
   */
  lockSessionTimeoutMs?: number;
  /**
   * Data residency: each round's events are split with `partitionByResidency(..., location,
   * 'replicate')`. Those the policy refuses at `location` are not published; they are recorded
   * in `events.relay_withheld` with the reason, and the checkpoint moves past them. Untagged
   * streams always go. Unset: everything is published.
   */
  residency?: RelayResidency;
  /**
   * Runs before a partition's next events leave the database (after residency has withheld
   * what it must: these are the events about to be published, never none). Throwing publishes
   * nothing and checkpoints nothing, and the relay tries that partition again with backoff
   * (the others go on), so an event that may not leave holds its partition back instead of
   * being skipped. The seam for other checks on what may go to the broker.
   */
  beforePublish?: (partition: number, events: readonly OutboxEvent[]) => void | Promise<void>;
  /** Fault-injection hook for tests: runs after the broker acked `events` events, before the checkpoint. */
  afterPublish?: (partition: number, events: number) => void | Promise<void>;
  /**
   * Every failure the relay recovers from by itself (it retries): a partition's failure comes
   * once per try, except EventTooLargeForBrokerError, once a minute for the same event.
   */
  onError?: (error: unknown) => void;
}

/**
 * An event the broker cannot take: alone in a message, with the message's headers, it is
 * larger than the connection's `max_payload`. The store refuses such events at append
 * (`eventBytesMax`); one that got in anyway (a store opened with a larger `eventBytesMax`, a
 * broker with a smaller `max_payload`, data full of numbers in exponent notation) holds its
 * partition: the events before it are published and checkpointed, it and those after it
 * are not, and the relay tries again with backoff, reporting this error once a minute. It is
 * never skipped, which would lose it: raise the broker's `max_payload`, or move the partition's
 * checkpoint past the event by hand (`events.relay_checkpoints`) and deliver it another way.
 */
export class EventTooLargeForBrokerError extends Error {
  override readonly name = 'EventTooLargeForBrokerError';
  readonly partition: number;
  readonly eventId: string;
  readonly position: bigint;
  readonly streamType: string;
  readonly streamId: string;
  /** The message's bytes, headers included. */
  readonly bytes: number;
  readonly maxPayload: number;
  constructor(partition: number, event: OutboxEvent, bytes: number, maxPayload: number) {
    super(
      `relay: event ${event.id} (stream ${event.streamType}/${event.streamId}, position ${event.position}) is ${bytes} bytes as a ` +
        `broker message, more than the broker's max_payload of ${maxPayload}: partition ${partition} is held at it until max_payload ` +
        'is raised or its checkpoint is moved past it by hand',
    );
    this.partition = partition;
    this.eventId = event.id;
    this.position = event.position;
    this.streamType = event.streamType;
    this.streamId = event.streamId;
    this.bytes = bytes;
    this.maxPayload = maxPayload;
  }
}

/** `{"events":[` and `]}`: what a message adds to its envelopes, besides a comma between two. */
const MESSAGE_FRAME_BYTES = 13;
/**
 * More than a message's headers take (`NATS/1.0`, `Ledgerline-Events`, `Nats-Msg-Id` of at most
 * 62 characters: about 120 bytes). Messages are cut to `max_payload` less this.
 */
const MESSAGE_HEADERS_ROOM = 256;
/** How often the same oversized event is reported (EventTooLargeForBrokerError). */
const TOO_LARGE_REPORT_MS = 60_000;

/** A partition whose last try failed: how many in a row, when it is tried next, what was last reported. */
interface PartitionFailure {
  failures: number;
  retryAt: number;
  tooLarge: { eventId: string; reportedAt: number } | null;
}

/** How long the broker keeps published batches; longer than any consumer outage we plan for. */
const STREAM_MAX_AGE_MS = 7 * 24 * 3600 * 1000;

/**
 * Distinguishes our advisory locks from any other user's in the same database: the relay that
 * publishes partition p holds the session lock (RELAY_LOCK_CLASS, p), which `pg_locks` shows
 * as classid RELAY_LOCK_CLASS, objid p, objsubid 2.
 */
export const RELAY_LOCK_CLASS = 0x4c4c5231; // "LLR1"

export interface RelayStats {
  published: number;
  messages: number;
  /** Events not published because the residency policy forbids them at the broker (`events.relay_withheld`). */
  withheld: number;
  partitionsHeld: number[];
}

export async function ensureEventStream(
  nats: NatsConnection,
  streamName: string,
  subjectPrefix: string,
  duplicateWindowMs = 120_000,
): Promise<void> {
  const jsm = await jetstreamManager(nats);
  const config = {
    name: streamName,
    subjects: [`${subjectPrefix}.>`],
    duplicate_window: duplicateWindowMs * 1_000_000,
    // The bus is a transport, not the record: PostgreSQL keeps every event. Bound what the
    // broker keeps so that a consumer that is gone for good cannot fill its disk.
    max_age: STREAM_MAX_AGE_MS * 1_000_000,
  };
  try {
    await jsm.streams.info(streamName);
    await jsm.streams.update(streamName, config);
  } catch (error) {
    if (!/stream not found/i.test(String(error))) throw error;
    await jsm.streams.add(config);
  }
}

export class OutboxRelay {
  readonly #o: Required<Omit<RelayOptions, 'residency' | 'beforePublish' | 'afterPublish' | 'onError'>> &
    Pick<RelayOptions, 'residency' | 'beforePublish' | 'afterPublish' | 'onError'>;
  readonly #js: JetStreamClient;
  #lockClient: pg.PoolClient | null = null;
  readonly #held = new Set<number>();
  #running = false;
  #loop: Promise<void> | null = null;
  #stats = { published: 0, messages: 0, withheld: 0 };
  /** The held partitions whose last try failed; the others are tried every round. */
  readonly #failing = new Map<number, PartitionFailure>();

  constructor(options: RelayOptions) {
    this.#o = {
      readBatchMax: 5000,
      eventsPerMessageMax: 500,
      messageBytesMax: 512 * 1024,
      idleWaitMs: 20,
      failureWaitMsMax: 2000,
      publishTimeoutMs: 5000,
      // The statements are trivial: only a session that is gone, or a stalled server, takes this long.
      lockSessionTimeoutMs: 5000,
      ...options,
    };
    this.#js = jetstream(options.nats, { timeout: this.#o.publishTimeoutMs });
  }

  stats(): RelayStats {
    return { ...this.#stats, partitionsHeld: [...this.#held].sort((a, b) => a - b) };
  }

  start(): void {
    if (this.#running) return;
    this.#running = true;
    this.#loop = this.#run();
  }

  async stop(): Promise<void> {
    this.#running = false;
    await this.#loop;
    await this.#releaseLocks();
  }

  #backoffMs(failures: number): number {
    return Math.min(this.#o.failureWaitMsMax, 50 * 2 ** Math.min(failures, 6));
  }

  /**
   * Rounds: each takes the free partitions, then publishes each held partition's next events.
   * A partition fails alone (a refusal by `beforePublish`, the broker, the database): the
   * failure is reported, and that partition waits with its own backoff while the others go on
   * at their pace, before it in the round or after it. Until 2026-12-07 one try of the whole
   * round held every partition: a partition that kept failing stopped every partition after it
   * in the round, and slowed the rest with its backoff.
   */
  async #run(): Promise<void> {
    let failures = 0;
    while (this.#running) {
      try {
        await this.#acquirePartitions();
        failures = 0;
      } catch (error) {
        this.#o.onError?.(error);
        failures += 1;
        // The database is down, or the locks' session: wait, with a cap, and start again from
        // the checkpoints. Anything read but not acked is simply read again.
        await sleep(this.#backoffMs(failures));
        if (this.#lockClient === null) this.#held.clear();
        continue;
      }
      let published = 0;
      let healthy = false;
      let retryAt = Infinity;
      for (const partition of this.#held) {
        if (!this.#running) break;
        const failing = this.#failing.get(partition);
        if (failing !== undefined && failing.retryAt > Date.now()) {
          retryAt = Math.min(retryAt, failing.retryAt);
          continue;
        }
        try {
          published += await this.#publishOnce(partition);
          this.#failing.delete(partition);
          healthy = true;
        } catch (error) {
          const next = this.#partitionFailed(partition, failing, error);
          retryAt = Math.min(retryAt, next.retryAt);
        }
      }
      if (published > 0) continue;
      // Nothing to publish: wait a moment, or, when every held partition is waiting out a
      // failure, until the first of them is due.
      await sleep(healthy || retryAt === Infinity ? this.#o.idleWaitMs : Math.max(this.#o.idleWaitMs, retryAt - Date.now()));
    }
  }

  /** Records and reports a partition's failed try; it is tried again after its backoff. */
  #partitionFailed(partition: number, before: PartitionFailure | undefined, error: unknown): PartitionFailure {
    const now = Date.now();
    const failures = (before?.failures ?? 0) + 1;
    let tooLarge = before?.tooLarge ?? null;
    let report = true;
    if (error instanceof EventTooLargeForBrokerError) {
      // The same event, every try until someone acts: said once a minute, not at every try.
      if (tooLarge?.eventId === error.eventId && now - tooLarge.reportedAt < TOO_LARGE_REPORT_MS) report = false;
      else tooLarge = { eventId: error.eventId, reportedAt: now };
    }
    if (report) this.#o.onError?.(error);
    const next: PartitionFailure = { failures, retryAt: now + this.#backoffMs(failures), tooLarge };
    // A partition given up meanwhile (its session lost) starts afresh when it is taken again.
    if (this.#held.has(partition)) this.#failing.set(partition, next);
    return next;
  }

  async #acquirePartitions(): Promise<void> {
    if (this.#lockClient !== null) await this.#confirmLockSession(this.#lockClient);
    if (this.#held.size === this.#o.store.partitions) return;
    if (this.#lockClient === null) {
      const client = await this.#o.pool.connect();
      // Losing this session loses the locks: stop publishing until they are taken again.
      client.on('error', (error) => this.#dropLockSession(client, error));
      this.#lockClient = client;
    }
    for (let p = 0; p < this.#o.store.partitions; p += 1) {
      if (this.#held.has(p)) continue;
      const r = await this.#lockClient.query<{ ok: boolean }>('SELECT pg_try_advisory_lock($1, $2) AS ok', [RELAY_LOCK_CLASS, p]);
      if (r.rows[0]?.ok === true) this.#held.add(p);
    }
  }

  /**
   * Before each round, the session that holds the locks must answer. A session lock lasts as
   * long as its session, so an answer means every lock taken on it is still held. Without the
   * check, a session the server ended without the client hearing of it (a failover, a dropped
   * connection, a backend terminated behind a dead network path) would leave this relay
   * publishing and checkpointing beside the relay that took the locks next; and the socket's
   * error may never come. No answer within `lockSessionTimeoutMs` ends the session here: the
   * partitions are given up and taken again, on a new session, when they are free.
   */
  async #confirmLockSession(client: pg.PoolClient): Promise<void> {
    try {
      await client.query(withQueryTimeout('SELECT 1', [], this.#o.lockSessionTimeoutMs));
    } catch (error) {
      this.#dropLockSession(client, error);
      throw error;
    }
  }

  /** Gives up the partitions and the session that held them; the pool destroys the client. */
  #dropLockSession(client: pg.PoolClient, error: unknown): void {
    if (this.#lockClient !== client) return;
    this.#lockClient = null;
    this.#held.clear();
    this.#failing.clear();
    client.release(error instanceof Error ? error : new Error(String(error)));
  }

  async #releaseLocks(): Promise<void> {
    const client = this.#lockClient;
    this.#lockClient = null;
    this.#held.clear();
    this.#failing.clear();
    if (client === null) return;
    try {
      await client.query(withQueryTimeout('SELECT pg_advisory_unlock_all()', [], this.#o.lockSessionTimeoutMs));
      client.release();
    } catch (error) {
      client.release(true);
      this.#o.onError?.(error);
    }
  }

  /**
   * Publishes the next batch of one partition. Returns how many events it got past (published
   * or withheld), so that a round that only withheld does not wait before the next.
   */
  async #publishOnce(partition: number): Promise<number> {
    const { pool, residency } = this.#o;
    const checkpoint = await readCheckpoint(pool, partition);
    const events = await readOutbox(pool, partition, checkpoint, this.#o.readBatchMax);
    if (events.length === 0) return 0;
    const { allowed, withheld } =
      residency === undefined
        ? { allowed: events, withheld: [] }
        : await partitionByResidency(pool, residency.policy, events, residency.location, 'replicate');
    // Every event read is either published or recorded as withheld; none is dropped.
    if (allowed.length + withheld.length !== events.length) {
      throw new Error(`relay: residency split ${events.length} events into ${allowed.length} + ${withheld.length}`);
    }
    if (allowed.length > 0) await this.#o.beforePublish?.(partition, allowed);
    const subject = `${this.#o.subjectPrefix}.p${partition}`;
    // The broker refuses a message larger than its max_payload (headers included), before it
    // is sent: messages are cut below it, and only an event alone can be over it.
    const payloadMax = this.#o.nats.info?.max_payload;
    const bytesMax = payloadMax === undefined ? this.#o.messageBytesMax : Math.min(this.#o.messageBytesMax, payloadMax - MESSAGE_HEADERS_ROOM);
    const messages = splitMessages(allowed, this.#o.eventsPerMessageMax, bytesMax);
    const readIndex = withheld.length === 0 ? null : new Map(events.map((e, i) => [e, i]));
    const tooLarge = payloadMax === undefined ? null : tooLargeMessage(partition, messages, readIndex, payloadMax);
    const sending = tooLarge === null ? messages : messages.slice(0, tooLarge.index);
    // One at a time: a message is published only once the broker has stored the one before.
    // Sent back to back, a refused or lost message could be followed by a stored one, and the
    // retry would then store the earlier events after the later ones: a stream's events out
    // of order on the bus. Each ack is one round trip per message of up to
    // `eventsPerMessageMax` events. The checkpoint moves only once every one is acked.
    let sent = 0;
    for (const batch of sending) {
      const h = headers();
      h.set('Ledgerline-Events', String(batch.length));
      await this.#js.publish(subject, encodeEnvelopes(batch.map((e) => e.json)), {
        msgID: messageId(partition, batch, readIndex),
        headers: h,
        timeout: this.#o.publishTimeoutMs,
      });
      sent += batch.length;
    }
    await this.#o.afterPublish?.(partition, sent);
    if (tooLarge === null) {
      const last = events.at(-1) as OutboxEvent;
      await writeCheckpoint(pool, partition, { transactionId: last.transactionId, position: last.position }, allowed.length, withheld);
      this.#count(allowed.length, withheld.length, messages.length);
      return events.length;
    }
    // Held at the event the broker cannot take: the checkpoint goes up to the event before it
    // in the read (with the events withheld before it), so that it is the next one read, and
    // the partition is tried again with backoff (see EventTooLargeForBrokerError).
    const at = events.indexOf(tooLarge.event);
    if (at > 0) {
      const before = new Set(events.slice(0, at));
      const withheldBefore = withheld.filter((w) => before.has(w.event));
      const last = events[at - 1] as OutboxEvent;
      await writeCheckpoint(pool, partition, { transactionId: last.transactionId, position: last.position }, sent, withheldBefore);
      this.#count(sent, withheldBefore.length, sending.length);
    }
    throw tooLarge.error;
  }

  #count(published: number, withheld: number, messages: number): void {
    this.#stats.published += published;
    this.#stats.withheld += withheld;
    this.#stats.messages += messages;
  }
}

/**
 * The first message the broker would refuse, larger than `payloadMax` with its headers: only
 * a lone event can be (`splitMessages` cuts below it), so only a lone event near the limit is
 * measured exactly, as the NATS client counts: the payload and the encoded headers.
 */
function tooLargeMessage(
  partition: number,
  messages: readonly OutboxEvent[][],
  readIndex: ReadonlyMap<OutboxEvent, number> | null,
  payloadMax: number,
): { index: number; event: OutboxEvent; error: EventTooLargeForBrokerError } | null {
  for (let i = 0; i < messages.length; i += 1) {
    const batch = messages[i] as OutboxEvent[];
    const event = batch[0] as OutboxEvent;
    if (batch.length !== 1 || event.bytes + MESSAGE_FRAME_BYTES + MESSAGE_HEADERS_ROOM <= payloadMax) continue;
    // The headers as the client encodes them (`MsgHdrs.encode`) and counts them against
    // max_payload: the ones the publish sets, and the message id the JetStream client adds.
    const headerText = `NATS/1.0\r\nLedgerline-Events: 1\r\nNats-Msg-Id: ${messageId(partition, batch, readIndex)}\r\n\r\n`;
    const bytes = event.bytes + MESSAGE_FRAME_BYTES + Buffer.byteLength(headerText);
    if (bytes > payloadMax) return { index: i, event, error: new EventTooLargeForBrokerError(partition, event, bytes, payloadMax) };
  }
  return null;
}

/**
 * A message's id: `<partition>:<first position>-<last position>`, the same for the same batch
 * on every publish, so that the broker drops a republished copy. When residency withheld
 * events between its first and last (`readIndex` maps the round's events to their place in
 * the read), the id also carries a digest of the positions in the message: the same batch
 * still gets the same id, but a batch between the same two events with other events withheld
 * (the policy or a tag changed between a publish and its checkpoint) gets a new one, where the
 * broker would otherwise drop it as a copy and lose the events it adds.
 */
function messageId(partition: number, batch: readonly OutboxEvent[], readIndex: ReadonlyMap<OutboxEvent, number> | null): string {
  const first = batch[0] as OutboxEvent;
  const last = batch.at(-1) as OutboxEvent;
  const id = `${partition}:${first.position}-${last.position}`;
  if (readIndex === null) return id;
  const span = (readIndex.get(last) as number) - (readIndex.get(first) as number) + 1;
  if (span === batch.length) return id;
  const digest = createHash('sha256').update(batch.map((e) => e.position).join(',')).digest('base64url').slice(0, 16);
  return `${id}~${digest}`;
}

/** One event on its way out: its place in the global order, its stream, and its wire JSON. */
export interface OutboxEvent {
  position: bigint;
  transactionId: bigint;
  id: string;
  streamType: string;
  streamId: string;
  /** The event as it goes on the wire (`envelopeJson`). */
  json: string;
  /** UTF-8 bytes of `json`. */
  bytes: number;
}

const OUTBOX_COLUMNS = [
  'position', 'transaction_id', 'partition', 'event_id', 'stream_type', 'stream_id',
  'version', 'type', 'schema_version', 'data', 'metadata', 'recorded_at',
] as const;

/** Every column as PostgreSQL's text: nothing is parsed that is only passed on. */
const AS_TEXT = { getTypeParser: () => (text: string) => text } as unknown as pg.CustomTypesConfig;
const parseTimestamptz = pgTypes.getTypeParser(pgTypes.builtins.TIMESTAMPTZ) as (text: string) => Date;

/**
 * The next events of a partition after its checkpoint, as wire JSON: the order and horizon of
 * `EventStore.readAll` (by transaction id and position, below `readHorizon`), read as text so that the payload is spliced, never parsed.
 * Call it outside a transaction block, as the relay does (on its pool): inside one, the read's
 * planner setting would last until that transaction ends.
 */
export async function readOutbox(
  db: Pick<pg.ClientBase, 'query'>,
  partition: number,
  after: Checkpoint,
  limit: number,
): Promise<OutboxEvent[]> {
  const rows = await readPartition<Record<(typeof OUTBOX_COLUMNS)[number], string>>(db, OUTBOX_COLUMNS.join(', '), partition, after, limit, AS_TEXT);
  // The events of one transaction share its start time: convert each distinct one once.
  let recordedText = '';
  let recordedAt = '';
  return rows.map((row) => {
    if (row.recorded_at !== recordedText) {
      recordedText = row.recorded_at;
      recordedAt = parseTimestamptz(recordedText).toISOString();
    }
    const json = envelopeJson({
      position: row.position,
      transactionId: row.transaction_id,
      partition: row.partition,
      id: row.event_id,
      streamType: row.stream_type,
      streamId: row.stream_id,
      version: row.version,
      type: row.type,
      schemaVersion: row.schema_version,
      data: row.data,
      metadata: row.metadata,
      recordedAt,
    });
    return {
      position: BigInt(row.position),
      transactionId: BigInt(row.transaction_id),
      id: row.event_id,
      streamType: row.stream_type,
      streamId: row.stream_id,
      json,
      bytes: Buffer.byteLength(json),
    };
  });
}

/**
 * Cuts a partition's events into messages of at most `eventsMax` events and `bytesMax` bytes
 * (a single larger event goes alone). A pure function of the events, so the same read is cut
 * the same way, and a republished message keeps its id.
 */
export function splitMessages(events: readonly OutboxEvent[], eventsMax: number, bytesMax: number): OutboxEvent[][] {
  /** `{"events":[` and `]}`, and a comma per event. */
  const frameBytes = MESSAGE_FRAME_BYTES;
  const out: OutboxEvent[][] = [];
  let current: OutboxEvent[] = [];
  let bytes = frameBytes;
  for (const e of events) {
    if (current.length > 0 && (current.length >= eventsMax || bytes + e.bytes + 1 > bytesMax)) {
      out.push(current);
      current = [];
      bytes = frameBytes;
    }
    current.push(e);
    bytes += e.bytes + 1;
  }
  if (current.length > 0) out.push(current);
  return out;
}

export async function readCheckpoint(db: Pick<pg.ClientBase, 'query'>, partition: number): Promise<Checkpoint> {
  const r = await db.query<{ transaction_id: string; position: string }>(
    'SELECT transaction_id::text, position::text FROM events.relay_checkpoints WHERE partition = $1',
    [partition],
  );
  const row = r.rows[0];
  return row === undefined ? CHECKPOINT_START : { transactionId: BigInt(row.transaction_id), position: BigInt(row.position) };
}

/**
 * Moves a checkpoint forward only (a relay that lost its lock cannot drag it back), and records
 * the events withheld on the way. One statement, so one transaction: a withheld event is never
 * passed without its record, nor recorded while still ahead of the checkpoint. Retrying it
 * after a failure is harmless (`ON CONFLICT DO NOTHING`).
 */
async function writeCheckpoint(
  db: Pick<pg.ClientBase, 'query'>,
  partition: number,
  to: Checkpoint,
  published: number,
  withheld: ReadonlyArray<{ event: OutboxEvent; error: ResidencyViolationError }>,
): Promise<void> {
  await db.query(
    `WITH withheld AS (
       INSERT INTO events.relay_withheld (event_id, partition, position, transaction_id, stream_type, stream_id, region, location, reason)
       SELECT w.event_id, $1, w.position, w.transaction_id::xid8, w.stream_type, w.stream_id, w.region, w.location, w.reason
         FROM unnest($5::uuid[], $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
              AS w(event_id, position, transaction_id, stream_type, stream_id, region, location, reason)
       ON CONFLICT (event_id) DO NOTHING)
     INSERT INTO events.relay_checkpoints AS c (partition, transaction_id, position, published)
     VALUES ($1, $2::text::xid8, $3, $4)
     ON CONFLICT (partition) DO UPDATE
        SET transaction_id = EXCLUDED.transaction_id, position = EXCLUDED.position,
            published = c.published + EXCLUDED.published, updated_at = now()
      WHERE (c.transaction_id, c.position) < (EXCLUDED.transaction_id, EXCLUDED.position)`,
    [
      partition, to.transactionId.toString(), to.position.toString(), published,
      withheld.map((w) => w.event.id),
      withheld.map((w) => w.event.position.toString()),
      withheld.map((w) => w.event.transactionId.toString()),
      withheld.map((w) => w.event.streamType),
      withheld.map((w) => w.event.streamId),
      withheld.map((w) => w.error.dataRegion),
      withheld.map((w) => w.error.location),
      withheld.map((w) => w.error.message),
    ],
  );
}

/**
 * Seconds since the oldest event not yet published was recorded (0 when the relay is caught
 * up): the outbox lag, for a gauge. Reads one event per partition, past its checkpoint.
 */
export async function outboxLagSeconds(db: Pick<pg.ClientBase, 'query'>): Promise<number> {
  const r = await db.query<{ lag: string | null }>(
    `SELECT extract(epoch FROM now() - min(oldest.recorded_at))::text AS lag
       FROM events.settings s
      CROSS JOIN generate_series(0, s.partitions - 1) AS p(partition)
       LEFT JOIN events.relay_checkpoints c ON c.partition = p.partition
      CROSS JOIN LATERAL (
        SELECT e.recorded_at FROM events.events e
         WHERE e.partition = p.partition
           AND (e.transaction_id, e.position) > (coalesce(c.transaction_id, '0'::xid8), coalesce(c.position, 0))
         ORDER BY e.transaction_id, e.position LIMIT 1) AS oldest`,
  );
  const lag = r.rows[0]?.lag;
  return lag === null || lag === undefined ? 0 : Math.max(0, Number(lag));
}

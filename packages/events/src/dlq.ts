/**
 * Dead-letter tooling: list the events a consumer gave up on, and replay them; list the
 * messages it could not decode (which name no event, so there is nothing to replay).
 *
 * A replay reads the event from the event store (the source of truth, not the dead-letter
 * stream's copy): from events.events, or from events.archived_events once retention has
 * archived its stream (pending dead letters do not hold retention back). It publishes it
 * again as a single-event batch to its partition subject on the event stream. Every consumer of the stream receives it: the ones that handled it before
 * drop it in their inbox, and the target consumer handles it through its inbox as usual, so
 * it still takes effect at most once.
 *
 * The message id is `replay:<consumer>:<event id>:<n>`, where n is the dead letter's
 * generation: its `dead_at` in epoch microseconds, which changes each time the event is
 * dead-lettered again. Replaying the same dead letter twice (a tool that crashed before it
 * marked `replayed_at`) therefore publishes the same id, and the broker drops the copy within
 * its duplicate window; a later dead letter of the same event gets a new id.
 *
 * Residency: with the relay's policy and the broker's location (`residency`, as the relay's
 * EVENTS_RESIDENCY_POLICY and EVENTS_BROKER_LOCATION), an event whose data region may not be at
 * the broker now is not published (`withheld`, the dead letter stays pending): the policy may
 * have changed since the relay published it. Until 2026-12-07 a replay published whatever the
 * policy said (a review found it).
 *
 * Order: a replayed event arrives after events of its stream that were handled meanwhile. A
 * handler that depends on per-stream order must tolerate that, or the operator replays only
 * once the cause is fixed and before more events of that stream matter.
 */
import { jetstream } from '@nats-io/jetstream';
import { headers, type NatsConnection } from '@nats-io/transport-node';
import type pg from 'pg';
import type { RelayResidency } from './relay.ts';
import { partitionByResidency, type EventMetadata, type EventStore, type StoredEvent } from './store.ts';
import { encodeBatch } from './wire.ts';

type Queryable = Pick<pg.ClientBase, 'query'>;

/**
 * The event a dead letter of alias `d` names, as a LATERAL subquery: from the hot table by its
 * id, else from the archive at its position (the archive's key), if it holds that event; the
 * hot row when both do (a planted copy), as every reader of leaves takes it.
 */
const STORED_EVENT = (d: string): string => `(
  SELECT * FROM (
    SELECT 0 AS archived, h.position, h.transaction_id, h.partition, h.stream_type, h.stream_id, h.version, h.type, h.schema_version, h.data, h.metadata, h.recorded_at
      FROM events.events h WHERE h.event_id = ${d}.event_id
    UNION ALL
    SELECT 1, a.position, a.transaction_id, a.partition, a.stream_type, a.stream_id, a.version, a.type, a.schema_version, a.data, a.metadata, a.recorded_at
      FROM events.archived_events a WHERE a.position = ${d}.position AND a.event_id = ${d}.event_id) s
  ORDER BY s.archived LIMIT 1)`;

export interface DeadLetter {
  consumer: string;
  eventId: string;
  position: bigint;
  attempts: number;
  error: string;
  deadAt: Date;
  replayedAt: Date | null;
  /** From the event store (the hot table or the archive); null if it no longer has the event (retention deleted it). */
  streamType: string | null;
  streamId: string | null;
  version: number | null;
  type: string | null;
}

export interface ListDeadLettersOptions {
  /** One consumer's, or several consumers'; every consumer's by default. */
  consumer?: string | readonly string[];
  /** Only those not replayed since they were dead-lettered. */
  pendingOnly?: boolean;
  /** At most this many, oldest first (default 1000). */
  limit?: number;
}

/** Dead-letter lists and replays are bounded: an operator works through them in rounds. */
export const DEAD_LETTERS_LIMIT_DEFAULT = 1000;
const DEAD_LETTERS_LIMIT_MAX = 100_000;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A consumer option as the array the queries take, or null for every consumer. */
function consumersOf(consumer: string | readonly string[] | undefined): string[] | null {
  if (consumer === undefined) return null;
  return typeof consumer === 'string' ? [consumer] : [...consumer];
}

function limitOf(limit: number | undefined): number {
  const n = limit ?? DEAD_LETTERS_LIMIT_DEFAULT;
  if (!Number.isInteger(n) || n < 1 || n > DEAD_LETTERS_LIMIT_MAX) throw new RangeError(`limit must be 1..${DEAD_LETTERS_LIMIT_MAX}`);
  return n;
}

export async function listDeadLetters(db: Queryable, options: ListDeadLettersOptions = {}): Promise<DeadLetter[]> {
  const r = await db.query<{
    consumer: string;
    event_id: string;
    position: string;
    attempts: number;
    error: string;
    dead_at: Date;
    replayed_at: Date | null;
    stream_type: string | null;
    stream_id: string | null;
    version: number | null;
    type: string | null;
  }>(
    `SELECT d.consumer, d.event_id::text, d.position::text, d.attempts, d.error, d.dead_at, d.replayed_at,
            e.stream_type, e.stream_id, e.version, e.type
       FROM events.dead_letters d LEFT JOIN LATERAL ${STORED_EVENT('d')} e ON true
      WHERE ($1::text[] IS NULL OR d.consumer = ANY ($1::text[])) AND (NOT $2 OR d.replayed_at IS NULL)
      ORDER BY d.dead_at, d.consumer, d.position
      LIMIT $3`,
    [consumersOf(options.consumer), options.pendingOnly === true, limitOf(options.limit)],
  );
  return r.rows.map((x) => ({
    consumer: x.consumer,
    eventId: x.event_id,
    position: BigInt(x.position),
    attempts: x.attempts,
    error: x.error,
    deadAt: x.dead_at,
    replayedAt: x.replayed_at,
    streamType: x.stream_type,
    streamId: x.stream_id,
    version: x.version,
    type: x.type,
  }));
}

/** A message a consumer could not decode as a batch (events.undecodable_messages). */
export interface UndecodableMessage {
  consumer: string;
  /** Its sequence in the event stream, and the subject it came on. */
  streamSequence: bigint;
  subject: string;
  error: string;
  /** Its size in bytes, and the first 4 KiB of it (the dead-letter stream holds all of it, or as much as fits under the broker's max_payload). */
  size: number;
  head: Buffer;
  deadAt: Date;
}

/** The undecodable messages, oldest first, of one consumer, several, or all. */
export async function listUndecodableMessages(
  db: Queryable,
  options: { consumer?: string | readonly string[] | undefined; limit?: number | undefined } = {},
): Promise<UndecodableMessage[]> {
  const r = await db.query<{ consumer: string; stream_sequence: string; subject: string; error: string; size: number; head: Buffer; dead_at: Date }>(
    `SELECT consumer, stream_sequence::text, subject, error, size, head, dead_at
       FROM events.undecodable_messages
      WHERE $1::text[] IS NULL OR consumer = ANY ($1::text[])
      ORDER BY dead_at, consumer, stream_sequence
      LIMIT $2`,
    [consumersOf(options.consumer), limitOf(options.limit)],
  );
  return r.rows.map((x) => ({
    consumer: x.consumer,
    streamSequence: BigInt(x.stream_sequence),
    subject: x.subject,
    error: x.error,
    size: x.size,
    head: x.head,
    deadAt: x.dead_at,
  }));
}

export interface ReplayDeadLettersOptions {
  pool: pg.Pool;
  nats: NatsConnection;
  store: EventStore;
  /** The event stream and its subject prefix (the relay's). */
  streamName: string;
  subjectPrefix: string;
  consumer: string;
  /** Only these events; every pending dead letter of the consumer (up to `limit`) by default. */
  eventIds?: readonly string[];
  limit?: number;
  publishTimeoutMs?: number;
  /** The relay's residency settings: an event its policy forbids at the broker is withheld, not published. */
  residency?: RelayResidency;
}

export type ReplayStatus =
  /** Published; the broker stored it. */
  | 'published'
  /** Published with an id the broker had seen within its window: this dead letter was replayed before. */
  | 'duplicate'
  /** The consumer's inbox already has it: marked replayed, nothing published. */
  | 'already_handled'
  /** The store does not have the event: nothing published, not marked. */
  | 'event_missing'
  /** Named in `eventIds` but not a pending dead letter of the consumer. */
  | 'not_dead_lettered'
  /** The residency policy forbids its data at the broker's location: nothing published, not marked (`reason` says why). */
  | 'withheld';

export interface ReplayOutcome {
  eventId: string;
  status: ReplayStatus;
  msgId: string | null;
  /** The stream sequence the broker stored it at. */
  seq: number | null;
  /** Why it was withheld. */
  reason?: string;
}

interface PendingRow {
  event_id: string;
  dead_at_text: string;
  dead_at_us: string;
  handled: boolean;
  position: string | null;
  transaction_id: string | null;
  partition: number | null;
  stream_type: string | null;
  stream_id: string | null;
  version: number | null;
  type: string | null;
  schema_version: number | null;
  data: Record<string, unknown> | null;
  metadata: EventMetadata | null;
  recorded_at: Date | null;
}

/** Re-publishes a consumer's pending dead letters, oldest position first, and marks them replayed. */
export async function replayDeadLetters(options: ReplayDeadLettersOptions): Promise<ReplayOutcome[]> {
  const { pool, nats, store, streamName, subjectPrefix, consumer } = options;
  const registered = await pool.query('SELECT 1 FROM events.consumers WHERE name = $1', [consumer]);
  if (registered.rowCount === 0) throw new RangeError(`consumer ${consumer} is not registered in events.consumers`);
  for (const id of options.eventIds ?? []) if (!UUID.test(id)) throw new RangeError(`${id} is not an event id (a UUID)`);
  const r = await pool.query<PendingRow>(
    `SELECT d.event_id::text, d.dead_at::text AS dead_at_text,
            (extract(epoch FROM d.dead_at) * 1000000)::bigint::text AS dead_at_us,
            coalesce(events.inbox_handled(d.consumer, d.event_id, e.transaction_id, e.position), false) AS handled,
            e.position::text, e.transaction_id::text, e.partition, e.stream_type, e.stream_id, e.version, e.type,
            e.schema_version, e.data, e.metadata, e.recorded_at
       FROM events.dead_letters d LEFT JOIN LATERAL ${STORED_EVENT('d')} e ON true
      WHERE d.consumer = $1 AND d.replayed_at IS NULL AND ($2::uuid[] IS NULL OR d.event_id = ANY($2::uuid[]))
      ORDER BY d.position
      LIMIT $3`,
    [
      consumer,
      options.eventIds === undefined ? null : [...options.eventIds],
      limitOf(options.limit ?? Math.max(options.eventIds?.length ?? 0, DEAD_LETTERS_LIMIT_DEFAULT)),
    ],
  );
  const js = jetstream(nats, { timeout: options.publishTimeoutMs ?? 5000 });
  const outcomes: ReplayOutcome[] = [];
  const markReplayed = async (eventId: string, deadAtText: string): Promise<void> => {
    // Only this generation of the dead letter: if the consumer dead-lettered the event again
    // meanwhile, that newer dead letter stays pending.
    await pool.query(
      `UPDATE events.dead_letters SET replayed_at = now()
        WHERE consumer = $1 AND event_id = $2 AND dead_at = $3::timestamptz AND replayed_at IS NULL`,
      [consumer, eventId, deadAtText],
    );
  };
  for (const row of r.rows) {
    if (row.handled) {
      await markReplayed(row.event_id, row.dead_at_text);
      outcomes.push({ eventId: row.event_id, status: 'already_handled', msgId: null, seq: null });
      continue;
    }
    if (row.position === null || row.partition === null || row.stream_type === null || row.stream_id === null) {
      outcomes.push({ eventId: row.event_id, status: 'event_missing', msgId: null, seq: null });
      continue;
    }
    const event: StoredEvent = {
      position: BigInt(row.position),
      transactionId: BigInt(row.transaction_id ?? '0'),
      partition: row.partition,
      id: row.event_id,
      streamType: row.stream_type,
      streamId: row.stream_id,
      version: row.version ?? 0,
      type: row.type ?? '',
      schemaVersion: row.schema_version ?? 1,
      data: row.data ?? {},
      metadata: row.metadata ?? {},
      recordedAt: row.recorded_at ?? new Date(0),
    };
    // The partition is a pure function of the stream: a stored one that disagrees means the
    // store's settings changed under it, and publishing would break per-stream order.
    const expected = store.partitionOf(event.streamType, event.streamId);
    if (expected !== event.partition) {
      throw new Error(`event ${event.id} is stored in partition ${event.partition}, but its stream maps to ${expected}`);
    }
    if (options.residency !== undefined) {
      const { withheld } = await partitionByResidency(pool, options.residency.policy, [event], options.residency.location, 'replicate');
      const refusal = withheld[0];
      if (refusal !== undefined) {
        outcomes.push({ eventId: event.id, status: 'withheld', msgId: null, seq: null, reason: refusal.error.message });
        continue;
      }
    }
    const msgId = `replay:${consumer}:${event.id}:${row.dead_at_us}`;
    const h = headers();
    h.set('Ledgerline-Events', '1');
    h.set('Ledgerline-Replay-For', consumer);
    const ack = await js.publish(`${subjectPrefix}.p${event.partition}`, encodeBatch([event]), {
      msgID: msgId,
      headers: h,
      expect: { streamName },
    });
    await markReplayed(event.id, row.dead_at_text);
    outcomes.push({ eventId: event.id, status: ack.duplicate ? 'duplicate' : 'published', msgId, seq: ack.seq });
  }
  if (options.eventIds !== undefined) {
    const found = new Set(r.rows.map((x) => x.event_id));
    for (const id of options.eventIds) {
      if (!found.has(id.toLowerCase())) outcomes.push({ eventId: id, status: 'not_dead_lettered', msgId: null, seq: null });
    }
  }
  return outcomes;
}

/**
 * The event store on PostgreSQL. Appends run inside the caller's transaction, so events commit
 * or roll back with the state change they describe.
 */
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type pg from 'pg';
import { v7 as uuidv7 } from 'uuid';

type Queryable = Pick<pg.ClientBase, 'query'>;

/** Who and why: carried from the first command through every hop. */
export interface EventMetadata {
  correlationId?: string;
  causationId?: string;
  /** The user or service on whose behalf the event happened. */
  actor?: string;
  /** W3C trace context of the operation that appended the event. */
  traceparent?: string;
  tracestate?: string;
}

export interface NewEvent {
  /** UUIDv7 by default; a caller-chosen id makes the append itself idempotent. */
  id?: string;
  type: string;
  schemaVersion?: number;
  /** Must be JSON: amounts as strings, never bigint. */
  data: Record<string, unknown>;
  metadata?: EventMetadata;
}

export interface StoredEvent {
  position: bigint;
  transactionId: bigint;
  partition: number;
  id: string;
  streamType: string;
  streamId: string;
  version: number;
  type: string;
  schemaVersion: number;
  data: Record<string, unknown>;
  metadata: EventMetadata;
  recordedAt: Date;
}

/** Where a reader stands in the global order: (transaction id, position), exclusive. */
export interface Checkpoint {
  transactionId: bigint;
  position: bigint;
}

export const CHECKPOINT_START: Checkpoint = { transactionId: 0n, position: 0n };

/** The version an append expects the stream to be at. */
export type ExpectedVersion = number | 'no_stream' | 'any';

export class ConcurrencyError extends Error {
  override readonly name: string = 'ConcurrencyError';
  readonly streamType: string;
  readonly streamId: string;
  readonly expected: ExpectedVersion;
  readonly actual: number;
  constructor(streamType: string, streamId: string, expected: ExpectedVersion, actual: number) {
    super(`stream ${streamType}/${streamId} is at version ${actual}, expected ${String(expected)}`);
    this.streamType = streamType;
    this.streamId = streamId;
    this.expected = expected;
    this.actual = actual;
  }
}

/**
 * The appending transaction is older (has a smaller transaction id) than a transaction that
 * already committed events to the same stream. Appending would put the new version before the
 * old ones in the global order, so readers would see the stream out of order. Nothing was
 * written; roll back and retry the whole transaction: the retry gets a newer transaction id.
 */
export class StreamOrderConflictError extends ConcurrencyError {
  override readonly name = 'StreamOrderConflictError';
}

/** One event with its stream and version, for callers that assign versions themselves. */
export interface StreamEvent {
  streamType: string;
  streamId: string;
  version: number;
  event: NewEvent;
}

const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));

export async function migrateEvents(databaseUrl: string): Promise<void> {
  await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    schema: 'events',
    createSchema: true,
    migrationsSchema: 'events',
    migrationsTable: 'migrations',
    advisoryLockMode: 'wait',
    checkOrder: true,
    log: () => {},
  });
}

const EVENT_COLUMNS = `position::text, transaction_id::text, partition, event_id::text, stream_type, stream_id,
  version, type, schema_version, data, metadata, recorded_at`;

interface EventRecord {
  position: string;
  transaction_id: string;
  partition: number;
  event_id: string;
  stream_type: string;
  stream_id: string;
  version: number;
  type: string;
  schema_version: number;
  data: Record<string, unknown>;
  metadata: EventMetadata;
  recorded_at: Date;
}

function toEvent(r: EventRecord): StoredEvent {
  return {
    position: BigInt(r.position),
    transactionId: BigInt(r.transaction_id),
    partition: r.partition,
    id: r.event_id,
    streamType: r.stream_type,
    streamId: r.stream_id,
    version: r.version,
    type: r.type,
    schemaVersion: r.schema_version,
    data: r.data,
    metadata: r.metadata,
    recordedAt: r.recorded_at,
  };
}

/** FNV-1a: a stable hash, the same in every process and every release. */
function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i += 1) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/** Most events in one append statement: bounds the statement and its parameter arrays. */
export const APPEND_EVENTS_MAX = 10_000;

export class EventStore {
  readonly partitions: number;

  private constructor(partitions: number) {
    this.partitions = partitions;
  }

  /** Reads the store's fixed settings. Run `migrateEvents` first. */
  static async open(db: Queryable): Promise<EventStore> {
    const r = await db.query<{ partitions: number }>('SELECT partitions FROM events.settings');
    const partitions = r.rows[0]?.partitions;
    if (partitions === undefined) throw new Error('events.settings is empty: run migrateEvents first');
    return new EventStore(partitions);
  }

  /** Every event of a stream lands in one partition, so one relay publishes it in order. */
  partitionOf(streamType: string, streamId: string): number {
    return fnv1a(`${streamType}/${streamId}`) % this.partitions;
  }

  /**
   * Appends to one stream inside the caller's transaction, checking the expected version.
   * Concurrent appends to the same stream are serialized by a transaction-scoped advisory
   * lock, so a conflict is reported as ConcurrencyError and never aborts the transaction.
   */
  async append(
    db: Queryable,
    stream: { type: string; id: string },
    events: NewEvent[],
    options: { expectedVersion: ExpectedVersion },
  ): Promise<{ version: number; positions: bigint[] }> {
    if (events.length === 0) throw new RangeError('append needs at least one event');
    await db.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [`${stream.type}/${stream.id}`]);
    const { rows } = await db.query<{ version: number | null; newer: boolean | null }>(
      `SELECT max(version) AS version, bool_or(transaction_id > pg_current_xact_id()) AS newer
         FROM events.events WHERE stream_type = $1 AND stream_id = $2`,
      [stream.type, stream.id],
    );
    const current = rows[0]?.version ?? 0;
    if (rows[0]?.newer === true) {
      throw new StreamOrderConflictError(stream.type, stream.id, options.expectedVersion, current);
    }
    const { expectedVersion } = options;
    const ok =
      expectedVersion === 'any' ||
      (expectedVersion === 'no_stream' && current === 0) ||
      (typeof expectedVersion === 'number' && current === expectedVersion);
    if (!ok) throw new ConcurrencyError(stream.type, stream.id, expectedVersion, current);
    const positions = await this.appendMany(
      db,
      events.map((event, i) => ({ streamType: stream.type, streamId: stream.id, version: current + i + 1, event })),
    );
    return { version: current + events.length, positions };
  }

  /**
   * Appends events whose versions the caller has already decided, in one statement. The
   * unique (stream, version) constraint still guards against two writers choosing the same
   * version: the loser's statement fails and its transaction rolls back.
   */
  async appendMany(db: Queryable, entries: StreamEvent[]): Promise<bigint[]> {
    if (entries.length === 0) return [];
    if (entries.length > APPEND_EVENTS_MAX) throw new RangeError(`at most ${APPEND_EVENTS_MAX} events per append`);
    // A stream that already has events must not receive one from an older transaction (see
    // StreamOrderConflictError). New streams (version 1) cannot have that problem.
    const continuing = entries.filter((e) => e.version > 1);
    if (continuing.length > 0) {
      const r = await db.query<{ stream_type: string; stream_id: string; version: number }>(
        `SELECT e.stream_type, e.stream_id, e.version FROM events.events e
           JOIN unnest($1::text[], $2::text[]) AS s(stream_type, stream_id)
             ON e.stream_type = s.stream_type AND e.stream_id = s.stream_id
          WHERE e.transaction_id > pg_current_xact_id() LIMIT 1`,
        [continuing.map((e) => e.streamType), continuing.map((e) => e.streamId)],
      );
      const newer = r.rows[0];
      if (newer !== undefined) {
        throw new StreamOrderConflictError(newer.stream_type, newer.stream_id, 'any', newer.version);
      }
    }
    const r = await db.query<{ position: string }>(
      `INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, schema_version, data, metadata)
       SELECT * FROM unnest($1::smallint[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::text[], $7::smallint[],
                            $8::jsonb[], $9::jsonb[])
       RETURNING position::text`,
      [
        entries.map((e) => this.partitionOf(e.streamType, e.streamId)),
        entries.map((e) => e.event.id ?? uuidv7()),
        entries.map((e) => e.streamType),
        entries.map((e) => e.streamId),
        entries.map((e) => e.version),
        entries.map((e) => e.event.type),
        entries.map((e) => e.event.schemaVersion ?? 1),
        entries.map((e) => JSON.stringify(e.event.data)),
        entries.map((e) => JSON.stringify(e.event.metadata ?? {})),
      ],
    );
    return r.rows.map((x) => BigInt(x.position));
  }

  async streamVersion(db: Queryable, streamType: string, streamId: string): Promise<number> {
    const r = await db.query<{ version: number | null }>(
      'SELECT max(version) AS version FROM events.events WHERE stream_type = $1 AND stream_id = $2',
      [streamType, streamId],
    );
    return r.rows[0]?.version ?? 0;
  }

  async readStream(db: Queryable, streamType: string, streamId: string, fromVersion = 1): Promise<StoredEvent[]> {
    const r = await db.query<EventRecord>(
      `SELECT ${EVENT_COLUMNS} FROM events.events
        WHERE stream_type = $1 AND stream_id = $2 AND version >= $3 ORDER BY version`,
      [streamType, streamId, fromVersion],
    );
    return r.rows.map(toEvent);
  }

  /**
   * The next events in the global order after `after`: by (transaction id, position), and
   * only from transactions older than every transaction still running. A transaction that
   * commits late therefore appears after the reader has waited for it, never behind it.
   */
  async readAll(
    db: Queryable,
    options: { after: Checkpoint; limit: number; partition?: number },
  ): Promise<StoredEvent[]> {
    const { after, limit, partition } = options;
    const r = await db.query<EventRecord>(
      // ORDER BY the table's columns (e.*), not the text renderings of the same name.
      `SELECT ${EVENT_COLUMNS} FROM events.events e
        WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2::bigint)
          AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
          AND ($3::smallint IS NULL OR e.partition = $3::smallint)
        ORDER BY e.transaction_id, e.position
        LIMIT $4`,
      [after.transactionId.toString(), after.position.toString(), partition ?? null, limit],
    );
    return r.rows.map(toEvent);
  }
}

export function checkpointOf(event: StoredEvent): Checkpoint {
  return { transactionId: event.transactionId, position: event.position };
}

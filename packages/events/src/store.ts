/**
 * The event store on PostgreSQL. Appends run inside the caller's transaction, so events commit
 * or roll back with the state change they describe.
 */
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type pg from 'pg';
import { newUuidV7 } from './ids.ts';
import { sqlArrayLiteral, sqlLiteral } from './sql.ts';
import { readHorizon } from './horizon.ts';
import { encodeEnvelopes, envelopeJson } from './wire.ts';

type Queryable = Pick<pg.ClientBase, 'query'>;

/** Who and why: carried from the first command through every hop. */
export interface EventMetadata {
  correlationId?: string;
  causationId?: string;
  /** The user or service on whose behalf the event happened. */
  actor?: string;
  /**
   * The network address the request that caused the event came from. With it the event is a
   * complete audit record of that request (PCI DSS 10.2.2's origination), so a service need
   * not record the request a second time.
   */
  ip?: string;
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
  constructor(streamType: string, streamId: string, expected: ExpectedVersion, actual: number, options?: ErrorOptions) {
    super(`stream ${streamType}/${streamId} is at version ${actual}, expected ${String(expected)}`, options);
    this.streamType = streamType;
    this.streamId = streamId;
    this.expected = expected;
    this.actual = actual;
  }
}

/**
 * A stream holds one version twice: in the hot table and in the archive, which retention never
 * does (it moves a stream in one statement). Read as it is, the stream would fold that event
 * twice, so it is not read; the copy must be found and removed (`audit verify` reports a copy
 * in the archive as `event_duplicated`).
 */
export class StreamCorruptError extends Error {
  override readonly name: string = 'StreamCorruptError';
  readonly streamType: string;
  readonly streamId: string;
  readonly version: number;
  constructor(streamType: string, streamId: string, version: number) {
    super(`stream ${streamType}/${streamId} holds version ${version} both in events.events and in events.archived_events; it is not read until the copy is removed`);
    this.streamType = streamType;
    this.streamId = streamId;
    this.version = version;
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

/**
 * Data residency: for each data region (the jurisdiction whose law governs a stream), the
 * locations (deployment regions) allowed to store, read or receive it. A region missing from
 * the map may go nowhere, so a typo refuses instead of leaking.
 */
export interface ResidencyPolicy {
  allowed: Readonly<Record<string, readonly string[]>>;
}

export type ResidencyOperation = 'write' | 'read' | 'replicate' | 'export';

/** A write, read, replication or export that the residency policy forbids. Nothing was done. */
export class ResidencyViolationError extends Error {
  override readonly name = 'ResidencyViolationError';
  readonly streamType: string;
  readonly streamId: string;
  readonly dataRegion: string;
  readonly location: string;
  readonly operation: ResidencyOperation;
  readonly allowedLocations: readonly string[];
  constructor(
    stream: { streamType: string; streamId: string; dataRegion: string },
    operation: ResidencyOperation,
    location: string,
    allowedLocations: readonly string[],
  ) {
    const where = allowedLocations.length === 0 ? 'nowhere (the policy does not name this region)' : allowedLocations.join(', ');
    super(
      `residency: ${operation} of stream ${stream.streamType}/${stream.streamId} refused: its data is ` +
        `${stream.dataRegion}-resident and may not go to ${location}; allowed: ${where}`,
    );
    this.streamType = stream.streamType;
    this.streamId = stream.streamId;
    this.dataRegion = stream.dataRegion;
    this.location = location;
    this.operation = operation;
    this.allowedLocations = allowedLocations;
  }
}

/**
 * A stream's region tag differs from the region an append asked for, or (`tagged` null) the
 * stream already has events written without a tag: those may have been read or replicated
 * anywhere, so a tag now would claim a residency the stream never had. Nothing was written.
 */
export class StreamRegionMismatchError extends Error {
  override readonly name = 'StreamRegionMismatchError';
  constructor(streamType: string, streamId: string, tagged: string | null, requested: string) {
    super(
      tagged === null
        ? `residency: stream ${streamType}/${streamId} already has events without a region; an append may not tag it as ${requested} ` +
            '(its earlier events were not held to any region: move them to a new stream instead)'
        : `residency: stream ${streamType}/${streamId} is tagged ${tagged}; an append may not re-tag it as ${requested}`,
    );
  }
}

/** The locations a data region may go to; empty when the policy does not name the region. */
export function allowedLocations(policy: ResidencyPolicy, dataRegion: string): readonly string[] {
  return Object.hasOwn(policy.allowed, dataRegion) ? (policy.allowed[dataRegion] ?? []) : [];
}

/**
 * Throws ResidencyViolationError unless `dataRegion` may go to `location`. A null region is an
 * untagged stream, which the policy does not restrict. This is the check that replication
 * paths (the outbox relay, exports) call for each event they send elsewhere.
 */
export function assertResidency(
  policy: ResidencyPolicy,
  stream: { streamType: string; streamId: string; region: string | null },
  operation: ResidencyOperation,
  location: string,
): void {
  if (stream.region === null) return;
  const allowed = allowedLocations(policy, stream.region);
  if (!allowed.includes(location)) {
    throw new ResidencyViolationError({ ...stream, dataRegion: stream.region }, operation, location, allowed);
  }
}

/** The region tags of the given streams (untagged streams are absent from the map). */
export async function streamRegions(
  db: Queryable,
  streams: ReadonlyArray<{ streamType: string; streamId: string }>,
): Promise<Map<string, string>> {
  if (streams.length === 0) return new Map();
  const unique = uniqueStreams(streams);
  const r = await db.query<{ stream_type: string; stream_id: string; region: string }>(
    `SELECT r.stream_type, r.stream_id, r.region FROM events.stream_regions r
       JOIN unnest($1::text[], $2::text[]) AS s(stream_type, stream_id)
         ON r.stream_type = s.stream_type AND r.stream_id = s.stream_id`,
    [unique.map((s) => s.streamType), unique.map((s) => s.streamId)],
  );
  return new Map(r.rows.map((x) => [`${x.stream_type}/${x.stream_id}`, x.region]));
}

/**
 * Splits events bound for `location` into those the policy lets go there and those it must
 * withhold, each with the error that says why. Replication paths (the outbox relay publishing
 * to another region, exports) call this before sending anything. One query per call.
 */
export async function partitionByResidency<E extends { streamType: string; streamId: string }>(
  db: Queryable,
  policy: ResidencyPolicy,
  events: readonly E[],
  location: string,
  operation: ResidencyOperation = 'replicate',
): Promise<{ allowed: E[]; withheld: Array<{ event: E; error: ResidencyViolationError }> }> {
  const regions = await streamRegions(db, events);
  const allowed: E[] = [];
  const withheld: Array<{ event: E; error: ResidencyViolationError }> = [];
  for (const event of events) {
    try {
      assertResidency(policy, { ...event, region: regions.get(`${event.streamType}/${event.streamId}`) ?? null }, operation, location);
      allowed.push(event);
    } catch (error) {
      if (!(error instanceof ResidencyViolationError)) throw error;
      withheld.push({ event, error });
    }
  }
  return { allowed, withheld };
}

/**
 * Of events already read, those still in the store (not deleted by retention, by position), each
 * checked against the policy for `location`: one READ COMMITTED statement, after the events were
 * read, reads which of them are gone together with their streams' region tags, so the two
 * agree. Retention
 * deletes a stream's events and its tag in one transaction: a stream it deleted after the read is
 * gone from both, and its events are left out, as deleted data. Reading the tags alone (as
 * `streamRegions` does) would find no tag and judge such a stream untagged, and its events,
 * already read, would go wherever the caller was: exports did that until 2026-12-07 (a review
 * forced it), `EventStore.readAll` until 2026-12-08. Presence is by position, not by stream: a
 * deleted stream continued later under a new tag (`tagStream` takes a stream with no events)
 * must not lend its new region to its old events. (One REPEATABLE READ snapshot for the read
 * and the check, tried first for exports, made the read horizon the cluster's oldest
 * transaction (`readHorizon`), and exports ended short while any database of the server had
 * one open.) Throws the first refusal; returns the rest in their order.
 */
export async function presentEventsAllowed<E extends { position: bigint; streamType: string; streamId: string }>(
  db: Queryable,
  policy: ResidencyPolicy,
  events: readonly E[],
  operation: ResidencyOperation,
  location: string,
): Promise<E[]> {
  if (events.length === 0) return [];
  // Gone: retention is the only deleter of events, and records each deleted event's position in
  // events.deleted_events in the statement that deletes it, so an event is gone exactly when its
  // position is there. Judged per event, with one lookup by key of all the page's positions: a
  // stream's events can be gone in part (an append that does not take the stream's lock, as
  // appendMany does not, can commit an event retention's delete did not see; judging a stream
  // by its first event dropped that live event, a review proved). Tags per stream, the join
  // `streamRegions` makes. The statement returns only the tagged streams and the gone events.
  // (Presence probes of the events tables per event, as first written, made the planner hash
  // the whole events table for every page: ten times the read's cost, a review measured.)
  const first = new Map<string, E>();
  for (const e of events) {
    const key = `${e.streamType}/${e.streamId}`;
    if (!first.has(key)) first.set(key, e);
  }
  const streams = [...first.values()];
  const r = await db.query<{ n: string | null; region: string | null; gone: string | null }>(
    `SELECT u.n::text, t.region, NULL::text AS gone
       FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(stream_type, stream_id, n)
       JOIN events.stream_regions t ON t.stream_type = u.stream_type AND t.stream_id = u.stream_id
     UNION ALL
     SELECT NULL, NULL, x.position::text FROM events.deleted_events x WHERE x.position = ANY($3::bigint[])`,
    [streams.map((e) => e.streamType), streams.map((e) => e.streamId), events.map((e) => e.position.toString())],
  );
  const regions = new Map<number, string>();
  const gone = new Set<string>();
  for (const x of r.rows) {
    if (x.gone !== null) gone.add(x.gone);
    else if (x.n !== null && x.region !== null) regions.set(Number(x.n) - 1, x.region);
  }
  const present = gone.size === 0 ? [...events] : events.filter((e) => !gone.has(e.position.toString()));
  const live = new Set(present.map((e) => `${e.streamType}/${e.streamId}`));
  // Each stream with an event still here, in the page's order; a stream wholly gone is not judged.
  streams.forEach((e, i) => {
    if (!live.has(`${e.streamType}/${e.streamId}`)) return;
    assertResidency(policy, { streamType: e.streamType, streamId: e.streamId, region: regions.get(i) ?? null }, operation, location);
  });
  return present;
}

/** Where this store runs and the policy it enforces on every append and read. */
export interface StoreResidency {
  policy: ResidencyPolicy;
  /** The deployment region of this store's database, e.g. `eu-west-1`. */
  location: string;
}

/** Read events up to a point in the past: a global checkpoint (inclusive) or a time. */
export type AsOf = { checkpoint: Checkpoint } | { time: Date };

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

/** The columns of an event row, alike in `events.events` and `events.archived_events`, by name. */
const GLOBAL_ORDER_COLUMNS = 'position, transaction_id, partition, event_id, stream_type, stream_id, version, type, schema_version, data, metadata, recorded_at';

/** An event row as node-postgres returns it (int8, xid8 and uuid as text). */
export interface EventRecord {
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

/** An event row as a StoredEvent. */
export function toEvent(r: EventRecord): StoredEvent {
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

/**
 * The append statement over its nine columns (`#appendColumns`), given as parameters or as
 * constants: ROWS FROM zips the arrays, in order.
 */
function appendSql(v: string[]): string {
  // v[9], v[10] and v[11]: the continuing streams' types, ids and first versions here, when
  // there are any (see #appendColumns).
  const order = v.length > 9 ? `\n        WHERE events.assert_stream_order(${v[9]}::json, ${v[10]}::json, ${v[11]}::json)` : '';
  return `INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, schema_version, data, metadata)
       SELECT u.partition, u.event_id::uuid, u.stream_type, u.stream_id, u.version, u.type, u.schema_version, u.data, u.metadata
         FROM ROWS FROM (unnest(${v[0]}::smallint[], ${v[4]}::int[], ${v[6]}::smallint[]),
                         json_array_elements_text(${v[1]}::json), json_array_elements_text(${v[2]}::json),
                         json_array_elements_text(${v[3]}::json), json_array_elements_text(${v[5]}::json),
                         jsonb_array_elements(${v[7]}::jsonb), jsonb_array_elements(${v[8]}::jsonb))
              AS u(partition, version, schema_version, event_id, stream_type, stream_id, type, data, metadata)${order}`;
}

/**
 * A non-negative integer as SQL literal text. Anything else is refused, whatever the static
 * types say: a checkpoint read back from JSON, or a caller in plain JavaScript, could pass a
 * string, and this text goes into a simple-protocol query, where a string could end the
 * statement and add another.
 */
function integerLiteral(n: unknown): string {
  if ((typeof n === 'bigint' && n >= 0n) || (typeof n === 'number' && Number.isSafeInteger(n) && n >= 0)) return String(n);
  throw new TypeError(`not a non-negative integer: ${typeof n === 'string' ? JSON.stringify(n) : String(n)}`);
}

/**
 * One partition's next events in the global order after `after`, below the read horizon
 * (`readHorizon`, computed first), as `columns`: one simple-protocol query (`SET LOCAL`, then
 * the read), which PostgreSQL runs as one implicit transaction, so the setting ends with it.
 * Run it outside a transaction block. `types` as node-pg takes them (the relay reads text).
 *
 * Sorting is priced out because the planner, on a table it has not analyzed yet (new,
 * restored, just upgraded) or whose statistics trail its tail, estimates a few hundred rows
 * after the checkpoint, then picks a bitmap scan of every row past it, the other partitions'
 * rows too, and a sort: a cost that grows with the backlog, on every read. Measured alone over
 * 400,000 events of 8 writers, unanalyzed: 22.7–23.9 µs of PostgreSQL CPU an event against 4.7
 * once analyzed, and 3.9 with this. Without a sort, the plan is the walk of the global-order
 * index that stops after `limit` rows. Every value is an integer, checked and written as a
 * literal (the simple protocol takes no parameters); `columns` is the caller's own text.
 */
export async function readPartition<R extends pg.QueryResultRow>(
  db: Queryable,
  columns: string,
  partition: number,
  after: Checkpoint,
  limit: number,
  types?: pg.CustomTypesConfig,
): Promise<R[]> {
  const horizon = await readHorizon(db);
  const text = `SET LOCAL enable_sort = off;
    SELECT ${columns} FROM events.events e
     WHERE (e.transaction_id, e.position) > ('${integerLiteral(after.transactionId)}'::xid8, ${integerLiteral(after.position)}::bigint)
       AND e.transaction_id < '${integerLiteral(horizon)}'::xid8
       AND e.partition = ${integerLiteral(partition)}::smallint
     ORDER BY e.transaction_id, e.position
     LIMIT ${integerLiteral(limit)}`;
  const results = (await db.query(types === undefined ? text : { text, types })) as unknown as Array<pg.QueryResult<R>>;
  const read = results.at(-1);
  if (read === undefined) throw new Error('invariant: the partition read returned no result');
  return read.rows;
}

/** The SQLSTATE of an append refused by its stream-order check (migration 1768100000000). */
export const STREAM_ORDER_CONFLICT_SQLSTATE = 'LL409';

/**
 * The StreamOrderConflictError that a database error stands for, or null: the check travels
 * in the append statement (`appendStatement`), so a caller that sends that statement itself
 * gets the refusal as the server's error and turns it back into the typed one here.
 */
export function streamOrderConflict(error: unknown): StreamOrderConflictError | null {
  if ((error as { code?: unknown } | null)?.code !== STREAM_ORDER_CONFLICT_SQLSTATE) return null;
  let stream: { streamType?: unknown; streamId?: unknown; version?: unknown } = {};
  try {
    stream = JSON.parse(String((error as { detail?: unknown }).detail)) as typeof stream;
  } catch {
    // The message (the cause) still says which stream; the fields stay unknown.
  }
  const text = (v: unknown): string => (typeof v === 'string' ? v : '?');
  return new StreamOrderConflictError(text(stream.streamType), text(stream.streamId), 'any', typeof stream.version === 'number' ? stream.version : 0, { cause: error });
}

/**
 * The SQLSTATE of an append whose first version of a stream does not continue it (migration
 * 1770500000000): the stream's latest version is not the one before.
 */
export const STREAM_VERSION_CONFLICT_SQLSTATE = 'LL412';

/**
 * The ConcurrencyError that a database error stands for, or null: an append that gives a
 * stream's versions (`appendMany`, `appendStatement`) expects the stream at the version before
 * its first, and the statement refuses it (SQLSTATE LL412, the stream in DETAIL) when the
 * stream is elsewhere: a writer that read it before another appended, or a version skipped.
 */
export function streamVersionConflict(error: unknown): ConcurrencyError | null {
  if ((error as { code?: unknown } | null)?.code !== STREAM_VERSION_CONFLICT_SQLSTATE) return null;
  let stream: { streamType?: unknown; streamId?: unknown; expected?: unknown; actual?: unknown } = {};
  try {
    stream = JSON.parse(String((error as { detail?: unknown }).detail)) as typeof stream;
  } catch {
    // The message (the cause) still says which stream; the fields stay unknown.
  }
  const text = (v: unknown): string => (typeof v === 'string' ? v : '?');
  const version = (v: unknown): number => (typeof v === 'number' ? v : 0);
  return new ConcurrencyError(text(stream.streamType), text(stream.streamId), version(stream.expected), version(stream.actual), { cause: error });
}

/** Most events in one append statement: bounds the statement and its parameter arrays. */
export const APPEND_EVENTS_MAX = 10_000;

/**
 * The default of `eventBytesMax`: NATS's default `max_payload` (1 MiB), less 1 KiB for the
 * message's headers (the relay's take about 120 bytes). A broker configured with a smaller
 * `max_payload` needs a store opened with `eventBytesMax` at most that, less 1 KiB.
 */
export const EVENT_BYTES_MAX = 1024 * 1024 - 1024;

/**
 * The bytes of a one-event broker message that do not depend on the event's content: the
 * envelope's keys and punctuation (`envelopeJson`), its numbers, id and time at their widest
 * (a position of 19 digits, a transaction id of 20, a smallint partition, an int version, a
 * smallint schema version, a six-digit year), the quotes of its three strings, and the
 * message's frame (`encodeEnvelopes`). The rest is the strings' JSON and the documents' jsonb
 * text.
 */
export const EVENT_MESSAGE_FIXED_BYTES =
  Buffer.byteLength(
    envelopeJson({
      position: '9'.repeat(19),
      transactionId: '9'.repeat(20),
      partition: '32767',
      id: '00000000-0000-0000-0000-000000000000',
      streamType: '',
      streamId: '',
      version: '2147483647',
      type: '',
      schemaVersion: '-32768',
      data: '',
      metadata: '',
      recordedAt: '+275760-09-13T00:00:00.000Z',
    }),
  ) + encodeEnvelopes(['']).length;

/**
 * An event too large to be published: alone in a broker message, with the relay's frame, it
 * would take more than the store's `eventBytesMax`, and the broker would refuse it (NATS's
 * `max_payload`), holding its partition back. Nothing was written; the caller's transaction is
 * still usable (unless PostgreSQL had to measure the event and found its JSON invalid).
 */
export class EventTooLargeError extends RangeError {
  override readonly name = 'EventTooLargeError';
  readonly streamType: string;
  readonly streamId: string;
  readonly eventType: string;
  /** The event's place in the append's events (0 for the first). */
  readonly index: number;
  /** The message's size (an upper bound on its numbers' width; or, when `atLeast`, a lower bound). */
  readonly bytes: number;
  readonly bytesMax: number;
  constructor(event: { streamType: string; streamId: string; event: { type: string } }, index: number, bytes: number, bytesMax: number, atLeast: boolean) {
    super(
      `event ${index} of the append (${JSON.stringify(event.event.type)} on stream ${event.streamType}/${event.streamId}) would be ` +
        `${atLeast ? 'at least ' : ''}${bytes} bytes on the broker, more than the ${bytesMax} the store allows (eventBytesMax): ` +
        'the relay could not publish it',
    );
    this.streamType = event.streamType;
    this.streamId = event.streamId;
    this.eventType = event.event.type;
    this.index = index;
    this.bytes = bytes;
    this.bytesMax = bytesMax;
  }
}

/** Events whose documents are serialised in one JSON.stringify call, and sized together (see `#appendDocuments`). */
const DOCUMENT_CHUNK = 32;

/**
 * A number as JSON.stringify writes one with an exponent (`1e+300`, `-1.5e-7`). jsonb writes it
 * out in full (`1e+300` as 301 digits), so its text can be far longer than the JSON's. Matched
 * anywhere in a document's JSON, strings included: a match inside a string only makes the bound
 * larger than it need be.
 */
const EXPONENT_NUMBER = /(-?)([0-9]+)(?:\.([0-9]+))?[eE][+-]?([0-9]+)/g;
/**
 * The most bytes of jsonb text one character of such a number can become: `5e-324` (6
 * characters, the least double JSON.stringify writes) is `0.` and 324 digits; `1e+308`, 309
 * digits. A text this many times its length fits under a limit needs no search for them.
 */
const EXPONENT_BYTES_PER_CHAR_MAX = 55;

/**
 * How many more bytes than their JSON the numbers with an exponent in `text` can take as jsonb
 * text: for each, at most its sign, its digits, the exponent's value in zeros, and `0.`
 * (PostgreSQL's numeric keeps the input's scale and writes no exponent).
 */
function exponentExpansion(text: string): number {
  let extra = 0;
  for (const m of text.matchAll(EXPONENT_NUMBER)) {
    const [literal, sign = '', whole = '', fraction = '', exponent = ''] = m;
    extra += Math.max(0, sign.length + whole.length + fraction.length + Number(exponent) + 2 - literal.length);
  }
  return extra;
}

/** What an append's size check reads of each event. */
type SizedEvent = Pick<StreamEvent, 'streamType' | 'streamId' | 'event'>;

/** The append's `data` and `metadata` columns: each a JSON array, one element an event. */
interface AppendDocuments {
  data: string;
  metadata: string;
}

/**
 * Most reads one `readAll` makes in a row when each loses events to retention between its read
 * and its residency check (see readAll). A read loses them only to a deletion that committed in
 * that moment; this many in a row means retention is deleting what the reader is reading, page
 * after page.
 */
const READ_ROUNDS_MAX = 16;

export class EventStore {
  readonly partitions: number;
  /** Null: no residency policy, nothing is checked (tags given to `append` are still kept). */
  readonly residency: StoreResidency | null;
  /**
   * The largest broker message one event may make (its envelope as the relay sends it, alone,
   * in the message's frame; headers not counted): a larger event is refused at append with
   * EventTooLargeError. Default `EVENT_BYTES_MAX`.
   */
  readonly eventBytesMax: number;

  private constructor(partitions: number, residency: StoreResidency | null, eventBytesMax: number) {
    this.partitions = partitions;
    this.residency = residency;
    this.eventBytesMax = eventBytesMax;
  }

  /** Reads the store's fixed settings. Run `migrateEvents` first. */
  static async open(db: Queryable, options: { residency?: StoreResidency; eventBytesMax?: number } = {}): Promise<EventStore> {
    const eventBytesMax = options.eventBytesMax ?? EVENT_BYTES_MAX;
    if (!Number.isSafeInteger(eventBytesMax) || eventBytesMax <= EVENT_MESSAGE_FIXED_BYTES) {
      throw new RangeError(`eventBytesMax must be an integer above ${EVENT_MESSAGE_FIXED_BYTES} (an empty event's message)`);
    }
    const r = await db.query<{ partitions: number }>('SELECT partitions FROM events.settings');
    const partitions = r.rows[0]?.partitions;
    if (partitions === undefined) throw new Error('events.settings is empty: run migrateEvents first');
    return new EventStore(partitions, options.residency ?? null, eventBytesMax);
  }

  /**
   * Refuses (ResidencyViolationError) when any of these streams is tagged with a region that
   * may not be at `location`. One query; nothing to do without a policy.
   */
  async #checkResidency(
    db: Queryable,
    events: ReadonlyArray<{ streamType: string; streamId: string }>,
    operation: ResidencyOperation,
    location: string | undefined,
  ): Promise<void> {
    if (this.residency === null) return;
    const streams = uniqueStreams(events);
    const regions = await streamRegions(db, streams);
    const where = location ?? this.residency.location;
    for (const s of streams) {
      assertResidency(this.residency.policy, { ...s, region: regions.get(`${s.streamType}/${s.streamId}`) ?? null }, operation, where);
    }
  }

  /**
   * Tags a stream with its data region (first time only) inside the caller's transaction.
   * Refuses a different tag, a stream that already has events without one (live or archived),
   * and a region the policy does not allow at this store's location.
   */
  async tagStream(db: Queryable, streamType: string, streamId: string, region: string): Promise<void> {
    if (this.residency !== null) {
      assertResidency(this.residency.policy, { streamType, streamId, region }, 'write', this.residency.location);
    }
    const tagged = async (): Promise<string | undefined> =>
      (await db.query<{ region: string }>('SELECT region FROM events.stream_regions WHERE stream_type = $1 AND stream_id = $2', [streamType, streamId]))
        .rows[0]?.region;
    const r = await db.query<{ region: string }>(
      `WITH existing AS (SELECT region FROM events.stream_regions WHERE stream_type = $1 AND stream_id = $2),
            ins AS (
              INSERT INTO events.stream_regions (stream_type, stream_id, region)
              SELECT $1, $2, $3
               WHERE NOT EXISTS (SELECT 1 FROM existing)
                 AND NOT EXISTS (SELECT 1 FROM events.events WHERE stream_type = $1 AND stream_id = $2)
                 AND NOT EXISTS (SELECT 1 FROM events.archived_events WHERE stream_type = $1 AND stream_id = $2)
              ON CONFLICT (stream_type, stream_id) DO NOTHING RETURNING region)
       SELECT region FROM ins UNION ALL SELECT region FROM existing`,
      [streamType, streamId, region],
    );
    // Nothing back: either another transaction tagged the stream after our snapshot (the
    // insert met its row), or the stream has untagged events.
    const found = r.rows[0]?.region ?? (await tagged()) ?? null;
    if (found !== region) throw new StreamRegionMismatchError(streamType, streamId, found, region);
  }

  /** Every event of a stream lands in one partition, so one relay publishes it in order. */
  partitionOf(streamType: string, streamId: string): number {
    return fnv1a(`${streamType}/${streamId}`) % this.partitions;
  }

  /**
   * Appends to one stream inside the caller's transaction, checking the expected version.
   * Concurrent appends to the same stream are serialized by a transaction-scoped advisory
   * lock, so a conflict is reported as ConcurrencyError and never aborts the transaction. The
   * transaction must be READ COMMITTED, PostgreSQL's default (a RangeError otherwise).
   */
  async append(
    db: Queryable,
    stream: { type: string; id: string },
    events: NewEvent[],
    options: { expectedVersion: ExpectedVersion; region?: string },
  ): Promise<{ version: number; positions: bigint[] }> {
    if (events.length === 0) throw new RangeError('append needs at least one event');
    // Encoded and sized before anything is written (a first region tag, below); the versions
    // are set once the stream's is known.
    const entries: StreamEvent[] = events.map((event) => ({ streamType: stream.type, streamId: stream.id, version: 0, event }));
    const documents = await this.#appendDocuments(db, entries);
    const locked = await db.query<{ isolation: string }>(
      "SELECT pg_advisory_xact_lock(hashtextextended($1, 0)), current_setting('transaction_isolation') AS isolation",
      [`${stream.type}/${stream.id}`],
    );
    // The version read below must see the append that held the lock before us. Under READ
    // COMMITTED it does (each statement takes a new snapshot); under REPEATABLE READ or
    // SERIALIZABLE the snapshot may predate the wait, and the conflict would surface as the
    // stream key's unique violation, which aborts the transaction, instead of ConcurrencyError.
    const isolation = locked.rows[0]?.isolation;
    if (isolation !== 'read committed') {
      throw new RangeError(`EventStore.append runs in READ COMMITTED transactions only (this one is ${String(isolation)}); appendMany takes versions as given`);
    }
    if (options.region !== undefined) await this.tagStream(db, stream.type, stream.id, options.region);
    // The latest event is the newest (see appendMany): one index probe, not the whole stream.
    // A stream with no live event may have been archived (retention): it continues after its
    // archived versions, so that it never starts again at 1 and an aggregate expecting
    // 'no_stream' is refused. The archive is probed only then (a one-time filter), in the same
    // statement.
    const { rows } = await db.query<{ version: number | null; newer: boolean | null }>(
      `WITH live AS (SELECT version, transaction_id FROM events.events
                      WHERE stream_type = $1 AND stream_id = $2 ORDER BY version DESC LIMIT 1)
       SELECT version, transaction_id > pg_current_xact_id() AS newer FROM live
       UNION ALL
       SELECT version, transaction_id > pg_current_xact_id() FROM (
         SELECT version, transaction_id FROM events.archived_events
          WHERE stream_type = $1 AND stream_id = $2 AND NOT EXISTS (SELECT 1 FROM live)
          ORDER BY version DESC LIMIT 1) archived`,
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
    entries.forEach((e, i) => {
      e.version = current + i + 1;
    });
    const positions = await this.#appendEntries(db, entries, documents);
    return { version: current + events.length, positions };
  }

  /**
   * Appends events whose versions the caller has already decided, in one statement. The
   * unique (stream, version) constraint still guards against two writers choosing the same
   * version: the loser's statement fails and its transaction rolls back.
   */
  async appendMany(db: Queryable, entries: StreamEvent[]): Promise<bigint[]> {
    return this.#appendEntries(db, entries, null);
  }

  async #appendEntries(db: Queryable, entries: StreamEvent[], documents: AppendDocuments | null): Promise<bigint[]> {
    const columns = await this.#appendColumns(db, entries, documents);
    if (columns === null) return [];
    try {
      const r = await db.query<{ position: string }>(`${appendSql(columns.map((_, i) => `$${i + 1}`))} RETURNING position::text`, columns);
      return r.rows.map((x) => BigInt(x.position));
    } catch (error) {
      throw streamOrderConflict(error) ?? streamVersionConflict(error) ?? error;
    }
  }

  /**
   * The append of `entries`, checked as `appendMany` checks it, as one statement with its values
   * written in as constants: for a caller that sends it in a simple-protocol query with
   * statements of its own, in the same round trip. The ledger sends its batch's write, this
   * append and COMMIT together (see LedgerEngine). The statement returns nothing; its effect is
   * the caller's transaction's, as with `appendMany`. Null when there is nothing to append.
   * The stream-order check runs in the statement: a conflict is the server's error, SQLSTATE
   * LL409, which `streamOrderConflict` turns into StreamOrderConflictError.
   */
  async appendStatement(db: Queryable, entries: StreamEvent[]): Promise<string | null> {
    const columns = await this.#appendColumns(db, entries, null);
    return columns === null ? null : appendSql(columns.map(sqlLiteral));
  }

  /**
   * Checks an append (size, each event's size, residency) and encodes its nine columns, and the
   * continuing streams for its stream-order check, in `appendSql`'s order. `documents`: the
   * data and metadata columns, already encoded and sized by `#appendDocuments`.
   */
  async #appendColumns(db: Queryable, entries: StreamEvent[], documents: AppendDocuments | null): Promise<string[] | null> {
    if (entries.length === 0) return null;
    if (entries.length > APPEND_EVENTS_MAX) throw new RangeError(`at most ${APPEND_EVENTS_MAX} events per append`);
    const { data, metadata } = documents ?? (await this.#appendDocuments(db, entries));
    await this.#checkResidency(db, entries, 'write', undefined);
    // A stream that already has events must not receive one from an older transaction (see
    // StreamOrderConflictError). New streams (version 1) cannot have that problem. The check of
    // the continuing ones travels in the append statement (events.assert_stream_order, a
    // one-time filter): it reads each stream's latest event, which is its newest, since every
    // append passes the check and a version is taken only once. (Reading every event of the
    // stream instead cost a heap fetch per event of its history: about 5 µs per appended event
    // in bench:events, a fifth of the append. As a query of its own before the append, the
    // check cost a statement, and the ledger a round trip; see the migration.)
    //
    // A stream's versions must also follow on: positions are taken in the array's order, and
    // readers (the relay, and so every consumer) follow positions, so versions given out of
    // order, or a version that skips one a later append then fills, would reach them out of
    // order. Within the append, each stream's versions rise by one in the order given (checked
    // here); its first continues the stream (checked in the statement, with the order: the
    // stream's latest version, live or archived, must be the one before, else SQLSTATE LL412,
    // which `streamVersionConflict` turns into ConcurrencyError; a stream with no event at all,
    // its history deleted or never recorded, may be continued at any version, as the ledger
    // continues a pending transfer's). Until 2026-12-07 `appendMany` took both (a review found
    // them). A stream's first event (version 1) is guarded by the unique (stream, version) key
    // alone, as before.
    const continuing = new Map<string, StreamEvent>();
    const lastVersion = new Map<string, number>();
    for (const e of entries) {
      // Unambiguous: a stream type has no '/'.
      const key = `${e.streamType}/${e.streamId}`;
      const last = lastVersion.get(key);
      if (last === undefined) {
        if (e.version > 1) continuing.set(key, e);
      } else if (e.version !== last + 1) {
        throw new RangeError(`stream ${key}: version ${e.version} follows version ${last} in one append; a stream's versions must rise by one in the order given`);
      }
      lastVersion.set(key, e.version);
    }
    const streams = [...continuing.values()];
    const order =
      streams.length === 0
        ? []
        : [JSON.stringify(streams.map((e) => e.streamType)), JSON.stringify(streams.map((e) => e.streamId)), JSON.stringify(streams.map((e) => e.version))];
    // Integers travel as array literals, text and documents as one JSON array each: one
    // JSON.stringify per column instead of pg's escaping of every element (measured: +7%
    // ledger throughput for the documents alone).
    return [
      sqlArrayLiteral(entries.map((e) => this.partitionOf(e.streamType, e.streamId))),
      JSON.stringify(entries.map((e) => e.event.id ?? newUuidV7())),
      JSON.stringify(entries.map((e) => e.streamType)),
      JSON.stringify(entries.map((e) => e.streamId)),
      sqlArrayLiteral(entries.map((e) => e.version)),
      JSON.stringify(entries.map((e) => e.event.type)),
      sqlArrayLiteral(entries.map((e) => e.event.schemaVersion ?? 1)),
      data,
      metadata,
      ...order,
    ];
  }

  /**
   * The append's `data` and `metadata` columns, as JSON arrays, and the check that no event is
   * too large for a broker message (`eventBytesMax`, EventTooLargeError).
   *
   * The documents are serialised DOCUMENT_CHUNK events at a time, and a chunk's own texts bound
   * the size of each of its events: an event's message is at most EVENT_MESSAGE_FIXED_BYTES,
   * plus 6 bytes for each UTF-16 unit of its stream type, stream id and type (`\u001f` is the
   * widest JSON escape), plus 4.5 for each unit of its documents' JSON (3 bytes of UTF-8, and
   * PostgreSQL's jsonb text, which the relay sends, adds a space after each `:` and `,`: at most
   * one for every two bytes). Under that bound, the usual case by far (32 events of 7 KiB), the
   * append does what it did before the check: one JSON.stringify of each document, on slices of
   * 32, and a join. A chunk over it is serialised again one event at a time (so is the rest of
   * the append), and a single event over it is measured (`#measureEvent`).
   *
   * Numbers JSON.stringify writes with an exponent, which jsonb writes out (`1e+300` as 301
   * digits), are counted at their widest (`exponentExpansion`), searched for only in a chunk
   * whose text could exceed the limit if it were all such numbers (EXPONENT_BYTES_PER_CHAR_MAX
   * times its length), so the usual append never searches. Until 2026-12-07 they were not
   * counted: an event of some 25 KB of them (3,500 × `1e+300`, a megabyte as jsonb) passed
   * here, its message exceeded the broker's max_payload, and the relay held its partition.
   */
  async #appendDocuments(db: Queryable, entries: readonly SizedEvent[]): Promise<AppendDocuments> {
    const room = this.eventBytesMax - EVENT_MESSAGE_FIXED_BYTES;
    const data: string[] = [];
    const metadata: string[] = [];
    let chunk = DOCUMENT_CHUNK;
    for (let start = 0; start < entries.length; ) {
      const end = Math.min(start + chunk, entries.length);
      const d: unknown[] = [];
      const m: unknown[] = [];
      let names = 0;
      for (let i = start; i < end; i += 1) {
        const e = entries[i] as SizedEvent;
        d.push(e.event.data);
        m.push(e.event.metadata ?? {});
        names = Math.max(names, e.streamType.length + e.streamId.length + e.event.type.length);
      }
      const dataText = JSON.stringify(d);
      const metadataText = JSON.stringify(m);
      const units = dataText.length + metadataText.length;
      let bound = 6 * names + 4.5 * units;
      if (6 * names + EXPONENT_BYTES_PER_CHAR_MAX * units > room) bound += exponentExpansion(dataText) + exponentExpansion(metadataText);
      if (bound > room) {
        if (end - start > 1) {
          chunk = 1;
          continue;
        }
        await this.#measureEvent(db, entries[start] as SizedEvent, start, dataText, metadataText);
      }
      if (start === 0 && end === entries.length) return { data: dataText, metadata: metadataText };
      data.push(dataText.slice(1, -1));
      metadata.push(metadataText.slice(1, -1));
      start = end;
    }
    return { data: `[${data.join(',')}]`, metadata: `[${metadata.join(',')}]` };
  }

  /**
   * Refuses an event (EventTooLargeError) whose message would exceed `eventBytesMax`: its size
   * is EVENT_MESSAGE_FIXED_BYTES, its strings' JSON, and its documents as PostgreSQL renders
   * them. `dataText` and `metadataText` are one-element JSON arrays. Its documents' JSON alone
   * may already be too much (jsonb's text is never shorter: the same strings, keys and numbers,
   * and spaces added); otherwise PostgreSQL renders them, once, to count the bytes exactly.
   * Only for events too close to the limit for `#appendDocuments`' bound (a quarter of it).
   */
  async #measureEvent(db: Queryable, e: SizedEvent, index: number, dataText: string, metadataText: string): Promise<void> {
    const names = Buffer.byteLength(JSON.stringify(e.streamType)) + Buffer.byteLength(JSON.stringify(e.streamId)) + Buffer.byteLength(JSON.stringify(e.event.type)) - 6;
    const least = EVENT_MESSAGE_FIXED_BYTES + names + Buffer.byteLength(dataText) + Buffer.byteLength(metadataText) - 4;
    if (least > this.eventBytesMax) throw new EventTooLargeError(e, index, least, this.eventBytesMax, true);
    const r = await db.query<{ bytes: number }>('SELECT octet_length($1::jsonb::text) + octet_length($2::jsonb::text) - 4 AS bytes', [dataText, metadataText]);
    const bytes = EVENT_MESSAGE_FIXED_BYTES + names + (r.rows[0]?.bytes ?? 0);
    if (bytes > this.eventBytesMax) throw new EventTooLargeError(e, index, bytes, this.eventBytesMax, false);
  }

  /**
   * A stream's latest version, 0 for a stream that has none: its hot events', or, when
   * retention has archived all of them, its archived events' (the archive is probed only
   * then), as `append` continues it.
   */
  async streamVersion(db: Queryable, streamType: string, streamId: string): Promise<number> {
    const r = await db.query<{ version: number | null }>(
      `SELECT coalesce((SELECT max(version) FROM events.events WHERE stream_type = $1 AND stream_id = $2),
                       (SELECT max(version) FROM events.archived_events WHERE stream_type = $1 AND stream_id = $2)) AS version`,
      [streamType, streamId],
    );
    return r.rows[0]?.version ?? 0;
  }

  /**
   * A stream's events from `fromVersion`, in version order. `asOf` stops at a past checkpoint
   * or time (time travel); `location` is where the reader is (default: this store's own).
   *
   * Archived events are read with the hot ones: retention moves a stream whole, and `append`
   * continues it after its archived versions, so a stream may live in both tables, its older
   * versions in the archive. Each version is in exactly one of them; one found in both (a row
   * copied by hand) would be folded twice, so it is refused (`StreamCorruptError`).
   */
  async readStream(
    db: Queryable,
    streamType: string,
    streamId: string,
    fromVersion = 1,
    options: { asOf?: AsOf; location?: string } = {},
  ): Promise<StoredEvent[]> {
    await this.#checkResidency(db, [{ streamType, streamId }], 'read', options.location);
    const { asOf } = options;
    const cp = asOf !== undefined && 'checkpoint' in asOf ? asOf.checkpoint : null;
    const time = asOf !== undefined && 'time' in asOf ? asOf.time : null;
    const within = (table: string): string => `SELECT ${EVENT_COLUMNS} FROM ${table} e
        WHERE stream_type = $1 AND stream_id = $2 AND version >= $3
          AND ($4::text IS NULL OR (e.transaction_id, e.position) <= ($4::text::xid8, $5::bigint))
          AND ($6::timestamptz IS NULL OR e.recorded_at <= $6::timestamptz)`;
    const r = await db.query<EventRecord>(
      `SELECT * FROM (${within('events.events')} UNION ALL ${within('events.archived_events')}) e ORDER BY e.version`,
      [streamType, streamId, fromVersion, cp?.transactionId.toString() ?? null, cp?.position.toString() ?? null, time],
    );
    for (let i = 1; i < r.rows.length; i += 1) {
      const version = (r.rows[i] as EventRecord).version;
      if (version === (r.rows[i - 1] as EventRecord).version) throw new StreamCorruptError(streamType, streamId, version);
    }
    const events = r.rows.map(toEvent);
    // And after: the check above ran before the read, and a stream first appended (with its tag,
    // in one transaction) in between would be read unchecked; the events read, their tag is
    // committed too. Deleted meanwhile, they are left out (presentEventsAllowed).
    if (this.residency === null || events.length === 0) return events;
    return presentEventsAllowed(db, this.residency.policy, events, 'read', options.location ?? this.residency.location);
  }

  /** The events at these positions, in global order: what an inline projection just appended. */
  async readPositions(db: Queryable, positions: readonly bigint[]): Promise<StoredEvent[]> {
    const r = await db.query<EventRecord>(
      `SELECT ${EVENT_COLUMNS} FROM events.events e WHERE e.position = ANY($1::bigint[])
        ORDER BY e.transaction_id, e.position`,
      [positions.map(String)],
    );
    return r.rows.map(toEvent);
  }

  /** The global checkpoint of the event at `position` (for "as of position" reads). */
  async checkpointAt(db: Queryable, position: bigint): Promise<Checkpoint | null> {
    // The hot table, else the archive: retention moves a stream whole, and a checkpoint at an
    // archived event is still a place in the global order (replays read the archive too).
    const r = await db.query<{ t: string | null }>(
      `SELECT coalesce((SELECT transaction_id FROM events.events WHERE position = $1),
                       (SELECT transaction_id FROM events.archived_events WHERE position = $1))::text AS t`,
      [position.toString()],
    );
    const t = r.rows[0]?.t;
    return t === undefined || t === null ? null : { transactionId: BigInt(t), position };
  }

  /**
   * The next events in the global order after `after`: by (transaction id, position), and
   * only from transactions older than every transaction of this database still running (see
   * `readHorizon`). A transaction that commits late therefore appears after the reader has
   * waited for it, never behind it.
   *
   * Every partition: the hot table and the archive together (retention moves whole streams
   * into `events.archived_events`, and a projection rebuilt from the start must still see
   * them), merged in one statement, so an event being archived meanwhile is read from exactly
   * one of the two. An event found in both (a row copied by hand; retention moves a stream in
   * one statement) is refused with `StreamCorruptError`, as `readStream` refuses it, rather
   * than applied twice. One partition: the hot table only (`readPartition`, the relay's read:
   * retention archives only what the relay has published).
   *
   * `fields` makes a lean read for replays: each event's `data` then holds only those
   * top-level keys, each as text (`data->>key`: strings as they are, numbers and objects as
   * their JSON text, null as null), `metadata` is empty and `recordedAt` is to the
   * millisecond. With `partition`, the read is `readPartition`'s (its planner setting
   * lasts to the end of a transaction block it runs in: prefer to call it outside one).
   * Decoding whole rows costs the
   * reader several times what PostgreSQL spends finding them; a projection that needs five
   * fields reads three to four times faster this way.
   *
   * Residency (a store with a policy; `location` is where the reader is, default this store's
   * own): a page with an event of a stream whose region may not be at `location` is refused
   * (ResidencyViolationError), and nothing is returned. The check follows the read, in a
   * statement of its own (`presentEventsAllowed`), which reads which events are gone with their
   * streams' tags: events that retention deleted in between (their stream's tag went with them)
   * are left out, as deleted data, rather than judged untagged, or refused. They are left out
   * rather than refused because the reader would only find them gone when it read again, and a
   * refusal would fail a long replay or export for a stream that no longer exists. Its
   * callers take a page shorter than `limit` for the end of what is readable (runBatch's
   * `more`, a replay's last page, swapGeneration's closed gap) and go on from its last event,
   * so a page with events left out is read on, after the last event read, until it is full
   * again or a read comes back short: the page returned is then what a read of `limit` events
   * would return now. Each further read is paid for by an event deleted meanwhile; after
   * READ_ROUNDS_MAX reads in a row lost events this way, the read is refused (plain Error,
   * nothing returned: read again). Without a policy none of this runs: one read, no check.
   */
  async readAll(
    db: Queryable,
    options: { after: Checkpoint; limit: number; partition?: number; location?: string; fields?: readonly string[] },
  ): Promise<StoredEvent[]> {
    let read = await this.#readPage(db, options.after, options.limit, options);
    if (this.residency === null) return read;
    const { policy } = this.residency;
    const where = options.location ?? this.residency.location;
    const page: StoredEvent[] = [];
    for (let round = 1; ; round += 1) {
      const asked = options.limit - page.length;
      const kept = await presentEventsAllowed(db, policy, read, 'read', where);
      page.push(...kept);
      const last = read.at(-1);
      // Nothing left out, or the end of what is readable: the page is complete.
      if (kept.length === read.length || read.length < asked || last === undefined) return page;
      if (round === READ_ROUNDS_MAX) {
        throw new Error(`readAll: ${READ_ROUNDS_MAX} reads in a row lost events to retention between their read and their residency check; nothing was returned, read again`);
      }
      read = await this.#readPage(db, checkpointOf(last), options.limit - page.length, options);
    }
  }

  /** One read of `readAll`, without its residency check. */
  async #readPage(
    db: Queryable,
    after: Checkpoint,
    limit: number,
    options: { partition?: number; fields?: readonly string[] },
  ): Promise<StoredEvent[]> {
    const { partition, fields } = options;
    const columns = fields === undefined ? EVENT_COLUMNS : leanColumns(fields);
    type Row = EventRecord & Record<string, unknown>;
    // One partition: the read that does not depend on the planner's statistics (readPartition).
    // All partitions: the planner's estimate covers every row past the checkpoint, and its plan
    // without help is the merge of the two tables' global-order index walks
    // (events_global_order_idx, archived_events_global_order_idx), stopped after `limit` rows.
    let rows: Row[];
    if (partition === undefined) {
      const horizon = await readHorizon(db);
      rows = (
        await db.query<Row>(
          // ORDER BY the union's columns (e.*), not the text renderings of the same name. The
          // copy check is a primary-key probe per archived row read, after the merge (a subquery
          // inside the union would keep PostgreSQL from merging the two index walks).
          `SELECT ${columns},
                  CASE WHEN e.archived THEN (SELECT h.position FROM events.events h WHERE h.position = e.position LIMIT 1) IS NOT NULL
                       ELSE false END AS copied
             FROM (SELECT ${GLOBAL_ORDER_COLUMNS}, false AS archived FROM events.events
                   UNION ALL SELECT ${GLOBAL_ORDER_COLUMNS}, true FROM events.archived_events) e
            WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2::bigint)
              AND e.transaction_id < $3::text::xid8
            ORDER BY e.transaction_id, e.position
            LIMIT $4`,
          [after.transactionId.toString(), after.position.toString(), horizon.toString(), limit],
        )
      ).rows;
      const copy = rows.find((r) => r.copied === true);
      if (copy !== undefined) throw new StreamCorruptError(copy.stream_type, copy.stream_id, copy.version);
    } else {
      rows = await readPartition<Row>(db, columns, partition, after, limit);
    }
    return fields === undefined ? rows.map(toEvent) : rows.map((row) => toLeanEvent(row, fields));
  }
}

const FIELD_NAME = /^[A-Za-z][A-Za-z0-9_]{0,62}$/;
const NO_METADATA: EventMetadata = Object.freeze({});

function leanColumns(fields: readonly string[]): string {
  const picks = fields.map((f, i) => {
    if (!FIELD_NAME.test(f)) throw new RangeError(`not a field name: ${JSON.stringify(f)}`);
    return `e.data->>'${f}' AS f${i}`;
  });
  // recorded_at as epoch milliseconds: the driver's timestamptz parser alone costs more than
  // all the other columns together.
  return `position::text, transaction_id::text, partition, event_id::text, stream_type, stream_id, version, type,
    schema_version, (extract(epoch FROM recorded_at) * 1000)::float8 AS recorded_ms${picks.length > 0 ? `, ${picks.join(', ')}` : ''}`;
}

function toLeanEvent(r: Omit<EventRecord, 'data' | 'metadata' | 'recorded_at'> & Record<string, unknown>, fields: readonly string[]): StoredEvent {
  const data: Record<string, unknown> = {};
  for (let i = 0; i < fields.length; i += 1) data[fields[i] as string] = r[`f${i}`];
  return toEvent({ ...r, data, metadata: NO_METADATA, recorded_at: new Date(r.recorded_ms as number) });
}

function uniqueStreams(events: ReadonlyArray<{ streamType: string; streamId: string }>): Array<{ streamType: string; streamId: string }> {
  const seen = new Map<string, { streamType: string; streamId: string }>();
  for (const e of events) seen.set(`${e.streamType}/${e.streamId}`, { streamType: e.streamType, streamId: e.streamId });
  return [...seen.values()];
}

export function checkpointOf(event: StoredEvent): Checkpoint {
  return { transactionId: event.transactionId, position: event.position };
}

/**
 * Events as leaves of the tree (migration 1767500000000_event-leaves.sql). The event store
 * already holds every event; the sequencer hashes the rows in PostgreSQL, where they are, and
 * keeps per round one tile: the events' positions in sequence order and their leaf hashes.
 * What a leaf commits to is `audit.event_leaf_data`, written out again here
 * (`eventLeafData`) so that a test, or anyone holding an event, can recompute it.
 */
import { toEvent, type Checkpoint as EventCheckpoint, type EventRecord, type StoredEvent } from '@ledgerline/events';
import { v5 as uuidv5 } from 'uuid';
import { HASH_BYTES } from './merkle.ts';
import { resourceIdForms } from './record.ts';
import type { AuditEntry } from './sink.ts';
import type { Queryable } from './tree.ts';

/** The leaf encoding of events, inside every event leaf. */
export const EVENT_LEAF_VERSION = 'event/1';

/** The columns of an event row that `audit.event_leaf_data` takes, after the sequence number. */
const leafArgs = (alias: string): string =>
  ['position', 'event_id', 'stream_type', 'stream_id', 'version', 'type', 'schema_version', 'data', 'metadata', 'recorded_at'].map((c) => `${alias}.${c}`).join(', ');
const LEAF_ARGS = leafArgs('e');

/**
 * The tile an event row `e` (with transaction_id and position) falls in, as a LATERAL
 * subquery: tiles cover the global order in turn, so it is the last one starting at or before
 * the event (`event_leaves_order_idx`). The event is a leaf of it only if its position is in
 * the tile's positions; past the last tile, it is not integrated yet.
 */
export const tileOfEvent = (e: string): string =>
  `(SELECT t.* FROM audit.event_leaves t
     WHERE (t.first_transaction_id, t.first_position) <= (${e}.transaction_id, ${e}.position)
     ORDER BY t.first_transaction_id DESC, t.first_position DESC LIMIT 1)`;

/** One round's events: what the sequencer appends to the tree and stores as a tile. */
export interface EventTile {
  count: number;
  /** The positions as a PostgreSQL array literal, in sequence order. */
  positions: string;
  /** The leaf hashes, 32 bytes each, in sequence order. */
  hashes: Buffer;
  first: EventCheckpoint;
  last: EventCheckpoint;
  firstRecordedAt: Date;
  lastRecordedAt: Date;
  /** The distinct actors of the tile's events, sorted, as a PostgreSQL array literal (search's summary). */
  actors: string;
  /** How many of the tile's events failed (search's summary). */
  failures: number;
}

/** An event's actor as search matches it: `metadata.actor`, or `unknown`. */
const ACTOR_OF = (e: string): string => `coalesce(${e}.metadata->>'actor', 'unknown')`;
/** Whether an event's outcome is a failure as search matches it: a `result` other than "ok". */
const FAILED = (e: string): string => `coalesce(jsonb_typeof(${e}.data->'result') = 'string' AND ${e}.data->>'result' <> 'ok', false)`;

/** Where the sequencer stands in the event store's global order (`audit.sequencer_state`). */
export async function eventCursor(db: Queryable): Promise<EventCheckpoint> {
  const state = await db.query<{ tx: string; pos: string }>('SELECT event_transaction_id::text AS tx, event_position::text AS pos FROM audit.sequencer_state');
  const cursor = state.rows[0];
  if (cursor === undefined) throw new Error('audit.sequencer_state is empty: run migrateAudit');
  return { transactionId: BigInt(cursor.tx), position: BigInt(cursor.pos) };
}

/**
 * An archive row of alias `a` that stands for its event: the hot table holds no row at its
 * position. Retention moves an event in one statement, so the two never both hold it; a row in
 * both is a copy someone planted, and everything that reads events as leaves (the tile query,
 * verification, proofs, search) takes the hot one. Verification reports the copy
 * (`event_duplicated`). One primary-key probe, made only for archived rows: a scalar
 * subquery, which PostgreSQL never turns into a hash of the whole hot table (as it may an
 * `EXISTS`, on estimates).
 */
const ARCHIVED_ALONE = (a: string): string => `(SELECT h.position FROM events.events h WHERE h.position = ${a}.position LIMIT 1) IS NULL`;

/** An event row's columns the tile query reads, alike in the hot table and the archive. */
const TILE_COLUMNS = 'position, transaction_id, event_id, stream_type, stream_id, version, type, schema_version, data, metadata, recorded_at';

/**
 * The next events after the sequencer's cursor, up to `limit`, hashed as leaves from
 * `firstSeq` on; null when there are none. The event store's reading rule applies (events
 * below the read horizon, `readHorizon`'s, only, in (transaction id, position) order), so an event that
 * commits late is integrated when it commits, never skipped. The archive is read with the hot
 * table: retention waits for the sequencer's cursor only once it has first moved (retention.ts
 * `readersSql`), so an event archived before then is still in the global order, and its leaf
 * is owed all the same; in one statement, an event being archived meanwhile is read from
 * exactly one of the two, and a copy planted in the archive is passed over (`ARCHIVED_ALONE`,
 * applied after the merge: a subquery inside the union would keep PostgreSQL from merging the
 * two index walks). Run it with sorting priced out (`SET LOCAL enable_sort = off`): on
 * tables PostgreSQL has not analyzed, the planner would otherwise read every row past the
 * cursor and sort them, a cost that grows with the backlog, on every round (as the relay's
 * read would, `readPartition`); without a sort, the plan merges the walks of the two tables'
 * global-order indexes and stops after `limit` rows.
 */
export async function readEventTile(db: Queryable, cursor: EventCheckpoint, firstSeq: number, limit: number, horizon: bigint): Promise<EventTile | null> {
  // One pass over the events in the index's order: the window numbers them as they come (no
  // sort), each is hashed once, and the aggregates collect positions and hashes in that same
  // order, the scan's. PostgreSQL keeps a sorted subquery's order through a window and an
  // aggregate over it, but does not promise it, so the window also checks it (`lag`) and the
  // round refuses a tile out of order. The first and last events are the first and last
  // positions, with the least and greatest transaction id (the order is by transaction first).
  // (Ordered aggregates cost a sort each: about 0.7 µs an event, a tenth of this query. No
  // aggregate here may have ORDER BY or DISTINCT: PostgreSQL 16 may sort the input for one,
  // which would reorder the rows for every other. So search's summary collects every actor
  // here, and an outer query keeps the distinct ones.)
  const r = await db.query<{ n: number; ordered: boolean; positions: string; hashes: Buffer; first_tx: string; last_tx: string; first_recorded_at: Date; last_recorded_at: Date; actors: string; failures: number }>({
    // Named: planned once per connection, not every round.
    name: 'ledgerline.audit.event-tile',
    text: `SELECT t.n, t.ordered, t.first_tx, t.last_tx, t.first_recorded_at, t.last_recorded_at, t.positions, t.hashes, t.failures,
            (SELECT array_agg(a ORDER BY a COLLATE "C") FROM (SELECT DISTINCT a FROM unnest(t.actors) a) d)::text AS actors
       FROM (
     SELECT count(*)::integer AS n, bool_and(x.previous_tx IS NULL OR (x.transaction_id, x.position) > (x.previous_tx, x.previous_position)) AS ordered,
            min(x.transaction_id)::text AS first_tx, max(x.transaction_id)::text AS last_tx,
            min(x.recorded_at) AS first_recorded_at, max(x.recorded_at) AS last_recorded_at, array_agg(x.position)::text AS positions,
            string_agg(sha256('\\x00'::bytea || audit.event_leaf_data($5::bigint + x.i - 1, ${leafArgs('x')})), ''::bytea) AS hashes,
            array_agg(${ACTOR_OF('x')}) AS actors, (count(*) FILTER (WHERE ${FAILED('x')}))::integer AS failures
       FROM (SELECT e.*, row_number() OVER w AS i, lag(e.transaction_id) OVER w AS previous_tx, lag(e.position) OVER w AS previous_position
               FROM (SELECT * FROM (SELECT * FROM (SELECT ${TILE_COLUMNS}, false AS archived FROM events.events
                                                   UNION ALL SELECT ${TILE_COLUMNS}, true FROM events.archived_events) e
                                     WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2::bigint) AND e.transaction_id < $3::text::xid8
                                     ORDER BY e.transaction_id, e.position LIMIT $4) e
                      WHERE CASE WHEN e.archived THEN ${ARCHIVED_ALONE('e')} ELSE true END) e
             WINDOW w AS ()) x) t`,
    values: [cursor.transactionId.toString(), cursor.position.toString(), horizon.toString(), limit, firstSeq],
  });
  const row = r.rows[0];
  if (row === undefined || row.n === 0) return null;
  if (!row.ordered) throw new Error('invariant: the events of a tile did not come in the global order; the round is refused and retried');
  if (row.hashes.length !== row.n * HASH_BYTES) throw new Error(`invariant: ${row.n} events hashed to ${row.hashes.length} bytes`);
  // The array's text as PostgreSQL writes a bigint[]: checked whole, since the tile row stores it.
  if (!/^\{\d+(,\d+)*\}$/.test(row.positions) || row.positions.split(',').length !== row.n) throw new Error(`invariant: ${row.n} events but positions ${row.positions.slice(0, 80)}`);
  const firstPosition = row.positions.slice(1, row.positions.indexOf(',') > 0 ? row.positions.indexOf(',') : -1);
  const lastPosition = row.positions.slice(row.positions.lastIndexOf(',') > 0 ? row.positions.lastIndexOf(',') + 1 : 1, -1);
  return {
    count: row.n,
    positions: row.positions,
    hashes: row.hashes,
    first: { transactionId: BigInt(row.first_tx), position: BigInt(firstPosition) },
    last: { transactionId: BigInt(row.last_tx), position: BigInt(lastPosition) },
    firstRecordedAt: row.first_recorded_at,
    lastRecordedAt: row.last_recorded_at,
    actors: row.actors,
    failures: row.failures,
  };
}

/** An event leaf as verification reads it back: the stored hash and, if the event is still kept, the recomputed one. */
export interface EventLeafCheck {
  seq: number;
  position: bigint;
  stored: Buffer;
  /** Null when neither events.events nor events.archived_events holds the position any more. */
  recomputed: Buffer | null;
  /** The event's actor and outcome as search matches them; null with the event. */
  actor: string | null;
  failed: boolean | null;
  /**
   * The event's recorded time against the tile's stored bounds, which search by time trusts
   * to skip the tile, to the millisecond (`MS`): within them, and whether it is the first or
   * the last. Null with the event.
   */
  recorded: { within: boolean; first: boolean; last: boolean } | null;
  /** The event's transaction id, its place in the global order with its position; null with the event. */
  transactionId: bigint | null;
}

/** A tile's search summary (migration 1767800000000), null for a tile integrated before summaries. */
export interface TileSummary {
  actors: string[];
  failures: number;
}

/** A tile as verification walks them: where it starts in the tree and in the event store's global order. */
export interface TileStart {
  firstSeq: number;
  count: number;
  /** Its first event's place in the global order (transaction id, position). */
  start: EventCheckpoint;
  summary: TileSummary | null;
}

/** The tiles that start at or after `fromSeq`, in sequence order, up to `limit`, with their search summaries. */
export async function tileStarts(db: Queryable, fromSeq: number, limit: number): Promise<TileStart[]> {
  const r = await db.query<{ first_seq: string; leaf_count: number; first_tx: string; first_position: string; actors: string[] | null; failures: number | null }>(
    `SELECT t.first_seq::text, t.leaf_count, t.first_transaction_id::text AS first_tx, t.first_position::text, t.actors, t.failures
       FROM audit.event_leaves t WHERE t.first_seq >= $1 ORDER BY t.first_seq LIMIT $2`,
    [fromSeq, limit],
  );
  return r.rows.map((t) => ({
    firstSeq: Number(t.first_seq),
    count: t.leaf_count,
    start: { transactionId: BigInt(t.first_tx), position: BigInt(t.first_position) },
    summary: t.actors === null || t.failures === null ? null : { actors: t.actors, failures: t.failures },
  }));
}

/** The start of the event store's global order: before every event. */
export const ORDER_ORIGIN: EventCheckpoint = { transactionId: 0n, position: 0n };

/** Two places in the global order, compared: negative when `a` comes first, 0 when they are the same place. */
export function compareOrder(a: EventCheckpoint, b: EventCheckpoint): number {
  if (a.transactionId !== b.transactionId) return a.transactionId < b.transactionId ? -1 : 1;
  return a.position === b.position ? 0 : a.position < b.position ? -1 : 1;
}

/**
 * Where the stretch of the global order that belongs to the tile at `firstSeq` ends
 * (exclusive): at the next tile's first event or, past the last tile, just after the
 * sequencer's cursor. The sequencer follows the global order and moves its cursor in the
 * transaction that stores the tile, so the tiles' stretches cover it without gaps up to the
 * cursor. One statement: a round committing meanwhile is seen whole, or not at all.
 */
export async function stretchEnd(db: Queryable, firstSeq: number): Promise<EventCheckpoint> {
  const r = await db.query<{ tx: string; pos: string }>(
    `SELECT coalesce(n.first_transaction_id, s.event_transaction_id)::text AS tx,
            (CASE WHEN n.first_seq IS NULL THEN s.event_position + 1 ELSE n.first_position END)::text AS pos
       FROM audit.sequencer_state s
       LEFT JOIN LATERAL (SELECT t.first_seq, t.first_transaction_id, t.first_position FROM audit.event_leaves t
                           WHERE t.first_seq > $1 ORDER BY t.first_seq LIMIT 1) n ON true`,
    [firstSeq],
  );
  const row = r.rows[0];
  if (row === undefined) throw new Error('audit.sequencer_state is empty: run migrateAudit');
  return { transactionId: BigInt(row.tx), position: BigInt(row.pos) };
}

/** The stretch [$1/$2, $3/$4) of the global order, for a row of alias `e`. */
const IN_STRETCH = (e: string): string =>
  `(${e}.transaction_id, ${e}.position) >= ($1::text::xid8, $2::bigint) AND (${e}.transaction_id, ${e}.position) < ($3::text::xid8, $4::bigint)`;

const stretchValues = (from: EventCheckpoint, to: EventCheckpoint): string[] => [from.transactionId.toString(), from.position.toString(), to.transactionId.toString(), to.position.toString()];

/**
 * How many event rows the stretch [from, to) of the global order holds, in the hot table and
 * the archive together (a planted copy counts twice): an index-only walk of each table's
 * global-order index. Verification compares it with the tile's kept leaves in the stretch and
 * asks `stretchDetail` only when they differ.
 */
export async function stretchRows(db: Queryable, from: EventCheckpoint, to: EventCheckpoint): Promise<number> {
  const r = await db.query<{ n: string }>(
    `SELECT ((SELECT count(*) FROM events.events e WHERE ${IN_STRETCH('e')}) + (SELECT count(*) FROM events.archived_events a WHERE ${IN_STRETCH('a')}))::text AS n`,
    stretchValues(from, to),
  );
  return Number(r.rows[0]?.n ?? 0);
}

/** What `stretchDetail` found, by position, each in position order. */
export interface StretchDetail {
  /** Events kept in the stretch that are no leaf of its tile. */
  notIntegrated: bigint[];
  /** Positions held by both the hot table and the archive. */
  duplicated: bigint[];
}

/**
 * The stretch [from, to) held to the positions of the tile at `firstSeq` (null: no tile), at
 * most `limit` of each kind. Archived rows at or before `archiveExemptThrough` that are no
 * leaf are passed over: a log sequenced before the sequencer read the archive never took
 * events archived before its cursor first moved (migration 1769450000000).
 */
export async function stretchDetail(
  db: Queryable,
  firstSeq: number | null,
  from: EventCheckpoint,
  to: EventCheckpoint,
  archiveExemptThrough: EventCheckpoint,
  limit: number,
): Promise<StretchDetail> {
  const r = await db.query<{ kind: keyof StretchDetail; position: string }>(
    `WITH stretch AS MATERIALIZED (
            SELECT e.position, false AS exempt FROM events.events e WHERE ${IN_STRETCH('e')}
            UNION ALL
            SELECT a.position, (a.transaction_id, a.position) <= ($5::text::xid8, $6::bigint) FROM events.archived_events a WHERE ${IN_STRETCH('a')}),
          tile AS MATERIALIZED (SELECT u.position FROM audit.event_leaves t, unnest(t.positions) AS u(position) WHERE t.first_seq = $7)
     (SELECT 'notIntegrated' AS kind, s.position::text FROM stretch s
       WHERE NOT s.exempt AND NOT EXISTS (SELECT 1 FROM tile WHERE tile.position = s.position) ORDER BY s.position LIMIT $8)
     UNION ALL
     (SELECT 'duplicated', s.position::text FROM stretch s GROUP BY s.position HAVING count(*) > 1 ORDER BY s.position LIMIT $8)`,
    [...stretchValues(from, to), archiveExemptThrough.transactionId.toString(), archiveExemptThrough.position.toString(), firstSeq, limit],
  );
  const found: StretchDetail = { notIntegrated: [], duplicated: [] };
  for (const row of r.rows) found[row.kind].push(BigInt(row.position));
  return found;
}

/** Through where the archive's events may be missing from the trail: a log sequenced before the sequencer read the archive (migration 1769450000000). */
export async function archiveExemptThrough(db: Queryable): Promise<EventCheckpoint> {
  const r = await db.query<{ tx: string; pos: string }>(
    'SELECT archive_exempt_transaction_id::text AS tx, archive_exempt_position::text AS pos FROM audit.sequencer_state',
  );
  const row = r.rows[0];
  return row === undefined ? ORDER_ORIGIN : { transactionId: BigInt(row.tx), position: BigInt(row.pos) };
}

/**
 * A time to the millisecond: the precision of the times search takes, and the one the
 * sequencer stores a tile's recorded times with (they pass through a JavaScript Date).
 */
const MS = (time: string): string => `date_trunc('milliseconds', ${time})`;

/**
 * Recomputes the leaves of the tile at `firstSeq` from the event store (the hot table or the
 * archive), at the sequence numbers the tree expects from `expectedSeq` on: a tile stored at
 * another place no longer matches.
 */
export async function checkTile(db: Queryable, firstSeq: number, expectedSeq: number): Promise<EventLeafCheck[]> {
  const r = await db.query<{
    i: string;
    position: string;
    stored: Buffer;
    recomputed: Buffer | null;
    actor: string | null;
    failed: boolean | null;
    within: boolean | null;
    at_first: boolean | null;
    at_last: boolean | null;
    tx: string | null;
  }>(
    `SELECT u.i::text, u.position::text, substring(t.leaf_hashes FROM (u.i::integer - 1) * 32 + 1 FOR 32) AS stored,
            sha256('\\x00'::bytea || audit.event_leaf_data($2::bigint + u.i - 1, ${LEAF_ARGS})) AS recomputed,
            CASE WHEN e.position IS NOT NULL THEN ${ACTOR_OF('e')} END AS actor, CASE WHEN e.position IS NOT NULL THEN ${FAILED('e')} END AS failed,
            ${MS('e.recorded_at')} BETWEEN ${MS('t.first_recorded_at')} AND ${MS('t.last_recorded_at')} AS within,
            ${MS('e.recorded_at')} = ${MS('t.first_recorded_at')} AS at_first, ${MS('e.recorded_at')} = ${MS('t.last_recorded_at')} AS at_last,
            e.transaction_id::text AS tx
       FROM audit.event_leaves t
       CROSS JOIN LATERAL unnest(t.positions) WITH ORDINALITY AS u(position, i)
       LEFT JOIN LATERAL (SELECT ${LEAF_ARGS}, e.transaction_id FROM events.events e WHERE e.position = u.position
                          UNION ALL
                          SELECT ${LEAF_ARGS}, e.transaction_id FROM events.archived_events e WHERE e.position = u.position AND ${ARCHIVED_ALONE('e')}
                          LIMIT 1) e ON true
      WHERE t.first_seq = $1
      ORDER BY u.i`,
    [firstSeq, expectedSeq],
  );
  return r.rows.map((row) => ({
    seq: firstSeq + Number(row.i) - 1,
    position: BigInt(row.position),
    stored: row.stored,
    recomputed: row.recomputed,
    actor: row.actor,
    failed: row.failed,
    recorded: row.within === null ? null : { within: row.within, first: row.at_first === true, last: row.at_last === true },
    transactionId: row.tx === null ? null : BigInt(row.tx),
  }));
}

/**
 * The leaves of the tile at `firstSeq` as stored (positions and leaf hashes), reading nothing
 * of the event store: what verification stands on when it may not read the events.
 */
export async function storedTileLeaves(db: Queryable, firstSeq: number): Promise<{ seq: number; position: bigint; stored: Buffer }[]> {
  const r = await db.query<{ i: string; position: string; stored: Buffer }>(
    `SELECT u.i::text, u.position::text, substring(t.leaf_hashes FROM (u.i::integer - 1) * 32 + 1 FOR 32) AS stored
       FROM audit.event_leaves t CROSS JOIN LATERAL unnest(t.positions) WITH ORDINALITY AS u(position, i)
      WHERE t.first_seq = $1 ORDER BY u.i`,
    [firstSeq],
  );
  return r.rows.map((row) => ({ seq: firstSeq + Number(row.i) - 1, position: BigInt(row.position), stored: row.stored }));
}

/**
 * What is wrong with a tile's search summary, held to its leaves' events; null when nothing is.
 * With every event still kept, the summary must be exactly theirs. Once retention has let some
 * go, it must still cover those left: it may name more, never fewer, or search would pass over
 * the tile.
 */
export function summaryMismatch(summary: TileSummary, leaves: readonly EventLeafCheck[]): string | null {
  const listed = new Set(summary.actors);
  const present = new Set<string>();
  let failures = 0;
  let missing = 0;
  for (const leaf of leaves) {
    if (leaf.actor === null) {
      missing += 1;
      continue;
    }
    present.add(leaf.actor);
    if (leaf.failed === true) failures += 1;
  }
  const unlisted = [...present].filter((a) => !listed.has(a));
  if (unlisted.length > 0) return `its summary leaves out actor(s) ${unlisted.slice(0, 3).map((a) => JSON.stringify(a)).join(', ')}${unlisted.length > 3 ? ', …' : ''}: search by actor would pass over the tile`;
  if (summary.failures < failures) return `its summary counts ${summary.failures} failures, but its events hold ${failures}: search for failures would pass over the tile`;
  if (summary.failures > failures + missing) return `its summary counts ${summary.failures} failures, more than its events can hold (${failures}, and ${missing} gone): search for successes would pass over the tile`;
  if (missing === 0) {
    const extra = summary.actors.filter((a) => !present.has(a));
    if (extra.length > 0) return `its summary names actor(s) no event of the tile has: ${extra.slice(0, 3).map((a) => JSON.stringify(a)).join(', ')}`;
    if (summary.actors.length !== listed.size) return 'its summary names an actor twice';
    if (summary.failures !== failures) return `its summary counts ${summary.failures} failures, but its events hold ${failures}`;
  }
  return null;
}

/**
 * What is wrong with a tile's stored recorded times, held to its leaves' events; null when
 * nothing is. Every event kept must be recorded within them, or a search by time would pass
 * over it; with every event kept, the first and the last must be some event's.
 */
export function recordedTimesMismatch(leaves: readonly EventLeafCheck[]): string | null {
  const kept = leaves.flatMap((l) => (l.recorded === null ? [] : [{ seq: l.seq, ...l.recorded }]));
  const outside = kept.find((l) => !l.within);
  if (outside !== undefined) return `leaf ${outside.seq}'s event was recorded outside the tile's stored times: search by time would pass over it`;
  if (kept.length === leaves.length && kept.length > 0 && (!kept.some((l) => l.first) || !kept.some((l) => l.last))) {
    return 'its stored times are not its events\' first and last recorded times';
  }
  return null;
}

/** The leaf data of the event at `seq` (its exact bytes, from PostgreSQL), or null when `seq` is not an event leaf or its event is gone. */
export async function eventLeafDataAt(db: Queryable, seq: number): Promise<Buffer | null> {
  const r = await db.query<{ data: Buffer }>(
    `SELECT audit.event_leaf_data($1::bigint, ${LEAF_ARGS}) AS data
       FROM (SELECT * FROM audit.event_leaves t WHERE t.first_seq <= $1 ORDER BY t.first_seq DESC LIMIT 1) t
       JOIN LATERAL (SELECT ${LEAF_ARGS} FROM events.events e WHERE e.position = t.positions[$1 - t.first_seq + 1]
                     UNION ALL
                     SELECT ${LEAF_ARGS} FROM events.archived_events e WHERE e.position = t.positions[$1 - t.first_seq + 1] AND ${ARCHIVED_ALONE('e')}
                     LIMIT 1) e ON true
      WHERE $1 < t.first_seq + t.leaf_count`,
    [seq],
  );
  return r.rows[0]?.data ?? null;
}

/**
 * The leaf data of an event, as `audit.event_leaf_data` builds it: for tests, and for anyone
 * who holds an event and wants to check it against an inclusion proof. `dataText` and
 * `metadataText` are the jsonb texts PostgreSQL renders (`data::text`), which is what the
 * leaf commits to; `recordedAtUs` is the recorded time in microseconds since the epoch.
 */
export function eventLeafData(
  seq: number,
  e: { position: bigint; id: string; streamType: string; streamId: string; version: number; type: string; schemaVersion: number; recordedAtUs: bigint },
  dataText: string,
  metadataText: string,
): Buffer {
  const j = JSON.stringify;
  return Buffer.from(
    `{"v":${j(EVENT_LEAF_VERSION)},"seq":${seq},"position":${e.position},"id":"${e.id}","streamType":${j(e.streamType)},"streamId":${j(e.streamId)},` +
      `"version":${e.version},"type":${j(e.type)},"schemaVersion":${e.schemaVersion},"recordedAtUs":${e.recordedAtUs},` +
      `"metadata":${metadataText},"data":${dataText}}`,
    'utf8',
  );
}

/** Audit record ids for events: derived from the event id, so a record names its event. */
export const EVENT_RECORD_NAMESPACE = '6f1c1c9e-4a57-5d0e-9d3f-2b8a4c1e7a10';

/** The record id an event's leaf is known by. */
export const eventRecordId = (eventId: string): string => uuidv5(eventId, EVENT_RECORD_NAMESPACE);

/**
 * How an event reads as an audit record: class `financial`, the actor from the event's
 * metadata, the event type as the action, the stream as the resource; a `result` other than
 * `ok` in the data (a rejected transfer) is a failure with that reason.
 */
export function eventEntry(event: StoredEvent, service: string): AuditEntry {
  const actor = event.metadata.actor ?? 'unknown';
  const result = event.data.result;
  const failed = typeof result === 'string' && result !== 'ok';
  const traceId = /^[0-9a-f]{2}-([0-9a-f]{32})-/.exec(event.metadata.traceparent ?? '')?.[1];
  return {
    recordClass: 'financial',
    actor: actor === 'anonymous' ? { type: 'anonymous', id: actor } : { type: actor.startsWith('user:') ? 'user' : 'service', id: actor },
    action: event.type,
    outcome: failed ? 'failure' : 'success',
    ...(failed ? { reason: result } : {}),
    origin: {
      service,
      ...(typeof event.metadata.ip === 'string' ? { ip: event.metadata.ip } : {}),
      ...(event.metadata.causationId === undefined ? {} : { requestId: event.metadata.causationId }),
      ...(traceId === undefined ? {} : { traceId }),
    },
    resource: { type: event.streamType, id: event.streamId },
    occurredAt: event.recordedAt,
    payload: {
      eventId: event.id,
      position: event.position.toString(),
      version: event.version,
      data: event.data,
      ...(event.metadata.correlationId === undefined ? {} : { correlationId: event.metadata.correlationId }),
    },
  };
}

/** The search filters that apply to event leaves (store.ts SearchFilter, without subject and class). */
export interface EventLeafFilter {
  actorId?: string;
  resourceType?: string;
  resourceId?: string;
  action?: string;
  outcome?: 'success' | 'failure';
  from?: Date;
  to?: Date;
}

type EventLeafRow = EventRecord & { seq: string };

/** Tiles one search query finds (whose leaves are then read in runs). */
const SEARCH_TILES_PER_QUERY = 4;
/** The longest run of a tile's leaves one search query reads. */
const SEARCH_RUN_MAX = 16_384;

const EVENT_COLUMNS = 'e.position, e.transaction_id, e.partition, e.event_id, e.stream_type, e.stream_id, e.version, e.type, e.schema_version, e.data, e.metadata, e.recorded_at';

/** `e` as an event row of the hot table or the archive, found by `position`. */
const eventAt = (position: string): string =>
  `(SELECT ${EVENT_COLUMNS} FROM events.events e WHERE e.position = ${position}
    UNION ALL
    SELECT ${EVENT_COLUMNS} FROM events.archived_events e WHERE e.position = ${position} AND ${ARCHIVED_ALONE('e')}
    LIMIT 1)`;

/**
 * Event leaves matching `filter`, in sequence order after `after`, at most `limit`. With a
 * resource (a stream) named, the stream's events are found by the event store's stream index
 * and each one's leaf by the tile index; otherwise the tiles are walked in sequence order,
 * skipping those whose recorded times lie outside `from`..`to`, and their events filtered.
 */
export async function searchEventLeaves(db: Queryable, filter: EventLeafFilter, page: { desc: boolean; after: number | null; limit: number }): Promise<{ seq: number; event: StoredEvent }[]> {
  const { desc, after, limit } = page;
  const conditions = `($1::text IS NULL OR ${ACTOR_OF('e')} = $1) AND ($2::text IS NULL OR e.stream_type = $2)
    AND ($3::text[] IS NULL OR e.stream_id = ANY ($3::text[])) AND ($4::text IS NULL OR e.type = $4)
    AND ($5::text IS NULL OR (CASE WHEN ${FAILED('e')} THEN 'failure' ELSE 'success' END) = $5)
    AND ($6::timestamptz IS NULL OR e.recorded_at >= $6) AND ($7::timestamptz IS NULL OR e.recorded_at < $7)`;
  const keyset = `($8::bigint IS NULL OR seq ${desc ? '<' : '>'} $8)`;
  /** $1..$7 of `conditions`. */
  const filterArgs: unknown[] = [
    filter.actorId ?? null,
    filter.resourceType ?? null,
    filter.resourceId === undefined ? null : resourceIdForms(filter.resourceId),
    filter.action ?? null,
    filter.outcome ?? null,
    filter.from ?? null,
    filter.to ?? null,
  ];
  const order = desc ? 'DESC' : 'ASC';
  let rows: EventLeafRow[] = [];
  if (filter.resourceType !== undefined && filter.resourceId !== undefined) {
    const r = await db.query<EventLeafRow>(
      `SELECT * FROM (
         SELECT s.seq, ${EVENT_COLUMNS}
           FROM (SELECT ${EVENT_COLUMNS} FROM events.events e WHERE e.stream_type = $2 AND e.stream_id = ANY ($3::text[])
                 UNION ALL
                 SELECT ${EVENT_COLUMNS} FROM events.archived_events e WHERE e.stream_type = $2 AND e.stream_id = ANY ($3::text[]) AND ${ARCHIVED_ALONE('e')}) e
           CROSS JOIN LATERAL (SELECT t.first_seq + array_position(t.positions, e.position) - 1 AS seq FROM ${tileOfEvent('e')} t) s
          WHERE s.seq IS NOT NULL AND ${conditions}) x
        WHERE ${keyset} ORDER BY seq ${order} LIMIT $9`,
      [...filterArgs, after, limit],
    );
    rows = r.rows;
  } else {
    // Tiles in sequence order, a few found at a time, and in each its leaves in runs, also in
    // sequence order, until the page is full. The first run is as long as the page and each
    // next one twice the last (up to SEARCH_RUN_MAX): a filter most events match fills the
    // page from the first run, and a rare one soon reads long runs. (Reading four whole tiles
    // for every page cost 170 ms for a page of 50 that the first 50 leaves filled.)
    let run = Math.max(1, limit);
    for (let from = after; rows.length < limit; ) {
      // A tile's summary (actors, failures) rules it out without reading its events; a tile
      // without one (integrated before summaries existed) is read.
      const tiles = await db.query<{ first_seq: string; leaf_count: number }>(
        `SELECT first_seq::text, leaf_count FROM audit.event_leaves t
          WHERE ($1::bigint IS NULL OR ${desc ? 't.first_seq < $1' : 't.first_seq + t.leaf_count - 1 > $1'})
            AND ($2::timestamptz IS NULL OR t.last_recorded_at >= $2) AND ($3::timestamptz IS NULL OR t.first_recorded_at < $3)
            AND ($4::text IS NULL OR t.actors @> ARRAY[$4::text] OR t.actors IS NULL)
            AND ($5::text IS NULL OR t.failures IS NULL
                 OR ($5 = 'failure' AND t.failures > 0) OR ($5 = 'success' AND t.failures < t.leaf_count))
          ORDER BY t.first_seq ${order} LIMIT ${SEARCH_TILES_PER_QUERY}`,
        [from, filter.from ?? null, filter.to ?? null, filter.actorId ?? null, filter.outcome ?? null],
      );
      if (tiles.rows.length === 0) break;
      for (const tile of tiles.rows) {
        const first = Number(tile.first_seq);
        // The tile's leaves past the keyset, as 1-based indices lo..hi.
        let lo = !desc && from !== null ? Math.max(1, from - first + 2) : 1;
        let hi = desc && from !== null ? Math.min(tile.leaf_count, from - first) : tile.leaf_count;
        while (lo <= hi && rows.length < limit) {
          const [a, b] = desc ? [Math.max(lo, hi - run + 1), hi] : [lo, Math.min(hi, lo + run - 1)];
          const r = await db.query<EventLeafRow>(
            `SELECT t.first_seq + $10::integer + u.k - 2 AS seq, e.*
               FROM audit.event_leaves t
               CROSS JOIN LATERAL unnest(t.positions[$10:$11]) WITH ORDINALITY AS u(position, k)
               CROSS JOIN LATERAL ${eventAt('u.position')} e
              WHERE t.first_seq = $9 AND ${conditions}
              ORDER BY u.k ${order} LIMIT $8`,
            [...filterArgs, limit - rows.length, first, a, b],
          );
          rows = rows.concat(r.rows);
          if (desc) hi = a - 1;
          else lo = b + 1;
          run = Math.min(run * 2, SEARCH_RUN_MAX);
        }
        from = desc ? first : first + tile.leaf_count - 1;
        if (rows.length >= limit) break;
      }
    }
  }
  return rows.map((row) => ({ seq: Number(row.seq), event: toEvent(row) }));
}

/**
 * The global order as replays read it: the hot table and the archive together. Retention moves
 * whole streams into `events.archived_events` once every reader has passed them, but a
 * projection rebuilt from the start, a replay, the ledger's reconciliation and time travel
 * must still see them, each event once, in (transaction id, position) order. As
 * `EventStore.readAll` does, these read both tables in one statement (one snapshot), so an
 * event being archived meanwhile is read from exactly one of them; PostgreSQL pushes the
 * conditions on the global order into both and merges the walks of their global-order
 * indexes (`events_global_order_idx`, `archived_events_global_order_idx`).
 *
 * An event in both tables (a row copied by hand: retention moves a stream in one statement)
 * is refused with `StreamCorruptError`, as `readStream` and `readAll` refuse it, rather than
 * folded twice.
 */

/** The columns of an event row, alike in both tables, by name. */
const COLUMNS = 'position, transaction_id, partition, event_id, stream_type, stream_id, version, type, schema_version, data, metadata, recorded_at';

/**
 * Every event, hot and archived, as a FROM item (give it an alias), with a column `archived`
 * that says which table the row came from.
 */
export const ALL_EVENTS = `(SELECT ${COLUMNS}, false AS archived FROM events.events
   UNION ALL SELECT ${COLUMNS}, true FROM events.archived_events)`;

/**
 * True for a row of alias `e` from `ALL_EVENTS` that is an archived copy of a hot event. One
 * primary-key probe, for archived rows only; put it in the select list of the query over the
 * merge (a subquery inside the union would keep PostgreSQL from merging the index walks).
 */
export const COPIED = (e: string): string =>
  `CASE WHEN ${e}.archived THEN (SELECT h.position FROM events.events h WHERE h.position = ${e}.position LIMIT 1) IS NOT NULL ELSE false END`;

/**
 * The first archived event at or before ($1 transaction id, $2 position) in the global order
 * that the hot table holds too (its stream and version), if any: a semi-join of the two
 * tables' primary keys, for set-based readers that fold everything up to a point.
 */
export const FIRST_COPY_SQL = `SELECT a.stream_type, a.stream_id, a.version FROM events.archived_events a
  WHERE (a.transaction_id, a.position) <= ($1::text::xid8, $2::bigint)
    AND EXISTS (SELECT 1 FROM events.events h WHERE h.position = a.position)
  LIMIT 1`;

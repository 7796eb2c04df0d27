-- Up Migration

-- Ledger events are leaves of the tree without being copied into audit.records. The event
-- store already holds each event, written in the same transaction as the balance change;
-- the sequencer hashes the rows where they are (audit.event_leaf_data, below) and stores,
-- per round, one row: the positions of the events it integrated, in sequence order, and
-- their leaf hashes, 32 bytes each. A record row per event (nineteen columns, five
-- indexes, a payload row and its JSON) cost about 60 µs of CPU per event, more than half the
-- cost of the transfer itself; a tile costs a few microseconds per event (docs/audit.md).
--
-- Leaf i of a tile is sequence number first_seq + i - 1 and commits to the event at
-- positions[i]. (first_transaction_id, first_position) is the tile's first event in the
-- event store's global order, which the sequencer follows: it locates an event's tile.
-- first_recorded_at and last_recorded_at bound the times recorded among the tile's events:
-- a search by time skips the tiles outside its range, and verification reads a missing event
-- as expired only once the retention of class `financial` has run out for the whole tile.
CREATE TABLE audit.event_leaves (
  first_seq            bigint PRIMARY KEY CHECK (first_seq >= 0),
  leaf_count           integer NOT NULL CHECK (leaf_count BETWEEN 1 AND 50000),
  first_transaction_id xid8 NOT NULL,
  first_position       bigint NOT NULL,
  first_recorded_at    timestamptz NOT NULL,
  last_recorded_at     timestamptz NOT NULL CHECK (last_recorded_at >= first_recorded_at),
  positions            bigint[] NOT NULL CHECK (cardinality(positions) = leaf_count),
  leaf_hashes          bytea NOT NULL CHECK (length(leaf_hashes) = 32 * leaf_count),
  integrated_at        timestamptz NOT NULL DEFAULT now()
);
-- Out of line and uncompressed: hashes do not compress, and pglz on the positions cost more
-- than the rest of the insert (3 ms of 3.5 for 5000 leaves, measured) to save 4 bytes a leaf.
ALTER TABLE audit.event_leaves ALTER COLUMN leaf_hashes SET STORAGE EXTERNAL, ALTER COLUMN positions SET STORAGE EXTERNAL;
CREATE INDEX event_leaves_order_idx ON audit.event_leaves (first_transaction_id, first_position);

CREATE TRIGGER event_leaves_append_only BEFORE UPDATE OR DELETE ON audit.event_leaves FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER event_leaves_no_truncate BEFORE TRUNCATE ON audit.event_leaves FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();
GRANT SELECT, INSERT ON audit.event_leaves TO ledgerline_audit_writer;

-- The exact bytes an event's leaf hashes (leaf hash: sha256(0x00 || these bytes)), a JSON
-- object whose members come in this order:
--   {"v":"event/1","seq":<seq>,"position":<position>,"id":"<event id>",
--    "streamType":"...","streamId":"...","version":<version>,"type":"...",
--    "schemaVersion":<n>,"recordedAtUs":<microseconds since the epoch>,
--    "metadata":<the metadata's jsonb text>,"data":<the data's jsonb text>}
-- Strings are escaped by to_json(text) (JSON's escapes, control characters as \uXXXX), with
-- no spaces outside the jsonb texts. The whole event is inside, so an inclusion proof shows a
-- third party the event itself: who (metadata: actor, ip, request, trace), what and when.
-- `seq` is inside, so a leaf moved to another place no longer matches.
CREATE FUNCTION audit.event_leaf_data(
  p_seq bigint, p_position bigint, p_event_id uuid, p_stream_type text, p_stream_id text, p_version integer,
  p_type text, p_schema_version smallint, p_data jsonb, p_metadata jsonb, p_recorded_at timestamptz
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT convert_to(
    '{"v":"event/1","seq":' || p_seq || ',"position":' || p_position || ',"id":"' || p_event_id
    || '","streamType":' || to_json(p_stream_type)::text || ',"streamId":' || to_json(p_stream_id)::text
    || ',"version":' || p_version || ',"type":' || to_json(p_type)::text || ',"schemaVersion":' || p_schema_version
    || ',"recordedAtUs":' || (extract(epoch FROM p_recorded_at) * 1000000)::bigint
    || ',"metadata":' || p_metadata::text || ',"data":' || p_data::text || '}',
    'UTF8')
$$;
GRANT EXECUTE ON FUNCTION audit.event_leaf_data(bigint, bigint, uuid, text, text, integer, text, smallint, jsonb, jsonb, timestamptz) TO ledgerline_audit_writer;

-- Down Migration
DROP FUNCTION audit.event_leaf_data(bigint, bigint, uuid, text, text, integer, text, smallint, jsonb, jsonb, timestamptz);
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM audit.event_leaves) THEN
    RAISE EXCEPTION 'audit.event_leaves holds leaves of the tree: going down would break every checkpoint after them';
  END IF;
END $$;
DROP TABLE audit.event_leaves;

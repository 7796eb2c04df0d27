-- Up Migration

-- A tile's leaves are its events: the sequencer gives records and tiles disjoint ranges of
-- sequence numbers, so a record row inside a tile's range is forged. The tree walk never
-- reads one (it takes the tile's leaves there), yet search showed it. Refused for every role
-- (only a superuser who disables triggers gets one in, and verification reports it as
-- record_in_tile). Where records may go otherwise (only at the next leaves) is bound by
-- migration 1769100000000. Checked once per statement on the rows it added (the sequencer
-- inserts a round's records in one): two index probes, nothing per row.
CREATE FUNCTION audit.records_outside_tiles_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  lo bigint;
  hi bigint;
  tile_seq bigint;
BEGIN
  SELECT min(seq), max(seq) INTO lo, hi FROM added;
  IF lo IS NULL THEN
    RETURN NULL;
  END IF;
  -- The tile holding lo (the last one starting at or before it), or one starting in lo..hi.
  SELECT t.first_seq INTO tile_seq
    FROM (SELECT first_seq, leaf_count FROM audit.event_leaves WHERE first_seq <= lo ORDER BY first_seq DESC LIMIT 1) t
   WHERE lo < t.first_seq + t.leaf_count;
  IF tile_seq IS NULL THEN
    SELECT first_seq INTO tile_seq FROM audit.event_leaves WHERE first_seq > lo AND first_seq <= hi ORDER BY first_seq LIMIT 1;
  END IF;
  IF tile_seq IS NOT NULL THEN
    RAISE EXCEPTION 'audit.records: seq %..% lies inside the event tile at seq %: its leaves are events, not records', lo, hi, tile_seq
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER records_outside_tiles AFTER INSERT ON audit.records REFERENCING NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION audit.records_outside_tiles_guard();

-- Down Migration
DROP TRIGGER records_outside_tiles ON audit.records;
DROP FUNCTION audit.records_outside_tiles_guard();

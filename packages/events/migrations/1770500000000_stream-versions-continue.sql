-- Up Migration

-- The append's stream check (migration 1768100000000) also holds each continuing stream to its
-- versions: the first version an append gives a stream must follow the stream's latest, live
-- or, when retention archived every live event, archived. An append that gives versions itself
-- (EventStore.appendMany, appendStatement) was held to nothing but the unique (stream, version)
-- key, so a version that skipped one (3 while the stream is at 1) went in, and a later append
-- of the skipped one took a later position: readers, who follow positions, and the relay, and
-- so every consumer, then saw 1, 3, 2. A stream with no event at all, live or archived, may be
-- continued at any version: its history was deleted by retention, or never recorded (the
-- ledger's pending transfer made without an event store), and the ledger still appends its
-- expiry or its posting as version 2 (a review found the first form of this check refusing
-- exactly that, which stalled every expiry sweep behind it). A mismatch raises SQLSTATE LL412 with the stream, the
-- version the append expected and the stream's in DETAIL (streamVersionConflict turns it into
-- ConcurrencyError); the order conflict keeps LL409 and comes first. The probe of the latest
-- live event is the one the order check made already; the archive is probed only for a stream
-- with no live event. Within one append, versions rising by one are checked by the store.
-- The two-argument function stays for a process of the release before, until it is replaced.
CREATE FUNCTION events.assert_stream_order(p_stream_types json, p_stream_ids json, p_first_versions json) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
  conflict record;
BEGIN
  -- Each stream's latest event is its newest: every append passes this check, and a version
  -- is taken once (the unique constraint), so within a stream transaction ids rise with versions.
  SELECT s.stream_type, s.stream_id, s.first_version, l.newer, l.latest INTO conflict
    FROM ROWS FROM (json_array_elements_text(p_stream_types), json_array_elements_text(p_stream_ids),
                    json_array_elements_text(p_first_versions)) AS s(stream_type, stream_id, first_version)
    CROSS JOIN LATERAL (
      SELECT coalesce(live.transaction_id > pg_current_xact_id(), false) AS newer,
             coalesce(live.version,
                      (SELECT a.version FROM events.archived_events a
                        WHERE a.stream_type = s.stream_type AND a.stream_id = s.stream_id
                        ORDER BY a.version DESC LIMIT 1),
                      0) AS latest
        FROM (SELECT NULL) one
        LEFT JOIN LATERAL (SELECT e.version, e.transaction_id FROM events.events e
                            WHERE e.stream_type = s.stream_type AND e.stream_id = s.stream_id
                            ORDER BY e.version DESC LIMIT 1) live ON true) l
   WHERE l.newer OR (l.latest <> 0 AND l.latest <> s.first_version::int - 1)
   ORDER BY l.newer DESC
   LIMIT 1;
  IF NOT FOUND THEN
    RETURN true;
  END IF;
  IF conflict.newer THEN
    RAISE EXCEPTION 'stream %/% has version % from a newer transaction: retry the transaction', conflict.stream_type, conflict.stream_id, conflict.latest
      USING ERRCODE = 'LL409',
            DETAIL = json_build_object('streamType', conflict.stream_type, 'streamId', conflict.stream_id, 'version', conflict.latest)::text;
  END IF;
  RAISE EXCEPTION 'stream %/% is at version %, but the append gives it version % next', conflict.stream_type, conflict.stream_id, conflict.latest, conflict.first_version
    USING ERRCODE = 'LL412',
          DETAIL = json_build_object('streamType', conflict.stream_type, 'streamId', conflict.stream_id,
                                     'expected', conflict.first_version::int - 1, 'actual', conflict.latest)::text;
END $$;

-- Down Migration
DROP FUNCTION events.assert_stream_order(json, json, json);

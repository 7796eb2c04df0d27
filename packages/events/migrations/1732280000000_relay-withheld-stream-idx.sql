-- Up Migration

-- Retention deletes a stream's withheld-event records with the stream (its type and id may
-- name a person), so they are found by stream.
CREATE INDEX relay_withheld_stream_idx ON events.relay_withheld (stream_type, stream_id);

-- Down Migration
DROP INDEX events.relay_withheld_stream_idx;

-- Up Migration

-- The archive by recorded time. Reconciliation counts and pages the events recorded in a time
-- range in the hot table and the archive together (retention archives a stream once the relay
-- has passed it, whether or not the consumers have); without this index each run read the
-- whole archive to count its range. A B-tree, not the hot table's BRIN: retention inserts a
-- stream's events together, so the archive's rows are not in time order.
CREATE INDEX archived_events_recorded_at_idx ON events.archived_events (recorded_at);

-- Down Migration
DROP INDEX events.archived_events_recorded_at_idx;

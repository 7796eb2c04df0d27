-- Up Migration

-- The archive in the global order, as the hot table has it (events_global_order_idx). Audit
-- verification checks the event store's completeness a stretch of the global order at a time
-- (every event the sequencer passed is a leaf of the tile of that stretch), in the hot table
-- and in the archive alike; without this index each stretch would read the whole archive.
CREATE INDEX archived_events_global_order_idx ON events.archived_events (transaction_id, position);

-- Down Migration
DROP INDEX events.archived_events_global_order_idx;

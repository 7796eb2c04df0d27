-- Up Migration

-- The events retention deleted (packages/eventsourcing `applyRetention`), by position and id
-- only: no stream, no data, nothing a subject could be named by. The inbox keeps its rows for
-- them (a copy still on the broker, whose stream keeps messages for days, would otherwise be
-- applied again when a consumer is reset), and reconciliation, which reported each such row as
-- naming an event the store never had (`inbox_unknown_event`), takes an inbox row that names
-- a deleted event as the store's: until 2026-12-07 a range whose events had been handled before
-- a lawful deletion could never reconcile clean again (a review found it).
CREATE TABLE events.deleted_events (
  position bigint PRIMARY KEY,
  event_id uuid NOT NULL,
  deleted_at timestamptz NOT NULL DEFAULT now()
);

-- Down Migration
DROP TABLE events.deleted_events;

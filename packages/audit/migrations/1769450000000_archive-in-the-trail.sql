-- Up Migration

-- The sequencer now reads events.archived_events with the hot table (readEventTile), so an
-- event retention archived before the sequencer's cursor first moved (retention waits for the
-- cursor only from then on) still becomes a leaf. Before, the sequencer read the hot table only,
-- and such an event was never taken. Verification now proves every event at or before the
-- cursor a leaf, the archive's too; on a log sequenced before this migration it would report
-- those old archived events as not integrated, on every run. So the cursor as it stands now
-- bounds the archived events that may be missing: an archived event at or before it that is
-- no leaf is passed over (verify.ts `checkCompleteness`); hot events are checked from the
-- start, as the sequencer always read them. On a log with no tile yet, nothing is exempt.
-- Set here once; no role may change it (the sequencer's role updates the cursor's columns only).
ALTER TABLE audit.sequencer_state
  ADD COLUMN archive_exempt_transaction_id xid8 NOT NULL DEFAULT '0',
  ADD COLUMN archive_exempt_position bigint NOT NULL DEFAULT 0;
UPDATE audit.sequencer_state
   SET archive_exempt_transaction_id = event_transaction_id, archive_exempt_position = event_position
 WHERE EXISTS (SELECT 1 FROM audit.event_leaves);

-- Down Migration
ALTER TABLE audit.sequencer_state DROP COLUMN archive_exempt_transaction_id, DROP COLUMN archive_exempt_position;

-- Up Migration

-- Events the outbox relay did not publish because the residency policy forbids their data
-- region at the broker's location. Written in the same statement as the checkpoint that
-- moves past them, so an event is either still ahead of the checkpoint or recorded here: it
-- never silently vanishes. Reconciliation counts these apart from unpublished events, and
-- reports one found on the broker or in an inbox as a breach. `reason` is the refusal as the
-- policy worded it (ResidencyViolationError). The event's payload stays in events.events.
CREATE TABLE events.relay_withheld (
  event_id       uuid PRIMARY KEY,
  partition      smallint NOT NULL CHECK (partition >= 0),
  position       bigint NOT NULL,
  transaction_id xid8 NOT NULL,
  stream_type    text NOT NULL,
  stream_id      text NOT NULL,
  region         text NOT NULL,
  location       text NOT NULL,
  reason         text NOT NULL,
  withheld_at    timestamptz NOT NULL DEFAULT now()
);

-- Down Migration
DROP TABLE events.relay_withheld;

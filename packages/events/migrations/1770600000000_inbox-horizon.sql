-- Up Migration

-- Inbox pruning (packages/events `pruneInbox`). A consumer's inbox keeps one row per event it
-- handled, and until 2026-12-08 kept it for good: at thousands of events a second, hundreds of
-- millions of rows a day. Pruning replaces the rows of a prefix of the global order with one
-- horizon per consumer, (transaction_id, position): every event at or before it was handled by
-- the consumer when the prune passed it (its inbox row existed), or is listed in
-- events.inbox_open. A copy of such an event that comes later (a broker redelivery after a
-- consumer reset, a republish, a replay for another consumer) is skipped as a duplicate, as its
-- inbox row would have had it skipped. The claim (EventConsumer) reads the horizon in the
-- statement that inserts its inbox rows, so under one snapshot with them.
--
-- A prune moves the horizon first, then removes the rows it covers only once no snapshot taken
-- before that move is left (every session's xmin is past the move's transaction): a
-- claim whose snapshot predates the move still finds the rows, and one taken after it finds the
-- horizon. `pending_*` is where the rows still to remove begin (exclusive; they end at the
-- horizon), null once they are gone; a prune that stopped between the two steps leaves it set,
-- and the next one removes them first.
CREATE TABLE events.inbox_horizons (
  consumer               text PRIMARY KEY REFERENCES events.consumers (name),
  transaction_id         xid8 NOT NULL,
  position               bigint NOT NULL,
  pending_transaction_id xid8,
  pending_position       bigint,
  -- Inbox rows removed by every prune so far, and when the horizon last moved.
  pruned                 bigint NOT NULL DEFAULT 0,
  updated_at             timestamptz NOT NULL DEFAULT now(),
  CHECK ((pending_transaction_id IS NULL) = (pending_position IS NULL))
);

-- Events at or before a consumer's horizon that it had not handled when the prune passed them:
-- each had a dead letter, which a replay can still bring, or the relay recorded it withheld,
-- which does not prove it never reached the broker. Claiming one removes its row in the claim's
-- statement, and its inbox row takes over.
CREATE TABLE events.inbox_open (
  consumer text NOT NULL REFERENCES events.consumers (name),
  event_id uuid NOT NULL,
  PRIMARY KEY (consumer, event_id)
);

-- Whether a consumer handled an event, as the inbox and its horizon together say: an inbox
-- row, or at or before the horizon and not open. For the readers of the inbox (dead-letter
-- replay, the consumer's repeated-delivery path); the claim and reconciliation say the same in
-- their own statements.
CREATE FUNCTION events.inbox_handled(p_consumer text, p_event_id uuid, p_transaction_id xid8, p_position bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (SELECT 1 FROM events.inbox i WHERE i.consumer = p_consumer AND i.event_id = p_event_id)
      OR (EXISTS (SELECT 1 FROM events.inbox_horizons h
                   WHERE h.consumer = p_consumer AND (p_transaction_id, p_position) <= (h.transaction_id, h.position))
          AND NOT EXISTS (SELECT 1 FROM events.inbox_open o WHERE o.consumer = p_consumer AND o.event_id = p_event_id))
$$;

-- Retention's deleted events keep their place in the global order from now on, so that the
-- prune can hold a consumer to one it had not handled when retention deleted it (its copy may
-- still be on the broker), and whether the relay had withheld it (retention deletes the relay's
-- record with the stream; such an event is owed to nobody). Rows from before have no place: the
-- prune refuses to pass anything while a consumer owes one of those. NOT VALID: those rows stay,
-- while a retention of the release before, still running, fails instead of writing a row the
-- prune could not place (a review proved it could delete an owed event in the middle of a prune,
-- which then passed it).
ALTER TABLE events.deleted_events ADD COLUMN transaction_id xid8;
ALTER TABLE events.deleted_events ADD COLUMN withheld boolean NOT NULL DEFAULT false;
ALTER TABLE events.deleted_events ADD CONSTRAINT deleted_events_placed CHECK (transaction_id IS NOT NULL) NOT VALID;
CREATE INDEX deleted_events_global_order_idx ON events.deleted_events (transaction_id, position) WHERE transaction_id IS NOT NULL;

-- When an instance of this release (whose claim reads the horizon) first registered the
-- consumer (registerConsumer sets it once). A prune refuses
-- a consumer none of whose instances ever recorded it: an instance of the release before claims
-- without the horizon, and would take the copy of a pruned event again.
ALTER TABLE events.consumers ADD COLUMN horizon_claims_since timestamptz;

-- Down Migration
DO $$
BEGIN
  -- Without the horizons, the copies of every pruned event would be applied again.
  IF EXISTS (SELECT 1 FROM events.inbox_horizons WHERE position > 0) THEN
    RAISE EXCEPTION 'events.inbox_horizons holds pruned inboxes: without it, a copy of an event whose inbox row was pruned would take effect again';
  END IF;
END $$;
ALTER TABLE events.consumers DROP COLUMN horizon_claims_since;
DROP INDEX events.deleted_events_global_order_idx;
ALTER TABLE events.deleted_events DROP CONSTRAINT deleted_events_placed;
ALTER TABLE events.deleted_events DROP COLUMN withheld;
ALTER TABLE events.deleted_events DROP COLUMN transaction_id;
DROP FUNCTION events.inbox_handled(text, uuid, xid8, bigint);
DROP TABLE events.inbox_open;
DROP TABLE events.inbox_horizons;

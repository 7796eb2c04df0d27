-- Up Migration

-- Inbox pruning (packages/events `pruneInbox`). A consumer's inbox keeps one row per event it
-- handled, and until 2026-12-08 kept it for good: at thousands of events a second, hundreds of
-- millions of rows a day. Pruning replaces the rows of a prefix of the global order with one
-- horizon per consumer, (transaction_id, position): every event at or before it was handled by
-- the consumer when the prune passed it (its inbox row existed, and the prune removed it),
-- withheld by the relay (never published), or listed in events.inbox_open. A copy of such an
-- event that comes later (a broker redelivery after a consumer reset, a republish, a replay for
-- another consumer) is skipped as a duplicate, as an inbox row would have had it skipped.
-- The prune passes only events below the read horizon, so no transaction still running can add
-- an event at or before a consumer's horizon.
CREATE TABLE events.inbox_horizons (
  consumer       text PRIMARY KEY REFERENCES events.consumers (name),
  transaction_id xid8 NOT NULL,
  position       bigint NOT NULL,
  -- Inbox rows removed by every prune so far, and when the horizon last moved.
  pruned         bigint NOT NULL DEFAULT 0,
  updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Events at or before a consumer's horizon that it had not handled when the prune passed them:
-- each had a dead letter, which a replay can still bring. Claiming one removes its row in the
-- claim's transaction, and its inbox row takes over.
CREATE TABLE events.inbox_open (
  consumer text NOT NULL REFERENCES events.consumers (name),
  event_id uuid NOT NULL,
  PRIMARY KEY (consumer, event_id)
);

-- The consumer's horizon, read by every claim transaction before it claims (EventConsumer),
-- after a transaction-scoped shared advisory lock of class 0x4c4c4942 ("LLIB") on the
-- consumer, which the prune takes exclusively while it removes inbox rows and moves the
-- horizon. So a claim either ended before the prune removed anything, or reads the moved
-- horizon: the lock is taken first, and this function's query, in a VOLATILE function, takes a
-- snapshot of its own after it (in READ COMMITTED). Without the lock a claim whose snapshot
-- predates the prune's commit could find neither the inbox row the prune removed nor the
-- horizon that replaced it, and apply the event again.
CREATE FUNCTION events.inbox_claim_horizon(p_consumer text) RETURNS TABLE (horizon_transaction_id xid8, horizon_position bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM pg_advisory_xact_lock_shared(1280067906, hashtext(p_consumer));
  RETURN QUERY SELECT h.transaction_id, h.position FROM events.inbox_horizons h WHERE h.consumer = p_consumer;
END $$;

-- Whether a consumer handled an event, as the inbox and its horizon together say: an inbox
-- row, or at or before the horizon and not open. For the readers of the inbox (reconciliation,
-- dead-letter replay); a claim does the same in the consumer.
CREATE FUNCTION events.inbox_handled(p_consumer text, p_event_id uuid, p_transaction_id xid8, p_position bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (SELECT 1 FROM events.inbox i WHERE i.consumer = p_consumer AND i.event_id = p_event_id)
      OR (EXISTS (SELECT 1 FROM events.inbox_horizons h
                   WHERE h.consumer = p_consumer AND (p_transaction_id, p_position) <= (h.transaction_id, h.position))
          AND NOT EXISTS (SELECT 1 FROM events.inbox_open o WHERE o.consumer = p_consumer AND o.event_id = p_event_id))
$$;

-- Down Migration
DROP FUNCTION events.inbox_handled(text, uuid, xid8, bigint);
DROP FUNCTION events.inbox_claim_horizon(text);
DROP TABLE events.inbox_open;
DROP TABLE events.inbox_horizons;

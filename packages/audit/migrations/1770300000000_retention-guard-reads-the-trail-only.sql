-- Up Migration

-- The retention guard reads the trail's own tables only, never the event store's. A shortening
-- of `financial` retention is refused while anything is still owed the longer one, and the
-- guard also read events.events and events.archived_events for it, as whoever changes the
-- policy: the audit schema's owner (or a superuser). Those tables belong to the service's
-- login, and a read of a table can run code its owner attached: a row-level security policy's
-- function, an immutable function in an index expression or predicate or in an extended
-- statistics expression (the planner folds those as the reader), a child table's. Reviews
-- reproduced all three: the login's code ran as the owner during the change, where it could
-- hide the events that should refuse the shortening, queue a forged governance record that the
-- trail then takes as the database's (migration 1770200000000), or do anything else the owner
-- may. A list of what to refuse does not close that (a statistics object, a lock held while the
-- catalog is read, a child table each got past one), so the guard no longer reads them.
--
-- What it still reads for `financial`: the records, the queue and the tiles of integrated
-- events (audit.event_leaves, their recorded times). What it gives up: events the sequencer has
-- not integrated yet (its lag, normally about a second, longer while it is stopped). A
-- shortening of `financial` is allowed only once no integrated event is within the old
-- retention, that is after years without a financial event; an event that arrives in that
-- moment is integrated after the shortening, and its leaf, signed after it, is under the new
-- policy, which is what verification and event-store retention judge by.
CREATE OR REPLACE FUNCTION audit.retention_still_owed(p_class text, p_days integer) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, audit AS $$
DECLARE
  -- Records that occurred after this are still owed the old retention (NULL: for ever, all).
  cutoff timestamptz := CASE WHEN p_days IS NULL THEN '-infinity'::timestamptz ELSE now() - make_interval(days => p_days) END;
BEGIN
  IF EXISTS (SELECT 1 FROM audit.records WHERE record_class = p_class AND occurred_at > cutoff) THEN RETURN true; END IF;
  -- Queued entries get their class's policy once integrated; the text test over-matches
  -- rather than parse rows the sequencer may yet reject.
  IF EXISTS (SELECT 1 FROM audit.queue WHERE strpos(entry, '"recordClass":' || to_json(p_class)::text) > 0) THEN RETURN true; END IF;
  -- Integrated events are leaves of class financial; archived ones still verify, and their
  -- tiles stay. (The event store itself is not read: see above.)
  IF p_class = 'financial' AND EXISTS (SELECT 1 FROM audit.event_leaves WHERE last_recorded_at > cutoff) THEN RETURN true; END IF;
  RETURN false;
END
$$;

-- Down Migration
CREATE OR REPLACE FUNCTION audit.retention_still_owed(p_class text, p_days integer) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, audit AS $$
DECLARE
  -- Records that occurred after this are still owed the old retention (NULL: for ever, all).
  cutoff timestamptz := CASE WHEN p_days IS NULL THEN '-infinity'::timestamptz ELSE now() - make_interval(days => p_days) END;
  found boolean;
BEGIN
  IF EXISTS (SELECT 1 FROM audit.records WHERE record_class = p_class AND occurred_at > cutoff) THEN RETURN true; END IF;
  -- Queued entries get their class's policy once integrated; the text test over-matches
  -- rather than parse rows the sequencer may yet reject.
  IF EXISTS (SELECT 1 FROM audit.queue WHERE strpos(entry, '"recordClass":' || to_json(p_class)::text) > 0) THEN RETURN true; END IF;
  IF p_class = 'financial' THEN
    IF EXISTS (SELECT 1 FROM audit.event_leaves WHERE last_recorded_at > cutoff) THEN RETURN true; END IF;
    -- Events are leaves of class financial, integrated or about to be; archived ones still verify.
    IF to_regclass('events.events') IS NOT NULL THEN
      EXECUTE 'SELECT EXISTS (SELECT 1 FROM events.events WHERE recorded_at > $1)' INTO found USING cutoff;
      IF found THEN RETURN true; END IF;
    END IF;
    IF to_regclass('events.archived_events') IS NOT NULL THEN
      EXECUTE 'SELECT EXISTS (SELECT 1 FROM events.archived_events WHERE recorded_at > $1)' INTO found USING cutoff;
      IF found THEN RETURN true; END IF;
    END IF;
  END IF;
  RETURN false;
END
$$;

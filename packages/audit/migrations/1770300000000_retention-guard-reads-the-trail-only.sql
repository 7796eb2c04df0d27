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
-- What it reads for `financial` instead: the records, the queue, the tiles of integrated events
-- (audit.event_leaves, their recorded times), and how far the event store has numbered its
-- events against how far the sequencer has integrated them. The last is two numbers, read
-- without reading a table: the last value of the identity sequence that numbers
-- events.events.position (a sequence runs no code) and the sequencer's cursor
-- (audit.sequencer_state). A shortening is refused while the store has numbered an event past
-- the cursor: an event not yet integrated may be within the old retention, and its leaf, signed
-- after the change, would be judged by the new one. The comparison errs towards refusing (a
-- number a rolled-back insert used, or an event of an earlier transaction integrated with a
-- higher number than the cursor's, refuses until the next event is integrated); it misses only
-- an event whose transaction has not committed yet, or one numbered below the cursor that a
-- transaction begun before the cursor's commits afterwards: events of that moment, which the
-- next round integrates. The owner needs SELECT on that sequence (granted by the event store's
-- owner); without it, a shortening of `financial` is refused, saying so.
CREATE OR REPLACE FUNCTION audit.retention_still_owed(p_class text, p_days integer) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, audit AS $$
DECLARE
  -- Records that occurred after this are still owed the old retention (NULL: for ever, all).
  cutoff timestamptz := CASE WHEN p_days IS NULL THEN '-infinity'::timestamptz ELSE now() - make_interval(days => p_days) END;
  numbering regclass;
  numbered bigint;
BEGIN
  IF EXISTS (SELECT 1 FROM audit.records WHERE record_class = p_class AND occurred_at > cutoff) THEN RETURN true; END IF;
  -- Queued entries get their class's policy once integrated; the text test over-matches
  -- rather than parse rows the sequencer may yet reject.
  IF EXISTS (SELECT 1 FROM audit.queue WHERE strpos(entry, '"recordClass":' || to_json(p_class)::text) > 0) THEN RETURN true; END IF;
  IF p_class <> 'financial' THEN RETURN false; END IF;
  -- Integrated events are leaves of class financial; archived ones still verify, and their
  -- tiles stay.
  IF EXISTS (SELECT 1 FROM audit.event_leaves WHERE last_recorded_at > cutoff) THEN RETURN true; END IF;
  -- Events the sequencer has not integrated yet (see above). The event store's tables are not
  -- read: only the catalog and the sequence's last value.
  IF to_regclass('events.events') IS NULL THEN RETURN false; END IF;
  numbering := pg_get_serial_sequence('events.events', 'position')::regclass;
  IF numbering IS NULL OR NOT has_sequence_privilege(numbering, 'SELECT') THEN
    RAISE EXCEPTION 'audit.retention_policies: financial retention cannot be shortened: this role cannot see how far the event store has numbered its events (%), so whether the sequencer has integrated them all',
      coalesce(numbering::text, 'events.events has no identity sequence')
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'The event store''s owner grants SELECT on its position sequence to the role that changes policies.';
  END IF;
  numbered := pg_sequence_last_value(numbering);
  RETURN numbered IS NOT NULL AND numbered > (SELECT s.event_position FROM audit.sequencer_state s);
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

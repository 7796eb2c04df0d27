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
-- events.events.position (a sequence runs no code), found through the catalog (pg_depend:
-- no USAGE on the event store's schema is needed), and the sequencer's cursor
-- (audit.sequencer_state). A shortening is refused while the store has numbered an event past
-- the cursor's position: an event not yet integrated may be within the old retention, and its
-- leaf, signed after the change, would be judged by the new one. The owner needs SELECT on that
-- sequence (granted by the event store's owner); without it a shortening of `financial` is
-- refused, saying so.
--
-- The comparison errs towards refusing: a number used by no committed event (a rolled-back
-- insert, an append refused for its expected version) refuses until the next event is
-- integrated, which in a class idle for its whole retention restarts that retention. And it
-- misses an event numbered at or below the cursor's position whose transaction commits after
-- the cursor passed that number (the global order is by transaction id first): such an event
-- waits for the read horizon, which a transaction held open keeps back for as long as it stays
-- open, and is integrated after the change, under the new policy. The event store's owner can
-- also make the guard see nothing (restart the sequence, move the table); it can delete events
-- the sequencer has not integrated in any case.
CREATE OR REPLACE FUNCTION audit.retention_still_owed(p_class text, p_days integer) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, audit AS $$
DECLARE
  -- Records that occurred after this are still owed the old retention (NULL: for ever, all).
  cutoff timestamptz := CASE WHEN p_days IS NULL THEN '-infinity'::timestamptz ELSE now() - make_interval(days => p_days) END;
  numbering oid;
  numbered bigint;
  cursor_position bigint;
BEGIN
  IF EXISTS (SELECT 1 FROM audit.records WHERE record_class = p_class AND occurred_at > cutoff) THEN RETURN true; END IF;
  -- Queued entries get their class's policy once integrated; the text test over-matches
  -- rather than parse rows the sequencer may yet reject.
  IF EXISTS (SELECT 1 FROM audit.queue WHERE strpos(entry, '"recordClass":' || to_json(p_class)::text) > 0) THEN RETURN true; END IF;
  IF p_class <> 'financial' THEN RETURN false; END IF;
  -- Integrated events are leaves of class financial; archived ones still verify, and their
  -- tiles stay.
  IF EXISTS (SELECT 1 FROM audit.event_leaves WHERE last_recorded_at > cutoff) THEN RETURN true; END IF;
  -- Events the sequencer has not integrated yet (see above): the event store's tables are not
  -- read, only the catalog and the sequence. No event store in this database: nothing to wait for.
  IF NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'events' AND c.relname = 'events') THEN
    RETURN false;
  END IF;
  SELECT d.objid INTO numbering
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'position' AND NOT a.attisdropped
    JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid AND d.refobjsubid = a.attnum
                    AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
    JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
   WHERE n.nspname = 'events' AND c.relname = 'events';
  IF numbering IS NULL OR NOT has_sequence_privilege(numbering, 'SELECT') THEN
    RAISE EXCEPTION 'audit.retention_policies: financial retention cannot be shortened: this role cannot see how far the event store has numbered its events (%), so whether the sequencer has integrated them all',
      coalesce(numbering::regclass::text, 'events.events.position has no sequence')
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'The event store''s owner grants SELECT on its position sequence to the role that changes policies.';
  END IF;
  numbered := pg_sequence_last_value(numbering::regclass);
  SELECT s.event_position INTO cursor_position FROM audit.sequencer_state s;
  IF numbered IS NOT NULL AND numbered > cursor_position THEN
    RAISE EXCEPTION 'audit.retention_policies: financial retention cannot be shortened yet: the event store has numbered events up to % and the sequencer has integrated up to %; events not yet integrated may be owed the longer retention', numbered, cursor_position
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Try again once the sequencer has caught up. A number no committed event took (a rolled-back append) holds until the next event is integrated.';
  END IF;
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

-- Up Migration

-- The retention guard reads the event store without running its owner's code. A shortening of
-- `financial` retention is refused while an event or an archived event is still owed the
-- longer one, so the guard reads events.events and events.archived_events as whoever changes
-- the policy: the audit schema's owner (or a superuser). Those tables belong to the service's
-- login, which may attach code to them that runs as the reader. A row-level security policy's
-- function planted there ran as the audit owner during the change (a review's reproduction):
-- it could hide the recent events that should refuse the shortening, queue a forged governance
-- record that the trail then takes as the database's (migration 1770200000000), or switch the
-- log's guards off.
--
-- The guard now reads such a table only when a read cannot run code of its owner's making, as
-- far as PostgreSQL offers ways to: with `row_security = off` (a read a policy would apply to
-- fails instead of running it), ONLY the named table (no child table is scanned), with
-- constraint exclusion limited to partitions (no CHECK expression is planned), and only a plain
-- table whose recorded_at is a built-in timestamptz (not a view, a foreign table, a domain or a
-- type with operators of its own) and none of whose indexes has an expression or a predicate
-- (the planner folds those, calling an immutable function with constant arguments as the
-- reader). Otherwise it refuses the shortening: a guard that cannot read the event store safely
-- allows no shortening of `financial`. (The sequencer, for the same reason, reads the event
-- store as the service's login, never as a role of the trail's.)
CREATE OR REPLACE FUNCTION audit.retention_still_owed(p_class text, p_days integer) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, audit SET row_security = off SET constraint_exclusion = partition AS $$
DECLARE
  -- Records that occurred after this are still owed the old retention (NULL: for ever, all).
  cutoff timestamptz := CASE WHEN p_days IS NULL THEN '-infinity'::timestamptz ELSE now() - make_interval(days => p_days) END;
  found boolean;
  event_table text;
BEGIN
  IF EXISTS (SELECT 1 FROM audit.records WHERE record_class = p_class AND occurred_at > cutoff) THEN RETURN true; END IF;
  -- Queued entries get their class's policy once integrated; the text test over-matches
  -- rather than parse rows the sequencer may yet reject.
  IF EXISTS (SELECT 1 FROM audit.queue WHERE strpos(entry, '"recordClass":' || to_json(p_class)::text) > 0) THEN RETURN true; END IF;
  IF p_class = 'financial' THEN
    IF EXISTS (SELECT 1 FROM audit.event_leaves WHERE last_recorded_at > cutoff) THEN RETURN true; END IF;
    -- Events are leaves of class financial, integrated or about to be; archived ones still verify.
    FOREACH event_table IN ARRAY ARRAY['events.events', 'events.archived_events'] LOOP
      CONTINUE WHEN to_regclass(event_table) IS NULL;
      IF NOT EXISTS (
        SELECT 1 FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
         WHERE c.oid = to_regclass(event_table) AND c.relkind = 'r'
           AND a.attname = 'recorded_at' AND NOT a.attisdropped AND a.atttypid = 'pg_catalog.timestamptz'::pg_catalog.regtype
      ) OR EXISTS (
        SELECT 1 FROM pg_index i WHERE i.indrelid = to_regclass(event_table) AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)
      ) THEN
        RAISE EXCEPTION 'audit.retention_policies: % is not a plain table with a timestamptz recorded_at and indexes on columns only, so the retention guard cannot read it without risking code of its owner; financial retention is not shortened', event_table
          USING ERRCODE = 'insufficient_privilege';
      END IF;
      EXECUTE format('SELECT EXISTS (SELECT 1 FROM ONLY %s WHERE recorded_at > $1)', event_table) INTO found USING cutoff;
      IF found THEN RETURN true; END IF;
    END LOOP;
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

-- Up Migration

-- The same rules for names, checked for a tenth of the cost. PostgreSQL's regular expressions
-- expand a bounded repetition into that many copies of its states, and build the automaton
-- again for every string they test: `stream_type ~ '^[a-z][a-z0-9_.-]{0,62}$'` cost 3.5 µs a
-- row on a 2-core machine, where `~ '^[a-z][a-z0-9_.-]*$'` with a length test costs 0.35 µs.
-- Every event appended paid it, one sixth of the append's PostgreSQL CPU. Every constraint here
-- accepts exactly the strings its predecessor accepted (test/name-checks.test.ts holds them to
-- it at the boundaries).
--
-- NOT VALID: replacing a check takes the table's ACCESS EXCLUSIVE lock, and validating
-- events.events under it would stop every append for a full scan. Rows written from now on are
-- checked at once; the next migration validates the old rows under a lock that lets appends
-- and reads go on.
ALTER TABLE events.events
  DROP CONSTRAINT events_stream_type_check,
  ADD CONSTRAINT events_stream_type_check CHECK (stream_type ~ '^[a-z][a-z0-9_.-]*$' AND length(stream_type) <= 63) NOT VALID;
ALTER TABLE events.consumers
  DROP CONSTRAINT consumers_name_check,
  ADD CONSTRAINT consumers_name_check CHECK (name ~ '^[a-z][a-z0-9_-]*$' AND length(name) <= 63) NOT VALID;
ALTER TABLE events.projections
  DROP CONSTRAINT projections_name_check,
  ADD CONSTRAINT projections_name_check CHECK (name ~ '^[a-z][a-z0-9_]*$' AND length(name) <= 41) NOT VALID;
ALTER TABLE events.stream_regions
  DROP CONSTRAINT stream_regions_region_check,
  ADD CONSTRAINT stream_regions_region_check CHECK (region ~ '^[a-z][a-z0-9-]*$' AND length(region) <= 32) NOT VALID;

-- Down Migration
-- The old checks, validated as they are added (a full scan of each table under its lock).
ALTER TABLE events.stream_regions
  DROP CONSTRAINT stream_regions_region_check,
  ADD CONSTRAINT stream_regions_region_check CHECK (region ~ '^[a-z][a-z0-9-]{0,31}$');
ALTER TABLE events.projections
  DROP CONSTRAINT projections_name_check,
  ADD CONSTRAINT projections_name_check CHECK (name ~ '^[a-z][a-z0-9_]{0,40}$');
ALTER TABLE events.consumers
  DROP CONSTRAINT consumers_name_check,
  ADD CONSTRAINT consumers_name_check CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$');
ALTER TABLE events.events
  DROP CONSTRAINT events_stream_type_check,
  ADD CONSTRAINT events_stream_type_check CHECK (stream_type ~ '^[a-z][a-z0-9_.-]{0,62}$');

-- Up Migration

-- Validates the old rows against the checks the previous migration put in place. VALIDATE
-- CONSTRAINT holds SHARE UPDATE EXCLUSIVE, which lets appends, reads and the relay go on
-- during the scan. The rules are the ones the rows were written under, so this cannot fail on
-- rows the old checks let in.
ALTER TABLE events.events VALIDATE CONSTRAINT events_stream_type_check;
ALTER TABLE events.consumers VALIDATE CONSTRAINT consumers_name_check;
ALTER TABLE events.projections VALIDATE CONSTRAINT projections_name_check;
ALTER TABLE events.stream_regions VALIDATE CONSTRAINT stream_regions_region_check;

-- Down Migration
-- Nothing to undo: validating a constraint changes no definition.

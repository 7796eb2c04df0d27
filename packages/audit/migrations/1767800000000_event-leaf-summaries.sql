-- Up Migration

-- Who acted in a tile's events and whether any failed, so that a search by actor or for
-- failures skips the tiles that cannot match instead of reading every event of its time range
-- (event-leaves.ts `searchEventLeaves`), as search defines them:
--   actors    the distinct coalesce(metadata->>'actor', 'unknown'), sorted
--   failures  how many events carry a `result` other than "ok" (outcome "failure")
-- Actions and resource types are left out: a handful of values that nearly every tile holds,
-- each would cost the sequencer as much as the actors (about 0.5 µs an event) and skip nothing.
-- The sequencer computes them in the query that hashes the tile, and they are written once
-- with it. They are an index, not evidence: nothing is hashed or signed over them. A summary
-- that left a value out would hide that tile from search, so verification holds every summary
-- to the events it covers (verify.ts). Tiles integrated before this migration have none
-- (NULL) and search reads them as before.
ALTER TABLE audit.event_leaves
  ADD COLUMN actors text[],
  ADD COLUMN failures integer CHECK (failures >= 0),
  ADD CONSTRAINT event_leaves_summary_whole CHECK ((actors IS NULL) = (failures IS NULL));
-- No index on them: search reads the tiles of its range in order and tests each summary
-- (about 5 µs a tile), where it read every event (about 2 µs an event). A GIN index on actors
-- was tried on 300,000 tiles: the planner kept the ordered scan for a page of a few tiles
-- (1.6 s for an actor in none of them), and a plan forced onto the index would read every tile
-- of a busy actor for each page.

-- Down Migration
ALTER TABLE audit.event_leaves DROP CONSTRAINT event_leaves_summary_whole, DROP COLUMN actors, DROP COLUMN failures;

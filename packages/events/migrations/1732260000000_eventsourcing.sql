-- Up Migration

-- Aggregate snapshots: the latest folded state of a stream, so that loading it reads only the
-- events after `version`. `state_version` is the aggregate's snapshot schema: a snapshot
-- written by an older release is ignored (and replaced), never decoded into the wrong shape.
CREATE TABLE events.snapshots (
  stream_type   text NOT NULL,
  stream_id     text NOT NULL,
  version       integer NOT NULL CHECK (version >= 1),
  state_version smallint NOT NULL CHECK (state_version >= 1),
  state         jsonb NOT NULL,
  taken_at      timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (stream_type, stream_id)
);

-- Asynchronous projections. One row per generation of a projection's read model; the active
-- one is what readers see (through a view) and what the live runner advances. The checkpoint
-- is written in the same transaction as the read model, so each event is applied exactly once.
-- A blue/green rebuild fills generation n + 1 beside the active one, then swaps `active`.
CREATE TABLE events.projections (
  name           text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]{0,40}$'),
  generation     integer NOT NULL CHECK (generation >= 1),
  transaction_id xid8 NOT NULL DEFAULT '0',
  position       bigint NOT NULL DEFAULT 0,
  events_applied bigint NOT NULL DEFAULT 0,
  active         boolean NOT NULL DEFAULT false,
  created_at     timestamptz NOT NULL DEFAULT now(),
  updated_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (name, generation)
);
CREATE UNIQUE INDEX projections_one_active_idx ON events.projections (name) WHERE active;

-- Data residency: the region whose law governs a stream's data. Streams without a row are
-- unrestricted. A tag is set once, by the stream's first append, and never changes: moving
-- data between jurisdictions is a migration with its own legal review, not an update.
CREATE TABLE events.stream_regions (
  stream_type text NOT NULL,
  stream_id   text NOT NULL,
  region      text NOT NULL CHECK (region ~ '^[a-z][a-z0-9-]{0,31}$'),
  tagged_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (stream_type, stream_id)
);

-- Retention: streams moved out of the hot table, with every column kept so that the archive
-- can still be verified and exported. `archived_at` says when.
CREATE TABLE events.archived_events (
  LIKE events.events,
  archived_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (position)
);
CREATE INDEX archived_events_stream_idx ON events.archived_events (stream_type, stream_id, version);

-- Down Migration
DROP TABLE events.archived_events;
DROP TABLE events.stream_regions;
DROP TABLE events.projections;
DROP TABLE events.snapshots;

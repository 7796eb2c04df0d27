-- Up Migration

-- The partition count is fixed for the life of the store: every writer computes an event's
-- partition from its stream the same way, and one relay at a time publishes each partition.
CREATE TABLE events.settings (
  singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  partitions smallint NOT NULL CHECK (partitions BETWEEN 1 AND 256)
);
INSERT INTO events.settings (singleton, partitions) VALUES (true, 4);

-- The event store. `position` is the append order; `transaction_id` is the appending
-- transaction. Readers follow (transaction_id, position) up to the oldest transaction still
-- running (pg_snapshot_xmin), so an event committed late is never skipped: a reader cannot
-- pass a transaction that is still in flight.
CREATE TABLE events.events (
  position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  transaction_id  xid8 NOT NULL DEFAULT pg_current_xact_id(),
  partition       smallint NOT NULL CHECK (partition >= 0),
  event_id        uuid NOT NULL UNIQUE,
  stream_type     text NOT NULL CHECK (stream_type ~ '^[a-z][a-z0-9_.-]{0,62}$'),
  stream_id       text NOT NULL CHECK (length(stream_id) BETWEEN 1 AND 200),
  version         integer NOT NULL CHECK (version >= 1),
  type            text NOT NULL CHECK (length(type) BETWEEN 1 AND 200),
  schema_version  smallint NOT NULL DEFAULT 1 CHECK (schema_version >= 1),
  data            jsonb NOT NULL,
  metadata        jsonb NOT NULL,
  recorded_at     timestamptz NOT NULL DEFAULT now(),
  -- Optimistic concurrency: two appends that expect the same version cannot both insert it.
  CONSTRAINT events_stream_version_key UNIQUE (stream_type, stream_id, version)
);
-- The global order. Relays read one partition at a time through it and skip the others'
-- rows; with a handful of partitions that costs less than an index per partition on every
-- append.
CREATE INDEX events_global_order_idx ON events.events (transaction_id, position);
-- Appends arrive in time order, so a BRIN index serves time-range queries at almost no cost.
CREATE INDEX events_recorded_at_idx ON events.events USING brin (recorded_at);

-- How far each partition has been published; written only after the broker acked.
CREATE TABLE events.relay_checkpoints (
  partition      smallint PRIMARY KEY,
  transaction_id xid8 NOT NULL,
  position       bigint NOT NULL,
  published      bigint NOT NULL DEFAULT 0,
  updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Consumers that reconciliation holds to account.
CREATE TABLE events.consumers (
  name          text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
  registered_at timestamptz NOT NULL DEFAULT now()
);

-- The inbox: an event a consumer handled, recorded in the same transaction as its effects.
-- No foreign key to events.consumers: a consumer registers itself before it claims anything,
-- and the check would cost a third of every claim on the hot path.
CREATE TABLE events.inbox (
  consumer   text NOT NULL,
  event_id   uuid NOT NULL,
  position   bigint NOT NULL,
  handled_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer, event_id)
);

-- Events a consumer gave up on after its bounded retries. Replaying one runs the handler
-- through the inbox as usual, so it still takes effect at most once.
CREATE TABLE events.dead_letters (
  consumer    text NOT NULL REFERENCES events.consumers (name),
  event_id    uuid NOT NULL,
  position    bigint NOT NULL,
  attempts    integer NOT NULL,
  error       text NOT NULL,
  dead_at     timestamptz NOT NULL DEFAULT now(),
  replayed_at timestamptz,
  PRIMARY KEY (consumer, event_id)
);

-- Down Migration
DROP TABLE events.dead_letters;
DROP TABLE events.inbox;
DROP TABLE events.consumers;
DROP TABLE events.relay_checkpoints;
DROP TABLE events.events;
DROP TABLE events.settings;

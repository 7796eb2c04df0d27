-- Up Migration

-- Messages a consumer could not decode as a batch (EventConsumer). They name no event, so
-- events.dead_letters cannot hold them, and there is nothing to replay. The consumer records
-- each here, puts its bytes on the dead-letter stream, and only then acknowledges it, so an
-- operator finds them beside the other dead letters (`events:dlq -- undecodable`). A message
-- on an event subject that is not a batch is a producer's bug or someone else's traffic on our
-- subjects: worth a look either way. One row per consumer and message: a redelivery before the
-- ack adds nothing. The first 4 KiB of the bytes are kept here; the dead-letter stream has all.
CREATE TABLE events.undecodable_messages (
  consumer        text NOT NULL REFERENCES events.consumers (name),
  stream_sequence bigint NOT NULL,
  subject         text NOT NULL,
  error           text NOT NULL,
  size            integer NOT NULL,
  head            bytea NOT NULL,
  dead_at         timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer, stream_sequence)
);

-- Down Migration
DROP TABLE events.undecodable_messages;

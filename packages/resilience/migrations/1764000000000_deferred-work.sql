-- Up Migration
-- Work deferred while a dependency's breaker is open (notifications, reports, webhooks):
-- kept durably so it survives a restart, and handed back when the dependency recovers.
CREATE TABLE resilience.deferred_work (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  queue text NOT NULL CHECK (length(queue) BETWEEN 1 AND 64),
  -- Enqueueing the same (queue, dedupe_key) twice keeps one row: a retried fallback defers once.
  dedupe_key text CHECK (length(dedupe_key) BETWEEN 1 AND 255),
  payload jsonb NOT NULL CHECK (pg_column_size(payload) <= 65536),
  enqueued_at timestamptz NOT NULL DEFAULT now(),
  available_at timestamptz NOT NULL DEFAULT now(),
  attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  last_error text CHECK (length(last_error) <= 1000),
  UNIQUE (queue, dedupe_key)
);

CREATE INDEX deferred_work_ready ON resilience.deferred_work (queue, available_at, id);

-- Down Migration
DROP TABLE resilience.deferred_work;

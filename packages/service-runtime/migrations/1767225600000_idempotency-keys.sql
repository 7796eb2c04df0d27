-- Up Migration

-- HTTP Idempotency-Key records (the service runtime's idempotency plugin). One row per
-- (client, key). A row is 'in_progress' while the first request runs, holding a lease until
-- locked_until; it becomes 'completed' with the final response, which retries replay. Rows are
-- pruned once expires_at has passed.
CREATE TABLE runtime.idempotency_keys (
  client_id           text NOT NULL CHECK (client_id ~ '^[ -~]{1,255}$'),
  key                 text NOT NULL CHECK (key ~ '^[ -~]{1,255}$'),
  -- sha-256 of method, route, params, query and canonical JSON body.
  request_fingerprint bytea NOT NULL CHECK (octet_length(request_fingerprint) = 32),
  state               text NOT NULL CHECK (state IN ('in_progress', 'completed')),
  -- Which claim holds the row: a request whose lease was taken over must not store over the
  -- new holder's response.
  lock_token          uuid NOT NULL,
  response_status     smallint CHECK (response_status BETWEEN 200 AND 499),
  -- Only headers safe to replay (content-type, location), as a JSON object.
  response_headers    jsonb,
  response_body       bytea CHECK (octet_length(response_body) <= 16777216),
  created_at          timestamptz NOT NULL,
  locked_until        timestamptz NOT NULL,
  expires_at          timestamptz NOT NULL CHECK (expires_at > created_at),
  PRIMARY KEY (client_id, key),
  -- A completed row has its whole response; an in-progress row has none of it.
  CHECK (
    (state = 'completed' AND response_status IS NOT NULL AND response_headers IS NOT NULL AND response_body IS NOT NULL)
    OR (state = 'in_progress' AND response_status IS NULL AND response_headers IS NULL AND response_body IS NULL)
  )
);

-- The pruner deletes by expiry in bounded batches.
CREATE INDEX idempotency_keys_expires_at ON runtime.idempotency_keys (expires_at);

-- Up Migration

-- Superseded by 1768000000005 the same day, which takes the 'withdrawn' state out again: a row
-- on the key was no fence (whatever the key went through before a late claim arrived lifted
-- it). Kept, as every migration that has been committed is, for databases that ran it.
--
-- A withdrawn claim: the row a claim statement's failure leaves (idempotency.ts WITHDRAW_SQL).
-- Its requests were answered 503 "not run, retry with the same key", but PostgreSQL may still
-- run the statement: it goes on after its client stops waiting, and one that reaches the
-- server late (a packet held up on its connection) starts after the client has given up. The
-- client deleted such claims by key and token; a statement that arrived after that delete
-- inserted its claim all the same, and the retry was 409 until the claim's lock ran out.
-- Withdrawing inserts a row instead, on the key's unique index: of the claim and its
-- withdrawal, whichever comes second meets the other's row (waiting for it to commit if need
-- be). A claim never takes over its own withdrawal (same token); any other claim takes it over
-- at once, as it would take over an expired key. A withdrawn row holds no response, and is
-- pruned when it expires, as other rows are.
--
-- The check that a row has its whole response or none of it was unnamed in the first
-- migration, and PostgreSQL called it idempotency_keys_check1 (idempotency_keys_check is
-- `expires_at > created_at`); it gets a name now.
--
-- NOT VALID, then validated by the next migration under a lock that lets requests go on.
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_state_check,
  ADD CONSTRAINT idempotency_keys_state_check CHECK (state IN ('in_progress', 'completed', 'withdrawn')) NOT VALID,
  DROP CONSTRAINT idempotency_keys_check1,
  ADD CONSTRAINT idempotency_keys_response_check CHECK (
    (state = 'completed' AND response_status IS NOT NULL AND response_headers IS NOT NULL AND response_body IS NOT NULL)
    OR (state IN ('in_progress', 'withdrawn') AND response_status IS NULL AND response_headers IS NULL AND response_body IS NULL)
  ) NOT VALID;

-- Down Migration
-- A withdrawn row stands for no request that ran: without it the key is simply free.
DELETE FROM runtime.idempotency_keys WHERE state = 'withdrawn';
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_response_check,
  ADD CONSTRAINT idempotency_keys_check1 CHECK (
    (state = 'completed' AND response_status IS NOT NULL AND response_headers IS NOT NULL AND response_body IS NOT NULL)
    OR (state = 'in_progress' AND response_status IS NULL AND response_headers IS NULL AND response_body IS NULL)
  ),
  DROP CONSTRAINT idempotency_keys_state_check,
  ADD CONSTRAINT idempotency_keys_state_check CHECK (state IN ('in_progress', 'completed'));

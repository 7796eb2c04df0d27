-- Up Migration

-- A stored response may be a 5xx: one that says the request may have taken effect (a
-- dependency's call reached it, then failed or ran past the deadline). Freed, as every 5xx
-- was, the retry that answer invites ran the request, and the dependency's call, a second time.
-- The new check accepts every row the old one did.
--
-- NOT VALID, then validated by the next migration under a lock that lets requests go on.
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_response_status_check,
  ADD CONSTRAINT idempotency_keys_response_status_check CHECK (response_status BETWEEN 200 AND 599) NOT VALID;

-- Down Migration
-- Rows of 5xx answers cannot be kept under the old check: they are answers the code that
-- follows it would not replay, so they go, and the key is free again.
DELETE FROM runtime.idempotency_keys WHERE response_status >= 500;
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_response_status_check,
  ADD CONSTRAINT idempotency_keys_response_status_check CHECK (response_status BETWEEN 200 AND 499);

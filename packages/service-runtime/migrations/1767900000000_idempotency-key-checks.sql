-- Up Migration

-- The same rule for client ids and keys (1 to 255 printable ASCII characters), checked for a
-- hundredth of the cost. PostgreSQL's regular expressions expand a bounded repetition into that
-- many copies of its states and build the automaton again for every string they test:
-- `~ '^[ -~]{1,255}$'` on a 36-character key and a client id cost about 75 µs a row on a
-- 2-core machine, and a keyed request checks them twice (the claim inserts the row and its
-- completion updates it, and PostgreSQL checks every CHECK on every update): 460-490 µs of
-- PostgreSQL CPU per keyed request, more than the transfer it guarded. `~ '^[ -~]+$'` with a
-- length test costs under 1 µs. Each constraint accepts exactly the strings its predecessor
-- accepted (test/idempotency-checks.test.ts holds them to it at the boundaries).
--
-- NOT VALID, then validated by the next migration under a lock that lets requests go on.
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_client_id_check,
  ADD CONSTRAINT idempotency_keys_client_id_check CHECK (client_id ~ '^[ -~]+$' AND length(client_id) <= 255) NOT VALID,
  DROP CONSTRAINT idempotency_keys_key_check,
  ADD CONSTRAINT idempotency_keys_key_check CHECK (key ~ '^[ -~]+$' AND length(key) <= 255) NOT VALID;

-- Down Migration
-- The old checks, validated as they are added (a full scan of the table under its lock).
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_client_id_check,
  ADD CONSTRAINT idempotency_keys_client_id_check CHECK (client_id ~ '^[ -~]{1,255}$'),
  DROP CONSTRAINT idempotency_keys_key_check,
  ADD CONSTRAINT idempotency_keys_key_check CHECK (key ~ '^[ -~]{1,255}$');

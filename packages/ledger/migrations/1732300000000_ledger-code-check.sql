-- Up Migration

-- The same rule for ledger codes without a bounded repetition (`{2,11}`). PostgreSQL's regular
-- expressions expand one into that many copies of its states and build the automaton again
-- for every string they test; on the event store's and the idempotency table's checks that
-- cost 3.5 to 75 µs a row. This one is short and only runs when a ledger is added, so it cost
-- little (0.5 µs), but no check in the schema uses a bounded repetition now, and a test holds
-- every package to that (services/ledger/test/schema-checks.test.ts). It accepts exactly the
-- codes the old check accepted (test/ledger-code-check.test.ts). The table holds a row per
-- currency: validated as the constraint is added.
ALTER TABLE ledger.ledgers
  DROP CONSTRAINT ledgers_code_check,
  ADD CONSTRAINT ledgers_code_check CHECK (code ~ '^[A-Z][A-Z0-9]*$' AND length(code) BETWEEN 3 AND 12);

-- Down Migration
ALTER TABLE ledger.ledgers
  DROP CONSTRAINT ledgers_code_check,
  ADD CONSTRAINT ledgers_code_check CHECK (code ~ '^[A-Z][A-Z0-9]{2,11}$');

-- Up Migration

-- Ledgers: one asset or currency each, with the explicit number of minor-unit digits.
CREATE TABLE ledger.ledgers (
  code        text PRIMARY KEY CHECK (code ~ '^[A-Z][A-Z0-9]{2,11}$'),
  scale       smallint NOT NULL CHECK (scale BETWEEN 0 AND 18),
  description text NOT NULL DEFAULT ''
);

-- ISO 4217 minor units for the currencies the reference system ships with.
INSERT INTO ledger.ledgers (code, scale, description) VALUES
  ('USD', 2, 'US dollar'),
  ('EUR', 2, 'Euro'),
  ('GBP', 2, 'Pound sterling'),
  ('CHF', 2, 'Swiss franc'),
  ('JPY', 0, 'Yen'),
  ('KWD', 3, 'Kuwaiti dinar'),
  ('SEK', 2, 'Swedish krona'),
  ('PLN', 2, 'Zloty');

-- The ledger clock: one row. Every write batch takes this row's lock last, right before it
-- writes, and keeps it until commit. Timestamps therefore increase strictly in commit order,
-- across every engine instance, and the write phase of all batches is serial (as in
-- TigerBeetle), while the read and lock phases of concurrent batches overlap.
CREATE TABLE ledger.clock (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  timestamp bigint NOT NULL CHECK (timestamp >= 0)
);
INSERT INTO ledger.clock (singleton, timestamp) VALUES (true, 0);

-- Account flags (bit mask, shared with the engine's AccountFlag constants):
--   2 debits_must_not_exceed_credits, 4 credits_must_not_exceed_debits, 32 closed.
CREATE TABLE ledger.accounts (
  id              uuid PRIMARY KEY,
  ledger          text NOT NULL REFERENCES ledger.ledgers (code),
  code            integer NOT NULL CHECK (code BETWEEN 1 AND 65535),
  flags           integer NOT NULL CHECK (flags & ~(2 | 4 | 32) = 0),
  metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
  debits_pending  bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
  debits_posted   bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
  credits_pending bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
  credits_posted  bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
  timestamp       bigint NOT NULL UNIQUE,
  CHECK (id <> '00000000-0000-0000-0000-000000000000'),
  CHECK ((flags & 6) <> 6),
  -- The flag constraints are asserted by the database as well as by the engine: a bug in
  -- the engine aborts the batch instead of corrupting the books.
  CHECK ((flags & 2) = 0 OR debits_pending::numeric + debits_posted <= credits_posted),
  CHECK ((flags & 4) = 0 OR credits_pending::numeric + credits_posted <= debits_posted)
)
-- Every transfer rewrites two account rows. Free space on each page lets PostgreSQL keep the
-- new version on the same page (a HOT update), so the indexes are not touched at all.
WITH (fillfactor = 70);

-- Transfers, applied and rejected. A rejection decided against stored state is recorded with
-- its result so that the id stays failed: a retry can never turn it into a success.
-- Transfer flags (bit mask, shared with the engine's TransferFlag constants):
--   1 linked, 2 pending, 4 post_pending_transfer, 8 void_pending_transfer,
--   16 balancing_debit, 32 balancing_credit, 64 closing_debit, 128 closing_credit.
CREATE TABLE ledger.transfers (
  id                uuid PRIMARY KEY,
  debit_account_id  uuid,
  credit_account_id uuid,
  amount            bigint NOT NULL CHECK (amount >= 0),
  amount_requested  bigint CHECK (amount_requested > 0),
  pending_id        uuid,
  ledger            text,
  code              integer CHECK (code BETWEEN 1 AND 65535),
  flags             integer NOT NULL CHECK (flags & ~255 = 0),
  timeout_seconds   integer NOT NULL DEFAULT 0 CHECK (timeout_seconds >= 0),
  metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
  timestamp         bigint NOT NULL,
  result            text NOT NULL,
  -- Pending transfers only: pending, posted, voided or expired; when it expires; and the
  -- timestamp at which it stopped being pending.
  pending_status    text CHECK (pending_status IN ('pending', 'posted', 'voided', 'expired')),
  expires_at        bigint,
  resolved_at       bigint,
  CHECK ((pending_status IS NOT NULL) = (result = 'ok' AND (flags & 2) <> 0)),
  CHECK (result <> 'ok' OR (debit_account_id IS NOT NULL AND credit_account_id IS NOT NULL
                            AND debit_account_id <> credit_account_id AND amount > 0
                            AND ledger IS NOT NULL AND code IS NOT NULL))
);

CREATE INDEX transfers_debit_account_idx ON ledger.transfers (debit_account_id, timestamp)
  WHERE result = 'ok';
CREATE INDEX transfers_credit_account_idx ON ledger.transfers (credit_account_id, timestamp)
  WHERE result = 'ok';
CREATE INDEX transfers_expiry_idx ON ledger.transfers (expires_at)
  WHERE pending_status = 'pending' AND expires_at IS NOT NULL;

-- Down Migration
DROP TABLE ledger.transfers;
DROP TABLE ledger.accounts;
DROP TABLE ledger.clock;
DROP TABLE ledger.ledgers;

-- Up Migration

-- The ledger clock becomes a sequence. The clock row's lock was held from each batch's open to
-- its commit, so the write phase of every batch on the server was serial: one PostgreSQL
-- backend busy at a time, whatever the number of cores. Timestamps only need to increase in
-- commit order per account, and a batch already holds the lock of every account it touches
-- from before it reserves its timestamps until it commits. A reservation therefore needs to
-- be atomic, not to last until commit.
--
-- Sequences are not transactional: a reservation survives its batch's rollback (leaving a gap,
-- which strictly increasing timestamps allow) and blocks no one after it returns. setval is
-- WAL-logged, and a batch's commit record follows its reservation in the WAL, so after a crash
-- the sequence is past every timestamp of every committed batch.
CREATE SEQUENCE ledger.timestamps AS bigint MINVALUE 0 NO CYCLE;
SELECT setval('ledger.timestamps', (SELECT timestamp FROM ledger.clock), true);
DROP TABLE ledger.clock;

-- Reserves `count` consecutive timestamps at or after `now_ns`, after every timestamp reserved
-- before; returns the first. A session advisory lock makes the read and the setval one atomic
-- step across every backend, for microseconds: it is released before the function returns,
-- also on an error or a cancel, and by the server if the session ends.
CREATE FUNCTION ledger.reserve_timestamps(count bigint, now_ns bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  lock_key constant bigint := hashtextextended('ledger.timestamps', 0);
  last_issued bigint;
  new_last bigint;
BEGIN
  IF count IS NULL OR count < 1 OR now_ns IS NULL OR now_ns < 0 THEN
    RAISE EXCEPTION 'reserve_timestamps: count must be positive and now_ns non-negative (got %, %)', count, now_ns
      USING ERRCODE = '22023';
  END IF;
  PERFORM pg_advisory_lock(lock_key);
  BEGIN
    SELECT last_value INTO last_issued FROM ledger.timestamps;
    new_last := greatest(last_issued + count, now_ns + count - 1);
    PERFORM setval('ledger.timestamps', new_last, true);
  EXCEPTION WHEN OTHERS OR query_canceled THEN
    PERFORM pg_advisory_unlock(lock_key);
    RAISE;
  END;
  PERFORM pg_advisory_unlock(lock_key);
  RETURN new_last - count + 1;
END
$$;

-- Down Migration
DROP FUNCTION ledger.reserve_timestamps(bigint, bigint);
CREATE TABLE ledger.clock (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  timestamp bigint NOT NULL CHECK (timestamp >= 0)
);
INSERT INTO ledger.clock (singleton, timestamp) SELECT true, last_value FROM ledger.timestamps;
DROP SEQUENCE ledger.timestamps;

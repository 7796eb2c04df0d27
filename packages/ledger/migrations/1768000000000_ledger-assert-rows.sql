-- Up Migration

-- A batch's write, its events and COMMIT travel to the server as one query (LedgerEngine), so
-- the write must check its own result before COMMIT runs: the engine can no longer look at
-- the row counts between the two. The write statement passes what it changed and what it
-- expected to this function, which raises (and so rolls the whole transaction back) when they
-- differ: a batch whose rows did not all land never commits. XX000 is PostgreSQL's
-- internal_error: a bug, never retried as the database's weather.
CREATE FUNCTION ledger.assert_rows(what text, actual bigint, expected bigint) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
  IF actual IS DISTINCT FROM expected THEN
    RAISE EXCEPTION 'invariant: batch write mismatch (% %/%)', what, actual, expected USING ERRCODE = 'XX000';
  END IF;
  RETURN 0;
END $$;

-- Down Migration
DROP FUNCTION ledger.assert_rows(text, bigint, bigint);

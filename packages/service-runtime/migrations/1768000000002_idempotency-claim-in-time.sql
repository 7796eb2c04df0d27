-- Up Migration

-- A claim statement that would finish after its caller's deadline fails instead, so that
-- nothing of it commits. The caller has answered 503 "not run, retry with the same key" by then
-- (the client stops waiting at its query timeout; PostgreSQL goes on with the statement), and a
-- claim that committed late, a key inserted before the statement waited on another's row lock
-- or a takeover after it, answered that retry 409 until its lock ran out. The statement calls
-- this once, after its last row (idempotency.ts CLAIM_SQL), with the milliseconds its caller
-- had left when it sent the statement. They count from transaction_timestamp(): the claim is a
-- statement of its own, in an implicit transaction that begins when its Parse message arrives.
-- Not statement_timestamp(), which the extended protocol sets again at Execute: a Parse that
-- waited on a table lock (a CREATE INDEX, a migration's ALTER TABLE in the lock queue) would
-- have started the count after the wait, when the client had long given up.
CREATE FUNCTION runtime.claim_in_time(p_remaining_ms double precision) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF clock_timestamp() >= transaction_timestamp() + make_interval(secs => p_remaining_ms / 1000) THEN
    RAISE EXCEPTION 'idempotency claim finished after its caller''s deadline (% ms): rolled back', p_remaining_ms
      USING ERRCODE = 'query_canceled';
  END IF;
  RETURN true;
END
$$;

-- Down Migration
DROP FUNCTION runtime.claim_in_time(double precision);

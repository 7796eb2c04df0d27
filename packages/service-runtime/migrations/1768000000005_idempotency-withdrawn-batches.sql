-- Up Migration

-- Withdrawn claim statements, fenced by batch (idempotency.ts). Replaces the 'withdrawn' state
-- of 1768000000003: no row of that state is left, and the checks go back to the two states
-- (NOT VALID here, validated by the next migration under a lock that lets requests go on).
DELETE FROM runtime.idempotency_keys WHERE state = 'withdrawn';
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_state_check,
  ADD CONSTRAINT idempotency_keys_state_check CHECK (state IN ('in_progress', 'completed')) NOT VALID,
  DROP CONSTRAINT idempotency_keys_response_check,
  ADD CONSTRAINT idempotency_keys_response_check CHECK (
    (state = 'completed' AND response_status IS NOT NULL AND response_headers IS NOT NULL AND response_body IS NOT NULL)
    OR (state = 'in_progress' AND response_status IS NULL AND response_headers IS NULL AND response_body IS NULL)
  ) NOT VALID;

-- Withdrawn claim statements. A claim statement that fails at its client (a timeout, a lost
-- connection) has its requests answered 503 "not run, retry with the same key", but PostgreSQL
-- may still run it: it goes on after its client stops waiting, and one that reaches the server
-- late (a packet held up on its connection) starts only after the client has given up, with
-- its own deadline (claim_in_time) counted from then. The client deleted the statement's claims
-- by key and token; one that arrived after that delete claimed its keys all the same, and the
-- retry was 409 until the lock ran out. 1768000000003's 'withdrawn' row on the key was lifted
-- by whatever the key went through before the late claim arrived.
--
-- Now the client withdraws the statement itself, by the batch id it sent with it
-- (idempotency.ts): runtime.withdraw_claims records the batch here and deletes whatever of its
-- claims committed; runtime.claim_not_withdrawn, which the claim statement calls before it
-- takes any row, refuses a recorded batch. Both take the batch's advisory lock first and then
-- read with a snapshot of their own (VOLATILE, under READ COMMITTED: a fresh one for each
-- statement; under REPEATABLE READ or SERIALIZABLE the snapshot would predate the lock, so they
-- refuse to run there), so whichever comes second sees the other: a withdrawal that comes first is seen by the claim, which fails
-- whole; a claim that comes first (or is running) is waited for, and its committed claims
-- deleted. The fence is the batch, not the key's row, so nothing done to the key meanwhile (a
-- retry that took it and released it, another withdrawal) can lift it, and no one else's claim
-- on the key is touched.
CREATE TABLE runtime.idempotency_withdrawn_claims (
  batch        uuid PRIMARY KEY,
  withdrawn_at timestamptz NOT NULL,
  -- Kept as long as the keys are (ttlMs): no claim statement arrives a day late.
  expires_at   timestamptz NOT NULL CHECK (expires_at > withdrawn_at)
);
CREATE INDEX idempotency_withdrawn_claims_expires_at ON runtime.idempotency_withdrawn_claims (expires_at);

-- The batch's advisory lock, which its claim statement and its withdrawal both take before
-- they read; refused outside READ COMMITTED (see above). `p_caller` names the function in the
-- refusal.
CREATE FUNCTION runtime.lock_claim_batch(p_batch uuid, p_caller text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION '%: idempotency claims and their withdrawals run under READ COMMITTED only (this transaction is %), so that each sees the other', p_caller, current_setting('transaction_isolation')
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended('ledgerline.idempotency.claim-batch:' || p_batch::text, 0));
END
$$;

CREATE FUNCTION runtime.claim_not_withdrawn(p_batch uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM runtime.lock_claim_batch(p_batch, 'runtime.claim_not_withdrawn');
  IF EXISTS (SELECT 1 FROM runtime.idempotency_withdrawn_claims WHERE batch = p_batch) THEN
    RAISE EXCEPTION 'idempotency claim batch % was withdrawn by its client before it arrived: rolled back', p_batch
      USING ERRCODE = 'query_canceled';
  END IF;
  RETURN true;
END
$$;

-- Returns how many committed claims of the batch it deleted. The rows are locked first in the
-- claims' order (client, then key, byte-wise), as the claim and completion statements lock
-- them, so that it cannot deadlock with a claim taking one of them over.
CREATE FUNCTION runtime.withdraw_claims(p_batch uuid, p_client_ids text[], p_keys text[], p_tokens uuid[], p_at timestamptz, p_expires_at timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  deleted integer;
BEGIN
  PERFORM runtime.lock_claim_batch(p_batch, 'runtime.withdraw_claims');
  INSERT INTO runtime.idempotency_withdrawn_claims (batch, withdrawn_at, expires_at)
  VALUES (p_batch, p_at, p_expires_at) ON CONFLICT (batch) DO NOTHING;
  PERFORM 1 FROM runtime.idempotency_keys k
    JOIN unnest(p_client_ids, p_keys, p_tokens) AS u(client_id, key, token)
      ON k.client_id = u.client_id AND k.key = u.key AND k.lock_token = u.token
   WHERE k.state = 'in_progress'
   ORDER BY k.client_id COLLATE "C", k.key COLLATE "C"
   FOR UPDATE OF k;
  DELETE FROM runtime.idempotency_keys k
   USING unnest(p_client_ids, p_keys, p_tokens) AS u(client_id, key, token)
   WHERE k.client_id = u.client_id AND k.key = u.key AND k.lock_token = u.token AND k.state = 'in_progress';
  GET DIAGNOSTICS deleted = ROW_COUNT;
  RETURN deleted;
END
$$;

-- Down Migration
DROP FUNCTION runtime.withdraw_claims(uuid, text[], text[], uuid[], timestamptz, timestamptz);
DROP FUNCTION runtime.claim_not_withdrawn(uuid);
DROP FUNCTION runtime.lock_claim_batch(uuid, text);
DROP TABLE runtime.idempotency_withdrawn_claims;
ALTER TABLE runtime.idempotency_keys
  DROP CONSTRAINT idempotency_keys_state_check,
  ADD CONSTRAINT idempotency_keys_state_check CHECK (state IN ('in_progress', 'completed', 'withdrawn')),
  DROP CONSTRAINT idempotency_keys_response_check,
  ADD CONSTRAINT idempotency_keys_response_check CHECK (
    (state = 'completed' AND response_status IS NOT NULL AND response_headers IS NOT NULL AND response_body IS NOT NULL)
    OR (state IN ('in_progress', 'withdrawn') AND response_status IS NULL AND response_headers IS NULL AND response_body IS NULL)
  );

-- Up Migration

-- Validates the checks the previous migration added NOT VALID (SHARE UPDATE EXCLUSIVE: reads
-- and writes of the table go on meanwhile).
ALTER TABLE runtime.idempotency_keys VALIDATE CONSTRAINT idempotency_keys_state_check;
ALTER TABLE runtime.idempotency_keys VALIDATE CONSTRAINT idempotency_keys_response_check;

-- Down Migration
-- Nothing: the previous migration's down step puts the checks of 1768000000003 back, validated.

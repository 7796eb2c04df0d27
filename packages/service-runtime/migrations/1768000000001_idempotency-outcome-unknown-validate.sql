-- Up Migration

-- Validates the check the previous migration added NOT VALID (SHARE UPDATE EXCLUSIVE: reads
-- and writes of the table go on meanwhile).
ALTER TABLE runtime.idempotency_keys VALIDATE CONSTRAINT idempotency_keys_response_status_check;

-- Down Migration
-- Nothing: the previous migration's down step puts the old check back, validated.

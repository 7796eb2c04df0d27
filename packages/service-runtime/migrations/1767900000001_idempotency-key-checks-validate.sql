-- Up Migration

-- Validates the rows written before the previous migration. VALIDATE CONSTRAINT holds SHARE
-- UPDATE EXCLUSIVE, which lets claims, completions and the pruner go on during the scan. The
-- rules are the ones the rows were written under, so this cannot fail.
ALTER TABLE runtime.idempotency_keys VALIDATE CONSTRAINT idempotency_keys_client_id_check;
ALTER TABLE runtime.idempotency_keys VALIDATE CONSTRAINT idempotency_keys_key_check;

-- Down Migration
-- Nothing to undo: validating a constraint changes no definition.

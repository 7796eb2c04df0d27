-- Up Migration

-- A subject key is stored either in clear (kek_id NULL, 32 bytes) or wrapped under the
-- key-encryption key named by kek_id (AES-256-GCM: iv, tag and the sealed key, 72 bytes;
-- src/keys.ts). Wrapped, a dump or backup of the database alone no longer opens the personal
-- data the keys protect. The sequencer wraps the keys still in clear once the key-encryption
-- key is configured, so its role may update those two columns.
ALTER TABLE audit.subject_keys DROP CONSTRAINT subject_keys_key_check;
ALTER TABLE audit.subject_keys ADD COLUMN kek_id text;
ALTER TABLE audit.subject_keys ADD CONSTRAINT subject_keys_key_form
  CHECK ((kek_id IS NULL AND length(key) = 32) OR (kek_id IS NOT NULL AND length(key) = 72));
GRANT UPDATE (key, kek_id) ON audit.subject_keys TO ledgerline_audit_writer;
-- The keys still in clear, for the sequencer's wrapping pass: empty once all are wrapped.
CREATE INDEX subject_keys_clear_idx ON audit.subject_keys (subject) WHERE kek_id IS NULL;

-- Down Migration
DROP INDEX audit.subject_keys_clear_idx;
REVOKE UPDATE (key, kek_id) ON audit.subject_keys FROM ledgerline_audit_writer;
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM audit.subject_keys WHERE kek_id IS NOT NULL) THEN
    RAISE EXCEPTION 'subject keys are stored wrapped; unwrap them with the service before going down';
  END IF;
END $$;
ALTER TABLE audit.subject_keys DROP CONSTRAINT subject_keys_key_form;
ALTER TABLE audit.subject_keys DROP COLUMN kek_id;
ALTER TABLE audit.subject_keys ADD CONSTRAINT subject_keys_key_check CHECK (length(key) = 32);

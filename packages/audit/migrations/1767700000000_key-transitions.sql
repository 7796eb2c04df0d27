-- Up Migration

-- Rotations of the checkpoint signing key, each vouched for by the outgoing key: it signs the
-- incoming public key (keys.ts `KeyTransition`), so a party that trusts only the old public
-- key can follow the log across the change. A row adds no trust by being here: a verifier
-- follows it only if its signature verifies under a key it already trusts.
CREATE TABLE audit.key_transitions (
  from_key_id   text NOT NULL,
  to_key_id     text NOT NULL CHECK (to_key_id <> from_key_id),
  origin        text NOT NULL,
  -- SPKI DER of the incoming Ed25519 public key.
  to_public_key bytea NOT NULL,
  issued_at     timestamptz NOT NULL,
  signature     bytea NOT NULL CHECK (length(signature) = 64),
  recorded_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (from_key_id, to_key_id)
);
CREATE TRIGGER key_transitions_append_only BEFORE UPDATE OR DELETE ON audit.key_transitions FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER key_transitions_no_truncate BEFORE TRUNCATE ON audit.key_transitions FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();
GRANT SELECT, INSERT ON audit.key_transitions TO ledgerline_audit_writer;

-- Down Migration
DROP TABLE audit.key_transitions;

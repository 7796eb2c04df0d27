-- Up Migration

-- Rotating the key-encryption key: the sequencer wraps again, a thousand a round, the subject
-- keys wrapped under a previous key-encryption key. This index finds them by the key that
-- wraps them (the keys in clear have subject_keys_clear_idx), and counts them per key for
-- `npm run audit -- kek-status`.
CREATE INDEX subject_keys_kek_idx ON audit.subject_keys (kek_id) WHERE kek_id IS NOT NULL;

-- Down Migration
DROP INDEX audit.subject_keys_kek_idx;

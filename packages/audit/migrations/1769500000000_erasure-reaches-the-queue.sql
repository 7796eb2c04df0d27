-- Up Migration

-- Erasure reaches what the sequencer has not integrated yet. Erasing a subject destroyed its
-- key, which is all the data already in the log is sealed under; but an entry recorded before
-- the erasure and still waiting (in audit.queue, or in a service's sink buffer) carries its
-- personal data in clear, and the sequencer, finding no key, made a new one and sealed it under
-- that: the data read as present after the erasure. Now an erasure is remembered, and the
-- sequencer seals an entry that occurred at or before it under a key it throws away at once,
-- so the data reads as erased (sequencer.ts `#subjectKeys`). Data recorded after the erasure
-- gets a key of its own, as a new subject's would.
CREATE TABLE audit.erased_subjects (
  subject   text PRIMARY KEY,
  erased_at timestamptz NOT NULL
);
GRANT SELECT ON audit.erased_subjects TO ledgerline_audit_sequencer;

-- The erasure, with the memory of it and two more guards:
-- - a hold on the resource of a queued entry of the subject refuses it, as one on the resource
--   of a record does (the queue is small: the sequencer drains it every round);
-- - SHARE ROW EXCLUSIVE on audit.subject_keys: a sequencer round that is creating the
--   subject's key (its INSERT holds ROW EXCLUSIVE to its commit) finishes first, so its key is
--   destroyed here; a round that comes after waits at that INSERT, and then sees the erasure.
CREATE OR REPLACE FUNCTION audit.erase_subject(p_subject text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
  erased integer;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'audit.erase_subject must run under READ COMMITTED, so that its hold check sees every committed hold'
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  LOCK TABLE audit.legal_holds IN SHARE MODE;
  LOCK TABLE audit.subject_keys IN SHARE ROW EXCLUSIVE MODE;
  IF audit.is_held(p_subject, NULL, NULL) OR EXISTS (
       SELECT 1 FROM audit.records r
        WHERE r.subject = p_subject AND audit.is_held(NULL, r.resource_type, r.resource_id)) OR EXISTS (
       SELECT 1 FROM audit.queue q, LATERAL (SELECT q.entry::jsonb AS e) j
        WHERE j.e ->> 'subject' = p_subject AND audit.is_held(NULL, j.e -> 'resource' ->> 'type', j.e -> 'resource' ->> 'id')) THEN
    RAISE EXCEPTION 'subject % is under legal hold', p_subject USING ERRCODE = 'object_in_use';
  END IF;
  DELETE FROM audit.subject_keys WHERE subject = p_subject;
  GET DIAGNOSTICS erased = ROW_COUNT;
  INSERT INTO audit.erased_subjects (subject, erased_at) VALUES (p_subject, now())
  ON CONFLICT (subject) DO UPDATE SET erased_at = greatest(audit.erased_subjects.erased_at, EXCLUDED.erased_at);
  RETURN erased > 0;
END
$$;

-- Down Migration
CREATE OR REPLACE FUNCTION audit.erase_subject(p_subject text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
  erased integer;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'audit.erase_subject must run under READ COMMITTED, so that its hold check sees every committed hold'
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  LOCK TABLE audit.legal_holds IN SHARE MODE;
  IF audit.is_held(p_subject, NULL, NULL) OR EXISTS (
       SELECT 1 FROM audit.records r
        WHERE r.subject = p_subject AND audit.is_held(NULL, r.resource_type, r.resource_id)) THEN
    RAISE EXCEPTION 'subject % is under legal hold', p_subject USING ERRCODE = 'object_in_use';
  END IF;
  DELETE FROM audit.subject_keys WHERE subject = p_subject;
  GET DIAGNOSTICS erased = ROW_COUNT;
  RETURN erased > 0;
END
$$;
DROP TABLE audit.erased_subjects;

-- Up Migration

-- The application writes the audit trail as this role (every audit transaction runs
-- `SET LOCAL ROLE ledgerline_audit_writer`). It may insert and read records, never update or
-- delete them. Roles are cluster-wide while each database migrates on its own, so creating
-- the role tolerates a concurrent creator (duplicate_object, or unique_violation when two
-- transactions race on pg_authid); the grants below are per database.
-- A role that already exists is not created again: the owner that runs these migrations in
-- production has no CREATEROLE (docs/audit.md, "Roles"), and PostgreSQL refuses CREATE ROLE
-- to such a role before it looks for the name.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledgerline_audit_writer') THEN
    CREATE ROLE ledgerline_audit_writer NOLOGIN;
  END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
  NULL;
END
$$;

-- Entries waiting for the sequencer. Producers insert, the sequencer deletes what it
-- integrated in the same transaction. `entry` is the JSON text as recorded: the sequencer
-- hashes exactly what the producer sent, with no jsonb normalisation in between.
CREATE TABLE audit.queue (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  entry       text NOT NULL,
  enqueued_at timestamptz NOT NULL DEFAULT now()
);

-- The log. `seq` is the leaf index, assigned by the single sequencer; the leaf commits to
-- every column here (see src/record.ts), including payload_hash and personal_hash.
-- `id` has no unique index on purpose: event records get UUIDv5 ids (random order), whose
-- index would cost every insert a random page; the sequencer's cursor, moved in the same
-- transaction as the records, is what makes each event recorded once.
CREATE TABLE audit.records (
  seq               bigint PRIMARY KEY CHECK (seq >= 0),
  id                uuid NOT NULL,
  occurred_at       timestamptz NOT NULL,
  record_class      text NOT NULL,
  actor_type        text NOT NULL CHECK (actor_type IN ('user', 'service', 'anonymous')),
  actor_id          text NOT NULL,
  action            text NOT NULL,
  outcome           text NOT NULL CHECK (outcome IN ('success', 'failure')),
  reason            text,
  origin_service    text NOT NULL,
  origin_ip         text,
  origin_request_id text,
  origin_trace_id   text,
  resource_type     text NOT NULL,
  resource_id       text NOT NULL,
  subject           text,
  payload_hash      bytea CHECK (length(payload_hash) = 32),
  personal_hash     bytea CHECK (length(personal_hash) = 32),
  leaf_hash         bytea NOT NULL CHECK (length(leaf_hash) = 32),
  integrated_at     timestamptz NOT NULL DEFAULT now()
);
-- Search by actor, resource and action, newest or oldest first (keyset on seq).
CREATE INDEX records_actor_idx ON audit.records (actor_id, seq);
CREATE INDEX records_resource_idx ON audit.records (resource_type, resource_id, seq);
CREATE INDEX records_action_idx ON audit.records (action, seq);
CREATE INDEX records_subject_idx ON audit.records (subject) WHERE subject IS NOT NULL;
-- Records arrive in time order, near enough for a BRIN index on time ranges.
CREATE INDEX records_occurred_at_idx ON audit.records USING brin (occurred_at);

-- Payloads live apart from the records so that retention can remove them while the record,
-- and the hashes its leaf commits to, stay.
CREATE TABLE audit.payloads (
  seq      bigint PRIMARY KEY REFERENCES audit.records (seq),
  payload  text,
  -- AES-256-GCM under the subject's key: iv ‖ tag ‖ ciphertext.
  personal bytea
);

-- Completed perfect subtrees of 16 leaves or more (level >= 4): proofs and a restarting
-- sequencer read O(log n) rows here instead of every leaf; below level 4 they hash at most
-- 15 stored leaf hashes.
CREATE TABLE audit.tree_nodes (
  level smallint NOT NULL CHECK (level BETWEEN 4 AND 62),
  idx   bigint NOT NULL CHECK (idx >= 0),
  hash  bytea NOT NULL CHECK (length(hash) = 32),
  PRIMARY KEY (level, idx)
);

-- Signed tree heads.
CREATE TABLE audit.checkpoints (
  tree_size bigint PRIMARY KEY CHECK (tree_size >= 1),
  origin    text NOT NULL,
  root_hash bytea NOT NULL CHECK (length(root_hash) = 32),
  issued_at timestamptz NOT NULL,
  key_id    text NOT NULL,
  signature bytea NOT NULL
);

-- Where the sequencer's tail of the event store stands, (transaction id, position) exclusive;
-- it moves in the same transaction as the records it produced, so each event is recorded once.
CREATE TABLE audit.sequencer_state (
  singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  event_transaction_id xid8 NOT NULL DEFAULT '0',
  event_position       bigint NOT NULL DEFAULT 0
);
INSERT INTO audit.sequencer_state DEFAULT VALUES;

-- How long each class keeps its payloads. A class with no policy is kept for ever.
CREATE TABLE audit.retention_policies (
  record_class text PRIMARY KEY,
  retain_days  integer NOT NULL CHECK (retain_days >= 1)
);
INSERT INTO audit.retention_policies (record_class, retain_days) VALUES
  ('financial', 2557),  -- 7 years (SOX, SEC 17a-4)
  ('command', 2557),
  ('access', 366);      -- 1 year (PCI DSS 10.5.1)

-- One key per data subject; destroying it erases the subject's personal data.
CREATE TABLE audit.subject_keys (
  subject    text PRIMARY KEY,
  key        bytea NOT NULL CHECK (length(key) = 32),
  created_at timestamptz NOT NULL DEFAULT now()
);

-- Legal holds on a subject or on a resource: while active, they block expiry and erasure.
CREATE TABLE audit.legal_holds (
  id            uuid PRIMARY KEY,
  subject       text,
  resource_type text,
  resource_id   text,
  reason        text NOT NULL,
  placed_by     text NOT NULL,
  placed_at     timestamptz NOT NULL DEFAULT now(),
  released_by   text,
  released_at   timestamptz,
  CHECK ((subject IS NOT NULL) <> (resource_type IS NOT NULL AND resource_id IS NOT NULL)),
  CHECK ((released_at IS NULL) = (released_by IS NULL))
);
CREATE INDEX legal_holds_active_idx ON audit.legal_holds (subject, resource_type, resource_id) WHERE released_at IS NULL;

-- The log tables refuse change even from roles that hold the privilege (the owner included).
-- Only a superuser who disables triggers can alter them, and verification detects that.
CREATE FUNCTION audit.reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit.%: % is not allowed, the audit trail is append-only', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER records_append_only BEFORE UPDATE OR DELETE ON audit.records FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER records_no_truncate BEFORE TRUNCATE ON audit.records FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON audit.checkpoints FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON audit.checkpoints FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER tree_nodes_append_only BEFORE UPDATE OR DELETE ON audit.tree_nodes FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER tree_nodes_no_truncate BEFORE TRUNCATE ON audit.tree_nodes FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();
-- Payloads may be deleted (by the retention function below) but never changed.
CREATE TRIGGER payloads_no_update BEFORE UPDATE ON audit.payloads FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER payloads_no_truncate BEFORE TRUNCATE ON audit.payloads FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();

-- Is a record under an active legal hold?
CREATE FUNCTION audit.is_held(p_subject text, p_resource_type text, p_resource_id text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, audit AS $$
  SELECT EXISTS (
    SELECT 1 FROM audit.legal_holds h
     WHERE h.released_at IS NULL
       AND ((h.subject IS NOT NULL AND h.subject = p_subject)
         OR (h.resource_type = p_resource_type AND h.resource_id = p_resource_id)))
$$;

-- The one path that removes payloads: only those whose retention has run out by the
-- database's own clock (a caller may pass an earlier instant, never a later one), and never
-- under a legal hold. Runs as the owner; the writer role may execute it, nothing more.
CREATE FUNCTION audit.expire_payloads(p_as_of timestamptz, p_limit integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, audit AS $$
  WITH due AS (
    SELECT p.seq FROM audit.payloads p
      JOIN audit.records r ON r.seq = p.seq
      JOIN audit.retention_policies rp ON rp.record_class = r.record_class
     WHERE r.occurred_at + make_interval(days => rp.retain_days) <= least(p_as_of, now())
       AND NOT audit.is_held(r.subject, r.resource_type, r.resource_id)
     ORDER BY p.seq
     LIMIT least(greatest(p_limit, 0), 100000)
  ), gone AS (
    DELETE FROM audit.payloads p USING due WHERE p.seq = due.seq RETURNING 1
  )
  SELECT count(*)::integer FROM gone
$$;

-- Erasure: destroys the subject's key unless a legal hold covers the subject or any resource
-- of its records. Returns false when there was no key. Runs as the owner.
CREATE FUNCTION audit.erase_subject(p_subject text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit AS $$
DECLARE
  erased integer;
BEGIN
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

REVOKE ALL ON FUNCTION audit.expire_payloads(timestamptz, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION audit.erase_subject(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO ledgerline_audit_writer;
GRANT SELECT, INSERT, DELETE ON audit.queue TO ledgerline_audit_writer;
GRANT SELECT, INSERT ON audit.records, audit.payloads, audit.tree_nodes, audit.checkpoints, audit.subject_keys TO ledgerline_audit_writer;
GRANT SELECT, UPDATE ON audit.sequencer_state TO ledgerline_audit_writer;
GRANT SELECT ON audit.retention_policies TO ledgerline_audit_writer;
GRANT SELECT, INSERT ON audit.legal_holds TO ledgerline_audit_writer;
GRANT UPDATE (released_by, released_at) ON audit.legal_holds TO ledgerline_audit_writer;
GRANT EXECUTE ON FUNCTION audit.expire_payloads(timestamptz, integer), audit.erase_subject(text), audit.is_held(text, text, text) TO ledgerline_audit_writer;

-- Down Migration
DROP FUNCTION audit.erase_subject(text);
DROP FUNCTION audit.expire_payloads(timestamptz, integer);
DROP FUNCTION audit.is_held(text, text, text);
DROP TABLE audit.legal_holds, audit.subject_keys, audit.retention_policies, audit.sequencer_state,
  audit.checkpoints, audit.tree_nodes, audit.payloads, audit.records, audit.queue;
DROP FUNCTION audit.reject_change();

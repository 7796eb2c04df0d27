-- Up Migration

-- Guards the database keeps on the audit trail whoever connects, the schema owner included
-- (docs/audit.md, "Append-only, enforced by the database"). Triggers bind every role except a
-- superuser, and the table owner, who may ALTER TABLE ... DISABLE TRIGGER: that is why the
-- services must not log in as the owner in production (docs/audit.md, "Roles").

-- The number of leaves in the log, as the sequencer counts them (tree.ts `storedTreeSize`):
-- records and event tiles together cover 0..n-1 with no gap.
CREATE FUNCTION audit.leaf_count() RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, audit AS $$
  SELECT greatest((SELECT coalesce(max(seq) + 1, 0) FROM audit.records),
                  coalesce((SELECT first_seq + leaf_count FROM audit.event_leaves ORDER BY first_seq DESC LIMIT 1), 0))
$$;

-- A superuser can disable any trigger (session_replication_role), so checking one buys
-- nothing; leaving superusers out lets tests and repair tools plant rows for verification to
-- find, as tamper.test.ts and key-transition.test.ts do.
CREATE FUNCTION audit.is_superuser() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
  SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false)
$$;

-- ------------------------------------------------------------------------------------------
-- Payloads leave only when their retention has run out and no hold covers them.
--
-- The trigger checks the row itself rather than trusting who deletes it: a marker that only
-- expire_payloads sets (a setting, a session variable) can be set by any caller too, while
-- the record's class, time and holds are what retention means. expire_payloads passes it by
-- construction (it deletes by the same rule, with now() no earlier than its own cut-off).
CREATE FUNCTION audit.payload_delete_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  r audit.records%ROWTYPE;
  days integer;
BEGIN
  SELECT * INTO r FROM audit.records WHERE seq = OLD.seq;
  SELECT retain_days INTO days FROM audit.retention_policies WHERE record_class = r.record_class;
  IF days IS NULL THEN
    RAISE EXCEPTION 'audit.payloads: the payload of record % (class %) is kept for ever', OLD.seq, r.record_class
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF r.occurred_at + make_interval(days => days) > now() THEN
    RAISE EXCEPTION 'audit.payloads: the payload of record % is within its retention (class %, % days)', OLD.seq, r.record_class, days
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF audit.is_held(r.subject, r.resource_type, r.resource_id) THEN
    RAISE EXCEPTION 'audit.payloads: the payload of record % is under legal hold', OLD.seq
      USING ERRCODE = 'object_in_use';
  END IF;
  RETURN OLD;
END
$$;
CREATE TRIGGER payloads_delete_due_only BEFORE DELETE ON audit.payloads FOR EACH ROW EXECUTE FUNCTION audit.payload_delete_guard();

-- ------------------------------------------------------------------------------------------
-- Retention policies: never shortened under records kept by the longer one, every change
-- recorded.
--
-- Chosen over effective-from policies per record: verification (verify.ts) and event-store
-- retention (holds.ts) read the one current policy of a class, and with shortening refused
-- while anything recorded under the longer policy is still within it, the current policy is
-- right for every record that exists. Lengthening, and removing a policy (kept for ever), are
-- always allowed. A shortening is refused while any record of the class (for `financial`,
-- also any event leaf, event or archived event, and any queued entry naming the class)
-- occurred less than the old retention ago; adding a policy to a class that had none is a
-- shortening from for ever, refused while the class has any record at all.
CREATE TABLE audit.retention_policy_changes (
  id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  record_class       text NOT NULL,
  -- NULL: no policy, kept for ever.
  retain_days_before integer,
  retain_days_after  integer,
  effective_from     timestamptz NOT NULL DEFAULT now(),
  -- The login role and the role in effect (they differ under SET ROLE).
  changed_by         text NOT NULL DEFAULT session_user,
  changed_as         text NOT NULL DEFAULT current_user
);
CREATE TRIGGER retention_policy_changes_append_only BEFORE UPDATE OR DELETE ON audit.retention_policy_changes FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE TRIGGER retention_policy_changes_no_truncate BEFORE TRUNCATE ON audit.retention_policy_changes FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();
-- The policies in force when history began.
INSERT INTO audit.retention_policy_changes (record_class, retain_days_before, retain_days_after)
  SELECT record_class, NULL, retain_days FROM audit.retention_policies ORDER BY record_class;

CREATE FUNCTION audit.retention_still_owed(p_class text, p_days integer) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, audit AS $$
DECLARE
  -- Records that occurred after this are still owed the old retention (NULL: for ever, all).
  cutoff timestamptz := CASE WHEN p_days IS NULL THEN '-infinity'::timestamptz ELSE now() - make_interval(days => p_days) END;
  found boolean;
BEGIN
  IF EXISTS (SELECT 1 FROM audit.records WHERE record_class = p_class AND occurred_at > cutoff) THEN RETURN true; END IF;
  -- Queued entries get their class's policy once integrated; the text test over-matches
  -- rather than parse rows the sequencer may yet reject.
  IF EXISTS (SELECT 1 FROM audit.queue WHERE strpos(entry, '"recordClass":' || to_json(p_class)::text) > 0) THEN RETURN true; END IF;
  IF p_class = 'financial' THEN
    IF EXISTS (SELECT 1 FROM audit.event_leaves WHERE last_recorded_at > cutoff) THEN RETURN true; END IF;
    -- Events are leaves of class financial, integrated or about to be; archived ones still verify.
    IF to_regclass('events.events') IS NOT NULL THEN
      EXECUTE 'SELECT EXISTS (SELECT 1 FROM events.events WHERE recorded_at > $1)' INTO found USING cutoff;
      IF found THEN RETURN true; END IF;
    END IF;
    IF to_regclass('events.archived_events') IS NOT NULL THEN
      EXECUTE 'SELECT EXISTS (SELECT 1 FROM events.archived_events WHERE recorded_at > $1)' INTO found USING cutoff;
      IF found THEN RETURN true; END IF;
    END IF;
  END IF;
  RETURN false;
END
$$;

CREATE FUNCTION audit.retention_policy_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  was integer;
  becomes integer;
  class text;
BEGIN
  -- A renamed class is a removal from the old name (kept for ever: a lengthening) and an
  -- addition to the new one.
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    class := NEW.record_class;
    becomes := NEW.retain_days;
    was := CASE WHEN TG_OP = 'UPDATE' AND OLD.record_class = NEW.record_class THEN OLD.retain_days END;
    IF (was IS NULL OR becomes < was) AND audit.retention_still_owed(class, was) THEN
      RAISE EXCEPTION 'audit.retention_policies: % retention cannot become % days (was %): records of that class are still owed the longer one',
        class, becomes, coalesce(was::text, 'for ever')
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A policy may be lengthened at any time; it may be shortened once nothing recorded under the longer one is still within it.';
    END IF;
  END IF;
  IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
  RETURN NEW;
END
$$;

-- Every change is kept in retention_policy_changes and recorded in the trail (an
-- `audit.retention.change` record of class governance, kept for ever) in the same
-- transaction: through audit.queue, whose rows the sequencer integrates as any producer's.
CREATE FUNCTION audit.retention_policy_record() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  class text;
  was integer;
  becomes integer;
BEGIN
  FOR class, was, becomes IN
    SELECT c, b, a FROM (VALUES
      (CASE WHEN TG_OP <> 'INSERT' THEN OLD.record_class END, CASE WHEN TG_OP <> 'INSERT' THEN OLD.retain_days END,
       CASE WHEN TG_OP = 'UPDATE' AND OLD.record_class = NEW.record_class THEN NEW.retain_days END),
      (CASE WHEN TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR OLD.record_class <> NEW.record_class) THEN NEW.record_class END, NULL::integer,
       CASE WHEN TG_OP <> 'DELETE' THEN NEW.retain_days END)
    ) AS v(c, b, a) WHERE c IS NOT NULL AND b IS DISTINCT FROM a
  LOOP
    INSERT INTO audit.retention_policy_changes (record_class, retain_days_before, retain_days_after) VALUES (class, was, becomes);
    -- The queued form the sink writes (writer.ts QueuedEntry); the payload is canonical JSON
    -- (keys sorted), as the sink would make it.
    INSERT INTO audit.queue (entry) VALUES (json_build_object(
      'id', gen_random_uuid()::text,
      'occurredAt', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
      'recordClass', 'governance',
      'actor', json_build_object('type', 'user', 'id', 'db:' || session_user),
      'action', 'audit.retention.change',
      'outcome', 'success',
      'origin', json_build_object('service', 'postgresql'),
      'resource', json_build_object('type', 'audit.retention_policy', 'id', class),
      'payloadJson', '{"changedAs":' || to_json(current_user::text)::text
        || ',"recordClass":' || to_json(class)::text
        || ',"retainDaysAfter":' || coalesce(becomes::text, 'null')
        || ',"retainDaysBefore":' || coalesce(was::text, 'null') || '}',
      'personalJson', NULL
    )::text);
  END LOOP;
  RETURN NULL;
END
$$;
CREATE TRIGGER retention_policies_guard BEFORE INSERT OR UPDATE OR DELETE ON audit.retention_policies FOR EACH ROW EXECUTE FUNCTION audit.retention_policy_guard();
CREATE TRIGGER retention_policies_record AFTER INSERT OR UPDATE OR DELETE ON audit.retention_policies FOR EACH ROW EXECUTE FUNCTION audit.retention_policy_record();
-- TRUNCATE would remove every policy (keep everything for ever) with no row triggers: no record.
CREATE TRIGGER retention_policies_no_truncate BEFORE TRUNCATE ON audit.retention_policies FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();

-- ------------------------------------------------------------------------------------------
-- Subject keys: the writer role keeps UPDATE (key, kek_id), because the sequencer wraps keys
-- again as that role (sequencer.ts `#rewrapKeys`), but only a re-wrapping passes: the
-- key-encryption key must change, to another one (never back to clear), and the subject
-- and creation time stay. A changed key under the same key-encryption key, or a key put back in
-- clear, is how a key would be destroyed without erase_subject and its hold check; the only
-- way left to replace a key is to wrap garbage under a key-encryption key, which reads as an
-- error naming the subject (keys.ts clearSubjectKey), never as an erasure.
CREATE FUNCTION audit.subject_key_update_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
BEGIN
  IF NEW.subject IS DISTINCT FROM OLD.subject OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
    RAISE EXCEPTION 'audit.subject_keys: a key stays with its subject' USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF NEW.key IS DISTINCT FROM OLD.key OR NEW.kek_id IS DISTINCT FROM OLD.kek_id THEN
    IF NEW.kek_id IS NOT DISTINCT FROM OLD.kek_id THEN
      RAISE EXCEPTION 'audit.subject_keys: the key of % changed under the same key-encryption key: only erase_subject destroys a key', OLD.subject
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.kek_id IS NULL THEN
      RAISE EXCEPTION 'audit.subject_keys: the key of % can only be wrapped, not stored in clear again', OLD.subject USING ERRCODE = 'insufficient_privilege';
    END IF;
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER subject_keys_rewrap_only BEFORE UPDATE ON audit.subject_keys FOR EACH ROW EXECUTE FUNCTION audit.subject_key_update_guard();
-- A DELETE needs a privilege only the owner has; TRUNCATE would erase every subject at once.
CREATE TRIGGER subject_keys_no_truncate BEFORE TRUNCATE ON audit.subject_keys FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();

-- ------------------------------------------------------------------------------------------
-- Holds and removal, serialised. Placing a hold inserts into audit.legal_holds (ROW EXCLUSIVE);
-- expiry and erasure first take SHARE on the table, which waits for every uncommitted hold
-- insert and blocks new ones until they commit. Their hold check then runs after the lock, in
-- a statement with a fresh snapshot (READ COMMITTED), so either a hold committed first and
-- is seen, or the removal commits first and the hold waits for it. Under REPEATABLE READ or
-- SERIALIZABLE the snapshot predates the lock, so they refuse to run there.
CREATE OR REPLACE FUNCTION audit.expire_payloads(p_as_of timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit AS $$
DECLARE
  removed integer;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'audit.expire_payloads must run under READ COMMITTED, so that its hold check sees every committed hold'
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  LOCK TABLE audit.legal_holds IN SHARE MODE;
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
  SELECT count(*)::integer INTO removed FROM gone;
  RETURN removed;
END
$$;

CREATE OR REPLACE FUNCTION audit.erase_subject(p_subject text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit AS $$
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

-- The same lock for other stores' retention that asks the trail for holds (holds.ts
-- `auditLegalHolds`): taken before its hold check, in the transaction that then archives or
-- deletes a stream. SECURITY DEFINER because LOCK in SHARE mode needs more than the writer
-- role's privileges on the table; the lock lasts until that transaction ends.
CREATE FUNCTION audit.lock_legal_holds() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit AS $$
BEGIN
  LOCK TABLE audit.legal_holds IN SHARE MODE;
END
$$;
REVOKE ALL ON FUNCTION audit.lock_legal_holds() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.lock_legal_holds() TO ledgerline_audit_writer;

-- ------------------------------------------------------------------------------------------
-- The tree grows only at its end. The sequencer writes as the writer role (sequencer.ts sets
-- it for each round), so the role keeps INSERT on these tables; what it may insert is bound
-- instead: records and tiles only at the next leaf index, tree nodes only for subtrees whose
-- leaves are all stored, a checkpoint only for the current leaf count. A row planted ahead
-- (a checkpoint of size 10^9, a node not yet complete) would otherwise stop every round.

-- Records: each statement's rows are consecutive and start at the end of the log. Checked per
-- statement, on the rows it added, since the sequencer inserts a round's records in one.
CREATE FUNCTION audit.records_at_end_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  lo bigint;
  hi bigint;
  n bigint;
  before_end bigint;
BEGIN
  IF audit.is_superuser() THEN RETURN NULL; END IF;
  SELECT min(seq), max(seq), count(*) INTO lo, hi, n FROM added;
  IF n = 0 THEN RETURN NULL; END IF;
  before_end := greatest(
    coalesce((SELECT max(seq) + 1 FROM audit.records WHERE seq < lo), 0),
    coalesce((SELECT first_seq + leaf_count FROM audit.event_leaves WHERE first_seq < lo ORDER BY first_seq DESC LIMIT 1), 0));
  IF hi - lo + 1 <> n OR before_end <> lo
     OR EXISTS (SELECT 1 FROM audit.records WHERE seq > hi)
     OR EXISTS (SELECT 1 FROM audit.event_leaves WHERE first_seq >= lo) THEN
    RAISE EXCEPTION 'audit.records: records % to % are not the next leaves of the log (it ends at %)', lo, hi, before_end
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER records_at_end AFTER INSERT ON audit.records REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION audit.records_at_end_guard();

CREATE FUNCTION audit.tile_at_end_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  n bigint;
BEGIN
  IF audit.is_superuser() THEN RETURN NEW; END IF;
  n := audit.leaf_count();
  IF NEW.first_seq <> n THEN
    RAISE EXCEPTION 'audit.event_leaves: a tile at % is not at the end of the log (%)', NEW.first_seq, n USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER event_leaves_at_end BEFORE INSERT ON audit.event_leaves FOR EACH ROW EXECUTE FUNCTION audit.tile_at_end_guard();

-- Once per statement, on the rows it added: a round stores hundreds of nodes in one statement,
-- and counting the leaves once per node cost the sequencer about a tenth more CPU.
CREATE FUNCTION audit.tree_node_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  n bigint;
  bad record;
BEGIN
  IF audit.is_superuser() THEN RETURN NULL; END IF;
  n := audit.leaf_count();
  -- Node (level, idx) covers leaves idx·2^level .. (idx+1)·2^level - 1 (numeric: no overflow).
  SELECT a.level, a.idx INTO bad FROM added a
   WHERE (a.idx + 1)::numeric * power(2::numeric, a.level) > n LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'audit.tree_nodes: node (%, %) covers leaves the log does not have yet (%)', bad.level, bad.idx, n
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER tree_nodes_complete_only AFTER INSERT ON audit.tree_nodes REFERENCING NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION audit.tree_node_guard();

CREATE FUNCTION audit.checkpoint_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  n bigint;
BEGIN
  IF audit.is_superuser() THEN RETURN NEW; END IF;
  n := audit.leaf_count();
  IF NEW.tree_size <> n THEN
    RAISE EXCEPTION 'audit.checkpoints: a checkpoint of size % is not of the log''s size (%)', NEW.tree_size, n USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER checkpoints_current_size BEFORE INSERT ON audit.checkpoints FOR EACH ROW EXECUTE FUNCTION audit.checkpoint_guard();

-- ------------------------------------------------------------------------------------------
COMMENT ON FUNCTION audit.reject_change() IS
  'Refuses UPDATE, DELETE and TRUNCATE on the log tables for every role while the triggers are enabled. '
  'A superuser, or the tables'' owner (ALTER TABLE ... DISABLE TRIGGER), can disable them: run migrations '
  'as a separate owner role and let the services log in as members of ledgerline_audit_writer only (docs/audit.md). '
  'Verification detects what a change of the log would leave behind.';

REVOKE ALL ON FUNCTION audit.leaf_count(), audit.is_superuser(), audit.retention_still_owed(text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.leaf_count(), audit.is_superuser() TO ledgerline_audit_writer;
GRANT SELECT ON audit.retention_policy_changes TO ledgerline_audit_writer;

-- Down Migration
DROP TRIGGER checkpoints_current_size ON audit.checkpoints;
DROP TRIGGER tree_nodes_complete_only ON audit.tree_nodes;
DROP TRIGGER event_leaves_at_end ON audit.event_leaves;
DROP TRIGGER records_at_end ON audit.records;
DROP FUNCTION audit.checkpoint_guard(), audit.tree_node_guard(), audit.tile_at_end_guard(), audit.records_at_end_guard();
DROP TRIGGER subject_keys_no_truncate ON audit.subject_keys;
DROP TRIGGER subject_keys_rewrap_only ON audit.subject_keys;
DROP FUNCTION audit.subject_key_update_guard();
DROP FUNCTION audit.lock_legal_holds();
DROP TRIGGER retention_policies_no_truncate ON audit.retention_policies;
DROP TRIGGER retention_policies_record ON audit.retention_policies;
DROP TRIGGER retention_policies_guard ON audit.retention_policies;
DROP FUNCTION audit.retention_policy_record(), audit.retention_policy_guard(), audit.retention_still_owed(text, integer);
DROP TABLE audit.retention_policy_changes;
DROP TRIGGER payloads_delete_due_only ON audit.payloads;
DROP FUNCTION audit.payload_delete_guard();
DROP FUNCTION audit.is_superuser(), audit.leaf_count();
COMMENT ON FUNCTION audit.reject_change() IS NULL;
CREATE OR REPLACE FUNCTION audit.expire_payloads(p_as_of timestamptz, p_limit integer) RETURNS integer
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
CREATE OR REPLACE FUNCTION audit.erase_subject(p_subject text) RETURNS boolean
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

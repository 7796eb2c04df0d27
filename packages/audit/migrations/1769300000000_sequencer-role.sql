-- Up Migration

-- The sequencer gets a role of its own, and the application's role loses every UPDATE and
-- DELETE in the schema.
--
-- Until now the sequencer wrote as ledgerline_audit_writer, the role every service login is a
-- member of, so that role also held what only integration needs. With a service's credentials
-- (or a SQL injection through its pool) one could, without touching anything a checkpoint
-- signed:
--   * delete queued commands and reads before the sequencer reached them (DELETE on the queue);
--   * move the event cursor past events, which were then never integrated (UPDATE on
--     sequencer_state);
--   * append records, tiles, tree nodes and checkpoints at the log's end (INSERT), and create
--     or re-wrap subject keys;
--   * release a legal hold by UPDATE, leaving no record of it, and then erase the subject.
--
-- Now:
--   * ledgerline_audit_writer, the application: INSERT into the queue; SELECT on the log for
--     search, proofs and verification; placing holds and recording key transitions (INSERT;
--     a transition is signed and checked before it is trusted); the SECURITY DEFINER functions
--     (erasure, expiry, and release_hold below). No UPDATE and no DELETE on any audit table.
--   * ledgerline_audit_sequencer, for the sequencer's login alone (a service in
--     AUDIT_MIGRATIONS=check mode runs its sequencer on AUDIT_SEQUENCER_DATABASE_URL, or not at
--     all, and refuses a service login that is a member of this role): reads the queue and
--     deletes what it integrated, appends records, payloads, tiles, tree nodes and checkpoints
--     (bounded by the guards of migration 1769100000000), creates and re-wraps subject keys,
--     and moves its cursor.
-- Created only if missing, as the writer role is (migration 1767312000000): the owner that runs
-- these migrations in production has no CREATEROLE.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ledgerline_audit_sequencer') THEN
    CREATE ROLE ledgerline_audit_sequencer NOLOGIN;
  END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
  NULL;
END
$$;

GRANT USAGE ON SCHEMA audit TO ledgerline_audit_sequencer;
GRANT SELECT ON audit.queue, audit.records, audit.payloads, audit.event_leaves, audit.tree_nodes, audit.checkpoints,
                audit.subject_keys, audit.sequencer_state, audit.retention_policies, audit.retention_policy_changes,
                audit.legal_holds, audit.key_transitions, audit.migrations
   TO ledgerline_audit_sequencer;
GRANT DELETE ON audit.queue TO ledgerline_audit_sequencer;
GRANT INSERT ON audit.records, audit.payloads, audit.event_leaves, audit.tree_nodes, audit.checkpoints, audit.subject_keys
   TO ledgerline_audit_sequencer;
GRANT UPDATE (key, kek_id) ON audit.subject_keys TO ledgerline_audit_sequencer;
GRANT UPDATE ON audit.sequencer_state TO ledgerline_audit_sequencer;
GRANT EXECUTE ON FUNCTION audit.event_leaf_data(bigint, bigint, uuid, text, text, integer, text, smallint, jsonb, jsonb, timestamptz),
                          audit.leaf_count(), audit.is_superuser(), audit.is_held(text, text, text)
   TO ledgerline_audit_sequencer;

-- The writer inserts into the queue; nothing reads it back but the sequencer.
REVOKE SELECT, DELETE ON audit.queue FROM ledgerline_audit_writer;
REVOKE INSERT ON audit.records, audit.payloads, audit.event_leaves, audit.tree_nodes, audit.checkpoints, audit.subject_keys
    FROM ledgerline_audit_writer;
REVOKE UPDATE (key, kek_id) ON audit.subject_keys FROM ledgerline_audit_writer;
REVOKE UPDATE ON audit.sequencer_state FROM ledgerline_audit_writer;
REVOKE UPDATE (released_by, released_at) ON audit.legal_holds FROM ledgerline_audit_writer;

-- Releasing a hold, and its audit record, in one transaction. `p_by` is the requester as the
-- service knows it, {"actor": {"type", "id"}, "origin": {"service", "ip"?, "requestId"?,
-- "traceId"?}}; the record also names the database login that ran the release, which the
-- caller cannot choose. A caller with EXECUTE cannot release a hold without leaving a record:
-- an entry the sequencer cannot read (a malformed `p_by`) is still recorded, as
-- `audit.entry.rejected` with the row's text. Serialised with erasure and expiry as placing a
-- hold is: the UPDATE's ROW EXCLUSIVE lock waits for their SHARE lock on the table. Returns
-- false, and records nothing, when no active hold has that id (the service records that
-- refusal itself).
CREATE FUNCTION audit.release_hold(p_id uuid, p_by json) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit AS $$
DECLARE
  v_by text := p_by -> 'actor' ->> 'id';
BEGIN
  IF v_by IS NULL OR v_by = '' THEN
    RAISE EXCEPTION 'audit.release_hold: p_by must name the actor ({"actor": {"type": ..., "id": ...}, "origin": {...}})'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  UPDATE audit.legal_holds SET released_at = now(), released_by = v_by
   WHERE id = p_id AND released_at IS NULL;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  -- The queued form of an entry (QueuedEntry in src/writer.ts); the payload is canonical JSON.
  INSERT INTO audit.queue (entry) VALUES (json_build_object(
    'id', gen_random_uuid()::text,
    'recordClass', 'governance',
    'actor', p_by -> 'actor',
    'action', 'audit.hold.release',
    'outcome', 'success',
    'origin', p_by -> 'origin',
    'resource', json_build_object('type', 'audit.legal_hold', 'id', p_id::text),
    'occurredAt', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'payloadJson', '{"databaseLogin":' || to_json(session_user::text)::text || '}',
    'personalJson', NULL)::text);
  RETURN true;
END
$$;
REVOKE ALL ON FUNCTION audit.release_hold(uuid, json) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.release_hold(uuid, json) TO ledgerline_audit_writer;

-- Whether an active hold covers a resource, keeping one such hold FOR SHARE to the end of the
-- caller's transaction, so that its release cannot commit while the caller acts on the strength
-- of it (the event store's retention: @ledgerline/audit's auditLegalHolds). A plain
-- `SELECT … FOR SHARE` needs UPDATE on the table, which the writer role no longer has.
CREATE FUNCTION audit.resource_held(p_resource_type text, p_resource_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit AS $$
BEGIN
  PERFORM 1 FROM audit.legal_holds
    WHERE released_at IS NULL AND resource_type = p_resource_type AND resource_id = p_resource_id
    LIMIT 1 FOR SHARE;
  RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION audit.resource_held(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.resource_held(text, text) TO ledgerline_audit_writer;

-- Down Migration
DROP FUNCTION audit.resource_held(text, text);
DROP FUNCTION audit.release_hold(uuid, json);
GRANT UPDATE (released_by, released_at) ON audit.legal_holds TO ledgerline_audit_writer;
GRANT UPDATE ON audit.sequencer_state TO ledgerline_audit_writer;
GRANT UPDATE (key, kek_id) ON audit.subject_keys TO ledgerline_audit_writer;
GRANT INSERT ON audit.records, audit.payloads, audit.event_leaves, audit.tree_nodes, audit.checkpoints, audit.subject_keys
   TO ledgerline_audit_writer;
GRANT SELECT, DELETE ON audit.queue TO ledgerline_audit_writer;
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM ledgerline_audit_sequencer;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM ledgerline_audit_sequencer;
REVOKE USAGE ON SCHEMA audit FROM ledgerline_audit_sequencer;

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
GRANT UPDATE (event_transaction_id, event_position) ON audit.sequencer_state TO ledgerline_audit_sequencer;
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

-- Every function here names pg_temp last in its search_path: left out, PostgreSQL searches the
-- caller's temporary schema first for type names, and a caller could plant a domain named
-- `text` there whose check runs its own function as the owner. The earlier SECURITY DEFINER
-- functions name no type a caller could shadow so, but get the same setting.
ALTER FUNCTION audit.erase_subject(text) SET search_path = pg_catalog, audit, pg_temp;
ALTER FUNCTION audit.expire_payloads(timestamptz, integer) SET search_path = pg_catalog, audit, pg_temp;
ALTER FUNCTION audit.lock_legal_holds() SET search_path = pg_catalog, audit, pg_temp;

-- The governance functions record themselves. Releasing a hold, erasing a subject and
-- expiring payloads each queue their audit record in the transaction that does the work, so no
-- caller with EXECUTE (the CLI, a service, a bare SQL session with the writer's rights) does
-- any of them without a record; before, the service recorded them through its sink after the
-- function returned, and a direct call left none. `p_by` is the requester as the service knows
-- it, {"actor": {"type", "id"}, "origin": {"service", "ip"?, "requestId"?, "traceId"?}}; the
-- payload also names the database login that ran the function, which the caller cannot choose.
-- A requester the sequencer cannot read (malformed) is still recorded, as
-- `audit.entry.rejected` with the row's text. A refusal (a legal hold) raises and rolls back,
-- record included; the service records refusals itself.

-- The queued form of an entry (QueuedEntry in src/writer.ts) of class `governance`, as the sink
-- would write it; `p_payload` is canonical JSON text (keys sorted). Only the functions below
-- call it (they run as the owner).
CREATE FUNCTION audit.queue_governance_record(p_by json, p_action text, p_resource_type text, p_resource_id text, p_payload text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, audit, pg_temp AS $$
  INSERT INTO audit.queue (entry) VALUES (json_build_object(
    'id', gen_random_uuid()::text,
    'recordClass', 'governance',
    'actor', p_by -> 'actor',
    'action', p_action,
    'outcome', 'success',
    'origin', p_by -> 'origin',
    'resource', json_build_object('type', p_resource_type, 'id', p_resource_id),
    'occurredAt', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'payloadJson', p_payload,
    'personalJson', NULL)::text)
$$;
REVOKE ALL ON FUNCTION audit.queue_governance_record(json, text, text, text, text) FROM PUBLIC;

-- The requester's actor id; refuses a requester without one.
CREATE FUNCTION audit.requester_id(p_by json) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  id text := p_by -> 'actor' ->> 'id';
BEGIN
  IF id IS NULL OR id = '' THEN
    RAISE EXCEPTION 'the requester must name its actor ({"actor": {"type": ..., "id": ...}, "origin": {...}})'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN id;
END
$$;

-- Releases an active hold (released_by from the requester, released_at now()). Serialised with
-- erasure and expiry as placing a hold is: the UPDATE's ROW EXCLUSIVE lock waits for their
-- SHARE lock on the table. False, and no record, when no active hold has that id.
CREATE FUNCTION audit.release_hold(p_id uuid, p_by json) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
BEGIN
  IF p_id IS NULL THEN
    RAISE EXCEPTION 'audit.release_hold: the hold id is required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  UPDATE audit.legal_holds SET released_at = now(), released_by = audit.requester_id(p_by)
   WHERE id = p_id AND released_at IS NULL;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM audit.queue_governance_record(p_by, 'audit.hold.release', 'audit.legal_hold', p_id::text,
    '{"databaseLogin":' || to_json(session_user::text)::text || '}');
  RETURN true;
END
$$;

-- erase_subject(subject) with its record (`audit.subject.erase`, payload keyDestroyed).
CREATE FUNCTION audit.erase_subject(p_subject text, p_by json) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
  erased boolean;
BEGIN
  PERFORM audit.requester_id(p_by);
  IF p_subject IS NULL THEN
    RAISE EXCEPTION 'audit.erase_subject: the subject is required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  erased := audit.erase_subject(p_subject);
  PERFORM audit.queue_governance_record(p_by, 'audit.subject.erase', 'audit.subject', p_subject,
    '{"databaseLogin":' || to_json(session_user::text)::text || ',"keyDestroyed":' || erased::text || '}');
  RETURN erased;
END
$$;

-- expire_payloads(as_of, limit) with its record (`audit.retention.expire`, on the requester's
-- service's log) when it removed any.
CREATE FUNCTION audit.expire_payloads(p_as_of timestamptz, p_limit integer, p_by json) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
  removed integer;
BEGIN
  PERFORM audit.requester_id(p_by);
  IF p_as_of IS NULL OR p_limit IS NULL THEN
    RAISE EXCEPTION 'audit.expire_payloads: as_of and limit are required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  removed := audit.expire_payloads(p_as_of, p_limit);
  IF removed > 0 THEN
    PERFORM audit.queue_governance_record(p_by, 'audit.retention.expire', 'audit.log', coalesce(p_by -> 'origin' ->> 'service', 'unknown'),
      '{"asOf":' || to_json(to_char(p_as_of AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))::text
      || ',"databaseLogin":' || to_json(session_user::text)::text || ',"removed":' || removed || '}');
  END IF;
  RETURN removed;
END
$$;

REVOKE ALL ON FUNCTION audit.release_hold(uuid, json), audit.erase_subject(text, json), audit.expire_payloads(timestamptz, integer, json) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.release_hold(uuid, json), audit.erase_subject(text, json), audit.expire_payloads(timestamptz, integer, json) TO ledgerline_audit_writer;
-- The versions without a record are the owner's own now.
REVOKE EXECUTE ON FUNCTION audit.erase_subject(text), audit.expire_payloads(timestamptz, integer) FROM ledgerline_audit_writer;

-- Whether an active hold covers a resource, keeping one such hold FOR SHARE to the end of the
-- caller's transaction, so that its release cannot commit while the caller acts on the strength
-- of it (the event store's retention: @ledgerline/audit's auditLegalHolds). A plain
-- `SELECT … FOR SHARE` needs UPDATE on the table, which the writer role no longer has.
CREATE FUNCTION audit.resource_held(p_resource_type text, p_resource_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
BEGIN
  IF p_resource_type IS NULL OR p_resource_id IS NULL THEN
    RAISE EXCEPTION 'audit.resource_held: the resource type and id are required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  PERFORM 1 FROM audit.legal_holds
    WHERE released_at IS NULL AND resource_type = p_resource_type AND resource_id = p_resource_id
    LIMIT 1 FOR SHARE;
  RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION audit.resource_held(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.resource_held(text, text) TO ledgerline_audit_writer;

-- Down Migration
ALTER FUNCTION audit.erase_subject(text) SET search_path = pg_catalog, audit;
ALTER FUNCTION audit.expire_payloads(timestamptz, integer) SET search_path = pg_catalog, audit;
ALTER FUNCTION audit.lock_legal_holds() SET search_path = pg_catalog, audit;
DROP FUNCTION audit.resource_held(text, text);
GRANT EXECUTE ON FUNCTION audit.erase_subject(text), audit.expire_payloads(timestamptz, integer) TO ledgerline_audit_writer;
DROP FUNCTION audit.release_hold(uuid, json), audit.erase_subject(text, json), audit.expire_payloads(timestamptz, integer, json);
DROP FUNCTION audit.requester_id(json), audit.queue_governance_record(json, text, text, text, text);
GRANT UPDATE (released_by, released_at) ON audit.legal_holds TO ledgerline_audit_writer;
GRANT UPDATE ON audit.sequencer_state TO ledgerline_audit_writer;
GRANT UPDATE (key, kek_id) ON audit.subject_keys TO ledgerline_audit_writer;
GRANT INSERT ON audit.records, audit.payloads, audit.event_leaves, audit.tree_nodes, audit.checkpoints, audit.subject_keys
   TO ledgerline_audit_writer;
GRANT SELECT, DELETE ON audit.queue TO ledgerline_audit_writer;
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM ledgerline_audit_sequencer;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM ledgerline_audit_sequencer;
REVOKE USAGE ON SCHEMA audit FROM ledgerline_audit_sequencer;

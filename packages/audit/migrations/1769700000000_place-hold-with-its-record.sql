-- Up Migration

-- A legal hold is placed with its record, in one transaction. The service inserted the hold
-- and then handed its record (`audit.hold.place`) to its sink, which writes a few milliseconds
-- later: a process that died meanwhile, or a queue that refused the write, left a hold in force
-- that the trail does not show, blocking erasure and expiry with no record of who placed it or
-- why. `audit.place_hold` inserts the hold and queues its record together, as `release_hold`
-- and `erase_subject` do, and the writer role loses its direct INSERT on the table, so a hold
-- placed through the application's role is always recorded. The payload names the hold's
-- target and reason, and the database login that ran the function, which the caller cannot
-- choose. Serialised with erasure and expiry as before: the INSERT takes ROW EXCLUSIVE, which
-- waits for their SHARE lock on the table.
CREATE FUNCTION audit.place_hold(p_id uuid, p_subject text, p_resource_type text, p_resource_id text, p_reason text, p_by json) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
BEGIN
  IF p_id IS NULL OR p_reason IS NULL THEN
    RAISE EXCEPTION 'audit.place_hold: the hold id and reason are required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  INSERT INTO audit.legal_holds (id, subject, resource_type, resource_id, reason, placed_by)
  VALUES (p_id, p_subject, p_resource_type, p_resource_id, p_reason, audit.requester_id(p_by));
  -- Canonical JSON (keys sorted, no spaces), as the sink writes payloads.
  PERFORM audit.queue_governance_record(p_by, 'audit.hold.place', 'audit.legal_hold', p_id::text,
    '{"databaseLogin":' || to_json(session_user::text)::text
    || ',"reason":' || to_json(p_reason)::text
    || ',"resource":' || CASE WHEN p_resource_type IS NULL THEN 'null'
                              ELSE '{"id":' || to_json(p_resource_id)::text || ',"type":' || to_json(p_resource_type)::text || '}' END
    || ',"subject":' || coalesce(to_json(p_subject)::text, 'null') || '}');
END
$$;
REVOKE ALL ON FUNCTION audit.place_hold(uuid, text, text, text, text, json) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.place_hold(uuid, text, text, text, text, json) TO ledgerline_audit_writer;
REVOKE INSERT ON audit.legal_holds FROM ledgerline_audit_writer;

-- Down Migration
GRANT INSERT ON audit.legal_holds TO ledgerline_audit_writer;
DROP FUNCTION audit.place_hold(uuid, text, text, text, text, json);

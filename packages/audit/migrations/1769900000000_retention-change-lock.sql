-- Up Migration

-- A retention change and event-store retention no longer race. Retention asks, per stream,
-- whether the events may go (holds.ts `leavesStillRetained`) by the stored policy row and the
-- changes the trail records. A change made but not yet committed was invisible to both, so an
-- event could be deleted under the old policy while a lengthening that reaches it was in
-- flight; once signed, the lengthening counted from its record's occurredAt, the change
-- transaction's start (`now()`), which came before the deletion, and verification then
-- reported the event missing. Now:
-- - retention takes SHARE on audit.retention_policies first (`audit.lock_retention_policies`,
--   as `audit.lock_legal_holds` does for holds: the writer role cannot lock the table itself),
--   so it waits for a change in flight and then reads it;
-- - a change's record is stamped with the time its row changed (`clock_timestamp()`), not
--   its transaction's start: a change that waited behind retention's lock is dated after the
--   deletion it waited for, which its lengthening then does not reach.
CREATE FUNCTION audit.lock_retention_policies() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
BEGIN
  LOCK TABLE audit.retention_policies IN SHARE MODE;
END
$$;
REVOKE ALL ON FUNCTION audit.lock_retention_policies() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.lock_retention_policies() TO ledgerline_audit_writer;

CREATE OR REPLACE FUNCTION audit.retention_policy_record() RETURNS trigger
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
      'occurredAt', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
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

-- Down Migration
CREATE OR REPLACE FUNCTION audit.retention_policy_record() RETURNS trigger
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

DROP FUNCTION audit.lock_retention_policies();

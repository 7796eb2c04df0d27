-- Up Migration

-- A retention change's row in audit.retention_policy_changes is dated as its record is. Since
-- migration 1769900000000 the record (`audit.retention.change`, whose time the trail signs) is
-- dated when the policy row changed, `clock_timestamp()`, while `effective_from` kept its
-- default, `now()`: the change transaction's start, which for a change that waited behind
-- retention's lock came before the deletion it waited for. The two now take one reading of
-- the clock (the record to the millisecond, as every queued entry states its time).
CREATE OR REPLACE FUNCTION audit.retention_policy_record() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, audit AS $$
DECLARE
  -- One reading of the clock for the row and the record: the time the policy row changed.
  changed_at timestamptz := clock_timestamp();
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
    INSERT INTO audit.retention_policy_changes (record_class, retain_days_before, retain_days_after, effective_from) VALUES (class, was, becomes, changed_at);
    -- The queued form the sink writes (writer.ts QueuedEntry); the payload is canonical JSON
    -- (keys sorted), as the sink would make it.
    INSERT INTO audit.queue (entry) VALUES (json_build_object(
      'id', gen_random_uuid()::text,
      'occurredAt', to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
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

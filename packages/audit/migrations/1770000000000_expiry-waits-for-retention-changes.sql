-- Up Migration

-- Payload expiry waits for a retention change in flight, as event-store retention does since
-- migration 1769900000000. expire_payloads read a class's policy row without a lock, so a
-- change made but not yet committed was invisible to it: a payload could be removed under the
-- old policy while a lengthening that reaches it was in flight. Its record is dated when its
-- row changed (before the removal), so the trail then shows a policy, decided first, that the
-- removal broke, and verification reports the payload missing.
--
-- SHARE on audit.retention_policies, taken first: a change in flight is waited for and then
-- read, and the legal holds' SHARE is not held meanwhile, so hold placement does not queue
-- behind an open policy change. Both locks last until the caller's transaction ends; the store
-- runs each batch in a transaction of its own (store.ts expirePayloads).
CREATE OR REPLACE FUNCTION audit.expire_payloads(p_as_of timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
DECLARE
  removed integer;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'audit.expire_payloads must run under READ COMMITTED, so that its hold check sees every committed hold'
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  LOCK TABLE audit.retention_policies IN SHARE MODE;
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

-- Down Migration
CREATE OR REPLACE FUNCTION audit.expire_payloads(p_as_of timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
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

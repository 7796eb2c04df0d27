-- Up Migration

-- Who queued each entry, for the records only the database makes. Verification lets a trail's
-- own governance records excuse a removal: a retention shortening (`audit.retention.change`),
-- a hold's release (`audit.hold.release`). They are queued by the database's code alone (the
-- change trigger on audit.retention_policies, and the SECURITY DEFINER functions that place
-- and release holds, erase and expire), but audit.queue took any entry from the writer role, so
-- a holder of the application's login could queue a shortening or a release of its own, get it
-- signed, and have a removal it then made (the service's login owns the event store) read as
-- lawful.
--
-- `queued_by` is the role that inserted the row, `current_user`: inside the SECURITY DEFINER
-- functions the schema's owner, in the trigger whoever changed the policy (the owner or a
-- superuser: the writer role may only read the table), and for the services the writer role
-- they `SET LOCAL ROLE` to. The writer role may insert the entry column only, so it cannot
-- name another. The sequencer integrates such a governance record only when the database made
-- it (`audit.queued_by_database`); otherwise it records the row as `audit.entry.rejected`, its
-- text kept (src/provenance.ts). Rows queued before this migration have no `queued_by` (NULL):
-- no one can tell who queued them, and they are judged as they were before it (taken as they
-- are), so that an upgrade turns no lawful release or change still in the queue into a
-- rejection, which the append-only log would keep for good.
ALTER TABLE audit.queue ADD COLUMN queued_by name;
ALTER TABLE audit.queue ALTER COLUMN queued_by SET DEFAULT current_user;
REVOKE INSERT ON audit.queue FROM ledgerline_audit_writer;
GRANT INSERT (entry) ON audit.queue TO ledgerline_audit_writer;

-- Whether role `p_role` could have made a record the database makes: the owner of audit.queue
-- (the schema's owner, whose SECURITY DEFINER functions queue them), a member of it (who may
-- act as it; on PostgreSQL 16 a membership granted WITH SET FALSE counts too), or a
-- superuser. NULL or a role dropped since: no. By oid, so that a role name no longer in
-- pg_roles is an answer, not an error.
CREATE FUNCTION audit.queued_by_database(p_role name) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_roles r, pg_catalog.pg_class c
     WHERE r.rolname = p_role AND c.oid = 'audit.queue'::pg_catalog.regclass
       AND (r.rolsuper OR pg_catalog.pg_has_role(r.oid, c.relowner, 'MEMBER')))
$$;
GRANT EXECUTE ON FUNCTION audit.queued_by_database(name) TO ledgerline_audit_sequencer, ledgerline_audit_writer;

-- Down Migration
DROP FUNCTION audit.queued_by_database(name);
REVOKE INSERT (entry) ON audit.queue FROM ledgerline_audit_writer;
GRANT INSERT ON audit.queue TO ledgerline_audit_writer;
ALTER TABLE audit.queue DROP COLUMN queued_by;

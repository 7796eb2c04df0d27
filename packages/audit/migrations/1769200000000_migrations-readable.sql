-- Up Migration

-- A service whose login may not change the audit schema (AUDIT_MIGRATIONS=check: a deploy job
-- migrates it as the schema's owner, docs/audit.md "Roles") reads which migrations are applied
-- before it starts, and refuses to start on a schema that is behind its code.
GRANT SELECT ON audit.migrations TO ledgerline_audit_writer;

-- Down Migration
REVOKE SELECT ON audit.migrations FROM ledgerline_audit_writer;

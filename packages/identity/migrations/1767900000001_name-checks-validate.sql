-- Up Migration

-- Validates the rows written before the previous migration. VALIDATE CONSTRAINT holds SHARE
-- UPDATE EXCLUSIVE, which lets sign-ins and token requests go on during the scan. The rules
-- are the ones the rows were written under, so this cannot fail.
ALTER TABLE identity.users VALIDATE CONSTRAINT users_username_check;
ALTER TABLE identity.clients VALIDATE CONSTRAINT clients_id_check;

-- Down Migration
-- Nothing to undo: validating a constraint changes no definition.

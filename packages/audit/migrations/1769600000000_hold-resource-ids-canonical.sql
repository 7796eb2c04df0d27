-- Up Migration

-- A legal hold on a resource matches its records whatever case a UUID id was written in.
-- The HTTP plugin recorded every resource id in lower case, while a hold kept the id as the
-- person placing it typed it: a hold on ledger account `0F3A…` (as a statement prints it) did
-- not match the records of `0f3a…`, so retention expired their payloads and erasure went
-- ahead, under a hold. A UUID names the same thing in either case (RFC 9562 §4); other ids may
-- be case-sensitive, so only UUIDs are folded. canonicalResourceId (record.ts) is the same rule
-- in TypeScript: the trail now stores, holds and searches UUIDs in lower case, and keeps the
-- case of every other id. Here holds are matched on both sides' canonical form, so holds and
-- records written before this migration match as well.
CREATE FUNCTION audit.canonical_resource_id(p_id text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog AS $$
  SELECT CASE WHEN length(p_id) = 36 AND p_id ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
              THEN lower(p_id) ELSE p_id END
$$;
GRANT EXECUTE ON FUNCTION audit.canonical_resource_id(text) TO ledgerline_audit_sequencer, ledgerline_audit_writer;

CREATE OR REPLACE FUNCTION audit.is_held(p_subject text, p_resource_type text, p_resource_id text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, audit AS $$
  SELECT EXISTS (
    SELECT 1 FROM audit.legal_holds h
     WHERE h.released_at IS NULL
       AND ((h.subject IS NOT NULL AND h.subject = p_subject)
         OR (h.resource_type = p_resource_type
             AND audit.canonical_resource_id(h.resource_id) = audit.canonical_resource_id(p_resource_id))))
$$;

CREATE OR REPLACE FUNCTION audit.resource_held(p_resource_type text, p_resource_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, audit, pg_temp AS $$
BEGIN
  IF p_resource_type IS NULL OR p_resource_id IS NULL THEN
    RAISE EXCEPTION 'audit.resource_held: the resource type and id are required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  PERFORM 1 FROM audit.legal_holds
    WHERE released_at IS NULL AND resource_type = p_resource_type
      AND audit.canonical_resource_id(resource_id) = audit.canonical_resource_id(p_resource_id)
    LIMIT 1 FOR SHARE;
  RETURN FOUND;
END
$$;

-- Down Migration
CREATE OR REPLACE FUNCTION audit.resource_held(p_resource_type text, p_resource_id text) RETURNS boolean
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
CREATE OR REPLACE FUNCTION audit.is_held(p_subject text, p_resource_type text, p_resource_id text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, audit AS $$
  SELECT EXISTS (
    SELECT 1 FROM audit.legal_holds h
     WHERE h.released_at IS NULL
       AND ((h.subject IS NOT NULL AND h.subject = p_subject)
         OR (h.resource_type = p_resource_type AND h.resource_id = p_resource_id)))
$$;
DROP FUNCTION audit.canonical_resource_id(text);

-- Up Migration

-- A signing key's private half is stored either in clear (no key-encryption key configured)
-- or as a JWE under the key-encryption key (src/keys-at-rest.ts), never both.
ALTER TABLE identity.signing_keys ALTER COLUMN private_jwk DROP NOT NULL;
ALTER TABLE identity.signing_keys ADD COLUMN private_jwe text;
ALTER TABLE identity.signing_keys ADD CONSTRAINT signing_keys_one_private_form
  CHECK ((private_jwk IS NULL) <> (private_jwe IS NULL));

-- Down Migration
ALTER TABLE identity.signing_keys DROP CONSTRAINT signing_keys_one_private_form;
-- Keys stored encrypted cannot go back in clear without the key-encryption key: refuse.
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM identity.signing_keys WHERE private_jwe IS NOT NULL) THEN
    RAISE EXCEPTION 'signing keys are stored encrypted; decrypt them with the service before going down';
  END IF;
END $$;
ALTER TABLE identity.signing_keys DROP COLUMN private_jwe;
ALTER TABLE identity.signing_keys ALTER COLUMN private_jwk SET NOT NULL;

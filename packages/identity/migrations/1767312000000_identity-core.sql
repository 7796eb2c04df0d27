-- Up Migration

-- People who log in. Passwords are argon2id PHC strings; the TOTP secret is enabled only once
-- the user proved they hold it (totp_confirmed). totp_last_step is the newest RFC 6238 time
-- step accepted, so a code, once used, cannot be used again.
CREATE TABLE identity.users (
  id              uuid PRIMARY KEY,
  username        text NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9._@-]{3,64}$'),
  password_hash   text NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
  roles           text[] NOT NULL,
  tenant          text,
  failed_logins   integer NOT NULL DEFAULT 0 CHECK (failed_logins >= 0),
  locked_until    timestamptz,
  totp_secret     text,
  totp_confirmed  boolean NOT NULL DEFAULT false,
  totp_last_step  bigint,
  created_at      timestamptz NOT NULL,
  CHECK (NOT totp_confirmed OR totp_secret IS NOT NULL)
);

-- One-time recovery codes, stored as SHA-256 of a 80-bit random code (a slow hash buys
-- nothing against a secret that cannot be guessed).
CREATE TABLE identity.recovery_codes (
  user_id    uuid NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
  code_hash  bytea NOT NULL CHECK (octet_length(code_hash) = 32),
  used_at    timestamptz,
  PRIMARY KEY (user_id, code_hash)
);

-- Refresh tokens. Each use replaces the token with a new one of the same family; a token used
-- twice means it was stolen, and the whole family is revoked.
CREATE TABLE identity.refresh_tokens (
  id          uuid PRIMARY KEY,
  family_id   uuid NOT NULL,
  user_id     uuid NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
  secret_hash bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
  audience    text NOT NULL,
  issued_at   timestamptz NOT NULL,
  expires_at  timestamptz NOT NULL CHECK (expires_at > issued_at),
  used_at     timestamptz,
  revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family ON identity.refresh_tokens (family_id);

-- Service identities (OAuth2 client credentials). A client authenticates with a secret
-- (argon2id) or with a JWT signed by the key in public_jwk (private_key_jwt), or either.
CREATE TABLE identity.clients (
  id            text PRIMARY KEY CHECK (id ~ '^[a-z0-9._-]{3,64}$'),
  secret_hash   text CHECK (secret_hash LIKE '$argon2id$%'),
  public_jwk    jsonb,
  roles         text[] NOT NULL,
  audiences     text[] NOT NULL CHECK (cardinality(audiences) > 0),
  created_at    timestamptz NOT NULL,
  CHECK (secret_hash IS NOT NULL OR public_jwk IS NOT NULL)
);

-- Client assertion ids already accepted, until they expire: an assertion is good once.
CREATE TABLE identity.used_assertions (
  client_id  text NOT NULL,
  jti        text NOT NULL,
  expires_at timestamptz NOT NULL,
  PRIMARY KEY (client_id, jti)
);

-- Token signing keys (Ed25519). The key with the latest active_from not in the future signs.
-- A new key is published before it becomes active, so verifiers that cache the JWKS have it
-- before the first token it signs; a superseded key stays published until every token it
-- signed has expired. The private key is a JWK in the clear here: a deployment that needs
-- more keeps it in a KMS.
CREATE TABLE identity.signing_keys (
  kid         text PRIMARY KEY,
  private_jwk jsonb NOT NULL,
  public_jwk  jsonb NOT NULL,
  created_at  timestamptz NOT NULL,
  active_from timestamptz NOT NULL UNIQUE CHECK (active_from >= created_at)
);

-- Down Migration
DROP TABLE identity.signing_keys;
DROP TABLE identity.used_assertions;
DROP TABLE identity.clients;
DROP TABLE identity.refresh_tokens;
DROP TABLE identity.recovery_codes;
DROP TABLE identity.users;

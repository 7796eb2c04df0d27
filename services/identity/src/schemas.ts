import { Type, type Static } from 'typebox';
import { STORABLE_TEXT_PATTERN } from '@ledgerline/service-runtime';

/** Text PostgreSQL can take (a NUL in a username would fail its query as a 500). */
const Text = (maxLength: number) => Type.String({ minLength: 1, maxLength, pattern: STORABLE_TEXT_PATTERN });

/**
 * The token endpoint's parameters (RFC 6749 §4.3, §4.4, §6; RFC 7523 client assertions), sent as
 * a form or as JSON. Which ones are required depends on `grant_type`, checked by the handler.
 */
export const TokenBody = Type.Object(
  {
    grant_type: Type.Enum(['password', 'refresh_token', 'client_credentials']),
    audience: Type.Optional(Text(64)),
    username: Type.Optional(Text(64)),
    password: Type.Optional(Text(256)),
    totp_code: Type.Optional(Type.String({ pattern: '^[0-9]{6}$' })),
    recovery_code: Type.Optional(Text(64)),
    refresh_token: Type.Optional(Text(128)),
    client_id: Type.Optional(Text(64)),
    client_secret: Type.Optional(Text(256)),
    client_assertion_type: Type.Optional(Type.Literal('urn:ietf:params:oauth:client-assertion-type:jwt-bearer')),
    client_assertion: Type.Optional(Text(4096)),
    scope: Type.Optional(Text(512)),
  },
  { additionalProperties: false },
);
export type TokenBody = Static<typeof TokenBody>;

export const TokenOut = Type.Object({
  access_token: Type.String(),
  token_type: Type.Literal('Bearer'),
  expires_in: Type.Integer(),
  refresh_token: Type.Optional(Type.String()),
});

// Long enough for an access token, which is refused as unsupported_token_type (RFC 7009 §2.2.1),
// not cut off as a malformed request.
export const RevokeBody = Type.Object({ token: Text(4096), token_type_hint: Type.Optional(Text(32)) }, { additionalProperties: false });

export const JwksOut = Type.Object({
  keys: Type.Array(
    Type.Object({
      kty: Type.Optional(Type.String()),
      crv: Type.Optional(Type.String()),
      x: Type.Optional(Type.String()),
      kid: Type.Optional(Type.String()),
      alg: Type.Optional(Type.String()),
      use: Type.Optional(Type.String()),
    }),
  ),
});

export const NewUserBody = Type.Object(
  {
    username: Type.String({ pattern: '^[a-z0-9._@-]{3,64}$' }),
    // As TokenBody's password: one with a NUL or a lone surrogate could be stored but never typed at login.
    password: Type.String({ minLength: 12, maxLength: 256, pattern: STORABLE_TEXT_PATTERN }),
    roles: Type.Array(Type.String({ pattern: '^[a-z][a-z0-9_:-]{0,63}$' }), { maxItems: 32 }),
    tenant: Type.Optional(Text(64)),
  },
  { additionalProperties: false },
);
export type NewUserBody = Static<typeof NewUserBody>;

export const UserOut = Type.Object({ id: Type.String({ format: 'uuid' }), username: Type.String() });

export const TotpEnrolOut = Type.Object({ secret: Type.String(), uri: Type.String() });
/** A code from the new secret, and the user's password (a bearer token alone must not bind a second factor: docs/security.md). */
export const TotpConfirmBody = Type.Object({ code: Type.String({ pattern: '^[0-9]{6}$' }), password: Text(256) }, { additionalProperties: false });
export const TotpConfirmOut = Type.Object({ recovery_codes: Type.Array(Type.String()) });
export const KeyOut = Type.Object({ kid: Type.String(), active_from: Type.String({ format: 'date-time' }) });

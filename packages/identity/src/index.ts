export { ACCESS_TOKEN_TTL_SECONDS_DEFAULT, assertionClientId, CLIENT_ASSERTION_TYPE, Identity, IdentityError, KEY_PUBLISH_LEAD_MS, LOGIN_REFUSED, KEY_REFRESH_MS, REFRESH_TOKEN_TTL_SECONDS_DEFAULT, SERVICE_ROLE_PREFIX, type GrantOptions } from './identity.ts';
export type { ClientAuthentication, IdentityErrorCode, IdentityOptions, LoginRequest, NewClient, NewUser, RevokeOutcome, SecondFactor, TokenResponse } from './identity.ts';
export { afterFailure, AFTER_SUCCESS, isLocked, LOCKOUT_DEFAULT } from './lockout.ts';
export type { LockoutPolicy, LoginCounters } from './lockout.ts';
export { migrateIdentity } from './migrate.ts';
export { auditPseudonymKey, KeyEncryptionKeyError, parseKeyEncryptionKey, type KeyEncryptionKey } from './keys-at-rest.ts';
export { checkPasswordStrength, hashPassword, PASSWORD_CHARS_MAX, PASSWORD_CHARS_MIN, verifyPassword, WeakPasswordError } from './passwords.ts';
export { newRecoveryCodes, newTotpSecret, RECOVERY_CODES_COUNT, recoveryCodeHash, TOTP_DEFAULT, TOTP_WINDOW_STEPS, totpCode, totpUri, verifyTotp } from './totp.ts';
export type { TotpParams } from './totp.ts';
export {
  ACCESS_TOKEN_TYPE,
  CLOCK_TOLERANCE_SECONDS,
  createTokenVerifier,
  InvalidTokenError,
  TokenKeysUnavailableError,
  JWKS_CACHE_MAX_AGE_MS,
  localKeys,
  newSigningKey,
  remoteKeys,
  signAccessToken,
  TOKEN_ALGORITHM,
} from './tokens.ts';
export type { AccessClaims, SigningKeyPair, TokenVerifier, TokenVerifierOptions, VerifiedToken } from './tokens.ts';

/**
 * Access tokens: JWTs signed with Ed25519 (`alg: EdDSA`), and their verification. Verifiers
 * accept EdDSA only, from keys they hold or fetched from the issuer's JWKS, so `alg: none`,
 * HMAC tokens keyed with a public key (key confusion), RSA tokens and unknown `kid`s all fail
 * before any claim is read.
 */
import { randomUUID } from 'node:crypto';
import { calculateJwkThumbprint, createLocalJWKSet, createRemoteJWKSet, errors as joseErrors, exportJWK, generateKeyPair, jwtVerify, SignJWT } from 'jose';
import type { CryptoKey, JSONWebKeySet, JWK, JWTPayload, JWTVerifyGetKey } from 'jose';

export const TOKEN_ALGORITHM = 'EdDSA';
/** RFC 9068's media type for access tokens: an ID token or a client assertion cannot pass as one. */
export const ACCESS_TOKEN_TYPE = 'at+jwt';
/** Clock skew tolerated between issuer and verifier. */
export const CLOCK_TOLERANCE_SECONDS = 5;

/** What a verified access token says about its bearer. Shaped as `@ledgerline/authz`'s Principal. */
export interface VerifiedToken {
  id: string;
  kind: 'user' | 'service';
  roles: readonly string[];
  tenant?: string;
  jti: string;
  audience: string;
  expiresAtMs: number;
}

export interface AccessClaims {
  sub: string;
  kind: 'user' | 'service';
  roles: readonly string[];
  tenant?: string | null;
  audience: string;
}

export interface SigningKeyPair {
  kid: string;
  privateJwk: JWK;
  publicJwk: JWK;
}

/** A fresh Ed25519 key; its `kid` is the RFC 7638 thumbprint, so it names the key itself. */
export async function newSigningKey(): Promise<SigningKeyPair> {
  const { privateKey, publicKey } = await generateKeyPair(TOKEN_ALGORITHM, { crv: 'Ed25519', extractable: true });
  const publicJwk = await exportJWK(publicKey);
  const kid = await calculateJwkThumbprint(publicJwk);
  return {
    kid,
    privateJwk: { ...(await exportJWK(privateKey)), kid, alg: TOKEN_ALGORITHM },
    publicJwk: { ...publicJwk, kid, alg: TOKEN_ALGORITHM, use: 'sig' },
  };
}

export function signAccessToken(
  key: { kid: string; privateKey: CryptoKey },
  claims: AccessClaims,
  options: { issuer: string; ttlSeconds: number; nowMs: number },
): Promise<string> {
  const nowSeconds = Math.floor(options.nowMs / 1000);
  return new SignJWT({ kind: claims.kind, roles: [...claims.roles], ...(claims.tenant === undefined || claims.tenant === null ? {} : { tenant: claims.tenant }) })
    .setProtectedHeader({ alg: TOKEN_ALGORITHM, kid: key.kid, typ: ACCESS_TOKEN_TYPE })
    .setIssuer(options.issuer)
    .setSubject(claims.sub)
    .setAudience(claims.audience)
    .setIssuedAt(nowSeconds)
    .setNotBefore(nowSeconds)
    .setExpirationTime(nowSeconds + options.ttlSeconds)
    .setJti(randomUUID())
    .sign(key.privateKey);
}

export class InvalidTokenError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'InvalidTokenError';
  }
}

/**
 * The token could not be checked now: the issuer's signing keys could not be fetched (it is
 * down, hangs past the fetch's timeout, or answers other than 200 with a key set). Nothing is
 * known of the token, so it is not refused as invalid: `@ledgerline/authz`'s HTTP plugin answers
 * 503 with Retry-After on this `code` (its VERIFIER_UNAVAILABLE_CODE, kept equal), not 401, and
 * does not count it as an authentication failure. Until 2026-12-07 such a token was answered
 * 401 invalid_token, so the identity service down for a minute (the key set's cache) made the
 * ledger refuse every valid token it had not seen, and count each against the client's address
 * (a review found it).
 */
export class TokenKeysUnavailableError extends Error {
  readonly code = 'ERR_VERIFIER_UNAVAILABLE';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TokenKeysUnavailableError';
  }
}

export interface TokenVerifierOptions {
  /** Where the keys come from: `remoteKeys(url)` for the issuer's JWKS, or `localKeys(jwks)`. */
  keys: JWTVerifyGetKey;
  issuer: string;
  /** This service's name; a token for any other audience is refused. */
  audience: string;
  /** Milliseconds since the epoch. */
  clock?: () => number;
  /** Verified tokens remembered (until they expire), so a client's repeated token costs a map lookup. */
  cacheEntriesMax?: number;
}

/**
 * How long a fetched JWKS is used before it is fetched again: the issuer's `max-age` (60 s).
 * jose otherwise refetches only for an unknown `kid`, so this is also how long a key withdrawn
 * from the set (a compromised one) still verifies new tokens; KEY_PUBLISH_LEAD_MS counts on it.
 */
export const JWKS_CACHE_MAX_AGE_MS = 60_000;

/** JWKS fetched from the issuer, cached for JWKS_CACHE_MAX_AGE_MS; an unknown `kid` refetches at most every 30 s. */
export function remoteKeys(url: string): JWTVerifyGetKey {
  return createRemoteJWKSet(new URL(url), { cacheMaxAge: JWKS_CACHE_MAX_AGE_MS, cooldownDuration: 30_000, timeoutDuration: 5000 });
}

export function localKeys(jwks: JSONWebKeySet): JWTVerifyGetKey {
  return createLocalJWKSet(jwks);
}

export type TokenVerifier = (token: string) => Promise<VerifiedToken>;

const CACHE_ENTRIES_MAX_DEFAULT = 10_000;
/** Base64url JWS compact form, bounded: a header, a payload and a 64-byte signature. */
const COMPACT_JWS = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{86}$/;
const TOKEN_CHARS_MAX = 4096;
/** Claims end up in audit records and logs, whose fields are bounded; the issuer never writes longer ones. */
const CLAIM_CHARS_MAX = 255;
const ROLES_MAX = 32;

export function createTokenVerifier(options: TokenVerifierOptions): TokenVerifier {
  const clock = options.clock ?? Date.now;
  const cacheMax = options.cacheEntriesMax ?? CACHE_ENTRIES_MAX_DEFAULT;
  // Insertion-ordered: when full, the oldest entry goes. Keyed by the whole token, signature
  // included, so an edited token is never a hit.
  const cache = new Map<string, VerifiedToken>();

  return async (token) => {
    const nowMs = clock();
    const hit = cache.get(token);
    if (hit !== undefined) {
      if (hit.expiresAtMs + CLOCK_TOLERANCE_SECONDS * 1000 > nowMs) return hit;
      cache.delete(token);
    }
    if (token.length > TOKEN_CHARS_MAX || !COMPACT_JWS.test(token)) throw new InvalidTokenError('malformed token');
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, options.keys, {
        algorithms: [TOKEN_ALGORITHM],
        typ: ACCESS_TOKEN_TYPE,
        issuer: options.issuer,
        audience: options.audience,
        currentDate: new Date(nowMs),
        clockTolerance: CLOCK_TOLERANCE_SECONDS,
        requiredClaims: ['sub', 'exp', 'iat', 'jti', 'nbf'],
      }));
    } catch (error) {
      if (keysUnavailable(error)) throw new TokenKeysUnavailableError(`the issuer's signing keys could not be fetched (${describe(error)})`, { cause: error });
      throw new InvalidTokenError(describe(error), { cause: error });
    }
    const verified = toVerified(payload, options.audience);
    // 0 keeps nothing: every token is verified against the keys as they are now.
    if (cacheMax === 0) return verified;
    if (cache.size >= cacheMax) {
      const oldest = cache.keys().next();
      if (oldest.done !== true) cache.delete(oldest.value);
    }
    cache.set(token, verified);
    return verified;
  };
}

/**
 * Whether verification failed for want of the keys, not for anything in the token: the remote
 * key set's fetch timed out (JWKSTimeout), was answered other than 200 (jose's generic error,
 * its only use in the fetch), or failed outright (fetch's own error, not jose's: the connection
 * refused or reset, the name not resolved). Everything about the token itself, an unknown `kid`
 * included, is a jose error of its own kind.
 */
function keysUnavailable(error: unknown): boolean {
  if (!(error instanceof joseErrors.JOSEError)) return true;
  return error instanceof joseErrors.JWKSTimeout || error instanceof joseErrors.JWKSInvalid || (error.code === joseErrors.JOSEError.code && /JSON Web Key Set HTTP response/.test(error.message));
}

/** jose's error codes, without echoing anything from the token back to the caller. */
function describe(error: unknown): string {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' ? code : 'token verification failed';
}

/**
 * A principal's id as every consumer can use it: printable ASCII without spaces, 1 to 255
 * characters. It scopes idempotency keys, names the actor of audit records and event
 * metadata, and is compared with account owners. This issuer's subjects (user UUIDs, client ids
 * of `[a-z0-9._-]`) all fit; a token from a trusted key with any other subject is malformed,
 * refused as 401 rather than failing later in the database.
 */
const SUBJECT_PATTERN = /^[\x21-\x7E]{1,255}$/;
/** Claim text PostgreSQL can store, 1 to 255 characters: no NUL, no unpaired surrogate. */
function storableClaim(value: unknown): value is string {
  return typeof value === 'string' && value.length >= 1 && value.length <= CLAIM_CHARS_MAX && !value.includes('\u0000') && value.isWellFormed();
}

function toVerified(payload: JWTPayload, audience: string): VerifiedToken {
  const { sub, jti, exp, kind, roles, tenant } = payload as JWTPayload & { kind?: unknown; roles?: unknown; tenant?: unknown };
  const rolesOk = Array.isArray(roles) && roles.length <= ROLES_MAX && roles.every(storableClaim);
  if (typeof sub !== 'string' || !SUBJECT_PATTERN.test(sub) || typeof jti !== 'string' || typeof exp !== 'number' || (kind !== 'user' && kind !== 'service') || !rolesOk) {
    throw new InvalidTokenError('token claims malformed');
  }
  if (tenant !== undefined && !storableClaim(tenant)) throw new InvalidTokenError('token claims malformed');
  return { id: sub, kind, roles, ...(tenant === undefined ? {} : { tenant }), jti, audience, expiresAtMs: exp * 1000 };
}

/**
 * `Identity`: users, service clients, signing keys and tokens on PostgreSQL (schema `identity`).
 * It knows nothing of HTTP; the identity service maps its errors to problem+json.
 *
 * Every secret is stored as a hash (argon2id for passwords and client secrets, SHA-256 for
 * 256-bit refresh-token secrets and 80-bit recovery codes), and every check that can fail on
 * a guess counts toward lockout or is single-use.
 */
import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import { decodeJwt, importJWK, jwtVerify } from 'jose';
import type { CryptoKey, JSONWebKeySet, JWK } from 'jose';
import type pg from 'pg';
import { afterFailure, AFTER_SUCCESS, isLocked, LOCKOUT_DEFAULT, type LockoutPolicy, type LoginCounters } from './lockout.ts';
import { hashPassword, verifyPassword } from './passwords.ts';
import { newTotpSecret, newRecoveryCodes, recoveryCodeHash, totpUri, verifyTotp } from './totp.ts';
import { newSigningKey, signAccessToken, TOKEN_ALGORITHM } from './tokens.ts';
import { keyFor, openPrivateJwk, sealPrivateJwk, type KeyEncryptionKey } from './keys-at-rest.ts';

/** Longest client-assertion `jti` kept for replay detection (RFC 7519 sets none; UUIDs and random ids are far shorter). */
const ASSERTION_JTI_LENGTH_MAX = 255;

/** A jti identity.used_assertions can store and index: 1..ASSERTION_JTI_LENGTH_MAX characters, well-formed, no NUL. */
function storableJti(jti: string): boolean {
  return jti.length >= 1 && jti.length <= ASSERTION_JTI_LENGTH_MAX && jti.isWellFormed() && !jti.includes('\u0000');
}

export type IdentityErrorCode =
  | 'invalid_request'
  | 'invalid_grant'
  | 'invalid_client'
  | 'invalid_target'
  | 'mfa_required'
  | 'account_locked'
  | 'conflict'
  | 'not_found'
  /** RFC 7009 §2.2.1: a revocation of a token this server does not revoke (an access token). */
  | 'unsupported_token_type'
  /** The database did not answer in time (a lock or a statement timeout): retry. RFC 6749 §4.1.2.1's name. */
  | 'temporarily_unavailable';

/** A refusal the caller may see. Messages never say which of username or password was wrong. */
/** What every refused login says, whatever the reason: naming it would tell usernames apart. */
export const LOGIN_REFUSED = 'invalid username, password or code';

export class IdentityError extends Error {
  readonly code: IdentityErrorCode;
  /**
   * The username or client id of the existing account a refused login or client authentication
   * concerns; undefined when no account by the name given was found (or none was looked up).
   * Never in an answer: the audit trail names the account with it, and names anything else a
   * caller typed only by a keyed digest (what was typed as a username may be a password).
   */
  readonly account: string | undefined;
  /**
   * Why, for the audit trail, when that is more precise than `code` (which is what the caller
   * is answered): `refresh_token_reused` for a spent refresh token presented again,
   * `totp_refused` or `recovery_code_refused` for a right password with a wrong (or spent)
   * second factor. Never in an
   * answer: a caller is answered `code` alike whatever this says.
   */
  readonly auditReason: string | undefined;
  constructor(code: IdentityErrorCode, message: string, options?: { cause?: unknown; account?: string; auditReason?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'IdentityError';
    this.code = code;
    this.account = options?.account;
    this.auditReason = options?.auditReason;
  }
}

export interface IdentityOptions {
  pool: pg.Pool;
  /** The `iss` of every token, and the audience client assertions must name. */
  issuer: string;
  /** Audiences users may ask tokens for (services users call directly). */
  userAudiences: readonly string[];
  /** Milliseconds since the epoch. */
  clock?: () => number;
  accessTokenTtlSeconds?: number;
  /** The absolute lifetime of a login session; rotation does not extend it. */
  refreshTokenTtlSeconds?: number;
  lockout?: LockoutPolicy;
  /**
   * Stores the private signing keys encrypted under this key (keys-at-rest.ts), and encrypts
   * at `ensureSigningKey` any stored in clear before it was set. Without it they are stored in
   * clear, and a store that holds encrypted keys refuses to start.
   */
  keyEncryptionKey?: KeyEncryptionKey;
}

export interface TokenResponse {
  access_token: string;
  token_type: 'Bearer';
  expires_in: number;
  refresh_token?: string;
}

export interface NewUser {
  username: string;
  password: string;
  roles: readonly string[];
  tenant?: string;
}

export interface NewClient {
  id: string;
  secret?: string;
  /** An Ed25519 public JWK for `private_key_jwt`. */
  publicJwk?: JWK;
  roles: readonly string[];
  audiences: readonly string[];
}

export interface LoginRequest {
  username: string;
  password: string;
  audience: string;
  totpCode?: string;
  recoveryCode?: string;
}

/** The second factor a login was granted with: null when the user has none on. */
export type SecondFactor = 'totp' | 'recovery_code' | null;

/** What `revoke` did, for the audit trail (the caller is answered alike: RFC 7009). */
export interface RevokeOutcome {
  /** The token exists and its secret matched; false for an unknown, malformed or wrong one. */
  found: boolean;
  /** Tokens of the session revoked now (0: it was revoked already, or not found). */
  revoked: number;
  /** The session (token family) and its user, when found. */
  familyId: string | null;
  userId: string | null;
}

export type ClientAuthentication =
  | { clientId: string; secret: string }
  | { assertion: string };

export const ACCESS_TOKEN_TTL_SECONDS_DEFAULT = 300;
export const REFRESH_TOKEN_TTL_SECONDS_DEFAULT = 8 * 3600;
/** Signing keys are re-read at most this often, so a rotation by another instance is picked up. */
export const KEY_REFRESH_MS = 30_000;
/**
 * A rotated-in key is published this long before it signs. Verifiers refetch the JWKS when
 * they meet an unknown `kid`, but at most every 30 s (`remoteKeys`' cooldown) and otherwise
 * keep it for the JWKS response's max-age (60 s): after this lead, every verifier that could
 * see a token from the new key has fetched a set that holds it.
 */
export const KEY_PUBLISH_LEAD_MS = 90_000;
/** A client assertion older than this is refused even if its `exp` is later. */
const ASSERTION_AGE_MAX_SECONDS = 300;
/** A service client's id: 3 to 64 of a-z, 0-9, `.`, `_` and `-`. */
const CLIENT_ID_PATTERN = /^[a-z0-9._-]{3,64}$/;
export const CLIENT_ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const ROLES_MAX = 32;
const ROLE_PATTERN = /^[a-z][a-z0-9_:-]{0,63}$/;
/**
 * Service roles (`svc:payments`, ...) are held by service clients only, and clients hold no
 * other: a role is just a name in a token, so a user given a service's role would move money as
 * that service does (with no limit). Kept equal to `@ledgerline/authz`'s SERVICE_ROLE_PREFIX,
 * whose reference policy also binds each rule to its kind of principal.
 */
export const SERVICE_ROLE_PREFIX = 'svc:';

/**
 * Every identity transaction bounds its waits, as the ledger's writes do (BEGIN_WRITE): a row or
 * family lock waited on past 5 s fails (answered 503, retry), a session that holds a transaction
 * open and idle for 10 s (a stalled process holding a user's row lock) is cut off, and no
 * statement runs past 15 s. The idle limit is above the slowest argon2id check, which runs
 * inside the login transaction.
 */
const BEGIN_BOUNDED =
  "BEGIN; SET LOCAL lock_timeout = '5s'; SET LOCAL idle_in_transaction_session_timeout = '10s'; SET LOCAL statement_timeout = '15s'";
/** SQLSTATEs of a bounded wait running out: lock_not_available, query_canceled (statement_timeout). */
const TIMED_OUT_CODES: ReadonlySet<string> = new Set(['55P03', '57014']);
/**
 * The class of the transaction-scoped advisory locks that serialise the rotations and the
 * revocation of one refresh-token family (the second key is the family id's hash). The two-key
 * space does not overlap the one-key locks of the audit sequencer or migrations.
 */
const REFRESH_FAMILY_LOCK_CLASS = 0x4c4c4946; // "LLIF"

interface UserRow {
  id: string;
  username: string;
  password_hash: string;
  roles: string[];
  tenant: string | null;
  failed_logins: number;
  locked_until: Date | null;
  totp_secret: string | null;
  totp_confirmed: boolean;
  totp_last_step: string | null;
}

interface KeyRow {
  kid: string;
  private_jwk: JWK | null;
  private_jwe: string | null;
}

/** The unique violation of identity.signing_keys.active_from: two keys made for the same instant. */
function isActiveFromTaken(error: unknown): boolean {
  const e = error as { code?: unknown; constraint?: unknown };
  return e.code === '23505' && e.constraint === 'signing_keys_active_from_key';
}

export class Identity {
  readonly #pool: pg.Pool;
  readonly #issuer: string;
  readonly #userAudiences: ReadonlySet<string>;
  readonly #clock: () => number;
  readonly #accessTtl: number;
  readonly #refreshTtl: number;
  readonly #lockout: LockoutPolicy;
  readonly #kek: KeyEncryptionKey | null;
  #signer: { kid: string; privateKey: CryptoKey; loadedAtMs: number } | null = null;

  constructor(options: IdentityOptions) {
    this.#pool = options.pool;
    this.#issuer = options.issuer;
    this.#userAudiences = new Set(options.userAudiences);
    this.#clock = options.clock ?? Date.now;
    this.#accessTtl = options.accessTokenTtlSeconds ?? ACCESS_TOKEN_TTL_SECONDS_DEFAULT;
    this.#refreshTtl = options.refreshTokenTtlSeconds ?? REFRESH_TOKEN_TTL_SECONDS_DEFAULT;
    this.#lockout = options.lockout ?? LOCKOUT_DEFAULT;
    this.#kek = options.keyEncryptionKey ?? null;
  }

  // ---- users ------------------------------------------------------------------------------

  async createUser(user: NewUser): Promise<{ id: string }> {
    checkRoles(user.roles, 'user');
    const username = user.username.toLowerCase();
    if (!/^[a-z0-9._@-]{3,64}$/.test(username)) throw new IdentityError('invalid_request', 'username must be 3-64 of a-z 0-9 . _ @ -');
    const passwordHash = await hashPassword(user.password).catch((error: unknown) => {
      throw new IdentityError('invalid_request', error instanceof Error ? error.message : 'password rejected');
    });
    const id = randomUUID();
    const r = await this.#pool.query(
      `INSERT INTO identity.users (id, username, password_hash, roles, tenant, created_at)
       VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (username) DO NOTHING`,
      [id, username, passwordHash, user.roles, user.tenant ?? null, this.#now()],
    );
    if (r.rowCount !== 1) throw new IdentityError('conflict', `username ${username} is taken`);
    return { id };
  }

  /**
   * The stored name of the user (username, lower-cased) or client (id) by this name, or
   * undefined: for the audit trail, which names an account that exists and only a digest of
   * anything else typed. Never let an answer wait for it (its time says whether it found one).
   */
  async knownAccount(kind: 'user' | 'client', name: string): Promise<string | undefined> {
    const r = kind === 'user'
      ? await this.#pool.query<{ name: string }>('SELECT username AS name FROM identity.users WHERE username = $1', [name.toLowerCase()])
      : await this.#pool.query<{ name: string }>('SELECT id AS name FROM identity.clients WHERE id = $1', [name]);
    return r.rows[0]?.name;
  }

  async userIdByUsername(username: string): Promise<string | null> {
    const r = await this.#pool.query<{ id: string }>('SELECT id FROM identity.users WHERE username = $1', [username.toLowerCase()]);
    return r.rows[0]?.id ?? null;
  }

  /**
   * The password grant, with the second factor when the user enrolled one. The user's row is
   * locked for the whole check, so parallel guesses are counted one by one and cannot exceed
   * the lockout limit between them.
   */
  async login(request: LoginRequest): Promise<TokenResponse> {
    return (await this.authenticate(request)).tokens;
  }

  /** `login`, also saying which second factor it was granted with (for the audit trail: a recovery code spent is a credential used up). */
  async authenticate(request: LoginRequest, options: GrantOptions<{ tokens: TokenResponse; secondFactor: SecondFactor }> = {}): Promise<{ tokens: TokenResponse; secondFactor: SecondFactor }> {
    this.#checkUserAudience(request.audience);
    const nowMs = this.#clock();
    // The signing key is read before the transaction: reading it (from the pool) while holding a
    // connection and the user's row lock deadlocked the pool when every connection did so.
    const signer = await this.#signingKey();
    return this.#transaction(async (client) => {
      const r = await client.query<UserRow>('SELECT * FROM identity.users WHERE username = $1 FOR UPDATE', [request.username.toLowerCase()]);
      const user = r.rows[0];
      // The password is hashed in every case, locked or unknown user included, so that how long
      // a refusal takes says nothing about which refusal it is.
      const passwordOk = await verifyPassword(user?.password_hash ?? null, request.password);
      // And every refusal below does the same database work: one statement that writes, then
      // COMMIT. A wrong password commits its count (a WAL flush); an unknown username rolled
      // back and answered about 1.7 ms sooner (of 12), a locked account too, which told anyone
      // timing the answers which usernames exist.
      // An unknown username updates a decoy row as a wrong password updates the user's (migration
      // 1770400000000; until 2026-12-07 it only took a transaction id, about 0.5 ms quicker of 9).
      // After the hash, so the row is held for a moment only: held through the hash, unknown
      // names that share a row (64 of them, chosen by a hash anyone can compute) would queue on
      // each other where real users never do, a far plainer signal (a review's finding).
      if (user === undefined) {
        await client.query('UPDATE identity.login_decoys SET refusals = refusals + 1 WHERE slot = $1', [decoySlot(request.username)]);
        throw new FailedAttempt(new IdentityError('invalid_grant', LOGIN_REFUSED));
      }
      const counters: LoginCounters = { failedLogins: user.failed_logins, lockedUntil: user.locked_until };
      const account = { account: user.username };
      if (isLocked(counters, nowMs)) {
        await this.#saveCounters(client, user.id, counters);
        throw new FailedAttempt(new IdentityError('account_locked', 'too many failed attempts; try again later', account));
      }
      const refusal = new IdentityError('invalid_grant', LOGIN_REFUSED, account);
      if (!passwordOk) return this.#fail(client, user, counters, nowMs, refusal);
      let secondFactor: SecondFactor = null;
      if (user.totp_confirmed && user.totp_secret !== null) {
        const second = await this.#secondFactor(client, user, request, nowMs);
        if (second === 'missing') throw new IdentityError('mfa_required', 'a TOTP code or a recovery code is required', account);
        // Answered as any refused login; the trail says which factor was refused (PCI DSS 10.2.1.5).
        if (second === 'wrong') return this.#fail(client, user, counters, nowMs, new IdentityError('invalid_grant', LOGIN_REFUSED, { ...account, auditReason: request.totpCode === undefined ? 'recovery_code_refused' : 'totp_refused' }));
        secondFactor = second;
      }
      await this.#saveCounters(client, user.id, AFTER_SUCCESS);
      const tokens = await this.#issueUserTokens(client, signer, user, request.audience, randomUUID(), new Date(nowMs + this.#refreshTtl * 1000), nowMs);
      return { tokens, secondFactor };
    }, options.beforeCommit);
  }

  /**
   * Starts TOTP enrolment (again, while the last one is unconfirmed): returns the secret once;
   * it takes effect when `confirmTotp` sees a code from it. Refused once two-factor is on.
   */
  async enrolTotp(userId: string, issuerName: string): Promise<{ secret: string; uri: string }> {
    const secret = newTotpSecret();
    const r = await this.#pool.query<{ username: string }>(
      'UPDATE identity.users SET totp_secret = $2, totp_confirmed = false, totp_last_step = NULL WHERE id = $1 AND NOT totp_confirmed RETURNING username',
      [userId, secret],
    );
    const username = r.rows[0]?.username;
    if (username === undefined) throw new IdentityError('conflict', 'no such user, or two-factor authentication is already on');
    return { secret, uri: totpUri(secret, issuerName, username) };
  }

  /**
   * Turns TOTP on once the user shows a valid code and their password, and returns fresh
   * recovery codes (shown once). The password too: two-factor cannot be turned off or reset, so
   * whoever holds only a user's access token (five minutes of a stolen one) must not be able to
   * bind a secret of their own to the account and lock its owner out. A wrong password counts
   * as a failed login (and the lockout applies), as at login.
   */
  async confirmTotp(userId: string, code: string, password: string): Promise<{ recoveryCodes: string[] }> {
    const nowMs = this.#clock();
    return this.#transaction(async (client) => {
      const r = await client.query<UserRow>('SELECT * FROM identity.users WHERE id = $1 FOR UPDATE', [userId]);
      const user = r.rows[0];
      if (user === undefined || user.totp_secret === null || user.totp_confirmed) throw new IdentityError('conflict', 'no two-factor enrolment is pending');
      const counters: LoginCounters = { failedLogins: user.failed_logins, lockedUntil: user.locked_until };
      if (isLocked(counters, nowMs)) throw new IdentityError('account_locked', 'too many failed attempts; try again later', { account: user.username });
      if (!(await verifyPassword(user.password_hash, password))) {
        return this.#fail(client, user, counters, nowMs, new IdentityError('invalid_grant', 'the password is not valid', { account: user.username, auditReason: 'password_refused' }));
      }
      const step = verifyTotp(user.totp_secret, code, nowMs, null);
      if (step === null) throw new IdentityError('invalid_grant', 'the code is not valid');
      await client.query('UPDATE identity.users SET totp_confirmed = true, totp_last_step = $2 WHERE id = $1', [userId, step.toString()]);
      const recoveryCodes = newRecoveryCodes();
      await client.query('DELETE FROM identity.recovery_codes WHERE user_id = $1', [userId]);
      await client.query(
        'INSERT INTO identity.recovery_codes (user_id, code_hash) SELECT $1, unnest($2::bytea[])',
        [userId, recoveryCodes.map(recoveryCodeHash)],
      );
      return { recoveryCodes };
    });
  }

  // ---- refresh tokens ---------------------------------------------------------------------

  /**
   * Rotation: the presented token is spent and a new one of the same family returned. A spent
   * or revoked token presented again means two parties hold it, so the family is revoked and
   * both must log in again.
   */
  async refresh(refreshToken: string, options: GrantOptions<TokenResponse> = {}): Promise<TokenResponse> {
    const nowMs = this.#clock();
    const parsed = parseRefreshToken(refreshToken);
    const refusal = new IdentityError('invalid_grant', 'refresh token invalid, expired or revoked');
    if (parsed === null) throw refusal;
    const signer = await this.#signingKey();
    return this.#transaction(async (client) => {
      // The family's lock first, then the token's row: a revocation holds the family lock while
      // it revokes every token of the family, so no rotation can commit a new token it misses.
      if (!(await lockFamilyOf(client, parsed.id))) throw refusal;
      const r = await client.query<{ family_id: string; user_id: string; secret_hash: Buffer; audience: string; expires_at: Date; used_at: Date | null; revoked_at: Date | null }>(
        'SELECT family_id, user_id, secret_hash, audience, expires_at, used_at, revoked_at FROM identity.refresh_tokens WHERE id = $1 FOR UPDATE',
        [parsed.id],
      );
      const row = r.rows[0];
      if (row === undefined || !timingSafeEqual(row.secret_hash, sha256(parsed.secret))) throw refusal;
      if (row.used_at !== null || row.revoked_at !== null) {
        await client.query('UPDATE identity.refresh_tokens SET revoked_at = $2 WHERE family_id = $1 AND revoked_at IS NULL', [row.family_id, new Date(nowMs)]);
        // The caller is answered invalid_grant either way; the trail tells a spent token
        // presented again (two parties hold it: a theft) from a revoked one presented.
        const auditReason = row.used_at !== null ? 'refresh_token_reused' : 'refresh_token_revoked';
        throw new FailedAttempt(new IdentityError('invalid_grant', 'refresh token reused; every token of this session is revoked', { auditReason }));
      }
      if (row.expires_at.getTime() <= nowMs) throw refusal;
      const u = await client.query<UserRow>('SELECT * FROM identity.users WHERE id = $1', [row.user_id]);
      const user = u.rows[0];
      if (user === undefined || isLocked({ failedLogins: user.failed_logins, lockedUntil: user.locked_until }, nowMs)) throw refusal;
      await client.query('UPDATE identity.refresh_tokens SET used_at = $2 WHERE id = $1', [parsed.id, new Date(nowMs)]);
      return this.#issueUserTokens(client, signer, user, row.audience, row.family_id, row.expires_at, nowMs);
    }, options.beforeCommit);
  }

  /**
   * Revokes the session the refresh token belongs to (RFC 7009: an unknown token is not an
   * error), and says what it did, for the audit trail.
   */
  async revoke(refreshToken: string): Promise<RevokeOutcome> {
    const notFound: RevokeOutcome = { found: false, revoked: 0, familyId: null, userId: null };
    const parsed = parseRefreshToken(refreshToken);
    if (parsed === null) return notFound;
    return this.#transaction(async (client) => {
      // Under the family's lock, as `refresh` revokes on reuse: a rotation in flight commits first.
      if (!(await lockFamilyOf(client, parsed.id))) return notFound;
      const r = await client.query<{ family_id: string; user_id: string; secret_hash: Buffer }>(
        'SELECT family_id, user_id, secret_hash FROM identity.refresh_tokens WHERE id = $1',
        [parsed.id],
      );
      const row = r.rows[0];
      if (row === undefined || !timingSafeEqual(row.secret_hash, sha256(parsed.secret))) return notFound;
      const revoked = await client.query('UPDATE identity.refresh_tokens SET revoked_at = $2 WHERE family_id = $1 AND revoked_at IS NULL', [row.family_id, this.#now()]);
      return { found: true, revoked: revoked.rowCount ?? 0, familyId: row.family_id, userId: row.user_id };
    });
  }

  // ---- service clients --------------------------------------------------------------------

  async createClient(client: NewClient): Promise<void> {
    checkRoles(client.roles, 'client');
    if (!CLIENT_ID_PATTERN.test(client.id)) throw new IdentityError('invalid_request', 'client id must be 3-64 of a-z 0-9 . _ -');
    if (client.secret === undefined && client.publicJwk === undefined) throw new IdentityError('invalid_request', 'a client needs a secret or a public key');
    if (client.publicJwk !== undefined && (client.publicJwk.kty !== 'OKP' || client.publicJwk.crv !== 'Ed25519' || 'd' in client.publicJwk)) {
      throw new IdentityError('invalid_request', 'a client key must be an Ed25519 public JWK');
    }
    if (client.audiences.length === 0) throw new IdentityError('invalid_request', 'a client needs at least one audience');
    const secretHash = client.secret === undefined ? null : await hashPassword(client.secret).catch((error: unknown) => {
      throw new IdentityError('invalid_request', error instanceof Error ? error.message : 'secret rejected');
    });
    const r = await this.#pool.query(
      `INSERT INTO identity.clients (id, secret_hash, public_jwk, roles, audiences, created_at) VALUES ($1, $2, $3, $4, $5, $6)
       ON CONFLICT (id) DO NOTHING`,
      [client.id, secretHash, client.publicJwk ?? null, client.roles, client.audiences, this.#now()],
    );
    if (r.rowCount !== 1) throw new IdentityError('conflict', `client ${client.id} exists`);
  }

  /** The client-credentials grant: a token for exactly one audience the client is registered for. */
  async clientCredentials(auth: ClientAuthentication, audience: string): Promise<TokenResponse> {
    const nowMs = this.#clock();
    const clientId = 'assertion' in auth ? assertionClientId(auth.assertion) : auth.clientId;
    const r = await this.#pool.query<{ secret_hash: string | null; public_jwk: JWK | null; roles: string[]; audiences: string[] }>(
      'SELECT secret_hash, public_jwk, roles, audiences FROM identity.clients WHERE id = $1',
      [clientId ?? ''],
    );
    const client = r.rows[0];
    // A client that exists is named in the refusal (for the audit trail, not the answer).
    const known = client === undefined || clientId === null ? undefined : { account: clientId };
    const refused = new IdentityError('invalid_client', 'client authentication failed', known);
    if ('assertion' in auth) {
      if (client === undefined || client.public_jwk === null || clientId === null) throw refused;
      await this.#checkAssertion(auth.assertion, clientId, client.public_jwk, nowMs, refused);
    } else {
      const ok = await verifyPassword(client?.secret_hash ?? null, auth.secret);
      if (!ok || client === undefined) throw refused;
    }
    if (!client.audiences.includes(audience)) throw new IdentityError('invalid_target', `client may not ask for audience ${audience}`, known);
    const accessToken = await signAccessToken(await this.#signingKey(), { sub: clientId ?? '', kind: 'service', roles: client.roles, audience }, this.#signOptions(nowMs));
    return { access_token: accessToken, token_type: 'Bearer', expires_in: this.#accessTtl };
  }

  // ---- signing keys -----------------------------------------------------------------------

  /**
   * Call at start. Checks the stored keys against the key-encryption key: with one, it
   * encrypts every key still stored in clear, encrypts again under it every key encrypted
   * under a previous one (a rotation: `new,old`), and refuses keys encrypted under any other;
   * without one, it refuses encrypted keys (KeyEncryptionKeyError, naming the reason). Then it creates
   * the first signing key, active at once, if there is no key at all. Instances starting
   * together may each create one: the later `active_from` then signs, and both are published.
   */
  async ensureSigningKey(): Promise<void> {
    const stored = await this.#pool.query<KeyRow>('SELECT kid, private_jwk, private_jwe FROM identity.signing_keys');
    for (const row of stored.rows) {
      if (row.private_jwe !== null) {
        const under = keyFor(row.private_jwe, row.kid, this.#kek);
        if (this.#kek !== null && under.id !== this.#kek.id) {
          const jwe = await sealPrivateJwk(await openPrivateJwk(row.private_jwe, row.kid, this.#kek), row.kid, this.#kek);
          // Only if no other instance changed it meanwhile.
          await this.#pool.query('UPDATE identity.signing_keys SET private_jwe = $2 WHERE kid = $1 AND private_jwe = $3', [row.kid, jwe, row.private_jwe]);
        }
      } else if (this.#kek !== null && row.private_jwk !== null) {
        const jwe = await sealPrivateJwk(row.private_jwk, row.kid, this.#kek);
        await this.#pool.query('UPDATE identity.signing_keys SET private_jwe = $2, private_jwk = NULL WHERE kid = $1 AND private_jwe IS NULL', [row.kid, jwe]);
      }
    }
    if (stored.rowCount === 0) {
      const nowMs = this.#clock();
      // Another instance starting in the same millisecond made the first key: it will do.
      await this.#insertKey(nowMs, nowMs).catch((error: unknown) => {
        if (!isActiveFromTaken(error)) throw error;
      });
    }
  }

  /**
   * Adds a key that starts signing `KEY_PUBLISH_LEAD_MS` from now. Until then it is only
   * published; the current key keeps signing, then stays published until its tokens expired.
   * So a rotation never makes a verifier reject a valid token.
   */
  async rotateKeys(): Promise<{ kid: string; activeFrom: Date }> {
    const nowMs = this.#clock();
    const activeFrom = nowMs + KEY_PUBLISH_LEAD_MS;
    try {
      return { kid: await this.#insertKey(nowMs, activeFrom), activeFrom: new Date(activeFrom) };
    } catch (error) {
      // Two rotations in the same millisecond: one key per instant (the later one signs), so
      // the second is refused, and a retry a moment later makes another.
      if (isActiveFromTaken(error)) throw new IdentityError('conflict', 'another rotation took this instant; retry');
      throw error;
    }
  }

  /**
   * The public keys verifiers need: keys not yet active, the signing key, and each superseded
   * key until its last token has expired (the token lifetime, plus the time an instance may
   * still sign with it before it rereads the keys).
   */
  async jwks(): Promise<JSONWebKeySet> {
    const supersededAfter = new Date(this.#clock() - (this.#accessTtl * 1000 + KEY_REFRESH_MS));
    const r = await this.#pool.query<{ public_jwk: JWK }>(
      `SELECT public_jwk FROM (
         SELECT public_jwk, active_from, lead(active_from) OVER (ORDER BY active_from) AS superseded_at FROM identity.signing_keys
       ) k
       WHERE superseded_at IS NULL OR superseded_at > $1 ORDER BY active_from DESC`,
      [supersededAfter],
    );
    return { keys: r.rows.map((row) => row.public_jwk) };
  }

  async #insertKey(createdMs: number, activeFromMs: number): Promise<string> {
    const key = await newSigningKey();
    const jwe = this.#kek === null ? null : await sealPrivateJwk(key.privateJwk, key.kid, this.#kek);
    await this.#pool.query(
      'INSERT INTO identity.signing_keys (kid, private_jwk, private_jwe, public_jwk, created_at, active_from) VALUES ($1, $2, $3, $4, $5, $6)',
      [key.kid, jwe === null ? key.privateJwk : null, jwe, key.publicJwk, new Date(createdMs), new Date(activeFromMs)],
    );
    return key.kid;
  }

  async #privateJwk(row: KeyRow): Promise<JWK> {
    if (row.private_jwe !== null) return openPrivateJwk(row.private_jwe, row.kid, this.#kek);
    if (row.private_jwk === null) throw new Error(`invariant: signing key ${row.kid} has no private half`);
    return row.private_jwk;
  }

  // ---- internals --------------------------------------------------------------------------

  #now(): Date {
    return new Date(this.#clock());
  }

  #signOptions(nowMs: number) {
    return { issuer: this.#issuer, ttlSeconds: this.#accessTtl, nowMs };
  }

  #checkUserAudience(audience: string): void {
    if (!this.#userAudiences.has(audience)) throw new IdentityError('invalid_target', `tokens for audience ${audience} are not issued to users`);
  }

  async #signingKey(): Promise<{ kid: string; privateKey: CryptoKey }> {
    const nowMs = this.#clock();
    if (this.#signer !== null && nowMs - this.#signer.loadedAtMs < KEY_REFRESH_MS) return this.#signer;
    const r = await this.#pool.query<KeyRow>(
      'SELECT kid, private_jwk, private_jwe FROM identity.signing_keys WHERE active_from <= $1 ORDER BY active_from DESC LIMIT 1',
      [new Date(nowMs)],
    );
    const row = r.rows[0];
    if (row === undefined) throw new Error('identity: no signing key; call ensureSigningKey() at start');
    if (this.#signer?.kid !== row.kid) {
      const privateKey = await importJWK(await this.#privateJwk(row), TOKEN_ALGORITHM);
      if (privateKey instanceof Uint8Array) throw new Error('invariant: an Ed25519 JWK imported as raw bytes');
      this.#signer = { kid: row.kid, privateKey, loadedAtMs: nowMs };
    } else {
      this.#signer.loadedAtMs = nowMs;
    }
    return this.#signer;
  }

  /** `signer` comes from `#signingKey()`, called before the transaction (see `login`). */
  async #issueUserTokens(client: pg.PoolClient, signer: { kid: string; privateKey: CryptoKey }, user: UserRow, audience: string, familyId: string, expiresAt: Date, nowMs: number): Promise<TokenResponse> {
    const id = randomUUID();
    const secret = randomBytes(32).toString('base64url');
    await client.query(
      `INSERT INTO identity.refresh_tokens (id, family_id, user_id, secret_hash, audience, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)`,
      [id, familyId, user.id, sha256(secret), audience, new Date(nowMs), expiresAt],
    );
    const accessToken = await signAccessToken(
      signer,
      { sub: user.id, kind: 'user', roles: user.roles, tenant: user.tenant, audience },
      this.#signOptions(nowMs),
    );
    return { access_token: accessToken, token_type: 'Bearer', expires_in: this.#accessTtl, refresh_token: `${id}.${secret}` };
  }

  /** Which factor, when a fresh TOTP code or an unused recovery code was given; both are spent on use. */
  async #secondFactor(client: pg.PoolClient, user: UserRow, request: LoginRequest, nowMs: number): Promise<'totp' | 'recovery_code' | 'missing' | 'wrong'> {
    if (request.totpCode !== undefined && user.totp_secret !== null) {
      const lastStep = user.totp_last_step === null ? null : BigInt(user.totp_last_step);
      const step = verifyTotp(user.totp_secret, request.totpCode, nowMs, lastStep);
      if (step === null) return 'wrong';
      await client.query('UPDATE identity.users SET totp_last_step = $2 WHERE id = $1', [user.id, step.toString()]);
      return 'totp';
    }
    if (request.recoveryCode !== undefined) {
      const r = await client.query(
        'UPDATE identity.recovery_codes SET used_at = $3 WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL',
        [user.id, recoveryCodeHash(request.recoveryCode), new Date(nowMs)],
      );
      return r.rowCount === 1 ? 'recovery_code' : 'wrong';
    }
    return 'missing';
  }

  /** Counts a failure (and maybe locks), commits that, and refuses. */
  async #fail(client: pg.PoolClient, user: UserRow, counters: LoginCounters, nowMs: number, refusal: IdentityError): Promise<never> {
    const next = afterFailure(counters, this.#lockout, nowMs);
    await this.#saveCounters(client, user.id, next);
    throw new FailedAttempt(next.lockedUntil !== null && isLocked(next, nowMs) ? new IdentityError('account_locked', 'too many failed attempts; try again later', { account: user.username }) : refusal);
  }

  async #saveCounters(client: pg.PoolClient, userId: string, counters: LoginCounters): Promise<void> {
    await client.query('UPDATE identity.users SET failed_logins = $2, locked_until = $3 WHERE id = $1', [userId, counters.failedLogins, counters.lockedUntil]);
  }

  async #checkAssertion(assertion: string, clientId: string, jwk: JWK, nowMs: number, refusal: IdentityError): Promise<void> {
    let jti: string;
    let expSeconds: number;
    try {
      const key = await importJWK({ ...jwk, alg: TOKEN_ALGORITHM }, TOKEN_ALGORITHM);
      const { payload } = await jwtVerify(assertion, key, {
        algorithms: [TOKEN_ALGORITHM],
        issuer: clientId,
        subject: clientId,
        audience: this.#issuer,
        currentDate: new Date(nowMs),
        maxTokenAge: ASSERTION_AGE_MAX_SECONDS,
        requiredClaims: ['jti', 'exp', 'iat'],
      });
      if (typeof payload.jti !== 'string' || typeof payload.exp !== 'number') throw refusal;
      // The jti is stored (and indexed) until the assertion expires: one the table cannot hold
      // (a NUL, a lone surrogate, or one longer than any index entry) is refused like a bad
      // signature. Until 2026-12-07 it reached the INSERT and was a 500.
      if (!storableJti(payload.jti)) throw refusal;
      // An assertion lives minutes (RFC 7523 §3 lets the server refuse an `exp` unreasonably
      // far ahead): its jti is kept until then, and a time past JavaScript's dates is no time.
      if (payload.exp > nowMs / 1000 + ASSERTION_AGE_MAX_SECONDS) throw refusal;
      jti = payload.jti;
      expSeconds = payload.exp;
    } catch {
      throw refusal;
    }
    await this.#pool.query('DELETE FROM identity.used_assertions WHERE expires_at < $1', [new Date(nowMs)]);
    const r = await this.#pool.query(
      'INSERT INTO identity.used_assertions (client_id, jti, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING',
      [clientId, jti, new Date(expSeconds * 1000)],
    );
    if (r.rowCount !== 1) throw refusal;
  }

  /**
   * Runs `work` in a transaction. A `FailedAttempt` commits what was written before it (a
   * failure counter, a revoked token family), then its refusal is thrown; any other error rolls back.
   */
  async #transaction<T>(work: (client: pg.PoolClient) => Promise<T>, beforeCommit?: (result: T) => void): Promise<T> {
    const client = await this.#pool.connect();
    try {
      await client.query(BEGIN_BOUNDED);
      try {
        const result = await work(client);
        // A grant's caller may refuse it here (its audit record not taken): it then never happened.
        beforeCommit?.(result);
        await client.query('COMMIT');
        return result;
      } catch (error) {
        if (error instanceof FailedAttempt) {
          await client.query('COMMIT');
          throw error.refusal;
        }
        await client.query('ROLLBACK');
        const code = (error as { code?: unknown } | null)?.code;
        if (typeof code === 'string' && TIMED_OUT_CODES.has(code)) {
          throw new IdentityError('temporarily_unavailable', 'the request waited too long for the database; retry', { cause: error });
        }
        throw error;
      }
    } finally {
      client.release();
    }
  }
}

/**
 * How a caller takes part in a grant: `beforeCommit` runs with the grant once it is made and
 * before its transaction commits (the session begun, the refresh token rotated, the recovery
 * code spent); if it throws, the transaction rolls back and the error is the grant's. The
 * identity service writes the grant's audit record there, so that a grant the trail cannot
 * take is never made, and a retry finds everything as it was.
 */
export interface GrantOptions<T> {
  beforeCommit?: (granted: T) => void;
}

/** Carries a refusal out of a transaction whose writes must commit. */
class FailedAttempt extends Error {
  readonly refusal: IdentityError;
  constructor(refusal: IdentityError) {
    super(refusal.message);
    this.refusal = refusal;
  }
}

/**
 * Takes the advisory lock of the family the refresh token `id` belongs to, for the rest of the
 * transaction; false when there is no such token. A family's id never changes, so reading it
 * before the lock is safe.
 */
async function lockFamilyOf(client: pg.PoolClient, id: string): Promise<boolean> {
  const r = await client.query<{ family_id: string }>('SELECT family_id FROM identity.refresh_tokens WHERE id = $1', [id]);
  const familyId = r.rows[0]?.family_id;
  if (familyId === undefined) return false;
  await client.query('SELECT pg_advisory_xact_lock($1, hashtext($2))', [REFRESH_FAMILY_LOCK_CLASS, familyId]);
  return true;
}

function sha256(value: string): Buffer {
  return createHash('sha256').update(value).digest();
}

function parseRefreshToken(token: string): { id: string; secret: string } | null {
  const match = /^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.([A-Za-z0-9_-]{43})$/.exec(token);
  return match?.[1] === undefined || match[2] === undefined ? null : { id: match[1], secret: match[2] };
}

/**
 * The client an assertion claims to come from (unverified: `clientCredentials` checks it
 * against that client's key); null unless it is a client id as `createClient` takes them. The
 * claim is anyone's to write, and it goes into a query and, as the actor, into the audit trail,
 * which takes no empty, control or lone-surrogate text.
 */
export function assertionClientId(assertion: string): string | null {
  try {
    const iss = decodeJwt(assertion).iss;
    return typeof iss === 'string' && CLIENT_ID_PATTERN.test(iss) ? iss : null;
  } catch {
    return null;
  }
}

/** The decoy row a refused login of an unknown `username` updates: one of 64, the same for the same name. */
function decoySlot(username: string): number {
  return createHash('sha256').update(username.toLowerCase()).digest().readUInt8(0) % 64;
}

function checkRoles(roles: readonly string[], holder: 'user' | 'client'): void {
  if (roles.length > ROLES_MAX || !roles.every((r) => ROLE_PATTERN.test(r))) {
    throw new IdentityError('invalid_request', `roles must be at most ${ROLES_MAX} names matching ${ROLE_PATTERN.source}`);
  }
  const wrong = roles.find((r) => r.startsWith(SERVICE_ROLE_PREFIX) !== (holder === 'client'));
  if (wrong !== undefined) {
    throw new IdentityError(
      'invalid_request',
      holder === 'user' ? `role ${wrong} is a service role: a user cannot hold it` : `role ${wrong} is not a service role (${SERVICE_ROLE_PREFIX}*): a service client cannot hold it`,
    );
  }
}

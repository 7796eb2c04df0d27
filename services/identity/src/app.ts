/**
 * The identity HTTP service: the OAuth2 token endpoint (password with TOTP, refresh-token
 * rotation, client credentials with a secret or a signed assertion), revocation, the JWKS, and
 * the few administrative routes, which need a token of this service's own audience.
 */
import { createHmac, randomBytes } from 'node:crypto';
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify';
import type pg from 'pg';
import { createLocalJWKSet, type JWTVerifyGetKey } from 'jose';
import { writeRateLimitedSummaries, type AuditActor, type RateLimitedSummarySettings, type AuditEntry, type AuditResource, type AuditSink } from '@ledgerline/audit';
import { bulkhead } from 'cockatiel';
import { Authorizer, installHttpAuth, PERMISSIONS, REFERENCE_POLICY, SERVICE_ROLE_PREFIX, type HttpAuthOptions, type Policy, type Principal } from '@ledgerline/authz';
import { assertionClientId, CLIENT_ASSERTION_TYPE, createTokenVerifier, IdentityError, LOGIN_REFUSED, type Identity, type IdentityErrorCode, type RevokeOutcome, type TokenResponse } from '@ledgerline/identity';
import {
  addressKey,
  BodyRefusedError,
  createService,
  postgresReadinessCheck,
  PROBLEM_TYPES,
  problem,
  problemType,
  ProblemResponse,
  rateLimitRefusal,
  STORABLE_TEXT_PATTERN,
  type HttpProblem,
  type ProblemAnswer,
  type RateLimit,
  type Service,
  type ServiceOptions,
} from '@ledgerline/service-runtime';
import { IDENTITY_TOKEN_RATE_LIMIT_DEFAULT, identityConfigSchema, list } from './config.ts';
import { JwksOut, KeyOut, NewUserBody, RevokeBody, TokenBody, TokenOut, TotpConfirmBody, TotpConfirmOut, TotpEnrolOut, UserOut } from './schemas.ts';

/** The audience of tokens for this service's own routes. */
export const IDENTITY_AUDIENCE = 'identity';
/** The audit action of every token request. */
export const TOKEN_ACTION = 'identity.token';
/**
 * The audit actions of the other authentication events and credential changes (PCI DSS
 * 10.2.1.4, 10.2.1.5): a session revoked, a user or client created, two-factor enrolment
 * started and confirmed, a signing key added.
 */
export const AUDIT_ACTIONS = {
  revoke: 'identity.revoke',
  userCreate: 'identity.user.create',
  clientCreate: 'identity.client.create',
  totpEnrol: 'identity.totp.enrol',
  totpConfirm: 'identity.totp.confirm',
  keyRotate: 'identity.key.rotate',
} as const;
/**
 * The largest request body by default: a token request is a few hundred bytes, and a client
 * assertion at most 4 KiB. BODY_LIMIT_BYTES changes it.
 */
export const IDENTITY_BODY_LIMIT_BYTES_DEFAULT = 65_536;

export interface IdentityServiceOptions {
  identity: Identity;
  pool: pg.Pool;
  issuer: string;
  audit: AuditSink;
  policy?: Policy;
  /** Milliseconds since the epoch, for token checks and policy decisions. */
  clock?: () => number;
  /**
   * Token and revocation requests over the rate limit (429) are recorded in summaries every
   * `intervalMs` (default 10 s): per address (the limiter's bucket) and route, one per actor,
   * resource and audience up to `perClientMax` (10), then one catch-all; at most `keysMax`
   * (1000) in all, as the audit trail's HTTP plugin does (@ledgerline/audit
   * `rateLimitedSummary`, rate-limited.ts).
   */
  rateLimitedSummary?: RateLimitedSummarySettings;
  logLevel?: string;
  /** The largest request body, form or JSON (IDENTITY_BODY_LIMIT_BYTES_DEFAULT unless given). */
  bodyLimitBytes?: number;
  logger?: false | FastifyBaseLogger;
  /**
   * Metrics, tracing, load shedding, rate limiting, deadlines (see `resilienceFromConfig`).
   * A `rateLimit.clientId` given here is replaced: see `rateLimitClient` below.
   */
  resilience?: Pick<ServiceOptions, 'metrics' | 'tracing' | 'loadShedding' | 'rateLimit' | 'dependencies' | 'deadlineDefaultMs'>;
  /** POST /oauth/token's limit per client address when `resilience.rateLimit` is on (IDENTITY_TOKEN_RATE_LIMIT_DEFAULT unless given). */
  tokenRateLimit?: RateLimit;
  /** Failed bearer tokens on the administrative routes allowed per client address and in all before 429s recorded together (`installHttpAuth`'s options). */
  authFailures?: Pick<HttpAuthOptions, 'failureLimit' | 'failureTotalLimit'>;
  /**
   * The key of the digest that names, in the audit trail, a username or client id no account
   * has (`unknown-user:<digest>`), or one never looked up (`unchecked-user:<digest>`, the same
   * digest), and an audience not listed (`audiences`): what was typed may be a password typed in the wrong field,
   * and the trail can be neither changed nor erased. Instances that share it name the same
   * text alike, so repeated attempts can be correlated. main.ts derives it from
   * IDENTITY_KEY_ENCRYPTION_KEY (`auditPseudonymKey`); unset, each build makes a random one.
   */
  pseudonymKey?: Uint8Array;
  /**
   * The audiences a token request's record names as sent (`payload.audience`): those this
   * service issues tokens for (IDENTITY_USER_AUDIENCES, and the clients' audiences). Any other
   * text sent as `audience` is recorded as `unlisted-audience:<digest>` (the same keyed digest
   * as the names above): it may be a password typed in that field. Unless given, the
   * configuration's defaults (IDENTITY_USER_AUDIENCES, IDENTITY_BOOTSTRAP_CLIENT_AUDIENCES)
   * and this service's own audience.
   */
  audiences?: readonly string[];
}

/** The audiences recorded as sent unless `audiences` is given: the configuration's defaults and this service's own. */
const defaultOf = (schema: object): string => String((schema as { default?: unknown }).default);
const RECORDED_AUDIENCES_DEFAULT: readonly string[] = [
  ...list(defaultOf(identityConfigSchema.properties.IDENTITY_USER_AUDIENCES)),
  ...list(defaultOf(identityConfigSchema.properties.IDENTITY_BOOTSTRAP_CLIENT_AUDIENCES)),
  IDENTITY_AUDIENCE,
];

const STATUS: Record<IdentityErrorCode, number> = {
  invalid_request: 400,
  invalid_grant: 400,
  invalid_target: 400,
  invalid_client: 401,
  mfa_required: 401,
  account_locked: 423,
  conflict: 409,
  not_found: 404,
  unsupported_token_type: 400,
  temporarily_unavailable: 503,
};

/** Seconds a client should wait before retrying a request the database did not answer in time. */
const RETRY_AFTER_SECONDS = 1;

/** An `IdentityError` as problem+json, carrying the OAuth2 `error` code clients switch on. */
function identityProblem(error: IdentityError): HttpProblem {
  return problem(STATUS[error.code], { type: problemType(error.code.replaceAll('_', '-')), title: error.code.replaceAll('_', ' '), detail: error.message, error: error.code });
}

/** Adds Retry-After to the answer of a request the database did not serve in time. */
function retryLater(reply: FastifyReply, error: IdentityError): IdentityError {
  if (error.code === 'temporarily_unavailable') reply.header('retry-after', String(RETRY_AFTER_SECONDS));
  return error;
}

/** A token request's grant, with what its record adds to the payload. */
type Grant = { tokens: TokenResponse; payload?: Record<string, unknown> };
/** Writes a grant's success record; throws GrantUnrecordedError when the trail refuses it. */
type RecordGrant = (payload?: Record<string, unknown>) => void;

/** Thrown from a grant's beforeCommit when its record was refused: the grant rolls back. */
class GrantUnrecordedError extends Error {
  override readonly name = 'GrantUnrecordedError';
  constructor() {
    super('the audit trail refused the grant\'s record');
  }
}

/** The refusal of a request whose record the audit trail cannot take now (503, Retry-After). */
function auditBehind(): IdentityError {
  return new IdentityError('temporarily_unavailable', 'the audit trail is not keeping up; retry after the Retry-After delay');
}

/** Hex digits of the keyed digest that stands for a name no account has (64 bits: enough to tell attempts apart). */
const PSEUDONYM_HEX_DIGITS = 16;

/** A refresh token's id, the part before the dot: all of it the trail may name. */
const REFRESH_TOKEN_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * How a token request ended, for the actor of its audit record: granted, or refused naming the
 * account found (if any) and the refusal's code (undefined for an error that is not an IdentityError).
 * `unchecked`: refused to shed work (429, 503, 504), so the name typed is never looked up.
 */
type GrantOutcome = { granted: true } | { granted: false; account: string | undefined; code: IdentityErrorCode | undefined; unchecked?: true };

/**
 * The actor of a record: known now, or a name that was typed and refused before any account was
 * looked up (an audience refused, a field missing). That one is looked up after the answer has
 * gone, so that the answer's time says nothing of whether the account exists, and the record
 * names the account if there is one and a digest of the text otherwise.
 */
type ActorSource = AuditActor | { type: 'user' | 'service'; lookup: 'user' | 'client'; typed: string };

/** Refusals answered before the account was looked up: the record's actor is looked up afterwards. */
const REFUSED_BEFORE_LOOKUP: ReadonlySet<IdentityErrorCode | undefined> = new Set(['invalid_target', 'invalid_request']);

/** The actor of a refresh token's records: its id (before the dot), never its secret; malformed (or missing): `refresh:malformed`. */
function refreshActor(token: string | undefined): AuditActor {
  const tokenId = (token ?? '').split('.')[0] ?? '';
  return { type: 'user', id: REFRESH_TOKEN_ID.test(tokenId) ? `refresh:${tokenId}` : 'refresh:malformed' };
}

/** A compact JWS, as this server's access tokens are: three base64url parts. */
const ACCESS_TOKEN_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

/** The grant types the token endpoint serves, as TokenBody lists them. */
const GRANT_TYPES: ReadonlySet<unknown> = new Set(TokenBody.properties.grant_type.enum);

/** The token endpoint's parameters, as TokenBody names them: the only names a record of a refused body repeats. */
const TOKEN_PARAMETERS: ReadonlySet<string> = new Set(Object.keys(TokenBody.properties));
/** The revocation endpoint's, as RevokeBody names them. */
const REVOKE_PARAMETERS: ReadonlySet<string> = new Set(Object.keys(RevokeBody.properties));
/** A name or client id as the schema admits it (TokenBody's `Text(64)`): one that may name an account, and be looked up. */
const STORABLE_TEXT = new RegExp(STORABLE_TEXT_PATTERN);
const admissibleName = (text: string): boolean => text.length >= 1 && text.length <= 64 && STORABLE_TEXT.test(text);
/** The actor of a record whose request named nobody it could read (a body refused before it was parsed, or without a name). */
const NOBODY: AuditActor = { type: 'anonymous', id: 'anonymous' };
/** Refused before any account was looked up: how a refusal the handler never saw is passed to a request's `actorOf`. */
const REFUSED_UNREAD: GrantOutcome = { granted: false, account: undefined, code: 'invalid_request' };
/**
 * Refused to shed work (a 429, a 503 or a 504 answered before the handler): the name typed is
 * never looked up, but named `unchecked-user:<digest>` (`unchecked-client:`), which says nothing
 * of whether an account has it. A refusal that sheds load must not cost a query: a flood of
 * 429s would otherwise become a flood of lookups taking the pool from the logins it serves.
 */
const REFUSED_UNCHECKED: GrantOutcome = { granted: false, account: undefined, code: undefined, unchecked: true };
/** The answers that shed work: their records never look an account up. */
const SHEDDING_STATUSES: ReadonlySet<number> = new Set([429, 503, 504]);
/**
 * The share of the database pool the audit trail's lookups of actors (`record`) may hold at
 * once, the handler's and the early refusals' together; the others wait their turn. Half: the
 * requests being served keep the other half whatever is being refused.
 */
const ACTOR_LOOKUPS_POOL_SHARE = 0.5;
/**
 * Records whose actor's lookup may be running or waiting its turn; past it, an actor is named at
 * once without one (`unchecked-user:<digest>`), so a flood of refusals costs neither queries nor
 * memory without bound, and closing the service (which waits for them) is not held up long by a
 * slow database. A lookup takes about a millisecond: a backlog of some tens of milliseconds.
 */
const ACTOR_LOOKUPS_PENDING_MAX = 64;
/** pg.Pool's size when its options do not say. */
const PG_POOL_MAX_DEFAULT = 10;

/**
 * The reason a request answered before its handler ran is recorded with, by its answer:
 * the OAuth2 `error` a 400 carries (invalid_request, unsupported_grant_type), else the
 * problem's type (rate_limited, overloaded, deadline_exceeded, shutting_down), else its status.
 */
const REFUSAL_REASONS: Readonly<Record<number, string>> = { 413: 'request_too_large', 415: 'unsupported_media_type' };
const OAUTH_CLIENT_ERRORS: ReadonlySet<unknown> = new Set(['invalid_request', 'unsupported_grant_type']);
const PROBLEM_TYPE_SLUG = /\/problems\/([a-z0-9-]{1,64})$/;
/** Bounds on what a refusal's record repeats of its answer's `errors`. */
const RECORDED_ISSUES_MAX = 20;
const RECORDED_MESSAGE_CHARS_MAX = 200;

/** A refusal answered before a route's handler ran, read from its answer: why, and the non-secret details to record. */
interface EarlyRefusal {
  reason: string;
  payload: Record<string, unknown>;
}

/**
 * How a route whose refusals before its handler are recorded (the token endpoint, revocation)
 * records one: as its handler records a request. `describe` gives the record's actor, resource
 * and the route's own payload from the parameters as sent (not validated: of any type), or
 * undefined when the body was never read; `outcome` is what a handler's `actorOf` is given for
 * a refusal it never saw (REFUSED_UNREAD, or REFUSED_UNCHECKED for one that sheds work).
 */
interface EarlyRecording {
  action: string;
  /** The route's parameters: the only names a record of a refused body repeats (earlyRefusal). */
  parameters: ReadonlySet<string>;
  describe: (params: Readonly<Record<string, unknown>> | undefined, outcome: GrantOutcome) => { actor: ActorSource; resource: AuditResource; payload: Record<string, unknown> };
}

/**
 * What the record of an early refusal says of its answer (a problem+json body): the reason, the
 * status, the problem's type, and each validation issue by the parameter it names. A name that is
 * not one of the route's `parameters` is not repeated (whatever a client sent as a name may be a
 * secret: the form `password&hunter2` names a parameter `hunter2`), nor is any value.
 */
function earlyRefusal(status: number, payload: unknown, parameters: ReadonlySet<string>): EarlyRefusal {
  let answer: Record<string, unknown> = {};
  if (typeof payload === 'string' && payload.startsWith('{')) {
    try {
      const parsed: unknown = JSON.parse(payload);
      if (typeof parsed === 'object' && parsed !== null) answer = parsed as Record<string, unknown>;
    } catch {
      // Not JSON after all: the status says what there is to say.
    }
  }
  const slug = typeof answer.type === 'string' ? PROBLEM_TYPE_SLUG.exec(answer.type)?.[1] : undefined;
  // Every 400 of these routes is a request the server could not take as sent: OAuth2's
  // invalid_request unless its answer says unsupported_grant_type (one refused before the route's
  // clientProblemExtensions ran, the runtime's missing-Host check, carries no `error`).
  const reason = status === 400 ? (OAUTH_CLIENT_ERRORS.has(answer.error) ? String(answer.error) : 'invalid_request') : slug?.replaceAll('-', '_') ?? REFUSAL_REASONS[status] ?? `http_${status}`;
  const issues = Array.isArray(answer.errors) ? answer.errors.slice(0, RECORDED_ISSUES_MAX).map((issue) => recordedIssue(issue, parameters)) : undefined;
  return { reason, payload: { status, ...(slug === undefined ? {} : { problem: slug }), ...(issues === undefined ? {} : { errors: issues }) } };
}

function recordedIssue(issue: unknown, parameters: ReadonlySet<string>): { in: string; path: string; message: string } {
  const { in: part, path, message } = typeof issue === 'object' && issue !== null ? (issue as Record<string, unknown>) : {};
  const name = typeof path === 'string' ? /^\/([^/]*)/.exec(path)?.[1] : undefined;
  return {
    in: part === 'body' || part === 'querystring' || part === 'headers' || part === 'params' ? part : 'request',
    path: path === '' ? '' : name !== undefined && parameters.has(name) ? `/${name}` : '(another parameter)',
    message: typeof message === 'string' ? message.slice(0, RECORDED_MESSAGE_CHARS_MAX) : 'is invalid',
  };
}

/**
 * The OAuth2 `error` of a token or revocation request refused before its handler ran (RFC 6749
 * §5.2): `unsupported_grant_type` when it names a grant type this server does not serve, else
 * `invalid_request` (a missing, repeated or malformed parameter, a body that is not a form).
 */
function oauthClientError(_answer: ProblemAnswer, request: FastifyRequest): Readonly<Record<string, unknown>> {
  const body: unknown = request.body;
  const grant = typeof body === 'object' && body !== null ? (body as Record<string, unknown>).grant_type : undefined;
  return { error: typeof grant === 'string' && !GRANT_TYPES.has(grant) ? 'unsupported_grant_type' : 'invalid_request' };
}

/** A form body refused before the handler ran: 400 naming the parameter (the route adds OAuth2's `invalid_request`). */
function formRefused(name: string, message: string, detail: string): BodyRefusedError {
  const path = `/${name.replaceAll('~', '~0').replaceAll('/', '~1')}`;
  return new BodyRefusedError({ status: 400, type: PROBLEM_TYPES.validationError, title: 'Validation failed', detail, extensions: { errors: [{ in: 'body', path, message }] } });
}

/** Fatal: a form's bytes that are not UTF-8 are refused, not turned into U+FFFD. */
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * An application/x-www-form-urlencoded body as its parameters. Stricter than URLSearchParams,
 * which keeps the last of a repeated parameter and turns what does not decode into U+FFFD:
 * RFC 6749 §3.2 says parameters "MUST NOT be included more than once" (a repeated grant_type or
 * audience would be a guess at which one the client meant), and a parameter whose bytes or
 * percent-encoding are not UTF-8 is not the text the client meant either.
 */
export function parseForm(body: Buffer): Record<string, string> {
  let text: string;
  try {
    text = UTF8.decode(body);
  } catch {
    throw new BodyRefusedError({ status: 400, type: PROBLEM_TYPES.validationError, title: 'Validation failed', detail: 'The request body is not valid UTF-8.' });
  }
  const params = new Map<string, string>();
  for (const pair of text.split('&')) {
    if (pair === '') continue;
    const equals = pair.indexOf('=');
    const rawName = equals === -1 ? pair : pair.slice(0, equals);
    const rawValue = equals === -1 ? '' : pair.slice(equals + 1);
    let name: string;
    let value: string;
    try {
      name = decodeURIComponent(rawName.replaceAll('+', ' '));
    } catch {
      throw formRefused(rawName, 'is not valid percent-encoded UTF-8', 'A parameter name in the request body is not valid percent-encoded UTF-8.');
    }
    try {
      value = decodeURIComponent(rawValue.replaceAll('+', ' '));
    } catch {
      throw formRefused(name, 'is not valid percent-encoded UTF-8', `The value of ${name} is not valid percent-encoded UTF-8.`);
    }
    if (params.has(name)) throw formRefused(name, 'must not be repeated', `The request body repeats ${name}; each parameter may appear once (RFC 6749 §3.2).`);
    params.set(name, value);
  }
  return Object.fromEntries(params);
}

/** A token request without a field its grant needs (recorded, then answered 400 invalid_request). */
function missing(grant: string, fields: string): Promise<never> {
  return Promise.reject(new IdentityError('invalid_request', `grant_type ${grant} needs ${fields}`));
}

export async function buildIdentityService(options: IdentityServiceOptions): Promise<Service> {
  const { identity, pool, issuer } = options;
  const clock = options.clock ?? Date.now;
  const pseudonymKey = options.pseudonymKey ?? randomBytes(32);
  /**
   * The keyed digest of a username or client id typed (lower-cased, as logins match usernames),
   * never the text itself: `unknown-user:<digest>` names one no account has, and
   * `unchecked-user:<digest>` (the same digest) one that was never looked up.
   */
  const keyedDigest = (domain: string, text: string): string => createHmac('sha256', pseudonymKey).update(`${domain}\u0000${text}`).digest('hex').slice(0, PSEUDONYM_HEX_DIGITS);
  const digestOf = (kind: 'user' | 'client', typed: string): string => keyedDigest(`unknown-${kind}`, typed.toLowerCase());
  const pseudonym = (kind: 'user' | 'client', typed: string): string => `unknown-${kind}:${digestOf(kind, typed)}`;
  const unchecked = (kind: 'user' | 'client', typed: string): string => `unchecked-${kind}:${digestOf(kind, typed)}`;
  /** The audiences recorded as sent; any other text a digest (it may be a password typed in that field). */
  const listedAudiences: ReadonlySet<string> = new Set(options.audiences ?? RECORDED_AUDIENCES_DEFAULT);
  /** `audience` as a token request's record gives it, the handler's and the early refusals' alike: null when not text the schema admits. */
  const recordedAudience = (audience: unknown): string | null => {
    if (typeof audience !== 'string' || !admissibleName(audience)) return null;
    if (listedAudiences.has(audience)) return audience;
    return `unlisted-audience:${keyedDigest('audience', audience)}`;
  };
  /**
   * Lookups of actors (ActorSource) that may run at once, the handler's and the early refusals'
   * together: a share of the pool (ACTOR_LOOKUPS_POOL_SHARE), at least one; the others wait for
   * a slot, up to ACTOR_LOOKUPS_PENDING_MAX records in all.
   */
  const poolMax = pool.options.max ?? PG_POOL_MAX_DEFAULT;
  // The queue is unbounded here: `pending` below bounds the records waiting on lookups.
  const actorLookups = bulkhead(Math.max(1, Math.floor(poolMax * ACTOR_LOOKUPS_POOL_SHARE)), Number.POSITIVE_INFINITY);
  const lookUp = (kind: 'user' | 'client', typed: string): Promise<string | undefined> => actorLookups.execute(() => identity.knownAccount(kind, typed));
  /**
   * Records the trail could not take (its buffer full, or a lookup's record that failed), each
   * logged at error level: `audit_requests_unrecorded_total`, as the ledger's audit plugin
   * counts its own.
   */
  let unrecorded = 0;
  /**
   * Runs `write` (an audit record), and logs and counts rather than throws when the trail
   * refuses it (AuditBufferFullError): the caller decides what the answer is. False when refused.
   */
  const recordOrLog = (request: FastifyRequest, write: () => void): boolean => {
    try {
      write();
      return true;
    } catch (error) {
      unrecorded += 1;
      request.log.error({ err: error, audit: true }, 'audit: a record could not be written');
      return false;
    }
  };
  /**
   * With the trail behind (its sink saturated), refuses the request 503 with Retry-After before
   * any work, so that nothing is done the trail would not show (as the ledger's audit plugin
   * answers 503). The refusal is logged, not queued behind the records the trail is behind on.
   * `onRefused` runs first (the token route marks the request as recorded).
   */
  const refuseWhileTrailBehind = (request: FastifyRequest, reply: FastifyReply, action: string, onRefused?: () => void): void => {
    if ((options.audit as { readonly saturated?: boolean }).saturated !== true) return;
    onRefused?.();
    request.log.warn({ audit: true, action }, 'audit: the trail is not keeping up; a request was refused unrun');
    throw identityProblem(retryLater(reply, auditBehind()));
  };
  /** Records whose actor is being looked up (ActorSource); awaited when the service closes, before the sink is. */
  const pending = new Set<Promise<void>>();
  const record = (actor: ActorSource, entry: Omit<AuditEntry, 'actor'>): void => {
    if (!('lookup' in actor)) {
      options.audit.record({ ...entry, actor });
      return;
    }
    // Past the bound, named at once without a lookup (never as a name no account has).
    if (pending.size >= ACTOR_LOOKUPS_PENDING_MAX) {
      options.audit.record({ ...entry, actor: { type: actor.type, id: unchecked(actor.lookup, actor.typed) } });
      return;
    }
    const occurredAt = new Date(clock());
    // Never awaited by the answer: its time says nothing of whether the account exists.
    const done = lookUp(actor.lookup, actor.typed)
      .catch(() => undefined)
      .then((found) => options.audit.record({ ...entry, occurredAt, actor: { type: actor.type, id: found ?? pseudonym(actor.lookup, actor.typed) } }))
      .catch((error: unknown) => {
        unrecorded += 1;
        app.log.error({ err: error, action: entry.action }, 'audit: recording failed');
      })
      .finally(() => pending.delete(done));
    pending.add(done);
  };
  const originOf = (request: FastifyRequest) => ({ service: 'identity', ip: request.ip, requestId: request.id });
  /**
   * The actor of a record naming a user or client by what was typed: granted, the account; refused,
   * the account the refusal found, else (refused before any lookup) the account looked up after the
   * answer, else a digest. A name no account can have (beyond what the schema admits, in a body it
   * refused) is a digest at once; a name not given, or not text, is `unknown-user` (`unknown-client`).
   * Refused to shed work (REFUSED_UNCHECKED), a name is never looked up: `unchecked-user:<digest>`.
   */
  const typedActor = (kind: 'user' | 'client', typed: unknown) => (outcome: GrantOutcome): ActorSource => {
    const type = kind === 'user' ? 'user' : 'service';
    if (typeof typed !== 'string') return { type, id: `unknown-${kind}` };
    // Logins match usernames lower-cased; client ids as they are.
    if (outcome.granted) return { type, id: kind === 'user' ? typed.toLowerCase() : typed };
    if (outcome.account !== undefined) return { type, id: outcome.account };
    if (!admissibleName(typed)) return { type, id: pseudonym(kind, typed) };
    // Shed, or the database did not answer (temporarily_unavailable, an error): nobody knows
    // whether an account has the name, and a lookup now would only add to the load.
    if (outcome.unchecked === true || outcome.code === 'temporarily_unavailable' || outcome.code === undefined) return { type, id: unchecked(kind, typed) };
    if (REFUSED_BEFORE_LOOKUP.has(outcome.code)) return { type, lookup: kind, typed };
    return { type, id: pseudonym(kind, typed) };
  };
  /**
   * Who a token request's records name, from its parameters as sent: validated (the handler's) or
   * not (a request refused before the handler ran, whose parameters may be of any type). A grant
   * type the endpoint does not serve, or none, is named by what the parameters name.
   */
  const tokenActor = (body: Readonly<Record<string, unknown>>): ((outcome: GrantOutcome) => ActorSource) => {
    const grant = body.grant_type;
    const assertion = typeof body.client_assertion === 'string' && body.client_assertion_type === CLIENT_ASSERTION_TYPE ? body.client_assertion : undefined;
    const kind = GRANT_TYPES.has(grant)
      ? grant === 'client_credentials' && assertion !== undefined ? 'assertion' : grant
      : body.username !== undefined ? 'password' : assertion !== undefined ? 'assertion' : body.client_id !== undefined ? 'client_credentials' : body.refresh_token !== undefined ? 'refresh_token' : undefined;
    switch (kind) {
      // A known user's attempts name the user (PCI DSS 10.2.1.4); a name no user has is only a
      // digest: it may be a password typed in the wrong field.
      case 'password':
        return typedActor('user', body.username);
      // The token's id (before the dot) names the session; its secret never reaches the trail.
      // Only a well-formed id: a malformed token (a password pasted in the field) is not named.
      case 'refresh_token': {
        const actor = refreshActor(typeof body.refresh_token === 'string' ? body.refresh_token : undefined);
        return () => actor;
      }
      // The claimed client, as a failed login records the claimed username.
      case 'assertion': {
        const claimed: AuditActor = { type: 'service', id: (assertion === undefined ? null : assertionClientId(assertion)) ?? 'unknown-client' };
        return () => claimed;
      }
      // As a username: a client id no client has may be its secret, given in the wrong variable.
      case 'client_credentials':
        return typedActor('client', body.client_id);
      default:
        return () => NOBODY;
    }
  };
  const tokenRateLimit = options.tokenRateLimit ?? IDENTITY_TOKEN_RATE_LIMIT_DEFAULT;
  if (!(tokenRateLimit.ratePerSecond > 0) || !Number.isInteger(tokenRateLimit.burst) || tokenRateLimit.burst < 1) {
    throw new RangeError(`token rate limit: ratePerSecond must be above 0 and burst a positive integer (got ${JSON.stringify(tokenRateLimit)})`);
  }
  // The verified principal of a request, once authentication is installed (it hooks into the
  // service, so it comes after); read only while serving requests.
  let principalOf: (request: FastifyRequest) => Principal | undefined = () => undefined;
  /**
   * Whose bucket a request takes from. Never a header (the caller chooses it, so a
   * brute-forcer would name a fresh client on each request; the runtime's default keyed by
   * x-client-id until 2026-12-07, and keys by address now unless told to trust it). A route with a permission is keyed by its verified principal (authentication runs in
   * onRequest and refuses a request without one with 401, before the limiter runs in
   * preValidation); every other route (the token endpoint, revocation, the JWKS) by address.
   *
   * `request.ip` is the TCP peer: the runtime leaves Fastify's trustProxy off, so
   * X-Forwarded-For is ignored and no caller can pick its address. Behind a reverse proxy or
   * load balancer every request then comes from the proxy's address, and all the clients behind
   * it share one bucket per route: size IDENTITY_TOKEN_* for that, or limit per client at the proxy.
   * An IPv6 client is keyed by its /64 (addressKey), which one host commonly holds whole.
   */
  const rateLimitClient = (request: FastifyRequest): string => {
    const principal = principalOf(request);
    return principal === undefined ? addressKey(request.ip) : `p:${principal.kind}:${principal.id}`;
  };
  const rateLimit = options.resilience?.rateLimit;
  const resilience = rateLimit === undefined || rateLimit === false ? options.resilience : { ...options.resilience, rateLimit: { ...rateLimit, clientId: rateLimitClient } };
  const app = await createService({
    config: { LOG_LEVEL: (options.logLevel ?? 'info') as 'info', BODY_LIMIT_BYTES: options.bodyLimitBytes ?? IDENTITY_BODY_LIMIT_BYTES_DEFAULT },
    openapi: { title: 'Ledgerline identity', version: '0.1.0', description: 'Users, two-factor authentication, service clients and tokens. Errors are RFC 9457 problem+json with an OAuth2 `error` member.' },
    readinessChecks: [postgresReadinessCheck(pool)],
    ...(options.logger === undefined ? {} : { logger: options.logger }),
    ...resilience,
  });
  app.metrics?.registerCounterFromTotal('audit_requests_unrecorded_total', 'Audited requests whose audit record the trail could not take (logged at error level).', () => unrecorded);
  /**
   * Token and revocation requests over the route's rate limit (429), as the audit trail's HTTP
   * plugin records them on other services: one summary per actor, address, route and resource
   * each interval (@ledgerline/audit, rate-limited.ts), not a record each, so an address
   * hammering the endpoint cannot grow the trail at its request rate. The actor is named as a
   * single refusal's would be (`unchecked-user:<digest>`, never looked up).
   */
  const rateLimited = writeRateLimitedSummaries(app, {
    sink: options.audit,
    service: 'identity',
    reason: 'rate_limited',
    ...(options.rateLimitedSummary === undefined ? {} : { settings: options.rateLimitedSummary }),
    onLost: (n) => {
      unrecorded += n;
    },
  });
  app.addHook('onClose', async () => {
    while (pending.size > 0) await Promise.all(pending);
  });
  // OAuth2 clients send the token endpoint a form (RFC 6749 §4.1.3); JSON is accepted too.
  // The body limit is the service's (BODY_LIMIT_BYTES).
  app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'buffer' }, (_request, body, done) => {
    let params: Record<string, string>;
    try {
      params = parseForm(body as Buffer);
    } catch (error) {
      done(error as Error, undefined);
      return;
    }
    done(null, params);
  });

  // This service verifies its own tokens against the keys it publishes, read fresh each time:
  // administrative calls are rare, and a rotation is then seen at once.
  const ownKeys: JWTVerifyGetKey = async (header, token) => createLocalJWKSet(await identity.jwks())(header, token);
  const auth = installHttpAuth(app, {
    verify: createTokenVerifier({ keys: ownKeys, issuer, audience: IDENTITY_AUDIENCE, clock, cacheEntriesMax: 0 }),
    authorizer: new Authorizer({ policy: options.policy ?? REFERENCE_POLICY, audit: options.audit, clock }),
    service: 'identity',
    ...options.authFailures,
  });
  // A route with a permission has its principal by the time the limiter runs: a request
  // without one was refused (401) in onRequest.
  principalOf = (request) => (request.routeOptions.config.permission === undefined ? undefined : auth.principal(request));

  /**
   * Token and revocation requests refused before the handler ran are access attempts too (PCI
   * DSS 10.2.1.2): a body that fails the schema or cannot be parsed (400), is over the limit (413)
   * or of another type (415), an address over its limit (429), a request shed (503) or past its
   * deadline (504). The handler records every request it sees (`recordedAlready`, as this hook
   * marks the one it records); every other answer of these routes is recorded here as it is
   * sent, whether or not the client stays to read it: a failure with the reason its answer gives
   * (earlyRefusal), naming whom its parameters name as the handler would (nobody when the body
   * was never read). A 400, 413 or 415 looks the account up after the answer as the handler's
   * refusals do (`record` bounds the lookups); a 429, 503 or 504 sheds work and looks nothing up
   * (REFUSED_UNCHECKED). The answer is not touched. Until 2026-12-07 these left no trace: a brute force sent as malformed or
   * throttled attempts went unrecorded.
   */
  const earlyRecordings: ReadonlyMap<string, EarlyRecording> = new Map([
    [
      '/oauth/token',
      {
        action: TOKEN_ACTION,
        parameters: TOKEN_PARAMETERS,
        describe: (params, outcome) => ({
          actor: params === undefined ? NOBODY : tokenActor(params)(outcome),
          resource: { type: 'token', id: GRANT_TYPES.has(params?.grant_type) ? String(params?.grant_type) : 'unknown' },
          payload: { audience: recordedAudience(params?.audience) },
        }),
      },
    ],
    [
      // As the handler records a token, by its id (before the dot), never its secret; which
      // session it would end is known only once it is looked up, which a refusal never is.
      '/oauth/revoke',
      {
        action: AUDIT_ACTIONS.revoke,
        parameters: REVOKE_PARAMETERS,
        describe: (params) => ({
          actor: params === undefined ? NOBODY : refreshActor(typeof params.token === 'string' ? params.token : undefined),
          resource: { type: 'session', id: 'unknown' },
          payload: {},
        }),
      },
    ],
  ]);
  const recordedAlready = new WeakSet<FastifyRequest>();
  const earlyRecordingOf = (request: FastifyRequest): EarlyRecording | undefined => (request.method === 'POST' ? earlyRecordings.get(request.routeOptions.url ?? '') : undefined);
  // Recorded as the answer is sent, not once it has gone (onResponse): a client that hangs up
  // before reading its refusal was refused all the same, and onResponse never fires for it. The
  // record is written now, or its actor's lookup scheduled (record): the answer waits for neither.
  app.addHook('onSend', (request, reply, payload, done) => {
    const recording = reply.statusCode >= 400 && !recordedAlready.has(request) ? earlyRecordingOf(request) : undefined;
    if (recording !== undefined) {
      recordedAlready.add(request);
      try {
        const refusal = earlyRefusal(reply.statusCode, payload, recording.parameters);
        const body: unknown = request.body;
        const params = typeof body === 'object' && body !== null && !Array.isArray(body) ? (body as Record<string, unknown>) : undefined;
        const { actor, resource, payload: described } = recording.describe(params, SHEDDING_STATUSES.has(reply.statusCode) ? REFUSED_UNCHECKED : REFUSED_UNREAD);
        const limited = reply.statusCode === 429 ? rateLimitRefusal(request) : undefined;
        if (limited !== undefined && !('lookup' in actor)) {
          rateLimited.add({
            recordClass: 'access', action: recording.action, actor, ip: request.ip, resource, method: request.method, route: request.routeOptions.url ?? request.url,
            requestId: request.id, limit: limited.limit, client: limited.client, at: clock(), details: { ...described, ...refusal.payload },
          });
        } else {
          record(actor, { recordClass: 'access', action: recording.action, origin: originOf(request), resource, outcome: 'failure', reason: refusal.reason, payload: { ...described, ...refusal.payload } });
        }
      } catch (error) {
        // The answer goes as it is: say so loudly.
        unrecorded += 1;
        request.log.error({ err: error, audit: true, action: recording.action }, 'audit: a request refused before its handler could not be recorded');
      }
    }
    done(null, payload);
  });

  // Each route documents the answers it can give. Every POST can get the runtime's own before
  // its handler runs: 400 (a body that is malformed or fails the schema), 413 (over
  // BODY_LIMIT_BYTES), 415 (neither JSON nor, where accepted, a form); and any route that reads
  // the database 503 with Retry-After when it cannot be reached.
  const bodyProblems = { 400: ProblemResponse, 413: ProblemResponse, 415: ProblemResponse, 503: ProblemResponse };
  const guarded = { 401: ProblemResponse, 403: ProblemResponse };
  // The OAuth2 endpoints take a form (RFC 6749 §3.2) or JSON.
  const oauthBody = ['application/x-www-form-urlencoded', 'application/json'];
  const noStore = { 'cache-control': 'no-store' };

  // High priority under load shedding: every verifier of this issuer's tokens (each ledger
  // instance) needs the set, and serving it is cheap.
  app.get('/.well-known/jwks.json', { config: { priority: 'high' }, schema: { summary: 'The public keys that verify this issuer\'s tokens', tags: ['tokens'], response: { 200: JwksOut, 503: ProblemResponse } } }, async (_request, reply) => {
    // Verifiers cache the set; a minute keeps a rotation visible soon after it happens.
    reply.header('cache-control', 'public, max-age=60');
    return identity.jwks();
  });

  app.post(
    '/oauth/token',
    {
      config: {
        clientProblemExtensions: oauthClientError,
        // The route that costs an argon2id hash per attempt (19 MiB, tens of ms of CPU on the
        // libuv threads) takes no credential but the one it checks: under load it is shed first
        // (low), so that the cheap routes and the probes keep their share of the process, and
        // each client address gets a small limit of its own, refused (429) before any hash.
        priority: 'low',
        rateLimit: tokenRateLimit,
      },
      schema: {
        summary: 'OAuth2 token endpoint: password (+TOTP), refresh_token, client_credentials',
        description: '400 for a refused grant or request (OAuth2 `error`: invalid_request, invalid_grant, invalid_target, unsupported_grant_type), 401 for client authentication that failed (invalid_client) or a missing second factor (mfa_required).',
        tags: ['tokens'],
        consumes: oauthBody,
        body: TokenBody,
        response: { 200: TokenOut, ...bodyProblems, 401: ProblemResponse },
      },
    },
    async (request, reply): Promise<TokenResponse> => {
      reply.headers(noStore);
      const body = request.body;
      // The trail cannot take this request's record now: refused before any work, so that no
      // grant is made that the trail does not show, as the ledger's audit plugin answers 503.
      // Its refusal is logged, not queued behind the records the trail is already behind on.
      refuseWhileTrailBehind(request, reply, TOKEN_ACTION, () => recordedAlready.add(request));
      /**
       * Every grant attempt, granted or refused, is an authentication event in the audit trail
       * (PCI DSS 10.2.4), whose actor `actorOf` names from the outcome: `granted`, or the
       * account a refusal names (undefined when none was found).
       */
      const audited = async (actorOf: (outcome: GrantOutcome) => ActorSource, call: Promise<Grant> | ((recordGrant: RecordGrant) => Promise<Grant>)): Promise<TokenResponse> => {
        recordedAlready.add(request);
        const entry = { recordClass: 'access', action: TOKEN_ACTION, origin: originOf(request), resource: { type: 'token', id: body.grant_type } };
        const payload = { audience: recordedAudience(body.audience) };
        // The grant's record, written before the grant commits where the grant takes part
        // (Identity's beforeCommit: a session begun, a refresh token rotated, a recovery code
        // spent), so that one the trail refuses (its buffer full) rolls back and never happened;
        // a retry then finds everything as it was. Else (a client's token: nothing to undo) after.
        let recorded = false;
        const recordGrant: RecordGrant = (extra) => {
          // Granted, the audience is one the grant accepted (a client's registered audience
          // included, which `audiences` may not list): recorded as sent.
          const audience = typeof body.audience === 'string' ? body.audience : null;
          if (!recordOrLog(request, () => record(actorOf({ granted: true }), { ...entry, outcome: 'success', payload: { ...payload, audience, ...extra } }))) throw new GrantUnrecordedError();
          recorded = true;
        };
        let granted: Grant;
        try {
          granted = await (typeof call === 'function' ? call(recordGrant) : call);
        } catch (error) {
          // Rolled back: no grant was made, and the trail that refused its record takes no other.
          if (error instanceof GrantUnrecordedError) throw identityProblem(retryLater(reply, auditBehind()));
          const refusal = error instanceof IdentityError ? error : undefined;
          // The trail's reason may be finer than the answer's code (refresh_token_reused is answered invalid_grant).
          // A record the trail refuses (its buffer full) is logged; the refusal is answered as it is.
          recordOrLog(request, () => record(actorOf({ granted: false, account: refusal?.account, code: refusal?.code }), { ...entry, outcome: 'failure', reason: refusal === undefined ? 'error' : (refusal.auditReason ?? refusal.code), payload }));
          // A locked account is refused as a wrong password is: a distinct answer (it was 423)
          // told anyone probing that the username exists. The audit trail keeps the true reason.
          if (refusal?.code === 'account_locked') throw identityProblem(new IdentityError('invalid_grant', LOGIN_REFUSED));
          throw refusal === undefined ? error : identityProblem(retryLater(reply, refusal));
        }
        if (!recorded) {
          // A client's token the trail cannot record is not handed out: 503, never a 500.
          try {
            recordGrant(granted.payload);
          } catch {
            throw identityProblem(retryLater(reply, auditBehind()));
          }
        }
        return granted.tokens;
      };
      const tokensOnly = (call: Promise<TokenResponse>) => call.then((tokens) => ({ tokens }));
      // Granted, a user is named as typed (lower-cased); refused before the user was looked up
      // (an audience, a missing field), the user is looked up after the answer (tokenActor).
      const actorOf = tokenActor(body);
      switch (body.grant_type) {
        case 'password': {
          const username = body.username;
          if (username === undefined || body.password === undefined || body.audience === undefined) return audited(actorOf, missing('password', 'username, password and audience'));
          const login = {
            username,
            password: body.password,
            audience: body.audience,
            ...(body.totp_code === undefined ? {} : { totpCode: body.totp_code }),
            ...(body.recovery_code === undefined ? {} : { recoveryCode: body.recovery_code }),
          };
          // Which second factor granted it: a recovery code used is a credential spent (PCI DSS 10.2.1.5).
          return audited(actorOf, (recordGrant) =>
            identity.authenticate(login, { beforeCommit: ({ secondFactor }) => recordGrant({ second_factor: secondFactor }) }).then(({ tokens }) => ({ tokens })),
          );
        }
        case 'refresh_token': {
          if (body.refresh_token === undefined) return audited(actorOf, missing('refresh_token', 'refresh_token'));
          const refreshToken = body.refresh_token;
          return audited(actorOf, (recordGrant) => tokensOnly(identity.refresh(refreshToken, { beforeCommit: () => recordGrant() })));
        }
        case 'client_credentials': {
          if (body.client_assertion !== undefined && body.client_assertion_type === CLIENT_ASSERTION_TYPE) {
            if (body.audience === undefined) return audited(actorOf, missing('client_credentials', 'audience'));
            return audited(actorOf, tokensOnly(identity.clientCredentials({ assertion: body.client_assertion }, body.audience)));
          }
          const clientId = body.client_id;
          if (body.audience === undefined) return audited(actorOf, missing('client_credentials', 'audience'));
          if (clientId === undefined || body.client_secret === undefined) return audited(actorOf, missing('client_credentials', 'client_id and client_secret, or a client_assertion'));
          return audited(actorOf, tokensOnly(identity.clientCredentials({ clientId, secret: body.client_secret }, body.audience)));
        }
      }
    },
  );

  app.post('/oauth/revoke', { config: { clientProblemExtensions: oauthClientError }, schema: { summary: 'Revoke a refresh token and its whole session (RFC 7009)', tags: ['tokens'], consumes: oauthBody, body: RevokeBody, response: { 200: { type: 'null' }, ...bodyProblems } } }, async (request, reply) => {
    // Recorded as the refresh grant records the token: its id, never its secret. An unknown,
    // malformed or wrong token is answered 200 (RFC 7009) and recorded as a failure.
    recordedAlready.add(request);
    const entry = { recordClass: 'access', action: AUDIT_ACTIONS.revoke, actor: refreshActor(request.body.token), origin: originOf(request) };
    // An access token (a compact JWS; a refresh token is `<id>.<secret>`) cannot be revoked
    // here: it stays valid until it expires. RFC 7009 §2.2.1's answer says so, where a 200 would
    // tell the client it was revoked. Until 2026-12-07 the schema cut the token at 128
    // characters, and an access token got 400 invalid_request (a review found it).
    if (ACCESS_TOKEN_SHAPE.test(request.body.token)) {
      recordOrLog(request, () => options.audit.record({ ...entry, resource: { type: 'session', id: 'unknown' }, outcome: 'failure', reason: 'unsupported_token_type' }));
      throw identityProblem(
        new IdentityError('unsupported_token_type', `this server revokes refresh tokens only: an access token stays valid until it expires; revoke the session's refresh token to end the session`),
      );
    }
    let outcome: RevokeOutcome;
    try {
      outcome = await identity.revoke(request.body.token);
    } catch (error) {
      recordOrLog(request, () => options.audit.record({ ...entry, resource: { type: 'session', id: 'unknown' }, outcome: 'failure', reason: error instanceof IdentityError ? error.code : 'error' }));
      throw error instanceof IdentityError ? identityProblem(retryLater(reply, error)) : error;
    }
    // A revocation is done whether or not the trail can take its record now (a full buffer is
    // logged): withholding it would leave a token live that its holder asked to end.
    if (outcome.found) {
      recordOrLog(request, () => options.audit.record({ ...entry, resource: { type: 'session', id: outcome.familyId ?? 'unknown' }, outcome: 'success', payload: { revoked: outcome.revoked, user_id: outcome.userId } }));
    } else {
      recordOrLog(request, () => options.audit.record({ ...entry, resource: { type: 'session', id: 'unknown' }, outcome: 'failure', reason: 'invalid_grant' }));
    }
    return reply.code(200).send(null);
  });

  /**
   * A change an authenticated caller makes to credentials, recorded with its outcome (PCI DSS
   * 10.2.1.5) beside the authorization decision that allowed it: the decision says it was
   * allowed, this what came of it. `payloadOf` never returns a secret.
   * With the trail behind (its sink saturated) the change is refused 503 with Retry-After before
   * any work, as a token request is, so that no change is made that the trail does not show.
   * A record the trail refuses after all (its buffer filled in between) is logged and counted,
   * and the answer is the change's own: until 2026-12-07 the refusal was thrown after the change
   * had committed, and the caller got a 500 for a change that was made, and might make it again.
   */
  const changed = async <T>(request: FastifyRequest, reply: FastifyReply, action: string, resource: AuditResource, call: () => Promise<T>, payloadOf: (result: T) => Record<string, unknown>, refusedPayload?: Record<string, unknown>): Promise<T> => {
    refuseWhileTrailBehind(request, reply, action);
    const principal = auth.principal(request);
    const actor: AuditActor = { type: principal.kind === 'service' ? 'service' : 'user', id: principal.id };
    const entry = { recordClass: 'access', action, actor, origin: originOf(request), resource };
    let result: T;
    try {
      result = await call();
    } catch (error) {
      recordOrLog(request, () => options.audit.record({ ...entry, outcome: 'failure', reason: error instanceof IdentityError ? error.code : 'error', ...(refusedPayload === undefined ? {} : { payload: refusedPayload }) }));
      throw error instanceof IdentityError ? identityProblem(retryLater(reply, error)) : error;
    }
    recordOrLog(request, () => options.audit.record({ ...entry, outcome: 'success', payload: payloadOf(result) }));
    return result;
  };

  app.post(
    '/v1/users',
    { config: { permission: PERMISSIONS.userCreate }, schema: { summary: 'Create a user', tags: ['users'], body: NewUserBody, response: { 201: UserOut, ...bodyProblems, ...guarded, 409: ProblemResponse } } },
    async (request, reply) => {
      const roles = request.body.roles;
      // The roles the user would hold are the decision's to make (ADMIN_GRANTABLE_ROLES); service
      // roles no user may hold are refused by the identity store itself (400, recorded).
      auth.authorize(request, { type: 'user', id: request.body.username, grants: roles.filter((role) => !role.startsWith(SERVICE_ROLE_PREFIX)) });
      const { id } = await changed(request, reply, AUDIT_ACTIONS.userCreate, { type: 'user', id: request.body.username }, () => identity.createUser(request.body), (user) => ({ user_id: user.id, roles }), { roles });
      return reply.code(201).send({ id, username: request.body.username });
    },
  );

  app.post(
    '/v1/me/totp',
    { config: { permission: PERMISSIONS.selfManage }, schema: { summary: 'Start two-factor enrolment: returns the TOTP secret once', tags: ['users'], response: { 200: TotpEnrolOut, ...bodyProblems, ...guarded, 409: ProblemResponse } } },
    async (request, reply) => {
      const me = auth.authorize(request, { type: 'user', id: auth.principal(request).id, owners: [auth.principal(request).id] });
      reply.headers(noStore);
      // The secret and its URI are the answer, never the record.
      return changed(request, reply, AUDIT_ACTIONS.totpEnrol, { type: 'user', id: me.id }, () => identity.enrolTotp(me.id, 'Ledgerline'), () => ({}));
    },
  );

  app.post(
    '/v1/me/totp/confirm',
    { config: { permission: PERMISSIONS.selfManage }, schema: { summary: 'Finish enrolment with a code; returns recovery codes once', tags: ['users'], body: TotpConfirmBody, response: { 200: TotpConfirmOut, ...bodyProblems, ...guarded, 409: ProblemResponse } } },
    async (request, reply) => {
      const me = auth.authorize(request, { type: 'user', id: auth.principal(request).id, owners: [auth.principal(request).id] });
      reply.headers(noStore);
      const { recoveryCodes } = await changed(request, reply, AUDIT_ACTIONS.totpConfirm, { type: 'user', id: me.id }, () => identity.confirmTotp(me.id, request.body.code, request.body.password), (r) => ({ recovery_codes_issued: r.recoveryCodes.length }));
      return { recovery_codes: recoveryCodes };
    },
  );

  app.post(
    '/v1/keys/rotate',
    { config: { permission: PERMISSIONS.keyRotate }, schema: { summary: 'Rotate the signing key: the new key is published now and signs from active_from; the old one stays published until its tokens expire', tags: ['tokens'], response: { 200: KeyOut, ...bodyProblems, ...guarded } } },
    async (request, reply) => {
      auth.authorize(request, { type: 'signing-key', id: 'current' });
      const { kid, activeFrom } = await changed(request, reply, AUDIT_ACTIONS.keyRotate, { type: 'signing-key', id: 'current' }, () => identity.rotateKeys(), (key) => ({ kid: key.kid, active_from: key.activeFrom.toISOString() }));
      return { kid, active_from: activeFrom.toISOString() };
    },
  );

  return app;
}

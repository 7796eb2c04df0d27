/**
 * Authentication and authorization for a Fastify service built with `createService`.
 *
 * Every route under the protected prefix must declare `config: { permission }`, or the service
 * fails at start. A request to such a route must carry `Authorization: Bearer <token>`: a
 * missing or invalid token is 401 before anything else runs. The handler then calls
 * `auth.authorize(request, resource)` with the attributes it has found (amount, ledger,
 * owners); a deny is 403. Both are problem+json and both are audited. An address whose
 * authentication failures exceed `failureLimit` gets 429 for the next ones, recorded together
 * (failure-throttle.ts). A response of 2xx/3xx
 * from a protected route that never got an allow is a bug, and is turned into a 500 rather
 * than served.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { addressKey, BEARER_SECURITY_SCHEME, DEPENDENCY_RETRY_AFTER_SECONDS, documentRoute, flushEveryInterval, OVERLOAD_PROBLEM_TYPES, problem, PROBLEM_TYPES, ProblemResponse, problemType, type HttpProblem, type ServiceMetrics } from '@ledgerline/service-runtime';
import { auditedInSummary, type AuditOrigin } from '@ledgerline/audit';
import { AUTH_FAILURE_LIMIT_DEFAULT, AuthFailureThrottle, type AuthFailureLimit } from './failure-throttle.ts';
import { DecisionUnrecordedError, type Authorizer } from './authorizer.ts';
import type { Permission, Principal, ResourceAttributes } from './policy.ts';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The permission this route needs (`resource:action`); required under the protected prefix. */
    permission?: Permission;
  }
}

/**
 * The `code` of an error `verify` throws when it cannot check a token now (its issuer's keys
 * could not be fetched: `@ledgerline/identity`'s TokenKeysUnavailableError, kept equal). Such a
 * request is answered 503 dependency-unavailable with Retry-After, never 401 or 429, and is not
 * counted against its address's authentication failures: nothing is known against the token,
 * and its client should retry it, not throw it away. Its decision is recorded as a deny with the
 * reason, up to UNVERIFIABLE_RECORDS_PER_SECOND a second; past that, counted and logged.
 */
export const VERIFIER_UNAVAILABLE_CODE = 'ERR_VERIFIER_UNAVAILABLE';

/** Decisions about requests whose token could not be checked recorded one by one each second, across all addresses; the rest are counted. */
export const UNVERIFIABLE_RECORDS_PER_SECOND = 100;

export const AUTH_PROBLEM_TYPES = {
  unauthenticated: problemType('unauthenticated'),
  forbidden: problemType('forbidden'),
} as const;

/** The replay header of the service runtime's idempotency plugin: a replayed response was authorized when first made, for the same principal. */
const REPLAYED_HEADER = 'idempotent-replayed';

export interface HttpAuthOptions {
  /** Verifies a bearer token, throwing on anything invalid. */
  verify: (token: string) => Promise<Principal>;
  authorizer: Authorizer;
  /** This service's name, recorded as the origin of each decision. */
  service: string;
  /** Routes whose URL starts with this must declare a permission. Default `/v1/`. */
  protectedPrefix?: string;
  /**
   * Authentication failures allowed per client address before they are answered 429 and
   * recorded together (failure-throttle.ts). Default AUTH_FAILURE_LIMIT_DEFAULT; false: none.
   */
  failureLimit?: AuthFailureLimit | false;
  /** Failures recorded one by one across all addresses; AUTH_FAILURE_TOTAL_LIMIT_DEFAULT unless given. */
  failureTotalLimit?: AuthFailureLimit;
  /** How often the refusals over the limit are recorded, one record per address. Default 10 s. */
  failureSummaryIntervalMs?: number;
  /** Requests whose token could not be checked recorded one by one each second; UNVERIFIABLE_RECORDS_PER_SECOND unless given. */
  unverifiableRecordsPerSecond?: number;
  /** The throttle's clock (tests). */
  clock?: () => number;
}

export const FAILURE_SUMMARY_INTERVAL_MS_DEFAULT = 10_000;

export interface HttpAuth {
  /** The authenticated principal of a protected route's request. */
  principal(request: FastifyRequest): Principal;
  /** Decides the route's permission on `resource`, records it, and throws a 403 problem on deny. */
  authorize(request: FastifyRequest, resource: ResourceAttributes): Principal;
  /** Whether deciding this route's permission for this principal needs the resource's owners. */
  needsOwners(request: FastifyRequest): boolean;
}

/**
 * `Bearer <token68>`. The scheme is case-insensitive (RFC 7235 §2.1, RFC 6750 §2.1), so
 * `bearer` and `BEARER` are the same scheme; one or more spaces may separate it from the token.
 */
const BEARER = /^Bearer +([A-Za-z0-9._~+/-]+=*)$/i;
/** Audit fields are bounded (the durable trail refuses text over 500 characters); a URL is not. */
const AUDITED_PATH_CHARS_MAX = 200;

/** Installs the hooks on `app` itself (not a child context). Call before adding routes. */
export function installHttpAuth(app: FastifyInstance, options: HttpAuthOptions): HttpAuth {
  const { verify, authorizer, service } = options;
  const prefix = options.protectedPrefix ?? '/v1/';
  const principals = new WeakMap<FastifyRequest, Principal>();
  const allowed = new WeakSet<FastifyRequest>();

  const origin = (request: FastifyRequest): AuditOrigin => ({ service, ip: request.ip, requestId: request.id });
  const permissionOf = (request: FastifyRequest): Permission | undefined => request.routeOptions.config.permission;

  const limit = options.failureLimit ?? AUTH_FAILURE_LIMIT_DEFAULT;
  const throttle = limit === false ? null : new AuthFailureThrottle(limit, options.clock, options.failureTotalLimit);
  const summaryIntervalMs = options.failureSummaryIntervalMs ?? FAILURE_SUMMARY_INTERVAL_MS_DEFAULT;
  if (!(Number.isInteger(summaryIntervalMs) && summaryIntervalMs >= 100)) throw new RangeError(`failureSummaryIntervalMs must be an integer of at least 100, not ${summaryIntervalMs}`);
  const summarize = (): void => {
    if (throttle === null) return;
    for (const summary of throttle.drain()) {
      try {
        authorizer.recordThrottled(summary, throttle, service);
      } catch (error) {
        unrecorded += 1;
        app.log.error({ err: error, audit: true, throttled: summary }, 'audit: refusals over the authentication failure limit could not be recorded');
      }
    }
  };
  /** Decision records and throttle summaries the trail could not take (`audit_decisions_unrecorded_total`). */
  let unrecorded = 0;
  (app as { metrics?: ServiceMetrics }).metrics?.registerCounterFromTotal(
    'audit_decisions_unrecorded_total',
    'Authorization decisions (and summaries of throttled requests) whose audit record the trail could not take, each logged at error level; an allow among them was refused 503.',
    () => unrecorded,
  );
  /** Requests whose token could not be checked (issuer keys unavailable), per second recorded; the rest counted. */
  const unverifiablePerSecond = options.unverifiableRecordsPerSecond ?? UNVERIFIABLE_RECORDS_PER_SECOND;
  if (!(Number.isInteger(unverifiablePerSecond) && unverifiablePerSecond >= 1)) throw new RangeError(`unverifiableRecordsPerSecond must be a positive integer, not ${unverifiablePerSecond}`);
  let unverifiableWindowStartMs = -Infinity;
  let unverifiableRecordedInWindow = 0;
  let unverifiableSkippedInWindow = 0;
  let unverifiableUnrecorded = 0;
  (app as { metrics?: ServiceMetrics }).metrics?.registerCounterFromTotal(
    'auth_unverifiable_unrecorded_total',
    'Requests answered 503 because their token could not be checked (the issuer\'s keys unavailable) past the per-second record limit: counted here and logged, not recorded one by one.',
    () => unverifiableUnrecorded,
  );
  if (throttle !== null) {
    // On the service's /metrics when it has one: the 429s are recorded in summaries only.
    (app as { metrics?: ServiceMetrics }).metrics?.registerCounterFromTotal(
      'auth_failures_throttled_total',
      'Requests without valid credentials refused with 429 because their address (or all addresses) was over the authentication failure limit.',
      () => throttle.refusedTotal,
    );
    flushEveryInterval(app, summaryIntervalMs, summarize);
  }

  /**
   * The authorizer's decision, recorded. When the trail cannot take the record (its buffer at
   * its bound: DecisionUnrecordedError, carrying the decision) the loss is logged and counted:
   * an allow refuses the request 503 audit-unavailable with Retry-After, and nothing runs, since
   * an access the trail does not show is not granted; a deny is answered as a deny (401, 403),
   * which grants nothing. Until 2026-12-07 the error reached the client as a 500.
   */
  const unrecordedAllows = new WeakSet<FastifyRequest>();
  const decide = (request: FastifyRequest, ...args: Parameters<Authorizer['check']>): ReturnType<Authorizer['check']> => {
    try {
      return authorizer.check(...args);
    } catch (error) {
      if (!(error instanceof DecisionUnrecordedError)) throw error;
      unrecorded += 1;
      const { decision } = error;
      request.log.error({ err: error, audit: true, allowed: decision.allowed }, 'audit: an authorization decision could not be recorded');
      if (!decision.allowed) return decision;
      // Retry-After is set as the answer is sent (onSend): `authorize` has no reply to set it on.
      unrecordedAllows.add(request);
      throw problem(503, {
        type: problemType('audit-unavailable'),
        title: 'Audit trail unavailable',
        detail: 'The authorization decision could not be recorded in the audit trail, so this request was not run. Retry after the Retry-After delay.',
      });
    }
  };

  /**
   * A request refused for want of valid credentials: 401 with its decision recorded, or, from an
   * address over its failure limit, 429, counted for the address's summary record instead.
   */
  const refuse = (request: FastifyRequest, reply: FastifyReply, permission: Permission, resource: ResourceAttributes, why: string, tokenSent: boolean): HttpProblem => {
    const address = addressKey(request.ip);
    if (throttle === null || throttle.admit(address)) return unauthenticated(reply, decide(request, null, permission, resource, origin(request), why).reason, tokenSent);
    auditedInSummary(request);
    reply.header('retry-after', String(Math.max(1, Math.ceil(throttle.retryAfterMs(address) / 1000))));
    return problem(429, {
      type: OVERLOAD_PROBLEM_TYPES.rateLimited,
      title: 'Too many requests',
      detail: `Too many requests without valid credentials (from this address over ${throttle.limit.ratePerSecond} a second, burst ${throttle.limit.burst}, or from all addresses over ${throttle.totalLimit.ratePerSecond}); retry after the Retry-After delay with a valid bearer token.`,
    });
  };

  app.addHook('onRoute', (route) => {
    const permission = route.config?.permission;
    if (route.url.startsWith(prefix) && permission === undefined) {
      throw new Error(`${String(route.method)} ${route.url}: a protected route must declare config.permission`);
    }
    // Every route with a permission answers 401 without a token, 429 past the failure limit, and
    // 503 when the trail cannot take an allow (decide): the OpenAPI document says so.
    if (permission !== undefined) {
      const responses: Record<number, object> = throttle === null ? { 401: ProblemResponse, 503: ProblemResponse } : { 401: ProblemResponse, 429: ProblemResponse, 503: ProblemResponse };
      documentRoute(route, { security: [{ [BEARER_SECURITY_SCHEME]: [] }], responses });
    }
  });

  app.addHook('onRequest', async (request, reply) => {
    const permission = permissionOf(request);
    if (permission === undefined) return;
    const header = request.headers.authorization;
    const token = typeof header === 'string' ? BEARER.exec(header)?.[1] : undefined;
    const path = request.url.split('?')[0] ?? request.url;
    const resource = { type: permission.slice(0, permission.indexOf(':')), id: path.slice(0, AUDITED_PATH_CHARS_MAX) };
    if (token === undefined) throw refuse(request, reply, permission, resource, 'no bearer token', false);
    try {
      principals.set(request, await verify(token));
    } catch (error) {
      if ((error as { code?: unknown } | null)?.code === VERIFIER_UNAVAILABLE_CODE) {
        const why = `the token could not be checked: ${error instanceof Error ? error.message : 'its verifier is unavailable'}`;
        // Recorded one by one, at most UNVERIFIABLE_RECORDS_PER_SECOND a second across all
        // addresses; past that, counted (`auth_unverifiable_unrecorded_total`) and logged once a
        // second. Any bytes make such a request, and a record each would let a client flood the
        // trail while the keys are away (the final review: 20 junk tokens, 20 records). Not
        // through the failure throttle: its summary record says 429, and these are 503s, many
        // with good tokens, which must not use up their address's allowance either.
        const nowMs = (options.clock ?? Date.now)();
        if (nowMs - unverifiableWindowStartMs >= 1000) {
          if (unverifiableSkippedInWindow > 0) app.log.warn({ unrecorded: unverifiableSkippedInWindow, audit: true }, 'auth: requests whose token could not be checked (issuer keys unavailable) past the per-second record limit were counted, not recorded');
          unverifiableWindowStartMs = nowMs;
          unverifiableRecordedInWindow = 0;
          unverifiableSkippedInWindow = 0;
        }
        if (unverifiableRecordedInWindow < unverifiablePerSecond) {
          unverifiableRecordedInWindow += 1;
          decide(request, null, permission, resource, origin(request), why);
        } else {
          unverifiableSkippedInWindow += 1;
          unverifiableUnrecorded += 1;
          auditedInSummary(request);
        }
        reply.header('retry-after', String(DEPENDENCY_RETRY_AFTER_SECONDS));
        throw problem(503, {
          type: PROBLEM_TYPES.dependencyUnavailable,
          title: 'Token issuer unavailable',
          detail: 'The bearer token could not be checked: the token issuer\'s signing keys could not be fetched. Nothing was run; retry with the same token after the Retry-After delay.',
        });
      }
      throw refuse(request, reply, permission, resource, error instanceof Error ? error.message : 'invalid token', true);
    }
  });

  app.addHook('onSend', async (request, reply, payload) => {
    if (unrecordedAllows.has(request)) reply.header('retry-after', '1');
    if (permissionOf(request) === undefined || reply.statusCode >= 400) return payload;
    if (allowed.has(request) || reply.getHeader(REPLAYED_HEADER) === 'true') return payload;
    throw new Error(`invariant: ${request.method} ${request.url} answered ${reply.statusCode} without an authorization decision`);
  });

  function principal(request: FastifyRequest): Principal {
    const p = principals.get(request);
    if (p === undefined) throw new Error(`invariant: ${request.url} has no authenticated principal`);
    return p;
  }

  return {
    principal,
    needsOwners: (request) => {
      const permission = permissionOf(request);
      return permission !== undefined && authorizer.policy.needsOwners(principal(request).roles, permission);
    },
    authorize: (request, resource) => {
      const p = principal(request);
      const permission = permissionOf(request);
      if (permission === undefined) throw new Error(`invariant: ${request.url} declares no permission`);
      const decision = decide(request, p, permission, resource, origin(request));
      if (!decision.allowed) {
        throw problem(403, {
          type: AUTH_PROBLEM_TYPES.forbidden,
          title: 'Forbidden',
          detail: `${permission} on ${resource.type} ${resource.id} is not allowed: ${decision.reason}.`,
          permission,
          policy_version: decision.policyVersion,
        });
      }
      allowed.add(request);
      return p;
    },
  };
}

/** RFC 6750 §3: no error code when no credentials were sent, `invalid_token` when they were bad. */
function unauthenticated(reply: FastifyReply, reason: string, tokenSent: boolean): HttpProblem {
  reply.header('www-authenticate', tokenSent ? 'Bearer error="invalid_token"' : 'Bearer');
  return problem(401, { type: AUTH_PROBLEM_TYPES.unauthenticated, title: 'Unauthenticated', detail: `A valid bearer token is required (${reason}).` });
}

/**
 * Route priority classes, inbound deadlines, load shedding and rate limiting: the request
 * gates every service gets from `createService`. For each request, in this order:
 *
 * 1. Deadline: `x-deadline-remaining-ms` from the caller, else `deadlineDefaultMs`, becomes
 *    `request.deadline`. Already expired → 504 at once; nothing runs.
 * 2. Load shedding (when configured, in onRequest): the route's priority class
 *    (`config: { priority: 'critical' | 'high' | 'normal' | 'low' }`, default normal) waits
 *    for a slot; refused → 503 + Retry-After. If the deadline passed while it waited → 504:
 *    the caller has given up, so the handler is not run. A client that hangs up while queued
 *    leaves the queue, and its slot is never taken.
 * 3. Rate limit (when configured, in preValidation, after authentication so that the client
 *    can be the verified principal): per client and route; over the limit → 429 +
 *    Retry-After. The client is the service's `clientId(request)`, else the client address
 *    (`addressKey`), never a header the caller picks unless the service trusts it
 *    (`trustClientIdHeader`). It runs after shedding, so a limited request has held a slot
 *    briefly; the shedder, which protects the process, acts first. Unknown paths and methods
 *    are limited by client address.
 *
 * The runtime's own routes (/health, /ready, /metrics, /openapi.json) pass every gate:
 * probes and scrapes must answer precisely when the service is overloaded.
 */
import { createHash } from 'node:crypto';
import { isIPv6 } from 'node:net';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { Deadline, DEADLINE_HEADER, PRIORITIES, ShedError, type LoadShedder, type LoadShedderOptions, type Priority } from '@ledgerline/resilience';
import { problemType } from './problem.ts';
import { sendProblem } from './problem-handlers.ts';
import { checkRateLimit, RateLimitUnavailableError, type RateLimit, type RedisTokenBucket } from './rate-limit.ts';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route's priority class for load shedding; default `normal`. */
    priority?: Priority;
    /** This route's rate limit, or `false` for none; default: the service's default limit. */
    rateLimit?: RateLimit | false;
  }
  interface FastifyRequest {
    /** When the caller stops waiting: pass it to outbound calls (`policy.execute(fn, { deadline })`). */
    deadline: Deadline;
  }
}

export const PRIORITY_DEFAULT: Priority = 'normal';
export const OPS_ROUTES: ReadonlySet<string> = new Set(['/health', '/ready', '/metrics', '/openapi.json']);
/** Used when neither the caller nor the service names a deadline. */
export const DEADLINE_DEFAULT_MS = 30_000;

export const OVERLOAD_PROBLEM_TYPES = {
  overloaded: problemType('overloaded'),
  rateLimited: problemType('rate-limited'),
  deadlineExceeded: problemType('deadline-exceeded'),
} as const;

/** Load shedding settings; the class timeouts default to the values below. */
export interface LoadSheddingOptions extends Omit<LoadShedderOptions, 'queueTimeoutMs' | 'onLevelChange' | 'onShed'> {
  queueTimeoutMs?: LoadShedderOptions['queueTimeoutMs'];
}

/**
 * How long each class may wait for a slot. Money movement waits longest: failing it costs
 * the most. A report that waits a tenth of a second is better refused and retried later.
 */
export const QUEUE_TIMEOUT_MS_DEFAULT: Readonly<Record<Priority, number>> = { critical: 2000, high: 500, normal: 250, low: 100 };

export interface RateLimitingOptions {
  bucket: RedisTokenBucket;
  /** Applied to routes that name no limit of their own. */
  defaultLimit: RateLimit;
  /**
   * Who the client is: whose bucket a request takes from. Give one that names the verified
   * principal when the service authenticates (it runs after every onRequest hook). Default:
   * `defaultRateLimitClientId`, the client address, or `trustedHeaderRateLimitClientId` with
   * `trustClientIdHeader`. Not called for unknown paths and methods, which are limited by
   * address.
   */
  clientId?: (request: FastifyRequest) => string;
  /**
   * Key the default `clientId` by the `x-client-id` header (when well-formed; else by address).
   * Default false. Only for a service reachable solely through a gateway that authenticates
   * each caller and sets the header itself, replacing whatever the caller sent: a header the
   * caller chooses limits nothing (a fresh value is a fresh bucket) and lets it spend another
   * client's budget by naming it. Ignored when `clientId` is given.
   */
  trustClientIdHeader?: boolean;
}

/** The header `trustClientIdHeader` keys by (the idempotency plugin's CLIENT_ID_HEADER). */
const CLIENT_ID_HEADER = 'x-client-id';
const CLIENT_ID_PATTERN = /^[A-Za-z0-9._:@-]{1,128}$/;

/**
 * The default rate-limit client: the client address (`addressKey`: an IPv6 client by its /64),
 * which the caller cannot choose. Headers are ignored: `x-client-id` is whatever the caller
 * sends. `request.ip` is the TCP peer (the runtime leaves Fastify's trustProxy off), so behind
 * a proxy every client shares the proxy's buckets: key by an authenticated principal
 * (`clientId`), or trust a header the proxy sets (`trustClientIdHeader`), or limit at the proxy.
 */
export function defaultRateLimitClientId(request: FastifyRequest): string {
  return addressKey(request.ip);
}

/**
 * The rate-limit client under `trustClientIdHeader`: the `x-client-id` header when it is 1..128
 * characters of `[A-Za-z0-9._:@-]` (keyed `c:<header>`), else the client address.
 */
export function trustedHeaderRateLimitClientId(request: FastifyRequest): string {
  const header = request.headers[CLIENT_ID_HEADER];
  return typeof header === 'string' && CLIENT_ID_PATTERN.test(header) ? `c:${header}` : addressKey(request.ip);
}

/** The `clientId` a rate limit uses: the service's own, else by address or, if trusted, the header. */
function rateLimitClientOf(options: RateLimitingOptions): (request: FastifyRequest) => string {
  return options.clientId ?? (options.trustClientIdHeader === true ? trustedHeaderRateLimitClientId : defaultRateLimitClientId);
}

export function routePriority(request: FastifyRequest): Priority {
  const priority = request.routeOptions.config.priority ?? PRIORITY_DEFAULT;
  if (!PRIORITIES.includes(priority)) throw new Error(`route ${request.routeOptions.url}: unknown priority ${JSON.stringify(priority)}`);
  return priority;
}

export function isOpsRoute(request: FastifyRequest): boolean {
  const url = request.routeOptions.url;
  return url !== undefined && OPS_ROUTES.has(url);
}

/**
 * The rate-limit key of a client address. An IPv4 address is its own key. An IPv6 address is
 * keyed by its /64: one subscriber or host is routinely given a whole /64, so keying by the full
 * address would hand a single client 2^64 buckets. An IPv4 address mapped into IPv6
 * (`::ffff:a.b.c.d`, what a dual-stack listener reports) is keyed as the IPv4 address.
 */
export function addressKey(ip: string): string {
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(ip);
  if (mapped !== null) return `ip:${mapped[1] ?? ''}`;
  const address = (ip.split('%')[0] ?? '').toLowerCase();
  if (!isIPv6(address)) return `ip:${ip}`;
  // Expand `::` to the missing groups; an embedded IPv4 tail counts as two groups.
  const groupsOf = (part: string): string[] => (part === '' ? [] : part.split(':').flatMap((g) => (g.includes('.') ? ['x', 'x'] : [g])));
  const [head = '', tail] = address.split('::');
  const before = groupsOf(head);
  const after = tail === undefined ? [] : groupsOf(tail);
  const groups = [...before, ...Array<string>(8 - before.length - after.length).fill('0'), ...after];
  return `ip6:${groups.slice(0, 4).map((g) => Number.parseInt(g, 16).toString(16)).join(':')}::/64`;
}

/** Reads the inbound deadline; answers 504 and returns false when it has already passed. */
export function applyDeadline(request: FastifyRequest, reply: FastifyReply, defaultMs: number): boolean {
  request.deadline = Deadline.fromHeader(request.headers[DEADLINE_HEADER]) ?? Deadline.after(defaultMs);
  if (!request.deadline.expired()) return true;
  deadlineExceeded(request, reply);
  return false;
}

export function deadlineExceeded(request: FastifyRequest, reply: FastifyReply): void {
  sendProblem(request, reply, {
    status: 504,
    type: OVERLOAD_PROBLEM_TYPES.deadlineExceeded,
    title: 'Deadline exceeded',
    detail: 'The caller\'s deadline passed before this request could start; nothing was done.',
  });
}

/** Longest client id kept as it is in a bucket's key; Redis keys are bounded (rate-limit.ts). */
const CLIENT_KEY_CHARS_MAX = 128;

/**
 * A `clientId` may come from what the client sent (a token's subject, a header): one too long
 * for a Redis key is keyed by its sha256, as the idempotency plugin does, rather than failing
 * each of the client's requests with a 500.
 */
function boundedClientKey(client: string): string {
  return client.length <= CLIENT_KEY_CHARS_MAX && /^[\x21-\x7e]*$/.test(client) ? client : `sha256:${createHash('sha256').update(client).digest('hex')}`;
}

/** A request the rate limiter refused: the limit it was over, and whose bucket it drew on. */
export interface RateLimitRefusal {
  limit: Readonly<RateLimit>;
  /** The bucket's client: the `clientId` (bounded), or the address for an unknown route. */
  client: string;
}

const rateLimitRefusals = new WeakMap<FastifyRequest, RateLimitRefusal>();

/**
 * The limit this request was over and whose bucket it was, when the rate limiter refused it
 * (429): for a plugin that records refusals (the audit trail summarises them, per bucket,
 * rather than writing one record each). Undefined for every other request, a 429 of any other
 * origin included.
 */
export function rateLimitRefusal(request: FastifyRequest): Readonly<RateLimitRefusal> | undefined {
  return rateLimitRefusals.get(request);
}

/** Answers 429 and returns false when the client is over its limit for this route. */
export async function applyRateLimit(
  request: FastifyRequest,
  reply: FastifyReply,
  options: RateLimitingOptions,
  onLimited: (route: string) => void,
  onError: (error: unknown) => void,
): Promise<boolean> {
  const routeLimit = request.routeOptions.config.rateLimit;
  if (routeLimit === false) return true;
  const limit = routeLimit ?? options.defaultLimit;
  const route = request.routeOptions.url ?? '';
  // An unknown path or method (404, 405) matched no route, so no route's hooks, authentication
  // included, ran for it: a clientId that names the principal has none to name. Such requests
  // are limited by address instead, which a caller cannot choose.
  const client = request.is404 ? addressKey(request.ip) : boundedClientKey(rateLimitClientOf(options)(request));
  // HEAD runs the GET route's handler (Fastify adds it to every GET route), so it takes from
  // the GET bucket: two buckets would double the client's limit on that handler.
  const method = request.method === 'HEAD' ? 'GET' : request.method;
  let result;
  try {
    result = await options.bucket.take(`${method}:${route}:${client}`, limit);
  } catch (error) {
    if (!(error instanceof RateLimitUnavailableError)) throw error;
    onError(error);
    return true;
  }
  if (result === undefined || result.allowed) {
    if (result !== undefined) reply.header('ratelimit-remaining', String(result.remaining));
    return true;
  }
  onLimited(route);
  rateLimitRefusals.set(request, { limit, client });
  reply.header('retry-after', String(Math.max(1, Math.ceil(result.retryAfterMs / 1000))));
  sendProblem(request, reply, {
    status: 429,
    type: OVERLOAD_PROBLEM_TYPES.rateLimited,
    title: 'Too many requests',
    detail: `This client is over its limit of ${limit.ratePerSecond} requests per second (burst ${limit.burst}) on ${request.method} ${route}.`,
  });
  return false;
}

/**
 * Waits for a slot for the route's priority class. Returns false after answering 503 (shed)
 * or 504 (deadline passed while queued). On true, `onAdmitted` gets the function to call when
 * the request's work has ended (its reply is sent, or its handler has settled); the slot is
 * released once that has happened and the response has ended, however it ended. A client that
 * hangs up while its handler runs does not free the slot: the work goes on, and the slot bounds
 * the work, so it comes back when the work ends.
 */
export async function applyLoadShedding(
  request: FastifyRequest,
  reply: FastifyReply,
  shedder: LoadShedder,
  onAdmitted?: (workDone: () => void) => void,
): Promise<boolean> {
  const priority = routePriority(request);
  // 'close' fires once however the exchange ends (sent, failed, or the client went away), so
  // the listener goes on before waiting: a client that hangs up while queued would otherwise
  // close before anyone listens, and its slot would never come back. While queued, the close
  // withdraws the waiter; once admitted, it releases the slot if the work is over, else the
  // end of the work does.
  const gone = new AbortController();
  let admitted = false;
  let closed = false;
  let done = false;
  let released = false;
  const release = (): void => {
    if (released) return;
    released = true;
    shedder.release();
  };
  reply.raw.once('close', () => {
    if (!admitted) {
      gone.abort(new Error('client closed the connection while queued'));
      return;
    }
    closed = true;
    // Answered (or hijacked and ended): nothing of the request runs any more.
    if (done || reply.sent) release();
  });
  try {
    await shedder.acquire(priority, gone.signal);
  } catch (error) {
    if (gone.signal.aborted) {
      clientGone(reply);
      return false;
    }
    if (!(error instanceof ShedError)) throw error;
    reply.header('retry-after', String(Math.ceil(error.retryAfterMs / 1000)));
    sendProblem(request, reply, {
      status: 503,
      type: OVERLOAD_PROBLEM_TYPES.overloaded,
      title: 'Overloaded',
      detail: `The service is shedding ${priority}-priority requests (${error.reason.replaceAll('_', ' ')}). Retry after the Retry-After delay.`,
      extensions: { priority, reason: error.reason },
    });
    return false;
  }
  admitted = true;
  // It closed between the slot being granted and this line running: give the slot back now.
  if (gone.signal.aborted) {
    release();
    clientGone(reply);
    return false;
  }
  onAdmitted?.(() => {
    done = true;
    if (closed) release();
  });
  if (request.deadline.expired()) {
    deadlineExceeded(request, reply);
    return false;
  }
  return true;
}

/**
 * Ends a request whose client left while it queued. Nobody reads the answer, but Fastify runs
 * the handler unless a reply is sent; 499 (nginx's "client closed request") keeps it apart
 * from the 503s of shedding in the metrics.
 */
function clientGone(reply: FastifyReply): void {
  void reply.code(499).send();
}

export function validateRateLimits(options: RateLimitingOptions): void {
  checkRateLimit(options.defaultLimit, 'rate limit');
  const trust: unknown = options.trustClientIdHeader;
  if (trust !== undefined && typeof trust !== 'boolean') throw new TypeError(`rate limit: trustClientIdHeader must be a boolean, got ${JSON.stringify(trust)}`);
  const clientId: unknown = options.clientId;
  if (clientId !== undefined && typeof clientId !== 'function') throw new TypeError('rate limit: clientId must be a function of the request');
}

/**
 * A route's own `priority` and `rateLimit`, checked when the route is added: one the runtime
 * cannot honour would otherwise fail each of the route's requests (an unknown priority, a 500)
 * or each of its trips to Redis (a rate of 0 or a burst under 1).
 */
export function validateRouteGates(method: string, url: string, config: { priority?: unknown; rateLimit?: unknown } | undefined): void {
  const where = `route ${method} ${url}`;
  const priority = config?.priority;
  if (priority !== undefined && !PRIORITIES.includes(priority as Priority)) throw new Error(`${where}: unknown priority ${JSON.stringify(priority)} (one of ${PRIORITIES.join(', ')})`);
  const rateLimit = config?.rateLimit;
  if (rateLimit === undefined || rateLimit === false) return;
  if (typeof rateLimit !== 'object' || rateLimit === null) throw new TypeError(`${where}: rateLimit must be { ratePerSecond, burst } or false`);
  checkRateLimit(rateLimit as RateLimit, `${where}: rateLimit`);
}

export { checkRateLimit };

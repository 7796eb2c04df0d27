/**
 * Rate limiting per client and per route with a token bucket in Redis, so the limit holds
 * across every instance of a service.
 *
 * The bucket lives in one Redis hash per (route, client) and is updated by one Lua script,
 * atomically: read, refill by the elapsed time, take, write, in a single round trip, with
 * Redis's own clock (`TIME`) so instances whose clocks disagree still share one bucket
 * fairly. Keys expire once a bucket would be full again, so idle clients cost nothing.
 *
 * When Redis cannot answer (down, slow past its command timeout), the request is let
 * through: rate limiting protects capacity; refusing all traffic because the limiter's own
 * store failed would turn a Redis outage into a full outage. A circuit breaker around Redis
 * keeps a dead Redis from adding its timeout to every request; failures are counted in
 * `rate_limit_errors_total` and logged.
 *
 * "Not connected yet" is not a failure: while the client is making a connection (at start-up,
 * or after one dropped) a take waits for it, within the same timeout as a command, rather than
 * send a command the client would refuse at once (no offline queue). Counted, five of those
 * would open the breaker on a healthy Redis and turn limiting off for its open wait (5 s).
 * A connection refused, closed or not ready in time still fails the take and counts.
 */
import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';
import { CircuitBreaker, NOT_PERMITTED, type CircuitBreakerOptions, type Clock } from '@ledgerline/resilience';

export interface RateLimit {
  /** Tokens added per second: the sustained rate allowed. */
  ratePerSecond: number;
  /** Bucket size: the burst allowed on top of the rate. */
  burst: number;
}

export interface TokenBucketResult {
  allowed: boolean;
  /** When refused: how long until one token is back. */
  retryAfterMs: number;
  /** Whole tokens left after this request. */
  remaining: number;
}

const RATE_PER_SECOND_MAX = 1_000_000;
const BURST_MAX = 1_000_000;
const KEY_BYTES_MAX = 512;
/**
 * The longest a bucket may take to refill from empty (burst / ratePerSecond): about 317 years.
 * The script's key expiry is that time in ms, and Lua writes a number from 1e14 up in exponent
 * notation, which PEXPIRE refuses: every take of such a limit would fail in Redis.
 */
const REFILL_SECONDS_MAX = 1e10;
/** The wait for Redis when neither the bucket nor its client names one. */
export const RATE_LIMIT_REDIS_TIMEOUT_MS_DEFAULT = 250;
const REDIS_TIMEOUT_MS_MAX = 10_000;
/**
 * ioredis statuses in which a connection is being made or soon will be ('wait': a lazyConnect
 * client's first command starts it; 'reconnecting': the retry timer is running). A take waits
 * for the attempt in these (see `#runOnceConnected`) instead of being refused by the client.
 */
const CONNECTING_STATUSES: ReadonlySet<string> = new Set(['wait', 'connecting', 'connect', 'reconnecting']);

/**
 * KEYS[1] the bucket; ARGV rate per second, burst, cost. Returns {allowed, retry_after_ms, remaining}.
 * TIME makes the script non-deterministic, which Redis 5+ allows (effects replication, the
 * default since Redis 5 and the only mode since 7).
 */
export const TOKEN_BUCKET_LUA = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
local retry_ms = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return { allowed, retry_ms, math.floor(tokens) }
`;

const TOKEN_BUCKET_SHA = createHash('sha1').update(TOKEN_BUCKET_LUA).digest('hex');

export interface RedisTokenBucketOptions {
  /**
   * The caller owns the client; give it a short `commandTimeout`, `enableOfflineQueue: false`
   * and a reconnect that starts at once: `rateLimitRedisOptions` (resilience-config.ts).
   */
  redis: Redis;
  /** Every key starts with this, e.g. `ll:rl:ledger:`. */
  keyPrefix: string;
  /**
   * The longest a take waits for Redis before the request is let through. Default: the
   * client's own `commandTimeout` when it has one (no timer of ours then), else 250 ms, so that
   * a client made without one cannot hold requests while Redis hangs.
   */
  timeoutMs?: number;
  /** The breaker around Redis; defaults open after 5 failures in 10 calls, for 5 s. */
  breaker?: Omit<CircuitBreakerOptions, 'name' | 'clock'>;
  clock?: Clock;
}

export function checkRateLimit(limit: RateLimit, where: string): void {
  if (!(limit.ratePerSecond > 0 && limit.ratePerSecond <= RATE_PER_SECOND_MAX)) throw new RangeError(`${where}: ratePerSecond must be in (0, ${RATE_PER_SECOND_MAX}]`);
  if (!(Number.isInteger(limit.burst) && limit.burst >= 1 && limit.burst <= BURST_MAX)) throw new RangeError(`${where}: burst must be an integer in 1..${BURST_MAX}`);
  if (!(limit.burst / limit.ratePerSecond <= REFILL_SECONDS_MAX)) throw new RangeError(`${where}: burst / ratePerSecond (the seconds to refill an empty bucket) must be at most ${REFILL_SECONDS_MAX}`);
}

export class RedisTokenBucket {
  readonly breaker: CircuitBreaker;
  readonly #redis: Redis;
  readonly #prefix: string;
  /** Undefined: the client's commandTimeout bounds every command already. */
  readonly #timeoutMs: number | undefined;
  /** The connection attempt takes are waiting for, if any (see `#connected`). */
  #connecting: Promise<void> | undefined;
  #closed = false;

  constructor(options: RedisTokenBucketOptions) {
    this.#redis = options.redis;
    this.#prefix = options.keyPrefix;
    const { timeoutMs } = options;
    if (timeoutMs !== undefined && !(Number.isInteger(timeoutMs) && timeoutMs >= 1 && timeoutMs <= REDIS_TIMEOUT_MS_MAX)) {
      throw new RangeError(`rate limit: timeoutMs must be an integer in 1..${REDIS_TIMEOUT_MS_MAX}`);
    }
    const own = options.redis.options.commandTimeout;
    this.#timeoutMs = timeoutMs ?? (own !== undefined && own > 0 ? undefined : RATE_LIMIT_REDIS_TIMEOUT_MS_DEFAULT);
    this.breaker = new CircuitBreaker({
      name: 'rate-limit-redis',
      window: { kind: 'count', calls: 10 },
      minimumCalls: 5,
      failureRateThreshold: 0.5,
      slowCallRateThreshold: 1,
      slowCallDurationMs: Infinity,
      openWaitMs: 5000,
      halfOpenPermittedCalls: 1,
      ...options.breaker,
      ...(options.clock === undefined ? {} : { clock: options.clock }),
    });
  }

  /**
   * Takes `cost` tokens from the bucket `key`. When the limiter cannot decide the caller lets
   * the request through: it resolves undefined when the breaker is open, and rejects with
   * `RateLimitUnavailableError` when Redis failed (or its connection could not be made in
   * time). Any other rejection is a key or limit that is a programming error.
   */
  async take(key: string, limit: RateLimit, cost = 1): Promise<TokenBucketResult | undefined> {
    const fullKey = `${this.#prefix}${key}`;
    if (Buffer.byteLength(fullKey) > KEY_BYTES_MAX) throw new RangeError(`rate-limit key longer than ${KEY_BYTES_MAX} bytes`);
    // Checked here, not left to the script: a limit it cannot apply fails in Redis, and that
    // failure would count against the breaker, which is shared by every route.
    checkRateLimit(limit, 'rate limit');
    if (!(Number.isInteger(cost) && cost >= 1)) throw new RangeError('rate limit: cost must be a positive integer');
    // Closed (the service is stopping): no decision, and no wait for a client that is gone.
    if (this.#closed) return undefined;
    const permit = this.breaker.tryAcquire();
    if (permit === NOT_PERMITTED) return undefined;
    const startMs = performance.now();
    try {
      const reply = this.#redis.status === 'ready' ? await this.#bounded(this.#run(fullKey, limit, cost), this.#timeoutMs) : await this.#runOnceConnected(fullKey, limit, cost);
      this.breaker.record(permit, false, performance.now() - startMs);
      const [allowed, retryAfterMs, remaining] = reply;
      return { allowed: allowed === 1, retryAfterMs, remaining };
    } catch (error) {
      this.breaker.record(permit, true, performance.now() - startMs);
      throw new RateLimitUnavailableError(error);
    }
  }

  /**
   * The take when the client is not ready. With `enableOfflineQueue: false` a command sent
   * now would be refused by the client itself, without reaching Redis: at start-up, and for
   * the moment a dropped connection takes to come back, a healthy Redis would count as failing
   * and five such refusals would open the breaker (no limiting for `openWaitMs`). So when a
   * connection is being made, the take waits for its outcome, within the same `timeoutMs` as a
   * command: ready, it is sent; refused, closed or not ready in time, it fails like any Redis
   * failure, so a Redis that is down still opens the breaker (a refused connection at once).
   */
  async #runOnceConnected(key: string, limit: RateLimit, cost: number): Promise<[number, number, number]> {
    const status = this.#redis.status;
    // 'end' (closed for good) and the like: the client answers for itself, as before.
    if (!CONNECTING_STATUSES.has(status)) return this.#bounded(this.#run(key, limit, cost), this.#timeoutMs);
    const budgetMs = this.#timeoutMs ?? this.#redis.options.commandTimeout ?? RATE_LIMIT_REDIS_TIMEOUT_MS_DEFAULT;
    const startMs = performance.now();
    // Nothing is sent unless the connection is ready within the budget: a take that has
    // already failed open must not also take a token later.
    await this.#bounded(this.#connected(), budgetMs);
    // Too little of the budget left for a round trip (under 2 ms, or a quarter of a shorter
    // budget): the command would time out here and still take its token in Redis, for a request
    // already let through. A fixed quarter of the budget, first tried, failed takes that a
    // connection slow to set up (TLS, a slow resolver) left 12 ms for a 0.5 ms round trip, and
    // five such failures open the breaker (a review measured it).
    const leftMs = budgetMs - (performance.now() - startMs);
    if (leftMs < Math.min(2, budgetMs / 4)) throw new Error(`the connection to Redis took ${Math.round(budgetMs - leftMs)} ms of the ${budgetMs} ms wait`);
    return this.#bounded(this.#run(key, limit, cost), Math.ceil(leftMs));
  }

  /**
   * Stops deciding: every take after this resolves undefined at once (the caller lets the request
   * through). For shutdown, before the client is closed: a client closed while it was
   * reconnecting stays 'reconnecting' in ioredis, and a take would wait its whole budget for a
   * connection that never comes.
   */
  close(): void {
    this.#closed = true;
  }

  /**
   * Settles with the connection attempt under way: resolves when the client is ready, rejects
   * when the attempt ends without it ('close', which every failed attempt emits). One promise
   * per attempt, shared by every waiting take, so a rush at start-up adds two listeners, not
   * two per request; each take bounds its own wait.
   */
  #connected(): Promise<void> {
    if (this.#connecting !== undefined) return this.#connecting;
    const redis = this.#redis;
    const attempt = new Promise<void>((resolve, reject) => {
      const settle = (error?: Error): void => {
        redis.off('ready', onReady);
        redis.off('close', onClose);
        this.#connecting = undefined;
        if (error === undefined) resolve();
        else reject(error);
      };
      const onReady = (): void => { settle(); };
      const onClose = (): void => { settle(new Error('the connection to Redis could not be made')); };
      redis.on('ready', onReady);
      redis.on('close', onClose);
    });
    this.#connecting = attempt;
    // A lazyConnect client that has not connected yet: the command would have started it.
    if (redis.status === 'wait') redis.connect().catch(() => {});
    // Nobody may be waiting any more when it rejects (every take gave up); that is fine.
    attempt.catch(() => {});
    return attempt;
  }

  /** `work`, or a rejection once the wait for Redis has passed `timeoutMs` (none: `work` as is). */
  #bounded<T>(work: Promise<T>, timeoutMs: number | undefined): Promise<T> {
    if (timeoutMs === undefined) return work;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => { reject(new Error(`Redis did not answer within ${timeoutMs} ms`)); }, timeoutMs);
      work.then(
        (value) => { clearTimeout(timer); resolve(value); },
        (error: unknown) => { clearTimeout(timer); reject(error instanceof Error ? error : new Error(String(error))); },
      );
    });
  }

  async #run(key: string, limit: RateLimit, cost: number): Promise<[number, number, number]> {
    const args = [String(limit.ratePerSecond), String(limit.burst), String(cost)];
    try {
      return (await this.#redis.evalsha(TOKEN_BUCKET_SHA, 1, key, ...args)) as [number, number, number];
    } catch (error) {
      // First use on this Redis (or after SCRIPT FLUSH): send the script itself once.
      if (!(error instanceof Error) || !error.message.startsWith('NOSCRIPT')) throw error;
      return (await this.#redis.eval(TOKEN_BUCKET_LUA, 1, key, ...args)) as [number, number, number];
    }
  }
}

/** The limiter's store failed; the request should be let through (and the failure counted). */
export class RateLimitUnavailableError extends Error {
  constructor(cause: unknown) {
    super('rate limiter unavailable', { cause });
    this.name = 'RateLimitUnavailableError';
  }
}

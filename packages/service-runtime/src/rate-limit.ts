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
  /** The caller owns the client; give it a short `commandTimeout` and `enableOfflineQueue: false`. */
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
   * Takes `cost` tokens from the bucket `key`. Resolves undefined when the limiter could not
   * decide (Redis failed or its breaker is open): the caller lets the request through.
   * Rejects only on a key or limit that is a programming error.
   */
  async take(key: string, limit: RateLimit, cost = 1): Promise<TokenBucketResult | undefined> {
    const fullKey = `${this.#prefix}${key}`;
    if (Buffer.byteLength(fullKey) > KEY_BYTES_MAX) throw new RangeError(`rate-limit key longer than ${KEY_BYTES_MAX} bytes`);
    // Checked here, not left to the script: a limit it cannot apply fails in Redis, and that
    // failure would count against the breaker, which is shared by every route.
    checkRateLimit(limit, 'rate limit');
    if (!(Number.isInteger(cost) && cost >= 1)) throw new RangeError('rate limit: cost must be a positive integer');
    const permit = this.breaker.tryAcquire();
    if (permit === NOT_PERMITTED) return undefined;
    const startMs = performance.now();
    try {
      const reply = await this.#bounded(this.#run(fullKey, limit, cost));
      this.breaker.record(permit, false, performance.now() - startMs);
      const [allowed, retryAfterMs, remaining] = reply;
      return { allowed: allowed === 1, retryAfterMs, remaining };
    } catch (error) {
      this.breaker.record(permit, true, performance.now() - startMs);
      throw new RateLimitUnavailableError(error);
    }
  }

  /** `work`, or a rejection once the wait for Redis has passed `timeoutMs`. */
  #bounded<T>(work: Promise<T>): Promise<T> {
    const timeoutMs = this.#timeoutMs;
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

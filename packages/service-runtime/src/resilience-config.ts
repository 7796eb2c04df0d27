/**
 * The environment variables for the request gates and observability, for services to spread
 * into their configuration schema, and the function that turns them into `createService`
 * options. Every bound is explicit and checked at start-up.
 */
import { Redis, type RedisOptions } from 'ioredis';
import { Type, type Static } from 'typebox';
import type { ResilienceOptions } from './observability.ts';
import { QUEUE_TIMEOUT_MS_DEFAULT } from './priority.ts';
import { RedisTokenBucket } from './rate-limit.ts';

export const resilienceConfigSchema = Type.Object({
  METRICS_ENABLED: Type.Boolean({ default: true }),
  TRACING_ENABLED: Type.Boolean({ default: true }),
  // Requests running at once before the priority queue takes over. High by default: the
  // shedder is a safety net for overload, not a throttle for normal traffic.
  LOAD_SHED_ENABLED: Type.Boolean({ default: true }),
  LOAD_SHED_CONCURRENCY_MAX: Type.Integer({ minimum: 1, maximum: 100_000, default: 1024 }),
  LOAD_SHED_QUEUE_MAX: Type.Integer({ minimum: 0, maximum: 1_000_000, default: 4096 }),
  LOAD_SHED_TARGET_QUEUE_MS: Type.Integer({ minimum: 1, maximum: 60_000, default: 50 }),
  LOAD_SHED_INTERVAL_MS: Type.Integer({ minimum: 1, maximum: 60_000, default: 500 }),
  LOAD_SHED_QUEUE_TIMEOUT_CRITICAL_MS: Type.Integer({ minimum: 0, maximum: 60_000, default: QUEUE_TIMEOUT_MS_DEFAULT.critical }),
  LOAD_SHED_QUEUE_TIMEOUT_HIGH_MS: Type.Integer({ minimum: 0, maximum: 60_000, default: QUEUE_TIMEOUT_MS_DEFAULT.high }),
  LOAD_SHED_QUEUE_TIMEOUT_NORMAL_MS: Type.Integer({ minimum: 0, maximum: 60_000, default: QUEUE_TIMEOUT_MS_DEFAULT.normal }),
  LOAD_SHED_QUEUE_TIMEOUT_LOW_MS: Type.Integer({ minimum: 0, maximum: 60_000, default: QUEUE_TIMEOUT_MS_DEFAULT.low }),
  RATE_LIMIT_ENABLED: Type.Boolean({ default: false }),
  REDIS_URL: Type.String({ pattern: '^rediss?://', default: 'redis://127.0.0.1:6379' }),
  RATE_LIMIT_PER_SECOND: Type.Number({ exclusiveMinimum: 0, maximum: 1_000_000, default: 1000 }),
  RATE_LIMIT_BURST: Type.Integer({ minimum: 1, maximum: 1_000_000, default: 2000 }),
  RATE_LIMIT_KEY_PREFIX: Type.String({ pattern: '^[A-Za-z0-9:._-]{1,64}$', default: 'll:rl:' }),
  // A limiter that waits longer than this for Redis lets the request through instead.
  RATE_LIMIT_REDIS_TIMEOUT_MS: Type.Integer({ minimum: 1, maximum: 10_000, default: 50 }),
  DEADLINE_DEFAULT_MS: Type.Integer({ minimum: 1, maximum: 300_000, default: 30_000 }),
});

export type ResilienceConfig = Static<typeof resilienceConfigSchema>;

export interface ResilienceFromConfig {
  options: ResilienceOptions;
  /** Close at shutdown (the Redis client, when rate limiting is on). */
  close: () => Promise<void>;
}

/** The longest wait between two reconnect attempts of the rate limiter's Redis client. */
const RECONNECT_DELAY_MS_MAX = 1000;

/**
 * How long the rate limiter's Redis client waits before reconnect attempt `times` (1-based).
 * The first attempt is at once: a connection dropped by a healthy Redis (an idle timeout, a
 * proxy, CLIENT KILL) is back within the take's wait (see `RedisTokenBucket`), so limiting
 * carries on. ioredis's default waits 50 to 250 ms first, longer than a take waits, and every
 * take in between fails and counts against the breaker. Then 50 ms doubling up to 1 s, plus up
 * to a fifth of that at random so that instances do not reconnect in step: a Redis that is back
 * is used again within about a second (ioredis's default grows to 5 s, and a breaker trial
 * that finds the client still waiting reopens the breaker).
 */
export function rateLimitRedisRetryDelayMs(times: number): number {
  if (times <= 1) return 0;
  const delayMs = Math.min(50 * 2 ** (times - 2), RECONNECT_DELAY_MS_MAX);
  return delayMs + Math.floor(Math.random() * (delayMs / 5));
}

/** The rate limiter's Redis client options, explicit where ioredis's defaults would matter. */
export function rateLimitRedisOptions(commandTimeoutMs: number): RedisOptions {
  return {
    commandTimeout: commandTimeoutMs,
    // No offline queue and no per-request retries: when Redis is away the limiter must answer
    // "unknown" at once (and let the request through), never hold it. A take waits for a
    // connection under way itself, within the same timeout (RedisTokenBucket).
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    // A take sent just before the connection dropped has failed (and let its request through)
    // by the time the connection is back: sent again, it would only take a token for nothing.
    autoResendUnfulfilledCommands: false,
    retryStrategy: rateLimitRedisRetryDelayMs,
    // A connection is ready once TCP is: no CLIENT SETINFO and no INFO ready check, two round
    // trips a take waiting for the connection would otherwise spend out of its budget (with a
    // 20 ms round trip, a review saw every take of the first 1.5 s fail and the breaker open).
    disableClientInfo: true,
    enableReadyCheck: false,
  };
}

/** `createService` options from the variables above; `serviceName` prefixes the rate-limit keys. */
export function resilienceFromConfig(config: ResilienceConfig, serviceName: string): ResilienceFromConfig {
  let redis: Redis | undefined;
  const options: ResilienceOptions = {
    metrics: config.METRICS_ENABLED ? { defaultLabels: { service: serviceName } } : false,
    tracing: config.TRACING_ENABLED ? {} : false,
    deadlineDefaultMs: config.DEADLINE_DEFAULT_MS,
    loadShedding: config.LOAD_SHED_ENABLED ? {
      concurrencyMax: config.LOAD_SHED_CONCURRENCY_MAX,
      queueMax: config.LOAD_SHED_QUEUE_MAX,
      targetQueueMs: config.LOAD_SHED_TARGET_QUEUE_MS,
      intervalMs: config.LOAD_SHED_INTERVAL_MS,
      queueTimeoutMs: {
        critical: config.LOAD_SHED_QUEUE_TIMEOUT_CRITICAL_MS,
        high: config.LOAD_SHED_QUEUE_TIMEOUT_HIGH_MS,
        normal: config.LOAD_SHED_QUEUE_TIMEOUT_NORMAL_MS,
        low: config.LOAD_SHED_QUEUE_TIMEOUT_LOW_MS,
      },
    } : false,
    rateLimit: false,
  };
  let bucket: RedisTokenBucket | undefined;
  if (config.RATE_LIMIT_ENABLED) {
    redis = new Redis(config.REDIS_URL, rateLimitRedisOptions(config.RATE_LIMIT_REDIS_TIMEOUT_MS));
    redis.on('error', () => {});
    bucket = new RedisTokenBucket({ redis, keyPrefix: `${config.RATE_LIMIT_KEY_PREFIX}${serviceName}:` });
    options.rateLimit = {
      bucket,
      defaultLimit: { ratePerSecond: config.RATE_LIMIT_PER_SECOND, burst: config.RATE_LIMIT_BURST },
    };
  }
  return {
    options,
    close: async () => {
      bucket?.close();
      if (redis !== undefined) await redis.quit().catch(() => { redis?.disconnect(); });
    },
  };
}

export { baseConfigSchema, ConfigError, loadConfig, LOG_LEVELS, sessionDatabaseUrl } from './config.ts';
export type { BaseConfig, ConfigIssue } from './config.ts';
export {
  ANONYMOUS_CLIENT_ID,
  canonicalJson,
  CLIENT_ID_HEADER,
  IDEMPOTENCY_KEY_HEADER,
  IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT,
  IDEMPOTENCY_PROBLEM_TYPES,
  IDEMPOTENCY_RESPONSE_BYTES_MAX_DEFAULT,
  IDEMPOTENCY_TTL_MS_DEFAULT,
  IDEMPOTENT_REPLAYED_HEADER,
  idempotency,
  idempotencyConfigSchema,
  pruneIdempotencyKeys,
  requestFingerprint,
  startIdempotencyPruner,
} from './idempotency.ts';
export type { IdempotencyOptions, IdempotencyPruner, PruneOptions, PrunerOptions } from './idempotency.ts';
export { migrateRuntime } from './migrate.ts';
export {
  HttpProblem,
  problem,
  PROBLEM_CONTENT_TYPE,
  PROBLEM_TYPE_BASE_URI,
  problemType,
  ProblemResponse,
  ProblemSchema,
  ValidationIssueSchema,
} from './problem.ts';
export type { Problem, ProblemInit, ValidationIssue } from './problem.ts';
export { BodyRefusedError, DATABASE_RETRY_AFTER_SECONDS, databaseUnreachable, DEPENDENCY_RETRY_AFTER_SECONDS, PROBLEM_TYPES, REQUEST_ID_HEADER, validationProblem, type ProblemAnswer } from './problem-handlers.ts';
export { findDuplicateMember } from './json-body.ts';
export type { DuplicateMember } from './json-body.ts';
export { BEARER_SECURITY_SCHEME, documentRoute } from './route-docs.ts';
export type { DocumentedHeader, RouteDocumentation } from './route-docs.ts';
export { databasePoolConfig, DATABASE_CONNECT_TIMEOUT_MS_DEFAULT, DATABASE_QUERY_TIMEOUT_MS_DEFAULT, guardPool } from './pg-pool.ts';
export { postgresReadinessCheck, READINESS_TIMEOUT_MS_DEFAULT } from './readiness.ts';
export type { CheckOutcome, ReadinessCheck } from './readiness.ts';
export { flushEveryInterval } from './periodic.ts';
export { runService } from './run.ts';
export type { OnCloseHook, RunOptions } from './run.ts';
export { createService } from './service.ts';
export type { Service, ServiceOptions } from './service.ts';
export { STORABLE_TEXT_PATTERN, VALIDATION_ISSUES_MAX } from './validation.ts';
export { DegradationTracker, markStale } from './degradation.ts';
export type { DegradationSnapshot } from './degradation.ts';
export { ServiceMetrics, UNMATCHED_ROUTE } from './metrics.ts';
export type { MetricsOptions, RequestOutcome } from './metrics.ts';
export { installResilience } from './observability.ts';
export type { InstalledResilience, ResilienceOptions } from './observability.ts';
export {
  addressKey,
  DEADLINE_DEFAULT_MS,
  defaultRateLimitClientId,
  OPS_ROUTES,
  OVERLOAD_PROBLEM_TYPES,
  PRIORITY_DEFAULT,
  QUEUE_TIMEOUT_MS_DEFAULT,
  rateLimitRefusal,
  routePriority,
  trustedHeaderRateLimitClientId,
} from './priority.ts';
export type { LoadSheddingOptions, RateLimitingOptions, RateLimitRefusal } from './priority.ts';
export { checkRateLimit, RateLimitUnavailableError, RedisTokenBucket, TOKEN_BUCKET_LUA } from './rate-limit.ts';
export type { RateLimit, RedisTokenBucketOptions, TokenBucketResult } from './rate-limit.ts';
export {
  createTracing,
  currentTraceIds,
  extractTraceContext,
  injectTraceHeaders,
  installContextManager,
  TRACE_HEADERS,
  withSpan,
} from './tracing.ts';
export type { HeaderMap, Tracing, TracingOptions } from './tracing.ts';
export { rateLimitRedisOptions, rateLimitRedisRetryDelayMs, resilienceConfigSchema, resilienceFromConfig } from './resilience-config.ts';
export type { ResilienceConfig, ResilienceFromConfig } from './resilience-config.ts';

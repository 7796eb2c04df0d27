export { backoffDelayMs, validateBackoff } from './backoff.ts';
export type { BackoffOptions, Jitter } from './backoff.ts';
export { BREAKER_STATE_VALUE, CircuitBreaker, NOT_PERMITTED } from './breaker.ts';
export type { BreakerSnapshot, BreakerState, BreakerTransition, CircuitBreakerOptions, SlidingWindow } from './breaker.ts';
export { Bulkhead, BulkheadRejection } from './bulkhead.ts';
export type { BulkheadOptions } from './bulkhead.ts';
export { ManualClock, sleep, systemClock } from './clock.ts';
export type { Clock, TimerHandle } from './clock.ts';
export { Deadline, DEADLINE_BUDGET_MS_MAX, DEADLINE_HEADER } from './deadline.ts';
export { BulkheadFullError, CircuitOpenError, DeadlineExceededError, DependencyConnectionError, DependencyHttpError, DependencyResponseTooLargeError } from './errors.ts';
export { HTTP_BODY_BYTES_MAX, httpCall } from './http.ts';
export type { HttpCallOptions, HttpResult } from './http.ts';
export { DependencyPolicy, isTransientError } from './policy.ts';
export type {
  AttemptOutcome,
  CallContext,
  CallOptions,
  CallOutcome,
  DependencyPolicyOptions,
  PolicyObserver,
  RetryOptions,
} from './policy.ts';
export { seededRandom } from './random.ts';
export type { Random } from './random.ts';
export { RetryBudget } from './retry-budget.ts';
export type { RetryBudgetOptions } from './retry-budget.ts';
export { DEGRADATION_LEVEL_MAX, LoadShedder, PRIORITIES, PRIORITY_RANK, ShedError } from './shedder.ts';
export type { LoadShedderOptions, Priority, ShedReason } from './shedder.ts';
export { DeferredQueue, DeferredQueueFullError, migrateResilience } from './deferred-queue.ts';
export type { DeferredItem, DeferredQueueOptions } from './deferred-queue.ts';
export { StaleCache } from './stale-cache.ts';
export type { CacheRead, StaleCacheOptions } from './stale-cache.ts';

/**
 * The per-dependency call policy: every call to another service or an external provider goes
 * through one of these. From the outside in:
 *
 *   fallback → retry (idempotent calls only, under a retry budget) → circuit breaker
 *            → bulkhead → timeout (per attempt, never past the call's deadline) → the call
 *
 * Why this order:
 * - The breaker sits inside the retry so each attempt is judged, and an open breaker stops a
 *   retry loop at once (CircuitOpenError is not retryable).
 * - The bulkhead sits inside the breaker so an open breaker rejects without queueing; a
 *   bulkhead rejection is local saturation, not the dependency failing, so it releases the
 *   breaker permit instead of counting as a failure.
 * - The timeout sits innermost so the breaker sees timeouts as failures (and as slow calls),
 *   and the bulkhead slot is held until the call really ends: a timed-out caller is released
 *   at once, but the slot stays taken while the abandoned request is still running, so the
 *   bulkhead bounds the real load on the dependency.
 */
import { backoffDelayMs, validateBackoff, type BackoffOptions } from './backoff.ts';
import { CircuitBreaker, NOT_PERMITTED, type BreakerTransition, type CircuitBreakerOptions } from './breaker.ts';
import { Bulkhead, BulkheadRejection, type BulkheadOptions } from './bulkhead.ts';
import { sleep, systemClock, type Clock, type TimerHandle } from './clock.ts';
import { Deadline } from './deadline.ts';
import { BulkheadFullError, CircuitOpenError, DeadlineExceededError, DependencyHttpError } from './errors.ts';
import type { Random } from './random.ts';
import { RetryBudget, type RetryBudgetOptions } from './retry-budget.ts';

export type AttemptOutcome = 'success' | 'failure' | 'timeout' | 'circuit_open' | 'bulkhead_full';
export type CallOutcome = AttemptOutcome | 'fallback';

/** Metrics hooks. Every method is optional; they run synchronously on the call path, so keep them cheap. */
export interface PolicyObserver {
  attempt?(dependency: string, outcome: AttemptOutcome, durationMs: number): void;
  call?(dependency: string, outcome: CallOutcome, durationMs: number): void;
  retry?(dependency: string, retry: number, delayMs: number): void;
  retryBudgetExhausted?(dependency: string): void;
  transition?(transition: BreakerTransition): void;
}

export interface RetryOptions {
  /** Attempts in all, the first included (1..10). */
  attemptsMax: number;
  backoff: BackoffOptions;
  /** Shared across the dependency's calls; an options object makes one for this policy. */
  budget: RetryBudget | RetryBudgetOptions;
}

export interface DependencyPolicyOptions {
  /** The dependency's name, in metrics, logs and errors. */
  name: string;
  /** The longest one attempt may take. */
  attemptTimeoutMs: number;
  /** The longest a whole call (attempts, waits and backoff) may take when the caller gives no deadline, and the cap when it does. */
  callTimeoutMs: number;
  retry: RetryOptions | false;
  breaker: Omit<CircuitBreakerOptions, 'name' | 'clock'> | false;
  bulkhead: BulkheadOptions | false;
  /** Whether an error from the call counts against the dependency in the breaker. Default: every error. */
  isFailure?: (error: unknown) => boolean;
  /** Whether an idempotent call may be retried after this error. Default: `isTransientError`. */
  isRetryable?: (error: unknown) => boolean;
  clock?: Clock;
  /** Jitter source; seed it in tests. */
  random?: Random;
  observer?: PolicyObserver;
}

export interface CallContext {
  /** Aborts when the attempt times out or the caller gives up: pass it to fetch, pg, etc. */
  signal: AbortSignal;
  /** This attempt's deadline: send `deadline.toHeader()` downstream as DEADLINE_HEADER. */
  deadline: Deadline;
  /** 1 for the first attempt. */
  attempt: number;
}

export interface CallOptions<T> {
  /**
   * Only idempotent calls are retried: a call that timed out may have taken effect, and
   * repeating a non-idempotent one could move money twice. Default false.
   */
  idempotent?: boolean;
  /** The caller's deadline (e.g. the inbound request's); capped at `callTimeoutMs`. */
  deadline?: Deadline;
  /** The caller gives up: no more attempts, and the running one is aborted. */
  signal?: AbortSignal;
  /** Answers instead of failing; it gets the error that would have been thrown. */
  fallback?: (error: unknown) => T | Promise<T>;
}

const ATTEMPTS_MAX = 10;
const TIMEOUT_MS_MAX = 300_000;

/** Network-level errors after which nothing reached the dependency or it did not answer. */
const TRANSIENT_CODES = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN',
  'UND_ERR_SOCKET', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'UND_ERR_CLOSED',
]);

/**
 * Worth another attempt: a timed-out attempt, a connection-level error, or a 502/503/504/429.
 * Not: an open breaker or a full bulkhead (retrying would only add load where there is
 * already too much), nor any other error.
 */
export function isTransientError(error: unknown): boolean {
  if (error instanceof CircuitOpenError || error instanceof BulkheadFullError) return false;
  if (error instanceof DeadlineExceededError) return true;
  if (error instanceof DependencyHttpError) return error.retryable;
  for (let e: unknown = error, depth = 0; typeof e === 'object' && e !== null && depth < 4; depth += 1) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && TRANSIENT_CODES.has(code)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

export class DependencyPolicy {
  readonly name: string;
  readonly breaker: CircuitBreaker | undefined;
  readonly bulkhead: Bulkhead | undefined;
  readonly retryBudget: RetryBudget | undefined;
  readonly #attemptTimeoutMs: number;
  readonly #callTimeoutMs: number;
  readonly #retry: RetryOptions | false;
  readonly #isFailure: (error: unknown) => boolean;
  readonly #isRetryable: (error: unknown) => boolean;
  readonly #clock: Clock;
  readonly #random: Random;
  readonly #observer: PolicyObserver;

  constructor(options: DependencyPolicyOptions) {
    const { name, attemptTimeoutMs, callTimeoutMs, retry } = options;
    if (!(attemptTimeoutMs > 0 && attemptTimeoutMs <= TIMEOUT_MS_MAX)) throw new RangeError(`${name}: attemptTimeoutMs must be in (0, ${TIMEOUT_MS_MAX}]`);
    if (!(callTimeoutMs >= attemptTimeoutMs && callTimeoutMs <= TIMEOUT_MS_MAX)) throw new RangeError(`${name}: callTimeoutMs must be in [attemptTimeoutMs, ${TIMEOUT_MS_MAX}]`);
    if (retry !== false) {
      if (!(Number.isInteger(retry.attemptsMax) && retry.attemptsMax >= 1 && retry.attemptsMax <= ATTEMPTS_MAX)) {
        throw new RangeError(`${name}: retry.attemptsMax must be an integer in 1..${ATTEMPTS_MAX}`);
      }
      validateBackoff(retry.backoff);
    }
    this.name = name;
    this.#clock = options.clock ?? systemClock;
    this.#random = options.random ?? Math.random;
    this.#observer = options.observer ?? {};
    this.#attemptTimeoutMs = attemptTimeoutMs;
    this.#callTimeoutMs = callTimeoutMs;
    this.#retry = retry;
    this.#isFailure = options.isFailure ?? (() => true);
    this.#isRetryable = options.isRetryable ?? isTransientError;
    this.retryBudget = retry === false ? undefined
      : retry.budget instanceof RetryBudget ? retry.budget : new RetryBudget({ clock: this.#clock, ...retry.budget });
    this.bulkhead = options.bulkhead === false ? undefined : new Bulkhead(options.bulkhead);
    if (options.breaker === false) {
      this.breaker = undefined;
    } else {
      this.breaker = new CircuitBreaker({ ...options.breaker, name, clock: this.#clock });
      const observer = this.#observer;
      this.breaker.onStateChange((t) => { observer.transition?.(t); });
    }
  }

  /** Runs `fn` under the policy. Resolves with its value or the fallback's; rejects otherwise. */
  async execute<T>(fn: (context: CallContext) => Promise<T> | T, options: CallOptions<T> = {}): Promise<T> {
    const clock = this.#clock;
    const startMs = clock.now();
    const deadline = (options.deadline ?? Deadline.never(clock)).within(this.#callTimeoutMs);
    try {
      const value = await this.#withRetry(fn, deadline, options);
      this.#observer.call?.(this.name, 'success', clock.now() - startMs);
      return value;
    } catch (error) {
      // No fallback for a caller who has left; one whose time ran out (its deadline, whether
      // given as `deadline` or through its signal) gets it, as after any timeout.
      if (options.fallback !== undefined && (options.signal?.aborted !== true || error instanceof DeadlineExceededError)) {
        this.#observer.call?.(this.name, 'fallback', clock.now() - startMs);
        return await options.fallback(error);
      }
      this.#observer.call?.(this.name, outcomeOf(error), clock.now() - startMs);
      throw error;
    }
  }

  async #withRetry<T>(fn: (context: CallContext) => Promise<T> | T, deadline: Deadline, options: CallOptions<T>): Promise<T> {
    const retry = options.idempotent === true ? this.#retry : false;
    this.retryBudget?.recordCall();
    let previousDelayMs = 0;
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this.#attempt(fn, deadline, attempt, options.signal);
      } catch (error) {
        if (retry === false || attempt >= retry.attemptsMax || options.signal?.aborted === true || !this.#isRetryable(error)) throw error;
        const delayMs = backoffDelayMs(retry.backoff, attempt, previousDelayMs, this.#random);
        previousDelayMs = delayMs;
        // A retry that cannot start before the deadline would only be cut off: fail now.
        if (deadline.remainingMs() <= delayMs) throw error;
        if (this.retryBudget !== undefined && !this.retryBudget.tryRetry()) {
          this.#observer.retryBudgetExhausted?.(this.name);
          throw error;
        }
        this.#observer.retry?.(this.name, attempt, delayMs);
        await sleep(this.#clock, delayMs, options.signal);
      }
    }
  }

  async #attempt<T>(fn: (context: CallContext) => Promise<T> | T, deadline: Deadline, attempt: number, callerSignal: AbortSignal | undefined): Promise<T> {
    const clock = this.#clock;
    const observer = this.#observer;
    // A caller that has already gone (or whose time is up) is failed without calling: no
    // breaker trial slot, no bulkhead slot or queue place, and the dependency never sees it.
    if (aborted(callerSignal)) throw this.#callerGone(callerSignal);
    const breaker = this.breaker;
    const permit = breaker === undefined ? 0 : breaker.tryAcquire();
    if (permit === NOT_PERMITTED) {
      observer.attempt?.(this.name, 'circuit_open', 0);
      throw new CircuitOpenError(this.name);
    }
    const bulkhead = this.bulkhead;
    if (bulkhead !== undefined && !bulkhead.tryAcquire()) {
      try {
        await this.#waitForSlot(bulkhead, deadline, callerSignal);
      } catch (error) {
        breaker?.release(permit);
        if (aborted(callerSignal) && error === callerSignal?.reason) throw this.#callerGone(callerSignal);
        const rejected = error instanceof BulkheadRejection;
        observer.attempt?.(this.name, rejected ? 'bulkhead_full' : 'timeout', 0);
        throw rejected ? new BulkheadFullError(this.name, bulkhead.concurrencyMax, bulkhead.queueMax) : error;
      }
    }
    const timeoutMs = Math.min(this.#attemptTimeoutMs, deadline.remainingMs());
    const startMs = clock.now();
    if (timeoutMs <= 0 || aborted(callerSignal)) {
      // The deadline passed, or the caller left, while the call waited for a bulkhead slot.
      bulkhead?.release();
      breaker?.release(permit);
      if (aborted(callerSignal)) throw this.#callerGone(callerSignal);
      observer.attempt?.(this.name, 'timeout', 0);
      throw new DeadlineExceededError(this.name, 0);
    }
    const controller = new AbortController();
    let timer: TimerHandle = undefined;
    let onCallerAbort: (() => void) | undefined;
    const stopped = new Promise<never>((_resolve, reject) => {
      timer = clock.setTimer(() => {
        const error = new DeadlineExceededError(this.name, timeoutMs);
        controller.abort(error);
        reject(error);
      }, timeoutMs);
      if (callerSignal !== undefined) {
        onCallerAbort = () => {
          controller.abort(callerSignal.reason);
          reject(callerSignal.reason as Error);
        };
        callerSignal.addEventListener('abort', onCallerAbort, { once: true });
      }
    });
    let call: Promise<T>;
    try {
      call = Promise.resolve(fn({ signal: controller.signal, deadline: new Deadline(startMs + timeoutMs, clock), attempt }));
    } catch (error) {
      call = Promise.reject(error);
    }
    if (bulkhead !== undefined) {
      const release = (): void => { bulkhead.release(); };
      call.then(release, release);
    }
    try {
      const value = await Promise.race([call, stopped]);
      const durationMs = clock.now() - startMs;
      if (breaker !== undefined) breaker.record(permit, false, durationMs);
      observer.attempt?.(this.name, 'success', durationMs);
      return value;
    } catch (error) {
      const durationMs = clock.now() - startMs;
      // The caller's signal aborting because its time ran out (a `Deadline`'s signal, or
      // `AbortSignal.timeout`) is this attempt timing out: the dependency did not answer in
      // time, whichever of the two timers fired first.
      const callerTimeUp = aborted(callerSignal) && error === callerSignal?.reason && isTimeUp(error);
      const timedOut = error instanceof DeadlineExceededError || callerTimeUp;
      if (aborted(callerSignal) && !timedOut) {
        // The caller left; the dependency did nothing wrong.
        breaker?.release(permit);
        throw error;
      }
      breaker?.record(permit, timedOut || this.#isFailure(error), durationMs);
      observer.attempt?.(this.name, timedOut ? 'timeout' : 'failure', durationMs);
      throw callerTimeUp ? new DeadlineExceededError(this.name, durationMs) : error;
    } finally {
      clock.clearTimer(timer);
      if (onCallerAbort !== undefined) callerSignal?.removeEventListener('abort', onCallerAbort);
    }
  }

  /**
   * What a caller whose signal has aborted is failed with, before any call: the policy's
   * timeout when its time ran out (reported as a timed-out attempt of no duration, as for an
   * expired deadline), else the signal's reason.
   */
  #callerGone(callerSignal: AbortSignal | undefined): unknown {
    const reason: unknown = callerSignal?.reason;
    if (!isTimeUp(reason)) return reason;
    this.#observer.attempt?.(this.name, 'timeout', 0);
    return new DeadlineExceededError(this.name, 0);
  }

  /** Queue for a bulkhead slot, at most until the deadline (or until the caller gives up). */
  async #waitForSlot(bulkhead: Bulkhead, deadline: Deadline, callerSignal: AbortSignal | undefined): Promise<void> {
    const remaining = deadline.remainingMs();
    const controller = new AbortController();
    const timer = remaining === Infinity ? undefined
      : this.#clock.setTimer(() => { controller.abort(new DeadlineExceededError(this.name, remaining)); }, remaining);
    const onCallerAbort = (): void => { controller.abort(callerSignal?.reason); };
    callerSignal?.addEventListener('abort', onCallerAbort, { once: true });
    try {
      await bulkhead.acquire(controller.signal);
    } finally {
      if (timer !== undefined) this.#clock.clearTimer(timer);
      callerSignal?.removeEventListener('abort', onCallerAbort);
    }
  }
}

/** Read through a call, so that the check is not narrowed away after an earlier one: the signal may abort while we wait. */
function aborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

/**
 * Whether an abort reason says the caller's time ran out rather than that it left: a
 * `DeadlineExceededError` (a `Deadline`'s signal aborts with one) or a `TimeoutError`
 * (`AbortSignal.timeout`).
 */
function isTimeUp(reason: unknown): boolean {
  return reason instanceof DeadlineExceededError
    || (typeof reason === 'object' && reason !== null && (reason as { name?: unknown }).name === 'TimeoutError');
}

function outcomeOf(error: unknown): CallOutcome {
  if (error instanceof CircuitOpenError) return 'circuit_open';
  if (error instanceof BulkheadFullError) return 'bulkhead_full';
  if (error instanceof DeadlineExceededError) return 'timeout';
  return 'failure';
}

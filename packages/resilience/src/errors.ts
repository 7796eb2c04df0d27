/**
 * The errors a policy throws instead of calling the dependency. They extend cockatiel's, so
 * code that already checks `isBrokenCircuitError(e)` or `instanceof BulkheadRejectedError`
 * keeps working, and each names the dependency so logs and problem bodies can say which.
 */
import { BrokenCircuitError, BulkheadRejectedError, TaskCancelledError } from 'cockatiel';

/** The breaker is open (or half-open with every trial slot taken): the call was not made. */
export class CircuitOpenError extends BrokenCircuitError {
  readonly dependency: string;
  constructor(dependency: string) {
    super(`${dependency}: circuit open, call not attempted`);
    this.name = 'CircuitOpenError';
    this.dependency = dependency;
  }
}

/** Every concurrent slot was busy and the wait queue was full: the call was not made. */
export class BulkheadFullError extends BulkheadRejectedError {
  readonly dependency: string;
  constructor(dependency: string, concurrencyMax: number, queueMax: number) {
    super(concurrencyMax, queueMax);
    this.message = `${dependency}: bulkhead full (${concurrencyMax} running, ${queueMax} queued)`;
    this.name = 'BulkheadFullError';
    this.dependency = dependency;
  }
}

/**
 * The deadline (or the attempt's timeout) passed. The call may still have taken effect
 * downstream: only idempotent calls may be repeated after this.
 */
export class DeadlineExceededError extends TaskCancelledError {
  readonly dependency: string;
  readonly budgetMs: number;
  constructor(dependency: string, budgetMs: number) {
    super(`${dependency}: deadline exceeded after ${Math.round(budgetMs)} ms`);
    this.name = 'DeadlineExceededError';
    this.dependency = dependency;
    this.budgetMs = budgetMs;
  }
}

/** Connection failures after which no connection to the dependency was made. */
const NOT_CONNECTED_CODES: ReadonlySet<string> = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_CONNECT_TIMEOUT']);

/**
 * The connection to the dependency failed before a whole answer came back: refused, reset or
 * closed (before or during the answer), the host name not resolved, the connect timed out, or
 * the answer was not valid HTTP. `cause` is the client's own error (undici's
 * `TypeError: fetch failed` or `terminated`) and `code` the network code found under it. A
 * refused connection did nothing downstream; a reset one may have: only idempotent calls are
 * retried, and only after the codes `isTransientError` lists (not ENOTFOUND, not a bad answer).
 */
export class DependencyConnectionError extends Error {
  readonly dependency: string;
  readonly code: string;
  /**
   * Whether the request may have reached the dependency, and so taken effect there: false only
   * when the code says no connection was made (refused, host not resolved or unreachable, the
   * connect timed out); a connection that broke once made may have carried the request.
   */
  get mayHaveArrived(): boolean {
    return !NOT_CONNECTED_CODES.has(this.code);
  }
  constructor(dependency: string, code: string, cause: unknown) {
    super(`${dependency}: connection failed (${code})`, { cause });
    this.name = 'DependencyConnectionError';
    this.dependency = dependency;
    this.code = code;
  }
}

/**
 * A dependency's answer larger than `httpCall` reads (HTTP_BODY_BYTES_MAX): the dependency
 * misbehaving, not a bug here. Not retried (the same request gets the same answer), but it
 * counts against the breaker, and the runtime answers it 503 dependency-unavailable.
 */
export class DependencyResponseTooLargeError extends Error {
  readonly dependency: string;
  readonly bytesMax: number;
  constructor(dependency: string, message: string, bytesMax: number) {
    super(`${dependency}: ${message}`);
    this.name = 'DependencyResponseTooLargeError';
    this.dependency = dependency;
    this.bytesMax = bytesMax;
  }
}

/** A downstream HTTP answer that counts as the dependency failing (5xx, or 429 when asked). */
export class DependencyHttpError extends Error {
  readonly dependency: string;
  readonly status: number;
  /** 502, 503 and 504 mean the request most likely did nothing; others are not retried. */
  readonly retryable: boolean;
  constructor(dependency: string, status: number) {
    super(`${dependency}: HTTP ${status}`);
    this.name = 'DependencyHttpError';
    this.dependency = dependency;
    this.status = status;
    this.retryable = status === 502 || status === 503 || status === 504 || status === 429;
  }
}

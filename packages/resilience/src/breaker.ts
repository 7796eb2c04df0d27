/**
 * A circuit breaker with the semantics REQUIREMENTS §3 asks for, which cockatiel's breakers
 * lack:
 * - a failure-rate AND a slow-call-rate threshold (cockatiel's `IBreaker` is told only
 *   success or failure, never how long a call took, so it cannot count slow calls);
 * - a sliding window by count or by time, each with a minimum number of calls before the
 *   rates mean anything (cockatiel's `CountBreaker` has no time window; `SamplingBreaker`
 *   has no count window);
 * - an injected clock (cockatiel's policy reads `Date.now()` for the open wait);
 * - half-open trial calls that are bounded and REJECT the surplus (cockatiel parks every
 *   surplus caller on a promise until the trial decides: an unbounded queue).
 * It still implements cockatiel's `IPolicy`, so it composes with cockatiel's `wrap()`.
 *
 * States: closed → open when, over the window, calls ≥ minimumCalls and the failure rate or
 * the slow-call rate reaches its threshold. open → half_open once `openWaitMs` has passed
 * (checked lazily on the next call or state read, so no timer holds the process).
 * half_open admits `halfOpenPermittedCalls` trial calls: it reopens as soon as their
 * failures (or slow calls) reach the threshold share of the trials, and closes, with an
 * empty window, when every trial has finished below it.
 *
 * The hot path (`tryAcquire` + `record`) allocates nothing and does O(1) work for a count
 * window, O(buckets) at worst for a time window.
 */
import { EventEmitter } from 'cockatiel';
import type { IDefaultPolicyContext, IFailureEvent, IPolicy, ISuccessEvent } from 'cockatiel';
import { systemClock, type Clock } from './clock.ts';
import { CircuitOpenError } from './errors.ts';

export type BreakerState = 'closed' | 'open' | 'half_open';

/** Gauge values for the state, in the order operators read severity. */
export const BREAKER_STATE_VALUE: Readonly<Record<BreakerState, number>> = { closed: 0, half_open: 1, open: 2 };

export type SlidingWindow =
  /** The last `calls` outcomes. */
  | { kind: 'count'; calls: number }
  /** Outcomes of the last `durationMs`, kept in `buckets` slices (the window moves a slice at a time). */
  | { kind: 'time'; durationMs: number; buckets: number };

export interface CircuitBreakerOptions {
  /** The dependency's name, as in metrics and errors. */
  name: string;
  window: SlidingWindow;
  /** No decision is made on fewer calls than this in the window. */
  minimumCalls: number;
  /** Share of failed calls, in (0, 1], at which the breaker opens. */
  failureRateThreshold: number;
  /** Share of slow calls, in (0, 1], at which the breaker opens. */
  slowCallRateThreshold: number;
  /** A call taking at least this long is slow (failed or not). `Infinity` turns the slow rule off. */
  slowCallDurationMs: number;
  /** How long the breaker stays open before it lets trial calls through. */
  openWaitMs: number;
  /** Trial calls admitted while half-open; callers beyond them are rejected, never queued. */
  halfOpenPermittedCalls: number;
  clock?: Clock;
}

export interface BreakerTransition {
  name: string;
  from: BreakerState;
  to: BreakerState;
  atMs: number;
  /** The window's figures that caused it (the trials' figures when leaving half-open). */
  calls: number;
  failureRate: number;
  slowCallRate: number;
}

export interface BreakerSnapshot {
  state: BreakerState;
  calls: number;
  failures: number;
  slowCalls: number;
  failureRate: number;
  slowCallRate: number;
}

/** `tryAcquire` returns this when the call must not be made. */
export const NOT_PERMITTED = -1;

// Bounds: a window or a trial count beyond these is a configuration mistake, and the ring
// buffers are allocated up front at this size.
const WINDOW_CALLS_MAX = 100_000;
const WINDOW_BUCKETS_MAX = 1000;
const HALF_OPEN_CALLS_MAX = 1000;
const OPEN_WAIT_MS_MAX = 3_600_000;

const FAILED = 1;
const SLOW = 2;

export class CircuitBreaker implements IPolicy {
  declare readonly _altReturn: never;
  readonly name: string;
  readonly options: Readonly<CircuitBreakerOptions>;

  readonly #clock: Clock;
  readonly #successEmitter = new EventEmitter<ISuccessEvent>();
  readonly #failureEmitter = new EventEmitter<IFailureEvent>();
  readonly #transitionEmitter = new EventEmitter<BreakerTransition>();
  /** `cockatiel` IPolicy events; plus `onStateChange` for every transition. */
  readonly onSuccess = this.#successEmitter.addListener;
  readonly onFailure = this.#failureEmitter.addListener;
  readonly onStateChange = this.#transitionEmitter.addListener;

  #state: BreakerState = 'closed';
  /** Bumped on every transition; a permit from an older generation records nothing. */
  #generation = 0;
  #openedAtMs = 0;

  // Window totals (closed state).
  #calls = 0;
  #failures = 0;
  #slow = 0;
  // Count window: a ring of outcome flags.
  readonly #ring: Uint8Array;
  #ringNext = 0;
  // Time window: per-bucket counts, tagged with the bucket's epoch (time / bucket width).
  readonly #bucketMs: number;
  readonly #bucketEpoch: Float64Array;
  readonly #bucketCalls: Uint32Array;
  readonly #bucketFailures: Uint32Array;
  readonly #bucketSlow: Uint32Array;
  #lastEpoch = -1;

  // Half-open trials.
  #trialsStarted = 0;
  #trialsDone = 0;
  #trialFailures = 0;
  #trialSlow = 0;

  readonly #failureRate: number;
  readonly #slowRate: number;
  readonly #slowMs: number;
  readonly #minCalls: number;
  readonly #openWaitMs: number;
  readonly #trialsMax: number;

  constructor(options: CircuitBreakerOptions) {
    validate(options);
    this.options = Object.freeze({ ...options });
    this.name = options.name;
    this.#clock = options.clock ?? systemClock;
    this.#failureRate = options.failureRateThreshold;
    this.#slowRate = options.slowCallRateThreshold;
    this.#slowMs = options.slowCallDurationMs;
    this.#minCalls = options.minimumCalls;
    this.#openWaitMs = options.openWaitMs;
    this.#trialsMax = options.halfOpenPermittedCalls;
    const w = options.window;
    this.#ring = new Uint8Array(w.kind === 'count' ? w.calls : 0);
    const buckets = w.kind === 'time' ? w.buckets : 0;
    this.#bucketMs = w.kind === 'time' ? w.durationMs / w.buckets : 0;
    this.#bucketEpoch = new Float64Array(buckets).fill(-1);
    this.#bucketCalls = new Uint32Array(buckets);
    this.#bucketFailures = new Uint32Array(buckets);
    this.#bucketSlow = new Uint32Array(buckets);
  }

  /** The state now; an open breaker whose wait has passed turns half-open here. */
  get state(): BreakerState {
    if (this.#state === 'open' && this.#clock.now() - this.#openedAtMs >= this.#openWaitMs) {
      this.#transition('half_open', this.#calls, 0, 0);
    }
    return this.#state;
  }

  snapshot(): BreakerSnapshot {
    const state = this.state;
    if (state === 'half_open') {
      const n = this.#trialsDone;
      return { state, calls: n, failures: this.#trialFailures, slowCalls: this.#trialSlow, failureRate: rate(this.#trialFailures, n), slowCallRate: rate(this.#trialSlow, n) };
    }
    if (this.options.window.kind === 'time') this.#rollTime(this.#clock.now());
    return { state, calls: this.#calls, failures: this.#failures, slowCalls: this.#slow, failureRate: rate(this.#failures, this.#calls), slowCallRate: rate(this.#slow, this.#calls) };
  }

  /**
   * Asks to make one call. Returns a permit (≥ 0) to pass to `record` or `release`, or
   * `NOT_PERMITTED` when the breaker is open or every half-open trial slot is taken.
   */
  tryAcquire(): number {
    switch (this.state) {
      case 'closed':
        return this.#generation;
      case 'open':
        return NOT_PERMITTED;
      case 'half_open':
        if (this.#trialsStarted >= this.#trialsMax) return NOT_PERMITTED;
        this.#trialsStarted += 1;
        return this.#generation;
    }
  }

  /**
   * The outcome of a permitted call. `failed` is the caller's verdict (a 4xx from the
   * dependency is usually not its failure); slowness is judged here from `durationMs`.
   */
  record(permit: number, failed: boolean, durationMs: number): void {
    if (permit !== this.#generation || permit === NOT_PERMITTED) return;
    const flags = (failed ? FAILED : 0) | (durationMs >= this.#slowMs ? SLOW : 0);
    if (this.#state === 'closed') this.#recordClosed(flags);
    else if (this.#state === 'half_open') this.#recordTrial(flags);
  }

  /** A permitted call that was not made, or whose outcome says nothing about the dependency. */
  release(permit: number): void {
    if (permit !== this.#generation || this.#state !== 'half_open') return;
    if (this.#trialsStarted > this.#trialsDone) this.#trialsStarted -= 1;
  }

  /** Back to closed with an empty window (an operator's override). */
  reset(): void {
    if (this.#state !== 'closed') this.#transition('closed', 0, 0, 0);
  }

  /** cockatiel's IPolicy: run `fn` under the breaker; every error counts as a failure. */
  async execute<T>(fn: (context: IDefaultPolicyContext) => PromiseLike<T> | T, signal: AbortSignal = new AbortController().signal): Promise<T> {
    const permit = this.tryAcquire();
    if (permit === NOT_PERMITTED) throw new CircuitOpenError(this.name);
    const startMs = this.#clock.now();
    try {
      const value = await fn({ signal });
      const duration = this.#clock.now() - startMs;
      this.record(permit, false, duration);
      this.#successEmitter.emit({ duration });
      return value;
    } catch (error) {
      const duration = this.#clock.now() - startMs;
      this.record(permit, true, duration);
      this.#failureEmitter.emit({ duration, handled: true, reason: { error } });
      throw error;
    }
  }

  #recordClosed(flags: number): void {
    const failed = flags & FAILED ? 1 : 0;
    const slow = flags & SLOW ? 1 : 0;
    if (this.options.window.kind === 'count') {
      const ring = this.#ring;
      const i = this.#ringNext;
      if (this.#calls === ring.length) {
        const old = ring[i] ?? 0;
        this.#failures -= old & FAILED ? 1 : 0;
        this.#slow -= old & SLOW ? 1 : 0;
      } else {
        this.#calls += 1;
      }
      ring[i] = flags;
      this.#ringNext = i + 1 === ring.length ? 0 : i + 1;
    } else {
      const slot = this.#rollTime(this.#clock.now());
      this.#bucketCalls[slot] = (this.#bucketCalls[slot] ?? 0) + 1;
      this.#bucketFailures[slot] = (this.#bucketFailures[slot] ?? 0) + failed;
      this.#bucketSlow[slot] = (this.#bucketSlow[slot] ?? 0) + slow;
      this.#calls += 1;
    }
    this.#failures += failed;
    this.#slow += slow;
    const calls = this.#calls;
    // Rates compared as rates: 55 of 100 is 0.55 exactly as the threshold 0.55 is (division
    // rounds once, to the threshold's own double), while 0.55 × 100 rounds up to 55.000…01.
    if (calls >= this.#minCalls && (this.#failures / calls >= this.#failureRate || this.#slow / calls >= this.#slowRate)) {
      this.#transition('open', calls, this.#failures / calls, this.#slow / calls);
    }
  }

  /** Drops the buckets that have slid out of the window; returns the current bucket's slot. */
  #rollTime(nowMs: number): number {
    const buckets = this.#bucketEpoch.length;
    const epoch = Math.floor(nowMs / this.#bucketMs);
    if (epoch !== this.#lastEpoch) {
      // Only slots whose epoch is older than the window can hold stale counts; after a long
      // quiet spell that is all of them, so the loop is bounded by the bucket count.
      const from = Math.max(this.#lastEpoch + 1, epoch - buckets + 1);
      for (let e = from; e <= epoch; e += 1) {
        const slot = e % buckets;
        if (this.#bucketEpoch[slot] !== e) {
          this.#calls -= this.#bucketCalls[slot] ?? 0;
          this.#failures -= this.#bucketFailures[slot] ?? 0;
          this.#slow -= this.#bucketSlow[slot] ?? 0;
          this.#bucketCalls[slot] = 0;
          this.#bucketFailures[slot] = 0;
          this.#bucketSlow[slot] = 0;
          this.#bucketEpoch[slot] = e;
        }
      }
      this.#lastEpoch = epoch;
    }
    return epoch % buckets;
  }

  #recordTrial(flags: number): void {
    this.#trialsDone += 1;
    this.#trialFailures += flags & FAILED ? 1 : 0;
    this.#trialSlow += flags & SLOW ? 1 : 0;
    const n = this.#trialsMax;
    // Reopen as soon as the outcome is certain: the rest of the trials cannot bring the
    // share back under the threshold, and each further trial would load a sick dependency.
    if (this.#trialFailures / n >= this.#failureRate || this.#trialSlow / n >= this.#slowRate) {
      this.#transition('open', this.#trialsDone, this.#trialFailures / this.#trialsDone, this.#trialSlow / this.#trialsDone);
    } else if (this.#trialsDone >= n) {
      this.#transition('closed', this.#trialsDone, this.#trialFailures / n, this.#trialSlow / n);
    }
  }

  #transition(to: BreakerState, calls: number, failureRate: number, slowCallRate: number): void {
    const from = this.#state;
    const atMs = this.#clock.now();
    this.#state = to;
    this.#generation = (this.#generation + 1) % 0x7fffffff;
    this.#trialsStarted = 0;
    this.#trialsDone = 0;
    this.#trialFailures = 0;
    this.#trialSlow = 0;
    if (to === 'open') this.#openedAtMs = atMs;
    // Whatever the new state, the old window's figures no longer describe the dependency.
    this.#calls = 0;
    this.#failures = 0;
    this.#slow = 0;
    this.#ring.fill(0);
    this.#ringNext = 0;
    this.#bucketEpoch.fill(-1);
    this.#bucketCalls.fill(0);
    this.#bucketFailures.fill(0);
    this.#bucketSlow.fill(0);
    this.#lastEpoch = -1;
    this.#transitionEmitter.emit({ name: this.name, from, to, atMs, calls, failureRate, slowCallRate });
  }
}

function rate(part: number, whole: number): number {
  return whole === 0 ? 0 : part / whole;
}

function validate(o: CircuitBreakerOptions): void {
  const fail = (what: string): never => {
    throw new RangeError(`circuit breaker ${o.name}: ${what}`);
  };
  const w = o.window;
  if (w.kind === 'count') {
    if (!Number.isInteger(w.calls) || w.calls < 1 || w.calls > WINDOW_CALLS_MAX) fail(`window.calls must be an integer in 1..${WINDOW_CALLS_MAX}`);
    if (o.minimumCalls > w.calls) fail('minimumCalls must not exceed window.calls, or the breaker could never open');
  } else {
    if (!Number.isInteger(w.buckets) || w.buckets < 1 || w.buckets > WINDOW_BUCKETS_MAX) fail(`window.buckets must be an integer in 1..${WINDOW_BUCKETS_MAX}`);
    if (!(w.durationMs >= w.buckets) || !Number.isFinite(w.durationMs)) fail('window.durationMs must be finite and at least 1 ms per bucket');
  }
  if (!Number.isInteger(o.minimumCalls) || o.minimumCalls < 1) fail('minimumCalls must be an integer >= 1');
  if (!(o.failureRateThreshold > 0 && o.failureRateThreshold <= 1)) fail('failureRateThreshold must be in (0, 1]');
  if (!(o.slowCallRateThreshold > 0 && o.slowCallRateThreshold <= 1)) fail('slowCallRateThreshold must be in (0, 1]');
  if (!(o.slowCallDurationMs > 0)) fail('slowCallDurationMs must be > 0 (Infinity turns the slow rule off)');
  if (!(o.openWaitMs >= 0 && o.openWaitMs <= OPEN_WAIT_MS_MAX)) fail(`openWaitMs must be in 0..${OPEN_WAIT_MS_MAX}`);
  if (!Number.isInteger(o.halfOpenPermittedCalls) || o.halfOpenPermittedCalls < 1 || o.halfOpenPermittedCalls > HALF_OPEN_CALLS_MAX) {
    fail(`halfOpenPermittedCalls must be an integer in 1..${HALF_OPEN_CALLS_MAX}`);
  }
}

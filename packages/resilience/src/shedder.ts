/**
 * Priority load shedding driven by queue time (in the spirit of CoDel and of Facebook's
 * adaptive LIFO/CoDel request queues).
 *
 * At most `concurrencyMax` requests run; the rest wait in a bounded priority queue. Each
 * class has its own longest wait (`queueTimeoutMs`): a low-priority request is not worth
 * serving after 100 ms, a transfer is worth waiting a second for. Beyond that, the shedder
 * escalates a degradation level when a standing queue forms, i.e. when even the SHORTEST
 * wait over an interval exceeds `targetQueueMs` (a burst that drains fast leaves the minimum
 * low; overload keeps it high). Each level turns one more class away at the door, lowest
 * first, without queueing it:
 *
 *   level 0: all served · 1: low shed · 2: low and normal shed · 3: only critical served
 *
 * The level falls one step per interval in which the minimum wait was under half the target
 * (hysteresis, so it does not flap). Critical requests are never shed by level: only a full
 * queue that holds nothing of lower priority to evict, or their own queue timeout, refuses
 * them. When the queue is full, an arrival evicts the newest waiter of the lowest class
 * below its own.
 *
 * All timing comes from the injected clock; the level is re-evaluated on each arrival and
 * departure, so no timer runs while the service is idle.
 */
import { systemClock, type Clock, type TimerHandle } from './clock.ts';

export const PRIORITIES = ['critical', 'high', 'normal', 'low'] as const;
export type Priority = (typeof PRIORITIES)[number];

/** Rank: 0 is the most important. */
export const PRIORITY_RANK: Readonly<Record<Priority, number>> = { critical: 0, high: 1, normal: 2, low: 3 };

export const DEGRADATION_LEVEL_MAX = 3;

export type ShedReason = 'level' | 'queue_full' | 'evicted' | 'queue_timeout';

export class ShedError extends Error {
  readonly priority: Priority;
  readonly reason: ShedReason;
  /** How long the client should wait before retrying. */
  readonly retryAfterMs: number;
  constructor(priority: Priority, reason: ShedReason, retryAfterMs: number) {
    super(`shed ${priority} request: ${reason.replaceAll('_', ' ')}`);
    this.name = 'ShedError';
    this.priority = priority;
    this.reason = reason;
    this.retryAfterMs = retryAfterMs;
  }
}

export interface LoadShedderOptions {
  /** Requests running at once. */
  concurrencyMax: number;
  /** Requests waiting, all classes together. */
  queueMax: number;
  /** The longest a request of each class may wait before it is refused. */
  queueTimeoutMs: Readonly<Record<Priority, number>>;
  /** A standing queue longer than this escalates the degradation level. */
  targetQueueMs: number;
  /** How often the level may move, one step at a time. */
  intervalMs: number;
  clock?: Clock;
  /** Called on every level change, for the log and the metric. */
  onLevelChange?: (level: number, previous: number) => void;
  /** Called for every refusal, for the metric. */
  onShed?: (error: ShedError) => void;
}

interface Waiter {
  priority: Priority;
  enqueuedMs: number;
  resolve: () => void;
  reject: (error: ShedError) => void;
  timer: TimerHandle;
  /** Stops listening to the caller's signal once the waiter leaves the queue. */
  detach: () => void;
}

const CONCURRENCY_MAX = 100_000;
const QUEUE_MAX = 1_000_000;
const QUEUE_TIMEOUT_MS_MAX = 60_000;

export class LoadShedder {
  readonly options: Readonly<LoadShedderOptions>;
  readonly #clock: Clock;
  /** One FIFO per class, indexed by rank. */
  readonly #queues: readonly [Waiter[], Waiter[], Waiter[], Waiter[]] = [[], [], [], []];
  #queued = 0;
  #running = 0;
  #level = 0;
  #intervalStartMs: number;
  /** The smallest wait seen in the current interval (Infinity: no request yet). */
  #minWaitMs = Infinity;

  constructor(options: LoadShedderOptions) {
    const { concurrencyMax, queueMax, targetQueueMs, intervalMs, queueTimeoutMs } = options;
    if (!(Number.isInteger(concurrencyMax) && concurrencyMax >= 1 && concurrencyMax <= CONCURRENCY_MAX)) throw new RangeError(`shedder concurrencyMax must be an integer in 1..${CONCURRENCY_MAX}`);
    if (!(Number.isInteger(queueMax) && queueMax >= 0 && queueMax <= QUEUE_MAX)) throw new RangeError(`shedder queueMax must be an integer in 0..${QUEUE_MAX}`);
    for (const p of PRIORITIES) {
      const t = queueTimeoutMs[p];
      if (!(t >= 0 && t <= QUEUE_TIMEOUT_MS_MAX)) throw new RangeError(`shedder queueTimeoutMs.${p} must be in 0..${QUEUE_TIMEOUT_MS_MAX}`);
    }
    if (!(targetQueueMs > 0 && targetQueueMs <= QUEUE_TIMEOUT_MS_MAX)) throw new RangeError('shedder targetQueueMs must be in (0, 60000]');
    if (!(intervalMs > 0 && intervalMs <= QUEUE_TIMEOUT_MS_MAX)) throw new RangeError('shedder intervalMs must be in (0, 60000]');
    this.options = Object.freeze({ ...options });
    this.#clock = options.clock ?? systemClock;
    this.#intervalStartMs = this.#clock.now();
  }

  /** The degradation level, 0..3: how many of the lowest classes are turned away at the door. */
  get level(): number {
    this.#evaluate(this.#clock.now());
    return this.#level;
  }

  get running(): number {
    return this.#running;
  }

  get queued(): number {
    return this.#queued;
  }

  /** The classes currently turned away at the door, lowest first. */
  shedClasses(): Priority[] {
    return PRIORITIES.slice(PRIORITIES.length - this.level).reverse();
  }

  /**
   * Admits a request of `priority`: resolves when it may run (call `release` when it ends),
   * rejects with `ShedError` when it is refused. Returns synchronously-resolved work when a
   * slot is free, so the uncontended path costs one comparison. When `signal` aborts while
   * the request waits (its client went away), the waiter leaves the queue and the promise
   * rejects with the signal's reason: nobody would use the slot it would be given.
   */
  acquire(priority: Priority, signal?: AbortSignal): Promise<void> {
    const now = this.#clock.now();
    this.#evaluate(now);
    const rank = PRIORITY_RANK[priority];
    if (rank === undefined) throw new TypeError(`unknown priority ${JSON.stringify(priority)}`);
    if (rank > 0 && rank >= PRIORITIES.length - this.#level) return Promise.reject(this.#shed(priority, 'level'));
    if (this.#running < this.options.concurrencyMax && this.#queued === 0) {
      this.#running += 1;
      this.#noteWait(0);
      return Promise.resolve();
    }
    if (this.#queued >= this.options.queueMax && !this.#evictBelow(rank)) {
      return Promise.reject(this.#shed(priority, 'queue_full'));
    }
    if (signal?.aborted === true) return Promise.reject(abortReason(signal));
    const queue = this.#queues[rank as 0 | 1 | 2 | 3];
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = { priority, enqueuedMs: now, resolve, reject, timer: undefined, detach: () => {} };
      waiter.timer = this.#clock.setTimer(() => {
        const i = queue.indexOf(waiter);
        if (i < 0) return;
        queue.splice(i, 1);
        this.#queued -= 1;
        waiter.detach();
        // A timeout is a wait at least this long: it counts towards the standing queue.
        this.#noteWait(this.#clock.now() - waiter.enqueuedMs);
        reject(this.#shed(priority, 'queue_timeout'));
      }, this.options.queueTimeoutMs[priority]);
      if (signal !== undefined) {
        const onAbort = (): void => {
          const i = queue.indexOf(waiter);
          if (i < 0) return;
          queue.splice(i, 1);
          this.#queued -= 1;
          this.#clock.clearTimer(waiter.timer);
          // Not a wait measurement: the client left, the queue did not make it wait that long.
          reject(abortReason(signal));
        };
        signal.addEventListener('abort', onAbort, { once: true });
        waiter.detach = () => { signal.removeEventListener('abort', onAbort); };
      }
      queue.push(waiter);
      this.#queued += 1;
    });
  }

  /** Ends a request that `acquire` admitted; the most important waiter takes its slot. */
  release(): void {
    if (this.#running <= 0) throw new Error('invariant: shedder released more often than acquired');
    const now = this.#clock.now();
    this.#evaluate(now);
    for (const queue of this.#queues) {
      const next = queue.shift();
      if (next === undefined) continue;
      this.#queued -= 1;
      this.#clock.clearTimer(next.timer);
      next.detach();
      this.#noteWait(now - next.enqueuedMs);
      // The slot passes to the waiter: `running` is unchanged.
      next.resolve();
      return;
    }
    this.#running -= 1;
  }

  #evictBelow(rank: number): boolean {
    for (let r = PRIORITIES.length - 1; r > rank; r -= 1) {
      const victim = this.#queues[r as 0 | 1 | 2 | 3].pop();
      if (victim === undefined) continue;
      this.#queued -= 1;
      this.#clock.clearTimer(victim.timer);
      victim.detach();
      victim.reject(this.#shed(victim.priority, 'evicted'));
      return true;
    }
    return false;
  }

  #noteWait(waitMs: number): void {
    if (waitMs < this.#minWaitMs) this.#minWaitMs = waitMs;
  }

  /**
   * Moves the level at interval boundaries: up on a standing queue, down when it has gone.
   * A standing queue is shown either by the shortest wait of the interval exceeding the
   * target, or by a request still waiting that has waited longer than a whole interval and
   * the target (every slot held by slow requests, so nothing left the queue to be measured).
   */
  #evaluate(now: number): void {
    const { intervalMs, targetQueueMs } = this.options;
    const elapsed = now - this.#intervalStartMs;
    if (elapsed < intervalMs) return;
    const previous = this.#level;
    const minWaitMs = this.#minWaitMs;
    const oldestWaitMs = this.#oldestWaitMs(now);
    const standing = (minWaitMs !== Infinity && minWaitMs > targetQueueMs)
      || (oldestWaitMs !== undefined && oldestWaitMs >= intervalMs && oldestWaitMs > targetQueueMs);
    if (standing) {
      this.#level = Math.min(DEGRADATION_LEVEL_MAX, this.#level + 1);
    } else if (minWaitMs === Infinity ? oldestWaitMs === undefined : minWaitMs < targetQueueMs / 2) {
      // Intervals that passed with no request at all count as calm ones too.
      const calmIntervals = minWaitMs === Infinity ? Math.floor(elapsed / intervalMs) : 1;
      this.#level = Math.max(0, this.#level - calmIntervals);
    }
    this.#intervalStartMs = now;
    this.#minWaitMs = Infinity;
    if (this.#level !== previous) this.options.onLevelChange?.(this.#level, previous);
  }

  #oldestWaitMs(now: number): number | undefined {
    let oldest: number | undefined;
    for (const queue of this.#queues) {
      const head = queue[0];
      if (head !== undefined && (oldest === undefined || head.enqueuedMs < oldest)) oldest = head.enqueuedMs;
    }
    return oldest === undefined ? undefined : now - oldest;
  }

  #shed(priority: Priority, reason: ShedReason): ShedError {
    // Come back after about one interval: by then the level may have dropped.
    const error = new ShedError(priority, reason, Math.max(1000, this.options.intervalMs));
    this.options.onShed?.(error);
    return error;
  }
}

/** The signal's reason when it is an Error (AbortSignal's own default is a DOMException, which is one). */
function abortReason(signal: AbortSignal): Error {
  return signal.reason instanceof Error ? signal.reason : new Error('aborted', { cause: signal.reason });
}

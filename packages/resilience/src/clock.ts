/**
 * Time as a dependency. Every policy reads the time and sets timers only through a `Clock`,
 * so tests drive breakers, retries, deadlines and shedders with a `ManualClock` and get the
 * same answer on every run, on any machine, however loaded.
 */

/** An opaque timer handle; only the clock that made it may clear it. */
export type TimerHandle = unknown;

export interface Clock {
  /** Monotonic milliseconds (may be fractional). Never goes backwards; not wall time. */
  now(): number;
  setTimer(callback: () => void, delayMs: number): TimerHandle;
  clearTimer(handle: TimerHandle): void;
}

/**
 * `performance.now()` rather than `Date.now()`: an NTP step must not open a breaker or
 * expire every deadline at once.
 */
export const systemClock: Clock = {
  now: () => performance.now(),
  setTimer: (callback, delayMs) => setTimeout(callback, delayMs),
  clearTimer: (handle) => {
    clearTimeout(handle as NodeJS.Timeout);
  },
};

/** Resolves after `delayMs` on `clock`; rejects with the signal's reason if it aborts first. */
export function sleep(clock: Clock, delayMs: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted === true) return Promise.reject(signal.reason as Error);
  return new Promise((resolve, reject) => {
    const onAbort = (): void => {
      clock.clearTimer(handle);
      reject(signal?.reason as Error);
    };
    const handle = clock.setTimer(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, delayMs);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

interface ManualTimer {
  id: number;
  dueMs: number;
  callback: () => void;
}

/** Lets every pending promise continuation run (a macrotask turn drains all microtasks). */
const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/**
 * A clock that moves only when told to. `advance` fires due timers in order of due time (ties
 * in order of creation), letting promise continuations run after each, so code that awaits a
 * timer and then sets another behaves exactly as it would in real time.
 */
export class ManualClock implements Clock {
  #nowMs: number;
  #nextId = 1;
  #timers: ManualTimer[] = [];

  constructor(startMs = 1_000_000) {
    this.#nowMs = startMs;
  }

  now(): number {
    return this.#nowMs;
  }

  setTimer(callback: () => void, delayMs: number): TimerHandle {
    const timer = { id: this.#nextId++, dueMs: this.#nowMs + Math.max(0, delayMs), callback };
    this.#timers.push(timer);
    return timer.id;
  }

  clearTimer(handle: TimerHandle): void {
    this.#timers = this.#timers.filter((t) => t.id !== handle);
  }

  /** Timers not yet fired. */
  get pendingTimers(): number {
    return this.#timers.length;
  }

  /** Moves time forward by `ms`, firing every timer that falls due on the way. */
  async advance(ms: number): Promise<void> {
    if (!(ms >= 0)) throw new RangeError(`advance needs ms >= 0, got ${ms}`);
    const targetMs = this.#nowMs + ms;
    await settle();
    for (;;) {
      let next: ManualTimer | undefined;
      for (const t of this.#timers) {
        if (t.dueMs <= targetMs && (next === undefined || t.dueMs < next.dueMs || (t.dueMs === next.dueMs && t.id < next.id))) next = t;
      }
      if (next === undefined) break;
      const due = next;
      this.#timers = this.#timers.filter((t) => t !== due);
      this.#nowMs = Math.max(this.#nowMs, due.dueMs);
      due.callback();
      await settle();
    }
    this.#nowMs = targetMs;
    await settle();
  }

  /** Moves time without firing anything or yielding: for synchronous state-machine tests. */
  set(ms: number): void {
    if (ms < this.#nowMs) throw new RangeError('a clock never goes backwards');
    this.#nowMs = ms;
  }
}

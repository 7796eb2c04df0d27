/**
 * A bulkhead: at most `concurrencyMax` calls run at once, at most `queueMax` wait, and the
 * rest are rejected at once. It isolates one dependency's slowness: when it hangs, only its
 * slots fill, and callers of other dependencies are untouched.
 *
 * Not cockatiel's `BulkheadPolicy`, because a waiter there whose signal aborts keeps its queue
 * slot until a running call finishes; under a deadline storm the queue fills with the dead
 * and live callers are turned away. Here an aborted waiter leaves the queue at once.
 */

export interface BulkheadOptions {
  concurrencyMax: number;
  queueMax: number;
}

interface Waiter {
  resolve: () => void;
  reject: (error: unknown) => void;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
}

const CONCURRENCY_MAX = 100_000;
const QUEUE_MAX = 1_000_000;

export class BulkheadRejection extends Error {
  constructor() {
    super('bulkhead full');
    this.name = 'BulkheadRejection';
  }
}

export class Bulkhead {
  readonly concurrencyMax: number;
  readonly queueMax: number;
  #running = 0;
  // A plain array used as a FIFO: queueMax bounds it, and shift() on a few thousand
  // entries is cheaper than a linked list's allocations.
  readonly #queue: Waiter[] = [];

  constructor(options: BulkheadOptions) {
    if (!(Number.isInteger(options.concurrencyMax) && options.concurrencyMax >= 1 && options.concurrencyMax <= CONCURRENCY_MAX)) {
      throw new RangeError(`bulkhead concurrencyMax must be an integer in 1..${CONCURRENCY_MAX}`);
    }
    if (!(Number.isInteger(options.queueMax) && options.queueMax >= 0 && options.queueMax <= QUEUE_MAX)) {
      throw new RangeError(`bulkhead queueMax must be an integer in 0..${QUEUE_MAX}`);
    }
    this.concurrencyMax = options.concurrencyMax;
    this.queueMax = options.queueMax;
  }

  get running(): number {
    return this.#running;
  }

  get queued(): number {
    return this.#queue.length;
  }

  /** Takes a slot without waiting; false when none is free (or callers are already waiting). */
  tryAcquire(): boolean {
    if (this.#running < this.concurrencyMax && this.#queue.length === 0) {
      this.#running += 1;
      return true;
    }
    return false;
  }

  /**
   * Takes a slot, waiting in the queue if need be. Rejects with `BulkheadRejection` when the
   * queue is full, and with the signal's reason if it aborts while waiting.
   */
  acquire(signal?: AbortSignal): Promise<void> {
    if (this.tryAcquire()) return Promise.resolve();
    if (signal?.aborted === true) return Promise.reject(signal.reason as Error);
    if (this.#queue.length >= this.queueMax) return Promise.reject(new BulkheadRejection());
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, signal, onAbort: undefined };
      if (signal !== undefined) {
        waiter.onAbort = () => {
          const i = this.#queue.indexOf(waiter);
          if (i >= 0) this.#queue.splice(i, 1);
          reject(signal.reason as Error);
        };
        signal.addEventListener('abort', waiter.onAbort, { once: true });
      }
      this.#queue.push(waiter);
    });
  }

  /** Gives a slot back; the oldest waiter, if any, takes it over. */
  release(): void {
    const next = this.#queue.shift();
    if (next === undefined) {
      if (this.#running <= 0) throw new Error('invariant: bulkhead released more often than acquired');
      this.#running -= 1;
      return;
    }
    if (next.onAbort !== undefined) next.signal?.removeEventListener('abort', next.onAbort);
    // The slot passes straight to the waiter: `running` is unchanged.
    next.resolve();
  }
}

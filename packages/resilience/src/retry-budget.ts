/**
 * A retry budget: over a sliding window, retries may not exceed `ratio` of first attempts
 * (plus a small floor, so a quiet service can still retry its one failure). Per-call retry
 * limits alone multiply load during an outage (3 attempts per call = 3× the traffic on a
 * struggling dependency); a budget caps the extra load at `ratio` however many callers fail.
 */
import { systemClock, type Clock } from './clock.ts';

export interface RetryBudgetOptions {
  /** Retries allowed per first attempt over the window, e.g. 0.2 for "retries ≤ 20% of calls". */
  ratio: number;
  /** Retries always allowed per window, whatever the traffic. */
  retriesMin: number;
  windowMs: number;
  /** The window slides a bucket at a time. */
  buckets?: number;
  clock?: Clock;
}

const BUCKETS_DEFAULT = 10;
const BUCKETS_MAX = 1000;

export class RetryBudget {
  readonly #ratio: number;
  readonly #retriesMin: number;
  readonly #bucketMs: number;
  readonly #clock: Clock;
  readonly #epochs: Float64Array;
  readonly #calls: Float64Array;
  readonly #retries: Float64Array;
  #totalCalls = 0;
  #totalRetries = 0;
  #lastEpoch = -1;

  constructor(options: RetryBudgetOptions) {
    const buckets = options.buckets ?? BUCKETS_DEFAULT;
    if (!(options.ratio >= 0 && options.ratio <= 10)) throw new RangeError('retry budget ratio must be in 0..10');
    if (!(Number.isInteger(options.retriesMin) && options.retriesMin >= 0)) throw new RangeError('retry budget retriesMin must be an integer >= 0');
    if (!(Number.isInteger(buckets) && buckets >= 1 && buckets <= BUCKETS_MAX)) throw new RangeError(`retry budget buckets must be in 1..${BUCKETS_MAX}`);
    if (!(options.windowMs >= buckets && Number.isFinite(options.windowMs))) throw new RangeError('retry budget windowMs must be finite and >= buckets');
    this.#ratio = options.ratio;
    this.#retriesMin = options.retriesMin;
    this.#bucketMs = options.windowMs / buckets;
    this.#clock = options.clock ?? systemClock;
    this.#epochs = new Float64Array(buckets).fill(-1);
    this.#calls = new Float64Array(buckets);
    this.#retries = new Float64Array(buckets);
  }

  /** Counts a first attempt. */
  recordCall(): void {
    const slot = this.#roll();
    this.#calls[slot] = (this.#calls[slot] ?? 0) + 1;
    this.#totalCalls += 1;
  }

  /** Takes one retry from the budget; false (and nothing taken) when it is spent. */
  tryRetry(): boolean {
    const slot = this.#roll();
    if (this.#totalRetries + 1 > this.#ratio * this.#totalCalls + this.#retriesMin) return false;
    this.#retries[slot] = (this.#retries[slot] ?? 0) + 1;
    this.#totalRetries += 1;
    return true;
  }

  /** Calls and retries in the window now. */
  get usage(): { calls: number; retries: number } {
    this.#roll();
    return { calls: this.#totalCalls, retries: this.#totalRetries };
  }

  #roll(): number {
    const buckets = this.#epochs.length;
    const epoch = Math.floor(this.#clock.now() / this.#bucketMs);
    if (epoch !== this.#lastEpoch) {
      for (let e = Math.max(this.#lastEpoch + 1, epoch - buckets + 1); e <= epoch; e += 1) {
        const slot = e % buckets;
        if (this.#epochs[slot] !== e) {
          this.#totalCalls -= this.#calls[slot] ?? 0;
          this.#totalRetries -= this.#retries[slot] ?? 0;
          this.#calls[slot] = 0;
          this.#retries[slot] = 0;
          this.#epochs[slot] = e;
        }
      }
      this.#lastEpoch = epoch;
    }
    return epoch % buckets;
  }
}

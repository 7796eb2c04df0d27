/**
 * Deadlines that cross process boundaries.
 *
 * On the wire a deadline travels as the REMAINING budget in whole milliseconds, in the
 * `x-deadline-remaining-ms` header, not as an absolute time: absolute times need the hosts'
 * clocks to agree, and a skew of tens of milliseconds (common between containers) would
 * silently shorten or stretch every budget. gRPC sends `grpc-timeout` relative for the same
 * reason. The cost is that time on the wire is not subtracted; it is a few milliseconds, and
 * the caller's own timer still enforces the true deadline.
 *
 * Inside a process a deadline is an absolute point on a monotonic `Clock`.
 */
import { systemClock, type Clock, type TimerHandle } from './clock.ts';
import { DeadlineExceededError } from './errors.ts';

export const DEADLINE_HEADER = 'x-deadline-remaining-ms';

/** An incoming budget above this is clamped to it: a caller cannot pin our resources for hours. */
export const DEADLINE_BUDGET_MS_MAX = 300_000;

export class Deadline {
  /** The deadline as a point on `clock` (ms). */
  readonly atMs: number;
  readonly clock: Clock;
  #controller: AbortController | undefined;
  #timer: TimerHandle = undefined;

  constructor(atMs: number, clock: Clock = systemClock) {
    if (Number.isNaN(atMs)) throw new RangeError('deadline must be a number');
    this.atMs = atMs;
    this.clock = clock;
  }

  /** A deadline `budgetMs` from now. */
  static after(budgetMs: number, clock: Clock = systemClock): Deadline {
    return new Deadline(clock.now() + budgetMs, clock);
  }

  /** No deadline at all (only for callers that bound the work some other way). */
  static never(clock: Clock = systemClock): Deadline {
    return new Deadline(Infinity, clock);
  }

  /**
   * The deadline an incoming header names, or undefined when it is absent or malformed (the
   * service's own default applies then). Budgets are clamped to 0..DEADLINE_BUDGET_MS_MAX.
   */
  static fromHeader(value: string | string[] | undefined, clock: Clock = systemClock): Deadline | undefined {
    if (typeof value !== 'string' || !/^-?\d{1,15}$/.test(value)) return undefined;
    const budgetMs = Math.min(Math.max(Number(value), 0), DEADLINE_BUDGET_MS_MAX);
    return Deadline.after(budgetMs, clock);
  }

  remainingMs(): number {
    return Math.max(0, this.atMs - this.clock.now());
  }

  expired(): boolean {
    return this.clock.now() >= this.atMs;
  }

  /** The header value for a downstream call made now: the whole milliseconds left. */
  toHeader(): string {
    const remaining = this.remainingMs();
    return String(remaining === Infinity ? DEADLINE_BUDGET_MS_MAX : Math.floor(remaining));
  }

  /** The earlier of this deadline and one `budgetMs` from now. */
  within(budgetMs: number): Deadline {
    const atMs = this.clock.now() + budgetMs;
    return atMs < this.atMs ? new Deadline(atMs, this.clock) : this;
  }

  /**
   * Aborts when the deadline passes. Made on first use (most calls finish without anyone
   * listening); `dispose` clears its timer.
   */
  get signal(): AbortSignal {
    if (this.#controller === undefined) {
      const controller = new AbortController();
      this.#controller = controller;
      const remaining = this.remainingMs();
      // A DeadlineExceededError, so a policy given this signal reports its deadline passing as
      // a timeout, and work it aborts fails as the runtime answers with 504, not as a bug.
      const reason = (): Error => new DeadlineExceededError('deadline', remaining);
      if (remaining <= 0) controller.abort(reason());
      else if (remaining !== Infinity) this.#timer = this.clock.setTimer(() => { controller.abort(reason()); }, remaining);
    }
    return this.#controller.signal;
  }

  dispose(): void {
    if (this.#timer !== undefined) this.clock.clearTimer(this.#timer);
    this.#timer = undefined;
  }
}

/**
 * Authentication failures, limited per client address.
 *
 * Every request refused for want of valid credentials is audited: its access decision, and on
 * an audited route its command record. That is what PCI DSS 10.2.1.4 asks (invalid access
 * attempts), and it also means that anyone who can reach the service, with no credentials at
 * all, makes it write two records a request to a log kept for a year, and makes the sequencer
 * integrate them. At a few thousand requests a second that is gigabytes of trail an hour, and
 * the sequencer's CPU taken from the requests that pay.
 *
 * So failures are counted per client address (`addressKey`: an IPv6 client by its /64) in a
 * token bucket: up to `burst` at once and `ratePerSecond` after that are refused as usual, 401
 * with their records. Beyond that the address's failures are answered 429 with `Retry-After`,
 * and recorded together: one record per address and summary interval, with how many were
 * refused, from when to when (`Authorizer.recordThrottled`). A request whose token verifies is
 * never counted and never refused here, so a client behind the same address as a guesser keeps
 * working. Nothing is refused unrecorded: an address evicted from the table (at most
 * `ADDRESSES_MAX`) hands its count to the next summary.
 *
 * The buckets are this instance's, in memory, not Redis's: what they protect is this
 * instance's trail and CPU, they must work while Redis is down, and they cost nothing unless
 * credentials fail. N instances let N times the limit through, which is still bounded.
 */
import { Type } from 'typebox';
import { checkRateLimit, type RateLimit } from '@ledgerline/service-runtime';

/** Failures allowed per address: the sustained rate and the burst on top of it. */
export type AuthFailureLimit = RateLimit;

export const AUTH_FAILURE_LIMIT_DEFAULT: AuthFailureLimit = { ratePerSecond: 10, burst: 100 };
/**
 * The environment variables, for services to spread into their config schema.
 * AUTH_FAILURE_RATE_PER_SECOND 0 switches the limit off (every failure a 401 with its records).
 */
export const authFailureConfigSchema = Type.Object({
  AUTH_FAILURE_RATE_PER_SECOND: Type.Number({ minimum: 0, maximum: 1_000_000, default: AUTH_FAILURE_LIMIT_DEFAULT.ratePerSecond }),
  AUTH_FAILURE_BURST: Type.Integer({ minimum: 1, maximum: 1_000_000, default: AUTH_FAILURE_LIMIT_DEFAULT.burst }),
});

/** The limit a service's configuration asks for; false when AUTH_FAILURE_RATE_PER_SECOND is 0. */
export function authFailureLimitFromConfig(config: { AUTH_FAILURE_RATE_PER_SECOND: number; AUTH_FAILURE_BURST: number }): AuthFailureLimit | false {
  return config.AUTH_FAILURE_RATE_PER_SECOND === 0 ? false : { ratePerSecond: config.AUTH_FAILURE_RATE_PER_SECOND, burst: config.AUTH_FAILURE_BURST };
}

/** Addresses tracked at once; past it the oldest is forgotten (its count kept for the summary). */
export const ADDRESSES_MAX = 100_000;

/** One address's refusals since the last summary. */
export interface ThrottleSummary {
  address: string;
  refused: number;
  from: Date;
  to: Date;
}

interface Bucket {
  tokens: number;
  at: number;
  refused: number;
  firstRefusedAt: number;
  lastRefusedAt: number;
}

export class AuthFailureThrottle {
  readonly limit: AuthFailureLimit;
  readonly #clock: () => number;
  readonly #buckets = new Map<string, Bucket>();
  /** Counts of addresses forgotten before their summary. */
  #evicted: ThrottleSummary[] = [];

  constructor(limit: AuthFailureLimit = AUTH_FAILURE_LIMIT_DEFAULT, clock: () => number = Date.now) {
    checkRateLimit(limit, 'authentication failure limit');
    this.limit = limit;
    this.#clock = clock;
  }

  /**
   * One failure of `address`: true when it is within the limit (answer 401 and record it as
   * usual), false when the address is over it (answer 429; the failure is counted for the
   * summary instead).
   */
  admit(address: string): boolean {
    const now = this.#clock();
    const b = this.#refilled(address, now);
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return true;
    }
    if (b.refused === 0) b.firstRefusedAt = now;
    b.refused += 1;
    b.lastRefusedAt = now;
    return false;
  }

  /** How long until `address` may fail once more. */
  retryAfterMs(address: string): number {
    const b = this.#buckets.get(address);
    return b === undefined || b.tokens >= 1 ? 0 : Math.ceil(((1 - b.tokens) * 1000) / this.limit.ratePerSecond);
  }

  /**
   * Every address refused since the last call, with how many and when; their counts start
   * again. Addresses whose bucket has filled up again and that were not refused are forgotten.
   */
  drain(): ThrottleSummary[] {
    const now = this.#clock();
    const out = this.#evicted;
    this.#evicted = [];
    for (const [address, b] of this.#buckets) {
      if (b.refused > 0) {
        out.push(summaryOf(address, b));
        b.refused = 0;
      } else if (b.tokens + ((now - b.at) * this.limit.ratePerSecond) / 1000 >= this.limit.burst) {
        this.#buckets.delete(address);
      }
    }
    return out;
  }

  #refilled(address: string, now: number): Bucket {
    let b = this.#buckets.get(address);
    if (b === undefined) {
      if (this.#buckets.size >= ADDRESSES_MAX) this.#evictOldest();
      b = { tokens: this.limit.burst, at: now, refused: 0, firstRefusedAt: 0, lastRefusedAt: 0 };
      this.#buckets.set(address, b);
      return b;
    }
    b.tokens = Math.min(this.limit.burst, b.tokens + ((now - b.at) * this.limit.ratePerSecond) / 1000);
    b.at = Math.max(b.at, now);
    return b;
  }

  #evictOldest(): void {
    const oldest = this.#buckets.entries().next().value;
    if (oldest === undefined) return;
    const [address, b] = oldest;
    this.#buckets.delete(address);
    if (b.refused > 0) this.#evicted.push(summaryOf(address, b));
  }
}

function summaryOf(address: string, b: Bucket): ThrottleSummary {
  return { address, refused: b.refused, from: new Date(b.firstRefusedAt), to: new Date(b.lastRefusedAt) };
}

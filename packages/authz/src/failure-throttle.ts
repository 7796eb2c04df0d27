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
import { Type, type Static } from 'typebox';
import { checkRateLimit, type RateLimit } from '@ledgerline/service-runtime';

/** Failures allowed per address: the sustained rate and the burst on top of it. */
export type AuthFailureLimit = RateLimit;

export const AUTH_FAILURE_LIMIT_DEFAULT: AuthFailureLimit = { ratePerSecond: 10, burst: 100 };
/**
 * Failures recorded one by one across every address of an instance: many addresses, each
 * within its own limit, still make a bounded trail. Past it every address's failures get 429,
 * recorded in the summaries.
 */
export const AUTH_FAILURE_TOTAL_LIMIT_DEFAULT: AuthFailureLimit = { ratePerSecond: 200, burst: 2000 };
/** Addresses named in one interval's summary records; the rest are counted in one more record. */
export const SUMMARY_ADDRESSES_MAX = 100;
/** The summary record's address for the addresses past SUMMARY_ADDRESSES_MAX. */
export const OTHER_ADDRESSES = 'other-addresses';
/**
 * The environment variables, for services to spread into their config schema.
 * AUTH_FAILURE_RATE_PER_SECOND 0 switches the limit off (every failure a 401 with its records).
 */
export const authFailureConfigSchema = Type.Object({
  AUTH_FAILURE_RATE_PER_SECOND: Type.Number({ minimum: 0, maximum: 1_000_000, default: AUTH_FAILURE_LIMIT_DEFAULT.ratePerSecond }),
  AUTH_FAILURE_BURST: Type.Integer({ minimum: 1, maximum: 1_000_000, default: AUTH_FAILURE_LIMIT_DEFAULT.burst }),
  AUTH_FAILURE_TOTAL_RATE_PER_SECOND: Type.Number({ exclusiveMinimum: 0, maximum: 1_000_000, default: AUTH_FAILURE_TOTAL_LIMIT_DEFAULT.ratePerSecond }),
  AUTH_FAILURE_TOTAL_BURST: Type.Integer({ minimum: 1, maximum: 1_000_000, default: AUTH_FAILURE_TOTAL_LIMIT_DEFAULT.burst }),
});

/** The limits a service's configuration asks for (`installHttpAuth`'s options); the per-address one false when AUTH_FAILURE_RATE_PER_SECOND is 0. */
export function authFailureOptionsFromConfig(config: Static<typeof authFailureConfigSchema>): { failureLimit: AuthFailureLimit | false; failureTotalLimit: AuthFailureLimit } {
  return {
    failureLimit: config.AUTH_FAILURE_RATE_PER_SECOND === 0 ? false : { ratePerSecond: config.AUTH_FAILURE_RATE_PER_SECOND, burst: config.AUTH_FAILURE_BURST },
    failureTotalLimit: { ratePerSecond: config.AUTH_FAILURE_TOTAL_RATE_PER_SECOND, burst: config.AUTH_FAILURE_TOTAL_BURST },
  };
}

/** Addresses tracked at once; past it the oldest is forgotten (its count kept for the summary). */
export const ADDRESSES_MAX = 100_000;

/** One address's refusals since the last summary (or, as OTHER_ADDRESSES, those of `addresses` addresses). */
export interface ThrottleSummary {
  address: string;
  refused: number;
  from: Date;
  to: Date;
  /** How many addresses the summary counts: 1, or more for OTHER_ADDRESSES. */
  addresses: number;
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
  readonly totalLimit: AuthFailureLimit;
  readonly #clock: () => number;
  readonly #buckets = new Map<string, Bucket>();
  readonly #total: Bucket;
  /** The refusals of addresses forgotten before their summary, counted together: a flood from many addresses evicts one a request. */
  #evicted: ThrottleSummary | null = null;
  #refusedTotal = 0;

  /** `clock`: milliseconds since the epoch (the summaries' times); a step back refills nothing until it is made up. */
  constructor(limit: AuthFailureLimit = AUTH_FAILURE_LIMIT_DEFAULT, clock: () => number = Date.now, totalLimit: AuthFailureLimit = AUTH_FAILURE_TOTAL_LIMIT_DEFAULT) {
    checkRateLimit(limit, 'authentication failure limit');
    checkRateLimit(totalLimit, 'authentication failure total limit');
    this.limit = limit;
    this.totalLimit = totalLimit;
    this.#clock = clock;
    this.#total = newBucket(totalLimit, clock());
  }

  /**
   * One failure of `address`: true when it is within the address's limit and the instance's
   * total (answer 401 and record it as usual), false otherwise (answer 429; the failure is
   * counted for the address's summary instead).
   */
  admit(address: string): boolean {
    const now = this.#clock();
    const b = this.#refilled(address, now);
    refill(this.#total, this.totalLimit, now);
    if (b.tokens >= 1 && this.#total.tokens >= 1) {
      b.tokens -= 1;
      this.#total.tokens -= 1;
      return true;
    }
    if (b.refused === 0) b.firstRefusedAt = now;
    b.refused += 1;
    b.lastRefusedAt = Math.max(now, b.firstRefusedAt);
    this.#refusedTotal += 1;
    return false;
  }

  /** Failures refused (429) since this throttle was made, for a metric. */
  get refusedTotal(): number {
    return this.#refusedTotal;
  }

  /** How long until `address` may fail once more (its own limit and the total's). */
  retryAfterMs(address: string): number {
    const wait = (b: Bucket | undefined, limit: AuthFailureLimit): number => (b === undefined || b.tokens >= 1 ? 0 : Math.ceil(((1 - b.tokens) * 1000) / limit.ratePerSecond));
    return Math.max(wait(this.#buckets.get(address), this.limit), wait(this.#total, this.totalLimit));
  }

  /**
   * Every address refused since the last call, with how many and when; their counts start
   * again. At most SUMMARY_ADDRESSES_MAX addresses, those refused most, are named; the rest,
   * and the addresses evicted meanwhile, come as one OTHER_ADDRESSES summary, so an interval's
   * records are bounded however many addresses a flood comes from. Addresses whose bucket has filled up again and that were not
   * refused are forgotten.
   */
  drain(): ThrottleSummary[] {
    const now = this.#clock();
    const all: ThrottleSummary[] = [];
    const evicted = this.#evicted;
    this.#evicted = null;
    for (const [address, b] of this.#buckets) {
      if (b.refused > 0) {
        all.push(summaryOf(address, b));
        b.refused = 0;
      } else if (b.tokens + (Math.max(0, now - b.at) * this.limit.ratePerSecond) / 1000 >= this.limit.burst) {
        this.#buckets.delete(address);
      }
    }
    if (all.length <= SUMMARY_ADDRESSES_MAX && evicted === null) return all;
    all.sort((x, y) => y.refused - x.refused);
    const rest = all.slice(SUMMARY_ADDRESSES_MAX);
    const others = rest.reduce<ThrottleSummary | null>(merged, evicted);
    return others === null ? all : [...all.slice(0, SUMMARY_ADDRESSES_MAX), others];
  }

  #refilled(address: string, now: number): Bucket {
    let b = this.#buckets.get(address);
    if (b === undefined) {
      if (this.#buckets.size >= ADDRESSES_MAX) this.#evictOldest();
      b = newBucket(this.limit, now);
      this.#buckets.set(address, b);
      return b;
    }
    refill(b, this.limit, now);
    return b;
  }

  #evictOldest(): void {
    const oldest = this.#buckets.entries().next().value;
    if (oldest === undefined) return;
    const [address, b] = oldest;
    this.#buckets.delete(address);
    if (b.refused > 0) this.#evicted = merged(this.#evicted, summaryOf(address, b));
  }
}

function newBucket(limit: AuthFailureLimit, now: number): Bucket {
  return { tokens: limit.burst, at: now, refused: 0, firstRefusedAt: 0, lastRefusedAt: 0 };
}

/** Adds what the time since the bucket's last refill earned; a clock that stepped back earns nothing until it has made the step up. */
function refill(b: Bucket, limit: AuthFailureLimit, now: number): void {
  b.tokens = Math.min(limit.burst, b.tokens + (Math.max(0, now - b.at) * limit.ratePerSecond) / 1000);
  b.at = Math.max(b.at, now);
}

/** Two summaries as one OTHER_ADDRESSES summary. */
function merged(into: ThrottleSummary | null, x: ThrottleSummary): ThrottleSummary {
  if (into === null) return { ...x, address: OTHER_ADDRESSES };
  return {
    address: OTHER_ADDRESSES,
    refused: into.refused + x.refused,
    from: x.from < into.from ? x.from : into.from,
    to: x.to > into.to ? x.to : into.to,
    addresses: into.addresses + x.addresses,
  };
}

function summaryOf(address: string, b: Bucket): ThrottleSummary {
  return { address, refused: b.refused, from: new Date(b.firstRefusedAt), to: new Date(b.lastRefusedAt), addresses: 1 };
}

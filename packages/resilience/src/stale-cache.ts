/**
 * A bounded cache of last-known-good answers, for the fallback of reads: when the dependency
 * fails (or its breaker is open), answer with what it said last, marked stale, instead of
 * failing. Only for reads where an old answer is safe to show and is shown as old (a
 * balance marked "as of", an exchange rate with its age); never for decisions that move money.
 *
 * Bounded by `entriesMax` (least recently written entries go first) and by `staleMaxMs`
 * (older answers are worse than none).
 */
import { systemClock, type Clock } from './clock.ts';

export interface CacheRead<V> {
  value: V;
  /** True when the dependency failed and this is an older answer. */
  stale: boolean;
  /** How old the answer is (0 when fresh from the dependency). */
  ageMs: number;
}

export interface StaleCacheOptions {
  entriesMax: number;
  /** Older answers are never served. */
  staleMaxMs: number;
  clock?: Clock;
}

const ENTRIES_MAX_LIMIT = 10_000_000;

export class StaleCache<V> {
  readonly #entries = new Map<string, { value: V; atMs: number }>();
  readonly #entriesMax: number;
  readonly #staleMaxMs: number;
  readonly #clock: Clock;

  constructor(options: StaleCacheOptions) {
    if (!(Number.isInteger(options.entriesMax) && options.entriesMax >= 1 && options.entriesMax <= ENTRIES_MAX_LIMIT)) throw new RangeError(`entriesMax must be an integer in 1..${ENTRIES_MAX_LIMIT}`);
    if (!(options.staleMaxMs > 0)) throw new RangeError('staleMaxMs must be > 0');
    this.#entriesMax = options.entriesMax;
    this.#staleMaxMs = options.staleMaxMs;
    this.#clock = options.clock ?? systemClock;
  }

  get size(): number {
    return this.#entries.size;
  }

  set(key: string, value: V): void {
    this.#remember(key, value, this.#clock.now());
  }

  /**
   * Remembers `value` as the answer of `atMs`, unless the entry holds a later one: of two loads
   * in flight at once, the one that began last is the newer answer, whichever finished last.
   */
  #remember(key: string, value: V, atMs: number): void {
    const held = this.#entries.get(key);
    if (held !== undefined && held.atMs > atMs) return;
    // Re-inserting moves the key to the end: Map iteration order is the eviction order.
    this.#entries.delete(key);
    this.#entries.set(key, { value, atMs });
    if (this.#entries.size > this.#entriesMax) {
      const oldest = this.#entries.keys().next();
      if (oldest.done !== true) this.#entries.delete(oldest.value);
    }
  }

  /** The last answer for `key` if it is younger than `staleMaxMs`. */
  get(key: string): { value: V; ageMs: number } | undefined {
    const entry = this.#entries.get(key);
    if (entry === undefined) return undefined;
    const ageMs = this.#clock.now() - entry.atMs;
    if (ageMs > this.#staleMaxMs) {
      this.#entries.delete(key);
      return undefined;
    }
    return { value: entry.value, ageMs };
  }

  /**
   * Loads `key` (through the caller's policy) and remembers the answer as of the moment the load
   * began (the dependency's state may be that old, so its age is never understated, and a
   * slower load begun earlier never replaces it); when loading fails, answers with the
   * remembered one, marked stale. Rethrows when there is none.
   */
  async read(key: string, load: () => Promise<V>): Promise<CacheRead<V>> {
    const startedMs = this.#clock.now();
    try {
      const value = await load();
      this.#remember(key, value, startedMs);
      return { value, stale: false, ageMs: 0 };
    } catch (error) {
      const cached = this.get(key);
      if (cached === undefined) throw error;
      return { value: cached.value, stale: true, ageMs: cached.ageMs };
    }
  }
}

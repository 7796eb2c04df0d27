/**
 * The ledgers (currencies and assets) this service knows, with their scales.
 *
 * Loaded at start, and again when a request names a ledger this instance has not seen: a
 * ledger added later (by a migration, or an operator, while this instance ran) is known from
 * the first request that needs it, not from the next restart. Until 2026-12-07 the map was
 * loaded once: an account in a newer ledger read through an older instance came back with
 * scale 0 (a USD-like amount of 12345 read as 12,345 units instead of 123.45), and creating
 * one there was refused as an unknown ledger.
 *
 * A lookup that misses waits for a load that began after it was asked (`know`, `require`),
 * so it sees every ledger committed before the request, and a code that is still missing is
 * truly unknown (the 422 that follows is right). Loads are shared: however many requests miss
 * at once, one query of this small table runs at a time, and each serves every request that
 * was waiting when it began; codes that name no ledger cost that query, no more.
 */
import type { LedgerInfo } from '@ledgerline/ledger';

export class UnknownLedgerError extends Error {
  override readonly name = 'UnknownLedgerError';
}

export class LedgerCatalog {
  #byCode: Map<string, LedgerInfo>;
  /** When the load the map comes from began (performance.now()). */
  #loadedSince: number;
  #loading: { since: number; done: Promise<void> } | null = null;
  readonly #list: () => Promise<LedgerInfo[]>;

  private constructor(list: () => Promise<LedgerInfo[]>, rows: LedgerInfo[], since: number) {
    this.#list = list;
    this.#byCode = LedgerCatalog.#index(rows);
    this.#loadedSince = since;
  }

  /** `list` reads every ledger (LedgerEngine#listLedgers). */
  static async load(list: () => Promise<LedgerInfo[]>): Promise<LedgerCatalog> {
    const since = performance.now();
    return new LedgerCatalog(list, await list(), since);
  }

  static #index(rows: LedgerInfo[]): Map<string, LedgerInfo> {
    return new Map(rows.map((l) => [l.code, l]));
  }

  get(code: string): LedgerInfo | undefined {
    return this.#byCode.get(code);
  }

  has(code: string): boolean {
    return this.#byCode.has(code);
  }

  all(): LedgerInfo[] {
    return [...this.#byCode.values()];
  }

  codes(): string[] {
    return [...this.#byCode.keys()];
  }

  /** Codes a client named: on a miss, loads again; a code still missing after that names no ledger. */
  async know(codes: Iterable<string | undefined>): Promise<void> {
    for (const code of codes) {
      if (code === undefined || this.#byCode.has(code)) continue;
      await this.reload();
      return;
    }
  }

  /** A ledger that exists: its info, loaded again if this instance has not seen it. */
  async require(code: string): Promise<LedgerInfo> {
    const known = this.#byCode.get(code);
    if (known !== undefined) return known;
    await this.reload();
    const loaded = this.#byCode.get(code);
    if (loaded === undefined) throw new UnknownLedgerError(`ledger ${code} is not in ledger.ledgers`);
    return loaded;
  }

  /** Returns once the map comes from a load that began after this call (shared with other callers). */
  async reload(): Promise<void> {
    await this.#loadBeganAtOrAfter(performance.now());
  }

  /** Waits for a load that began at or after `t`, starting one if none has. */
  async #loadBeganAtOrAfter(t: number): Promise<void> {
    for (;;) {
      if (this.#loadedSince >= t) return;
      const current = this.#loading;
      if (current === null) break;
      // One began earlier, or at or after t: either way, wait for it; then look again.
      await current.done.catch(() => {});
      if (current.since >= t) {
        // Began at or after t: its outcome is ours (its error included).
        await current.done;
        return;
      }
    }
    const since = performance.now();
    const done = this.#list().then(
      (rows) => {
        this.#byCode = LedgerCatalog.#index(rows);
        this.#loadedSince = Math.max(this.#loadedSince, since);
      },
    );
    const loading = { since, done };
    this.#loading = loading;
    try {
      await done;
    } finally {
      if (this.#loading === loading) this.#loading = null;
    }
  }
}

/**
 * The durable AuditSink: entries are checked at once, buffered in memory, and written to
 * `audit.queue` in one multi-row INSERT every few milliseconds, off the request's path. The
 * sequencer later gives them their place in the tree.
 *
 * Crash window: `record()` returns before the entry is durable. A process that dies
 * abruptly loses what it buffered in the last `flushIntervalMs` plus one INSERT; a graceful
 * close flushes everything. The money itself is audited without that window, from the event
 * store (see sequencer.ts).
 */
import type pg from 'pg';
import { newUuidV7 } from '@ledgerline/events';
import { asAuditWriter } from './migrate.ts';
import { checkEntry } from './record.ts';
import type { AuditEntry, AuditSink } from './sink.ts';

export const FLUSH_INTERVAL_MS_DEFAULT = 5;
export const BUFFER_ENTRIES_MAX_DEFAULT = 100_000;
/** Most entries per INSERT: bounds the statement's parameter arrays. */
export const FLUSH_ENTRIES_MAX = 5000;

export class AuditBufferFullError extends Error {
  override readonly name = 'AuditBufferFullError';
}

export interface PostgresAuditSinkOptions {
  pool: pg.Pool;
  /** How often buffered entries are written. */
  flushIntervalMs?: number;
  /** Entries held before `record()` throws AuditBufferFullError (the database is down or slow). */
  bufferEntriesMax?: number;
  /** The clock for entries without `occurredAt`. */
  now?: () => Date;
  /** A background flush failed; the entries stay buffered and the next flush retries them. */
  onError?: (error: unknown) => void;
}

/**
 * The queued form of an entry: what the sequencer reads back, with the id and time fixed and
 * the payload and personal data already canonical JSON text (canonicalised once, here).
 */
export interface QueuedEntry extends Omit<AuditEntry, 'occurredAt' | 'payload' | 'personal'> {
  id: string;
  occurredAt: string;
  payloadJson: string | null;
  personalJson: string | null;
}

export class PostgresAuditSink implements AuditSink {
  readonly #pool: pg.Pool;
  readonly #flushIntervalMs: number;
  readonly #bufferEntriesMax: number;
  readonly #now: () => Date;
  readonly #onError: (error: unknown) => void;
  #buffer: string[] = [];
  #timer: NodeJS.Timeout | null = null;
  #flushing: Promise<void> | null = null;
  #closed = false;

  constructor(options: PostgresAuditSinkOptions) {
    this.#pool = options.pool;
    this.#flushIntervalMs = options.flushIntervalMs ?? FLUSH_INTERVAL_MS_DEFAULT;
    this.#bufferEntriesMax = options.bufferEntriesMax ?? BUFFER_ENTRIES_MAX_DEFAULT;
    this.#now = options.now ?? (() => new Date());
    this.#onError = options.onError ?? (() => {});
    if (!(this.#flushIntervalMs >= 0 && this.#bufferEntriesMax >= 1)) throw new RangeError('flushIntervalMs must be >= 0 and bufferEntriesMax >= 1');
  }

  /** Entries waiting to be written. */
  get buffered(): number {
    return this.#buffer.length;
  }

  /**
   * Nine tenths full: a service should stop taking new work (the HTTP plugin answers 503)
   * rather than run commands it could not audit.
   */
  get saturated(): boolean {
    return this.#buffer.length >= this.#bufferEntriesMax * 0.9;
  }

  /** Checks the entry (InvalidAuditEntryError) and buffers it; throws AuditBufferFullError at the bound. */
  record(entry: AuditEntry): void {
    if (this.#closed) throw new Error('audit sink is closed');
    const { payload, personal } = checkEntry(entry);
    if (this.#buffer.length >= this.#bufferEntriesMax) {
      throw new AuditBufferFullError(`audit buffer holds ${this.#buffer.length} entries, its bound; the audit store is not keeping up`);
    }
    this.#buffer.push(queuedText(entry, payload, personal, this.#now));
    this.#timer ??= setTimeout(() => {
      this.#timer = null;
      this.flush().catch(this.#onError);
    }, this.#flushIntervalMs);
  }

  /** Writes everything recorded so far; rejects if the database refused (the entries stay buffered). */
  async flush(): Promise<void> {
    // One flush at a time keeps the queue in recording order within this process.
    while (this.#flushing !== null) await this.#flushing;
    if (this.#buffer.length === 0) return;
    this.#flushing = this.#writeAll();
    try {
      await this.#flushing;
    } finally {
      this.#flushing = null;
    }
  }

  async #writeAll(): Promise<void> {
    while (this.#buffer.length > 0) {
      const chunk = this.#buffer.slice(0, FLUSH_ENTRIES_MAX);
      // One JSON array of the entries' texts: JSON.stringify escapes them natively, where a
      // text[] parameter has pg escape every quote of every entry.
      await asAuditWriter(this.#pool, (client) =>
        client.query('INSERT INTO audit.queue (entry) SELECT json_array_elements_text($1::json)', [JSON.stringify(chunk)]),
      );
      this.#buffer = this.#buffer.slice(chunk.length);
    }
  }

  /** Flushes and refuses further entries. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    await this.flush();
  }
}

/** An entry as audit.queue holds it (QueuedEntry), from the canonical payload and personal JSON `checkEntry` returned. */
function queuedText(entry: AuditEntry, payload: string | null, personal: string | null, now: () => Date): string {
  const { payload: _p, personal: _q, ...fields } = entry;
  const queued: QueuedEntry = { ...fields, id: newUuidV7(), occurredAt: (entry.occurredAt ?? now()).toISOString(), payloadJson: payload, personalJson: personal };
  return JSON.stringify(queued);
}

/**
 * Queues an entry in the caller's transaction, as the sink would write it: for an action whose
 * record must commit with it (a key transition). Checks the entry first (InvalidAuditEntryError).
 */
export async function queueEntryWith(db: Pick<pg.ClientBase, 'query'>, entry: AuditEntry, now: () => Date = () => new Date()): Promise<void> {
  const { payload, personal } = checkEntry(entry);
  await db.query('INSERT INTO audit.queue (entry) VALUES ($1)', [queuedText(entry, payload, personal, now)]);
}

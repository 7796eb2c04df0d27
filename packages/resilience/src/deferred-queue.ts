/**
 * A durable queue for work deferred while a dependency is down: a fallback for calls that
 * must happen eventually but need not happen now (a notification, a report, a webhook).
 * Rows live in PostgreSQL (`resilience.deferred_work`), so deferred work survives restarts
 * and any instance can drain it once the dependency is back.
 *
 * Bounded: at most `depthMax` items per queue (enqueue beyond it throws, and the caller
 * must then fail the request rather than drop work silently), payloads ≤ 64 KiB, batches of
 * at most `batchMax`. Draining claims rows with `FOR UPDATE SKIP LOCKED` inside one
 * transaction, so concurrent drainers never take the same item, and an item whose drainer
 * dies is released by the aborted transaction. A failed item is retried later with an
 * exponential delay; it is never deleted unprocessed.
 */
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type pg from 'pg';

const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));

/** Brings the `resilience` schema up to date; safe from every instance at start. */
export async function migrateResilience(databaseUrl: string): Promise<void> {
  await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    schema: 'resilience',
    createSchema: true,
    migrationsSchema: 'resilience',
    migrationsTable: 'migrations',
    advisoryLockMode: 'wait',
    checkOrder: true,
    log: () => {},
  });
}

export interface DeferredItem<P> {
  id: string;
  payload: P;
  attempts: number;
  enqueuedAt: Date;
}

export interface DeferredQueueOptions {
  pool: pg.Pool;
  /** The queue's name (1..64 characters). */
  queue: string;
  /** Items the queue may hold; an enqueue beyond this throws DeferredQueueFullError. */
  depthMax: number;
  /** Items per drain transaction. */
  batchMax?: number;
  /** A failed item waits retryBaseMs × 2^(attempts−1), at most retryCapMs. */
  retryBaseMs?: number;
  retryCapMs?: number;
}

export class DeferredQueueFullError extends Error {
  constructor(queue: string, depthMax: number) {
    super(`deferred queue ${queue} is full (${depthMax} items)`);
    this.name = 'DeferredQueueFullError';
  }
}

const DEPTH_MAX_LIMIT = 1_000_000;
const BATCH_MAX_LIMIT = 1000;
const ERROR_CHARS_MAX = 1000;

export class DeferredQueue<P> {
  readonly name: string;
  readonly depthMax: number;
  readonly #pool: pg.Pool;
  readonly #batchMax: number;
  readonly #retryBaseMs: number;
  readonly #retryCapMs: number;

  constructor(options: DeferredQueueOptions) {
    if (!/^.{1,64}$/.test(options.queue)) throw new RangeError('deferred queue name must be 1..64 characters');
    if (!(Number.isInteger(options.depthMax) && options.depthMax >= 1 && options.depthMax <= DEPTH_MAX_LIMIT)) throw new RangeError(`depthMax must be an integer in 1..${DEPTH_MAX_LIMIT}`);
    const batchMax = options.batchMax ?? 100;
    if (!(Number.isInteger(batchMax) && batchMax >= 1 && batchMax <= BATCH_MAX_LIMIT)) throw new RangeError(`batchMax must be an integer in 1..${BATCH_MAX_LIMIT}`);
    this.name = options.queue;
    this.depthMax = options.depthMax;
    this.#pool = options.pool;
    this.#batchMax = batchMax;
    this.#retryBaseMs = options.retryBaseMs ?? 1000;
    this.#retryCapMs = options.retryCapMs ?? 300_000;
  }

  /**
   * Stores `payload` for later. With a `dedupeKey`, a second enqueue of the same key is a
   * no-op (`enqueued: false`). Throws DeferredQueueFullError at `depthMax`.
   */
  async enqueue(payload: P, options: { dedupeKey?: string; delayMs?: number } = {}): Promise<{ enqueued: boolean }> {
    // One statement: the depth check and the insert cannot be split by a concurrent drain.
    // Under concurrent enqueues the bound may be overshot by the number of racing writers.
    const r = await this.#pool.query<{ id: string }>(
      `INSERT INTO resilience.deferred_work (queue, dedupe_key, payload, available_at)
       SELECT $1, $2, $3::jsonb, now() + make_interval(secs => $4::double precision / 1000)
       WHERE (SELECT count(*) FROM (SELECT 1 FROM resilience.deferred_work WHERE queue = $1 LIMIT $5) d) < $5
       ON CONFLICT (queue, dedupe_key) DO NOTHING
       RETURNING id`,
      [this.name, options.dedupeKey ?? null, JSON.stringify(payload), options.delayMs ?? 0, this.depthMax],
    );
    if (r.rowCount === 1) return { enqueued: true };
    if (options.dedupeKey !== undefined) {
      const existing = await this.#pool.query('SELECT 1 FROM resilience.deferred_work WHERE queue = $1 AND dedupe_key = $2', [this.name, options.dedupeKey]);
      if (existing.rowCount === 1) return { enqueued: false };
    }
    throw new DeferredQueueFullError(this.name, this.depthMax);
  }

  /** Items waiting (due or not). */
  async depth(): Promise<number> {
    const r = await this.#pool.query<{ n: number }>('SELECT count(*)::int AS n FROM resilience.deferred_work WHERE queue = $1', [this.name]);
    return r.rows[0]?.n ?? 0;
  }

  /**
   * Hands up to `batchMax` due items to `handle`, one at a time, in enqueue order. An item
   * whose handler resolves is deleted; one whose handler throws is kept with its attempt
   * count raised and a later due time. Returns how many items were handled successfully.
   * The handler runs inside the claiming transaction: keep it bounded (a policy with a timeout).
   */
  async drain(handle: (item: DeferredItem<P>) => Promise<void>): Promise<{ done: number; failed: number }> {
    const client = await this.#pool.connect();
    let done = 0;
    let failed = 0;
    try {
      await client.query('BEGIN');
      const claimed = await client.query<{ id: string; payload: P; attempts: number; enqueued_at: Date }>(
        `SELECT id, payload, attempts, enqueued_at FROM resilience.deferred_work
         WHERE queue = $1 AND available_at <= now()
         ORDER BY available_at, id LIMIT $2 FOR UPDATE SKIP LOCKED`,
        [this.name, this.#batchMax],
      );
      for (const row of claimed.rows) {
        try {
          await handle({ id: row.id, payload: row.payload, attempts: row.attempts, enqueuedAt: row.enqueued_at });
          await client.query('DELETE FROM resilience.deferred_work WHERE id = $1', [row.id]);
          done += 1;
        } catch (error) {
          const attempts = row.attempts + 1;
          const delayMs = Math.min(this.#retryCapMs, this.#retryBaseMs * 2 ** Math.min(attempts - 1, 30));
          const message = (error instanceof Error ? error.message : String(error)).slice(0, ERROR_CHARS_MAX);
          await client.query(
            `UPDATE resilience.deferred_work SET attempts = $2, last_error = $3,
               available_at = now() + make_interval(secs => $4::double precision / 1000) WHERE id = $1`,
            [row.id, attempts, message, delayMs],
          );
          failed += 1;
        }
      }
      await client.query('COMMIT');
      return { done, failed };
    } catch (error) {
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      client.release();
    }
  }
}

/**
 * Projections (read models) built from the event store.
 *
 * - Inline: `applyInline` runs in the transaction that appends the events, so the read model
 *   commits or rolls back with them.
 * - Asynchronous: `runBatch` reads the next events in the global order after the projection's
 *   checkpoint, applies them and advances the checkpoint in ONE transaction, with the
 *   checkpoint row locked. A crash before COMMIT undoes both; after it, neither is repeated.
 *   So each event is applied exactly once, whatever kills the process.
 * - Generations: each projection's tables exist per generation (`<schema>.<table>_g<n>`), and
 *   readers use a view (`<schema>.<table>`) on the active one. A blue/green rebuild fills
 *   generation n + 1 beside the live one, closes the gap under both checkpoint locks, and
 *   repoints the views in the same transaction: readers never see a half-built model.
 * - Retention: every path that reads the global order (readAll, the set-based replay, the
 *   worker threads' pages) reads the archive with the hot table (global-order.ts), so a
 *   generation rebuilt after retention archived streams still applies each of their events
 *   once, in its place in the order.
 */
import type pg from 'pg';
import { CHECKPOINT_START, inTransaction, readHorizon, StreamCorruptError, type Checkpoint, type EventStore, type StoredEvent } from '@ledgerline/events';
import { ALL_EVENTS, FIRST_COPY_SQL } from './global-order.ts';
import { settledThrough } from './settled.ts';

type Queryable = Pick<pg.ClientBase, 'query'>;

/** Base table name → qualified, quoted name of this generation's table. */
export type TableNames = Readonly<Record<string, string>>;

export interface Projection {
  /** Names the checkpoint rows and, with the generation, the tables: `[a-z][a-z0-9_]*`. */
  name: string;
  /** The schema that holds the tables and the views. */
  schema: string;
  /** Base names of the read-model tables. */
  tables: readonly string[];
  /**
   * The top-level `data` keys the asynchronous path needs. When set, batches read only these,
   * each as text (see EventStore.readAll); `apply` must then accept both forms, because
   * inline application passes whole events.
   */
  fields?: readonly string[];
  /**
   * The fast path of replays and rebuilds: a fold that keeps the generation's state in memory
   * across pages and writes it back only now and then (see `replayInto`). Loads the state the
   * generation holds now. Without it, replays run `apply` batch by batch.
   */
  replay?: (db: Queryable, tables: TableNames) => Promise<ProjectionReplay>;
  /**
   * The fastest path of a rebuild from zero: a set-based fold inside PostgreSQL of every
   * event up to `until` (inclusive), hot and archived (`ALL_EVENTS` in global-order.ts), into
   * this generation's empty tables, in the caller's transaction. Returns nothing; the tail
   * after `until` goes through the other paths.
   */
  replaySql?: (db: Queryable, tables: TableNames, until: Checkpoint) => Promise<void>;
  /** Creates one generation's empty tables. */
  create(db: Queryable, tables: TableNames): Promise<void>;
  /**
   * Applies events in global order, set-based where it can, inside the caller's transaction.
   * Events it does not know must be ignored: the global order carries every stream.
   */
  apply(db: Queryable, tables: TableNames, events: readonly StoredEvent[]): Promise<void>;
}

/** An in-memory replay of one generation (Projection.replay). */
export interface ProjectionReplay {
  /** Folds events (in global order) into memory; no I/O. */
  fold(events: readonly StoredEvent[]): void;
  /** Writes what changed since the last flush, set-based, in the caller's transaction. */
  flush(db: Queryable, tables: TableNames): Promise<void>;
  /**
   * Parallel decoding: worker threads running `workerModule` read pages and answer each with a
   * summary; `merge` folds the summaries into memory, in page order (see ledger-replay.ts).
   */
  parallel?: { workerModule: URL; merge(summary: unknown): number };
}

const NAME = /^[a-z][a-z0-9_]{0,40}$/;

function ident(name: string): string {
  if (!NAME.test(name)) throw new RangeError(`not a safe identifier: ${JSON.stringify(name)}`);
  return `"${name}"`;
}

export function generationTables(p: Projection, generation: number): TableNames {
  return Object.fromEntries(p.tables.map((t) => [t, `${ident(p.schema)}.${ident(`${t}_g${generation}`)}`]));
}

export function viewName(p: Projection, table: string): string {
  return `${ident(p.schema)}.${ident(table)}`;
}

async function lockName(db: Queryable, name: string): Promise<void> {
  await db.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [`projection:${name}`]);
}

async function pointViews(db: Queryable, p: Projection, generation: number): Promise<void> {
  const tables = generationTables(p, generation);
  for (const t of p.tables) await db.query(`CREATE OR REPLACE VIEW ${viewName(p, t)} AS SELECT * FROM ${tables[t]}`);
}

/** Creates generation 1, active, with its views, unless the projection exists. Idempotent. */
export async function ensureProjection(pool: pg.Pool, p: Projection): Promise<void> {
  ident(p.name);
  await inTransaction(pool, async (c) => {
    await lockName(c, p.name);
    const r = await c.query('SELECT 1 FROM events.projections WHERE name = $1 AND active', [p.name]);
    if (r.rows.length > 0) return;
    await c.query(`CREATE SCHEMA IF NOT EXISTS ${ident(p.schema)}`);
    await c.query('INSERT INTO events.projections (name, generation, active) VALUES ($1, 1, true)', [p.name]);
    await p.create(c, generationTables(p, 1));
    await pointViews(c, p, 1);
  });
}

/**
 * Creates the next generation (inactive, empty) with its checkpoint at `after` (default: the
 * start; later for a range replay); returns its number.
 */
export async function createGeneration(pool: pg.Pool, p: Projection, after: Checkpoint = CHECKPOINT_START): Promise<number> {
  return inTransaction(pool, async (c) => {
    await lockName(c, p.name);
    const r = await c.query<{ g: number | null }>('SELECT max(generation) AS g FROM events.projections WHERE name = $1', [p.name]);
    const generation = (r.rows[0]?.g ?? 0) + 1;
    await c.query(`CREATE SCHEMA IF NOT EXISTS ${ident(p.schema)}`);
    await c.query(
      'INSERT INTO events.projections (name, generation, active, transaction_id, position) VALUES ($1, $2, false, $3::text::xid8, $4)',
      [p.name, generation, after.transactionId.toString(), after.position.toString()],
    );
    await p.create(c, generationTables(p, generation));
    return generation;
  });
}

/** Drops an inactive generation and its tables (the active one is refused). */
export async function dropGeneration(pool: pg.Pool, p: Projection, generation: number): Promise<void> {
  await inTransaction(pool, async (c) => {
    const r = await c.query<{ active: boolean }>(
      'DELETE FROM events.projections WHERE name = $1 AND generation = $2 RETURNING active',
      [p.name, generation],
    );
    if (r.rows[0]?.active === true) throw new Error(`generation ${generation} of ${p.name} is active; swap first`);
    for (const t of Object.values(generationTables(p, generation))) await c.query(`DROP TABLE IF EXISTS ${t}`);
  });
}

/** Applies just-appended events to each projection's active generation, in the caller's transaction. */
export async function applyInline(db: Queryable, projections: readonly Projection[], events: readonly StoredEvent[]): Promise<void> {
  for (const p of projections) {
    // FOR SHARE: appenders run side by side, and a swap (FOR UPDATE) waits for them.
    const r = await db.query<{ generation: number }>('SELECT generation FROM events.projections WHERE name = $1 AND active FOR SHARE', [p.name]);
    const g = r.rows[0]?.generation;
    if (g === undefined) throw new Error(`projection ${p.name} does not exist: call ensureProjection first`);
    await p.apply(db, generationTables(p, g), events);
  }
}

export interface BatchOptions {
  /** The generation to advance; 'active' follows swaps (the live runner). */
  generation: number | 'active';
  /** Most events per transaction. */
  batchSize: number;
  /** Stop after this checkpoint (inclusive): a range replay. */
  until?: Checkpoint;
  /** Called after the events are applied, before COMMIT (the chaos tests kill the process here). */
  beforeCommit?: (events: readonly StoredEvent[]) => void | Promise<void>;
}

export interface BatchResult {
  /** Null when the generation does not exist (for 'active': while a swap commits). */
  generation: number | null;
  applied: number;
  checkpoint: Checkpoint;
  /** True when more events may be ready now; false when the batch reached the end (or `until`). */
  more: boolean;
}

interface CheckpointRow {
  generation: number;
  t: string;
  p: string;
}

function rowCheckpoint(r: CheckpointRow): Checkpoint {
  return { transactionId: BigInt(r.t), position: BigInt(r.p) };
}

function leanRead(p: Projection): { fields?: readonly string[] } {
  return p.fields === undefined ? {} : { fields: p.fields };
}

export function checkpointLess(a: Checkpoint, b: Checkpoint): boolean {
  return a.transactionId < b.transactionId || (a.transactionId === b.transactionId && a.position < b.position);
}

async function advance(db: Queryable, p: Projection, generation: number, events: readonly StoredEvent[]): Promise<Checkpoint> {
  const last = events.at(-1);
  if (last === undefined) throw new Error('invariant: advance needs events');
  await p.apply(db, generationTables(p, generation), events);
  await db.query(
    `UPDATE events.projections SET transaction_id = $3::text::xid8, position = $4, events_applied = events_applied + $5, updated_at = now()
      WHERE name = $1 AND generation = $2`,
    [p.name, generation, last.transactionId.toString(), last.position.toString(), events.length],
  );
  return { transactionId: last.transactionId, position: last.position };
}

/** One exactly-once step of an asynchronous projection: read, apply, checkpoint, one transaction. */
export async function runBatch(pool: pg.Pool, store: EventStore, p: Projection, options: BatchOptions): Promise<BatchResult> {
  if (!(Number.isSafeInteger(options.batchSize) && options.batchSize >= 1)) throw new RangeError('batchSize must be a positive integer');
  return inTransaction(pool, async (c) => {
    // The row lock makes one runner at a time advance a generation; a second one waits here
    // and then reads the checkpoint the first one committed.
    const r = await c.query<CheckpointRow>(
      `SELECT generation, transaction_id::text AS t, position::text AS p FROM events.projections
        WHERE name = $1 AND (CASE WHEN $2::int IS NULL THEN active ELSE generation = $2::int END) FOR UPDATE`,
      [p.name, options.generation === 'active' ? null : options.generation],
    );
    const row = r.rows[0];
    if (row === undefined) return { generation: null, applied: 0, checkpoint: CHECKPOINT_START, more: false };
    const from = rowCheckpoint(row);
    const read = await store.readAll(c, { after: from, limit: options.batchSize, ...leanRead(p) });
    const { until } = options;
    const events = until === undefined ? read : read.filter((e) => !checkpointLess(until, e));
    const more = events.length === options.batchSize;
    if (events.length === 0) return { generation: row.generation, applied: 0, checkpoint: from, more: false };
    const checkpoint = await advance(c, p, row.generation, events);
    await options.beforeCommit?.(events);
    return { generation: row.generation, applied: events.length, checkpoint, more };
  });
}

export interface ReplayReport {
  projection: string;
  generation: number;
  events: number;
  batches: number;
  seconds: number;
  eventsPerSecond: number;
}

export interface ReplayOptions {
  /** Events per read (and, without `Projection.replay`, per transaction). */
  batchSize: number;
  /**
   * The last event to replay (inclusive). The replay first waits (at most `settleWaitMs`) until
   * every event up to it is readable (`settledThrough`), so that it never ends short of it;
   * RangeNotSettledError when it cannot.
   */
  until?: Checkpoint;
  settleWaitMs?: number;
  /** With `Projection.replay`: events folded in memory between two flushes (commits). */
  flushEvery?: number;
  /** With a replay that supports it: decode pages in this many worker threads, each with its own connection. */
  workers?: { count: number; databaseUrl: string };
  /** False: never use `Projection.replaySql`, even for a generation at the start. */
  setBased?: boolean;
  onBatch?: (r: BatchResult) => void;
}

/** A replay path that would bypass the store's residency read check was refused. Nothing was read. */
export class ResidencyReplayError extends Error {
  override readonly name = 'ResidencyReplayError';
}

/** A generation's checkpoint was moved by someone else during an in-memory replay. */
export class ReplayConflictError extends Error {
  override readonly name = 'ReplayConflictError';
}

/**
 * Replays into one generation until it reaches the end of what is readable (or `until`).
 * A generation at the start of a projection with `replaySql` is first filled set-based, in
 * one transaction with its checkpoint. With `Projection.replay` it then reads large pages, folds them in memory and flushes the state
 * with the checkpoint every `flushEvery` events, in one transaction each; otherwise every
 * batch is its own `runBatch` transaction. Either way an interrupted replay resumes from the
 * last commit, and nothing is applied twice.
 */
export async function replayInto(pool: pg.Pool, store: EventStore, p: Projection, generation: number, options: ReplayOptions): Promise<ReplayReport> {
  const started = performance.now();
  // The set-based replay and the worker threads read the event tables directly, past the store's
  // residency read check (readAll's). With a policy, the set-based fill is skipped, so every
  // event is read through readAll and a stream this location may not read is refused; workers,
  // asked for explicitly, are refused outright rather than silently ignored.
  const checked = store.residency !== null;
  if (checked && options.workers !== undefined && options.workers.count >= 1) {
    throw new ResidencyReplayError(`replay of ${p.name} with worker threads: the workers read events without the store's residency check; ` +
      'replay without workers with this store (its reads are checked), or with a store without a policy where all data may be read');
  }
  if (options.until !== undefined) await settledThrough(pool, options.until, options.settleWaitMs);
  const setBased = !checked && p.replaySql !== undefined && options.setBased !== false && options.until === undefined
    ? await replaySetBased(pool, p, p.replaySql, generation)
    : 0;
  const rest = await replayIncrementally(pool, store, p, generation, options);
  const seconds = (performance.now() - started) / 1000;
  const events = setBased + rest.events;
  return { ...rest, events, batches: rest.batches + (setBased > 0 ? 1 : 0), seconds, eventsPerSecond: seconds > 0 ? events / seconds : 0 };
}

/**
 * Replays a generation still at the start with `Projection.replaySql`, up to the last event
 * below the read horizon (hot or archived), in one transaction with the checkpoint. Returns
 * the events it covered (0 when the generation had already started or there is nothing to
 * read). An archived event that the hot table holds too is refused (`StreamCorruptError`)
 * before anything is folded.
 */
async function replaySetBased(pool: pg.Pool, p: Projection, replaySql: NonNullable<Projection['replaySql']>, generation: number): Promise<number> {
  return inTransaction(pool, async (c) => {
    const r = await c.query<CheckpointRow>(
      'SELECT generation, transaction_id::text AS t, position::text AS p FROM events.projections WHERE name = $1 AND generation = $2 FOR UPDATE',
      [p.name, generation],
    );
    const row = r.rows[0];
    if (row === undefined) throw new Error(`generation ${generation} of ${p.name} does not exist`);
    // Only from the very start: a generation created just before a later event (`replay
    // --from-position`, at that event's transaction and position - 1) is not at it, even at
    // position 0 (until 2026-12-07 it was taken to be, and events of older transactions that
    // sort before the range's first were folded in: a review found it).
    if (row.p !== '0' || row.t !== '0') return 0;
    // Everything below the horizon is committed, and whatever commits later sorts after it.
    const horizon = await readHorizon(c);
    const last = await c.query<{ t: string; p: string }>(
      `SELECT e.transaction_id::text AS t, e.position::text AS p FROM ${ALL_EVENTS} e
        WHERE e.transaction_id < $1::text::xid8
        ORDER BY e.transaction_id DESC, e.position DESC LIMIT 1`,
      [horizon.toString()],
    );
    const head = last.rows[0];
    if (head === undefined) return 0;
    const copy = (await c.query<{ stream_type: string; stream_id: string; version: number }>(FIRST_COPY_SQL, [head.t, head.p])).rows[0];
    if (copy !== undefined) throw new StreamCorruptError(copy.stream_type, copy.stream_id, copy.version);
    const n = await c.query<{ n: string }>(
      `SELECT ((SELECT count(*) FROM events.events e WHERE (e.transaction_id, e.position) <= ($1::text::xid8, $2::bigint))
             + (SELECT count(*) FROM events.archived_events a WHERE (a.transaction_id, a.position) <= ($1::text::xid8, $2::bigint)))::text AS n`,
      [head.t, head.p],
    );
    await replaySql(c, generationTables(p, generation), { transactionId: BigInt(head.t), position: BigInt(head.p) });
    await c.query(
      `UPDATE events.projections SET transaction_id = $3::text::xid8, position = $4, events_applied = $5, updated_at = now()
        WHERE name = $1 AND generation = $2`,
      [p.name, generation, head.t, head.p, n.rows[0]?.n ?? '0'],
    );
    return Number(n.rows[0]?.n ?? 0);
  });
}

async function replayIncrementally(pool: pg.Pool, store: EventStore, p: Projection, generation: number, options: ReplayOptions): Promise<ReplayReport> {
  if (p.replay !== undefined) return replayInMemory(pool, store, p, p.replay, generation, options);
  const started = performance.now();
  let events = 0;
  let batches = 0;
  for (;;) {
    const r = await runBatch(pool, store, p, { generation, batchSize: options.batchSize, ...(options.until === undefined ? {} : { until: options.until }) });
    if (r.generation === null) throw new Error(`generation ${generation} of ${p.name} does not exist`);
    events += r.applied;
    batches += r.applied > 0 ? 1 : 0;
    options.onBatch?.(r);
    if (!r.more) break;
  }
  const seconds = (performance.now() - started) / 1000;
  return { projection: p.name, generation, events, batches, seconds, eventsPerSecond: seconds > 0 ? events / seconds : 0 };
}

async function replayInMemory(
  pool: pg.Pool,
  store: EventStore,
  p: Projection,
  load: NonNullable<Projection['replay']>,
  generation: number,
  options: ReplayOptions,
): Promise<ReplayReport> {
  if (!(Number.isSafeInteger(options.batchSize) && options.batchSize >= 1)) throw new RangeError('batchSize must be a positive integer');
  const flushEvery = options.flushEvery ?? 250_000;
  const started = performance.now();
  const tables = generationTables(p, generation);
  const r = await pool.query<CheckpointRow>(
    'SELECT generation, transaction_id::text AS t, position::text AS p FROM events.projections WHERE name = $1 AND generation = $2',
    [p.name, generation],
  );
  const row = r.rows[0];
  if (row === undefined) throw new Error(`generation ${generation} of ${p.name} does not exist`);
  let committed = rowCheckpoint(row);
  const replay = await load(pool, tables);
  let at = committed;
  let unflushed = 0;
  let events = 0;
  let batches = 0;
  const flush = (): Promise<void> =>
    inTransaction(pool, async (c) => {
      const locked = await c.query<CheckpointRow>(
        'SELECT generation, transaction_id::text AS t, position::text AS p FROM events.projections WHERE name = $1 AND generation = $2 FOR UPDATE',
        [p.name, generation],
      );
      const now = locked.rows[0];
      if (now === undefined || checkpointLess(rowCheckpoint(now), committed) || checkpointLess(committed, rowCheckpoint(now))) {
        throw new ReplayConflictError(`generation ${generation} of ${p.name} was advanced by another writer during the replay`);
      }
      await replay.flush(c, tables);
      await c.query(
        `UPDATE events.projections SET transaction_id = $3::text::xid8, position = $4, events_applied = events_applied + $5, updated_at = now()
          WHERE name = $1 AND generation = $2`,
        [p.name, generation, at.transactionId.toString(), at.position.toString(), unflushed],
      );
      committed = at;
      unflushed = 0;
    });
  const parallel = replay.parallel;
  if (parallel !== undefined && options.workers !== undefined && options.workers.count >= 1) {
    const boundaries = await pageBoundaries(pool, at, options.batchSize, options.until);
    await inWorkers(parallel.workerModule, options.workers, p.fields ?? [], boundaries, at, options.batchSize, async (index, summary) => {
      const n = parallel.merge(summary);
      at = boundaries[index] as Checkpoint;
      unflushed += n;
      events += n;
      batches += 1;
      if (unflushed >= flushEvery) await flush();
      options.onBatch?.({ generation, applied: n, checkpoint: at, more: true });
    });
    // Whatever committed after the boundaries were taken is read by the loop below.
  }
  const read = (after: Checkpoint): Promise<StoredEvent[]> => {
    const page = store.readAll(pool, { after, limit: options.batchSize, ...leanRead(p) });
    page.catch(() => {}); // awaited below; a fold that throws first must not leave it unhandled
    return page;
  };
  let next = read(at);
  for (;;) {
    const fetched = await next;
    const { until } = options;
    const page = until === undefined ? fetched : fetched.filter((e) => !checkpointLess(until, e));
    const last = page.at(-1);
    // Read the next page while this one is folded: the database works while this process does.
    if (page.length === options.batchSize && last !== undefined) next = read(last);
    if (last !== undefined) {
      replay.fold(page);
      at = { transactionId: last.transactionId, position: last.position };
      unflushed += page.length;
      events += page.length;
      batches += 1;
    }
    const more = page.length === options.batchSize;
    if (unflushed > 0 && (!more || unflushed >= flushEvery)) await flush();
    options.onBatch?.({ generation, applied: page.length, checkpoint: at, more });
    if (!more) break;
  }
  const seconds = (performance.now() - started) / 1000;
  return { projection: p.name, generation, events, batches, seconds, eventsPerSecond: seconds > 0 ? events / seconds : 0 };
}

/**
 * The last checkpoint of each page of `pageSize` events after `after` (and up to `until`),
 * below the read horizon, hot and archived (as the workers' `readAll` reads them), in one
 * pass over the two global-order indexes: pages that workers can read independently.
 */
async function pageBoundaries(db: Queryable, after: Checkpoint, pageSize: number, until: Checkpoint | undefined): Promise<Checkpoint[]> {
  const horizon = await readHorizon(db);
  const r = await db.query<{ t: string; p: string }>(
    `SELECT t, p FROM (
       SELECT e.transaction_id::text AS t, e.position::text AS p,
              row_number() OVER (ORDER BY e.transaction_id, e.position) AS rn, count(*) OVER () AS total
         FROM ${ALL_EVENTS} e
        WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2::bigint)
          AND e.transaction_id < $6::text::xid8
          AND ($4::text IS NULL OR (e.transaction_id, e.position) <= ($4::text::xid8, $5::bigint))) x
      WHERE rn % $3 = 0 OR rn = total ORDER BY rn`,
    [after.transactionId.toString(), after.position.toString(), pageSize, until?.transactionId.toString() ?? null, until?.position.toString() ?? null, horizon.toString()],
  );
  return r.rows.map((x) => ({ transactionId: BigInt(x.t), position: BigInt(x.p) }));
}

/** Most pages decoded ahead of the merge: bounds the summaries held in memory. */
const PAGES_AHEAD_MAX = 8;

/**
 * Runs the pages through worker threads and hands their summaries to `merge` strictly in page
 * order (awaiting each). Any worker failure fails the whole run; workers are always stopped.
 */
async function inWorkers(
  module: URL,
  workers: { count: number; databaseUrl: string },
  fields: readonly string[],
  boundaries: readonly Checkpoint[],
  start: Checkpoint,
  pageSize: number,
  merge: (index: number, summary: unknown) => Promise<void>,
): Promise<void> {
  if (boundaries.length === 0) return;
  const { Worker } = await import('node:worker_threads');
  const threads = Array.from({ length: Math.min(workers.count, boundaries.length) }, () => new Worker(module, { workerData: { databaseUrl: workers.databaseUrl, fields: [...fields] } }));
  const done = new Map<number, unknown>();
  let dispatched = 0;
  let merged = 0;
  // An object, not a `let`: the callbacks below set it, and the loop must see it change.
  const failed: { error: Error | null } = { error: null };
  let wake: (() => void) | null = null;
  const notify = (): void => {
    wake?.();
    wake = null;
  };
  const cp = (c: Checkpoint): { t: string; p: string } => ({ t: c.transactionId.toString(), p: c.position.toString() });
  const dispatch = (w: (typeof threads)[number]): void => {
    if (dispatched >= boundaries.length || dispatched - merged >= PAGES_AHEAD_MAX) {
      idle.add(w);
      return;
    }
    const index = dispatched;
    dispatched += 1;
    w.postMessage({ index, after: cp(index === 0 ? start : (boundaries[index - 1] as Checkpoint)), until: cp(boundaries[index] as Checkpoint), limit: pageSize });
  };
  const idle = new Set<(typeof threads)[number]>();
  try {
    for (const w of threads) {
      w.on('message', (m: { ready?: true; index?: number; summary?: unknown; error?: string }) => {
        if (m.error !== undefined) failed.error ??= new Error(`replay worker: ${m.error}`);
        else if (m.index !== undefined) done.set(m.index, m.summary);
        dispatch(w);
        notify();
      });
      w.on('error', (error) => {
        failed.error ??= error;
        notify();
      });
    }
    while (merged < boundaries.length) {
      if (failed.error !== null) throw failed.error;
      if (!done.has(merged)) {
        await new Promise<void>((resolve) => (wake = resolve));
        continue;
      }
      const summary = done.get(merged);
      done.delete(merged);
      await merge(merged, summary);
      merged += 1;
      for (const w of [...idle]) {
        idle.delete(w);
        dispatch(w);
      }
    }
  } finally {
    await Promise.all(threads.map((w) => w.terminate()));
  }
}

/**
 * Makes `generation` the active one. Under both checkpoint locks (the live runner waits), it
 * first applies to the new generation whatever the active one has applied and it has not;
 * then it repoints the views, flips `active`, and drops the old generation, all in the
 * transaction that closed the gap. Returns the old generation's number.
 */
export async function swapGeneration(pool: pg.Pool, store: EventStore, p: Projection, generation: number, options: { batchSize: number }): Promise<number | null> {
  for (;;) {
    const done = await inTransaction(pool, async (c): Promise<{ old: number | null } | null> => {
      const rows = await c.query<CheckpointRow & { active: boolean }>(
        `SELECT generation, active, transaction_id::text AS t, position::text AS p FROM events.projections
          WHERE name = $1 AND (active OR generation = $2) ORDER BY active DESC FOR UPDATE`,
        [p.name, generation],
      );
      const target = rows.rows.find((x) => x.generation === generation);
      if (target === undefined) throw new Error(`generation ${generation} of ${p.name} does not exist`);
      const live = rows.rows.find((x) => x.active);
      if (live?.generation === generation) return { old: null };
      if (live !== undefined) {
        const liveAt = rowCheckpoint(live);
        const read = await store.readAll(c, { after: rowCheckpoint(target), limit: options.batchSize, ...leanRead(p) });
        const gap = read.filter((e) => !checkpointLess(liveAt, e));
        if (gap.length > 0) await advance(c, p, generation, gap);
        // The gap is closed once a read stopped short of the batch or went past the live checkpoint.
        if (gap.length === options.batchSize) return null;
        await c.query('UPDATE events.projections SET active = false WHERE name = $1 AND generation = $2', [p.name, live.generation]);
      }
      await c.query('UPDATE events.projections SET active = true, updated_at = now() WHERE name = $1 AND generation = $2', [p.name, generation]);
      await pointViews(c, p, generation);
      if (live !== undefined) {
        await c.query('DELETE FROM events.projections WHERE name = $1 AND generation = $2', [p.name, live.generation]);
        for (const t of Object.values(generationTables(p, live.generation))) await c.query(`DROP TABLE ${t}`);
      }
      return { old: live?.generation ?? null };
    });
    if (done !== null) return done.old;
  }
}

export type RebuildMode = 'blue-green' | 'in-place';

export interface RebuildReport extends ReplayReport {
  mode: RebuildMode;
  /** Wall time from start to the swap (or the end of the in-place replay). */
  rebuildSeconds: number;
}

/**
 * Rebuilds a projection from the first event. Blue/green fills a new generation while the old
 * one keeps serving, then swaps; in-place empties the active generation and refills it (its
 * readers see it grow from empty).
 */
export async function rebuild(
  pool: pg.Pool,
  store: EventStore,
  p: Projection,
  options: ReplayOptions & { mode: RebuildMode },
): Promise<RebuildReport> {
  const started = performance.now();
  let generation: number;
  if (options.mode === 'blue-green') {
    generation = await createGeneration(pool, p);
  } else {
    generation = await inTransaction(pool, async (c) => {
      const r = await c.query<{ generation: number }>('SELECT generation FROM events.projections WHERE name = $1 AND active FOR UPDATE', [p.name]);
      const g = r.rows[0]?.generation;
      if (g === undefined) throw new Error(`projection ${p.name} does not exist: call ensureProjection first`);
      await c.query(`TRUNCATE ${Object.values(generationTables(p, g)).join(', ')}`);
      await c.query(
        `UPDATE events.projections SET transaction_id = '0', position = 0, events_applied = 0, updated_at = now() WHERE name = $1 AND generation = $2`,
        [p.name, g],
      );
      return g;
    });
  }
  let replay: ReplayReport;
  try {
    replay = await replayInto(pool, store, p, generation, options);
    if (options.mode === 'blue-green') await swapGeneration(pool, store, p, generation, options);
  } catch (error) {
    // A blue/green rebuild that failed leaves a half-filled generation nothing reads, and the
    // next rebuild starts a new one: drop it, so no tables pile up unnoticed. The caller gets
    // the original error; what became of the generation is noted for it (rebuildFailureNote).
    let note: string;
    if (options.mode === 'blue-green') {
      try {
        await dropGeneration(pool, p, generation);
        note = `rebuild failed: its generation ${generation} of ${p.name} was dropped`;
      } catch (dropError) {
        note = `rebuild failed and its generation ${generation} of ${p.name} was KEPT (dropping it failed: ${String(dropError)}); ` +
          `drop it with dropGeneration or: projections drop-generation --projection ${p.name} --generation ${generation}`;
      }
    } else {
      note = `in-place rebuild failed: the active generation ${generation} of ${p.name} is partly refilled until a rebuild succeeds`;
    }
    if (typeof error === 'object' && error !== null) failureNotes.set(error, note);
    throw error;
  }
  return { ...replay, mode: options.mode, rebuildSeconds: (performance.now() - started) / 1000 };
}

const failureNotes = new WeakMap<object, string>();

/** What a failed `rebuild` did with its generation (dropped, kept or partly refilled), for the operator. */
export function rebuildFailureNote(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null ? failureNotes.get(error) : undefined;
}

export interface ProjectionLag {
  name: string;
  generation: number;
  checkpoint: Checkpoint;
  eventsApplied: bigint;
  /** Age of the oldest committed event not yet applied; 0 when none is waiting. */
  seconds: number;
  /** Committed events after the checkpoint, counted up to `countMax`. */
  eventsBehind: number;
}

/**
 * How far the active generation is behind the store. Uses the database clock. It counts hot
 * and archived events (`ALL_EVENTS`): a projection created after retention archived streams
 * has their events ahead of its checkpoint, and its runner applies them (through `readAll`).
 * Both reads walk the two tables' global-order indexes from the checkpoint
 * (`events_global_order_idx`, `archived_events_global_order_idx`): the age is the first row
 * of their merge, the count stops at `countMax` rows; the archive behind the checkpoint is
 * never read, so the cost is that of the hot table's count alone when nothing archived is
 * ahead (the usual case: retention archives only what every active generation has passed).
 */
export async function projectionLag(db: Queryable, name: string, countMax = 1_000_000): Promise<ProjectionLag | null> {
  const r = await db.query<CheckpointRow & { applied: string; seconds: number | null; behind: number }>(
    `SELECT pr.generation, pr.transaction_id::text AS t, pr.position::text AS p, pr.events_applied::text AS applied,
            (SELECT extract(epoch FROM clock_timestamp() - e.recorded_at)::float8 FROM ${ALL_EVENTS} e
              WHERE (e.transaction_id, e.position) > (pr.transaction_id, pr.position)
              ORDER BY e.transaction_id, e.position LIMIT 1) AS seconds,
            (SELECT count(*)::int FROM (SELECT 1 FROM ${ALL_EVENTS} e
              WHERE (e.transaction_id, e.position) > (pr.transaction_id, pr.position) LIMIT $2) x) AS behind
       FROM events.projections pr WHERE pr.name = $1 AND pr.active`,
    [name, countMax],
  );
  const row = r.rows[0];
  if (row === undefined) return null;
  return {
    name,
    generation: row.generation,
    checkpoint: rowCheckpoint(row),
    eventsApplied: BigInt(row.applied),
    seconds: Math.max(0, row.seconds ?? 0),
    eventsBehind: row.behind,
  };
}

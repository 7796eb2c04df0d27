/**
 * The ledger engine: a library over PostgreSQL, no HTTP.
 *
 * Concurrent `createTransfers` calls are coalesced into batches. A batch is one database
 * transaction of two round trips: open it (lock the accounts it touches in ascending id
 * order, reserve timestamps, read the transfers it references; see `openBatch`), decide every
 * transfer in memory (decide.ts), then write the result with one set-based statement, append
 * its events and commit, all three in the second round trip (see #writeAndCommit).
 *
 * Several batches run at once, each on its own connection, and PostgreSQL runs them on as many
 * cores. Two batches that touch the same account serialise on its row lock; this engine forms
 * its batches so that they rarely do (see #takeCalls).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { databaseCannotNow, StreamOrderConflictError, streamOrderConflict, transientDatabaseError, type EventMetadata, type EventStore, type StreamEvent } from '@ledgerline/events';
import { decideBatch, decideExpiry, type BatchDecision, type BatchState } from './decide.ts';
import { accountFlagsToMask, accountFromRow, metadataEqual, transferFromRow, type AccountRow, type TransferRow } from './rows.ts';
import { accountEvent, expiryEvent, LEDGER_SYSTEM_ACTOR, transferEvent } from './events.ts';
import {
  accountsLockedElsewhere,
  BEGIN_WRITE,
  insertAccounts,
  beginWrite,
  lockAccounts,
  openBatch,
  reserveTimestamps,
  selectAccounts,
  selectAccountTransfers,
  selectBalanceAt,
  selectDuePending,
  selectLedgerCodes,
  selectTransfers,
  writeBatchStatements,
} from './store.ts';
import {
  AccountFlag,
  TransferFlag,
  type Account,
  type AccountBalance,
  type CreateAccountResult,
  type CreateAccountResultCode,
  type CreateTransferResult,
  type LedgerInfo,
  type NewAccount,
  type NewTransfer,
  type Transfer,
  type TransferPage,
} from './types.ts';
import { assertAccountShape, assertTransferShape, ID_INT_MAX, ID_ZERO, isId, LedgerInputError, metadataValid } from './validate.ts';

/**
 * Nothing was decided, or the outcome is unknown: the database could not be reached or the
 * batch could not commit within its retries. Retrying with the same ids is always safe.
 */
export class LedgerUnavailableError extends Error {
  override readonly name = 'LedgerUnavailableError';
  /**
   * True when the connection was lost during COMMIT in any attempt of the batch: it may or may
   * not have applied, whatever the later attempts met.
   */
  readonly outcomeUnknown: boolean;
  constructor(message: string, options: { cause?: unknown; outcomeUnknown?: boolean } = {}) {
    super(message, { cause: options.cause });
    this.outcomeUnknown = options.outcomeUnknown ?? false;
  }
}

/** The queue is full: back-pressure. Nothing was queued. */
export class LedgerOverloadedError extends Error {
  override readonly name = 'LedgerOverloadedError';
}

/** The engine is closing or closed. Nothing was queued. */
export class LedgerClosedError extends Error {
  override readonly name = 'LedgerClosedError';
}

export interface LedgerEngineOptions {
  pool: pg.Pool;
  /** Nanoseconds since the Unix epoch. Injected in tests. */
  clock?: () => bigint;
  /** Most transfers in one batch (one database transaction). */
  batchSizeMax?: number;
  /** How long a batch may wait for more calls before it starts; 0 starts on the next turn. */
  batchLingerMs?: number;
  /**
   * Batches in flight at once, each in its own transaction on its own connection. Calls that
   * touch what an in-flight batch touches wait for a later batch (see #takeCalls).
   */
  batchesInFlightMax?: number;
  /** Most transfers waiting in the queue; beyond it calls fail with LedgerOverloadedError. */
  queueTransfersMax?: number;
  /** Attempts per batch on a transient database error (serialization, lost connection). */
  batchAttemptsMax?: number;
  /**
   * How long a batch of transfers waits for its account locks (default LOCK_TIMEOUT_MS_DEFAULT,
   * 10 s; below STATEMENT_TIMEOUT_MS, 30 s). A batch whose wait runs out looks for the accounts
   * another transaction holds, and runs the calls that do not need them apart from those that
   * do (see #runBatch). Account creation and the expiry sweep wait 10 s.
   */
  lockTimeoutMs?: number;
  /** Interval of the background expiry of pending transfers; 0 disables it. */
  expiryIntervalMs?: number;
  /** Most pending transfers expired per sweep transaction. */
  expiryBatchMax?: number;
  /** Called when the background expiry fails (the next sweep retries). */
  onExpiryError?: (error: unknown) => void;
  /**
   * The event store. When set, every batch appends its domain events (events.ts) in the same
   * transaction as the balance changes, so an event exists exactly when its change does.
   */
  events?: EventStore;
}

interface QueuedCall {
  transfers: NewTransfer[];
  /** The account and transfer ids the call names: two calls that share one are ordered. */
  keys: string[];
  context: EventMetadata;
  resolve: (results: CreateTransferResult[]) => void;
  reject: (error: unknown) => void;
  /** Resolved or rejected (#runBatch sets it where it answers). */
  answered: boolean;
  /** Its keys are no longer busy (#releaseIds): at its batch's end, or its part's in a split batch. */
  released: boolean;
}

export interface LedgerEngineStats {
  batches: number;
  transfers: number;
  batchAttempts: number;
  /** Mean transfers per committed batch. */
  batchSizeMean: number;
  queuedTransfers: number;
}

function defaultClock(): bigint {
  // Wall-clock nanoseconds; ledger.reserve_timestamps keeps them strictly increasing regardless.
  return BigInt(Date.now()) * 1_000_000n;
}

/** SQLSTATE lock_not_available: a lock wait ran past lock_timeout (or NOWAIT found it held). */
const LOCK_NOT_AVAILABLE = '55P03';

/** Errors that leave nothing decided and merit another attempt of the whole batch. */
function isTransient(error: unknown): boolean {
  if (transientDatabaseError(error)) return true;
  // A duplicate key: a concurrent batch (another instance) inserted one of this batch's ids
  // first; the retry reads it and answers exists. A lock not available: the same, on a lock.
  const code = (error as { code?: unknown }).code;
  if (code === '23505' || databaseCannotNow(error)) return true;
  // A cancelled statement (pg_cancel_backend, or the batch's own statement_timeout) and a
  // server short of resources (class 53: memory, disk, connections) say nothing about the
  // batch. The error is reported in a session that goes on, so the transaction did not commit
  // (mayHaveCommitted); another attempt may well succeed.
  if (code === '57014') return true;
  // A batch whose transaction id is older than a stream's last writer would reorder that
  // stream; the retry runs in a newer transaction.
  return error instanceof RetryBatch || error instanceof StreamOrderConflictError;
}

/**
 * Whether a failure of the round trip that carried COMMIT leaves the outcome unknown. Only an
 * error the server reported in a session that goes on says that the transaction did not
 * commit (PostgreSQL stopped at it, or COMMIT itself failed and rolled back). Anything else
 * may have come after the commit: the connection lost, or the session ended by the server
 * (connection exceptions, class 08; operator intervention such as pg_terminate_backend, 57P;
 * FATAL or PANIC). The codes are read as well as the severity, which a server may translate.
 */
function mayHaveCommitted(error: unknown): boolean {
  if (!(error instanceof pg.DatabaseError)) return true;
  const code = error.code ?? '';
  return code.startsWith('08') || code.startsWith('57P') || error.severity === 'FATAL' || error.severity === 'PANIC';
}

/** A pending transfer appeared after we locked accounts: lock again, with its accounts. */
class RetryBatch extends Error {}

function ignoreClientError(): void {}

const ATTEMPT_BACKOFF_MS_BASE = 5;
const ATTEMPT_BACKOFF_MS_MAX = 500;

export class LedgerEngine {
  readonly #pool: pg.Pool;
  readonly #clock: () => bigint;
  readonly #batchSizeMax: number;
  readonly #batchLingerMs: number;
  readonly #batchesInFlightMax: number;
  readonly #queueTransfersMax: number;
  readonly #batchAttemptsMax: number;
  /** A batch's BEGIN with its timeouts, the lock wait lockTimeoutMs (beginWrite). */
  readonly #beginBatch: string;
  readonly #expiryBatchMax: number;
  readonly #onExpiryError: (error: unknown) => void;
  readonly #events: EventStore | null;
  #queue: QueuedCall[] = [];
  #queuedTransfers = 0;
  #inFlight = 0;
  /** The keys of the calls in flight, with how many in-flight calls name each. */
  readonly #busy = new Map<string, number>();
  #scheduled = false;
  #closing = false;
  #drained: Array<() => void> = [];
  #expiryTimer: NodeJS.Timeout | null = null;
  #expiryRunning: Promise<unknown> | null = null;
  #stats = { batches: 0, transfers: 0, batchAttempts: 0 };

  constructor(options: LedgerEngineOptions) {
    this.#pool = options.pool;
    this.#clock = options.clock ?? defaultClock;
    this.#batchSizeMax = options.batchSizeMax ?? 2000;
    this.#batchLingerMs = options.batchLingerMs ?? 0;
    this.#batchesInFlightMax = options.batchesInFlightMax ?? 3;
    this.#queueTransfersMax = options.queueTransfersMax ?? 100_000;
    this.#batchAttemptsMax = options.batchAttemptsMax ?? 8;
    if (!(Number.isSafeInteger(this.#batchAttemptsMax) && this.#batchAttemptsMax >= 1)) throw new RangeError(`LedgerEngine: batchAttemptsMax must be a positive integer, not ${this.#batchAttemptsMax}`);
    // Checked there: below the statement timeout, or that fires first and no lock wait is ever told apart.
    this.#beginBatch = beginWrite(options.lockTimeoutMs);
    this.#expiryBatchMax = options.expiryBatchMax ?? 1000;
    this.#onExpiryError = options.onExpiryError ?? (() => {});
    this.#events = options.events ?? null;
    if (!(this.#batchSizeMax >= 1 && this.#batchesInFlightMax >= 1 && this.#queueTransfersMax >= this.#batchSizeMax)) {
      throw new RangeError('LedgerEngine: need batchSizeMax >= 1, batchesInFlightMax >= 1, queueTransfersMax >= batchSizeMax');
    }
    const expiryIntervalMs = options.expiryIntervalMs ?? 0;
    if (expiryIntervalMs > 0) {
      this.#expiryTimer = setInterval(() => {
        if (this.#expiryRunning !== null) return;
        this.#expiryRunning = this.expireAllDuePendingTransfers()
          .then(() => {})
          .catch((error: unknown) => this.#onExpiryError(error))
          .finally(() => {
            this.#expiryRunning = null;
          });
      }, expiryIntervalMs);
      this.#expiryTimer.unref();
    }
  }

  get batchSizeMax(): number {
    return this.#batchSizeMax;
  }

  stats(): LedgerEngineStats {
    const { batches, transfers, batchAttempts } = this.#stats;
    return {
      batches,
      transfers,
      batchAttempts,
      batchSizeMean: batches === 0 ? 0 : transfers / batches,
      queuedTransfers: this.#queuedTransfers,
    };
  }

  // ---------------------------------------------------------------------------------------
  // Transfers

  /**
   * Creates transfers, in order, with one result each. A linked chain must lie within one
   * call. Resolves with decided results (including rejections); rejects only when nothing was
   * decided (LedgerUnavailableError, LedgerOverloadedError, LedgerClosedError) or the call
   * breaks the API contract (LedgerInputError).
   */
  createTransfers(transfers: NewTransfer[], context: EventMetadata = {}): Promise<CreateTransferResult[]> {
    if (this.#closing) return Promise.reject(new LedgerClosedError('ledger engine is closed'));
    if (!Array.isArray(transfers)) return Promise.reject(new LedgerInputError('transfers', 'must be an array'));
    if (transfers.length > this.#batchSizeMax) {
      return Promise.reject(new LedgerInputError('transfers', `at most ${this.#batchSizeMax} per call`));
    }
    if (transfers.length === 0) return Promise.resolve([]);
    try {
      transfers.forEach(assertTransferShape);
    } catch (error) {
      return Promise.reject(error);
    }
    if (this.#queuedTransfers + transfers.length > this.#queueTransfersMax) {
      return Promise.reject(new LedgerOverloadedError(`ledger queue is full (${this.#queueTransfersMax} transfers)`));
    }
    return new Promise((resolve, reject) => {
      this.#queue.push({ transfers, keys: callKeys(transfers), context, resolve, reject, answered: false, released: false });
      this.#queuedTransfers += transfers.length;
      this.#schedule();
    });
  }

  #mayStartBatch(): boolean {
    return this.#queue.length > 0 && this.#inFlight < this.#batchesInFlightMax;
  }

  #schedule(): void {
    if (this.#scheduled || !this.#mayStartBatch()) return;
    this.#scheduled = true;
    const start = (): void => {
      this.#scheduled = false;
      this.#startBatch();
    };
    // Under load, calls pile up while batches are in flight, so batches grow by themselves.
    // When idle, a call waits only for the rest of this turn (or the linger) before it goes.
    if (this.#batchLingerMs > 0 && this.#queuedTransfers < this.#batchSizeMax) {
      setTimeout(start, this.#batchLingerMs);
    } else {
      setImmediate(start);
    }
  }

  /**
   * Takes the calls for the next batch off the queue (and its count), in queue order,
   * skipping each call that names an account or transfer id that a batch in flight names, or
   * that a call skipped before it names. Such a call would only wait on that batch's row locks, holding up the rest of its
   * batch; it goes in a later batch instead, and still after every earlier call it shares an id
   * with. (A post or void whose pending transfer's accounts it does not name may still meet a
   * lock: that costs a wait, never correctness.)
   *
   * The queue is shared out between the free batch slots, so that the batches in flight are
   * of similar size and PostgreSQL works on all of them at once. Past its share, a batch still
   * takes the calls that share an id with it (up to `batchSizeMax`): they could not run beside
   * it anyway, and would only wait for it. So a hot account that every call names makes one
   * large batch at a time, not many small ones.
   */
  #takeCalls(): QueuedCall[] {
    const freeSlots = this.#batchesInFlightMax - this.#inFlight;
    const share = Math.min(this.#batchSizeMax, Math.ceil(this.#queuedTransfers / freeSlots));
    const taken: QueuedCall[] = [];
    const left: QueuedCall[] = [];
    const takenKeys = new Set<string>();
    const skipped = new Set<string>();
    let size = 0;
    // Past the share, the scan goes on only while it keeps finding calls that share an id with
    // the batch: a long queue of unrelated calls is not walked for nothing.
    let missesPastShare = 0;
    let i = 0;
    for (; i < this.#queue.length && size < this.#batchSizeMax && missesPastShare < share; i += 1) {
      const call = this.#queue[i] as QueuedCall;
      const n = call.transfers.length;
      const blocked = call.keys.some((k) => this.#busy.has(k) || skipped.has(k));
      const pastShare = taken.length > 0 && size + n > share;
      const fits = !pastShare || (size + n <= this.#batchSizeMax && call.keys.some((k) => takenKeys.has(k)));
      if (blocked || !fits) {
        if (pastShare) missesPastShare += 1;
        for (const k of call.keys) skipped.add(k);
        left.push(call);
        continue;
      }
      taken.push(call);
      size += n;
      for (const k of call.keys) takenKeys.add(k);
    }
    if (taken.length > 0) this.#queue = i === this.#queue.length ? left : left.concat(this.#queue.slice(i));
    this.#queuedTransfers -= size;
    return taken;
  }

  #startBatch(): void {
    if (!this.#mayStartBatch()) return;
    const calls = this.#takeCalls();
    // Every queued call waits on a batch in flight; its end schedules the next.
    if (calls.length === 0) return;
    this.#inFlight += 1;
    for (const call of calls) for (const k of call.keys) this.#busy.set(k, (this.#busy.get(k) ?? 0) + 1);
    // #runBatch answers every call and does not throw; were it to throw, or to end without
    // answering a call, #releaseIds answers that call "outcome unknown" rather than leave it
    // waiting.
    let thrown: unknown;
    void this.#runBatch(calls)
      .catch((error: unknown) => {
        thrown = error;
      })
      .finally(() => {
        this.#releaseIds(calls, thrown);
        this.#inFlight -= 1;
        if (this.#inFlight === 0 && this.#queue.length === 0) {
          for (const done of this.#drained.splice(0)) done();
        }
        this.#schedule();
      });
    // Another slot may be free, and calls this batch skipped may fit in it.
    this.#schedule();
  }

  /**
   * Frees the ids of these calls (each once): when their batch ends, or earlier, when their part
   * of a batch split apart (#runBatch) has been answered, so that a later call naming only
   * their ids need not wait for the held part's retries. An id another unanswered call names
   * stays busy (the count). A call not answered by then (a bug) is answered outcome-unknown.
   */
  #releaseIds(calls: readonly QueuedCall[], cause?: unknown): void {
    let unanswered: LedgerUnavailableError | null = null;
    for (const call of calls) {
      if (call.released) continue;
      call.released = true;
      if (!call.answered) {
        unanswered ??= new LedgerUnavailableError('invariant: the batch ended without answering this call; it may have been applied; retry with the same ids', { cause, outcomeUnknown: true });
        call.answered = true;
        call.reject(unanswered);
      }
      for (const k of call.keys) {
        const n = (this.#busy.get(k) ?? 1) - 1;
        if (n === 0) this.#busy.delete(k);
        else this.#busy.set(k, n);
      }
    }
  }

  /**
   * Runs a batch, retrying it whole on transient errors. `appliedMaybe` is true when an
   * earlier attempt of these calls (before a split) may have committed; `attemptsMade`, how
   * many attempts these calls have had already (a part split off after a lock wait goes on
   * with the attempts left).
   *
   * A lock wait that runs out (lock_not_available) means another transaction holds one of the
   * batch's accounts: another ledger instance briefly, or something outside the engine (an
   * operator's open transaction, a report locking rows) for as long as it likes. Retried
   * whole, every call of the batch failed with the one that needed that account. Instead the
   * batch asks which accounts are held (`accountsLockedElsewhere`: it never waits for a row), runs the
   * calls that need none of them at once, as a batch of their own, and then retries the others
   * with the attempts they have left.
   */
  async #runBatch(calls: QueuedCall[], appliedMaybe = false, attemptsMade = 0, errorBefore?: unknown): Promise<void> {
    const segments = calls.map((c) => c.transfers);
    // What the calls are failed with when they have no attempt left (a part split off after its
    // last attempt's lock wait ran out).
    let lastError: unknown = errorBefore;
    // Sticky across attempts: once one attempt may have committed, a later attempt that fails
    // before committing proves nothing about it, so the outcome stays unknown.
    let outcomeUnknown = appliedMaybe;
    for (let attempt = attemptsMade + 1; attempt <= this.#batchAttemptsMax; attempt += 1) {
      this.#stats.batchAttempts += 1;
      try {
        const decision = await this.#attemptBatch(segments, calls.map((c) => c.context));
        this.#stats.batches += 1;
        this.#stats.transfers += segments.reduce((n, s) => n + s.length, 0);
        calls.forEach((call, i) => {
          call.answered = true;
          call.resolve(decision.results[i] as CreateTransferResult[]);
        });
        return;
      } catch (error) {
        lastError = error;
        if ((error as { duringCommit?: boolean }).duringCommit === true) outcomeUnknown = true;
        // A connection the pool could not give (#connect wraps it) is the database's weather
        // too: the README promises batchAttemptsMax attempts for it.
        if (!isTransient(error) && !(error instanceof LedgerUnavailableError)) {
          // Not the database's weather but something in this batch. Split it, so that a
          // poisoned call fails alone and its neighbours still get their results.
          if (calls.length > 1) {
            const half = Math.ceil(calls.length / 2);
            await this.#runBatch(calls.slice(0, half), outcomeUnknown);
            await this.#runBatch(calls.slice(half), outcomeUnknown);
            return;
          }
          break;
        }
        if (calls.length > 1 && (error as { code?: unknown }).code === LOCK_NOT_AVAILABLE) {
          const parted = await this.#partByLocksHeldElsewhere(calls);
          if (parted !== null) {
            // Apart, in turn (run beside the free part, a held call would hold the accounts it
            // shares with it while it waits). The free part, which the lock did not hold up,
            // keeps at least one attempt; held calls with none left are answered first.
            // Each part's ids are free once it is answered.
            const freeAttemptsMade = Math.min(attempt, this.#batchAttemptsMax - 1);
            for (const [part, made, before] of attempt >= this.#batchAttemptsMax
              ? ([[parted.held, attempt, error], [parted.free, freeAttemptsMade, undefined]] as const)
              : ([[parted.free, freeAttemptsMade, undefined], [parted.held, attempt, error]] as const)) {
              await this.#runBatch(part, outcomeUnknown, made, before);
              this.#releaseIds(part);
              this.#schedule();
            }
            return;
          }
        }
        const capMs = Math.min(ATTEMPT_BACKOFF_MS_MAX, ATTEMPT_BACKOFF_MS_BASE * 2 ** attempt);
        await sleep(Math.random() * capMs);
      }
    }
    // A call that may have committed must hear so whatever failed last, or its client may
    // take "failed" for "nothing happened". Otherwise a transient failure means nothing was
    // decided; any other error is this call's own, and is passed on as it is.
    const cause = lastError instanceof LedgerUnavailableError ? lastError.cause : lastError;
    const failure = outcomeUnknown
      ? new LedgerUnavailableError('the ledger lost its database connection while committing; the batch may have been applied; retry with the same ids', { cause, outcomeUnknown })
      : isTransient(lastError) || lastError instanceof LedgerUnavailableError
        ? new LedgerUnavailableError('the ledger could not reach its database; nothing was applied; retry with the same ids', { cause })
        : lastError;
    for (const call of calls) {
      call.answered = true;
      call.reject(failure);
    }
  }

  /**
   * The calls that need an account another transaction holds now, or come after such a call in
   * the queue and share an id with it (`held`: an account, a transfer or pending id, or a
   * pending transfer's account), and the rest (`free`), each in queue order; null when that
   * cannot be told (no account is held any more, every call or none is held, or the probe
   * failed), and the batch is retried whole as before. Calls that share an id keep their order:
   * a free call shares none with an earlier held one, so running the free part first decides
   * no call before an earlier one it shares an id with. The held calls' pending transfers'
   * accounts, which their ids do not name, are marked busy until their ids are released, so that a
   * later call on one waits in the queue, not on this engine's own row lock in a retry.
   */
  async #partByLocksHeldElsewhere(calls: QueuedCall[]): Promise<{ free: QueuedCall[]; held: QueuedCall[] } | null> {
    const accountIds = new Set<string>();
    const pendingIds = new Set<string>();
    for (const t of calls.flatMap((c) => c.transfers)) {
      for (const id of [t.debitAccountId, t.creditAccountId]) if (id !== undefined && isId(id)) accountIds.add(id);
      if (t.pendingId !== undefined && isId(t.pendingId)) pendingIds.add(t.pendingId);
    }
    let probe: Awaited<ReturnType<typeof accountsLockedElsewhere>>;
    let client: pg.PoolClient | null = null;
    let failed = false;
    try {
      client = await this.#connect();
      probe = await accountsLockedElsewhere(client, [...accountIds], [...pendingIds]);
    } catch {
      failed = true;
      return null;
    } finally {
      client?.release(failed ? true : undefined);
    }
    if (probe.locked.size === 0) return null;
    // A pending transfer's accounts: stored (the probe read them), or named by the call in this
    // batch that creates it, which the probe cannot see.
    const madeHere = new Map<string, string[]>();
    for (const t of calls.flatMap((c) => c.transfers)) {
      const accounts = [t.debitAccountId, t.creditAccountId].filter((id): id is string => id !== undefined);
      if (accounts.length > 0) madeHere.set(t.id, accounts);
    }
    const accountsOfPending = (id: string): string[] => [...(probe.pendingAccounts.get(id) ?? []), ...(madeHere.get(id) ?? [])];
    // A call's ids (account, transfer and pending ids) and its pending transfers' accounts.
    const idsOf = (call: QueuedCall): string[] => [...call.keys, ...call.transfers.flatMap((t) => (t.pendingId === undefined ? [] : accountsOfPending(t.pendingId)))];
    const held: QueuedCall[] = [];
    const free: QueuedCall[] = [];
    const heldIds = new Set<string>();
    for (const call of calls) {
      const ids = idsOf(call);
      if (ids.some((id) => probe.locked.has(id) || heldIds.has(id))) {
        held.push(call);
        for (const id of ids) heldIds.add(id);
      } else {
        free.push(call);
      }
    }
    if (held.length === 0 || free.length === 0) return null;
    for (const call of held) this.#holdIds(call, idsOf(call));
    return { free, held };
  }

  /** Marks `ids` busy for `call` until its ids are released (#releaseIds reads call.keys then). */
  #holdIds(call: QueuedCall, ids: readonly string[]): void {
    for (const id of ids) {
      if (call.keys.includes(id)) continue;
      call.keys.push(id);
      this.#busy.set(id, (this.#busy.get(id) ?? 0) + 1);
    }
  }

  async #attemptBatch(segments: NewTransfer[][], contexts: EventMetadata[]): Promise<BatchDecision> {
    const all = segments.flat();
    const ids = new Set<string>();
    const pendingIds = new Set<string>();
    const accountIds = new Set<string>();
    const usable = (id: string | undefined): id is string => id !== undefined && id !== ID_ZERO && id !== ID_INT_MAX;
    for (const t of all) {
      ids.add(t.id);
      if (usable(t.debitAccountId)) accountIds.add(t.debitAccountId);
      if (usable(t.creditAccountId)) accountIds.add(t.creditAccountId);
      // A flag counts only when it is true, as the decision reads it (rows.ts flagsToMask).
      if (usable(t.pendingId) && (t.flags?.postPendingTransfer === true || t.flags?.voidPendingTransfer === true)) {
        pendingIds.add(t.pendingId);
      }
    }
    const client = await this.#connect();
    let failed = false;
    try {
      const { accounts, firstTimestamp, transfers } = await openBatch(client, {
        accountIds: [...accountIds],
        pendingIds: [...pendingIds],
        transferIds: [...ids, ...pendingIds],
        count: all.length,
        nowNs: this.#clock(),
        begin: this.#beginBatch,
      });
      // The pending transfers' accounts were locked as of the locking statement; a pending
      // transfer committed after it began may name others. Deciding needs them locked.
      const locked = new Set(accounts.map((a) => a.id));
      for (const p of transfers) {
        if (!pendingIds.has(p.id) || p.result !== 'ok' || (p.flags & TransferFlag.pending) === 0) continue;
        for (const id of [p.debitAccountId, p.creditAccountId]) {
          if (id !== null && !locked.has(id)) {
            throw new RetryBatch(`pending transfer ${p.id} appeared concurrently`);
          }
        }
      }
      const state: BatchState = {
        accounts: new Map(accounts.map((a) => [a.id, a])),
        transfers: new Map(transfers.map((t) => [t.id, t])),
      };
      const decision = decideBatch(state, segments, firstTimestamp);
      await this.#writeAndCommit(client, state, decision, this.#batchEvents(decision, segments, contexts, firstTimestamp));
      return decision;
    } catch (error) {
      failed = true;
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      // A client that saw an error may be broken; discard it rather than reuse it.
      client.release(failed ? true : undefined);
    }
  }

  /** The events of a decided batch: one per transfer row it inserts, and one per pending transfer it expired. */
  #batchEvents(decision: BatchDecision, segments: NewTransfer[][], contexts: EventMetadata[], firstTimestamp: bigint): StreamEvent[] {
    if (this.#events === null) return [];
    // A row belongs to the call whose transfer stored it, which is not always the first call
    // that named its id: an earlier one may have named it and stored nothing (an input error,
    // a failed chain). Transfer i of the batch has the timestamp firstTimestamp + i (decideBatch),
    // and the rows come in that order, so a walk over the calls' extents finds each row's call.
    let call = 0;
    let callEnd = BigInt(segments[0]?.length ?? 0);
    const contextOf = (row: TransferRow): EventMetadata => {
      const ordinal = row.timestamp - firstTimestamp;
      while (ordinal >= callEnd && call < segments.length - 1) {
        call += 1;
        callEnd += BigInt((segments[call] as NewTransfer[]).length);
      }
      return contexts[call] ?? {};
    };
    // A pending transfer expires at the point of the batch where a transfer meets it, with
    // that transfer's timestamp (resolvedAt); the decision's later transfers see it expired
    // (a closed account reopened, a reservation released). Its event must sit at that point
    // too, just before the event of the transfer that expired it, or a reader folding the
    // stream in position order would apply the expiry after them (and reopen an account a
    // later transfer closed). Inserts come in decision order with rising timestamps, so a
    // merge by timestamp places each expiry; a tie puts the expiry first. Same single append.
    const at = (p: TransferRow): bigint => p.resolvedAt as bigint;
    const expired = decision.resolvedPending.filter((p) => p.pendingStatus === 'expired');
    expired.sort((a, b) => (at(a) < at(b) ? -1 : at(a) > at(b) ? 1 : 0));
    const entries: StreamEvent[] = [];
    let e = 0;
    for (const row of decision.inserts) {
      for (; e < expired.length && at(expired[e] as TransferRow) <= row.timestamp; e += 1) {
        entries.push(expiryEvent(expired[e] as TransferRow, { actor: LEDGER_SYSTEM_ACTOR }));
      }
      entries.push(transferEvent(row, contextOf(row)));
    }
    for (; e < expired.length; e += 1) entries.push(expiryEvent(expired[e] as TransferRow, { actor: LEDGER_SYSTEM_ACTOR }));
    return entries;
  }

  /**
   * Writes a decided batch, appends its events and commits, in one round trip: the write's
   * statements, the append and COMMIT go as one simple-protocol query, so a batch costs two
   * round trips in all, this one and the one that opened it. (Four before: one each for the
   * write, the append and COMMIT. Under load each round trip waits for this process's event
   * loop and for a core: measured in bench:ledger, a batch took 16 ms, 11 of them in those
   * three; as one, throughput rose 11–15 % and p99 latency fell 8–23 %.)
   *
   * PostgreSQL runs the statements in order and stops at the first error; the transaction is
   * then rolled back, and COMMIT never ran. Each write statement checks its own row counts
   * and raises on a mismatch (ledger.assert_rows), so a batch whose rows did not all land
   * never commits. An error the server reports in a session that goes on therefore means
   * nothing was committed. Any other failure (the connection lost, the backend terminated) may
   * have come after COMMIT took effect: it is marked `duringCommit` (mayHaveCommitted), and the
   * caller reports the outcome as unknown.
   */
  async #writeAndCommit(client: pg.PoolClient, state: BatchState, decision: BatchDecision, events: StreamEvent[]): Promise<void> {
    // The append's residency check, when the store has a policy, takes a round trip of its own.
    const append = this.#events === null ? null : await this.#events.appendStatement(client, events);
    const accounts: AccountRow[] = [];
    for (const id of decision.changedAccounts) accounts.push(state.accounts.get(id) as AccountRow);
    const statements = writeBatchStatements({ accounts, inserts: decision.inserts, resolvedPending: decision.resolvedPending });
    if (append !== null) statements.push(append);
    statements.push('COMMIT');
    try {
      await client.query(statements.join(';\n'));
    } catch (error) {
      // The append's stream-order check runs in its statement: a refusal is the server's error,
      // reported in a session that goes on, so nothing committed; the batch is retried.
      const conflict = streamOrderConflict(error);
      if (conflict !== null) throw conflict;
      if (mayHaveCommitted(error)) Object.assign(error as object, { duringCommit: true });
      throw error;
    }
  }

  /**
   * Expires every pending transfer whose timeout has passed, sweep after sweep, each
   * transaction at most `expiryBatchMax`, until one finds fewer (or the engine closes): what the
   * engine runs every `expiryIntervalMs`. A hold past its deadline still counts against its
   * accounts until a sweep (or a post or void of it) releases it, so a backlog must not outlive
   * one interval: with more expiries an interval than one sweep takes, it would grow without
   * end. Returns how many expired.
   */
  async expireAllDuePendingTransfers(): Promise<number> {
    let expired = 0;
    for (;;) {
      const n = await this.expirePendingTransfers();
      expired += n;
      if (n < this.#expiryBatchMax || this.#closing) return expired;
    }
  }

  /**
   * Expires pending transfers whose timeout has passed, at most `expiryBatchMax`, in one
   * transaction, releasing their reservations. Returns how many expired.
   */
  async expirePendingTransfers(): Promise<number> {
    const client = await this.#connect();
    let failed = false;
    try {
      await client.query(BEGIN_WRITE);
      const now = this.#clock();
      const due = await selectDuePending(client, now, this.#expiryBatchMax);
      if (due.length === 0) {
        await client.query('COMMIT');
        return 0;
      }
      const accountIds = new Set<string>();
      for (const p of due) {
        accountIds.add(p.debitAccountId as string);
        accountIds.add(p.creditAccountId as string);
      }
      const accounts = await lockAccounts(client, [...accountIds].sort());
      const firstTimestamp = await reserveTimestamps(client, due.length, now);
      // Re-read under the locks: a batch may have posted or voided some meanwhile.
      const current = await selectTransfers(client, due.map((p) => p.id));
      const state: BatchState = {
        accounts: new Map(accounts.map((a) => [a.id, a])),
        transfers: new Map(current.map((t) => [t.id, t])),
      };
      const decision = decideExpiry(state, current.sort((a, b) => (a.expiresAt as bigint) < (b.expiresAt as bigint) ? -1 : 1), firstTimestamp);
      await this.#writeAndCommit(client, state, decision, decision.resolvedPending.map((p) => expiryEvent(p, { actor: LEDGER_SYSTEM_ACTOR })));
      return decision.resolvedPending.length;
    } catch (error) {
      failed = true;
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      client.release(failed ? true : undefined);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Accounts

  /**
   * Creates accounts, one result each. Existing ids are compared field by field, so a retry
   * returns `exists` and a conflicting reuse of an id says which field differs.
   */
  async createAccounts(accounts: NewAccount[], context: EventMetadata = {}): Promise<CreateAccountResult[]> {
    if (this.#closing) throw new LedgerClosedError('ledger engine is closed');
    if (!Array.isArray(accounts)) throw new LedgerInputError('accounts', 'must be an array');
    if (accounts.length > this.#batchSizeMax) throw new LedgerInputError('accounts', `at most ${this.#batchSizeMax} per call`);
    accounts.forEach(assertAccountShape);
    if (accounts.length === 0) return [];
    const validated = accounts.map(validateAccount);
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this.#createAccountsOnce(accounts, validated, context);
      } catch (error) {
        // A connection the pool could not give (#connect wraps it) is the database's weather
        // too, retried as the batches retry it.
        const unavailable = error instanceof LedgerUnavailableError;
        if (!isTransient(error) && !unavailable) throw error;
        if (attempt >= this.#batchAttemptsMax) {
          throw new LedgerUnavailableError('the ledger could not reach its database; retry with the same ids', { cause: unavailable ? error.cause : error });
        }
        await sleep(Math.random() * Math.min(ATTEMPT_BACKOFF_MS_MAX, ATTEMPT_BACKOFF_MS_BASE * 2 ** attempt));
      }
    }
  }

  async #createAccountsOnce(
    accounts: NewAccount[],
    validated: CreateAccountResultCode[],
    context: EventMetadata,
  ): Promise<CreateAccountResult[]> {
    const results: CreateAccountResult[] = accounts.map((a, i) => ({ id: a.id, result: validated[i] as CreateAccountResultCode, timestamp: null }));
    const client = await this.#connect();
    let failed = false;
    try {
      await client.query(BEGIN_WRITE);
      const candidates = accounts.map((a, i) => ({ a, i })).filter(({ i }) => (results[i] as CreateAccountResult).result === 'ok');
      const knownLedgers = await selectLedgerCodes(client, [...new Set(candidates.map(({ a }) => a.ledger))]);
      const firstTimestamp = await reserveTimestamps(client, accounts.length, this.#clock());
      const existing = new Map((await selectAccounts(client, candidates.map(({ a }) => a.id))).map((r) => [r.id, r]));
      type AccountInsert = { id: string; ledger: string; code: number; flags: number; metadata: Record<string, string>; timestamp: bigint };
      const toInsert: AccountInsert[] = [];
      // Earlier accounts of this same call count as existing for the ones after them.
      const inThisCall = new Map<string, AccountInsert>();
      for (const { a, i } of candidates) {
        const result = results[i] as CreateAccountResult;
        const prior = existing.get(a.id);
        const known = prior ?? inThisCall.get(a.id);
        if (known !== undefined) {
          result.result = compareAccount(a, known);
          result.timestamp = prior?.timestamp ?? null;
          continue;
        }
        if (!knownLedgers.has(a.ledger)) {
          result.result = 'ledger_not_found';
          continue;
        }
        const row: AccountInsert = {
          id: a.id,
          ledger: a.ledger,
          code: a.code,
          flags: accountFlagsToMask(a.flags) & SETTABLE_ACCOUNT_FLAGS,
          metadata: a.metadata ?? {},
          timestamp: firstTimestamp + BigInt(i),
        };
        inThisCall.set(a.id, row);
        toInsert.push(row);
        result.timestamp = row.timestamp;
      }
      const inserted = await insertAccounts(client, toInsert);
      // Another call created one of these ids after our read: try again, and compare with it.
      if (inserted.size !== toInsert.length) throw new RetryBatch('an account was created concurrently');
      await this.#events?.appendMany(client, toInsert.map((row) => accountEvent(row, context)));
      await client.query('COMMIT');
      return results;
    } catch (error) {
      failed = true;
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      client.release(failed ? true : undefined);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Queries

  async getAccount(id: string): Promise<Account | null> {
    const [row] = await this.#read((c) => selectAccounts(c, [id]));
    return row === undefined ? null : accountFromRow(row);
  }

  async getAccounts(ids: string[]): Promise<Account[]> {
    const rows = await this.#read((c) => selectAccounts(c, ids));
    return rows.map(accountFromRow);
  }

  async getTransfer(id: string): Promise<Transfer | null> {
    const [row] = await this.#read((c) => selectTransfers(c, [id]));
    return row === undefined ? null : transferFromRow(row);
  }

  /** An account's applied transfers, by timestamp, with keyset pagination. */
  async listAccountTransfers(
    accountId: string,
    options: { limit?: number; order?: 'asc' | 'desc'; after?: bigint | null } = {},
  ): Promise<TransferPage> {
    const limit = options.limit ?? 50;
    if (!Number.isInteger(limit) || limit < 1 || limit > 1000) throw new LedgerInputError('limit', 'must be 1..1000');
    const rows = await this.#read((c) =>
      selectAccountTransfers(c, accountId, { limit, order: options.order ?? 'desc', after: options.after ?? null }),
    );
    const last = rows.at(-1);
    return { transfers: rows.map(transferFromRow), nextCursor: rows.length === limit && last !== undefined ? last.timestamp : null };
  }

  /** An account's balances as they stood just after the given ledger timestamp. */
  async getAccountBalanceAt(accountId: string, timestamp: bigint): Promise<AccountBalance | null> {
    const account = await this.getAccount(accountId);
    if (account === null || account.timestamp > timestamp) return null;
    const b = await this.#read((c) => selectBalanceAt(c, accountId, timestamp));
    return { accountId, timestamp, ...b };
  }

  async listLedgers(): Promise<LedgerInfo[]> {
    return this.#read(async (c) => {
      const r = await c.query<LedgerInfo>('SELECT code, scale, description FROM ledger.ledgers ORDER BY code');
      return r.rows;
    });
  }

  async #connect(): Promise<pg.PoolClient> {
    let client: pg.PoolClient;
    try {
      client = await this.#pool.connect();
    } catch (error) {
      throw new LedgerUnavailableError('the ledger could not reach its database; nothing was applied', { cause: error });
    }
    // A backend that dies between two queries emits 'error' on the checked-out client; with
    // no listener that event would crash the process. The next query fails and is handled.
    if (client.listenerCount('error') === 0) client.on('error', ignoreClientError);
    return client;
  }

  async #read<T>(fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    const client = await this.#connect();
    let failed = false;
    try {
      return await fn(client);
    } catch (error) {
      failed = true;
      if (isTransient(error)) throw new LedgerUnavailableError('the ledger lost its database connection', { cause: error });
      throw error;
    } finally {
      client.release(failed ? true : undefined);
    }
  }

  /** Stops accepting calls and waits until every queued and in-flight batch has finished. */
  async close(): Promise<void> {
    this.#closing = true;
    if (this.#expiryTimer !== null) clearInterval(this.#expiryTimer);
    if (this.#expiryRunning !== null) await this.#expiryRunning;
    if (this.#inFlight === 0 && this.#queue.length === 0) return;
    await new Promise<void>((resolve) => this.#drained.push(resolve));
  }
}

/** What a call names: its transfers' ids, their accounts and the pending transfers they resolve. */
function callKeys(transfers: readonly NewTransfer[]): string[] {
  const keys = new Set<string>();
  for (const t of transfers) {
    keys.add(t.id);
    if (t.debitAccountId !== undefined) keys.add(t.debitAccountId);
    if (t.creditAccountId !== undefined) keys.add(t.creditAccountId);
    if (t.pendingId !== undefined) keys.add(t.pendingId);
  }
  return [...keys];
}

const SETTABLE_ACCOUNT_FLAGS = AccountFlag.debitsMustNotExceedCredits | AccountFlag.creditsMustNotExceedDebits;

function validateAccount(a: NewAccount): CreateAccountResultCode {
  if (a.id === ID_ZERO) return 'id_must_not_be_zero';
  if (a.id === ID_INT_MAX) return 'id_must_not_be_int_max';
  if (a.flags?.debitsMustNotExceedCredits === true && a.flags.creditsMustNotExceedDebits === true) {
    return 'flags_are_mutually_exclusive';
  }
  if (a.ledger === undefined || a.ledger === '') return 'ledger_must_not_be_empty';
  if (a.code === undefined || a.code === 0) return 'code_must_not_be_zero';
  if (!metadataValid(a.metadata)) return 'metadata_invalid';
  return 'ok';
}

function compareAccount(
  a: NewAccount,
  e: { ledger: string; code: number; flags: number; metadata: Record<string, string> },
): CreateAccountResultCode {
  // `closed` is state, not part of the request: compare only the flags a client can set.
  if ((accountFlagsToMask(a.flags) & SETTABLE_ACCOUNT_FLAGS) !== (e.flags & SETTABLE_ACCOUNT_FLAGS)) return 'exists_with_different_flags';
  if (a.ledger !== e.ledger) return 'exists_with_different_ledger';
  if (a.code !== e.code) return 'exists_with_different_code';
  if (!metadataEqual(a.metadata ?? {}, e.metadata)) return 'exists_with_different_metadata';
  return 'exists';
}



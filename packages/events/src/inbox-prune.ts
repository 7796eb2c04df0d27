/**
 * Inbox pruning: keeps a consumer's inbox from growing for good, without weakening
 * exactly-once.
 *
 * The inbox holds a row per event a consumer handled, and that row is what makes a later copy
 * of the event a duplicate: a redelivery after a consumer reset, a relay's republish, a
 * dead-letter replay for another consumer. A row may go only once something else says the same.
 * Here that is the consumer's inbox horizon (events.inbox_horizons, migration 1770600000000): a
 * point in the global order (transaction id, position) at or before which every event was
 * handled, or is listed open (events.inbox_open). The claim (EventConsumer) skips an event at or
 * before the horizon unless it is open, in the statement that inserts its inbox rows.
 *
 * The prune walks the global order from the horizon, one page at a time, over the hot and
 * archived events and those retention deleted, and passes an event only when it was recorded
 * before `before` (a deleted event's time is gone; retention deletes only what is years old)
 * and is one of:
 * - handled (an inbox row): the row is removed;
 * - dead-lettered, or withheld by the relay (kept by retention's record when it deleted the
 *   event), and not handled: listed open, so that a replay (or a copy that reached the broker
 *   after all) still takes effect once.
 * It stops at the first event that is none of these, one the consumer still owes (it is behind,
 * or skipped it, or retention deleted it before the consumer handled it), and names it: the
 * horizon never passes such an event. It reads only below the
 * read horizon (`readHorizon`), so no transaction still running can add an event at or before
 * the horizon it sets. Retention's deletions from before that migration have no place in the
 * global order: while the consumer owes one of them, nothing is passed.
 *
 * Each page takes two steps. First, in one transaction, the horizon moves past the page (and
 * `pending_*` records where the page began) and the page's open events are listed. Then, once no
 * session of the database holds a snapshot taken before that commit (each one's xmin is past its
 * transaction id), the inbox rows of the page's events are removed, but for those of open events
 * (one handled meanwhile keeps its row, which then skips its next copy), and `pending_*` is
 * cleared. A claim's statement runs under one snapshot: taken before the move, it finds the rows
 * (still there); taken after, it finds the horizon. So this holds in any isolation level, and a
 * claim never waits for a prune: the prune waits for snapshots instead, up to
 * `snapshotWaitMs`, and stops if one stays older (a long transaction), leaving the page's rows
 * to the next run, which removes what `pending_*` names first. The wait is conservative: a
 * snapshot taken after the move whose xmin is older still (a transaction that began before it is
 * running) is waited for too.
 *
 * One prune at a time per consumer: a run holds a session-scoped advisory lock
 * (`inboxPruneLockKey`) on its own connection, and a second run is refused
 * (InboxPruneBusyError). Claims take no lock.
 *
 * Not while the release before runs: its claim does not read the horizon. A prune refuses a
 * consumer that no instance of this release has registered (events.consumers
 * .horizon_claims_since); that every instance runs this release is the operator's to ensure.
 *
 * Assumed, as reconciliation assumes: the consumer receives every event (its filter subject is
 * not recorded). Not removed: the rows of open events handled after the prune that listed them
 * (the horizon covers them too; they are merely kept).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { readHorizon } from './horizon.ts';
import type { Checkpoint } from './store.ts';
import { inTransaction } from './transaction.ts';

/**
 * The session advisory lock key of a consumer's prunes (one run at a time), as SQL over `$n`, the
 * consumer's name: 64 bits, so that two names do not share a lock (a review found two names whose
 * 32-bit `hashtext` collide), prefixed as the other locks of the framework are.
 */
export function inboxPruneLockKey(param: string): string {
  return `hashtextextended('inbox-prune:' || ${param}, 0)`;
}

export interface PruneInboxOptions {
  pool: pg.Pool;
  /** A registered consumer (events.consumers). */
  consumer: string;
  /** Only events recorded before this time are passed. */
  before: Date;
  /** Events judged per page, and inbox rows removed per statement. */
  pageSize?: number;
  /** Stop once this many events were passed (bounded runs); no bound by default. */
  maxEvents?: number;
  /** How long a page's rows wait for the snapshots older than its horizon to end (default 30 s). */
  snapshotWaitMs?: number;
  onProgress?: (message: string) => void;
}

/** An event the prune stopped at: the consumer has neither handled nor dead-lettered it. */
export interface UnhandledEvent {
  eventId: string;
  /** Null for an event retention deleted before its place in the global order was kept. */
  transactionId: bigint | null;
  position: bigint;
  /** Null for an event retention deleted (its time went with it). */
  recordedAt: Date | null;
  deleted: boolean;
}

export type PruneStop =
  /** Reached an event recorded at or after `before`. */
  | { reason: 'before' }
  /** Reached the read horizon: every readable event was passed. */
  | { reason: 'read_horizon' }
  /** Reached an event the consumer owes (behind, or skipped it): a gap to look at. */
  | { reason: 'unhandled'; event: UnhandledEvent }
  /** Passed `maxEvents`. */
  | { reason: 'max_events' }
  /**
   * A snapshot older than the last page's horizon outlived `snapshotWaitMs`: the horizon moved,
   * the page's rows stay until a later run removes them.
   */
  | { reason: 'snapshots'; backends: number };

export interface PruneInboxReport {
  consumer: string;
  before: string;
  /** The horizon before and after; null where the consumer had none. */
  from: Checkpoint | null;
  through: Checkpoint | null;
  eventsPassed: number;
  inboxRowsRemoved: number;
  /** Events passed that the consumer had not handled, listed open: dead-lettered, or withheld by the relay. */
  opened: number;
  /** Of those, withheld by the relay. */
  withheld: number;
  stop: PruneStop;
}

/** Another prune of the same consumer is running. */
export class InboxPruneBusyError extends Error {
  override readonly name = 'InboxPruneBusyError';
}

interface PageRow {
  event_id: string;
  transaction_id: string;
  position: string;
  recorded_at: Date | null;
  deleted: boolean;
  old: boolean;
  handled: boolean;
  dead: boolean;
  withheld: boolean;
}

/** The global order's events after a checkpoint: hot, archived, and deleted with their place kept. */
const EVENTS_AFTER = `SELECT event_id, transaction_id, position, recorded_at, false AS deleted, false AS withheld FROM events.events
        UNION ALL SELECT event_id, transaction_id, position, recorded_at, false, false FROM events.archived_events
        UNION ALL SELECT event_id, transaction_id, position, NULL, true, withheld FROM events.deleted_events WHERE transaction_id IS NOT NULL`;

const PAGE_SQL = `SELECT e.event_id::text, e.transaction_id::text, e.position::text, e.recorded_at, e.deleted,
       (e.deleted OR e.recorded_at < $4) AS old,
       EXISTS (SELECT 1 FROM events.inbox i WHERE i.consumer = $5 AND i.event_id = e.event_id) AS handled,
       EXISTS (SELECT 1 FROM events.dead_letters d WHERE d.consumer = $5 AND d.event_id = e.event_id) AS dead,
       (e.withheld OR EXISTS (SELECT 1 FROM events.relay_withheld w WHERE w.event_id = e.event_id)) AS withheld
  FROM (${EVENTS_AFTER}) e
 WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2::bigint) AND e.transaction_id < $3::text::xid8
 ORDER BY e.transaction_id, e.position
 LIMIT $6`;

/** Retention's deletions from before their place was kept that the consumer owes. */
const OWED_UNPLACED_SQL = `SELECT d.event_id::text, d.position::text FROM events.deleted_events d
  WHERE d.transaction_id IS NULL
    AND NOT EXISTS (SELECT 1 FROM events.inbox i WHERE i.consumer = $1 AND i.event_id = d.event_id)
    AND NOT EXISTS (SELECT 1 FROM events.dead_letters x WHERE x.consumer = $1 AND x.event_id = d.event_id)
  ORDER BY d.position LIMIT 1`;

interface HorizonRow {
  transaction_id: string;
  position: string;
  pending_transaction_id: string | null;
  pending_position: string | null;
}

interface Horizon {
  at: Checkpoint;
  /** Where the rows still to remove begin (exclusive), or null. */
  pending: Checkpoint | null;
}

function isStart(c: Checkpoint): boolean {
  return c.transactionId === 0n && c.position === 0n;
}

async function readHorizonRow(db: Pick<pg.ClientBase, 'query'>, consumer: string): Promise<Horizon | null> {
  const r = await db.query<HorizonRow>(
    `SELECT transaction_id::text, position::text, pending_transaction_id::text, pending_position::text
       FROM events.inbox_horizons WHERE consumer = $1`,
    [consumer],
  );
  const row = r.rows[0];
  if (row === undefined) return null;
  return {
    at: { transactionId: BigInt(row.transaction_id), position: BigInt(row.position) },
    pending:
      row.pending_transaction_id === null || row.pending_position === null
        ? null
        : { transactionId: BigInt(row.pending_transaction_id), position: BigInt(row.pending_position) },
  };
}

/** The consumer's inbox horizon (`pruneInbox`), or null before its first prune. */
export async function inboxHorizon(db: Pick<pg.ClientBase, 'query'>, consumer: string): Promise<Checkpoint | null> {
  const h = await readHorizonRow(db, consumer);
  return h === null || isStart(h.at) ? null : h.at;
}

/** Prunes `consumer`'s inbox up to `before`, page by page (see the module's comment). */
export async function pruneInbox(options: PruneInboxOptions): Promise<PruneInboxReport> {
  const { pool, consumer, before } = options;
  const pageSize = options.pageSize ?? 5000;
  const maxEvents = options.maxEvents ?? Number.POSITIVE_INFINITY;
  const snapshotWaitMs = options.snapshotWaitMs ?? 30_000;
  if (!Number.isInteger(pageSize) || pageSize < 1) throw new RangeError('pageSize must be an integer >= 1');
  if (!(maxEvents >= 1)) throw new RangeError('maxEvents must be >= 1');
  if (!(snapshotWaitMs >= 0)) throw new RangeError('snapshotWaitMs must be >= 0');
  if (Number.isNaN(before.getTime())) throw new RangeError('before is not a valid date');
  // One connection holds the prune's lock while the others work.
  if ((pool.options.max ?? 10) < 2) throw new RangeError('pruneInbox needs a pool of at least 2 connections');
  const registered = await pool.query<{ horizon_claims_since: Date | null }>('SELECT horizon_claims_since FROM events.consumers WHERE name = $1', [consumer]);
  const row = registered.rows[0];
  if (row === undefined) throw new RangeError(`consumer ${consumer} is not registered in events.consumers`);
  if (row.horizon_claims_since === null) {
    throw new RangeError(
      `consumer ${consumer} has not been started on a release whose claim reads the inbox horizon (events.consumers.horizon_claims_since is empty): ` +
        'an instance of the release before would apply the copy of a pruned event again; start every instance on this release first',
    );
  }

  // The lock's connection stays idle (no snapshot) while the run works on others.
  const lock = await pool.connect();
  let released = false;
  try {
    const got = await lock.query<{ ok: boolean }>(`SELECT pg_try_advisory_lock(${inboxPruneLockKey('$1')}) AS ok`, [consumer]);
    if (got.rows[0]?.ok !== true) {
      released = true;
      throw new InboxPruneBusyError(`another prune of ${consumer}'s inbox is running`);
    }
    try {
      return await pruneLocked(pool, consumer, before, pageSize, maxEvents, snapshotWaitMs, options.onProgress);
    } finally {
      released = await lock
        .query<{ ok: boolean }>(`SELECT pg_advisory_unlock(${inboxPruneLockKey('$1')}) AS ok`, [consumer])
        .then((r) => r.rows[0]?.ok === true, () => false);
    }
  } finally {
    // A connection whose unlock failed is closed, and its session lock goes with it.
    lock.release(released ? undefined : true);
  }
}

async function pruneLocked(
  pool: pg.Pool,
  consumer: string,
  before: Date,
  pageSize: number,
  maxEvents: number,
  snapshotWaitMs: number,
  onProgress: ((message: string) => void) | undefined,
): Promise<PruneInboxReport> {
  await pool.query('INSERT INTO events.inbox_horizons (consumer, transaction_id, position) VALUES ($1, \'0\', 0) ON CONFLICT DO NOTHING', [consumer]);
  const first = (await readHorizonRow(pool, consumer)) as Horizon;
  const report: PruneInboxReport = {
    consumer,
    before: before.toISOString(),
    from: isStart(first.at) ? null : first.at,
    through: isStart(first.at) ? null : first.at,
    eventsPassed: 0,
    inboxRowsRemoved: 0,
    opened: 0,
    withheld: 0,
    stop: { reason: 'read_horizon' },
  };
  // Rows an earlier run left between its two steps.
  if (first.pending !== null) {
    const left = await removeCoveredRows(pool, consumer, first, snapshotWaitMs);
    if (typeof left !== 'number') {
      report.stop = left;
      return report;
    }
    report.inboxRowsRemoved += left;
  }
  const owed = await pool.query<{ event_id: string; position: string }>(OWED_UNPLACED_SQL, [consumer]);
  const unplaced = owed.rows[0];
  if (unplaced !== undefined) {
    report.stop = {
      reason: 'unhandled',
      event: { eventId: unplaced.event_id, transactionId: null, position: BigInt(unplaced.position), recordedAt: null, deleted: true },
    };
    return report;
  }

  let horizon = first.at;
  for (;;) {
    const readable = await readHorizon(pool);
    const limit = Math.min(pageSize, maxEvents - report.eventsPassed);
    const page = await pool.query<PageRow>(PAGE_SQL, [
      horizon.transactionId.toString(),
      horizon.position.toString(),
      readable.toString(),
      before,
      consumer,
      limit,
    ]);
    const open: string[] = [];
    let withheld = 0;
    let passed = 0;
    let last: Checkpoint | null = null;
    let stop: PruneStop | null = null;
    for (const r of page.rows) {
      if (!r.old) {
        stop = { reason: 'before' };
        break;
      }
      if (!r.handled) {
        if (!r.dead && !r.withheld) {
          const event = {
            eventId: r.event_id,
            transactionId: BigInt(r.transaction_id),
            position: BigInt(r.position),
            recordedAt: r.recorded_at,
            deleted: r.deleted,
          };
          stop = { reason: 'unhandled', event };
          break;
        }
        open.push(r.event_id);
        if (!r.dead) withheld += 1;
      }
      passed += 1;
      last = { transactionId: BigInt(r.transaction_id), position: BigInt(r.position) };
    }
    if (stop === null && page.rows.length < limit) stop = { reason: 'read_horizon' };
    if (last !== null) {
      const moved = await moveHorizon(pool, consumer, horizon, last, open);
      horizon = last;
      report.through = last;
      report.eventsPassed += passed;
      report.opened += open.length;
      report.withheld += withheld;
      const removed = await removeCoveredRows(pool, consumer, moved, snapshotWaitMs);
      if (typeof removed !== 'number') {
        report.stop = removed;
        return report;
      }
      report.inboxRowsRemoved += removed;
      onProgress?.(`${consumer}: ${report.eventsPassed} events passed, ${report.inboxRowsRemoved} inbox rows removed`);
    }
    if (stop !== null) {
      report.stop = stop;
      return report;
    }
    if (report.eventsPassed >= maxEvents) {
      report.stop = { reason: 'max_events' };
      return report;
    }
  }
}

/**
 * The first step of a page: moves the horizon from `from` to `to` (the rows from `from` on are
 * then pending) and lists the open events, in one transaction. Returns the horizon as set, with
 * the transaction's id for the wait.
 */
async function moveHorizon(
  pool: pg.Pool,
  consumer: string,
  from: Checkpoint,
  to: Checkpoint,
  open: readonly string[],
): Promise<Horizon & { movedBy: bigint }> {
  return inTransaction(pool, async (client) => {
    if (open.length > 0) {
      await client.query(
        "INSERT INTO events.inbox_open (consumer, event_id) SELECT $1, unnest(string_to_array($2, ',')::uuid[]) ON CONFLICT DO NOTHING",
        [consumer, open.join(',')],
      );
    }
    // The runs of one consumer are serialised (the prune lock), so the horizon is still `from`;
    // checked all the same, since rows will be removed on the strength of it.
    const r = await client.query<{ moved_by: string }>(
      `UPDATE events.inbox_horizons
          SET transaction_id = $4::text::xid8, position = $5, updated_at = now(),
              pending_transaction_id = $2::text::xid8, pending_position = $3
        WHERE consumer = $1 AND transaction_id = $2::text::xid8 AND position = $3 AND pending_position IS NULL
        RETURNING pg_current_xact_id()::text AS moved_by`,
      [consumer, from.transactionId.toString(), from.position.toString(), to.transactionId.toString(), to.position.toString()],
    );
    const movedBy = r.rows[0]?.moved_by;
    if (movedBy === undefined) throw new Error(`invariant: ${consumer}'s inbox horizon is no longer the one this prune read`);
    return { at: to, pending: from, movedBy: BigInt(movedBy) };
  });
}

/**
 * The second step: once no session of this database holds a snapshot from before the
 * horizon moved, removes the inbox rows of the events from `pending` (exclusive) to the horizon
 * (inclusive) and clears `pending`. Returns the rows removed, or the stop when the wait ran out.
 */
async function removeCoveredRows(
  pool: pg.Pool,
  consumer: string,
  horizon: Horizon & { movedBy?: bigint },
  snapshotWaitMs: number,
): Promise<number | PruneStop> {
  const pending = horizon.pending;
  if (pending === null) return 0;
  // An earlier run's move: any transaction id from now on is at least as new as it.
  const movedBy = horizon.movedBy ?? BigInt((await pool.query<{ x: string }>('SELECT pg_current_xact_id()::text AS x')).rows[0]?.x ?? '0');
  const waited = await waitForSnapshotsAfter(pool, movedBy, snapshotWaitMs);
  if (waited > 0) return { reason: 'snapshots', backends: waited };
  // Not the rows of open events: one listed open and handled meanwhile (a replay claimed it
  // after the page was read, or its claim committed during the wait) keeps its row, which is
  // then what skips its next copy. Without the row, the open entry would let that copy in again.
  const removed = await pool.query(
    `DELETE FROM events.inbox i USING (${EVENTS_AFTER}) e
      WHERE i.consumer = $1 AND i.event_id = e.event_id
        AND (e.transaction_id, e.position) > ($2::text::xid8, $3::bigint) AND (e.transaction_id, e.position) <= ($4::text::xid8, $5::bigint)
        AND NOT EXISTS (SELECT 1 FROM events.inbox_open o WHERE o.consumer = i.consumer AND o.event_id = i.event_id)`,
    [consumer, pending.transactionId.toString(), pending.position.toString(), horizon.at.transactionId.toString(), horizon.at.position.toString()],
  );
  const count = removed.rowCount ?? 0;
  // Only the record this step read: behind a pooler that pools transactions (where the prune's
  // session lock does not hold) another run's newer record stays.
  await pool.query(
    `UPDATE events.inbox_horizons SET pending_transaction_id = NULL, pending_position = NULL, pruned = pruned + $2
      WHERE consumer = $1 AND pending_transaction_id = $3::text::xid8 AND pending_position = $4`,
    [consumer, count, pending.transactionId.toString(), pending.position.toString()],
  );
  return count;
}

/**
 * Waits until no other session of this database holds a snapshot whose xmin is at or before
 * transaction `xid` (a snapshot that may not see it), up to `timeoutMs`. Returns how many still
 * did when it gave up (0: none left). A backend's xmin is a 32-bit id; `age()` compares it with
 * `xid`'s low 32 bits, valid within 2^31 transactions. Every session of the database counts
 * but autovacuum workers (they never claim): `backend_type` is null for another role's sessions
 * unless this role may read all statistics, and null counts, while `backend_xmin` is shown to
 * every role (a prune run as an
 * operator's role, filtering on `backend_type`, saw none of the consumer's snapshots and removed
 * rows a claim under one of them still needed: a review proved the double effect).
 */
async function waitForSnapshotsAfter(pool: pg.Pool, xid: bigint, timeoutMs: number): Promise<number> {
  const xid32 = (xid & 0xffffffffn).toString();
  const sql = `SELECT pg_stat_clear_snapshot();
    SELECT count(*)::int AS n FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type IS DISTINCT FROM 'autovacuum worker'
       AND backend_xmin IS NOT NULL AND age(backend_xmin) >= age('${xid32}'::xid)`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const results = (await pool.query(sql)) as unknown as Array<pg.QueryResult<{ n: number }>>;
    const n = results.at(-1)?.rows[0]?.n ?? 0;
    if (n === 0 || Date.now() >= deadline) return n;
    await sleep(20);
  }
}

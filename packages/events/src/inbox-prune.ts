/**
 * Inbox pruning: keeps a consumer's inbox from growing for good, without weakening
 * exactly-once.
 *
 * The inbox holds a row per event a consumer handled, and that row is what makes a later copy
 * of the event a duplicate: a redelivery after a consumer reset, a relay's republish, a
 * dead-letter replay for another consumer. A row may go only once something else says the same.
 * Here that is the consumer's inbox horizon (events.inbox_horizons, migration 1770600000000): a
 * point in the global order (transaction id, position) at or before which every event was
 * handled, withheld by the relay, or is listed open (events.inbox_open). The claim
 * (EventConsumer) skips an event at or before the horizon unless it is open, so the rows the
 * prune removes are no longer needed to skip anything.
 *
 * The prune walks the global order from the horizon, one page at a time, and passes an event
 * only when it was recorded before `before` and is one of:
 * - handled (an inbox row): the row is removed;
 * - dead-lettered and not handled: listed open, so that a replay still applies it once;
 * - withheld by the relay under the residency policy: never published, nothing to remove.
 * It stops at the first event that is none of these (the consumer has not handled it: it is
 * behind, or skipped it) and reports it: the horizon never passes an event the consumer still
 * owes. It reads only below the read horizon (`readHorizon`), so no transaction still running
 * can add an event at or before the horizon it sets.
 *
 * Each page is judged outside any lock, then applied in one transaction that holds the
 * consumer's inbox lock exclusively (class 0x4c4c4942): every claim transaction holds it
 * shared from its first statement (events.inbox_claim_horizon), so the prune waits for the
 * claims in flight and the claims after it read the new horizon. Claims of that consumer wait
 * while a page is applied (a DELETE of up to `pageSize` rows by key). The transaction checks
 * that the horizon is still the one the page was read from (another prune may have moved it)
 * and reads the page again if not. An event judged unhandled may be handled meanwhile: the
 * prune stops before it, or lists it open when it had a dead letter; an open event that is also
 * handled is skipped by its inbox row, as before.
 *
 * Assumed, as reconciliation assumes: the consumer receives every event (its filter subject is
 * not recorded). Not removed: the inbox rows of events retention deleted (events.deleted_events
 * has no transaction id to place them by), and those of open events handled after the prune.
 */
import type pg from 'pg';
import { readHorizon } from './horizon.ts';
import type { Checkpoint } from './store.ts';
import { commit } from './transaction.ts';

/** The advisory lock class of the inbox (migration 1770600000000's `inbox_claim_horizon`). */
export const INBOX_LOCK_CLASS = 0x4c4c4942; // "LLIB"

export interface PruneInboxOptions {
  pool: pg.Pool;
  /** A registered consumer (events.consumers). */
  consumer: string;
  /** Only events recorded before this time are passed. */
  before: Date;
  /** Events judged per page, and inbox rows removed per transaction. */
  pageSize?: number;
  /** Stop once this many events were passed (bounded runs); no bound by default. */
  maxEvents?: number;
  onProgress?: (message: string) => void;
}

/** An event the prune stopped at: the consumer has neither handled nor dead-lettered it. */
export interface UnhandledEvent {
  eventId: string;
  transactionId: bigint;
  position: bigint;
  recordedAt: Date;
}

export type PruneStop =
  /** Reached an event recorded at or after `before`. */
  | { reason: 'before' }
  /** Reached the read horizon: every readable event was passed. */
  | { reason: 'read_horizon' }
  /** Reached an event the consumer owes (behind, or skipped it): a gap to look at. */
  | { reason: 'unhandled'; event: UnhandledEvent }
  /** Passed `maxEvents`. */
  | { reason: 'max_events' };

export interface PruneInboxReport {
  consumer: string;
  before: string;
  /** The horizon before and after; null where the consumer had none. */
  from: Checkpoint | null;
  through: Checkpoint | null;
  eventsPassed: number;
  inboxRowsRemoved: number;
  /** Dead-lettered events passed, listed open for a replay. */
  opened: number;
  /** Events the relay withheld, passed. */
  withheld: number;
  stop: PruneStop;
}

interface PageRow {
  event_id: string;
  transaction_id: string;
  position: string;
  recorded_at: Date;
  old: boolean;
  handled: boolean;
  dead: boolean;
  withheld: boolean;
}

const PAGE_SQL = `SELECT e.event_id::text, e.transaction_id::text, e.position::text, e.recorded_at, e.recorded_at < $4 AS old,
       EXISTS (SELECT 1 FROM events.inbox i WHERE i.consumer = $5 AND i.event_id = e.event_id) AS handled,
       EXISTS (SELECT 1 FROM events.dead_letters d WHERE d.consumer = $5 AND d.event_id = e.event_id) AS dead,
       EXISTS (SELECT 1 FROM events.relay_withheld w WHERE w.event_id = e.event_id) AS withheld
  FROM (SELECT event_id, transaction_id, position, recorded_at FROM events.events
        UNION ALL SELECT event_id, transaction_id, position, recorded_at FROM events.archived_events) e
 WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2::bigint) AND e.transaction_id < $3::text::xid8
 ORDER BY e.transaction_id, e.position
 LIMIT $6`;

function sameCheckpoint(a: Checkpoint | null, b: Checkpoint | null): boolean {
  return a === null || b === null ? a === b : a.transactionId === b.transactionId && a.position === b.position;
}

async function horizonOf(db: Pick<pg.ClientBase, 'query'>, consumer: string, lock = ''): Promise<Checkpoint | null> {
  const r = await db.query<{ transaction_id: string; position: string }>(
    `SELECT transaction_id::text, position::text FROM events.inbox_horizons WHERE consumer = $1 ${lock}`,
    [consumer],
  );
  const row = r.rows[0];
  return row === undefined ? null : { transactionId: BigInt(row.transaction_id), position: BigInt(row.position) };
}

/** The consumer's inbox horizon (`pruneInbox`), or null before its first prune. */
export function inboxHorizon(db: Pick<pg.ClientBase, 'query'>, consumer: string): Promise<Checkpoint | null> {
  return horizonOf(db, consumer);
}

/** Prunes `consumer`'s inbox up to `before`, page by page (see the module's comment). */
export async function pruneInbox(options: PruneInboxOptions): Promise<PruneInboxReport> {
  const { pool, consumer, before } = options;
  const pageSize = options.pageSize ?? 5000;
  const maxEvents = options.maxEvents ?? Number.POSITIVE_INFINITY;
  if (!Number.isInteger(pageSize) || pageSize < 1) throw new RangeError('pageSize must be an integer >= 1');
  if (!(maxEvents >= 1)) throw new RangeError('maxEvents must be >= 1');
  if (Number.isNaN(before.getTime())) throw new RangeError('before is not a valid date');
  const registered = await pool.query('SELECT 1 FROM events.consumers WHERE name = $1', [consumer]);
  if (registered.rowCount === 0) throw new RangeError(`consumer ${consumer} is not registered in events.consumers`);

  const from = await horizonOf(pool, consumer);
  let horizon = from;
  const report: PruneInboxReport = {
    consumer,
    before: before.toISOString(),
    from,
    through: from,
    eventsPassed: 0,
    inboxRowsRemoved: 0,
    opened: 0,
    withheld: 0,
    stop: { reason: 'read_horizon' },
  };
  for (;;) {
    const after = horizon ?? { transactionId: 0n, position: 0n };
    const readable = await readHorizon(pool);
    const limit = Math.min(pageSize, maxEvents - report.eventsPassed);
    const page = await pool.query<PageRow>(PAGE_SQL, [
      after.transactionId.toString(),
      after.position.toString(),
      readable.toString(),
      before,
      consumer,
      limit,
    ]);
    const remove: string[] = [];
    const open: string[] = [];
    let withheld = 0;
    let last: Checkpoint | null = null;
    let stop: PruneStop | null = null;
    for (const r of page.rows) {
      if (!r.old) {
        stop = { reason: 'before' };
        break;
      }
      if (r.handled) remove.push(r.event_id);
      else if (r.dead) open.push(r.event_id);
      else if (r.withheld) withheld += 1;
      else {
        const event = { eventId: r.event_id, transactionId: BigInt(r.transaction_id), position: BigInt(r.position), recordedAt: r.recorded_at };
        stop = { reason: 'unhandled', event };
        break;
      }
      last = { transactionId: BigInt(r.transaction_id), position: BigInt(r.position) };
    }
    if (stop === null && page.rows.length < limit) stop = { reason: 'read_horizon' };
    const passed = remove.length + open.length + withheld;
    if (last !== null) {
      const applied = await applyPage(pool, consumer, horizon, last, remove, open);
      if (applied === null) {
        // Another prune moved the horizon meanwhile: read again from where it is now.
        horizon = await horizonOf(pool, consumer);
        continue;
      }
      horizon = last;
      report.through = last;
      report.eventsPassed += passed;
      report.inboxRowsRemoved += applied;
      report.opened += open.length;
      report.withheld += withheld;
      options.onProgress?.(`${consumer}: ${report.eventsPassed} events passed, ${report.inboxRowsRemoved} inbox rows removed`);
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
 * One page, in one transaction under the consumer's inbox lock: removes the handled events'
 * rows, lists the dead-lettered ones open and moves the horizon to `through`. Null, with
 * nothing changed, when the horizon is no longer `expected`.
 */
async function applyPage(
  pool: pg.Pool,
  consumer: string,
  expected: Checkpoint | null,
  through: Checkpoint,
  remove: readonly string[],
  open: readonly string[],
): Promise<number | null> {
  const client = await pool.connect();
  let failed = false;
  try {
    await client.query('BEGIN');
    await client.query('SELECT pg_advisory_xact_lock($1, hashtext($2))', [INBOX_LOCK_CLASS, consumer]);
    // A statement after the lock: its snapshot has every prune that held the lock before.
    if (!sameCheckpoint(await horizonOf(client, consumer, 'FOR UPDATE'), expected)) {
      await client.query('ROLLBACK');
      return null;
    }
    const removed = await client.query("DELETE FROM events.inbox WHERE consumer = $1 AND event_id = ANY(string_to_array($2, ',')::uuid[])", [
      consumer,
      remove.join(','),
    ]);
    if (open.length > 0) {
      await client.query(
        "INSERT INTO events.inbox_open (consumer, event_id) SELECT $1, unnest(string_to_array($2, ',')::uuid[]) ON CONFLICT DO NOTHING",
        [consumer, open.join(',')],
      );
    }
    const count = removed.rowCount ?? 0;
    await client.query(
      `INSERT INTO events.inbox_horizons (consumer, transaction_id, position, pruned) VALUES ($1, $2::text::xid8, $3, $4)
       ON CONFLICT (consumer) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, position = EXCLUDED.position,
                                            pruned = events.inbox_horizons.pruned + EXCLUDED.pruned, updated_at = now()`,
      [consumer, through.transactionId.toString(), through.position.toString(), count],
    );
    await commit(client);
    return count;
  } catch (error) {
    failed = true;
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release(failed ? true : undefined);
  }
}

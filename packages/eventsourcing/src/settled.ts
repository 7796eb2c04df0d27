/**
 * Waiting until a range of the global order is whole. Readers stop at the read horizon
 * (`readHorizon`): an event of a transaction still open is not read, and when it commits it may
 * sort before events already read. A read that follows the log as it grows (a projection's
 * runner) picks it up later; a read of a fixed range that ends there (an export up to a
 * position, a replay kept up to one, a balance as of a position or a time) would report the
 * range done with that event missing, and give another answer once it commits. Until
 * 2026-12-07 all three did (a review reproduced each: an export of positions 1 to 5 that wrote
 * 2 of them, exit 0). These wait first, then the reads are whole.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { readHorizon, settleTransactionsBefore, type Checkpoint } from '@ledgerline/events';

type Queryable = Pick<pg.ClientBase, 'query'>;

/** How long a ranged read waits for the transactions that may still write into its range. */
export const RANGE_SETTLE_WAIT_MS_DEFAULT = 30_000;

/** The range cannot be read whole yet: a transaction that may still write into it stayed open. */
export class RangeNotSettledError extends Error {
  override readonly name = 'RangeNotSettledError';
}

/**
 * Resolves once every event up to `until` in the global order is readable: the read horizon is
 * past its transaction, so every transaction with an id at or below it has ended (ids are never
 * handed out again below the horizon). Throws RangeNotSettledError after `waitMs`.
 */
export async function settledThrough(db: Queryable, until: Checkpoint, waitMs = RANGE_SETTLE_WAIT_MS_DEFAULT): Promise<void> {
  const deadline = Date.now() + waitMs;
  for (let pauseMs = 5; ; pauseMs = Math.min(pauseMs * 2, 250)) {
    const horizon = await readHorizon(db);
    if (horizon > until.transactionId) return;
    if (Date.now() >= deadline) {
      throw new RangeNotSettledError(
        `events up to transaction ${until.transactionId}, position ${until.position} cannot be read whole: a transaction that may still write before them ` +
          `(transaction ${horizon} or later) was still open after ${waitMs} ms; try again once it ends`,
      );
    }
    await sleep(Math.min(pauseMs, Math.max(1, deadline - Date.now())));
  }
}

/**
 * Resolves once no transaction that began at or before `time` (other than the caller's own
 * session's) is still open: an event is recorded at its transaction's start, so one of those
 * could still add an event recorded by `time`. A time the database's clock has not reached is
 * taken as that clock, read once (transactions beginning later could still add to a later
 * time, so nothing past it can be answered for good); the time waited for is returned. Throws
 * RangeNotSettledError after `waitMs`.
 */
export async function settledAsOfTime(db: Queryable, time: Date, waitMs = RANGE_SETTLE_WAIT_MS_DEFAULT): Promise<Date> {
  const clock = await db.query<{ ms: string }>('SELECT floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint::text AS ms');
  const databaseNow = Number(clock.rows[0]?.ms);
  const asOf = time.getTime() > databaseNow ? new Date(databaseNow) : time;
  // Reconciliation's wait, up to the millisecond after: a transaction that began within it, at
  // or before `asOf` to the microsecond, counts (one a little after is waited for too).
  const open = await settleTransactionsBefore(db, new Date(asOf.getTime() + 1), waitMs);
  if (open > 0) {
    throw new RangeNotSettledError(`${open} transactions that began by ${asOf.toISOString()} were still open after ${waitMs} ms: they may still record events by then; try again once they end`);
  }
  return asOf;
}

/**
 * Retention: move old streams out of the hot table (archive), and delete them when their
 * retention ends (expire), except those under a legal hold.
 *
 * Holds belong to the audit package (#4). This module takes them through `LegalHolds`, called
 * inside the transaction that would archive or delete the stream, so a hold can lock its own
 * row (`SELECT ... FOR SHARE`) and a hold placed concurrently is either seen or waits.
 */
import type pg from 'pg';
import { inTransaction } from '@ledgerline/events';

type Queryable = Pick<pg.ClientBase, 'query'>;

export interface StreamRef {
  streamType: string;
  streamId: string;
}

export interface LegalHolds {
  /**
   * True when the stream must be kept as it is; runs in the retention transaction. `intent`
   * says what retention would do and on what clock, for holds that keep a stream from deletion
   * only (the audit trail keeps events it holds as leaves until its own retention ends).
   */
  isHeld(db: Queryable, stream: StreamRef, intent: { action: 'archive' | 'delete'; now: Date }): Promise<boolean>;
}

export const NO_LEGAL_HOLDS: LegalHolds = { isHeld: () => Promise.resolve(false) };

export interface RetentionRule {
  streamType: string;
  /** Move a stream to events.archived_events this long after its last event. */
  archiveAfterDays?: number;
  /** Delete a stream (hot or archived) this long after its last event. */
  deleteAfterDays?: number;
}

export interface RetentionReport {
  archived: StreamRef[];
  deleted: StreamRef[];
  /** Streams due for archive or deletion but kept by a legal hold (or, from deletion, by the audit trail's retention of their events). */
  held: StreamRef[];
  eventsArchived: number;
  eventsDeleted: number;
}

const DAY_MS = 86_400_000;

/** Streams of a type whose last event is older than `cutoff`, in the hot table or the archive. */
async function dueStreams(db: Queryable, streamType: string, cutoff: Date, includeArchive: boolean, limit: number): Promise<string[]> {
  const r = await db.query<{ stream_id: string }>(
    `SELECT stream_id FROM (
       SELECT stream_id, recorded_at FROM events.events WHERE stream_type = $1
       UNION ALL
       SELECT stream_id, recorded_at FROM events.archived_events WHERE $4 AND stream_type = $1) s
      GROUP BY stream_id HAVING max(recorded_at) < $2 ORDER BY stream_id LIMIT $3`,
    [streamType, cutoff, limit, includeArchive],
  );
  return r.rows.map((x) => x.stream_id);
}

/**
 * Applies the rules once, at `now` (injected: tests and backfills choose it), to at most
 * `streamsMax` streams per rule and action. Each stream is handled in its own transaction,
 * with its hold checked there. Run it again to continue.
 */
export async function applyRetention(
  pool: pg.Pool,
  options: { rules: readonly RetentionRule[]; holds: LegalHolds; now: Date; streamsMax?: number },
): Promise<RetentionReport> {
  const streamsMax = options.streamsMax ?? 1000;
  const report: RetentionReport = { archived: [], deleted: [], held: [], eventsArchived: 0, eventsDeleted: 0 };
  for (const rule of options.rules) {
    for (const action of ['delete', 'archive'] as const) {
      const days = action === 'delete' ? rule.deleteAfterDays : rule.archiveAfterDays;
      if (days === undefined) continue;
      if (!(days >= 0)) throw new RangeError(`${rule.streamType}: ${action}AfterDays must be >= 0`);
      const cutoff = new Date(options.now.getTime() - days * DAY_MS);
      for (const streamId of await dueStreams(pool, rule.streamType, cutoff, action === 'delete', streamsMax)) {
        const stream = { streamType: rule.streamType, streamId };
        await inTransaction(pool, async (c) => {
          if (await options.holds.isHeld(c, stream, { action, now: options.now })) {
            if (!report.held.some((h) => h.streamType === stream.streamType && h.streamId === streamId)) report.held.push(stream);
            return;
          }
          const args = [rule.streamType, streamId];
          if (action === 'archive') {
            const r = await c.query(
              `WITH moved AS (DELETE FROM events.events WHERE stream_type = $1 AND stream_id = $2 RETURNING *)
               INSERT INTO events.archived_events SELECT *, now() FROM moved`,
              args,
            );
            report.eventsArchived += r.rowCount ?? 0;
            report.archived.push(stream);
          } else {
            const hot = await c.query('DELETE FROM events.events WHERE stream_type = $1 AND stream_id = $2', args);
            const cold = await c.query('DELETE FROM events.archived_events WHERE stream_type = $1 AND stream_id = $2', args);
            await c.query('DELETE FROM events.stream_regions WHERE stream_type = $1 AND stream_id = $2', args);
            // The relay's record of events it withheld names the stream too: it goes with it.
            await c.query('DELETE FROM events.relay_withheld WHERE stream_type = $1 AND stream_id = $2', args);
            report.eventsDeleted += (hot.rowCount ?? 0) + (cold.rowCount ?? 0);
            report.deleted.push(stream);
          }
          await c.query('DELETE FROM events.snapshots WHERE stream_type = $1 AND stream_id = $2', args);
        });
      }
    }
  }
  return report;
}

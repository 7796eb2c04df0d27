/**
 * Retention: move old streams out of the hot table (archive), and delete them when their
 * retention ends (expire), except those under a legal hold.
 *
 * Holds belong to the audit package (#4). This module takes them through `LegalHolds`, called
 * inside the transaction that would archive or delete the stream, so a hold can lock its own
 * row (`SELECT ... FOR SHARE`) and a hold placed concurrently is either seen or waits.
 *
 * The outbox relay reads only the hot table (`readPartition`): an event that leaves it before
 * the relay has passed it is never published. So a stream is due only when each of its hot
 * events is behind every reader of the global order (see `readersSql`), besides being old
 * enough. Active projections are among them, although rebuilds and replays, and their live
 * runners, read the archive with the hot table (`EventStore.readAll`, global-order.ts). The
 * audit trail's tail reads the archive as well (an event archived before its cursor first
 * moved is still owed a leaf), and counts as a reader of hot events once its cursor has moved. Archived events are
 * deleted by age alone, except that the audit trail's holds (`auditLegalHolds`) keep every
 * event it has not yet taken as a leaf, hot or archived.
 */
import type pg from 'pg';
import { inTransaction, readHorizon } from '@ledgerline/events';

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
  /** Move a stream to events.archived_events this long after its last event (at least 1). */
  archiveAfterDays?: number;
  /** Delete a stream (hot or archived) this long after its last event (at least 1). */
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

/**
 * Per partition, the point in the global order (transaction id, position), inclusive, that
 * every reader has passed: the least of the relay's checkpoint for the partition (none yet:
 * nothing published), every active projection generation's checkpoint and, once the audit
 * trail tails this store's events, the sequencer's cursor. Every one of them only moves
 * forward (a projection reset aside), so reading it in the statement that removes the events
 * is enough. The audit cursor counts from its first move: a sequencer without `tailEvents`
 * leaves it at the start for ever, and would otherwise stop retention in that database.
 */
function readersSql(audit: boolean): string {
  const auditCursor = audit
    ? `UNION ALL SELECT event_transaction_id, event_position FROM audit.sequencer_state
        WHERE (event_transaction_id, event_position) > ('0'::xid8, 0)`
    : '';
  return `readers AS (
    SELECT p.partition, m.transaction_id, m.position
      FROM generate_series(0, (SELECT partitions - 1 FROM events.settings)) AS p(partition)
      CROSS JOIN LATERAL (
        SELECT r.transaction_id, r.position FROM (
          SELECT c.transaction_id, c.position FROM events.relay_checkpoints c WHERE c.partition = p.partition
          UNION ALL SELECT '0'::xid8, 0 WHERE NOT EXISTS (SELECT 1 FROM events.relay_checkpoints c WHERE c.partition = p.partition)
          UNION ALL SELECT g.transaction_id, g.position FROM events.projections g WHERE g.active
          ${auditCursor}) r
         ORDER BY r.transaction_id, r.position LIMIT 1) m)`;
}

/**
 * An event of alias `e` that every reader has passed: below the read horizon ($horizon), which
 * no transaction still able to commit events is below, and at or behind its partition's
 * `readers` point. `recorded_at` is when the appending transaction started, not when it
 * committed, so age alone would let an event go as soon as a long transaction commits it.
 */
function passedSql(e: string, horizon: string): string {
  return `(${e}.transaction_id < ${horizon}::text::xid8 AND EXISTS (
    SELECT 1 FROM readers m WHERE m.partition = ${e}.partition AND (${e}.transaction_id, ${e}.position) <= (m.transaction_id, m.position)))`;
}

/**
 * An event of alias `e` that every projection generation, active or not, has passed. Deletion
 * needs it besides `passedSql`, for archived events too: a generation being rebuilt (or kept
 * inactive) reads the archive from the start, and a stream deleted after it read some of the
 * stream's events but before the others would leave it with part of the stream, a state no
 * history had. (Archiving needs none of this: every reader of the global order reads the
 * archive with the hot table, in one statement.) A generation created, or reset in place,
 * after the check starts at the beginning; `removeStream` holds `events.projections` in SHARE
 * mode across the check and the removal, so that cannot happen in between.
 */
function generationsPassedSql(e: string): string {
  return `NOT EXISTS (SELECT 1 FROM events.projections g WHERE (${e}.transaction_id, ${e}.position) > (g.transaction_id, g.position))`;
}

/** Whether the audit trail's schema is in this database (it is optional). */
async function hasAudit(db: Queryable): Promise<boolean> {
  const r = await db.query<{ present: boolean }>(`SELECT to_regclass('audit.sequencer_state') IS NOT NULL AS present`);
  return r.rows[0]?.present === true;
}

/**
 * The next streams of a type after `after` (by id) whose last event is older than `cutoff`, in
 * the hot table or, for deletion, the archive, and whose hot events every reader has passed.
 * Archived events are behind the relay and every active generation already; for deletion
 * they (and the hot ones) must be behind every generation, active or not (generationsPassedSql).
 */
async function dueStreams(
  db: Queryable,
  q: { streamType: string; cutoff: Date; includeArchive: boolean; after: string | null; limit: number; audit: boolean },
): Promise<string[]> {
  const horizon = await readHorizon(db);
  const r = await db.query<{ stream_id: string }>(
    `WITH ${readersSql(q.audit)}
     SELECT stream_id FROM (
       SELECT e.stream_id, e.recorded_at, ${passedSql('e', '$6')} AND (NOT $4 OR ${generationsPassedSql('e')}) AS passed
         FROM events.events e WHERE e.stream_type = $1 AND ($5::text IS NULL OR e.stream_id > $5)
       UNION ALL
       SELECT a.stream_id, a.recorded_at, ${generationsPassedSql('a')} FROM events.archived_events a
        WHERE $4 AND a.stream_type = $1 AND ($5::text IS NULL OR a.stream_id > $5)) s
      GROUP BY stream_id HAVING max(recorded_at) < $2 AND bool_and(passed) ORDER BY stream_id LIMIT $3`,
    [q.streamType, q.cutoff, q.limit, q.includeArchive, q.after, horizon.toString()],
  );
  return r.rows.map((x) => x.stream_id);
}

/**
 * True when the stream ($1, $2) is still due: none of its events (hot, and archived when
 * `includeArchive`) is as recent as $3, and every reader has passed its hot events. Used in
 * the statement that removes the events too, so that an event committed after the check by
 * a writer that does not take the stream's lock (`appendMany`) stops the removal.
 */
function stillDueSql(includeArchive: boolean): string {
  // Deletion: every generation, active or not, must have passed every event, hot or archived.
  const archived = includeArchive
    ? `AND NOT EXISTS (SELECT 1 FROM events.archived_events a WHERE a.stream_type = $1 AND a.stream_id = $2
                        AND (a.recorded_at >= $3 OR NOT ${generationsPassedSql('a')}))`
    : '';
  const generations = includeArchive ? ` OR NOT ${generationsPassedSql('e')}` : '';
  return `NOT EXISTS (SELECT 1 FROM events.events e WHERE e.stream_type = $1 AND e.stream_id = $2
                       AND (e.recorded_at >= $3 OR NOT ${passedSql('e', '$4')}${generations}))
          ${archived}`;
}

/**
 * Applies the rules once, at `now` (injected: tests and backfills choose it), to at most
 * `streamsMax` streams per rule and action. Each stream is handled in its own transaction,
 * under the stream's append lock, where it is checked again (age, readers) and its hold is
 * asked. Held streams do not count: the run pages on past them (by stream id), so streams
 * held for good cannot keep the others from their retention. Run it again to continue.
 */
export async function applyRetention(
  pool: pg.Pool,
  options: { rules: readonly RetentionRule[]; holds: LegalHolds; now: Date; streamsMax?: number },
): Promise<RetentionReport> {
  const streamsMax = options.streamsMax ?? 1000;
  const report: RetentionReport = { archived: [], deleted: [], held: [], eventsArchived: 0, eventsDeleted: 0 };
  // All rules are checked before anything is removed: a typo in the last one stops the run.
  for (const rule of options.rules) {
    for (const action of ['delete', 'archive'] as const) {
      const days = action === 'delete' ? rule.deleteAfterDays : rule.archiveAfterDays;
      // Under a day, an event can be due while readers are still on their way to it, and a
      // caller's clock a little ahead would remove what was just written.
      if (days !== undefined && !(Number.isFinite(days) && days >= 1)) {
        throw new RangeError(`${rule.streamType}: ${action}AfterDays must be a number of days >= 1, got ${String(days)}`);
      }
    }
  }
  const audit = await hasAudit(pool);
  for (const rule of options.rules) {
    for (const action of ['delete', 'archive'] as const) {
      const days = action === 'delete' ? rule.deleteAfterDays : rule.archiveAfterDays;
      if (days === undefined) continue;
      const cutoff = new Date(options.now.getTime() - days * DAY_MS);
      const includeArchive = action === 'delete';
      let done = 0;
      let after: string | null = null;
      while (done < streamsMax) {
        const page = await dueStreams(pool, { streamType: rule.streamType, cutoff, includeArchive, after, limit: streamsMax - done, audit });
        if (page.length === 0) break;
        after = page.at(-1) ?? null;
        for (const streamId of page) {
          const removed = await removeStream(pool, { stream: { streamType: rule.streamType, streamId }, action, cutoff, audit, options, report });
          if (removed) done += 1;
        }
      }
    }
  }
  return report;
}

/** Archives or deletes one stream in a transaction of its own; false when it was not (held, or no longer due). */
async function removeStream(
  pool: pg.Pool,
  o: {
    stream: StreamRef;
    action: 'archive' | 'delete';
    cutoff: Date;
    audit: boolean;
    options: { holds: LegalHolds; now: Date };
    report: RetentionReport;
  },
): Promise<boolean> {
  const { stream, action, report } = o;
  const includeArchive = action === 'delete';
  return inTransaction(pool, async (c) => {
    // The key EventStore.append takes: an append to the stream waits for this transaction, and
    // one that went first has committed, and is seen by the check below (READ COMMITTED).
    await c.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [`${stream.streamType}/${stream.streamId}`]);
    // Deletion: no generation's checkpoint moves, and none is created or reset to the start,
    // between the check below and the removal's commit (a runner's batch in flight commits
    // first, and its checkpoint is the one checked). SHARE mode conflicts with the row writes
    // of runBatch, createGeneration and an in-place rebuild, not with readers or FOR SHARE.
    if (includeArchive) await c.query('LOCK TABLE events.projections IN SHARE MODE');
    // Read before anything gives this transaction an id (a hold's FOR SHARE does), which would
    // hold the horizon back to it.
    const horizon = (await readHorizon(c)).toString();
    const args = [stream.streamType, stream.streamId, o.cutoff, horizon];
    const check = await c.query<{ due: boolean }>(`WITH ${readersSql(o.audit)} SELECT ${stillDueSql(includeArchive)} AS due`, args);
    if (check.rows[0]?.due !== true) return false;
    if (await o.options.holds.isHeld(c, stream, { action, now: o.options.now })) {
      if (!report.held.some((h) => h.streamType === stream.streamType && h.streamId === stream.streamId)) report.held.push(stream);
      return false;
    }
    // The condition again, in the removing statement (one snapshot): `appendMany` writers do
    // not take the stream's lock.
    const due = `WITH ${readersSql(o.audit)}, due AS MATERIALIZED (SELECT ${stillDueSql(includeArchive)} AS due)`;
    const key = [stream.streamType, stream.streamId];
    if (action === 'archive') {
      const r = await c.query<{ due: boolean; n: number }>(
        `${due}, moved AS (DELETE FROM events.events WHERE stream_type = $1 AND stream_id = $2 AND (SELECT due FROM due) RETURNING *),
              archived AS (INSERT INTO events.archived_events SELECT *, now() FROM moved RETURNING 1)
         SELECT (SELECT due FROM due) AS due, (SELECT count(*) FROM archived)::int AS n`,
        args,
      );
      if (r.rows[0]?.due !== true) return false;
      report.eventsArchived += r.rows[0].n;
      report.archived.push(stream);
    } else {
      const r = await c.query<{ due: boolean; n: number }>(
        // Each deleted event's position, id and transaction id stay behind (events.deleted_events),
        // with whether the relay withheld it (its record goes below), so that the inbox rows that
        // name it still reconcile and an inbox prune still holds a consumer to it, or knows it
        // was owed to none; a copy in both tables is one event.
        `${due}, hot AS (DELETE FROM events.events WHERE stream_type = $1 AND stream_id = $2 AND (SELECT due FROM due) RETURNING position, event_id, transaction_id),
              cold AS (DELETE FROM events.archived_events WHERE stream_type = $1 AND stream_id = $2 AND (SELECT due FROM due) RETURNING position, event_id, transaction_id),
              gone AS (INSERT INTO events.deleted_events (position, event_id, transaction_id, withheld)
                       SELECT g.position, g.event_id, g.transaction_id,
                              EXISTS (SELECT 1 FROM events.relay_withheld w WHERE w.event_id = g.event_id)
                         FROM (SELECT position, event_id, transaction_id FROM hot UNION SELECT position, event_id, transaction_id FROM cold) g
                       ON CONFLICT (position) DO NOTHING)
         SELECT (SELECT due FROM due) AS due, ((SELECT count(*) FROM hot) + (SELECT count(*) FROM cold))::int AS n`,
        args,
      );
      if (r.rows[0]?.due !== true) return false;
      await c.query('DELETE FROM events.stream_regions WHERE stream_type = $1 AND stream_id = $2', key);
      // The relay's record of events it withheld names the stream too: it goes with it.
      await c.query('DELETE FROM events.relay_withheld WHERE stream_type = $1 AND stream_id = $2', key);
      report.eventsDeleted += r.rows[0].n;
      report.deleted.push(stream);
    }
    await c.query('DELETE FROM events.snapshots WHERE stream_type = $1 AND stream_id = $2', key);
    return true;
  });
}

/**
 * The audit trail's legal holds, for the retention of other stores. A hold placed here (`npm run
 * audit -- hold place`, AuditStore#placeHold) on a resource keeps that resource's data
 * everywhere, not only its audit records: packages/eventsourcing's `applyRetention` asks this
 * before it archives or deletes an event stream.
 */
import type pg from 'pg';
import { databaseCannotNow } from '@ledgerline/events';
import { tileOfEvent } from './event-leaves.ts';
import { financialRetentionChanges, retentionRanOut } from './retention-in-force.ts';

type Queryable = Pick<pg.ClientBase, 'query'>;

/** An event stream, as retention names it. */
export interface HeldStream {
  streamType: string;
  streamId: string;
}

/** The audit resource a stream's data belongs to. */
export interface HeldResource {
  type: string;
  id: string;
}

/**
 * A LegalHolds implementation backed by `audit.legal_holds`: a stream is held while an active
 * hold names its resource. By default a stream is its own resource (`ticket`/`t-1` is held by a
 * hold on resource type `ticket`, id `t-1`); `resourceOf` maps stream types whose audit
 * resources are named differently. The hold row is read FOR SHARE inside the caller's
 * transaction (`audit.resource_held`), so a release cannot commit while the stream is being
 * kept or removed on the strength of it. Before that, the check takes `audit.lock_legal_holds()` (SHARE on the holds
 * table, to the end of the caller's transaction), as expiry and erasure do: a hold being
 * placed is waited for and then seen, and one placed later waits until the stream is gone, so
 * no hold can commit between the check and the removal. The caller must run under READ
 * COMMITTED and be a member of the writer role, or the schema's owner where that login owns the
 * event store too (apply mode): this reads the event store's tables in the caller's session, so
 * never as an audit owner the event store's owner is not (docs/audit.md, "Roles"). Deletion (not archiving)
 * is also held while the trail still retains any of the stream's events as leaves (below).
 */
export function auditLegalHolds(resourceOf: (stream: HeldStream) => HeldResource = (s) => ({ type: s.streamType, id: s.streamId })): {
  isHeld(db: Queryable, stream: HeldStream, intent?: { action: 'archive' | 'delete'; now: Date }): Promise<boolean>;
} {
  return {
    async isHeld(db, stream, intent) {
      const resource = resourceOf(stream);
      await db.query('SELECT audit.lock_legal_holds()');
      const r = await db.query<{ held: boolean }>('SELECT audit.resource_held($1, $2) AS held', [resource.type, resource.id]);
      if (r.rows[0]?.held === true) return true;
      return intent?.action === 'delete' && (await leavesStillRetained(db, stream, intent.now));
    },
  };
}

/**
 * Once the trail takes events as leaves (audit.event_leaves), an event is part of the audit
 * record of class `financial`, and deleting it early would read as tampering (verification's
 * `event_missing`) or, before the sequencer reached it, leave it out of the trail. So deletion
 * waits until every event of the stream is a leaf of a tile that a checkpoint issued at least
 * that class's retention ago covers whole: the signed time by which verification judges a
 * missing event, and never earlier than the event's own recorded time allows (the event was
 * recorded before the checkpoint that covers it was issued). An event recorded long before
 * the trail took it (a store the trail began tailing late) is kept for the retention after
 * that. Times are read by the earlier of `now` and the database's clock (a caller's clock
 * may move retention back, never forward); a class kept for ever keeps its events for ever.
 * Archiving is not held: archived events still verify.
 *
 * The retention is the stricter of two, and an event goes only once both have run out:
 * - the one verification judges by (retention-in-force.ts `retentionRanOut`: the migration's
 *   2557 days and the trail's `audit.retention.change` records, a shortening reaching only
 *   leaves signed after it), so nothing this lets go is later reported missing;
 * - the stored `audit.retention_policies` row, which is unsigned and so never alone lets an
 *   event go (a superuser or the tables' owner can lower it with the triggers off, leaving no
 *   record), but which shows a lawful change at once, while its record is still queued for the
 *   sequencer: a lengthening the trail does not show yet keeps the events it will reach.
 * A policy change in flight (its transaction open) is waited for first: retention takes SHARE
 * on the table (`audit.lock_retention_policies`), and a change's record is dated by when its
 * row changed, so one that waited behind retention is dated after the deletion it waited for.
 * The row is checked first, in the query that finds the events' checkpoints; the trail's
 * changes are read (one index walk, and a checkpoint read per change) only for a stream the
 * row alone would let go, once per call, and judged at each distinct covering time. Stored
 * checkpoints are taken as the sequencer wrote them, as for the covering time itself:
 * verification checks their signatures, and a forged one fails it whatever this decides.
 */
/** How long the deletion check waits for a policy change in flight before it keeps the stream for a later run. */
export const RETENTION_POLICY_LOCK_WAIT_MS = 2000;

/**
 * SHARE on audit.retention_policies for the rest of the caller's transaction, waiting at most
 * RETENTION_POLICY_LOCK_WAIT_MS: retention holds its stream's locks (and the legal holds'
 * SHARE) meanwhile, and an idle transaction that changed a policy would otherwise stall it, and
 * holds and projections behind it, for as long as it stays open; one that changed a policy and
 * then places a hold would deadlock with it. False when the wait ran out or PostgreSQL broke a
 * deadlock: the stream is kept, for a later run, and the caller's transaction goes on as it was
 * (under a savepoint; the caller's lock_timeout is restored).
 */
async function lockedRetentionPolicies(db: Queryable): Promise<boolean> {
  const previous = (await db.query<{ t: string }>("SELECT current_setting('lock_timeout') AS t")).rows[0]?.t ?? '0';
  await db.query('SAVEPOINT retention_policies_lock');
  try {
    await db.query("SELECT set_config('lock_timeout', $1, true)", [`${RETENTION_POLICY_LOCK_WAIT_MS}ms`]);
    await db.query('SELECT audit.lock_retention_policies()');
    await db.query('RELEASE SAVEPOINT retention_policies_lock');
    return true;
  } catch (error) {
    // The wait ran out (55P03, databaseCannotNow's reading) or PostgreSQL broke a deadlock.
    if (!databaseCannotNow(error) && (error as { code?: unknown } | null)?.code !== '40P01') throw error;
    await db.query('ROLLBACK TO SAVEPOINT retention_policies_lock; RELEASE SAVEPOINT retention_policies_lock');
    return false;
  } finally {
    await db.query("SELECT set_config('lock_timeout', $1, true)", [previous]).catch(() => {});
  }
}

async function leavesStillRetained(db: Queryable, stream: HeldStream, now: Date): Promise<boolean> {
  // A policy change in flight is waited for, and then read (migration 1769900000000): unseen,
  // a lengthening that reaches these events could be made before their deletion and signed
  // after it, and verification would then report them missing.
  if (!(await lockedRetentionPolicies(db))) return true;
  const r = await db.query<{ trail: boolean; keep: boolean; covered: Date[] | null; as_of: Date }>(
    `WITH policy AS (SELECT make_interval(secs => retain_days * 86400) AS retain FROM audit.retention_policies WHERE record_class = 'financial'),
     leaves AS MATERIALIZED (
       SELECT t.positions IS NULL OR array_position(t.positions, e.position) IS NULL AS unplaced, covering.issued_at
         FROM (SELECT transaction_id, position FROM events.events WHERE stream_type = $1 AND stream_id = $2
               UNION ALL
               SELECT transaction_id, position FROM events.archived_events WHERE stream_type = $1 AND stream_id = $2) e
         LEFT JOIN LATERAL ${tileOfEvent('e')} t ON true
         LEFT JOIN LATERAL (SELECT c.issued_at FROM audit.checkpoints c WHERE c.tree_size >= t.first_seq + t.leaf_count
                             ORDER BY c.tree_size LIMIT 1) covering ON true)
     SELECT s.trail, s.keep, s.as_of,
            -- Only when the row alone would let the stream go: reading every event's tile for
            -- a stream the first retained event already keeps cost up to 500 times the answer.
            CASE WHEN s.trail AND NOT s.keep THEN (SELECT array_agg(DISTINCT issued_at) FROM leaves) END AS covered
       FROM (SELECT EXISTS (SELECT 1 FROM audit.event_leaves) AS trail,
                    EXISTS (SELECT 1 FROM leaves
                             WHERE unplaced OR issued_at IS NULL
                                OR NOT EXISTS (SELECT 1 FROM policy)
                                OR issued_at + (SELECT retain FROM policy) > least($3::timestamptz, now())) AS keep,
                    least($3::timestamptz, now()) AS as_of) s`,
    [stream.streamType, stream.streamId, now],
  );
  const row = r.rows[0];
  if (row === undefined || !row.trail) return false;
  if (row.keep) return true;
  const covered = row.covered ?? [];
  if (covered.length === 0) return false;
  // The retention verification applies, from the trail's signed change records.
  const changes = await financialRetentionChanges(db, () => true);
  return covered.some((at) => !retentionRanOut(changes, at, row.as_of));
}

/**
 * The read horizon: a transaction id below which no transaction can still commit events into
 * this database. Readers of the global order (the relay, projections, the audit tail) read
 * only events whose transaction id is below it, so an event that commits late is never
 * skipped: the reader waits for its transaction instead of passing it.
 *
 * `pg_snapshot_xmin(pg_current_snapshot())` is such a horizon, but for the whole cluster:
 * a long write transaction in *another* database on the same server held every reader here
 * back for as long as it ran (seen: a neighbour's multi-minute transaction stalled relays,
 * the audit tail and tests for minutes). Events can only come from transactions of this
 * database, so the horizon here is the oldest of those still running, and only those.
 *
 * Why it is safe. The horizon is computed in one statement, with snapshot S1, and the events
 * are read in a later statement, with snapshot S2 (READ COMMITTED takes one per statement).
 * Every transaction id below S1's xmax was either finished when S1 was taken, or running
 * then (in S1's running list). Of the running ones, those of other databases never write
 * events here, and those of this database either still run when `pg_stat_activity` is read,
 * after S1, and hold the horizon at their id; or have finished by then, before S2, which
 * therefore sees their events if they committed. Transactions that get an id after S1 get
 * one at or above S1's xmax, and the horizon is never above that. Prepared (two-phase)
 * transactions have no backend, so `pg_prepared_xacts` is read as well.
 *
 * Where that does not hold, the cluster-wide horizon is used, as before:
 * - outside READ COMMITTED, S2 is S1, and a transaction that finished in between would be
 *   invisible to the read while below the horizon;
 * - on a hot standby, whose snapshots list the primary's running transactions while its
 *   `pg_stat_activity` shows only its own sessions.
 * `backend_xid` is among the columns of `pg_stat_activity` that every role may read,
 * whatever it may see of other roles' sessions (horizon.test.ts holds the server to that).
 *
 * `pg_stat_activity` is cached for the rest of a transaction once read; the cache is cleared
 * first, or a transaction that began after the first read would be missed.
 */
import type pg from 'pg';

type Queryable = Pick<pg.ClientBase, 'query'>;

const HORIZON_SQL = `SELECT pg_stat_clear_snapshot();
  WITH s AS (SELECT pg_current_snapshot() AS snap),
  mine AS (
    SELECT a.backend_xid::text::bigint AS xid32 FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.backend_xid IS NOT NULL
    UNION ALL
    SELECT p.transaction::text::bigint FROM pg_prepared_xacts p WHERE p.database = current_database())
  SELECT (CASE
    WHEN current_setting('transaction_isolation') <> 'read committed' OR pg_is_in_recovery() THEN pg_snapshot_xmin(s.snap)
    ELSE coalesce(
      -- A backend shows its 32-bit xid; the snapshot lists 64-bit ones. Every running id is
      -- within 2^31 of the next, so the low 32 bits name one of them.
      (SELECT min(x) FROM pg_snapshot_xip(s.snap) x WHERE (x::text::bigint & 4294967295) IN (SELECT xid32 FROM mine)),
      pg_snapshot_xmax(s.snap))
  END)::text AS horizon FROM s`;

/**
 * The horizon for a read that follows in a later statement (see above). Run it immediately
 * before the read, on the same connection or on any other: what matters is that the read's
 * statement starts after this one ended.
 */
export async function readHorizon(db: Queryable): Promise<bigint> {
  // Two statements in one round trip (the simple protocol, no parameters): the cache is
  // cleared before the second one's snapshot and its read of pg_stat_activity.
  const results = (await db.query(HORIZON_SQL)) as unknown as Array<pg.QueryResult<{ horizon: string }>>;
  const horizon = results.at(-1)?.rows[0]?.horizon;
  if (horizon === undefined) throw new Error('invariant: the read horizon query returned no row');
  return BigInt(horizon);
}

/**
 * The retention of class `financial` as the trail itself records it, for verification to judge
 * a missing event by. `audit.retention_policies` is a stored row nothing signs: a superuser
 * who lowered it could make any deletion read as an expiry. Every change of a policy is an
 * `audit.retention.change` record (class governance, queued in the change's transaction by
 * the trigger of migration 1769100000000_database-guards.sql), whose payload hash its leaf
 * commits to; the policy the table was created with (migration 1767312000000_audit-core.sql)
 * is the constant below. Nothing else is read.
 *
 * The rule, for an event leaf first covered by a checkpoint issued at `coveredAt` (a signed
 * time):
 * - the policy in force then is the original one, changed by every change whose record a valid
 *   checkpoint issued at or before `coveredAt` covers;
 * - a later change only lengthens it: a shortening applies to leaves signed after it, never to
 *   earlier ones (the database refuses a shortening while anything is still owed the longer
 *   policy, so a lawful one only follows leaves that had run out already, below);
 * - the leaf has run out once `coveredAt` plus that policy is passed, either before a later
 *   lengthening (an event the event store could let go before the policy grew) or by `now`.
 * A change whose payload is gone, does not match its hash, or does not parse counts as
 * keeping the class for ever from then on: it might have been a lengthening.
 */
import type { Checkpoint } from './keys.ts';
import { sha256 } from './record.ts';
import { CHECKPOINT_COLUMNS, checkpointOf, type CheckpointRow } from './rows.ts';
import type { Queryable } from './tree.ts';

/** Class `financial`'s retention when audit.retention_policies was created (migration 1767312000000), in days. */
export const FINANCIAL_RETAIN_DAYS_ORIGINAL = 2557;

const DAY_MS = 86_400_000;

/** One change of the financial class's policy, as the trail records it. */
export interface RetentionChange {
  /** The record's sequence number. */
  seq: number;
  /** Days after the change; null: kept for ever (no policy, or a change that could not be read). */
  retainDaysAfter: number | null;
  /** The record's occurred time (a column its leaf commits to): the change was made no later. */
  occurredAt: Date;
  /** When the first valid checkpoint covering the record was issued; null while none does. */
  signedAt: Date | null;
}

/**
 * The changes of class `financial`'s retention recorded in the trail, in sequence order: one
 * index walk (`records_action_idx`) and one checkpoint read per change. `checkpointValid`
 * checks a checkpoint's signature; a change covered by none that verifies is not yet signed.
 */
export async function financialRetentionChanges(db: Queryable, checkpointValid: (cp: Checkpoint) => boolean): Promise<RetentionChange[]> {
  const r = await db.query<{ seq: string; occurred_at: Date; payload_hash: Buffer | null; payload: string | null }>(
    `SELECT r.seq::text, r.occurred_at, r.payload_hash, p.payload
       FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq
      WHERE r.action = 'audit.retention.change' AND r.record_class = 'governance' ORDER BY r.seq`,
  );
  const changes: RetentionChange[] = [];
  for (const row of r.rows) {
    let days: number | null | undefined = null;
    if (row.payload !== null && row.payload_hash !== null && sha256(row.payload).equals(row.payload_hash)) {
      days = financialDaysOf(row.payload);
      if (days === undefined) continue; // another class's change
    }
    const seq = Number(row.seq);
    const cp = await db.query<CheckpointRow>(`SELECT ${CHECKPOINT_COLUMNS} FROM audit.checkpoints c WHERE c.tree_size > $1 ORDER BY c.tree_size LIMIT 1`, [seq]);
    const first = cp.rows[0] === undefined ? null : checkpointOf(cp.rows[0]);
    changes.push({ seq, retainDaysAfter: days, occurredAt: row.occurred_at, signedAt: first !== null && checkpointValid(first) ? first.issuedAt : null });
  }
  return changes;
}

/**
 * The days after a change of class `financial` (null: for ever, and for anything that does
 * not parse as a change), or undefined for a change of another class.
 */
function financialDaysOf(payload: string): number | null | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(payload);
  } catch {
    return null;
  }
  if (typeof parsed !== 'object' || parsed === null) return null;
  const { recordClass, retainDaysAfter } = parsed as { recordClass?: unknown; retainDaysAfter?: unknown };
  if (typeof recordClass !== 'string') return null;
  if (recordClass !== 'financial') return undefined;
  return typeof retainDaysAfter === 'number' && Number.isInteger(retainDaysAfter) && retainDaysAfter >= 1 ? retainDaysAfter : null;
}

/** Whether the financial retention of a leaf first covered at `coveredAt` has run out by `now` (the rule above). */
export function retentionRanOut(changes: readonly RetentionChange[], coveredAt: Date, now: Date): boolean {
  const covered = coveredAt.getTime();
  let days: number | null = FINANCIAL_RETAIN_DAYS_ORIGINAL;
  const runsOut = (): number => (days === null ? Infinity : covered + days * DAY_MS);
  for (const change of changes) {
    if (change.signedAt !== null && change.signedAt.getTime() <= covered) {
      days = change.retainDaysAfter; // in force when the leaf was signed
      continue;
    }
    const longer = change.retainDaysAfter === null || (days !== null && change.retainDaysAfter > days);
    if (!longer) continue; // a later shortening does not reach this leaf
    // Ran out before the policy grew (the earliest the change can have been made).
    const madeAt = Math.min(change.occurredAt.getTime(), change.signedAt?.getTime() ?? Infinity, now.getTime());
    if (runsOut() <= madeAt) return true;
    days = change.retainDaysAfter;
  }
  return runsOut() <= now.getTime();
}

/**
 * The retention of each record class as the trail itself records it, for verification to judge
 * a missing event or payload by. `audit.retention_policies` is a stored row nothing signs: a
 * superuser, or the tables' owner, who lowered it with the triggers off could make any deletion
 * read as an expiry. Every change of a policy is an `audit.retention.change` record (class
 * governance, queued in the change's transaction by the trigger of migration
 * 1769100000000_database-guards.sql), whose payload hash its leaf commits to; the policies the
 * table was created with (migration 1767312000000_audit-core.sql) are the constants below.
 * Nothing else is read.
 *
 * The rule, for a leaf first covered by a checkpoint issued at `coveredAt` (a signed time), whose
 * retention counts from `from` (an event: `coveredAt` itself; a payload: its record's occurred
 * time, as `audit.expire_payloads` counts it, a column the leaf commits to):
 * - the policy in force then is the original one, changed by every change whose record a valid
 *   checkpoint issued at or before `coveredAt` covers;
 * - a later change only lengthens it: a shortening applies to leaves signed after it, never to
 *   earlier ones (the database refuses a shortening while anything is still owed the longer
 *   policy, events not yet integrated included, so a lawful one only follows leaves that had
 *   run out already, below, with the exceptions migration 1770300000000 names);
 * - the leaf has run out once `from` plus that policy is passed, either before a later
 *   lengthening (data the database could let go before the policy grew) or by `now`.
 * A change whose payload is gone, does not match its hash, or does not parse counts as keeping
 * every class for ever from then on: it might have been a lengthening of any.
 *
 * When a change took effect. A change's record states the time it was made (`occurredAt`: the
 * trigger's `now()`, but the schema's owner or a superuser can queue a change record of its
 * own, dated as it likes: since migration 1770200000000 not the writer role, whose change
 * records the sequencer rejects); the trail proves only that it existed once a checkpoint covered it
 * (`signedAt`). So each kind of change is taken at the time that can never hide a deletion:
 * - a shortening from its signature alone (its stated time is not read): dating one back
 *   reaches no leaf signed before it;
 * - a lengthening from the earlier of the two: what had run out before then may have gone
 *   lawfully, what had not is kept. Dating one back makes data lawfully removed before it was
 *   queued read as missing (a false alarm, never a hidden removal); verification names the
 *   lengthening in such a finding (`keptBy`), with both times, for a reader to judge. Taking the
 *   signed time instead would let go, unreported, what ran out while a lawful lengthening
 *   waited for the sequencer, which the database (and the event store's retention) kept.
 */
import type { Checkpoint } from './keys.ts';
import { sha256 } from './record.ts';
import { QUEUED_BY_DATABASE } from './provenance.ts';
import { CHECKPOINT_COLUMNS, checkpointOf, type CheckpointRow } from './rows.ts';
import type { Queryable } from './tree.ts';

/** Class `financial`'s retention when audit.retention_policies was created (migration 1767312000000), in days. */
export const FINANCIAL_RETAIN_DAYS_ORIGINAL = 2557;

/** Every class's retention when audit.retention_policies was created (migration 1767312000000), in days; any other class: for ever. */
export const RETAIN_DAYS_ORIGINAL: Readonly<Record<string, number>> = { financial: FINANCIAL_RETAIN_DAYS_ORIGINAL, command: 2557, access: 366 };

const DAY_MS = 86_400_000;

/** One change of a class's policy, as the trail records it. */
export interface RetentionChange {
  /** The record's sequence number. */
  seq: number;
  /** Days after the change; null: kept for ever (no policy, or a change that could not be read). */
  retainDaysAfter: number | null;
  /** The record's occurred time (a column its leaf commits to): what the change's record states. */
  occurredAt: Date;
  /** When the first valid checkpoint covering the record was issued; null while none does. */
  signedAt: Date | null;
}

/** The changes of every class's retention, in sequence order, by class; `unread` apply to every class. */
export interface RetentionChanges {
  byClass: Map<string, RetentionChange[]>;
  /** Changes whose payload is gone, altered or unparsable: for ever, whatever their class was. */
  unread: RetentionChange[];
}

/** The first valid checkpoint's issue time covering leaf `seq`; null while none covers it, or the first does not verify. */
async function firstSignedAt(db: Queryable, seq: number, checkpointValid: (cp: Checkpoint) => boolean): Promise<Date | null> {
  const cp = await db.query<CheckpointRow>(`SELECT ${CHECKPOINT_COLUMNS} FROM audit.checkpoints c WHERE c.tree_size > $1 ORDER BY c.tree_size LIMIT 1`, [seq]);
  const first = cp.rows[0] === undefined ? null : checkpointOf(cp.rows[0]);
  return first !== null && checkpointValid(first) ? first.issuedAt : null;
}

/**
 * The changes of every class's retention recorded in the trail: one index walk
 * (`records_action_idx`) and one checkpoint read per change. `checkpointValid` checks a
 * checkpoint's signature; a change covered by none that verifies is not yet signed.
 */
export async function retentionChanges(db: Queryable, checkpointValid: (cp: Checkpoint) => boolean): Promise<RetentionChanges> {
  const r = await db.query<{ seq: string; occurred_at: Date; payload_hash: Buffer | null; payload: string | null }>(
    `SELECT r.seq::text, r.occurred_at, r.payload_hash, p.payload
       FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq
      WHERE r.action = 'audit.retention.change' AND r.record_class = 'governance' ORDER BY r.seq`,
  );
  const changes: RetentionChanges = { byClass: new Map(), unread: [] };
  for (const row of r.rows) {
    let parsed: { recordClass: string; days: number | null } | null = null;
    if (row.payload !== null && row.payload_hash !== null && sha256(row.payload).equals(row.payload_hash)) parsed = changeOf(row.payload);
    const seq = Number(row.seq);
    const change: RetentionChange = { seq, retainDaysAfter: parsed?.days ?? null, occurredAt: row.occurred_at, signedAt: await firstSignedAt(db, seq, checkpointValid) };
    if (parsed === null) {
      changes.unread.push(change);
      continue;
    }
    const list = changes.byClass.get(parsed.recordClass) ?? [];
    list.push(change);
    changes.byClass.set(parsed.recordClass, list);
  }
  return changes;
}

/** One class's changes (its own and the unreadable ones), in sequence order. */
export function changesOf(changes: RetentionChanges, recordClass: string): RetentionChange[] {
  return [...(changes.byClass.get(recordClass) ?? []), ...changes.unread].sort((x, y) => x.seq - y.seq);
}

/**
 * The changes of class `financial`'s retention recorded in the trail, in sequence order (the
 * unreadable ones included, as keeping it for ever).
 */
export async function financialRetentionChanges(db: Queryable, checkpointValid: (cp: Checkpoint) => boolean): Promise<RetentionChange[]> {
  return changesOf(await retentionChanges(db, checkpointValid), 'financial');
}

/** `text` parsed as JSON if that is an object (an array included), else null (not JSON, or a scalar or null). */
function jsonObject(text: string): object | null {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return null;
  }
  return typeof parsed === 'object' && parsed !== null ? parsed : null;
}

/** A change's class and days after it (null: for ever), or null for anything that does not parse as a change. */
function changeOf(payload: string): { recordClass: string; days: number | null } | null {
  const parsed = jsonObject(payload);
  if (parsed === null) return null;
  const { recordClass, retainDaysAfter } = parsed as { recordClass?: unknown; retainDaysAfter?: unknown };
  if (typeof recordClass !== 'string') return null;
  return { recordClass, days: typeof retainDaysAfter === 'number' && Number.isInteger(retainDaysAfter) && retainDaysAfter >= 1 ? retainDaysAfter : null };
}

/** When a leaf's retention runs out (ms; Infinity: kept for ever), and the later lengthening that put it there, if one did. */
export interface RetentionRunOut {
  at: number;
  keptBy: RetentionChange | null;
}

/**
 * When the retention of a leaf first covered at `coveredAt` runs out (the rule above), counted
 * from `from` (default `coveredAt`), under a class whose original policy is `originalDays`
 * (null: for ever).
 */
export function retentionRunsOut(
  changes: readonly RetentionChange[],
  coveredAt: Date,
  now: Date,
  options: { from?: Date; originalDays?: number | null } = {},
): RetentionRunOut {
  const covered = coveredAt.getTime();
  const from = (options.from ?? coveredAt).getTime();
  let days: number | null = options.originalDays === undefined ? FINANCIAL_RETAIN_DAYS_ORIGINAL : options.originalDays;
  let keptBy: RetentionChange | null = null;
  const runsOut = (): number => (days === null ? Infinity : from + days * DAY_MS);
  for (const change of changes) {
    if (change.signedAt !== null && change.signedAt.getTime() <= covered) {
      days = change.retainDaysAfter; // in force when the leaf was signed
      continue;
    }
    const longer = change.retainDaysAfter === null || (days !== null && change.retainDaysAfter > days);
    if (!longer) continue; // a later shortening does not reach this leaf, whenever it says it was made
    // Ran out before the policy grew (the earliest the change can have been made).
    const madeAt = Math.min(change.occurredAt.getTime(), change.signedAt?.getTime() ?? Infinity, now.getTime());
    if (runsOut() <= madeAt) return { at: runsOut(), keptBy };
    days = change.retainDaysAfter;
    keptBy = change;
  }
  return { at: runsOut(), keptBy };
}

/** Whether the financial retention of a leaf first covered at `coveredAt` has run out by `now` (the rule above). */
export function retentionRanOut(changes: readonly RetentionChange[], coveredAt: Date, now: Date): boolean {
  return retentionRunsOut(changes, coveredAt, now).at <= now.getTime();
}

/** A legal hold as the trail records it: its `audit.hold.place` record, and whether a release of it is recorded. */
export interface RecordedHold {
  /** The `audit.hold.place` record's sequence number. */
  seq: number;
  holdId: string;
  subject: string | null;
  resource: { type: string; id: string } | null;
  /** When the first valid checkpoint covering the placement was issued; null while none does. */
  signedAt: Date | null;
  /** A successful `audit.hold.release` of it is in the tree (signed or not), or waits in the queue for the sequencer. */
  released: boolean;
}

/**
 * The legal holds the trail records (`audit.hold.place` records, whose payload names the hold's
 * target, since migration 1769700000000), with whether a release of each is recorded. A
 * placement whose payload is gone, altered or unparsable names no target and is left out (its
 * own payload is reported if it went early: governance is kept for ever).
 *
 * A release counts from the moment `audit.release_hold` queues its record, in the release's own
 * transaction: expiry may run right after it, before the sequencer has integrated the record,
 * so a release still in `audit.queue` counts too, when the database queued it
 * (`audit.queued_by_database`, or queued before roles were recorded, as the sequencer judges
 * it): one the writer role queues itself is never integrated as a
 * release (the sequencer records it as `audit.entry.rejected`, provenance.ts), so it counts
 * neither here nor in the trail.
 */
export async function recordedHolds(db: Queryable, checkpointValid: (cp: Checkpoint) => boolean): Promise<RecordedHold[]> {
  const r = await db.query<{ seq: string; action: string; outcome: string; resource_id: string; payload_hash: Buffer | null; payload: string | null }>(
    `SELECT r.seq::text, r.action, r.outcome, r.resource_id, r.payload_hash, p.payload
       FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq
      WHERE r.action IN ('audit.hold.place', 'audit.hold.release') AND r.record_class = 'governance' AND r.resource_type = 'audit.legal_hold'
      ORDER BY r.seq`,
  );
  const released = new Set(r.rows.filter((row) => row.action === 'audit.hold.release' && row.outcome === 'success').map((row) => row.resource_id));
  // The writer role may not read the queue (migration 1769300000000): a verifier running as it
  // sees only the releases in the tree.
  const readable = await db.query<{ ok: boolean }>("SELECT has_table_privilege('audit.queue', 'SELECT') AS ok");
  const queued = readable.rows[0]?.ok === true
    ? (await db.query<{ entry: string }>(`SELECT q.entry FROM audit.queue q WHERE strpos(q.entry, 'audit.hold.release') > 0 AND (q.queued_by IS NULL OR ${QUEUED_BY_DATABASE('q')}) ORDER BY q.id`)).rows
    : [];
  for (const { entry } of queued) {
    const id = queuedReleaseOf(entry);
    if (id !== null) released.add(id);
  }
  const holds: RecordedHold[] = [];
  for (const row of r.rows) {
    if (row.action !== 'audit.hold.place' || row.outcome !== 'success') continue;
    if (row.payload === null || row.payload_hash === null || !sha256(row.payload).equals(row.payload_hash)) continue;
    const target = holdTargetOf(row.payload);
    if (target === null) continue;
    const seq = Number(row.seq);
    holds.push({ seq, holdId: row.resource_id, ...target, signedAt: await firstSignedAt(db, seq, checkpointValid), released: released.has(row.resource_id) });
  }
  return holds;
}

/** The hold id a queued entry releases (a successful `audit.hold.release`), or null. */
function queuedReleaseOf(entry: string): string | null {
  const parsed = jsonObject(entry);
  if (parsed === null) return null;
  const { action, outcome, recordClass, resource } = parsed as { action?: unknown; outcome?: unknown; recordClass?: unknown; resource?: unknown };
  if (action !== 'audit.hold.release' || outcome !== 'success' || recordClass !== 'governance' || typeof resource !== 'object' || resource === null) return null;
  const { type, id } = resource as { type?: unknown; id?: unknown };
  return type === 'audit.legal_hold' && typeof id === 'string' ? id : null;
}

function holdTargetOf(payload: string): { subject: string | null; resource: { type: string; id: string } | null } | null {
  const parsed = jsonObject(payload);
  if (parsed === null) return null;
  const { subject, resource } = parsed as { subject?: unknown; resource?: unknown };
  const s = typeof subject === 'string' ? subject : null;
  let res: { type: string; id: string } | null = null;
  if (typeof resource === 'object' && resource !== null) {
    const { type, id } = resource as { type?: unknown; id?: unknown };
    if (typeof type === 'string' && typeof id === 'string') res = { type, id };
  }
  return s === null && res === null ? null : { subject: s, resource: res };
}

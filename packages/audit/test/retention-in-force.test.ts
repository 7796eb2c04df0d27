/**
 * Verification judges a missing event by the financial class's retention as the trail records
 * it (src/retention-in-force.ts), never by the stored, unsigned audit.retention_policies row.
 *
 * The log is built up test by test, in order: a lawful shortening to 1 day (before any
 * financial data, so the database allows it), tile A; a lawful lengthening back to 2557 days,
 * tile B; a shortening to 1 day by a superuser who disabled the guard (recorded by the change
 * trigger all the same), tile D. Every round is signed. Tampering runs as a superuser with
 * triggers off, in a transaction the verifier reads from and that is then rolled back.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type pg from 'pg';
import type { VerifyReport } from '../src/index.ts';
import { FINANCIAL_RETAIN_DAYS_ORIGINAL, retentionRanOut, type RetentionChange } from '../src/retention-in-force.ts';
import { auditTestEnv, transferTile, verifiedAfter, type AuditTestEnv } from './support.ts';

const DAY = 86_400_000;
let t: AuditTestEnv;

before(async () => {
  t = await auditTestEnv();
});
after(async () => {
  await t.close();
});

const tampered = (tamper: (c: pg.PoolClient) => Promise<unknown>, now: Date): Promise<VerifyReport> => verifiedAfter(t, tamper, () => now);

const deleteEvent = (position: string) => (c: pg.PoolClient): Promise<unknown> => c.query('DELETE FROM events.events WHERE position = $1', [position]);
/** The superuser's UPDATE of the stored policy, with triggers off: unsigned and unrecorded. */
const lowerPolicy = (c: pg.PoolClient): Promise<unknown> => c.query("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
const inDays = (days: number): Date => new Date(Date.now() + days * DAY);

function missingAt(report: VerifyReport, position: string): void {
  assert.equal(report.ok, false, 'a deleted event passes as expired');
  assert.equal(report.firstDifference?.kind, 'event_missing', JSON.stringify(report.issues));
  assert.match(report.firstDifference?.detail ?? '', new RegExp(`event position ${position},`));
}

let a: string[] = [];
let b: string[] = [];

test('a shortening the trail records applies to the leaves signed after it; with its payload gone, it counts as keeping the class for ever', async () => {
  await t.pool.query("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
  a = await transferTile(t, 'a');
  const changes = await t.pool.query<{ n: number }>("SELECT count(*)::integer AS n FROM audit.records WHERE action = 'audit.retention.change'");
  assert.equal(changes.rows[0]?.n, 1, 'the change is a record of the tree');
  const expired = await tampered(deleteEvent(a[0] ?? ''), inDays(2));
  assert.equal(expired.ok, true, JSON.stringify(expired.issues));
  // Before the day has run out, the same deletion is one.
  missingAt(await tampered(deleteEvent(a[0] ?? ''), inDays(0.5)), a[0] ?? '');
  // Neither the record nor its payload may be dropped to change the verdict: a change that
  // cannot be read might have been a lengthening.
  const unread = await tampered(async (c) => {
    await c.query("DELETE FROM audit.payloads p USING audit.records r WHERE p.seq = r.seq AND r.action = 'audit.retention.change'");
    await deleteEvent(a[0] ?? '')(c);
  }, inDays(2));
  // The change record's payload is kept for ever (governance): its removal is reported first,
  // at the change's own seq, and the event the unreadable change can no longer excuse after it.
  assert.deepEqual(unread.issues.map((i) => i.kind), ['payload_missing', 'event_missing'], JSON.stringify(unread.issues));
  assert.match(unread.issues[1]?.detail ?? '', new RegExp(`event position ${a[0] ?? ''},`));
});

test('the stored policy row, lowered by a superuser with triggers off, excuses no deletion: a lengthening the trail records reaches the leaves signed before it', async () => {
  await t.pool.query("UPDATE audit.retention_policies SET retain_days = $1 WHERE record_class = 'financial'", [FINANCIAL_RETAIN_DAYS_ORIGINAL]);
  b = await transferTile(t, 'b');
  // Signed under seven years, deleted, verified two days later: reported, with the row lowered
  // to one day or not.
  missingAt(await tampered(deleteEvent(b[0] ?? ''), inDays(2)), b[0] ?? '');
  missingAt(await tampered(async (c) => {
    await lowerPolicy(c);
    await deleteEvent(b[0] ?? '')(c);
  }, inDays(2)), b[0] ?? '');
  // Tile A was signed under one day, but the policy grew before that day ran out.
  missingAt(await tampered(async (c) => {
    await lowerPolicy(c);
    await deleteEvent(a[1] ?? '')(c);
  }, inDays(2)), a[1] ?? '');
  // Seven years and a day on, the retention has run out.
  const expired = await tampered(deleteEvent(b[0] ?? ''), inDays(FINANCIAL_RETAIN_DAYS_ORIGINAL + 1));
  assert.equal(expired.ok, true, JSON.stringify(expired.issues));
});

test('a later shortening does not reach the leaves signed before it, only those after', async () => {
  // A superuser sets the guard aside: the change trigger still records it in the trail.
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query('ALTER TABLE audit.retention_policies DISABLE TRIGGER retention_policies_guard');
    await c.query("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
    await c.query('ALTER TABLE audit.retention_policies ENABLE TRIGGER retention_policies_guard');
    await c.query('COMMIT');
  } finally {
    c.release();
  }
  const d = await transferTile(t, 'd');
  missingAt(await tampered(deleteEvent(b[1] ?? ''), inDays(2)), b[1] ?? '');
  const after = await tampered(deleteEvent(d[0] ?? ''), inDays(2));
  assert.equal(after.ok, true, JSON.stringify(after.issues));
  // The stored row raised again by a superuser (unrecorded) does not matter either way.
  const raised = await tampered(async (c2) => {
    await c2.query("UPDATE audit.retention_policies SET retain_days = 9000 WHERE record_class = 'financial'");
    await deleteEvent(d[0] ?? '')(c2);
  }, inDays(2));
  assert.equal(raised.ok, true, JSON.stringify(raised.issues));
});

test('the rule: the policy in force when the leaf was signed, lengthened by every later lengthening made before it ran out', () => {
  const t0 = new Date('2030-01-01T00:00:00Z');
  const at = (days: number): Date => new Date(t0.getTime() + days * DAY);
  const change = (seq: number, retainDaysAfter: number | null, day: number, signed: boolean | number = true): RetentionChange => ({
    seq,
    retainDaysAfter,
    occurredAt: at(day),
    signedAt: signed === false ? null : at(signed === true ? day : signed),
  });
  // No change: the original policy.
  assert.equal(retentionRanOut([], t0, at(FINANCIAL_RETAIN_DAYS_ORIGINAL - 1)), false);
  assert.equal(retentionRanOut([], t0, at(FINANCIAL_RETAIN_DAYS_ORIGINAL)), true);
  // A shortening signed before the leaf applies; one signed after it, or not signed, does not.
  assert.equal(retentionRanOut([change(1, 10, -1)], t0, at(10)), true);
  assert.equal(retentionRanOut([change(1, 10, 1)], t0, at(10)), false);
  assert.equal(retentionRanOut([change(1, 10, -1, false)], t0, at(10)), false);
  // Made before the leaf but signed only after it: not in force when the leaf was signed.
  assert.equal(retentionRanOut([change(1, 10, -1, 1)], t0, at(10)), false);
  // A lengthening made after the leaf had run out leaves it run out; made before, it applies.
  assert.equal(retentionRanOut([change(1, 10, -1), change(2, 100, 11)], t0, at(20)), true);
  assert.equal(retentionRanOut([change(1, 10, -1), change(2, 100, 9)], t0, at(20)), false);
  assert.equal(retentionRanOut([change(1, 10, -1), change(2, 100, 9)], t0, at(100)), true);
  // The policy removed (kept for ever), or a change that could not be read.
  assert.equal(retentionRanOut([change(1, null, -1)], t0, at(1_000_000)), false);
  assert.equal(retentionRanOut([change(1, 10, -1), change(2, null, 5)], t0, at(1_000_000)), false);
  // An occurred time later than its signature does not put off the lengthening.
  assert.equal(retentionRanOut([change(1, 10, -1), { seq: 2, retainDaysAfter: 100, occurredAt: at(50), signedAt: at(9) }], t0, at(20)), false);
});

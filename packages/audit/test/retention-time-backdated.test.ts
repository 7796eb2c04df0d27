/**
 * When a retention change takes effect, for verification, whatever time its record states
 * (src/retention-in-force.ts): the schema's owner (or a superuser) can queue an
 * `audit.retention.change` record of its own, dated as it likes (the writer role cannot since
 * migration 1770200000000: queue-provenance.test.ts). A shortening counts from its signature alone, so dating
 * one back reaches no leaf signed before it; a lengthening counts from the earlier of its stated
 * and signed times, so dating one back can only make lawfully removed data read as missing (a
 * false alarm, never a hidden removal), and the finding names the lengthening with both times.
 *
 * The sequencer's clock is injected and set in the past; the database's is the real one. Each
 * test has a database of its own; deletions run as a superuser with triggers off, rolled back.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { VerifyReport } from '../src/index.ts';
import { retentionRunsOut, type RetentionChange } from '../src/retention-in-force.ts';
import { auditTestEnvPerTest, DAY, daysAgo, testClock, transferTile, verifiedAfter, type AuditTestEnv } from './support.ts';

const clock = testClock();
let t: AuditTestEnv;
auditTestEnvPerTest(clock, (env) => {
  t = env;
});

/**
 * A financial retention change queued as the owner (the tests' superuser login), as the change
 * trigger would write it but dated `statedAt`, with no change of the stored policy; signed at
 * the clock's time.
 * Returns its record's seq.
 */
async function queuedChange(before: number, after: number, statedAt: number): Promise<number> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query(
      `INSERT INTO audit.queue (entry) VALUES (json_build_object(
         'id', gen_random_uuid()::text, 'occurredAt', $1::text, 'recordClass', 'governance',
         'actor', json_build_object('type', 'user', 'id', 'db:postgres'), 'action', 'audit.retention.change', 'outcome', 'success',
         'origin', json_build_object('service', 'postgresql'), 'resource', json_build_object('type', 'audit.retention_policy', 'id', 'financial'),
         'payloadJson', '{"changedAs":"postgres","recordClass":"financial","retainDaysAfter":' || $2::int || ',"retainDaysBefore":' || $3::int || '}',
         'personalJson', NULL)::text)`,
      [new Date(statedAt).toISOString(), after, before],
    );
    await c.query('COMMIT');
  } finally {
    c.release();
  }
  await t.settle();
  const r = await t.pool.query<{ seq: string }>("SELECT max(seq)::text AS seq FROM audit.records WHERE action = 'audit.retention.change'");
  return Number(r.rows[0]?.seq);
}

/** Verification today with one event deleted (rolled back after). */
const verifiedWithout = (position: string): Promise<VerifyReport> =>
  verifiedAfter(t, async (c) => {
    const r = await c.query('DELETE FROM events.events WHERE position = $1', [position]);
    assert.equal(r.rowCount, 1);
  });

function verifies(report: VerifyReport): void {
  assert.equal(report.ok, true, JSON.stringify(report.issues));
}

/** A lawful shortening of financial to one day, before any financial data; signed 40 days ago. */
async function shortenedToADay(): Promise<void> {
  clock.ms = daysAgo(40);
  await t.pool.query("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
  await t.settle();
}

test('a lengthening dated back makes an event lawfully removed before it read as missing, and the finding names it with its stated and signed times', async () => {
  await shortenedToADay();
  clock.ms = daysAgo(30);
  const [x] = await transferTile(t, 'x');
  // x ran out 29 days ago (one day after it was signed) and may go. 20 days ago, a lengthening
  // to seven years is queued, stated as made 35 days ago, before x ran out.
  clock.ms = daysAgo(20);
  const stated = daysAgo(35);
  const seq = await queuedChange(1, 2557, stated);
  const report = await verifiedWithout(x ?? '');
  assert.equal(report.firstDifference?.kind, 'event_missing', JSON.stringify(report.issues));
  const signed = new Date(clock.ms).toISOString();
  assert.match(
    report.firstDifference?.detail ?? '',
    new RegExp(`kept by the retention lengthening recorded at seq ${seq}, stated as made ${new Date(stated).toISOString()}, signed ${signed}`),
    'the finding does not name the lengthening that made it one',
  );
});

test('the same lengthening dated when it was queued leaves the lawful removal alone', async () => {
  await shortenedToADay();
  clock.ms = daysAgo(30);
  const [x] = await transferTile(t, 'x');
  clock.ms = daysAgo(20);
  await queuedChange(1, 2557, clock.ms);
  verifies(await verifiedWithout(x ?? ''));
});

test('a shortening dated back reaches no leaf signed before its own signature, only the leaves signed after it', async () => {
  clock.ms = daysAgo(30);
  const [y] = await transferTile(t, 'y');
  // Queued 20 days ago, stated as made long before y: y stays under seven years.
  clock.ms = daysAgo(20);
  await queuedChange(2557, 1, daysAgo(1000));
  clock.ms = daysAgo(10);
  const [z] = await transferTile(t, 'z');
  const report = await verifiedWithout(y ?? '');
  assert.equal(report.firstDifference?.kind, 'event_missing', JSON.stringify(report.issues));
  assert.match(report.firstDifference?.detail ?? '', new RegExp(`event position ${y},`));
  // z was signed after it: its day has run out (the trail shows the change that allowed it).
  verifies(await verifiedWithout(z ?? ''));
});

test('the rule: a shortening is taken from its signature, a lengthening from the earlier of its two times, and the one that kept the leaf is named', () => {
  const t0 = new Date('2030-01-01T00:00:00Z');
  const at = (days: number): Date => new Date(t0.getTime() + days * DAY);
  const change = (seq: number, retainDaysAfter: number | null, stated: number, signed: number | null): RetentionChange => ({
    seq,
    retainDaysAfter,
    occurredAt: at(stated),
    signedAt: signed === null ? null : at(signed),
  });
  // A shortening stated before the leaf but signed after it does not reach it.
  assert.equal(retentionRunsOut([change(1, 10, -5, 1)], t0, at(20)).at, at(2557).getTime());
  // A lengthening stated before the leaf ran out keeps it, and is named; one stated after it ran
  // out does not, whenever it was signed.
  const shortened = change(1, 10, -1, -1);
  const backdated = change(2, 100, 5, 50);
  assert.deepEqual(retentionRunsOut([shortened, backdated], t0, at(60)), { at: at(100).getTime(), keptBy: backdated });
  assert.deepEqual(retentionRunsOut([shortened, change(2, 100, 11, 50)], t0, at(60)), { at: at(10).getTime(), keptBy: null });
  // Counted from another time (a payload: its record's occurred time), under another original policy.
  assert.equal(retentionRunsOut([], t0, at(400), { from: at(-100), originalDays: 366 }).at, at(266).getTime());
  assert.equal(retentionRunsOut([], t0, at(400), { originalDays: null }).at, Infinity);
});

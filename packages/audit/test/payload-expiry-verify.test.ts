/**
 * Verification reports a payload removed before the retention in force let it go
 * (`payload_missing`), judging by the trail's signed `audit.retention.change` records and the
 * original policies (src/retention-in-force.ts), never by the stored, unsigned
 * `audit.retention_policies` row that `audit.expire_payloads` and `payload_delete_guard` read;
 * and a payload removed while a legal hold the trail records covered it. A payload lawfully
 * expired, and a subject's personal data crypto-shredded, still verify clean.
 *
 * The sink's and the sequencer's clocks are injected and set in the past (records occur, and
 * checkpoints are issued, then); the database's clock, which expiry reads, is the real one.
 * Each test has a database of its own. Early removals run as a superuser with triggers off.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type pg from 'pg';
import { verifyLog, type VerifyReport } from '../src/index.ts';
import { auditTestEnvPerTest, daysAgo, REVIEWER, testClock, verifiedAfter, type AuditTestEnv } from './support.ts';

const clock = testClock();
let t: AuditTestEnv;
auditTestEnvPerTest(clock, (env) => {
  t = env;
});

const base = { actor: { type: 'user' as const, id: 'user:teller-7' }, action: 'ledger.account.read', outcome: 'success' as const, origin: { service: 'ledger' } };

/** An access record (366 days) about `id`, occurring at the clock's time; signed. Returns its seq. */
async function access(id: string, subject?: string): Promise<number> {
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id }, ...(subject === undefined ? {} : { subject, personal: { name: id } }), payload: { view: 'balance' } });
  await t.settle();
  const r = await t.pool.query<{ seq: string }>("SELECT seq::text FROM audit.records WHERE resource_type = 'account' AND resource_id = $1", [id]);
  return Number(r.rows[0]?.seq);
}

/** Verification today, after `tamper` ran as a superuser with triggers off (rolled back after). */
const tampered = (tamper: (c: pg.PoolClient) => Promise<unknown>): Promise<VerifyReport> => verifiedAfter(t, tamper);

const dropPayload = (seq: number) => (c: pg.PoolClient): Promise<unknown> => c.query('DELETE FROM audit.payloads WHERE seq = $1', [seq]);

function verifies(report: VerifyReport): void {
  assert.equal(report.ok, true, JSON.stringify(report.issues));
}

function payloadMissing(report: VerifyReport, seq: number, detail?: RegExp): void {
  assert.equal(report.ok, false, `the payload of record ${seq} went early, unreported`);
  const found = report.issues.filter((i) => i.kind === 'payload_missing');
  assert.deepEqual(found.map((i) => i.seq), [seq], JSON.stringify(report.issues));
  if (detail !== undefined) assert.match(found[0]?.detail ?? '', detail);
}

test('a payload expired early through a lowered, unrecorded policy row is reported at its record', async () => {
  clock.ms = daysAgo(100);
  const seq = await access('acc-early');
  // 100 days into 366: expire_payloads keeps it.
  assert.equal(await t.store.expirePayloads(new Date(), REVIEWER), 0);
  // The tables' owner or a superuser lowers the row with the triggers off (no record in the
  // trail), and expiry, which reads the row, removes the payload.
  const report = await tampered(async (c) => {
    await c.query("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'access'");
    const r = await c.query<{ n: number }>('SELECT audit.expire_payloads(now(), 100) AS n');
    assert.ok((r.rows[0]?.n ?? 0) >= 1, 'expiry removed nothing');
  });
  payloadMissing(report, seq, /class access.*runs out at/);
  // A payload deleted outright, the same.
  payloadMissing(await tampered(dropPayload(seq)), seq);
});

test('payloads expired lawfully, by the original policy or a recorded shortening, and erased subjects verify clean', async () => {
  clock.ms = daysAgo(400);
  const old = await access('acc-old', 'cust-1');
  // A lawful shortening of access to 30 days, signed 50 days ago: nothing was owed the 366
  // days then (the database refuses it otherwise). It reaches the records signed after it.
  clock.ms = daysAgo(50);
  await t.pool.query("UPDATE audit.retention_policies SET retain_days = 30 WHERE record_class = 'access'");
  await t.settle();
  clock.ms = daysAgo(40);
  const underShort = await access('acc-short', 'cust-2');
  clock.ms = daysAgo(10);
  const recent = await access('acc-recent');
  assert.equal(await t.store.expirePayloads(new Date(), REVIEWER), 2);
  const gone = await t.pool.query<{ seq: string }>('SELECT r.seq::text FROM audit.records r WHERE NOT EXISTS (SELECT 1 FROM audit.payloads p WHERE p.seq = r.seq) AND r.payload_hash IS NOT NULL ORDER BY r.seq');
  assert.deepEqual(gone.rows.map((r) => Number(r.seq)), [old, underShort], 'expiry removed what was due');
  // Crypto-shredding keeps the payload row; the subject's key goes.
  assert.equal(await t.store.eraseSubject('cust-2', REVIEWER), true);
  await t.settle();
  verifies(await verifyLog(t.pool, { publicKey: t.signer.publicKey }));
  // The still-kept one, removed, is reported: 10 days into 30.
  payloadMissing(await tampered(dropPayload(recent)), recent);
});

test('a payload kept for ever (no policy, such as governance records) is reported when gone', async () => {
  await t.store.placeHold({ subject: 'cust-9' }, 'case 12', REVIEWER);
  await t.settle();
  const r = await t.pool.query<{ seq: string }>("SELECT seq::text FROM audit.records WHERE action = 'audit.hold.place'");
  const seq = Number(r.rows[0]?.seq);
  payloadMissing(await tampered(dropPayload(seq)), seq, /kept for ever/);
});

test('a payload removed while a legal hold the trail records covered it is reported; one that ran out before the hold, or after its release, is not', async () => {
  clock.ms = daysAgo(400);
  const heldEarly = await access('acc-h1', 'cust-h');
  const beforeHold = await access('acc-h2');
  // acc-h1 runs out 34 days ago. The hold on cust-h is signed 100 days ago, before that; the
  // hold on acc-h2 only 10 days ago, after it had run out (it may have gone before).
  clock.ms = daysAgo(100);
  await t.store.placeHold({ subject: 'cust-h' }, 'litigation 7', REVIEWER);
  await t.settle();
  clock.ms = daysAgo(10);
  const late = await t.store.placeHold({ resource: { type: 'account', id: 'acc-h2' } }, 'inquiry 3', REVIEWER);
  await t.settle();
  // Expiry, as the database runs it, keeps both: held.
  assert.equal(await t.store.expirePayloads(new Date(), REVIEWER), 0);
  payloadMissing(await tampered(dropPayload(heldEarly)), heldEarly, /legal hold .* covered it before its retention ran out/);
  verifies(await tampered(dropPayload(beforeHold)));
  // Released (and recorded), the payload may have gone since: nothing to report.
  const hold = (await t.store.activeHolds()).find((h) => h.subject === 'cust-h');
  assert.ok(hold !== undefined);
  assert.equal(await t.store.releaseHold(hold.id, REVIEWER), true);
  assert.equal(await t.store.expirePayloads(new Date(), REVIEWER), 1);
  // The release's record still waits for the sequencer: it counts from the queue, then signed.
  verifies(await verifyLog(t.pool, { publicKey: t.signer.publicKey }));
  await t.settle();
  verifies(await verifyLog(t.pool, { publicKey: t.signer.publicKey }));
  assert.equal(await t.store.releaseHold(late, REVIEWER), true);
});

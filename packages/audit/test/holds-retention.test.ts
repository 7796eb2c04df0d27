/**
 * Event-store deletion (`auditLegalHolds().isHeld` with intent `delete`) waits for the
 * retention verification judges by: the trail's signed `audit.retention.change` records
 * (src/retention-in-force.ts), never the stored, unsigned `audit.retention_policies` row alone.
 * An event it lets go must verify as expired; one it keeps is one verification would report
 * as `event_missing` if it were gone.
 *
 * The sequencer's clock is injected and set in the past, so that checkpoints are old enough
 * for retention to run out by the database's clock (deletion never looks past it). Each test
 * has a database of its own.
 */
import assert from 'node:assert/strict';
import type pg from 'pg';
import { test } from 'node:test';
import { verifyLog, type VerifyReport } from '../src/index.ts';
import { auditLegalHolds } from '../src/holds.ts';
import { auditTestEnvPerTest, DAY, daysAgo, REVIEWER, testClock, verifiedAfter, type AuditTestEnv } from './support.ts';

const TYPE = 'ledger.transfer';

const clock = testClock();
let t: AuditTestEnv;
auditTestEnvPerTest(clock, (env) => {
  t = env;
});

async function transfer(id: string): Promise<void> {
  await t.events.append(t.pool, { type: TYPE, id }, [{ type: 'ledger.TransferPosted', data: { id, result: 'ok' }, metadata: { actor: 'user:u' } }], { expectedVersion: 'no_stream' });
}

/** Whether event-store retention must keep the stream, on the real clock, as it asks in its transaction. */
async function held(id: string, action: 'archive' | 'delete' = 'delete'): Promise<boolean> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    return await auditLegalHolds().isHeld(c, { streamType: TYPE, streamId: id }, { action, now: new Date() });
  } finally {
    await c.query('ROLLBACK');
    c.release();
  }
}

/** A superuser's statement with the triggers off: neither guarded nor recorded. */
async function unrecorded(sql: string, args: unknown[] = []): Promise<void> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query('SET LOCAL session_replication_role = replica');
    await c.query(sql, args);
    await c.query('COMMIT');
  } finally {
    c.release();
  }
}

/** Verification, today, of the log with the stream's events deleted (rolled back after). */
const verifiedWithout = (id: string): Promise<VerifyReport> =>
  verifiedAfter(t, async (c) => {
    const r = await c.query('DELETE FROM events.events WHERE stream_type = $1 AND stream_id = $2', [TYPE, id]);
    assert.ok((r.rowCount ?? 0) > 0);
  });

function verifies(report: VerifyReport): void {
  assert.equal(report.ok, true, JSON.stringify(report.issues));
}
function missing(report: VerifyReport): void {
  assert.equal(report.ok, false);
  assert.equal(report.firstDifference?.kind, 'event_missing', JSON.stringify(report.issues));
}

const retentionChanges = async (): Promise<number> =>
  Number(
    (await t.pool.query<{ n: string }>(
      `SELECT (SELECT count(*) FROM audit.records WHERE action = 'audit.retention.change')
            + (SELECT count(*) FROM audit.queue WHERE entry::jsonb ->> 'action' = 'audit.retention.change') AS n`,
    )).rows[0]?.n,
  );

test('a stored policy lowered without a record (a superuser, triggers off) does not make an event deletable early', async () => {
  // x-old: signed 2600 days ago, past the original 2557; x-1: signed ten days ago.
  clock.ms = daysAgo(2600);
  await transfer('x-old');
  await t.settle();
  clock.ms = daysAgo(10);
  await transfer('x-1');
  await t.settle();
  assert.equal(await held('x-1'), true);

  await unrecorded("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
  assert.equal(await retentionChanges(), 0, 'the trail has no record of the change');
  // By the row, x-1 ran out nine days ago; verification still holds it to 2557 days.
  assert.equal(await held('x-1'), true, 'a one-day row let x-1 go, which verification reports missing');
  missing(await verifiedWithout('x-1'));
  // Still so after the sequencer runs again: nothing was queued for it to sign.
  await t.settle();
  assert.equal(await held('x-1'), true);
  // Where the trail's retention has run out too, the event goes, and its absence verifies.
  assert.equal(await held('x-old'), false);
  verifies(await verifiedWithout('x-old'));
});

test('a signed retention change takes effect, for the leaves signed after it; a shortening does not reach leaves signed before it', async () => {
  // t-before: recorded in the event store eight years ago, but taken by the trail (and signed)
  // only twenty days ago, as when the trail began tailing a store late. The guard judges a
  // shortening by recorded times, so it lets the policy drop to one day.
  clock.ms = daysAgo(20);
  await transfer('t-before');
  await t.pool.query("UPDATE events.events SET recorded_at = now() - interval '8 years' WHERE stream_type = $1 AND stream_id = 't-before'", [TYPE]);
  await t.settle();

  await t.pool.query("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
  assert.equal(await retentionChanges(), 1, 'a lawful change is recorded');
  // Queued, not yet signed: the row says one day, the trail 2557 days.
  assert.equal(await held('t-before'), true, 'a shortening not yet signed let t-before go');
  clock.ms = daysAgo(19);
  await t.settle();
  // Signed nineteen days ago: in force for t-after (signed eighteen days ago), so its day has
  // run out; t-before was signed before it, and is owed 2557 days.
  clock.ms = daysAgo(18);
  await transfer('t-after');
  await t.settle();
  assert.equal(await held('t-after'), false, 'the signed shortening applies to leaves signed after it');
  verifies(await verifiedWithout('t-after'));
  assert.equal(await held('t-before'), true, 'the shortening reached a leaf signed before it');
  missing(await verifiedWithout('t-before'));
});

test('a lengthening still queued for the sequencer keeps what it will reach: the row, when stricter, is kept to', async () => {
  // A lawful shortening to one day before any financial data, signed; q-1 signed under it.
  await t.pool.query("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
  clock.ms = daysAgo(20);
  await t.settle();
  clock.ms = daysAgo(18);
  await transfer('q-1');
  await t.settle();
  assert.equal(await held('q-1'), false, "q-1's day has run out");
  // A lengthening to 30 days, made (and queued) 17.5 days ago, before q-1's day ran out; the
  // sequencer has not run since. The trail alone still says one day.
  await t.pool.query("UPDATE audit.retention_policies SET retain_days = 30 WHERE record_class = 'financial'");
  await unrecorded(
    `UPDATE audit.queue SET entry = jsonb_set(entry::jsonb, '{occurredAt}', to_jsonb($1::text))::text WHERE entry::jsonb ->> 'action' = 'audit.retention.change'`,
    [new Date(daysAgo(17.5)).toISOString()],
  );
  assert.equal(await held('q-1'), true, 'the queued lengthening did not keep q-1');
  // Once signed, the lengthening reaches q-1: had it gone, verification would say so.
  clock.ms = daysAgo(1);
  await t.settle();
  assert.equal(await held('q-1'), true);
  missing(await verifiedWithout('q-1'));
});

test('legal holds still block deletion and archiving; a released hold leaves the stream to the trail retention, not to a lowered row', async () => {
  clock.ms = daysAgo(2600);
  await transfer('h-old');
  await transfer('free');
  await t.settle();
  clock.ms = daysAgo(10);
  await transfer('h-new');
  await t.settle();
  const holds = [
    await t.store.placeHold({ resource: { type: TYPE, id: 'h-old' } }, 'case 7', REVIEWER),
    await t.store.placeHold({ resource: { type: TYPE, id: 'h-new' } }, 'case 7', REVIEWER),
  ];
  await unrecorded("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'");
  // h-old's retention has run out by every measure, and the hold keeps it all the same.
  assert.equal(await held('free'), false);
  for (const id of ['h-old', 'h-new']) {
    assert.equal(await held(id), true, `${id} deleted under a hold`);
    assert.equal(await held(id, 'archive'), true, `${id} archived under a hold`);
  }
  for (const id of holds) assert.equal(await t.store.releaseHold(id, REVIEWER), true);
  assert.equal(await held('h-old'), false);
  assert.equal(await held('h-old', 'archive'), false);
  assert.equal(await held('h-new', 'archive'), false);
  assert.equal(await held('h-new'), true, 'released, h-new went by the lowered row');
});

/** Retention's own transaction: asks, and deletes the stream's events when it may. */
async function retain(c: pg.PoolClient, id: string): Promise<boolean> {
  await c.query('BEGIN');
  const keep = await auditLegalHolds().isHeld(c, { streamType: TYPE, streamId: id }, { action: 'delete', now: new Date() });
  if (!keep) {
    await c.query('SET LOCAL session_replication_role = replica');
    await c.query('DELETE FROM events.events WHERE stream_type = $1 AND stream_id = $2', [TYPE, id]);
  }
  return keep;
}

/**
 * A race between a change of the financial policy and retention, on connections of their own:
 * the change's transaction begins, then stream `id` is written and signed so that seven years
 * run out 300 ms after it began; `race` then runs, and ends both transactions. Returns
 * verification, today, once the sequencer has run again.
 */
async function raced(id: string, race: (change: pg.PoolClient, retention: pg.PoolClient) => Promise<void>): Promise<VerifyReport> {
  const change = await t.pool.connect();
  const retention = await t.pool.connect();
  try {
    await change.query('BEGIN');
    const began = (await change.query<{ t: Date }>('SELECT now() AS t')).rows[0]?.t.getTime() ?? 0;
    clock.ms = began + 300 - 2557 * DAY;
    await transfer(id);
    await t.settle();
    await race(change, retention);
    clock.ms = Date.now();
    await t.settle();
    return await verifyLog(t.pool, { publicKey: t.signer.publicKey, now: () => new Date() });
  } finally {
    change.release();
    retention.release();
  }
}

test('a lengthening still in flight (its transaction open) is waited for, and keeps what it reaches', async () => {
  // Signed so that seven years run out 300 ms after the change began.
  const report = await raced('race-1', async (change, retention) => {
    await change.query("UPDATE audit.retention_policies SET retain_days = 3000 WHERE record_class = 'financial'");
    await new Promise((resolve) => setTimeout(resolve, 800));
    let answered = false;
    const asked = retain(retention, 'race-1').finally(() => {
      answered = true;
    });
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(answered, false, 'retention waits for the change in flight');
    await change.query('COMMIT');
    assert.equal(await asked, true, 'the lengthening, committed meanwhile, keeps the stream');
    await retention.query('COMMIT');
  });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

test('a lengthening that waited behind retention is dated after the deletion it waited for, which it does not reach', async () => {
  // The change's transaction begins first, then retention decides and deletes, then the
  // change's UPDATE (waiting for retention's lock) goes through.
  const report = await raced('race-2', async (change, retention) => {
    await new Promise((resolve) => setTimeout(resolve, 800));
    assert.equal(await retain(retention, 'race-2'), false, 'run out by every rule in force: it may go');
    const updated = change.query("UPDATE audit.retention_policies SET retain_days = 3000 WHERE record_class = 'financial'");
    await new Promise((resolve) => setTimeout(resolve, 200));
    await retention.query('COMMIT');
    await updated;
    await change.query('COMMIT');
  });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

test('a policy change left open keeps the stream for a later run after a bounded wait, and the caller\'s transaction goes on', async () => {
  await transfer('idle-1');
  await t.settle();
  const change = await t.pool.connect();
  const retention = await t.pool.connect();
  try {
    await change.query('BEGIN');
    await change.query("UPDATE audit.retention_policies SET retain_days = 3000 WHERE record_class = 'financial'");
    await retention.query('BEGIN');
    await retention.query("SET LOCAL lock_timeout = '7s'");
    const started = Date.now();
    const keep = await auditLegalHolds().isHeld(retention, { streamType: TYPE, streamId: 'idle-1' }, { action: 'delete', now: new Date() });
    assert.equal(keep, true, 'kept while the change is open');
    assert.ok(Date.now() - started < 10_000, 'the wait is bounded');
    // The caller's transaction is usable, with its own lock_timeout back.
    assert.equal((await retention.query<{ lock_timeout: string }>('SHOW lock_timeout')).rows[0]?.lock_timeout, '7s');
    await retention.query('COMMIT');
    await change.query('ROLLBACK');
  } finally {
    change.release();
    retention.release();
  }
});

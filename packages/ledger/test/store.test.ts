/**
 * The batch's opening round trip (`openBatch`) on real PostgreSQL: what it locks, reserves and
 * reads, and what it refuses to inline.
 */
import assert from 'node:assert/strict';
import { after, before, beforeEach, test } from 'node:test';
import { ManualClock } from '@ledgerline/testing';
import { LedgerEngine, newId } from '../src/index.ts';
import { openBatch } from '../src/store.ts';
import { ledgerTestDb, resetLedger, type LedgerTestDb } from './support.ts';

let t: LedgerTestDb;
before(async () => {
  t = await ledgerTestDb();
});
after(async () => {
  await t.close();
});
beforeEach(async () => {
  await resetLedger(t.pool);
});

/** Whether another session could lock the row now (NOWAIT: fails at once if it is held). */
async function lockable(sql: string, values: unknown[]): Promise<boolean> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query(`${sql} FOR UPDATE NOWAIT`, values);
    return true;
  } catch (error) {
    if ((error as { code?: string }).code === '55P03') return false;
    throw error;
  } finally {
    await c.query('ROLLBACK');
    c.release();
  }
}

test("openBatch locks the named accounts and the pending transfers' accounts, reserves the clock, reads the transfers", async () => {
  // Given accounts a, b, c and a pending transfer p from a to b,
  const clock = new ManualClock();
  const engine = new LedgerEngine({ pool: t.pool, clock: clock.now });
  const [a, b, c] = [newId(), newId(), newId()];
  await engine.createAccounts([a, b, c].map((id) => ({ id, ledger: 'USD', code: 1 })));
  const p = newId();
  const [pending] = await engine.createTransfers([
    { id: p, debitAccountId: a, creditAccountId: b, amount: 5n, ledger: 'USD', code: 1, flags: { pending: true } },
  ]);
  await engine.close();
  assert.equal(pending?.result, 'ok');
  const before = await t.pool.query<{ ts: string }>('SELECT timestamp::text AS ts FROM ledger.clock');
  const last = BigInt(before.rows[0]?.ts ?? '0');

  // When a batch that names only c and posts p opens,
  const client = await t.pool.connect();
  try {
    const unknown = newId();
    const opened = await openBatch(client, { accountIds: [c], pendingIds: [p], transferIds: [p, unknown], count: 3, nowNs: 0n });

    // Then it holds a, b and c (in ascending id order) and the clock, until it ends,
    assert.deepEqual(opened.accounts.map((x) => x.id), [a, b, c].sort());
    assert.ok(opened.accounts.every((x) => x.ctid !== undefined));
    for (const id of [a, b, c]) assert.equal(await lockable('SELECT 1 FROM ledger.accounts WHERE id = $1', [id]), false);
    assert.equal(await lockable('SELECT 1 FROM ledger.clock', []), false);
    // it reserved the three timestamps after the last one issued,
    assert.equal(opened.firstTimestamp, last + 1n);
    // and it read the transfers that exist among those asked for.
    assert.deepEqual(opened.transfers.map((x) => [x.id, x.pendingStatus]), [[p, 'pending']]);
  } finally {
    await client.query('ROLLBACK');
    client.release();
  }
  assert.equal(await lockable('SELECT 1 FROM ledger.accounts WHERE id = $1', [a]), true);
});

test('openBatch reserves timestamps at or after the wall clock when it is ahead', async () => {
  const client = await t.pool.connect();
  try {
    const opened = await openBatch(client, { accountIds: [], pendingIds: [], transferIds: [newId()], count: 2, nowNs: 1_000_000n });
    assert.equal(opened.firstTimestamp, 1_000_000n);
    assert.deepEqual([opened.accounts, opened.transfers], [[], []]);
  } finally {
    await client.query('ROLLBACK');
    client.release();
  }
});

test('openBatch inlines nothing but canonical UUIDs and integers', async () => {
  const client = await t.pool.connect();
  try {
    const hostile = "00000000-0000-0000-0000-000000000001}'::uuid[]); DROP TABLE ledger.accounts; --";
    for (const input of [
      { accountIds: [hostile], pendingIds: [], transferIds: [newId()] },
      { accountIds: [], pendingIds: [hostile], transferIds: [newId()] },
      { accountIds: [], pendingIds: [], transferIds: [newId().toUpperCase()] },
    ]) {
      await assert.rejects(openBatch(client, { ...input, count: 1, nowNs: 0n }), /invariant: not a canonical UUID/);
    }
    await assert.rejects(openBatch(client, { accountIds: [], pendingIds: [], transferIds: [newId()], count: 1.5, nowNs: 0n }), RangeError);
    // Nothing reached the server: the table is still there and the session is not in an
    // aborted transaction.
    const r = await client.query<{ n: string }>('SELECT count(*)::text AS n FROM ledger.accounts');
    assert.equal(r.rows[0]?.n, '0');
  } finally {
    client.release();
  }
});

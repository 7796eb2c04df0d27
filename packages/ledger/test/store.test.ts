/**
 * The batch's two round trips on real PostgreSQL: what the opening one (`openBatch`) locks,
 * reserves and reads, and what it refuses to inline; what the write's statements
 * (`writeBatchStatements`) refuse to commit, and that they leave nothing in the session.
 */
import assert from 'node:assert/strict';
import { after, before, beforeEach, test } from 'node:test';
import { ManualClock } from '@ledgerline/testing';
import { LedgerEngine, newId } from '../src/index.ts';
import { decideBatch } from '../src/decide.ts';
import type { AccountRow } from '../src/rows.ts';
import { openBatch, reserveTimestamps, selectTransfers, writeBatchStatements } from '../src/store.ts';
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

test("openBatch locks the named accounts and the pending transfers' accounts, reserves timestamps, reads the transfers", async () => {
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
  const before = await t.pool.query<{ ts: string }>('SELECT last_value::text AS ts FROM ledger.timestamps');
  const last = BigInt(before.rows[0]?.ts ?? '0');

  // When a batch that names only c and posts p opens,
  const client = await t.pool.connect();
  try {
    const unknown = newId();
    const opened = await openBatch(client, { accountIds: [c], pendingIds: [p], transferIds: [p, unknown], count: 3, nowNs: 0n });

    // Then it holds a, b and c (in ascending id order) until it ends,
    assert.deepEqual(opened.accounts.map((x) => x.id), [a, b, c].sort());
    assert.ok(opened.accounts.every((x) => x.ctid !== undefined));
    for (const id of [a, b, c]) assert.equal(await lockable('SELECT 1 FROM ledger.accounts WHERE id = $1', [id]), false);
    // it reserved the three timestamps after the last one issued, and holds nothing for them:
    // another writer reserves the next ones at once, while this batch is still open,
    assert.equal(opened.firstTimestamp, last + 1n);
    assert.equal(await reserveTimestamps(t.pool, 1, 0n), last + 4n);
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

test('reserve_timestamps: concurrent reservations never overlap, survive a rollback, and an error leaves no lock behind', async () => {
  // Given eight sessions that each reserve ranges of 1..5 timestamps, forty times, at once,
  // some of them inside a transaction that rolls back,
  const ranges: Array<[bigint, bigint]> = [];
  await Promise.all(
    Array.from({ length: 8 }, async (_, s) => {
      const c = await t.pool.connect();
      try {
        for (let i = 0; i < 40; i += 1) {
          const count = 1 + ((s + i) % 5);
          const rollback = i % 3 === 0;
          if (rollback) await c.query('BEGIN');
          const first = await reserveTimestamps(c, count, 0n);
          if (rollback) await c.query('ROLLBACK');
          ranges.push([first, first + BigInt(count) - 1n]);
        }
      } finally {
        c.release();
      }
    }),
  );
  // then no two ranges share a timestamp, rolled back or not: a rollback leaves a gap, never
  // a timestamp to be issued twice,
  ranges.sort((x, y) => (x[0] < y[0] ? -1 : 1));
  for (let i = 1; i < ranges.length; i += 1) {
    assert.ok((ranges[i]?.[0] as bigint) > (ranges[i - 1]?.[1] as bigint), `ranges ${i - 1} and ${i} overlap`);
  }
  const last = (ranges.at(-1) as [bigint, bigint])[1];
  // and the next reservation comes after all of them.
  assert.equal(await reserveTimestamps(t.pool, 1, 0n), last + 1n);

  // When a session's reservation fails inside the function (it would pass the largest
  // bigint), or is refused for its arguments, and that session stays open,
  const max = 2n ** 63n - 1n;
  await t.pool.query("SELECT setval('ledger.timestamps', $1)", [(max - 1n).toString()]);
  const failing = await t.pool.connect();
  const other = await t.pool.connect();
  try {
    await assert.rejects(reserveTimestamps(failing, 5, 0n), /out of range/);
    await assert.rejects(reserveTimestamps(failing, 0, 0n), /count must be positive/);
    // then it holds no advisory lock, and another session reserves at once.
    const pid = (await failing.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid;
    const held = await other.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", [pid]);
    assert.equal(held.rows[0]?.n, 0);
    await t.pool.query("SELECT setval('ledger.timestamps', 10)");
    await other.query("SET lock_timeout = '200ms'");
    assert.equal(await reserveTimestamps(other, 1, 0n), 11n);
    await other.query('RESET lock_timeout');
  } finally {
    failing.release();
    other.release();
  }
});

test('writeBatchStatements: a resolution that finds its pending transfer already resolved raises, and nothing commits', async () => {
  // Given a pending transfer that a batch posted,
  const engine = new LedgerEngine({ pool: t.pool });
  const [a, b] = [newId(), newId()];
  await engine.createAccounts([a, b].map((id) => ({ id, ledger: 'USD', code: 1 })));
  const p = newId();
  await engine.createTransfers([{ id: p, debitAccountId: a, creditAccountId: b, amount: 5n, ledger: 'USD', code: 1, flags: { pending: true } }]);
  await engine.createTransfers([{ id: newId(), debitAccountId: a, creditAccountId: b, amount: 5n, ledger: 'USD', code: 1, pendingId: p, flags: { postPendingTransfer: true } }]);
  await engine.close();
  const client = await t.pool.connect();
  try {
    // when a write that believes it is still pending voids it (a decision made on stale rows),
    await client.query('BEGIN');
    const [stale] = await selectTransfers(client, [p]);
    assert.ok(stale !== undefined);
    const statements = writeBatchStatements({ accounts: [], inserts: [], resolvedPending: [{ ...stale, pendingStatus: 'voided', resolvedAt: 1n }] });
    // then the statement that resolves it raises before COMMIT can run,
    await assert.rejects(client.query([...statements, 'COMMIT'].join(';\n')), (e: unknown) => {
      assert.match(String(e), /invariant: batch write mismatch \(resolved pending transfers 0\/1\)/);
      assert.equal((e as { code?: string }).code, 'XX000');
      return true;
    });
    await client.query('ROLLBACK');
  } finally {
    client.release(true);
  }
  // and the transfer stays posted.
  const [after] = await selectTransfers(t.pool, [p]);
  assert.equal(after?.pendingStatus, 'posted');
});

test('writeBatchStatements: the statements carry their values and leave nothing in the session', async () => {
  // Given a batch that moves 7 from a to b,
  const engine = new LedgerEngine({ pool: t.pool });
  const [a, b] = [newId(), newId()];
  await engine.createAccounts([a, b].map((id) => ({ id, ledger: 'USD', code: 1 })));
  await engine.close();
  const client = await t.pool.connect();
  try {
    // (on a session as a transaction-pooling proxy may hand it out: reset, nothing prepared)
    await client.query('DISCARD ALL');
    const transfer = { id: newId(), debitAccountId: a, creditAccountId: b, amount: 7n, ledger: 'USD', code: 1 };
    const opened = await openBatch(client, { accountIds: [a, b].sort(), pendingIds: [], transferIds: [transfer.id], count: 1, nowNs: 0n });
    const state = { accounts: new Map(opened.accounts.map((x) => [x.id, x])), transfers: new Map(opened.transfers.map((x) => [x.id, x])) };
    const decision = decideBatch(state, [[transfer]], opened.firstTimestamp);
    assert.equal(decision.results[0]?.[0]?.result, 'ok');
    // when its statements are written out,
    const statements = writeBatchStatements({
      accounts: [...decision.changedAccounts].map((id) => state.accounts.get(id) as AccountRow),
      inserts: decision.inserts,
      resolvedPending: decision.resolvedPending,
    });
    // then they name no placeholder and no prepared statement: a connection that a
    // transaction-pooling proxy hands out for one transaction runs them as they are,
    for (const s of statements) assert.doesNotMatch(s, /\$\d|\bPREPARE\b|\bEXECUTE\b/);
    await client.query([...statements, 'COMMIT'].join(';\n'));
    // they did the write,
    const balances = await t.pool.query<{ id: string; dpo: string; cpo: string }>(
      'SELECT id::text, debits_posted::text AS dpo, credits_posted::text AS cpo FROM ledger.accounts WHERE id = ANY($1::uuid[])',
      [[a, b]],
    );
    assert.deepEqual(new Map(balances.rows.map((r) => [r.id, [r.dpo, r.cpo]])), new Map([[a, ['7', '0']], [b, ['0', '7']]]));
    // and the session holds nothing of them afterwards.
    const prepared = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_prepared_statements');
    assert.equal(prepared.rows[0]?.n, 0);
  } finally {
    client.release();
  }
});

/**
 * An account locked by a transaction outside the engine (an operator's open transaction, a
 * report locking rows): the calls that need it wait, and fail once their attempts are spent;
 * the calls batched with them that do not need it are applied, and a later call on their
 * accounts does not wait for the held ones. Until 2026-12-07 every call of such a batch failed
 * after `batchAttemptsMax` lock waits, and their accounts stayed busy all that time.
 *
 * The lock is a real row lock, taken on its own connection; the lock wait is shortened
 * (`lockTimeoutMs`) so that the test takes a second, not minutes.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { LedgerEngine, LedgerUnavailableError, newId, type NewTransfer } from '../src/index.ts';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from './support.ts';

const LOCK_TIMEOUT_MS = 200;
const ATTEMPTS = 3;

let t: LedgerTestDb;
before(async () => {
  t = await ledgerTestDb();
});
after(async () => {
  await t.close();
});

/** Holds a row lock on `accountId` on a connection of its own until `release()`. */
async function holdAccount(accountId: string): Promise<{ release: () => Promise<void> }> {
  const holder = new pg.Client({ connectionString: t.db.url });
  await holder.connect();
  await holder.query('BEGIN');
  const r = await holder.query('SELECT id FROM ledger.accounts WHERE id = $1 FOR UPDATE', [accountId]);
  assert.equal(r.rowCount, 1);
  return {
    release: async () => {
      await holder.query('ROLLBACK');
      await holder.end();
    },
  };
}

const transfer = (debitAccountId: string, creditAccountId: string, amount: bigint): NewTransfer => ({ id: newId(), debitAccountId, creditAccountId, amount, ledger: 'USD', code: 1 });

async function openAccounts(engine: LedgerEngine, n: number): Promise<string[]> {
  const ids = Array.from({ length: n }, () => newId());
  const r = await engine.createAccounts(ids.map((id) => ({ id, ledger: 'USD', code: 1 })));
  assert.ok(r.every((x) => x.result === 'ok'));
  return ids;
}

test('the calls that need a held account wait and fail; those batched with them that do not are applied, and their accounts free at once', async () => {
  // Two batch slots: the calls below form one batch (each shares an account with the one
  // before it, so the first batch takes them all), and the other slot is free for a later call.
  const engine = new LedgerEngine({ pool: t.pool, lockTimeoutMs: LOCK_TIMEOUT_MS, batchAttemptsMax: ATTEMPTS, batchesInFlightMax: 2, batchLingerMs: 20, events: t.events });
  try {
    const [a, b, c, d, e, f] = (await openAccounts(engine, 6)) as [string, string, string, string, string, string];
    const lock = await holdAccount(a);
    const settled: string[] = [];
    const track = <T>(name: string, p: Promise<T>): Promise<T> => {
      void p.then(
        () => settled.push(name),
        () => settled.push(name),
      );
      return p;
    };
    let released = false;
    try {
      const needsA = track('needs a', engine.createTransfers([transfer(a, b, 5n)]));
      // d -> b shares b with the call that waits, not the lock; then a chain through d and c.
      const free = [transfer(d, b, 13n), transfer(c, d, 7n), transfer(e, c, 11n)].map((x, i) => track(`free ${i}`, engine.createTransfers([x])));
      const batchesBefore = engine.stats().batches;
      const freeResults = await Promise.all(free);
      assert.deepEqual(freeResults.map((r) => r.map((x) => x.result)), [['ok'], ['ok'], ['ok']]);
      assert.deepEqual(settled.slice().sort(), ['free 0', 'free 1', 'free 2'], 'the free calls were answered while the held one still waits');
      assert.equal(engine.stats().batches - batchesBefore, 1, 'the free calls were one batch, split from the held one');
      // A later call on the free calls' accounts runs now, not after the held call's attempts.
      const later = await track('later', engine.createTransfers([transfer(c, f, 17n)]));
      assert.deepEqual(later.map((x) => x.result), ['ok']);
      assert.ok(!settled.includes('needs a'), 'the later call was answered before the held one');
      // The held call spends its attempts on the lock and fails as the database's weather.
      await assert.rejects(needsA, (error: unknown) => error instanceof LedgerUnavailableError && !error.outcomeUnknown);
      await lock.release();
      released = true;
    } finally {
      if (!released) await lock.release();
    }
    const balances = new Map((await t.pool.query<{ id: string; debits: string; credits: string }>(
      'SELECT id::text, debits_posted::text AS debits, credits_posted::text AS credits FROM ledger.accounts WHERE id = ANY($1::uuid[])',
      [[a, b, c, d, e, f]],
    )).rows.map((r) => [r.id, [BigInt(r.debits), BigInt(r.credits)]]));
    // d -> b 13, c -> d 7, e -> c 11, c -> f 17; nothing of a -> b 5.
    assert.deepEqual([a, b, c, d, e, f].map((id) => balances.get(id)), [
      [0n, 0n],
      [0n, 13n],
      [24n, 11n],
      [13n, 7n],
      [11n, 0n],
      [0n, 17n],
    ]);
    await assertInvariants(t.pool);
  } finally {
    await engine.close();
  }
});

test('a held call is applied once the lock is let go within its attempts', async () => {
  const engine = new LedgerEngine({ pool: t.pool, lockTimeoutMs: LOCK_TIMEOUT_MS, batchAttemptsMax: 8, batchesInFlightMax: 2, batchLingerMs: 20, events: t.events });
  try {
    const [a, b, c] = (await openAccounts(engine, 3)) as [string, string, string];
    const lock = await holdAccount(a);
    const needsA = engine.createTransfers([transfer(a, b, 3n)]);
    // Shares b with the held call, so the two are one batch.
    const free = engine.createTransfers([transfer(b, c, 4n)]);
    assert.deepEqual((await free).map((x) => x.result), ['ok']);
    await lock.release();
    assert.deepEqual((await needsA).map((x) => x.result), ['ok']);
    await assertInvariants(t.pool);
  } finally {
    await engine.close();
  }
});

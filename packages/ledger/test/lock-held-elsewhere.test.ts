/**
 * An account locked by a transaction outside the engine (an operator's open transaction, a
 * report locking rows): the calls that need it wait, and fail once their attempts are spent;
 * the calls batched with them that do not need it are applied, and a later call on their
 * accounts does not wait for the held ones. Until 2026-12-07 every call of such a batch failed
 * after `batchAttemptsMax` lock waits, and their accounts stayed busy all that time. Calls that
 * share an id keep their order through the split (a review's cases: the same transfer id, a
 * pending transfer and its post, a limited account), and a held call's pending transfer's
 * accounts stay busy while it retries.
 *
 * The lock is a real row lock, taken on its own connection; the lock wait is shortened
 * (`lockTimeoutMs`) so that the test takes a second, not minutes.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
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

const transfer = (debitAccountId: string, creditAccountId: string, amount: bigint, extra: Partial<NewTransfer> = {}): NewTransfer => ({ id: newId(), debitAccountId, creditAccountId, amount, ledger: 'USD', code: 1, ...extra });

async function openAccounts(engine: LedgerEngine, n: number, flags?: { debitsMustNotExceedCredits?: boolean }): Promise<string[]> {
  const ids = Array.from({ length: n }, () => newId());
  const r = await engine.createAccounts(ids.map((id) => ({ id, ledger: 'USD', code: 1, ...(flags === undefined ? {} : { flags }) })));
  assert.ok(r.every((x) => x.result === 'ok'));
  return ids;
}

/** One batch slot and a linger: calls made together are one batch. */
const oneBatchEngine = (attempts = 8): LedgerEngine =>
  new LedgerEngine({ pool: t.pool, lockTimeoutMs: LOCK_TIMEOUT_MS, batchAttemptsMax: attempts, batchesInFlightMax: 1, batchLingerMs: 20, events: t.events });

const results = (r: Array<{ result: string }>): string[] => r.map((x) => x.result);

test('the calls that need a held account wait and fail; those batched with them that do not are applied, and their accounts free at once', async () => {
  // Two batch slots and six calls: the first batch takes the first three (its share), the
  // second the other three; a later call then runs in whichever slot is free.
  const engine = new LedgerEngine({ pool: t.pool, lockTimeoutMs: LOCK_TIMEOUT_MS, batchAttemptsMax: ATTEMPTS, batchesInFlightMax: 2, batchLingerMs: 20, events: t.events });
  try {
    const [a, b, c, d, e, f, g, h, i, j] = (await openAccounts(engine, 10)) as [string, string, string, string, string, string, string, string, string, string];
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
      const batchesBefore = engine.stats().batches;
      const needsA = track('needs a', engine.createTransfers([transfer(a, b, 5n)]));
      const free = [transfer(c, d, 7n), transfer(e, f, 11n)].map((x, n) => track(`free ${n}`, engine.createTransfers([x])));
      const other = [transfer(g, h, 1n), transfer(i, j, 2n), transfer(h, j, 3n)].map((x) => engine.createTransfers([x]));
      assert.deepEqual((await Promise.all(free)).map(results), [['ok'], ['ok']]);
      assert.deepEqual((await Promise.all(other)).map(results), [['ok'], ['ok'], ['ok']]);
      assert.ok(!settled.includes('needs a'), 'the free calls were answered while the held one still waits');
      assert.equal(engine.stats().batches - batchesBefore, 2, 'the other batch, and the free calls split from the held one');
      // A later call on the free calls' accounts runs now, not after the held call's attempts.
      const later = await track('later', engine.createTransfers([transfer(c, f, 17n)]));
      assert.deepEqual(results(later), ['ok']);
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
    // c -> d 7, e -> f 11, c -> f 17; nothing of a -> b 5.
    assert.deepEqual([a, b, c, d, e, f].map((id) => balances.get(id)), [
      [0n, 0n],
      [0n, 0n],
      [24n, 0n],
      [0n, 7n],
      [11n, 0n],
      [0n, 28n],
    ]);
    await assertInvariants(t.pool);
  } finally {
    await engine.close();
  }
});

test('the lock wait is shorter than the statement timeout, or a lock wait would never be told apart', () => {
  assert.throws(() => new LedgerEngine({ pool: t.pool, lockTimeoutMs: 30_000 }), /lockTimeoutMs must be an integer from 1 to 29999/);
  assert.throws(() => new LedgerEngine({ pool: t.pool, lockTimeoutMs: 0 }), /lockTimeoutMs/);
  assert.throws(() => new LedgerEngine({ pool: t.pool, batchAttemptsMax: 0 }), /batchAttemptsMax must be a positive integer/);
});

test('a held call is applied once the lock is let go within its attempts', async () => {
  const engine = oneBatchEngine();
  try {
    const [a, b, c, d] = (await openAccounts(engine, 4)) as [string, string, string, string];
    const lock = await holdAccount(a);
    const needsA = engine.createTransfers([transfer(a, b, 3n)]);
    const free = engine.createTransfers([transfer(c, d, 4n)]);
    assert.deepEqual(results(await free), ['ok']);
    await lock.release();
    assert.deepEqual(results(await needsA), ['ok']);
    await assertInvariants(t.pool);
  } finally {
    await engine.close();
  }
});

describe('calls that share an id with a held call keep their order (each an earlier held call, then a later call that needs no held account)', () => {
  /** The two calls made together (one batch), the lock on `held` let go after 500 ms. */
  async function inOrder(engine: LedgerEngine, held: string, first: NewTransfer[], second: NewTransfer[]): Promise<[string[], string[]]> {
    const lock = await holdAccount(held);
    const one = engine.createTransfers(first);
    const two = engine.createTransfers(second);
    const timer = setTimeout(() => void lock.release().catch(() => {}), 500);
    try {
      return [results(await one), results(await two)];
    } finally {
      clearTimeout(timer);
      await lock.release().catch(() => {});
    }
  }

  test('the same transfer id: the earlier call is the one applied', async () => {
    const engine = oneBatchEngine();
    try {
      const [a, b, c, d] = (await openAccounts(engine, 4)) as [string, string, string, string];
      const x = newId();
      assert.deepEqual(await inOrder(engine, a, [transfer(a, b, 5n, { id: x })], [transfer(c, d, 5n, { id: x })]), [['ok'], ['exists_with_different_debit_account_id']]);
      const row = await t.pool.query<{ debit: string }>('SELECT debit_account_id::text AS debit FROM ledger.transfers WHERE id = $1', [x]);
      assert.equal(row.rows[0]?.debit, a);
      await assertInvariants(t.pool);
    } finally {
      await engine.close();
    }
  });

  test('a pending transfer and its post: the post sees the pending transfer', async () => {
    const engine = oneBatchEngine();
    try {
      const [a, b] = (await openAccounts(engine, 2)) as [string, string];
      const p = newId();
      assert.deepEqual(
        await inOrder(engine, a, [transfer(a, b, 5n, { id: p, flags: { pending: true } })], [{ id: newId(), pendingId: p, flags: { postPendingTransfer: true } }]),
        [['ok'], ['ok']],
      );
      await assertInvariants(t.pool);
    } finally {
      await engine.close();
    }
  });

  test('a pending transfer made earlier in the batch, voided by a held call: a later call on its limited account sees the void', async () => {
    const engine = oneBatchEngine();
    try {
      const [a, b, d, x, funder] = (await openAccounts(engine, 5)) as [string, string, string, string, string];
      const [c] = (await openAccounts(engine, 1, { debitsMustNotExceedCredits: true })) as [string];
      assert.deepEqual(results(await engine.createTransfers([transfer(funder, c, 5n)])), ['ok']);
      const p = newId();
      const lock = await holdAccount(a);
      // In queue order: the pending transfer (free: it needs no held account), the void (held:
      // its call also needs a), then a call that spends what the void gives back.
      const create = engine.createTransfers([transfer(c, d, 5n, { id: p, flags: { pending: true } })]);
      const voided = engine.createTransfers([transfer(a, b, 1n), { id: newId(), pendingId: p, flags: { voidPendingTransfer: true } }]);
      const spend = engine.createTransfers([transfer(c, x, 5n)]);
      const timer = setTimeout(() => void lock.release().catch(() => {}), 500);
      try {
        assert.deepEqual([results(await create), results(await voided), results(await spend)], [['ok'], ['ok', 'ok'], ['ok']]);
      } finally {
        clearTimeout(timer);
        await lock.release().catch(() => {});
      }
      await assertInvariants(t.pool);
    } finally {
      await engine.close();
    }
  });

  test('a limited account: the earlier call gets the funds', async () => {
    const engine = oneBatchEngine();
    try {
      const [a, c, funder] = (await openAccounts(engine, 3)) as [string, string, string];
      const [s] = (await openAccounts(engine, 1, { debitsMustNotExceedCredits: true })) as [string];
      assert.deepEqual(results(await engine.createTransfers([transfer(funder, s, 10n)])), ['ok']);
      assert.deepEqual(await inOrder(engine, a, [transfer(s, a, 10n)], [transfer(s, c, 10n)]), [['ok'], ['exceeds_credits']]);
      await assertInvariants(t.pool);
    } finally {
      await engine.close();
    }
  });
});

test('while a held post retries, the accounts of its pending transfer stay busy: a later call on one waits in the queue, not on the engine\'s own row lock', async () => {
  const engine = new LedgerEngine({ pool: t.pool, lockTimeoutMs: 1500, batchAttemptsMax: 3, batchesInFlightMax: 2, batchLingerMs: 20, events: t.events });
  try {
    // s sorts before h, so each attempt of the post locks s, then waits for h.
    const [s, h] = ((await openAccounts(engine, 2)) as [string, string]).sort();
    const [x, y, f1, f2] = (await openAccounts(engine, 4)) as [string, string, string, string];
    const p = newId();
    assert.deepEqual(results(await engine.createTransfers([transfer(s, h, 5n, { id: p, flags: { pending: true } })])), ['ok']);
    const lock = await holdAccount(h);
    try {
      // Four calls, two slots: the first batch takes a call on s and the post (whose ids are
      // itself and p, not s or h), the second the other two.
      const onS = engine.createTransfers([transfer(s, x, 1n)]);
      const post = engine.createTransfers([{ id: newId(), pendingId: p, flags: { postPendingTransfer: true } }]);
      post.catch(() => {});
      const others = [engine.createTransfers([transfer(f1, f2, 1n)]), engine.createTransfers([transfer(f2, f1, 1n)])];
      assert.deepEqual(results(await onS), ['ok']);
      await Promise.all(others);
      // The post's retry now holds s while it waits for h. A call on s must not start beside it.
      await new Promise((resolve) => setTimeout(resolve, 200));
      const later = engine.createTransfers([transfer(s, y, 1n)]);
      let laterDone = false;
      void later.then(() => (laterDone = true), () => (laterDone = true));
      await new Promise((resolve) => setTimeout(resolve, 400));
      const waiting = await t.pool.query<{ n: number }>(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
      );
      assert.equal(waiting.rows[0]?.n, 1, 'only the post waits on a row lock (for h), not a batch of this engine on s');
      assert.equal(laterDone, false, 'the later call on s waits in the queue for the post');
      await lock.release();
      assert.deepEqual(results(await post), ['ok']);
      assert.deepEqual(results(await later), ['ok']);
    } finally {
      await lock.release().catch(() => {});
    }
    await assertInvariants(t.pool);
  } finally {
    await engine.close();
  }
});

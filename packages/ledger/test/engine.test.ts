/**
 * Scenario tests of the engine on real PostgreSQL, written Given / When / Then.
 */
import assert from 'node:assert/strict';
import { after, afterEach, before, beforeEach, describe, test } from 'node:test';
import pg from 'pg';
import { inTransaction, StreamOrderConflictError } from '@ledgerline/events';
import { ManualClock } from '@ledgerline/testing';
import {
  AMOUNT_MAX,
  ID_INT_MAX,
  ID_ZERO,
  LedgerClosedError,
  LedgerEngine,
  LedgerInputError,
  LedgerOverloadedError,
  LedgerUnavailableError,
  newId,
  TRANSFER_STREAM,
  TransferFlag,
  type NewTransfer,
} from '../src/index.ts';
import { transferEvent } from '../src/events.ts';
import { reserveTimestamps } from '../src/store.ts';
import { assertInvariants, ledgerTestDb, resetLedger, type LedgerTestDb } from './support.ts';

let t: LedgerTestDb;
let clock: ManualClock;
let engine: LedgerEngine;

before(async () => {
  t = await ledgerTestDb();
});
after(async () => {
  await t.close();
});
beforeEach(async () => {
  await resetLedger(t.pool);
  clock = new ManualClock();
  engine = new LedgerEngine({ pool: t.pool, clock: clock.now, events: t.events });
});
afterEach(async () => {
  await engine.close();
  await assertInvariants(t.pool, { events: true });
});

async function accounts(...flags: Array<'debits' | 'credits' | undefined>): Promise<string[]> {
  const list = flags.map((f) => ({
    id: newId(),
    ledger: 'USD',
    code: 10,
    flags: f === 'debits' ? { debitsMustNotExceedCredits: true } : f === 'credits' ? { creditsMustNotExceedDebits: true } : {},
  }));
  const results = await engine.createAccounts(list);
  assert.deepEqual(results.map((r) => r.result), list.map(() => 'ok'));
  return list.map((a) => a.id);
}

function transfer(debit: string, credit: string, amount: bigint, extra: Partial<NewTransfer> = {}): NewTransfer {
  return { id: newId(), debitAccountId: debit, creditAccountId: credit, amount, ledger: 'USD', code: 1, ...extra };
}

async function results(list: NewTransfer[]): Promise<string[]> {
  return (await engine.createTransfers(list)).map((r) => r.result);
}

/**
 * Runs `fn` with a row trigger on ledger.transfers whose plpgsql body is `body`: `when` is the
 * trigger's timing and event, `deferred` makes it a constraint trigger that runs at COMMIT.
 * The trigger and its function are dropped afterwards, whatever `fn` does.
 */
async function withTransfersTrigger(name: string, when: 'BEFORE INSERT' | 'BEFORE UPDATE' | 'AFTER INSERT', body: string, fn: () => Promise<void>, deferred = false): Promise<void> {
  await t.pool.query(`CREATE FUNCTION ledger.${name}() RETURNS trigger LANGUAGE plpgsql AS $$ ${body} $$`);
  await t.pool.query(
    `CREATE ${deferred ? 'CONSTRAINT ' : ''}TRIGGER ${name} ${when} ON ledger.transfers ${deferred ? 'DEFERRABLE INITIALLY DEFERRED ' : ''}FOR EACH ROW EXECUTE FUNCTION ledger.${name}()`,
  );
  try {
    await fn();
  } finally {
    await t.pool.query(`DROP TRIGGER ${name} ON ledger.transfers; DROP FUNCTION ledger.${name}()`);
  }
}

/** The pid of a backend of this database sleeping in pg_sleep (held by a test's trigger), once there is one; `queryLike` narrows it by its query. */
async function sleepingBackend(queryLike = '%'): Promise<number> {
  for (;;) {
    const r = await t.pool.query<{ pid: number }>(
      "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep' AND query LIKE $1",
      [queryLike],
    );
    const pid = r.rows[0]?.pid;
    if (pid !== undefined) return pid;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * Cancels (pg_cancel_backend) each statement of the test database that sleeps in pg_sleep,
 * until `call` settles; returns how many it cancelled. Polls; ends with the call, whatever it does.
 */
async function cancelSleepersUntil(call: Promise<unknown>): Promise<number> {
  let settled = false;
  void call.then(() => (settled = true), () => (settled = true));
  // A cancelled backend may still show as sleeping for a moment: count each one once (an
  // attempt that fails discards its connection, so the next attempt has another backend).
  const cancelled = new Set<number>();
  while (!settled) {
    const r = await t.pool.query<{ pid: number; cancelled: boolean }>(
      "SELECT pid, pg_cancel_backend(pid) AS cancelled FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'",
    );
    for (const row of r.rows) if (row.cancelled) cancelled.add(row.pid);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return cancelled.size;
}

/** Nine one-transfer calls from a to b, coalesced into batches; the fifth carries `metadata`. */
function nineCallsFifthMarked(a: string, b: string, metadata: Record<string, string>): Promise<PromiseSettledResult<unknown>[]> {
  return Promise.allSettled(Array.from({ length: 9 }, (_, i) => engine.createTransfers([transfer(a, b, 1n, i === 4 ? { metadata } : {})])));
}

/** Returns once a backend of the test database waits for a lock (polls; asserts nothing). */
async function waitUntilBlockedOnLock(): Promise<void> {
  for (;;) {
    const r = await t.pool.query<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    );
    if ((r.rows[0]?.n ?? 0) > 0) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

async function balances(id: string): Promise<[bigint, bigint, bigint, bigint]> {
  const a = await engine.getAccount(id);
  assert.ok(a !== null);
  return [a.debitsPending, a.debitsPosted, a.creditsPending, a.creditsPosted];
}

describe('accounts', () => {
  test('create, retry, and conflicting reuse of an id', async () => {
    const id = newId();
    const a = { id, ledger: 'USD', code: 7, metadata: { owner: 'alice' } };
    const [first] = await engine.createAccounts([a]);
    assert.equal(first?.result, 'ok');
    const again = await engine.createAccounts([
      a,
      { ...a, ledger: 'EUR' },
      { ...a, code: 8 },
      { ...a, metadata: { owner: 'bob' } },
      { ...a, flags: { debitsMustNotExceedCredits: true } },
    ]);
    assert.deepEqual(again.map((r) => r.result), [
      'exists',
      'exists_with_different_ledger',
      'exists_with_different_code',
      'exists_with_different_metadata',
      'exists_with_different_flags',
    ]);
    assert.equal(again[0]?.timestamp, first?.timestamp, 'a retry reports the original timestamp');
  });

  test('rejections: zero id, int-max id, both limits, unknown ledger, empty ledger, zero code, bad metadata, duplicate in one call', async () => {
    const id = newId();
    const r = await engine.createAccounts([
      { id: ID_ZERO, ledger: 'USD', code: 1 },
      { id: ID_INT_MAX, ledger: 'USD', code: 1 },
      { id: newId(), ledger: 'USD', code: 1, flags: { debitsMustNotExceedCredits: true, creditsMustNotExceedDebits: true } },
      { id: newId(), ledger: 'XXX', code: 1 },
      { id: newId(), ledger: '', code: 1 },
      { id: newId(), ledger: 'USD', code: 0 },
      { id: newId(), ledger: 'USD', code: 1, metadata: { ['k'.repeat(65)]: 'v' } },
      { id, ledger: 'USD', code: 1 },
      { id, ledger: 'USD', code: 1 },
    ]);
    assert.deepEqual(r.map((x) => x.result), [
      'id_must_not_be_zero',
      'id_must_not_be_int_max',
      'flags_are_mutually_exclusive',
      'ledger_not_found',
      'ledger_must_not_be_empty',
      'code_must_not_be_zero',
      'metadata_invalid',
      'ok',
      'exists',
    ]);
    assert.equal((await engine.getAccounts([id])).length, 1);
  });

  test('malformed input is a LedgerInputError and writes nothing', async () => {
    await assert.rejects(engine.createAccounts([{ id: 'not-a-uuid', ledger: 'USD', code: 1 }]), LedgerInputError);
    await assert.rejects(engine.createAccounts([{ id: newId(), ledger: 'usd', code: 1 }]), LedgerInputError);
    await assert.rejects(engine.createAccounts([{ id: newId(), ledger: 'USD', code: 70000 }]), LedgerInputError);
    await assert.rejects(engine.createAccounts('x' as never), LedgerInputError);
    await assert.rejects(engine.createAccounts([{ id: newId(), ledger: 'USD', code: 1, flags: null as never }]), LedgerInputError);
    assert.deepEqual(await engine.createAccounts([]), []);
    const { rows } = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM ledger.accounts');
    assert.equal(rows[0]?.n, 0);
  });

  test('ledgers are listed with their scale', async () => {
    const ledgers = await engine.listLedgers();
    assert.deepEqual(ledgers.find((l) => l.code === 'JPY'), { code: 'JPY', scale: 0, description: 'Yen' });
    assert.equal(ledgers.find((l) => l.code === 'KWD')?.scale, 3);
  });
});

describe('transfers', () => {
  test('a transfer moves money once; a retry reports exists with the original timestamp', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const tr = transfer(a, b, 250n, { metadata: { invoice: 'INV-1' } });
    const [first] = await engine.createTransfers([tr]);
    const [again] = await engine.createTransfers([tr]);
    assert.equal(first?.result, 'ok');
    assert.deepEqual(again, { id: tr.id, result: 'exists', timestamp: first?.timestamp, amount: 250n });
    assert.deepEqual(await balances(a), [0n, 250n, 0n, 0n]);
    assert.deepEqual(await balances(b), [0n, 0n, 0n, 250n]);
    const stored = await engine.getTransfer(tr.id);
    assert.equal(stored?.result, 'ok');
    assert.deepEqual(stored?.metadata, { invoice: 'INV-1' });
    assert.equal(await engine.getTransfer(newId()), null);
  });

  test('the same id with different fields says which field differs', async () => {
    const [a, b, c] = (await accounts(undefined, undefined, undefined)) as [string, string, string];
    const tr = transfer(a, b, 10n);
    await engine.createTransfers([tr]);
    assert.deepEqual(
      await results([
        { ...tr, amount: 11n },
        { ...tr, debitAccountId: c },
        { ...tr, creditAccountId: c },
        { ...tr, code: 2 },
        { ...tr, ledger: 'EUR' },
        { ...tr, flags: { pending: true } },
        { ...tr, metadata: { x: 'y' } },
      ]),
      [
        'exists_with_different_amount',
        'exists_with_different_debit_account_id',
        'exists_with_different_credit_account_id',
        'exists_with_different_code',
        'exists_with_different_ledger',
        'exists_with_different_flags',
        'exists_with_different_metadata',
      ],
    );
  });

  test('an id that failed stays failed, even once the failure no longer applies', async () => {
    const [funded, source, sink] = (await accounts('debits', undefined, undefined)) as [string, string, string];
    const tr = transfer(funded, sink, 100n);
    assert.deepEqual(await results([tr]), ['exceeds_credits']);
    assert.deepEqual(await results([transfer(source, funded, 1000n)]), ['ok']);
    assert.deepEqual(await results([tr]), ['exceeds_credits']);
    assert.deepEqual(await results([{ ...tr, amount: 5n }]), ['exists_with_different_amount']);
    assert.equal((await engine.getTransfer(tr.id))?.result, 'exceeds_credits');
    assert.deepEqual(await balances(funded), [0n, 0n, 0n, 1000n]);
  });

  test('input validation, in order of precedence', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const id = newId();
    assert.deepEqual(
      await results([
        transfer(a, b, 1n, { id: ID_ZERO }),
        transfer(a, b, 1n, { id: ID_INT_MAX }),
        transfer(a, b, 1n, { flags: { pending: true, postPendingTransfer: true } }),
        transfer(a, b, 1n, { flags: { postPendingTransfer: true, balancingDebit: true }, pendingId: newId() }),
        transfer(a, b, 1n, { pendingId: newId() }),
        { id: newId(), flags: { postPendingTransfer: true } },
        { id: newId(), flags: { voidPendingTransfer: true }, pendingId: ID_INT_MAX },
        { id, flags: { voidPendingTransfer: true }, pendingId: id },
        transfer(a, b, 1n, { timeoutSeconds: 5 }),
        transfer(a, b, 1n, { flags: { closingDebit: true } }),
        transfer(ID_ZERO, b, 1n),
        transfer(ID_INT_MAX, b, 1n),
        transfer(a, ID_ZERO, 1n),
        transfer(a, ID_INT_MAX, 1n),
        transfer(a, a, 1n),
        transfer(a, b, 0n),
        transfer(a, b, 1n, { ledger: '' }),
        transfer(a, b, 1n, { code: 0 }),
        transfer(a, b, 1n, { metadata: { k: 'v'.repeat(257) } }),
        transfer(a, b, 1n, { metadata: { k: 'nul\u0000' } }),
        transfer(a, b, 1n, { metadata: { k: '\ud800' } }),
        { id: newId(), pendingId: newId(), flags: { postPendingTransfer: true }, debitAccountId: ID_ZERO },
        { id: newId(), pendingId: newId(), flags: { postPendingTransfer: true }, creditAccountId: ID_ZERO },
        { id: newId(), pendingId: newId(), flags: { postPendingTransfer: true }, amount: 0n },
        { id: newId(), pendingId: newId(), flags: { postPendingTransfer: true }, code: 0 },
      ]),
      [
        'id_must_not_be_zero',
        'id_must_not_be_int_max',
        'flags_are_mutually_exclusive',
        'flags_are_mutually_exclusive',
        'pending_id_must_be_zero',
        'pending_id_must_not_be_zero',
        'pending_id_must_not_be_int_max',
        'pending_id_must_be_different',
        'timeout_reserved_for_pending_transfer',
        'closing_transfer_must_be_pending',
        'debit_account_id_must_not_be_zero',
        'debit_account_id_must_not_be_int_max',
        'credit_account_id_must_not_be_zero',
        'credit_account_id_must_not_be_int_max',
        'accounts_must_be_different',
        'amount_must_not_be_zero',
        'ledger_must_not_be_empty',
        'code_must_not_be_zero',
        'metadata_invalid',
        'metadata_invalid',
        'metadata_invalid',
        'debit_account_id_must_not_be_zero',
        'credit_account_id_must_not_be_zero',
        'amount_must_not_be_zero',
        'code_must_not_be_zero',
      ],
    );
    const { rows } = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM ledger.transfers');
    assert.equal(rows[0]?.n, 0, 'input errors are never recorded');
  });

  test('state rejections: not found, ledger mismatch, closed, overflow, timeout overflow', async () => {
    const [a, b, c, d] = (await accounts(undefined, undefined, undefined, undefined)) as [string, string, string, string];
    const eur = newId();
    await engine.createAccounts([{ id: eur, ledger: 'EUR', code: 1 }]);
    assert.deepEqual(
      await results([
        transfer(newId(), b, 1n),
        transfer(a, newId(), 1n),
        transfer(a, eur, 1n),
        transfer(a, b, 1n, { ledger: 'EUR' }),
        transfer(a, b, AMOUNT_MAX),
        transfer(a, b, 1n),
        transfer(b, a, AMOUNT_MAX, { flags: { pending: true } }),
        transfer(b, a, 1n, { flags: { pending: true } }),
        transfer(b, a, 1n),
        transfer(c, d, 1n, { flags: { pending: true }, timeoutSeconds: 2 ** 31 - 1 }),
      ]),
      [
        'debit_account_not_found',
        'credit_account_not_found',
        'ledger_mismatch',
        'ledger_mismatch',
        'ok',
        'overflows_debits_posted',
        'ok',
        'overflows_debits_pending',
        'overflows_debits',
        'ok',
      ],
    );
    // The ledger's clock is far from overflow in practice; near the end of time it refuses.
    await t.pool.query("SELECT setval('ledger.timestamps', $1)", [(AMOUNT_MAX - 10n ** 9n).toString()]);
    assert.deepEqual(await results([transfer(c, d, 1n, { flags: { pending: true }, timeoutSeconds: 5 })]), ['overflows_timeout']);
  });

  test('credits overflow on the credit side, and both limit flags', async () => {
    const [a, b, limitedDebit, limitedCredit] = (await accounts(undefined, undefined, 'debits', 'credits')) as [string, string, string, string];
    assert.deepEqual(
      await results([
        transfer(a, b, AMOUNT_MAX),
        transfer(newId(), b, 1n),
        transfer(b, a, AMOUNT_MAX, { flags: { pending: true } }),
        transfer(limitedDebit, limitedCredit, 1n),
        transfer(limitedDebit, limitedCredit, 1n, { flags: { pending: true } }),
        transfer(limitedCredit, limitedDebit, 5n),
        transfer(limitedDebit, limitedCredit, 5n),
        transfer(limitedDebit, limitedCredit, 1n),
      ]),
      ['ok', 'debit_account_not_found', 'ok', 'exceeds_credits', 'exceeds_credits', 'ok', 'ok', 'exceeds_credits'],
    );
    assert.deepEqual(await results([transfer(a, b, 1n)]), ['overflows_debits_posted']);
    const [x] = (await accounts(undefined)) as [string];
    assert.deepEqual(await results([transfer(x, b, 1n)]), ['overflows_credits_posted']);
    assert.deepEqual(await results([transfer(x, a, 1n, { flags: { pending: true } })]), ['overflows_credits_pending']);
    assert.deepEqual(await results([transfer(x, a, 1n)]), ['overflows_credits']);
  });

  test('balancing transfers move at most what is available', async () => {
    const [bank, wallet, merchant] = (await accounts(undefined, 'debits', 'credits')) as [string, string, string];
    await results([transfer(bank, wallet, 70n), transfer(merchant, bank, 40n)]);
    const [drain] = await engine.createTransfers([transfer(wallet, bank, 100n, { flags: { balancingDebit: true } })]);
    assert.equal(drain?.result, 'ok');
    assert.equal(drain?.amount, 70n);
    assert.deepEqual(await results([transfer(wallet, bank, 1n, { flags: { balancingDebit: true } })]), ['exceeds_credits']);
    const [fill] = await engine.createTransfers([transfer(bank, merchant, 100n, { flags: { balancingCredit: true } })]);
    assert.equal(fill?.amount, 40n);
    assert.deepEqual(await results([transfer(bank, merchant, 1n, { flags: { balancingCredit: true } })]), ['exceeds_debits']);
    assert.equal((await engine.getTransfer(drain?.id ?? ''))?.amount, 70n);
  });
});

describe('linked chains', () => {
  test('all or nothing: a failing member fails the chain, the rest report linked_event_failed', async () => {
    const [a, b, limited] = (await accounts(undefined, undefined, 'debits')) as [string, string, string];
    const chain = [
      transfer(a, b, 10n, { flags: { linked: true } }),
      transfer(a, limited, 5n, { flags: { linked: true } }),
      transfer(limited, b, 6n),
    ];
    assert.deepEqual(await results([...chain, transfer(a, b, 1n)]), [
      'linked_event_failed',
      'linked_event_failed',
      'exceeds_credits',
      'ok',
    ]);
    assert.deepEqual(await balances(a), [0n, 1n, 0n, 0n]);
    assert.deepEqual(await balances(limited), [0n, 0n, 0n, 0n]);
    // The failing member's id is burned; the others were never recorded and can be reused.
    assert.equal(await engine.getTransfer(chain[0]!.id), null);
    const fixed = [chain[0]!, chain[1]!, { ...chain[2]!, id: newId(), amount: 5n }];
    assert.deepEqual(await results(fixed), ['ok', 'ok', 'ok']);
    assert.deepEqual(await results(fixed), ['exists', 'exists', 'exists']);
    assert.deepEqual(await balances(limited), [0n, 5n, 0n, 5n]);
  });

  test('a chain left open at the end of a call applies nothing', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    assert.deepEqual(
      await results([transfer(a, b, 1n), transfer(a, b, 2n, { flags: { linked: true } }), transfer(a, b, 3n, { flags: { linked: true } })]),
      ['ok', 'linked_event_failed', 'linked_event_chain_open'],
    );
    assert.deepEqual(await balances(a), [0n, 1n, 0n, 0n]);
  });

  test('chains never cross call boundaries when calls are coalesced into one batch', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const [open, closed] = await Promise.all([
      engine.createTransfers([transfer(a, b, 1n, { flags: { linked: true } })]),
      engine.createTransfers([transfer(a, b, 2n)]),
    ]);
    assert.deepEqual(open?.map((r) => r.result), ['linked_event_chain_open']);
    assert.deepEqual(closed?.map((r) => r.result), ['ok']);
  });

  test('a chain that creates a pending transfer and posts it', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const p = transfer(a, b, 9n, { flags: { pending: true, linked: true } });
    assert.deepEqual(await results([p, { id: newId(), pendingId: p.id, flags: { postPendingTransfer: true } }]), ['ok', 'ok']);
    assert.equal((await engine.getTransfer(p.id))?.pendingStatus, 'posted');
    assert.deepEqual(await balances(a), [0n, 9n, 0n, 0n]);
  });

  test('a member that exists already counts as applied: a chain sent again moves nothing, a new chain naming it applies its other members', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const x = transfer(a, b, 3n, { flags: { linked: true } });
    const y = transfer(a, b, 4n);
    assert.deepEqual(await results([x, y]), ['ok', 'ok']);
    assert.deepEqual(await results([x, y]), ['exists', 'exists']);
    assert.deepEqual(await balances(a), [0n, 7n, 0n, 0n]);
    const z = transfer(a, b, 5n);
    assert.deepEqual(await results([x, z]), ['exists', 'ok']);
    assert.deepEqual(await balances(a), [0n, 12n, 0n, 0n]);
  });

  test('a member that reuses the id of an earlier member of its failed chain reports no timestamp: that member was never stored', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const stored = transfer(a, b, 1n);
    const [original] = await engine.createTransfers([stored]);
    // Given a chain whose second member reuses the first one's id with other fields,
    const first = transfer(a, b, 5n, { flags: { linked: true } });
    const [r1, r2] = await engine.createTransfers([first, { ...first, amount: 6n, flags: {} }]);
    // then the chain fails on it, and neither reports a timestamp: the first was rolled back.
    assert.deepEqual([r1?.result, r1?.timestamp], ['linked_event_failed', null]);
    assert.deepEqual([r2?.result, r2?.timestamp], ['exists_with_different_flags', null]);
    assert.equal(await engine.getTransfer(first.id), null);
    // A clash with a transfer that is stored, before the batch or earlier in it outside the
    // chain, still reports the stored transfer's timestamp.
    const before = transfer(a, b, 2n);
    const out = await engine.createTransfers([
      before,
      transfer(a, b, 3n, { flags: { linked: true } }),
      { ...stored, amount: 9n },
      transfer(a, b, 4n, { flags: { linked: true } }),
      { ...before, amount: 8n },
    ]);
    assert.deepEqual(out.map((r) => r.result), ['ok', 'linked_event_failed', 'exists_with_different_amount', 'linked_event_failed', 'exists_with_different_amount']);
    assert.equal(out[2]?.timestamp, original?.timestamp);
    assert.equal(out[4]?.timestamp, out[0]?.timestamp);
    assert.notEqual(out[0]?.timestamp, null);
    assert.deepEqual(await balances(a), [0n, 1n + 2n, 0n, 0n]);
  });
});

describe('two-phase transfers', () => {
  test('pending reserves, a partial post settles part and releases the rest', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const p = transfer(a, b, 100n, { flags: { pending: true } });
    await results([p]);
    assert.deepEqual(await balances(a), [100n, 0n, 0n, 0n]);
    const post = { id: newId(), pendingId: p.id, amount: 60n, flags: { postPendingTransfer: true } };
    assert.deepEqual(await results([post]), ['ok']);
    assert.deepEqual(await balances(a), [0n, 60n, 0n, 0n]);
    assert.deepEqual(await balances(b), [0n, 0n, 0n, 60n]);
    const stored = await engine.getTransfer(p.id);
    assert.equal(stored?.pendingStatus, 'posted');
    assert.equal((await engine.getTransfer(post.id))?.amount, 60n);
    assert.deepEqual(
      await results([
        { id: newId(), pendingId: p.id, flags: { postPendingTransfer: true } },
        { id: newId(), pendingId: p.id, flags: { voidPendingTransfer: true } },
        post,
      ]),
      ['pending_transfer_already_posted', 'pending_transfer_already_posted', 'exists'],
    );
  });

  test('post and void checks, in order', async () => {
    const [a, b, c] = (await accounts(undefined, undefined, undefined)) as [string, string, string];
    const plain = transfer(a, b, 5n);
    const p = transfer(a, b, 50n, { flags: { pending: true }, code: 3 });
    await results([plain, p]);
    const pv = (extra: Partial<NewTransfer>): NewTransfer => ({ id: newId(), pendingId: p.id, flags: { postPendingTransfer: true }, ...extra });
    assert.deepEqual(
      await results([
        pv({ pendingId: newId() }),
        pv({ pendingId: plain.id }),
        pv({ debitAccountId: c }),
        pv({ creditAccountId: c }),
        pv({ ledger: 'EUR' }),
        pv({ code: 4 }),
        pv({ amount: 51n }),
        { id: newId(), pendingId: p.id, flags: { voidPendingTransfer: true }, amount: 49n },
        { id: newId(), pendingId: p.id, flags: { voidPendingTransfer: true }, amount: 50n, debitAccountId: a, creditAccountId: b, ledger: 'USD', code: 3 },
        pv({}),
      ]),
      [
        'pending_transfer_not_found',
        'pending_transfer_not_pending',
        'pending_transfer_has_different_debit_account_id',
        'pending_transfer_has_different_credit_account_id',
        'pending_transfer_has_different_ledger',
        'pending_transfer_has_different_code',
        'exceeds_pending_transfer_amount',
        'pending_transfer_has_different_amount',
        'ok',
        'pending_transfer_already_voided',
      ],
    );
    assert.deepEqual(await balances(a), [0n, 5n, 0n, 0n]);
  });

  test('the sweep takes every due pending transfer, transaction after bounded transaction', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const holds = Array.from({ length: 7 }, () => transfer(a, b, 10n, { flags: { pending: true }, timeoutSeconds: 10 }));
    await results(holds);
    clock.advanceSeconds(11);
    const sweeping = new LedgerEngine({ pool: t.pool, clock: clock.now, expiryBatchMax: 3, events: t.events });
    try {
      // One call: these seven (and any other test's holds now due) in transactions of three.
      assert.ok((await sweeping.expireAllDuePendingTransfers()) >= 7);
      assert.equal(await sweeping.expireAllDuePendingTransfers(), 0, 'nothing due is left');
    } finally {
      await sweeping.close();
    }
    for (const h of holds) assert.equal((await engine.getTransfer(h.id))?.pendingStatus, 'expired');
    assert.deepEqual(await balances(a), [0n, 0n, 0n, 0n], 'every reservation released');
  });

  test('a pending transfer expires after its timeout: the sweep releases it and posts fail', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const p1 = transfer(a, b, 30n, { flags: { pending: true }, timeoutSeconds: 10 });
    const p2 = transfer(a, b, 40n, { flags: { pending: true }, timeoutSeconds: 10 });
    const forever = transfer(a, b, 1n, { flags: { pending: true } });
    await results([p1, p2, forever]);
    clock.advanceSeconds(9);
    assert.equal(await engine.expirePendingTransfers(), 0);
    clock.advanceSeconds(2);
    // p1 is posted after its deadline but before any sweep: it fails and is released at once.
    assert.deepEqual(await results([{ id: newId(), pendingId: p1.id, flags: { postPendingTransfer: true } }]), ['pending_transfer_expired']);
    assert.equal((await engine.getTransfer(p1.id))?.pendingStatus, 'expired');
    assert.equal(await engine.expirePendingTransfers(), 1);
    assert.equal((await engine.getTransfer(p2.id))?.pendingStatus, 'expired');
    assert.deepEqual(await balances(a), [1n, 0n, 0n, 0n]);
    assert.deepEqual(await results([{ id: newId(), pendingId: p2.id, flags: { voidPendingTransfer: true } }]), ['pending_transfer_expired']);
  });

  test('an expiry whose stream a newer transaction continued meanwhile: refused in the commit round trip, nothing applied', async () => {
    // Given a pending transfer p past its timeout, and a trigger that holds the sweep while it
    // marks p expired (after the sweep's transaction has its id, before its events' append),
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const p = transfer(a, b, 30n, { flags: { pending: true }, timeoutSeconds: 1, metadata: { hold: 'yes' } });
    assert.deepEqual(await results([p]), ['ok']);
    clock.advanceSeconds(2);
    const intruder = newId();
    const hold = "BEGIN IF NEW.metadata ? 'hold' THEN PERFORM pg_sleep(0.5); END IF; RETURN NEW; END";
    try {
      await withTransfersTrigger('hold', 'BEFORE UPDATE', hold, async () => {
        // when a newer transaction appends version 2 to p's stream and commits while it is held,
        const sweep = engine.expirePendingTransfers().catch((e: unknown) => e);
        await sleepingBackend();
        await inTransaction(t.pool, (c) =>
          t.events.appendMany(c, [{ streamType: TRANSFER_STREAM, streamId: p.id, version: 2, event: { id: intruder, type: 'Intruder', data: {} } }]),
        );
        // then the sweep's append is refused by its stream-order check, as the typed, retryable
        // error (the statement carried the check: no round trip of its own), and p stays pending.
        const error = await sweep;
        assert.ok(error instanceof StreamOrderConflictError, String(error));
        assert.deepEqual([error.streamType, error.streamId, error.actual], [TRANSFER_STREAM, p.id, 2]);
        assert.equal((await engine.getTransfer(p.id))?.pendingStatus, 'pending');
      });
    } finally {
      await t.pool.query('DELETE FROM events.events WHERE event_id = $1', [intruder]);
    }
    // Once the stream is as the ledger left it, the next sweep expires p.
    assert.equal(await engine.expirePendingTransfers(), 1);
    assert.equal((await engine.getTransfer(p.id))?.pendingStatus, 'expired');
  });

  test('the background sweep runs on its own interval', async () => {
    const sweeping = new LedgerEngine({ pool: t.pool, clock: clock.now, expiryIntervalMs: 20, events: t.events });
    try {
      const [a, b] = (await accounts(undefined, undefined)) as [string, string];
      const p = transfer(a, b, 30n, { flags: { pending: true }, timeoutSeconds: 1 });
      await sweeping.createTransfers([p]);
      clock.advanceSeconds(2);
      const deadline = Date.now() + 5000;
      while ((await engine.getTransfer(p.id))?.pendingStatus !== 'expired') {
        assert.ok(Date.now() < deadline, 'the sweep did not expire the transfer within 5 s');
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.deepEqual(await balances(a), [0n, 0n, 0n, 0n]);
    } finally {
      await sweeping.close();
    }
  });

  test('closing transfers close an account; voiding or expiry reopens it', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const close = transfer(a, b, 1n, { flags: { pending: true, closingDebit: true } });
    await results([close]);
    assert.equal((await engine.getAccount(a))?.flags.closed, true);
    assert.deepEqual(await results([transfer(a, b, 1n), transfer(b, a, 1n)]), ['debit_account_already_closed', 'credit_account_already_closed']);
    await results([{ id: newId(), pendingId: close.id, flags: { voidPendingTransfer: true } }]);
    assert.equal((await engine.getAccount(a))?.flags.closed, undefined);
    const closeCredit = transfer(a, b, 1n, { flags: { pending: true, closingCredit: true }, timeoutSeconds: 1 });
    await results([closeCredit]);
    assert.equal((await engine.getAccount(b))?.flags.closed, true);
    assert.deepEqual(
      (await engine.createAccounts([{ id: b, ledger: 'USD', code: 10 }])).map((r) => r.result),
      ['exists'],
      'closed is state, not part of the account request',
    );
    clock.advanceSeconds(2);
    assert.equal(await engine.expirePendingTransfers(), 1);
    assert.equal((await engine.getAccount(b))?.flags.closed, undefined);
  });

  test('a closed account takes no post, only voids: the closing transfer itself is never posted', async () => {
    const [x, y, z, w] = (await accounts(undefined, undefined, undefined, undefined)) as [string, string, string, string];
    // Given pending transfers out of x and into x, one that expires, and then a closing
    // transfer that closes x,
    const out = transfer(x, y, 40n, { flags: { pending: true } });
    const into = transfer(w, x, 10n, { flags: { pending: true } });
    const expiring = transfer(x, y, 7n, { flags: { pending: true }, timeoutSeconds: 1 });
    const closing = transfer(x, z, 1n, { flags: { pending: true, closingDebit: true } });
    assert.deepEqual(await results([out, into, expiring, closing]), ['ok', 'ok', 'ok', 'ok']);
    clock.advanceSeconds(2);
    const post = (p: NewTransfer, extra: Partial<NewTransfer> = {}): NewTransfer => ({ id: newId(), pendingId: p.id, flags: { postPendingTransfer: true }, ...extra });
    const voids = (p: NewTransfer): NewTransfer => ({ id: newId(), pendingId: p.id, flags: { voidPendingTransfer: true } });
    // then posting any of them is refused on the closed side, after the pending transfer's
    // own checks (amount, expiry), and moves nothing;
    const refused = post(out);
    assert.deepEqual(
      await results([post(out, { amount: 41n }), post(expiring), refused, post(into), post(closing)]),
      ['exceeds_pending_transfer_amount', 'pending_transfer_expired', 'debit_account_already_closed', 'credit_account_already_closed', 'debit_account_already_closed'],
    );
    assert.deepEqual(await balances(x), [41n, 0n, 10n, 0n]);
    assert.equal((await engine.getAccount(x))?.flags.closed, true);
    // a void is allowed, and voiding the closing transfer reopens x;
    assert.deepEqual(await results([voids(out), voids(closing)]), ['ok', 'ok']);
    assert.equal((await engine.getAccount(x))?.flags.closed, undefined);
    // then the pending transfer into x posts, while the refused post's id stays failed.
    assert.deepEqual(await results([post(into), refused]), ['ok', 'debit_account_already_closed']);
    assert.deepEqual(await balances(x), [0n, 0n, 0n, 10n]);
  });
});

describe('queries', () => {
  test('an account history pages by timestamp in both directions, and balances as of any timestamp', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const stamps: bigint[] = [];
    for (let i = 1; i <= 5; i += 1) {
      const [r] = await engine.createTransfers([transfer(i % 2 === 0 ? a : b, i % 2 === 0 ? b : a, BigInt(i))]);
      stamps.push(r?.timestamp as bigint);
    }
    const p = transfer(a, b, 100n, { flags: { pending: true } });
    const [pr] = await engine.createTransfers([p]);
    const [post] = await engine.createTransfers([{ id: newId(), pendingId: p.id, amount: 40n, flags: { postPendingTransfer: true } }]);

    const page1 = await engine.listAccountTransfers(a, { limit: 3, order: 'asc' });
    const page2 = await engine.listAccountTransfers(a, { limit: 3, order: 'asc', after: page1.nextCursor });
    const page3 = await engine.listAccountTransfers(a, { limit: 3, order: 'asc', after: page2.nextCursor });
    const asc = [...page1.transfers, ...page2.transfers, ...page3.transfers].map((x) => x.timestamp);
    assert.deepEqual(asc, [...stamps, pr?.timestamp, post?.timestamp]);
    assert.equal(page3.nextCursor, null);
    const desc = await engine.listAccountTransfers(a, { limit: 10 });
    assert.deepEqual(desc.transfers.map((x) => x.timestamp), [...asc].reverse());
    await assert.rejects(engine.listAccountTransfers(a, { limit: 0 }), LedgerInputError);

    const account = await engine.getAccount(a);
    assert.equal(await engine.getAccountBalanceAt(a, (account?.timestamp as bigint) - 1n), null);
    assert.deepEqual(await engine.getAccountBalanceAt(a, stamps[1] as bigint), {
      accountId: a, timestamp: stamps[1], debitsPending: 0n, debitsPosted: 2n, creditsPending: 0n, creditsPosted: 1n,
    });
    const beforePost = await engine.getAccountBalanceAt(a, pr?.timestamp as bigint);
    assert.deepEqual([beforePost?.debitsPending, beforePost?.debitsPosted, beforePost?.creditsPosted], [100n, 6n, 9n]);
    const afterPost = await engine.getAccountBalanceAt(a, post?.timestamp as bigint);
    assert.deepEqual([afterPost?.debitsPending, afterPost?.debitsPosted], [0n, 46n]);
    assert.deepEqual(await balances(a), [0n, 46n, 0n, 9n]);
  });

  test('timestamps increase strictly across batches and accounts', async () => {
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    const all = await Promise.all(Array.from({ length: 40 }, () => engine.createTransfers([transfer(a, b, 1n), transfer(b, a, 1n)])));
    const stamps = all.flat().map((r) => r.timestamp as bigint).sort((x, y) => (x < y ? -1 : 1));
    assert.equal(new Set(stamps).size, 80);
    const account = await engine.getAccount(b);
    assert.ok((account?.timestamp as bigint) < (stamps[0] as bigint));
  });
});

describe('batching and limits', () => {
  test("calls coalesced into one batch: each stored transfer's event carries the context of the call that stored it", async () => {
    const [a, b, limited] = (await accounts(undefined, undefined, 'debits')) as [string, string, string];
    // Given four calls from four actors, coalesced into one batch (they share accounts), where
    // alice names x but fails input validation, carol names z in a chain that fails, and bob
    // and dave then store x and z,
    const x = transfer(a, b, 3n);
    const z = transfer(a, b, 4n, { flags: { linked: true } });
    const before = engine.stats().batches;
    const [alice, bob, carol, dave] = await Promise.all([
      engine.createTransfers([{ ...x, amount: 0n }], { actor: 'alice' }),
      engine.createTransfers([x], { actor: 'bob' }),
      engine.createTransfers([z, transfer(limited, b, 1n)], { actor: 'carol' }),
      engine.createTransfers([{ ...z, flags: {} }], { actor: 'dave' }),
    ]);
    assert.equal(engine.stats().batches - before, 1, 'the four calls must share one batch');
    assert.deepEqual(
      [alice, bob, carol, dave].map((r) => r.map((x) => x.result)),
      [['amount_must_not_be_zero'], ['ok'], ['linked_event_failed', 'exceeds_credits'], ['ok']],
    );
    // then the events of x and z name bob and dave, whose calls stored them, not the calls that
    // named those ids first and stored nothing.
    const actorOf = async (id: string): Promise<unknown> =>
      (await t.pool.query<{ actor: string | null }>("SELECT metadata->>'actor' AS actor FROM events.events WHERE stream_type = $1 AND stream_id = $2", [TRANSFER_STREAM, id])).rows.map((r) => r.actor);
    assert.deepEqual(await actorOf(x.id), ['bob']);
    assert.deepEqual(await actorOf(z.id), ['dave']);
  });

  test('concurrent calls coalesce into batches; a failure does not fail its neighbours', async () => {
    const [a, b, limited] = (await accounts(undefined, undefined, 'debits')) as [string, string, string];
    const calls = Array.from({ length: 300 }, (_, i) =>
      engine.createTransfers([i % 10 === 0 ? transfer(limited, b, 1n) : transfer(a, b, 1n)]),
    );
    const out = (await Promise.all(calls)).map((r) => r[0]?.result);
    assert.equal(out.filter((r) => r === 'ok').length, 270);
    assert.equal(out.filter((r) => r === 'exceeds_credits').length, 30);
    const stats = engine.stats();
    assert.ok(stats.batches < 300, `expected coalescing, got ${stats.batches} batches for 300 calls`);
    assert.ok(stats.batchSizeMean > 1);
  });

  test('calls on disjoint accounts are shared out between parallel batches; calls that all name one hot account make one batch', async () => {
    const ids = await accounts(...Array.from({ length: 601 }, () => undefined));
    const [hot, ...others] = ids as [string, ...string[]];
    // Given 300 calls arriving at once, each on its own pair of accounts,
    const pairs = Array.from({ length: 300 }, (_, i) => engine.createTransfers([transfer(others[2 * i] as string, others[2 * i + 1] as string, 1n)]));
    await Promise.all(pairs);
    // then they are shared out between the three batch slots (those that share accounts with a
    // batch in flight wait for a later one);
    const shared = engine.stats().batches;
    assert.ok(shared >= 3, `expected the calls shared out between batches, got ${shared} batch(es)`);
    // and given 300 calls that all name the hot account, none of which could run beside another,
    const hotCalls = Array.from({ length: 300 }, (_, i) => engine.createTransfers([transfer(hot, others[i % 20] as string, 1n)]));
    const results = (await Promise.all(hotCalls)).map((r) => r[0]?.result);
    // then they go as one batch, not as a few small ones one after another.
    assert.deepEqual(new Set(results), new Set(['ok']));
    assert.equal(engine.stats().batches - shared, 1);
    assert.deepEqual(await balances(hot), [0n, 300n, 0n, 0n]);
  });

  test('a batch that waits on a lock does not hold up calls on other accounts; calls on its accounts wait behind it, in order', async () => {
    const [a, b, c, d] = (await accounts(undefined, undefined, undefined, undefined)) as [string, string, string, string];
    // Given another transaction holds account a, so a batch that moves money from a waits,
    const blocker = await t.pool.connect();
    try {
      await blocker.query('BEGIN');
      await blocker.query('SELECT 1 FROM ledger.accounts WHERE id = $1 FOR UPDATE', [a]);
      const first = engine.createTransfers([transfer(a, b, 1n)]);
      await waitUntilBlockedOnLock();
      // when a call on other accounts arrives, it runs in a batch of its own meanwhile, and
      // commits while the first is still waiting;
      const [second] = await engine.createTransfers([transfer(c, d, 1n)]);
      assert.equal(second?.result, 'ok');
      // a call that shares account a with the waiting batch, and one after it that shares c
      // with that call, both wait: the first for the batch, the second for the first.
      const third = engine.createTransfers([transfer(c, a, 2n)]);
      await new Promise(setImmediate);
      const fourth = engine.createTransfers([transfer(d, c, 3n)]);
      await new Promise(setImmediate);
      assert.equal(engine.stats().batches, 1);
      await blocker.query('COMMIT');
      const [r1, r3, r4] = (await Promise.all([first, third, fourth])).map((r) => r[0]);
      assert.deepEqual([r1?.result, r3?.result, r4?.result], ['ok', 'ok', 'ok']);
      // Then each account's timestamps increase in the order its changes committed: the second
      // committed first and has the smallest; the third and fourth come after the first.
      assert.ok((second?.timestamp ?? 0n) < (r1?.timestamp ?? 0n));
      assert.ok((r1?.timestamp ?? 0n) < (r3?.timestamp ?? 0n));
      assert.ok((r3?.timestamp ?? 0n) < (r4?.timestamp ?? 0n));
      assert.deepEqual(await balances(a), [0n, 1n, 0n, 2n]);
      assert.deepEqual(await balances(c), [0n, 1n + 2n, 0n, 3n]);
    } finally {
      blocker.release();
    }
  });

  test('a pending transfer committed while a batch waits for its locks: the batch retries with its accounts locked', async () => {
    const [a, b, c, d] = (await accounts(undefined, undefined, undefined, undefined)) as [string, string, string, string];
    const p = newId();
    // Given another writer holds account c, about to commit a pending transfer p from a to b,
    const writer = await t.pool.connect();
    try {
      await writer.query('BEGIN');
      await writer.query('SELECT 1 FROM ledger.accounts WHERE id = $1 FOR UPDATE', [c]);
      const ts = await reserveTimestamps(writer, 1, 0n);
      // when a batch that moves money from c and posts p opens while p is not yet visible (it
      // locks no account for p) and waits for c,
      const post = engine.createTransfers([transfer(c, d, 1n), { id: newId(), pendingId: p, flags: { postPendingTransfer: true } }]);
      await waitUntilBlockedOnLock();
      const row = { id: p, debitAccountId: a, creditAccountId: b, amount: 5n, amountRequested: 5n, pendingId: null, ledger: 'USD', code: 1,
        flags: TransferFlag.pending, timeoutSeconds: 0, metadata: {}, timestamp: ts, result: 'ok' as const, pendingStatus: 'pending' as const,
        expiresAt: null, resolvedAt: null };
      await writer.query(
        `INSERT INTO ledger.transfers (id, debit_account_id, credit_account_id, amount, amount_requested, ledger, code, flags, timestamp, result, pending_status)
         VALUES ($1, $2, $3, 5, 5, 'USD', 1, $4, $5, 'ok', 'pending')`,
        [p, a, b, TransferFlag.pending, ts.toString()],
      );
      await writer.query('UPDATE ledger.accounts SET debits_pending = 5 WHERE id = $1', [a]);
      await writer.query('UPDATE ledger.accounts SET credits_pending = 5 WHERE id = $1', [b]);
      await t.events.appendMany(writer, [transferEvent(row, {})]);
      await writer.query('COMMIT');
      // then it finds p once it holds c, with accounts it did not lock, and retries rather than
      // deciding on unlocked balances: the post applies once.
      const results = await post;
      assert.deepEqual(results.map((r) => r.result), ['ok', 'ok']);
      assert.equal(engine.stats().batchAttempts, engine.stats().batches + 1);
      assert.deepEqual(await balances(a), [0n, 5n, 0n, 0n]);
      assert.deepEqual(await balances(b), [0n, 0n, 0n, 5n]);
    } finally {
      writer.release();
    }
  });

  test('calls over the batch limit, a full queue, and a closed engine are refused up front', async () => {
    const small = new LedgerEngine({ pool: t.pool, batchSizeMax: 4, queueTransfersMax: 8, batchLingerMs: 50, events: t.events });
    const [a, b] = (await accounts(undefined, undefined)) as [string, string];
    await assert.rejects(small.createTransfers(Array.from({ length: 5 }, () => transfer(a, b, 1n))), LedgerInputError);
    await assert.rejects(small.createTransfers([{ ...transfer(a, b, 1n), id: 'nope' }]), LedgerInputError);
    await assert.rejects(small.createTransfers([transfer(a, b, -1n)]), LedgerInputError);
    // Flags that are not an object (null from a JSON body) are the caller's contract, not a TypeError from inside a batch.
    await assert.rejects(small.createTransfers([{ ...transfer(a, b, 1n), flags: null as never }]), LedgerInputError);
    await assert.rejects(small.createTransfers([transfer(a, b, AMOUNT_MAX + 1n)]), LedgerInputError);
    await assert.rejects(small.createTransfers([transfer(a, b, 1n, { timeoutSeconds: 1.5 })]), LedgerInputError);
    await assert.rejects(small.createTransfers([transfer(a, b, 1n, { code: -1 })]), LedgerInputError);
    await assert.rejects(small.createTransfers([null as never]), LedgerInputError);
    await assert.rejects(small.createTransfers('x' as never), LedgerInputError);
    assert.deepEqual(await small.createTransfers([]), []);
    const queued = [small.createTransfers(Array.from({ length: 4 }, () => transfer(a, b, 1n))), small.createTransfers(Array.from({ length: 4 }, () => transfer(a, b, 1n)))];
    await assert.rejects(small.createTransfers([transfer(a, b, 1n)]), LedgerOverloadedError);
    const closing = small.close();
    await assert.rejects(small.createTransfers([transfer(a, b, 1n)]), LedgerClosedError);
    await assert.rejects(small.createAccounts([]), LedgerClosedError);
    // close() waits for the queued batches: they complete.
    assert.deepEqual((await Promise.all(queued)).flat().map((r) => r.result), Array(8).fill('ok'));
    await closing;
    assert.throws(() => new LedgerEngine({ pool: t.pool, batchSizeMax: 0 }), RangeError);
  });

  test('a call that makes the database fail is split off: its neighbours in the batch still commit', async () => {
    // A trigger stands in for any permanent per-row database error the engine did not foresee.
    const poison = "BEGIN IF NEW.metadata ? 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF; RETURN NEW; END";
    await withTransfersTrigger('poison', 'BEFORE INSERT', poison, async () => {
      const [a, b] = (await accounts(undefined, undefined)) as [string, string];
      const settled = await nineCallsFifthMarked(a, b, { poison: 'yes' });
      assert.equal(settled.filter((s) => s.status === 'fulfilled').length, 8);
      const failed = settled[4];
      assert.ok(failed?.status === 'rejected' && /poisoned row/.test(String(failed.reason)));
      assert.deepEqual(await balances(a), [0n, 8n, 0n, 0n]);
    });
  });

  test('behind a transaction-pooling proxy: every batch commits on a session reset just before it', async () => {
    // Given an engine whose every connection is reset when it is checked out (DISCARD ALL), as
    // a proxy that pools transactions may hand any server session to any transaction: the
    // batch's statements may count on nothing a session kept from an earlier transaction,
    const pool = new pg.Pool({ connectionString: t.db.url, max: 2 });
    const checkout = pool.connect.bind(pool) as () => Promise<pg.PoolClient>;
    let resets = 0;
    Object.assign(pool, {
      connect: async () => {
        const client = await checkout();
        await client.query('DISCARD ALL');
        resets += 1;
        return client;
      },
    });
    const proxied = new LedgerEngine({ pool, clock: clock.now, events: t.events });
    try {
      const [a, b, c] = (await accounts(undefined, undefined, undefined)) as [string, string, string];
      // when batches follow one another on its two connections, and then run side by side,
      const sequential: string[] = [];
      for (let i = 0; i < 4; i += 1) sequential.push(...(await proxied.createTransfers([transfer(a, b, 1n)])).map((r) => r.result));
      const concurrent = await Promise.all(
        Array.from({ length: 12 }, (_, i) => proxied.createTransfers([i % 2 === 0 ? transfer(a, c, 2n) : transfer(b, c, 3n)])),
      );
      // then every one of them commits (and afterEach holds the books to their invariants).
      assert.deepEqual(sequential, ['ok', 'ok', 'ok', 'ok']);
      assert.deepEqual(concurrent.flat().map((r) => r.result), Array(12).fill('ok'));
      assert.ok(resets >= 5, `the sessions were reset before the batches (${resets})`);
      const account = await engine.getAccount(c);
      assert.equal(account?.creditsPosted, 6n * 2n + 6n * 3n);
    } finally {
      await proxied.close();
      await pool.end();
    }
  });

  test('a batch whose rows do not all land never commits: the write checks its own counts before COMMIT', async () => {
    // A trigger that silently drops a row stands in for any write that lands short: the engine
    // sends the write, the events and COMMIT in one round trip, so only the statement itself
    // can stop the commit.
    const vanish = "BEGIN IF NEW.metadata ? 'vanish' THEN RETURN NULL; END IF; RETURN NEW; END";
    await withTransfersTrigger('vanish', 'BEFORE INSERT', vanish, async () => {
      const [a, b] = (await accounts(undefined, undefined)) as [string, string];
      const settled = await nineCallsFifthMarked(a, b, { vanish: 'yes' });
      assert.equal(settled.filter((s) => s.status === 'fulfilled').length, 8);
      const failed = settled[4];
      assert.ok(failed?.status === 'rejected', 'the call whose row vanished fails');
      assert.match(String(failed.reason), /invariant: batch write mismatch \(transfers 0\/1\)/);
      assert.equal((failed.reason as { code?: string }).code, 'XX000');
      // Its balance change and its event rolled back with it; its neighbours committed.
      assert.deepEqual(await balances(a), [0n, 8n, 0n, 0n]);
      const events = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM events.events WHERE stream_type = $1', [TRANSFER_STREAM]);
      assert.equal(events.rows[0]?.n, 8);
    });
  });

  test('the last round trip: a backend lost in it leaves the outcome unknown; an error the server reports there does not', async () => {
    // Deferred triggers run inside COMMIT: one sleeps, so the test can cut the backend off
    // mid-commit, and one refuses, as a failing deferred constraint would.
    const atCommit = `BEGIN
        IF NEW.metadata ? 'slow' THEN PERFORM pg_sleep(30); END IF;
        IF NEW.metadata ? 'refuse' THEN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '40001'; END IF;
        RETURN NULL;
      END`;
    await withTransfersTrigger('at_commit', 'AFTER INSERT', atCommit, async () => {
      const once = new LedgerEngine({ pool: t.pool, clock: clock.now, events: t.events, batchAttemptsMax: 1 });
      try {
        const [a, b] = (await accounts(undefined, undefined)) as [string, string];

        // Given a batch whose COMMIT is under way, when its backend is terminated,
        const slow = transfer(a, b, 1n, { metadata: { slow: 'yes' } });
        const lost = once.createTransfers([slow]).catch((e: unknown) => e);
        const pid = await sleepingBackend('WITH acc AS (%UPDATE ledger.accounts AS a%');
        await t.pool.query('SELECT pg_terminate_backend($1)', [pid]);
        // then the call cannot tell whether it committed, and says so (here it did not).
        const error = await lost;
        assert.ok(error instanceof LedgerUnavailableError, String(error));
        assert.equal(error.outcomeUnknown, true);
        assert.equal((await once.getTransfer(slow.id)), null);

        // Given a batch that the server refuses at COMMIT with an error it reports (a
        // serialization failure, which is worth a retry),
        const refused = await once.createTransfers([transfer(a, b, 1n, { metadata: { refuse: 'yes' } })]).catch((e: unknown) => e);
        // then the call knows that nothing committed.
        assert.ok(refused instanceof LedgerUnavailableError, String(refused));
        assert.equal(refused.outcomeUnknown, false);
        assert.match((refused.cause as Error).message, /refused at commit/);
        assert.deepEqual(await balances(a), [0n, 0n, 0n, 0n]);

        // And a plain batch still commits through the same engine.
        assert.deepEqual((await once.createTransfers([transfer(a, b, 2n)])).map((r) => r.result), ['ok']);
      } finally {
        await once.close();
      }
    }, true);
  });

  test('an unreachable database is a LedgerUnavailableError, never a decided result', async () => {
    const dead = new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:1/none', connectionTimeoutMillis: 200 });
    const offline = new LedgerEngine({ pool: dead, batchAttemptsMax: 2 });
    try {
      const error = await offline.createTransfers([transfer(newId(), newId(), 1n)]).catch((e: unknown) => e);
      assert.ok(error instanceof LedgerUnavailableError);
      assert.equal(error.outcomeUnknown, false);
      assert.match(error.message, /nothing was applied/);
      // A refused connection is the database's weather: the batch is tried batchAttemptsMax times.
      assert.equal(offline.stats().batchAttempts, 2);
      assert.equal((error.cause as { code?: string }).code, 'ECONNREFUSED');
      // Account creation too: tried batchAttemptsMax times, then unavailable, with the refusal as the cause.
      let connects = 0;
      const connect = dead.connect.bind(dead) as () => Promise<pg.PoolClient>;
      Object.assign(dead, { connect: () => { connects += 1; return connect(); } });
      const accountError = await offline.createAccounts([{ id: newId(), ledger: 'USD', code: 1 }]).catch((e: unknown) => e);
      assert.ok(accountError instanceof LedgerUnavailableError);
      assert.equal(connects, 2, 'two attempts');
      assert.equal((accountError.cause as { code?: string }).code, 'ECONNREFUSED');
      await assert.rejects(offline.getAccount(newId()), LedgerUnavailableError);
    } finally {
      await offline.close();
      await dead.end();
    }
  });

  for (const later of ['refuse a connection', 'lose the connection before COMMIT'] as const) {
    test(`a batch that may have committed in one attempt says so when later attempts ${later}`, async () => {
      // Given an engine whose pool loses the reply to the first batch's commit round trip (the
      // server commits), after which every attempt fails before it can commit,
      const pool = new pg.Pool({ connectionString: t.db.url, max: 2 });
      pool.on('error', () => {});
      const checkout = pool.connect.bind(pool) as () => Promise<pg.PoolClient>;
      let lostCommit = false;
      Object.assign(pool, {
        connect: async () => {
          if (lostCommit && later === 'refuse a connection') {
            throw Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' });
          }
          const client = await checkout();
          const query = client.query.bind(client) as (...args: unknown[]) => Promise<unknown>;
          Object.assign(client, {
            query: async (...args: unknown[]) => {
              const text = typeof args[0] === 'string' ? args[0] : '';
              if (lostCommit && text.includes('reserve_timestamps')) throw new Error('Connection terminated unexpectedly');
              if (!lostCommit && text.startsWith('WITH acc AS') && text.endsWith('COMMIT')) {
                await query(...args);
                lostCommit = true;
                throw new Error('Connection terminated unexpectedly');
              }
              return query(...args);
            },
          });
          return client;
        },
      });
      const flaky = new LedgerEngine({ pool, clock: clock.now, events: t.events, batchAttemptsMax: 3 });
      try {
        const [a, b] = (await accounts(undefined, undefined)) as [string, string];
        const tr = transfer(a, b, 7n);
        const error = await flaky.createTransfers([tr]).catch((e: unknown) => e);
        // then every attempt is made, and the call hears that the outcome is unknown: the
        // transfer did commit, in the first attempt.
        assert.ok(error instanceof LedgerUnavailableError, String(error));
        assert.equal(flaky.stats().batchAttempts, 3);
        assert.equal(error.outcomeUnknown, true);
        assert.doesNotMatch(error.message, /nothing was applied/);
        assert.match(error.message, /may have been applied/);
        assert.equal((await engine.getTransfer(tr.id))?.result, 'ok');
        // A retry with the same id is safe: it finds the transfer.
        assert.deepEqual(await results([tr]), ['exists']);
        assert.deepEqual(await balances(a), [0n, 7n, 0n, 0n]);
      } finally {
        await flaky.close();
        await pool.end();
      }
    });
  }

  test('a cancelled statement and a server short of resources are retried, then a LedgerUnavailableError, never a raw database error', async () => {
    await t.pool.query('CREATE SEQUENCE ledger.test_slow_once');
    const body = `BEGIN
        IF NEW.metadata->>'slow' = 'always' OR (NEW.metadata->>'slow' = 'once' AND nextval('ledger.test_slow_once') = 1) THEN
          PERFORM pg_sleep(30);
        END IF;
        IF NEW.metadata ? 'starved' THEN RAISE EXCEPTION 'out of memory' USING ERRCODE = '53200'; END IF;
        RETURN NEW;
      END`;
    try {
      await withTransfersTrigger('slow', 'BEFORE INSERT', body, async () => {
        const twice = new LedgerEngine({ pool: t.pool, clock: clock.now, events: t.events, batchAttemptsMax: 2 });
        try {
          const [a, b] = (await accounts(undefined, undefined)) as [string, string];
          // Given a batch whose write is cancelled once (pg_cancel_backend, as a statement
          // timeout would), then it commits on the next attempt.
          const once = twice.createTransfers([transfer(a, b, 1n, { metadata: { slow: 'once' } })]).catch((e: unknown) => e);
          assert.equal(await cancelSleepersUntil(once), 1);
          const settled = await once;
          assert.ok(Array.isArray(settled), `a decided result, not ${String(settled)}`);
          assert.deepEqual(settled.map((r: { result: string }) => r.result), ['ok']);
          assert.equal(twice.stats().batchAttempts, 2);

          // Given a batch whose write is cancelled in every attempt, then the call is told
          // that nothing was applied, and nothing was.
          const always = transfer(a, b, 2n, { metadata: { slow: 'always' } });
          const cancelled = twice.createTransfers([always]).catch((e: unknown) => e);
          assert.equal(await cancelSleepersUntil(cancelled), 2);
          const error = await cancelled;
          assert.ok(error instanceof LedgerUnavailableError, String(error));
          assert.equal(error.outcomeUnknown, false);
          assert.match(error.message, /nothing was applied/);
          assert.equal((error.cause as { code?: string }).code, '57014');
          assert.equal(await engine.getTransfer(always.id), null);

          // Given a server that runs out of memory for the batch in every attempt, the same.
          const starved = await twice.createTransfers([transfer(a, b, 4n, { metadata: { starved: 'yes' } })]).catch((e: unknown) => e);
          assert.ok(starved instanceof LedgerUnavailableError, String(starved));
          assert.equal(starved.outcomeUnknown, false);
          assert.equal((starved.cause as { code?: string }).code, '53200');
          assert.equal(twice.stats().batchAttempts, 2 + 2 + 2);
          assert.deepEqual(await balances(a), [0n, 1n, 0n, 0n]);
        } finally {
          await twice.close();
        }
      });
    } finally {
      await t.pool.query('DROP SEQUENCE ledger.test_slow_once');
    }
  });
});

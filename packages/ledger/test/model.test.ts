/**
 * Model-based property test: random sequences of account creations, transfers of every kind
 * (duplicates, linked chains, pending, post, void, balancing, closing) and clock advances
 * with expiry run against the engine on real PostgreSQL and against the reference model.
 * Results, timestamps and balances must match exactly, and the invariants must hold. Some
 * steps submit several calls at once, which the engine takes into one batch (one transaction):
 * their results must be those of the model applying the calls one after another, in order.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { ManualClock, propertySeed } from '@ledgerline/testing';
import { ID_ZERO, LedgerEngine, type NewAccount, type NewTransfer } from '../src/index.ts';
import { LedgerModel } from './model.ts';
import { assertInvariants, ledgerTestDb, resetLedger, type LedgerTestDb } from './support.ts';

const ACCOUNT_IDS = [1, 2, 3, 4, 5].map((n) => `00000000-0000-7000-8000-00000000000${n}`);
const transferId = (n: number): string => `10000000-0000-7000-8000-0000000000${String(n).padStart(2, '0')}`;
/** Pending transfers take ids from a small set that posts and voids aim at; others from a wide one. */
const pendingIdArb = fc.integer({ min: 0, max: 5 }).map(transferId);
const plainIdArb = fc.oneof(
  { weight: 30, arbitrary: fc.integer({ min: 8, max: 99 }).map(transferId) },
  { weight: 1, arbitrary: fc.constant(ID_ZERO) },
);

type Op =
  | { kind: 'accounts'; list: NewAccount[] }
  | { kind: 'transfers'; list: NewTransfer[] }
  /** Calls submitted at once, without awaiting one before the next. */
  | { kind: 'together'; calls: NewTransfer[][] }
  | { kind: 'advance'; seconds: number }
  | { kind: 'sweep' }
  | { kind: 'retry'; pick: number };

const accountArb: fc.Arbitrary<NewAccount> = fc
  .record({
    id: fc.constantFrom(...ACCOUNT_IDS),
    ledger: fc.constantFrom('USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'EUR', 'XXX'),
    code: fc.constantFrom(1, 2),
    limit: fc.constantFrom('none', 'none', 'none', 'debits', 'credits'),
    metadata: fc.constantFrom(undefined, { owner: 'alice' }),
  })
  .map(({ id, ledger, code, limit, metadata }) => ({
    id,
    ledger,
    code,
    flags:
      limit === 'debits'
        ? { debitsMustNotExceedCredits: true }
        : limit === 'credits'
          ? { creditsMustNotExceedDebits: true }
          : {},
    ...(metadata === undefined ? {} : { metadata }),
  }));

const transferArb: fc.Arbitrary<NewTransfer> = fc
  .record({
    id: plainIdArb,
    pendingTransferId: pendingIdArb,
    kind: fc.oneof(
      { weight: 10, arbitrary: fc.constant('plain') },
      { weight: 6, arbitrary: fc.constant('pending') },
      { weight: 4, arbitrary: fc.constant('post') },
      { weight: 2, arbitrary: fc.constant('void') },
      { weight: 1, arbitrary: fc.constant('balancingDebit') },
      { weight: 1, arbitrary: fc.constant('balancingCredit') },
      { weight: 1, arbitrary: fc.constant('closing') },
    ),
    debit: fc.integer({ min: 0, max: 4 }),
    creditOffset: fc.oneof({ weight: 12, arbitrary: fc.integer({ min: 1, max: 4 }) }, { weight: 1, arbitrary: fc.constant(0) }),
    amount: fc.oneof(
      { weight: 16, arbitrary: fc.bigInt(1n, 100n) },
      { weight: 1, arbitrary: fc.constant(2n ** 62n) },
      { weight: 1, arbitrary: fc.constant(0n) },
    ),
    omitAmount: fc.integer({ min: 0, max: 2 }).map((n) => n > 0),
    omitAccounts: fc.integer({ min: 0, max: 3 }).map((n) => n > 0),
    pendingId: pendingIdArb,
    timeoutSeconds: fc.constantFrom(0, 0, 1, 2, 3),
    ledger: fc.constantFrom('USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'USD', 'EUR'),
    code: fc.constantFrom(1, 1, 2),
    linked: fc.integer({ min: 0, max: 7 }).map((n) => n === 0),
    metadata: fc.constantFrom(undefined, undefined, { ref: 'r1' }),
  })
  .map((r): NewTransfer => {
    // Mostly distinct accounts; now and then the same one, to reach accounts_must_be_different.
    const debit = ACCOUNT_IDS[r.debit] as string;
    const credit = ACCOUNT_IDS[(r.debit + r.creditOffset) % 5] as string;
    const base: NewTransfer = { id: r.id, ...(r.metadata === undefined ? {} : { metadata: r.metadata }) };
    const linked = r.linked ? { linked: true } : {};
    if (r.kind === 'post' || r.kind === 'void') {
      return {
        ...base,
        pendingId: r.pendingId,
        flags: { ...linked, [r.kind === 'post' ? 'postPendingTransfer' : 'voidPendingTransfer']: true },
        ...(r.omitAmount ? {} : { amount: r.amount }),
        ...(r.omitAccounts ? {} : { debitAccountId: debit, creditAccountId: credit }),
      };
    }
    const flags =
      r.kind === 'pending'
        ? { pending: true }
        : r.kind === 'closing'
          ? { pending: true, closingDebit: true }
          : r.kind === 'balancingDebit'
            ? { balancingDebit: true }
            : r.kind === 'balancingCredit'
              ? { balancingCredit: true }
              : {};
    const pending = r.kind === 'pending' || r.kind === 'closing';
    return {
      ...base,
      ...(pending ? { id: r.pendingTransferId } : {}),
      debitAccountId: debit,
      creditAccountId: credit,
      amount: r.amount,
      ledger: r.ledger,
      code: r.code,
      flags: { ...flags, ...linked },
      ...(pending && r.timeoutSeconds > 0 ? { timeoutSeconds: r.timeoutSeconds } : {}),
    };
  });

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 2, arbitrary: fc.array(accountArb, { minLength: 1, maxLength: 3 }).map((list) => ({ kind: 'accounts' as const, list })) },
  { weight: 10, arbitrary: fc.array(transferArb, { minLength: 1, maxLength: 6 }).map((list) => ({ kind: 'transfers' as const, list })) },
  {
    weight: 3,
    arbitrary: fc.array(fc.array(transferArb, { minLength: 1, maxLength: 4 }), { minLength: 2, maxLength: 5 }).map((calls) => ({ kind: 'together' as const, calls })),
  },
  { weight: 2, arbitrary: fc.integer({ min: 1, max: 3 }).map((seconds) => ({ kind: 'advance' as const, seconds })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'sweep' as const }) },
  { weight: 3, arbitrary: fc.nat().map((pick) => ({ kind: 'retry' as const, pick })) },
);

/** Funded accounts first, so that most transfers have something to move. */
const initialArb = fc.tuple(
  ...ACCOUNT_IDS.map((id) => accountArb.map((a) => ({ ...a, id, ledger: a.ledger === 'XXX' ? 'USD' : a.ledger }))),
);

/**
 * One fixed sequence that reaches each outcome the test requires below, run first (fast-check
 * `examples`) and compared with the model like any other. The random sequences reach most of
 * them in most runs, but not every seed reaches every one (seed 1249658744 never reached
 * pending_transfer_already_posted in 150 runs): the requirement must not hang on the seed.
 */
const usd = (id: string, flags: NewAccount['flags'] = {}): NewAccount => ({ id, ledger: 'USD', code: 1, flags });
const move = (n: number, debit: number, credit: number, amount: bigint, extra: Partial<NewTransfer> = {}): NewTransfer => ({
  id: transferId(n), debitAccountId: ACCOUNT_IDS[debit], creditAccountId: ACCOUNT_IDS[credit], amount, ledger: 'USD', code: 1, ...extra,
});
const REACHES_EVERY_OUTCOME: [NewAccount[], Op[]] = [
  [usd(ACCOUNT_IDS[0] as string, { debitsMustNotExceedCredits: true }), ...ACCOUNT_IDS.slice(1).map((id) => usd(id))],
  [
    { kind: 'transfers', list: [move(8, 1, 0, 50n)] }, // ok
    { kind: 'retry', pick: 0 }, // exists
    { kind: 'transfers', list: [move(9, 0, 1, 100n)] }, // exceeds_credits
    { kind: 'transfers', list: [move(10, 1, 2, 1n, { flags: { linked: true } }), move(11, 0, 2, 1000n)] }, // linked_event_failed
    { kind: 'transfers', list: [move(1, 1, 2, 5n, { flags: { pending: true } })] },
    { kind: 'transfers', list: [{ id: transferId(12), pendingId: transferId(1), flags: { postPendingTransfer: true } }] },
    { kind: 'transfers', list: [{ id: transferId(13), pendingId: transferId(1), flags: { postPendingTransfer: true } }] }, // pending_transfer_already_posted
    { kind: 'transfers', list: [move(2, 1, 2, 5n, { flags: { pending: true }, timeoutSeconds: 1 })] },
    { kind: 'advance', seconds: 2 },
    { kind: 'transfers', list: [{ id: transferId(14), pendingId: transferId(2), flags: { postPendingTransfer: true } }] }, // pending_transfer_expired
  ],
];

let t: LedgerTestDb;
before(async () => {
  t = await ledgerTestDb();
});
after(async () => {
  await t.close();
});

test('the engine matches the reference model on random operation sequences', async () => {
  const seed = propertySeed('ledger model');
  const numRuns = Number(process.env.FC_RUNS ?? 150);
  const seen = new Map<string, number>();
  /** Calls submitted together, and the batches that committed them. */
  let together = 0;
  let togetherBatches = 0;
  await fc.assert(
    fc.asyncProperty(initialArb, fc.array(opArb, { minLength: 5, maxLength: 30 }), async (initial, ops) => {
      await resetLedger(t.pool);
      const clock = new ManualClock();
      // One batch in flight: calls submitted together are queued in order and taken in order
      // into the next batch, so the model's call-by-call order is the engine's.
      const engine = new LedgerEngine({ pool: t.pool, clock: clock.now, events: t.events, batchesInFlightMax: 1 });
      const model = new LedgerModel();
      try {
        const all: Op[] = [{ kind: 'accounts', list: initial }, ...ops];
        const submitted: NewTransfer[][] = [];
        for (const [step, generated] of all.entries()) {
          // A retry resubmits an earlier call exactly, as a client does after a timeout.
          const op: Op =
            generated.kind === 'retry' && submitted.length > 0
              ? { kind: 'transfers', list: submitted[generated.pick % submitted.length] as NewTransfer[] }
              : generated.kind === 'retry'
                ? { kind: 'sweep' }
                : generated;
          if (op.kind === 'transfers') submitted.push(op.list);
          if (op.kind === 'together') submitted.push(...op.calls);
          const where = `step ${step} (${op.kind})`;
          if (op.kind === 'accounts') {
            const got = (await engine.createAccounts(op.list)).map((r) => r.result);
            assert.deepEqual(got, model.createAccounts(op.list, clock.now()), where);
          } else if (op.kind === 'transfers') {
            const got = (await engine.createTransfers(op.list)).map(({ result, timestamp, amount }) => ({ result, timestamp, amount }));
            assert.deepEqual(got, model.createTransfers(op.list, clock.now()), where);
            for (const r of got) seen.set(r.result, (seen.get(r.result) ?? 0) + 1);
          } else if (op.kind === 'together') {
            const batchesBefore = engine.stats().batches;
            const got = await Promise.all(op.calls.map((list) => engine.createTransfers(list)));
            togetherBatches += engine.stats().batches - batchesBefore;
            together += op.calls.length;
            const now = clock.now();
            assert.deepEqual(
              got.map((results) => results.map(({ result, timestamp, amount }) => ({ result, timestamp, amount }))),
              op.calls.map((list) => model.createTransfers(list, now)),
              where,
            );
            for (const r of got.flat()) seen.set(r.result, (seen.get(r.result) ?? 0) + 1);
          } else if (op.kind === 'advance') {
            clock.advanceSeconds(op.seconds);
            assert.equal(await engine.expirePendingTransfers(), model.sweep(clock.now()), where);
          } else {
            assert.equal(await engine.expirePendingTransfers(), model.sweep(clock.now()), where);
          }
          const accounts = await engine.getAccounts(ACCOUNT_IDS);
          const got = Object.fromEntries(
            accounts.map((a) => [a.id, [a.debitsPending, a.debitsPosted, a.creditsPending, a.creditsPosted, a.flags.closed === true]]),
          );
          const want = Object.fromEntries(
            [...model.accounts.values()].map((a) => [a.id, [a.dp, a.dpo, a.cp, a.cpo, a.closed]]),
          );
          assert.deepEqual(got, want, `balances after ${where}`);
        }
        await assertInvariants(t.pool, { events: true });
      } finally {
        await engine.close();
      }
    }),
    { seed, numRuns, endOnFailure: true, examples: [REACHES_EVERY_OUTCOME] },
  );
  // The sequences must reach the interesting outcomes, or the comparison proves little.
  console.log('[model] result codes seen:', JSON.stringify(Object.fromEntries([...seen].sort())));
  console.log(`[model] ${together} calls submitted together, committed in ${togetherBatches} batches`);
  assert.ok(together > 0 && togetherBatches < together, 'calls submitted together share batches');
  for (const code of ['ok', 'exists', 'linked_event_failed', 'exceeds_credits', 'pending_transfer_expired', 'pending_transfer_already_posted']) {
    assert.ok((seen.get(code) ?? 0) > 0, `no transfer ended with ${code}`);
  }
});

/**
 * The ledger's balances as a projection, driven by the real ledger engine on PostgreSQL:
 * - property: for any sequence of ledger operations, the projection built incrementally
 *   (tiny batches, as events arrive) equals the one replayed from zero in large batches, and
 *   both equal the live balances (the reconciliation finds no difference);
 * - the reconciliation reports each tampered balance precisely;
 * - time travel gives each account's balances as they were after every step.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { ManualClock, propertySeed } from '@ledgerline/testing';
import { CHECKPOINT_START, checkpointOf, type Checkpoint, type StoredEvent, type StreamEvent } from '@ledgerline/events';
import { LedgerEngine, LedgerEventType, type NewAccount, type NewTransfer } from '@ledgerline/ledger';
import {
  createGeneration,
  dropGeneration,
  ensureProjection,
  ledgerBalanceAt,
  ledgerBalancesProjection as projection,
  projectionLag,
  readProjectedBalances,
  rebuild,
  reconcileLedger,
  replayInto,
  ReplayConflictError,
  runBatch,
  swapGeneration,
  type AccountBalances,
} from '../src/index.ts';
import { runCli } from '../src/cli.ts';
import { esTestEnv, waitFor, type EsTestEnv } from './support.ts';

const ACCOUNTS = [1, 2, 3, 4].map((n) => `00000000-0000-7000-8000-00000000000${n}`);
const tid = (n: number): string => `20000000-0000-7000-8000-${String(n).padStart(12, '0')}`;

let env: EsTestEnv;
before(async () => {
  env = await esTestEnv({ ledger: true });
  await ensureProjection(env.pool, projection);
});
after(async () => {
  await env.close();
});

async function reset(): Promise<void> {
  await env.pool.query('TRUNCATE ledger.transfers, ledger.accounts, events.events');
  await env.pool.query("SELECT setval('ledger.timestamps', 0)");
  await rebuild(env.pool, env.store, projection, { mode: 'in-place', batchSize: 100 });
}

/** Every committed event, once the read horizon has passed them all. */
async function allEvents(): Promise<StoredEvent[]> {
  const committed = Number((await env.pool.query<{ n: string }>('SELECT count(*) AS n FROM events.events')).rows[0]!.n);
  let all: StoredEvent[] = [];
  await waitFor('the horizon to pass every event', async () => {
    all = await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: committed + 1 });
    return all.length === committed;
  });
  return all;
}

/** Applies every committed event to the active generation (waiting out the read horizon). */
async function catchUp(batchSize: number): Promise<void> {
  await waitFor('the projection to catch up', async () => {
    await runBatch(env.pool, env.store, projection, { generation: 'active', batchSize });
    return (await projectionLag(env.pool, projection.name))?.eventsBehind === 0;
  });
}

type Op = { kind: 'transfers'; list: NewTransfer[] } | { kind: 'advance'; seconds: number };

const transferArb: fc.Arbitrary<NewTransfer> = fc
  .record({
    kind: fc.constantFrom('plain', 'plain', 'pending', 'pending', 'post', 'post', 'void', 'balancing', 'closing'),
    id: fc.integer({ min: 10, max: 400 }),
    pendingNo: fc.integer({ min: 0, max: 5 }),
    debit: fc.integer({ min: 0, max: 3 }),
    offset: fc.integer({ min: 1, max: 3 }),
    amount: fc.bigInt(1n, 50n),
    partial: fc.boolean(),
    timeoutSeconds: fc.constantFrom(0, 0, 1, 2),
    linked: fc.integer({ min: 0, max: 6 }).map((n) => n === 0),
  })
  .map((r): NewTransfer => {
    const debitAccountId = ACCOUNTS[r.debit]!;
    const creditAccountId = ACCOUNTS[(r.debit + r.offset) % 4]!;
    const linked = r.linked ? { linked: true } : {};
    if (r.kind === 'post' || r.kind === 'void') {
      return {
        id: tid(r.id),
        pendingId: tid(r.pendingNo),
        flags: { ...linked, [r.kind === 'post' ? 'postPendingTransfer' : 'voidPendingTransfer']: true },
        ...(r.kind === 'post' && r.partial ? { amount: r.amount } : {}),
      };
    }
    const pending = r.kind === 'pending' || r.kind === 'closing';
    return {
      id: pending ? tid(r.pendingNo) : tid(r.id),
      debitAccountId,
      creditAccountId,
      amount: r.amount,
      ledger: 'USD',
      code: 1,
      flags: {
        ...linked,
        ...(pending ? { pending: true } : {}),
        ...(r.kind === 'closing' ? { closingCredit: true } : {}),
        ...(r.kind === 'balancing' ? { balancingDebit: true } : {}),
      },
      ...(pending && r.timeoutSeconds > 0 ? { timeoutSeconds: r.timeoutSeconds } : {}),
    };
  });

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.array(transferArb, { minLength: 1, maxLength: 5 }).map((list) => ({ kind: 'transfers' as const, list })) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 2 }).map((seconds) => ({ kind: 'advance' as const, seconds })) },
);

const openAccounts: NewAccount[] = ACCOUNTS.map((id, i) => ({ id, ledger: 'USD', code: 1, ...(i === 3 ? { flags: { debitsMustNotExceedCredits: true } } : {}) }));

/** One step of the known history: its label, the checkpoint after it, and the live balances then. */
type HistoryStep = { label: string; at: Checkpoint; live: Map<string, AccountBalances> };

/**
 * The known history, on an emptied store and ledger: ten steps (13 events) of transfers plain,
 * pending, posted in part, closing, voided, expired, balancing and rejected, recording after
 * each the checkpoint and the live balances.
 */
async function knownHistory(): Promise<HistoryStep[]> {
  await reset();
  const clock = new ManualClock();
  const engine = new LedgerEngine({ pool: env.pool, clock: clock.now, events: env.store });
  const [a, b, c] = ACCOUNTS as [string, string, string];
  const steps: Array<{ label: string; run: () => Promise<unknown> }> = [
    { label: 'open', run: () => engine.createAccounts(openAccounts) },
    { label: 'fund', run: () => engine.createTransfers([{ id: tid(1), debitAccountId: a, creditAccountId: b, amount: 1000n, ledger: 'USD', code: 1 }]) },
    { label: 'reserve', run: () => engine.createTransfers([{ id: tid(2), debitAccountId: b, creditAccountId: c, amount: 300n, ledger: 'USD', code: 1, flags: { pending: true } }]) },
    { label: 'post part', run: () => engine.createTransfers([{ id: tid(3), pendingId: tid(2), amount: 120n, flags: { postPendingTransfer: true } }]) },
    { label: 'close c', run: () => engine.createTransfers([{ id: tid(4), debitAccountId: b, creditAccountId: c, amount: 5n, ledger: 'USD', code: 1, flags: { pending: true, closingCredit: true } }]) },
    { label: 'reopen c', run: () => engine.createTransfers([{ id: tid(5), pendingId: tid(4), flags: { voidPendingTransfer: true } }]) },
    { label: 'expiring', run: () => engine.createTransfers([{ id: tid(6), debitAccountId: a, creditAccountId: c, amount: 70n, ledger: 'USD', code: 1, flags: { pending: true }, timeoutSeconds: 1 }]) },
    { label: 'expire', run: async () => { clock.advanceSeconds(2); return engine.expirePendingTransfers(); } },
    { label: 'sweep b', run: () => engine.createTransfers([{ id: tid(7), debitAccountId: b, creditAccountId: a, amount: 10_000n, ledger: 'USD', code: 1, flags: { balancingDebit: true } }]) },
    { label: 'rejected', run: () => engine.createTransfers([{ id: tid(8), debitAccountId: b, creditAccountId: a, amount: 1n, ledger: 'USD', code: 1, flags: { balancingDebit: true } }]) },
  ];
  const history: HistoryStep[] = [];
  try {
    for (const step of steps) {
      await step.run();
      const accounts = await engine.getAccounts(ACCOUNTS);
      const live = new Map(accounts.map((x): [string, AccountBalances] => [x.id, {
        id: x.id, ledger: x.ledger, code: x.code, flags: (x.flags.debitsMustNotExceedCredits === true ? 2 : 0) | (x.flags.closed === true ? 32 : 0),
        debitsPending: x.debitsPending, debitsPosted: x.debitsPosted, creditsPending: x.creditsPending, creditsPosted: x.creditsPosted,
      }]));
      const last = await env.pool.query<{ p: string }>('SELECT max(position)::text AS p FROM events.events');
      const at = await env.store.checkpointAt(env.pool, BigInt(last.rows[0]!.p));
      history.push({ label: step.label, at: at!, live });
    }
  } finally {
    await engine.close();
  }
  return history;
}

/**
 * Tampers with the live books, so that reconciliation finds 4 differences: b's creditsPosted
 * and flags, an account no event opened, and one opened by an event but deleted.
 */
async function tamper(): Promise<void> {
  const [, b] = ACCOUNTS as [string, string];
  await env.pool.query('UPDATE ledger.accounts SET credits_posted = credits_posted + 7, flags = flags | 32 WHERE id = $1', [b]);
  await env.pool.query(`INSERT INTO ledger.accounts (id, ledger, code, flags, timestamp) VALUES ('00000000-0000-7000-8000-0000000000ff', 'USD', 1, 0, 999999)`);
  await env.pool.query(`DELETE FROM ledger.accounts WHERE id = $1`, [ACCOUNTS[3]]);
}

describe('ledger balances projection', () => {
  test('property: the incrementally built projection equals the replayed one, and both the live books', async () => {
    const seed = propertySeed('ledger projection replay');
    const numRuns = Number(process.env.FC_RUNS ?? 15);
    const typesSeen = new Map<string, number>();
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 3, maxLength: 14 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 2, max: 40 }), fc.constantFrom('set-based', 'set-based', 'in-memory', 'workers'), async (ops, tinyBatch, replayBatch, path) => {
        await reset();
        const clock = new ManualClock();
        const engine = new LedgerEngine({ pool: env.pool, clock: clock.now, events: env.store });
        try {
          await engine.createAccounts(openAccounts);
          await engine.createTransfers([{ id: tid(9), debitAccountId: ACCOUNTS[0]!, creditAccountId: ACCOUNTS[3]!, amount: 500n, ledger: 'USD', code: 1 }]);
          // One reservation that expires, in every run: the random operations reach an expiry
          // in most runs but not all (seed 362417265 reached none in 15), and the check of
          // event types below must not depend on the seed.
          await engine.createTransfers([{ id: tid(8), debitAccountId: ACCOUNTS[0]!, creditAccountId: ACCOUNTS[1]!, amount: 1n, ledger: 'USD', code: 1, flags: { pending: true }, timeoutSeconds: 1 }]);
          clock.advanceSeconds(2);
          await engine.expirePendingTransfers();
          // And one voided and one posted, for the same reason (seed 1957038733 voided none in 15
          // runs; posts were as rare).
          await engine.createTransfers([{ id: tid(7), debitAccountId: ACCOUNTS[0]!, creditAccountId: ACCOUNTS[1]!, amount: 1n, ledger: 'USD', code: 1, flags: { pending: true } }]);
          await engine.createTransfers([{ id: tid(6), pendingId: tid(7), flags: { voidPendingTransfer: true } }]);
          await engine.createTransfers([{ id: tid(5), debitAccountId: ACCOUNTS[0]!, creditAccountId: ACCOUNTS[1]!, amount: 1n, ledger: 'USD', code: 1, flags: { pending: true } }]);
          await engine.createTransfers([{ id: tid(4), pendingId: tid(5), flags: { postPendingTransfer: true } }]);
          // And one rejected: account 3's debits may not exceed its 500 of credits.
          const [rejected] = await engine.createTransfers([{ id: tid(3), debitAccountId: ACCOUNTS[3]!, creditAccountId: ACCOUNTS[1]!, amount: 100_000n, ledger: 'USD', code: 1 }]);
          assert.equal(rejected?.result, 'exceeds_credits');
          for (const op of ops) {
            if (op.kind === 'transfers') await engine.createTransfers(op.list);
            else {
              clock.advanceSeconds(op.seconds);
              await engine.expirePendingTransfers();
            }
            // Incrementally: whatever is readable now, a few events per transaction.
            for (let i = 0; i < 3; i += 1) {
              const r = await runBatch(env.pool, env.store, projection, { generation: 'active', batchSize: tinyBatch });
              if (!r.more) break;
            }
          }
        } finally {
          await engine.close();
        }
        await catchUp(tinyBatch);
        const incremental = await readProjectedBalances(env.pool);
        // Replayed, by one of the three paths: set-based in PostgreSQL; or pages folded in
        // memory (decoded here or by two worker threads) and flushed every few pages (so later
        // flushes start from what earlier ones wrote). Then swapped in.
        const replayed = await rebuild(env.pool, env.store, projection, {
          mode: 'blue-green',
          batchSize: replayBatch,
          flushEvery: replayBatch * 2,
          setBased: path === 'set-based',
          ...(path === 'workers' ? { workers: { count: 2, databaseUrl: env.db.url } } : {}),
        });
        assert.equal(replayed.mode, 'blue-green');
        assert.deepEqual(await readProjectedBalances(env.pool), incremental, 'replayed == incremental');
        const audit = await reconcileLedger(env.pool, { pageSize: 7 });
        assert.deepEqual(audit.differences, [], 'rebuilt == live');
        assert.equal(incremental.size, ACCOUNTS.length);
        const types = await env.pool.query<{ type: string; n: number }>('SELECT type, count(*)::int AS n FROM events.events GROUP BY type');
        for (const r of types.rows) typesSeen.set(r.type, (typesSeen.get(r.type) ?? 0) + r.n);
      }),
      { seed, numRuns, endOnFailure: true },
    );
    // The sequences must reach every kind of ledger event, or the equality proves little.
    console.log('[ledger projection] event types seen:', JSON.stringify(Object.fromEntries([...typesSeen].sort())));
    if (numRuns >= 15) assert.deepEqual([...typesSeen.keys()].sort(), Object.values(LedgerEventType).sort());
  });

  test('reconciliation and time travel on a known history', async () => {
    const [a, b, c] = ACCOUNTS as [string, string, string];
    const history = await knownHistory();
    assert.equal(history.find((h) => h.label === 'close c')!.live.get(c)!.flags & 32, 32, 'the closing transfer closed c');
    for (const h of history) {
      for (const id of [a, b, c]) {
        assert.deepEqual(await ledgerBalanceAt(env.pool, id, { checkpoint: h.at }), h.live.get(id), `${id} after ${h.label}`);
      }
    }
    assert.equal(await ledgerBalanceAt(env.pool, a, { time: new Date(0) }), null, 'no account before the first event');
    assert.deepEqual(await ledgerBalanceAt(env.pool, a, { time: new Date(Date.now() + 60_000) }), history.at(-1)!.live.get(a));

    const clean = await reconcileLedger(env.pool);
    assert.deepEqual({ ok: clean.ok, events: clean.events, live: clean.liveAccounts, rebuilt: clean.rebuiltAccounts }, { ok: true, events: 13, live: 4, rebuilt: 4 });
    // Tamper with the live books: each difference is reported with both values and the gap.
    await tamper();
    const bad = await reconcileLedger(env.pool, { differencesMax: 3 });
    assert.equal(bad.ok, false);
    assert.equal(bad.differencesTotal, 4);
    assert.deepEqual(bad.differences, [
      { accountId: b, kind: 'field', field: 'flags', live: '32', rebuilt: '0', difference: null },
      { accountId: b, kind: 'field', field: 'creditsPosted', live: String(history.at(-1)!.live.get(b)!.creditsPosted + 7n), rebuilt: String(history.at(-1)!.live.get(b)!.creditsPosted), difference: '7' },
      { accountId: '00000000-0000-7000-8000-0000000000ff', kind: 'missing_from_events' },
    ]);
    const out: string[] = [];
    const io = { env: { DATABASE_URL: env.db.url }, stdout: (t: string) => out.push(t), stderr: (t: string) => out.push(t) };
    assert.equal(await runCli(['reconcile-ledger'], io), 1);
    const text = out.join('\n');
    assert.match(text, /DIFFERENCES: 13 events replayed/);
    assert.match(text, new RegExp(`account ${b}: creditsPosted live \\d+, rebuilt \\d+ \\(live − rebuilt = 7\\)`));
    assert.match(text, new RegExp(`account ${ACCOUNTS[3]}: opened by an event but not in ledger.accounts`));
    assert.match(text, /in ledger.accounts but never opened by an event/);

    // balance-at through the CLI, at the checkpoint after the partial post.
    const posted = history.find((h) => h.label === 'post part')!;
    out.length = 0;
    assert.equal(await runCli(['balance-at', '--account', c, '--position', String(posted.at.position), '--json'], io), 0);
    assert.deepEqual(JSON.parse(out[0]!), { ...Object.fromEntries(Object.entries(posted.live.get(c)!).map(([k, v]) => [k, typeof v === 'bigint' ? v.toString() : v])) });
    assert.equal(await runCli(['balance-at', '--account', c, '--time', '1970-01-01T00:00:00Z'], io), 0);
    assert.match(out.at(-1)!, /did not exist then/);
    assert.equal(await runCli(['balance-at', '--account', c, '--time', 'yesterday'], io), 2);
    assert.equal(await runCli(['balance-at', '--account', c], io), 2);
    assert.equal(await runCli(['balance-at', '--position', '1'], io), 2);
  });

  test('an in-memory replay resumes from its last flush, and refuses a checkpoint moved under it', async () => {
    // Given the known history, and the live books tampered with (4 differences, which the replay
    // below must leave as they are),
    await knownHistory();
    await tamper();
    const all = await allEvents();
    const g = await createGeneration(env.pool, projection);
    const half = await replayInto(env.pool, env.store, projection, g, { batchSize: 2, until: checkpointOf(all[5]!) });
    assert.equal(half.events, 6);
    const rest = await replayInto(env.pool, env.store, projection, g, { batchSize: 3, flushEvery: 3 });
    assert.equal(rest.events, all.length - 6);
    await swapGeneration(env.pool, env.store, projection, g, { batchSize: 100 });
    assert.deepEqual((await reconcileLedger(env.pool)).differencesTotal, 4, 'the same 4 tampered differences as before, no new ones');
    const g2 = await createGeneration(env.pool, projection);
    const meddling = {
      ...projection,
      replay: async (db: Parameters<NonNullable<typeof projection.replay>>[0], t: Parameters<NonNullable<typeof projection.replay>>[1]) => {
        const inner = await projection.replay!(db, t);
        await runBatch(env.pool, env.store, projection, { generation: g2, batchSize: 1 }); // another writer moves the checkpoint
        return inner;
      },
    };
    await assert.rejects(replayInto(env.pool, env.store, meddling, g2, { batchSize: 5, setBased: false }), ReplayConflictError);
    await dropGeneration(env.pool, projection, g2);
    await assert.rejects(env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 1, fields: ['a b'] }), /not a field name/);
  });

  test('replay a range, rebuild in place and blue/green, and status, through the CLI', async () => {
    // The known history (13 events), built afresh; the read model is rebuilt from it.
    await knownHistory();
    const out: string[] = [];
    const io = { env: { DATABASE_URL: env.db.url }, stdout: (t: string) => out.push(t), stderr: (t: string) => out.push(t) };
    const all = await allEvents();
    assert.equal(all.length, 13);
    assert.equal(await runCli(['replay', '--from-position', String(all[0]!.position), '--to-position', String(all[4]!.position), '--keep', '--json'], io), 0);
    const kept = JSON.parse(out.at(-1)!) as { events: number; generation: number; kept: boolean };
    assert.deepEqual({ events: kept.events, kept: kept.kept }, { events: 5, kept: true });
    const g = await env.pool.query<{ n: number }>(`SELECT count(*)::int AS n FROM projections.ledger_balances_g${kept.generation}`);
    assert.equal(g.rows[0]!.n, 4, 'the range opened 4 accounts');
    assert.equal(await runCli(['replay', '--batch', '4'], io), 0);
    assert.match(out.at(-1)!, /^replayed 13 events into ledger_balances generation \d+ in [\d.]+ s: \d+ events\/s \(dropped\)$/);
    assert.equal(await runCli(['rebuild', '--in-place', '--json'], io), 0);
    assert.deepEqual((({ mode, events }) => ({ mode, events }))(JSON.parse(out.at(-1)!) as { mode: string; events: number }), { mode: 'in-place', events: 13 });
    assert.equal(await runCli(['rebuild', '--batch', '2', '--workers', '2'], io), 0);
    assert.match(out.at(-1)!, /^rebuilt ledger_balances \(blue-green\) as generation \d+: 13 events/);
    assert.equal(await runCli(['status'], io), 0);
    assert.match(out.at(-1)!, /ledger_balances: generation \d+, 13 events applied, checkpoint \d+\/\d+, 0 behind, lag 0.000 s/);
    const gens = await env.pool.query<{ generation: number; active: boolean }>('SELECT generation, active FROM events.projections ORDER BY generation');
    assert.deepEqual(gens.rows.map((r) => r.active), [false, true], 'the kept range generation and the active one; swapped-out ones are dropped');
    // The live runner through the CLI: empty the read model in place, run until caught up.
    const complete = await readProjectedBalances(env.pool);
    await env.pool.query(`TRUNCATE projections.ledger_balances_g${(await projectionLag(env.pool, projection.name))!.generation}, projections.ledger_reservations_g${(await projectionLag(env.pool, projection.name))!.generation}`);
    await env.pool.query(`UPDATE events.projections SET transaction_id = '0', position = 0 WHERE name = 'ledger_balances' AND active`);
    const caughtUp = (async () => {
      await waitFor('the CLI runner to catch up', async () => (await projectionLag(env.pool, projection.name))?.eventsBehind === 0);
    })();
    assert.equal(await runCli(['run', '--batch', '5'], { ...io, stopSignal: caughtUp }), 0);
    assert.equal((JSON.parse(out.at(-1)!) as { events: number }).events, 13);
    assert.deepEqual(await readProjectedBalances(env.pool), complete, 'the read model is complete again');
    assert.equal(await runCli(['status', '--database-url', `${env.db.url}_missing`], io), 2);
    assert.match(out.at(-1)!, /^failed: .*does not exist/);
    assert.equal(await runCli(['status', '--projection', 'nope'], io), 2);
    assert.equal(await runCli(['frobnicate'], io), 2);
    assert.equal(await runCli(['--help'], io), 0);
    assert.equal(await runCli(['replay', '--batch', '0'], io), 2);
    assert.equal(await runCli(['status', '--bogus'], io), 2);
    assert.equal(await runCli(['status'], { ...io, env: {} }), 2);
    assert.ok(checkpointOf(all[0]!).position > 0n);

    // Money moved on an account no event opened: both replay paths refuse rather than drop it.
    const orphan = '00000000-0000-7000-8000-0000000000ee';
    await env.pool.query('BEGIN');
    await env.store.appendMany(env.pool, [{ streamType: 'ledger.transfer', streamId: tid(99), version: 1, event: { type: LedgerEventType.transferPosted, data: { id: tid(99), debitAccountId: ACCOUNTS[0], creditAccountId: orphan, amount: '1' } } }]);
    await env.pool.query('COMMIT');
    assert.equal((await allEvents()).length, 14);
    await assert.rejects(rebuild(env.pool, env.store, projection, { mode: 'blue-green', batchSize: 100 }), new RegExp(`account ${orphan}, which was never opened`));
    await assert.rejects(rebuild(env.pool, env.store, projection, { mode: 'blue-green', batchSize: 100, setBased: false }), new RegExp(`account ${orphan} was never opened`));
  });

  test('the set-based replay refuses a history the fold refuses, and keeps nothing of it', async () => {
    const T = LedgerEventType;
    const [a, b] = [ACCOUNTS[0]!, ACCOUNTS[1]!];
    const opened = (id: string, streamId = id): StreamEvent => ({ streamType: 'ledger.account', streamId, version: 1, event: { type: T.accountOpened, data: { id, ledger: 'USD', code: 1, flags: {} } } });
    const transfer = (n: number, type: string, data: Record<string, unknown>): StreamEvent => ({
      streamType: 'ledger.transfer', streamId: tid(n), version: 1,
      event: { type, data: { id: tid(n), debitAccountId: a, creditAccountId: b, flags: {}, pendingId: null, ...data } },
    });
    const pending = transfer(1, T.transferPending, { amount: '10', flags: { pending: true } });
    const cases: Array<{ name: string; events: StreamEvent[]; setBased: RegExp; fold: RegExp }> = [
      { name: 'opened twice', events: [opened(a), opened(b), opened(a, `${a}-again`)], setBased: new RegExp(`account ${a} opened twice`), fold: /opened twice/ },
      {
        name: 'release of a reservation that never existed',
        events: [opened(a), opened(b), transfer(2, T.pendingTransferVoided, { pendingId: tid(7), amount: '10' })],
        setBased: new RegExp(`pending transfer ${tid(7)} is released but was never pending`),
        fold: /is not pending/,
      },
      {
        name: 'released twice',
        events: [opened(a), opened(b), pending, transfer(2, T.pendingTransferVoided, { pendingId: tid(1), amount: '10' }), transfer(3, T.pendingTransferPosted, { pendingId: tid(1), amount: '10' })],
        setBased: new RegExp(`pending transfer ${tid(1)} is released more than once`),
        fold: /is not pending/,
      },
      {
        name: 'posted above the reservation',
        events: [opened(a), opened(b), pending, transfer(2, T.pendingTransferPosted, { pendingId: tid(1), amount: '11' })],
        setBased: new RegExp(`pending transfer ${tid(1)} is posted above the amount reserved`),
        fold: /posts 11, more than the 10 reserved/,
      },
    ];
    for (const c of cases) {
      await reset();
      const before = await readProjectedBalances(env.pool);
      await env.pool.query('BEGIN');
      await env.store.appendMany(env.pool, c.events);
      await env.pool.query('COMMIT');
      await allEvents();
      await assert.rejects(rebuild(env.pool, env.store, projection, { mode: 'blue-green', batchSize: 100 }), c.setBased, c.name);
      await assert.rejects(rebuild(env.pool, env.store, projection, { mode: 'blue-green', batchSize: 100, setBased: false }), c.fold, c.name);
      assert.deepEqual(await readProjectedBalances(env.pool), before, `${c.name}: the active read model is untouched`);
    }
  });
});

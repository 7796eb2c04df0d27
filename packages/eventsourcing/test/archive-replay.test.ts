/**
 * Replays from the global order after retention: once retention has moved whole streams into
 * events.archived_events, rebuilding a projection from the first event (every replay path),
 * reconciling the ledger and reading the global order must still see every event exactly
 * once, in the order (transaction id, position), the archived ones merged with the hot ones.
 * The history is written by the real ledger engine, with other streams interleaved, and the
 * streams are archived by `applyRetention` itself.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ManualClock } from '@ledgerline/testing';
import { CHECKPOINT_START, StreamCorruptError, type StoredEvent } from '@ledgerline/events';
import { LedgerEngine, TRANSFER_STREAM, type NewAccount } from '@ledgerline/ledger';
import {
  applyRetention,
  ensureProjection,
  ledgerBalanceAt,
  ledgerBalancesProjection as projection,
  NO_LEGAL_HOLDS,
  projectionLag,
  readProjectedBalances,
  rebuild,
  reconcileLedger,
  runBatch,
  type AccountBalances,
  type Projection,
} from '../src/index.ts';
import { count, esTestEnv, inTx, passReaders, waitFor, type EsTestEnv } from './support.ts';

const ACCOUNTS = [1, 2, 3, 4].map((n) => `00000000-0000-7000-8000-00000000000${n}`);
const tid = (n: number): string => `30000000-0000-7000-8000-${String(n).padStart(12, '0')}`;
const T = { timeout: 120_000 };

let env: EsTestEnv;
/** Every event in the global order, read before anything was archived. */
let globalOrder: StoredEvent[];
/** The balances the projection held before anything was archived (equal to the live books). */
let balancesBefore: Map<string, AccountBalances>;
let ledgerEvents: number;

async function readEverything(limit: number): Promise<StoredEvent[]> {
  const all: StoredEvent[] = [];
  let afterCp = CHECKPOINT_START;
  for (;;) {
    const page = await env.store.readAll(env.pool, { after: afterCp, limit });
    all.push(...page);
    const last = page.at(-1);
    if (last === undefined || page.length < limit) return all;
    afterCp = { transactionId: last.transactionId, position: last.position };
  }
}

before(async () => {
  env = await esTestEnv({ ledger: true });
  await ensureProjection(env.pool, projection);
  const clock = new ManualClock();
  const engine = new LedgerEngine({ pool: env.pool, clock: clock.now, events: env.store });
  const [a, b, c, d] = ACCOUNTS as [string, string, string, string];
  const memo = (i: number): Promise<unknown> =>
    inTx(env.pool, (tx) => env.store.append(tx, { type: 'memo', id: `m-${i}` }, [{ type: 'memo.Noted', data: { i } }, { type: 'memo.Noted', data: { i, again: true } }], { expectedVersion: 'no_stream' }));
  try {
    const accounts: NewAccount[] = ACCOUNTS.map((id) => ({ id, ledger: 'USD', code: 1 }));
    await engine.createAccounts(accounts);
    // Twenty rounds of transfers (plain, reserved then posted in part or voided), each followed
    // by a memo stream of another type: the archived streams end up between hot ones.
    for (let i = 0; i < 20; i += 1) {
      const from = ACCOUNTS[i % 4]!;
      const to = ACCOUNTS[(i + 1) % 4]!;
      await engine.createTransfers([{ id: tid(100 + i), debitAccountId: a, creditAccountId: to === a ? b : to, amount: BigInt(1000 + i), ledger: 'USD', code: 1 }]);
      await engine.createTransfers([{ id: tid(200 + i), debitAccountId: from, creditAccountId: to, amount: BigInt(10 + i), ledger: 'USD', code: 1, flags: { pending: true } }]);
      await engine.createTransfers([
        i % 3 === 0
          ? { id: tid(300 + i), pendingId: tid(200 + i), flags: { voidPendingTransfer: true } }
          : { id: tid(300 + i), pendingId: tid(200 + i), amount: BigInt(5 + (i % 5)), flags: { postPendingTransfer: true } },
      ]);
      await memo(i);
    }
    // Still reserved at the end: open reservations must come out of the rebuild as well.
    await engine.createTransfers([{ id: tid(400), debitAccountId: c, creditAccountId: d, amount: 77n, ledger: 'USD', code: 1, flags: { pending: true } }]);
  } finally {
    await engine.close();
  }
  const total = await count(env.pool, 'SELECT count(*) FROM events.events');
  await waitFor('the horizon to pass every event', async () => (await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: total + 1 })).length === total);
  // The transfer streams of the first ten rounds and every other memo stream are made old
  // (before the global order is taken, which includes recorded_at).
  await env.pool.query(
    `UPDATE events.events SET recorded_at = now() - interval '40 days'
      WHERE (stream_type = $1 AND stream_id IN (SELECT unnest($2::text[])))
         OR (stream_type = 'memo' AND (data->>'i')::int % 2 = 0)`,
    [TRANSFER_STREAM, Array.from({ length: 10 }, (_, i) => [tid(100 + i), tid(200 + i), tid(300 + i)]).flat()],
  );
  globalOrder = await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: total + 1 });
  ledgerEvents = await count(env.pool, `SELECT count(*) FROM events.events WHERE stream_type LIKE 'ledger.%'`);
  await waitFor('the projection to catch up', async () => {
    await runBatch(env.pool, env.store, projection, { generation: 'active', batchSize: 50 });
    return (await projectionLag(env.pool, projection.name))?.eventsBehind === 0;
  });
  balancesBefore = await readProjectedBalances(env.pool);
  assert.equal((await reconcileLedger(env.pool)).ok, true, 'the projection built before archiving equals the live books');

  // Archive, through retention, once the relay and the projection have passed every event.
  await passReaders(env.pool);
  const report = await applyRetention(env.pool, {
    rules: [{ streamType: TRANSFER_STREAM, archiveAfterDays: 30 }, { streamType: 'memo', archiveAfterDays: 30 }],
    holds: NO_LEGAL_HOLDS,
    now: new Date(),
  });
  assert.equal(report.archived.length, 30 + 10, 'thirty transfer streams and ten memo streams archived');
  assert.ok(report.eventsArchived > 40);
  assert.equal(await count(env.pool, 'SELECT count(*) FROM events.archived_events'), report.eventsArchived);
  assert.equal(await count(env.pool, 'SELECT count(*) FROM events.events') + report.eventsArchived, total, 'moved, not copied');
});

after(async () => {
  await env.close();
});

/** The positions of events, in the order given. */
const positions = (events: readonly StoredEvent[]): string[] => events.map((e) => e.position.toString());

describe('replaying the global order after retention archived streams', () => {
  test('readAll reads archived events with the hot ones, each once, in the global order, page by page', T, async () => {
    const archived = new Set((await env.pool.query<{ p: string }>('SELECT position::text AS p FROM events.archived_events')).rows.map((r) => r.p));
    // Archived events lie between hot ones in the global order, not only at its start.
    const order = positions(globalOrder);
    const lastArchived = Math.max(...order.map((p, i) => (archived.has(p) ? i : -1)));
    const firstHotTransfer = globalOrder.findIndex((e) => e.streamType === TRANSFER_STREAM && !archived.has(e.position.toString()));
    assert.ok(firstHotTransfer >= 0 && firstHotTransfer < lastArchived, 'the archive and the hot table interleave');

    assert.deepEqual(await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: globalOrder.length + 10 }), globalOrder, 'one read: every event, as before');
    for (const limit of [1, 3, 7]) assert.deepEqual(await readEverything(limit), globalOrder, `pages of ${limit}`);
    // From a checkpoint in the middle of the archived part, and lean (the replays' read).
    const middle = globalOrder[Math.floor(lastArchived / 2)]!;
    const tail = await env.store.readAll(env.pool, { after: { transactionId: middle.transactionId, position: middle.position }, limit: 1000, fields: ['id', 'amount'] });
    assert.deepEqual(positions(tail), positions(globalOrder.slice(Math.floor(lastArchived / 2) + 1)));
    assert.deepEqual(tail.map((e) => e.data.amount ?? null), globalOrder.slice(Math.floor(lastArchived / 2) + 1).map((e) => (e.data.amount as string | undefined) ?? null));
  });

  test('the relay read (one partition) stays on the hot table: archived events were published already', T, async () => {
    const archived = new Set((await env.pool.query<{ p: string }>('SELECT position::text AS p FROM events.archived_events')).rows.map((r) => r.p));
    for (let partition = 0; partition < env.store.partitions; partition += 1) {
      const read = await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 1000, partition });
      assert.deepEqual(positions(read), positions(globalOrder.filter((e) => e.partition === partition && !archived.has(e.position.toString()))));
    }
  });

  for (const path of ['set-based', 'in-memory', 'workers', 'batch by batch'] as const) {
    test(`a rebuild (${path}) gives the balances the projection had before archiving`, T, async () => {
      // Batch by batch: the projection without its fast paths, through runBatch.
      const p: Projection = path === 'batch by batch' ? { ...projection, replay: undefined, replaySql: undefined } : projection;
      const report = await rebuild(env.pool, env.store, p, {
        mode: 'blue-green',
        batchSize: 9,
        flushEvery: 18,
        setBased: path === 'set-based',
        ...(path === 'workers' ? { workers: { count: 2, databaseUrl: env.db.url } } : {}),
      });
      assert.deepEqual(await readProjectedBalances(env.pool), balancesBefore);
      assert.equal(report.events, globalOrder.length, 'every event replayed once');
    });
  }

  test('reconcileLedger and time travel read the archived events too', T, async () => {
    const r = await reconcileLedger(env.pool, { pageSize: 4 });
    assert.deepEqual(r.differences, []);
    assert.equal(r.events, ledgerEvents);
    for (const id of ACCOUNTS) {
      assert.deepEqual(await ledgerBalanceAt(env.pool, id, { checkpoint: globalOrder.at(-1)! }), balancesBefore.get(id), `${id} as of the last event`);
      assert.deepEqual(await ledgerBalanceAt(env.pool, id, { time: new Date(Date.now() + 60_000) }), balancesBefore.get(id), `${id} as of now`);
    }
  });

  test('the checkpoint at an archived event is its place in the global order, as at a hot one', T, async () => {
    const r = await env.pool.query<{ position: string; t: string }>('SELECT position::text, transaction_id::text AS t FROM events.archived_events ORDER BY position LIMIT 1');
    const row = r.rows[0];
    assert.ok(row !== undefined, 'an archived event');
    assert.deepEqual(await env.store.checkpointAt(env.pool, BigInt(row.position)), { transactionId: BigInt(row.t), position: BigInt(row.position) });
    const hot = (await env.pool.query<{ position: string; t: string }>('SELECT position::text, transaction_id::text AS t FROM events.events ORDER BY position LIMIT 1')).rows[0];
    assert.ok(hot !== undefined);
    assert.deepEqual(await env.store.checkpointAt(env.pool, BigInt(hot.position)), { transactionId: BigInt(hot.t), position: BigInt(hot.position) });
    assert.equal(await env.store.checkpointAt(env.pool, 10n ** 15n), null);
  });

  test('an event held by both the hot table and the archive is refused, never applied twice', T, async () => {
    const hotTransfer = await env.pool.query<{ p: string }>(
      `SELECT position::text AS p FROM events.events WHERE stream_type = $1 AND type = 'ledger.TransferPosted' ORDER BY position LIMIT 1`,
      [TRANSFER_STREAM],
    );
    const planted = hotTransfer.rows[0]?.p;
    assert.ok(planted !== undefined);
    await env.pool.query('INSERT INTO events.archived_events SELECT *, now() FROM events.events WHERE position = $1', [planted]);
    try {
      const corrupt = (e: unknown): boolean => e instanceof StreamCorruptError && e.streamType === TRANSFER_STREAM;
      await assert.rejects(env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 1000 }), corrupt);
      await assert.rejects(readEverything(2), corrupt);
      for (const setBased of [true, false]) {
        await assert.rejects(rebuild(env.pool, env.store, projection, { mode: 'blue-green', batchSize: 50, setBased }), corrupt, `setBased: ${setBased}`);
      }
      await assert.rejects(reconcileLedger(env.pool, { pageSize: 50 }), corrupt);
      assert.deepEqual(await readProjectedBalances(env.pool), balancesBefore, 'the live generation is untouched');
    } finally {
      await env.pool.query('DELETE FROM events.archived_events WHERE position = $1', [planted]);
    }
    assert.deepEqual(await readEverything(50), globalOrder);
  });
});

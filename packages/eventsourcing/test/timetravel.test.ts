/**
 * Time travel by time when recorded_at (each transaction's start) does not follow the order
 * of the events: a transaction that began first commits the later event. The state as of a
 * time must still be a prefix of the history, never a later event without an earlier one.
 */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import type pg from 'pg';
import { AggregateStore, applyRetention, ledgerBalanceAt, NO_LEGAL_HOLDS, paymentAggregate } from '../src/index.ts';
import { esTestEnv, inTx, passReaders, type EsTestEnv } from './support.ts';

const acct = (n: number): string => `00000000-0000-7000-8000-${String(n).padStart(12, '0')}`;
const tid = (n: number): string => `20000000-0000-7000-8000-${String(n).padStart(12, '0')}`;

let env: EsTestEnv;
before(async () => { env = await esTestEnv(); });
after(async () => { await env.close(); });

/** Runs `second` in a transaction that begins before `first`'s and commits after it. */
async function interleaved(first: (c: pg.PoolClient) => Promise<unknown>, second: (c: pg.PoolClient) => Promise<unknown>): Promise<void> {
  const late = await env.pool.connect();
  try {
    await late.query('BEGIN');
    await late.query('SELECT now()'); // its recorded_at is fixed here
    await sleep(50);
    await inTx(env.pool, first);
    await second(late);
    await late.query('COMMIT');
  } catch (error) {
    await late.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    late.release();
  }
}

test('an aggregate as of a time between the late transaction\'s start and the early one\'s has neither version', async () => {
  const payments = new AggregateStore(env.store, paymentAggregate());
  await interleaved(
    (c) => payments.handle(c, 'p', { type: 'Initiate', amountMinor: 700n, currency: 'EUR', payer: 'a', payee: 'b', channel: 'card' }),
    (c) => payments.handle(c, 'p', { type: 'Authorize', authorizationCode: 'A' }),
  );
  const rows = (await env.pool.query<{ version: number; recorded_at: Date }>(`SELECT version, recorded_at FROM events.events WHERE stream_id = 'p' ORDER BY version`)).rows;
  assert.ok(rows[1]!.recorded_at < rows[0]!.recorded_at, 'version 2 was recorded before version 1');
  const between = await payments.load(env.pool, 'p', { asOf: { time: new Date(rows[1]!.recorded_at.getTime() + 1) } });
  assert.equal(between.version, 0);
  assert.equal(between.eventsFolded, 0);
  const later = await payments.load(env.pool, 'p', { asOf: { time: new Date(rows[0]!.recorded_at.getTime() + 1) } });
  assert.equal(later.version, 2);
  assert.equal(later.state.status, 'authorized');
  assert.equal(later.state.amountMinor, 700n);
});

test('an account\'s balance as of such a time is cut in the global order, not filtered by recorded_at', async () => {
  const [a, b] = [acct(1), acct(2)];
  for (const id of [a, b]) {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'ledger.account', id }, [{ type: 'ledger.AccountOpened', data: { id, ledger: 'USD', code: 1, flags: {} } }], { expectedVersion: 'no_stream' }));
  }
  const post = (id: string, amount: bigint) => (c: pg.PoolClient) => env.store.append(c, { type: 'ledger.transfer', id }, [{
    type: 'ledger.TransferPosted',
    data: { id, debitAccountId: a, creditAccountId: b, amount: amount.toString(), pendingId: null, ledger: 'USD', code: 1, flags: {} },
  }], { expectedVersion: 'no_stream' });
  await interleaved(post(tid(1), 5n), post(tid(2), 7n));
  const rows = (await env.pool.query<{ id: string; recorded_at: Date }>(
    `SELECT stream_id AS id, recorded_at FROM events.events WHERE stream_type = 'ledger.transfer' ORDER BY transaction_id, position`)).rows;
  assert.deepEqual(rows.map((r) => r.id), [tid(1), tid(2)]);
  assert.ok(rows[1]!.recorded_at < rows[0]!.recorded_at);
  // Between the two starts: the 7 (recorded earlier, committed later) must not appear without the 5.
  const between = await ledgerBalanceAt(env.pool, b, { time: new Date(rows[1]!.recorded_at.getTime() + 1) });
  assert.equal(between?.creditsPosted, 0n);
  const later = await ledgerBalanceAt(env.pool, b, { time: new Date(rows[0]!.recorded_at.getTime() + 1) });
  assert.equal(later?.creditsPosted, 12n);
});

test('an aggregate whose stream retention archived loads as of a time from the archive', async () => {
  const payments = new AggregateStore(env.store, paymentAggregate());
  const id = 'archived-p';
  await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Initiate', amountMinor: 900n, currency: 'EUR', payer: 'a', payee: 'b', channel: 'card' }));
  await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Authorize', authorizationCode: 'A' }));
  const midTime = (await env.pool.query<{ t: Date }>('SELECT clock_timestamp() AS t')).rows[0]!.t;
  await sleep(5);
  await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Capture', amountMinor: 900n }));
  await passReaders(env.pool);
  const report = await applyRetention(env.pool, {
    rules: [{ streamType: 'payment', archiveAfterDays: 30 }],
    holds: NO_LEGAL_HOLDS,
    now: new Date(Date.now() + 40 * 86_400_000),
  });
  assert.ok(report.archived.some((s) => s.streamId === id), 'the stream is in the archive');
  assert.equal((await env.pool.query(`SELECT 1 FROM events.events WHERE stream_id = $1`, [id])).rowCount, 0);
  // As of now, as of the time between the second and third events, and before the first.
  assert.deepEqual([(await payments.load(env.pool, id)).version, (await payments.load(env.pool, id)).state.status], [3, 'captured']);
  const mid = await payments.load(env.pool, id, { asOf: { time: midTime } });
  assert.deepEqual([mid.version, mid.state.status, mid.eventsFolded], [2, 'authorized', 2]);
  const before = await payments.load(env.pool, id, { asOf: { time: new Date(0) } });
  assert.deepEqual([before.version, before.eventsFolded], [0, 0]);
});

/**
 * Aggregates on the real event store: snapshots, optimistic concurrency, time travel, old
 * schema versions, and inline projections that commit or roll back with the append.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ConcurrencyError, type StoredEvent } from '@ledgerline/events';
import {
  AggregateStore,
  DomainRejection,
  ensureProjection,
  paymentAggregate,
  PAYMENT_STREAM,
  type PaymentCommand,
  type Projection,
} from '../src/index.ts';
import { count, esTestEnv, inTx, waitFor, type EsTestEnv } from './support.ts';

let env: EsTestEnv;
before(async () => {
  env = await esTestEnv();
});
after(async () => {
  await env.close();
});

/** A small read model of payments, kept inline: one row per payment with its captured total. */
const paymentTotals: Projection = {
  name: 'payment_totals',
  schema: 'projections',
  tables: ['payment_totals'],
  async create(db, t) {
    await db.query(`CREATE TABLE ${t.payment_totals} (payment_id text PRIMARY KEY, captured_minor bigint NOT NULL, events integer NOT NULL)`);
  },
  async apply(db, t, events: readonly StoredEvent[]) {
    const mine = events.filter((e) => e.streamType === PAYMENT_STREAM);
    await db.query(
      `INSERT INTO ${t.payment_totals} (payment_id, captured_minor, events)
       SELECT id, sum(amount), count(*) FROM unnest($1::text[], $2::bigint[]) AS x(id, amount) GROUP BY id
       ON CONFLICT (payment_id) DO UPDATE SET captured_minor = ${t.payment_totals}.captured_minor + EXCLUDED.captured_minor,
         events = ${t.payment_totals}.events + EXCLUDED.events`,
      [mine.map((e) => e.streamId), mine.map((e) => (e.type === 'payment.Captured' ? String(e.data.amountMinor) : '0'))],
    );
  },
};

const initiate: PaymentCommand = { type: 'Initiate', amountMinor: 100_000n, currency: 'EUR', payer: 'alice', payee: 'shop', channel: 'card' };

describe('aggregate store', () => {
  test('snapshots every N events: a load reads only the events after the snapshot', async () => {
    const payments = new AggregateStore(env.store, paymentAggregate({ snapshotEvery: 3 }));
    const id = 'snap-1';
    await inTx(env.pool, (c) => payments.handle(c, id, initiate));
    await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Authorize', authorizationCode: 'A' }));
    const third = await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Capture', amountMinor: 10n }));
    assert.equal(third.snapshotTaken, true, 'version 3 crosses a multiple of 3');
    for (let i = 0; i < 4; i += 1) await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Capture', amountMinor: 10n }));
    const loaded = await payments.load(env.pool, id);
    assert.deepEqual(
      { version: loaded.version, snapshotVersion: loaded.snapshotVersion, eventsFolded: loaded.eventsFolded, captured: loaded.state.capturedMinor },
      { version: 7, snapshotVersion: 6, eventsFolded: 1, captured: 50n },
    );
    const fromScratch = await new AggregateStore(env.store, { ...paymentAggregate(), snapshots: undefined }).load(env.pool, id);
    assert.deepEqual(fromScratch.state, loaded.state, 'the snapshot path and the full fold agree');
    assert.equal(fromScratch.snapshotVersion, null);
    // A snapshot of an older state shape is ignored, not decoded.
    const v2 = paymentAggregate({ snapshotEvery: 3 });
    const bumped = new AggregateStore(env.store, { ...v2, snapshots: { ...v2.snapshots!, stateVersion: 2 } });
    const ignored = await bumped.load(env.pool, id);
    assert.deepEqual({ snapshotVersion: ignored.snapshotVersion, eventsFolded: ignored.eventsFolded }, { snapshotVersion: null, eventsFolded: 7 });
    assert.throws(() => new AggregateStore(env.store, paymentAggregate({ snapshotEvery: 0 })), /snapshots.every/);
  });

  test('a rejected command writes nothing; a concurrent writer gets ConcurrencyError', async () => {
    const payments = new AggregateStore(env.store, paymentAggregate());
    const id = 'conc-1';
    await inTx(env.pool, (c) => payments.handle(c, id, initiate));
    await assert.rejects(inTx(env.pool, (c) => payments.handle(c, id, { type: 'Capture', amountMinor: 1n })), (e: unknown) => e instanceof DomainRejection && e.code === 'payment_not_authorized');
    assert.equal(await env.store.streamVersion(env.pool, PAYMENT_STREAM, id), 1);
    const a = await env.pool.connect();
    const b = await env.pool.connect();
    try {
      await a.query('BEGIN');
      await b.query('BEGIN');
      const bPid = (await b.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      await payments.handle(a, id, { type: 'Authorize', authorizationCode: 'A' });
      // b loads the stream before a commits (it sees version 1), then waits for the stream lock.
      // The expectation is attached at once: b can fail while a's COMMIT is still being answered,
      // and a rejection nobody handles yet would fail the test on its own.
      const racing = assert.rejects(payments.handle(b, id, { type: 'Fail', reason: 'declined' }), ConcurrencyError);
      await waitFor('b to wait for the stream lock', async () =>
        (await count(env.pool, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'`, [bPid])) === 1);
      await a.query('COMMIT');
      await racing;
      await b.query('ROLLBACK');
    } finally {
      a.release();
      b.release();
    }
    assert.equal((await payments.load(env.pool, id)).state.status, 'authorized');
    const retry = await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Refund', refundId: 'none', amountMinor: 1n }).catch((e: unknown) => e));
    assert.ok(retry instanceof DomainRejection);
  });

  test('time travel: the state as of a past checkpoint or time', async () => {
    const payments = new AggregateStore(env.store, paymentAggregate({ snapshotEvery: 2 }));
    const id = 'travel-1';
    await inTx(env.pool, (c) => payments.handle(c, id, initiate));
    await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Authorize', authorizationCode: 'A' }));
    const [authorizedAt] = await env.store.readStream(env.pool, PAYMENT_STREAM, id, 2);
    const midTime = (await env.pool.query<{ t: Date }>('SELECT clock_timestamp() AS t')).rows[0]!.t;
    await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Capture', amountMinor: 600n }));
    await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Refund', refundId: 'r', amountMinor: 600n }));
    const cp = await env.store.checkpointAt(env.pool, authorizedAt!.position);
    const atCheckpoint = await payments.load(env.pool, id, { asOf: { checkpoint: cp! } });
    assert.deepEqual({ status: atCheckpoint.state.status, version: atCheckpoint.version, snap: atCheckpoint.snapshotVersion }, { status: 'authorized', version: 2, snap: null });
    const atTime = await payments.load(env.pool, id, { asOf: { time: midTime } });
    assert.equal(atTime.state.status, 'authorized');
    const before = await payments.load(env.pool, id, { asOf: { time: new Date(0) } });
    assert.deepEqual({ status: before.state.status, version: before.version }, { status: 'none', version: 0 });
    assert.equal((await payments.load(env.pool, id)).state.status, 'refunded');
    assert.equal(await env.store.checkpointAt(env.pool, 10n ** 12n), null);
  });

  test('events written with an older schema version load through the upcaster', async () => {
    const id = 'old-1';
    await inTx(env.pool, (c) =>
      env.store.append(c, { type: PAYMENT_STREAM, id }, [
        { type: 'payment.Initiated', schemaVersion: 1, data: { amount: '900', currency: 'USD', payer: 'p', payee: 'q' } },
        { type: 'payment.Authorized', data: { authorizationCode: 'Z' } },
      ], { expectedVersion: 'no_stream' }),
    );
    const payments = new AggregateStore(env.store, paymentAggregate());
    const loaded = await payments.load(env.pool, id);
    assert.deepEqual({ status: loaded.state.status, amount: loaded.state.amountMinor, currency: loaded.state.currency }, { status: 'authorized', amount: 900n, currency: 'USD' });
    const next = await inTx(env.pool, (c) => payments.handle(c, id, { type: 'Capture', amountMinor: 900n }));
    assert.equal(next.version, 3);
    // A payment initiated now, beside the old one.
    await inTx(env.pool, (c) => payments.handle(c, 'new-1', initiate));
    const stored = await env.store.readStream(env.pool, PAYMENT_STREAM, 'new-1', 1);
    assert.equal(stored[0]?.schemaVersion, 2, 'new Initiated events are written as version 2');
  });

  test('inline projections commit and roll back with the append', async () => {
    await ensureProjection(env.pool, paymentTotals);
    await ensureProjection(env.pool, paymentTotals); // idempotent
    const payments = new AggregateStore(env.store, paymentAggregate(), { inline: [paymentTotals] });
    const id = 'inline-1';
    await inTx(env.pool, async (c) => {
      await payments.handle(c, id, initiate);
      await payments.handle(c, id, { type: 'Authorize', authorizationCode: 'A' });
      await payments.handle(c, id, { type: 'Capture', amountMinor: 250n });
    });
    await assert.rejects(
      inTx(env.pool, async (c) => {
        await payments.handle(c, id, { type: 'Capture', amountMinor: 100n });
        throw new Error('the caller fails after the append');
      }),
      /the caller fails/,
    );
    const row = await env.pool.query<{ captured_minor: string; events: number }>('SELECT captured_minor, events FROM projections.payment_totals WHERE payment_id = $1', [id]);
    assert.deepEqual(row.rows, [{ captured_minor: '250', events: 3 }]);
    assert.equal(await env.store.streamVersion(env.pool, PAYMENT_STREAM, id), 3);
    const missing = new AggregateStore(env.store, paymentAggregate(), { inline: [{ ...paymentTotals, name: 'never_created' }] });
    await assert.rejects(inTx(env.pool, (c) => missing.handle(c, 'inline-2', initiate)), /does not exist: call ensureProjection/);
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.events WHERE stream_id = 'inline-2'`), 0);
  });
});

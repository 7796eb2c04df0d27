/**
 * The event store, the relay and the consumer on real PostgreSQL and NATS JetStream.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';
import pg from 'pg';
import { behindFaultProxy, cutRepeatedly, testRandom } from '@ledgerline/testing';
import { guardPool } from '@ledgerline/service-runtime';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import {
  ConcurrencyError,
  CHECKPOINT_START,
  checkpointOf,
  encodeBatch,
  ensureEventStream,
  EventConsumer,
  OutboxRelay,
  outboxLagSeconds,
  runRelay,
  STREAM_ORDER_CONFLICT_SQLSTATE,
  StreamOrderConflictError,
  streamOrderConflict,
  STREAM_VERSION_CONFLICT_SQLSTATE,
  streamVersionConflict,
  TransactionRolledBackError,
  type StoredEvent,
  type StreamEvent,
} from '../src/index.ts';
import { suiteWithEffects, waitFor, NATS_URL, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
const { inTx, effectCounts } = suiteWithEffects((made) => (env = made));



const recordEffect = (consumer: string) => async (e: StoredEvent, tx: pg.PoolClient): Promise<void> => {
  await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, consumer]);
};

describe('the event store', () => {
  test('appends check the expected version; a conflict is typed and leaves the transaction usable', async () => {
    const stream = { type: 'order', id: 'o-1' };
    await inTx((c) => env.store.append(c, stream, [{ type: 'Placed', data: { total: '100' } }], { expectedVersion: 'no_stream' }));
    const r = await inTx((c) => env.store.append(c, stream, [{ type: 'Paid', data: {} }, { type: 'Shipped', data: {} }], { expectedVersion: 1 }));
    assert.equal(r.version, 3);
    await inTx(async (c) => {
      await assert.rejects(env.store.append(c, stream, [{ type: 'Paid', data: {} }], { expectedVersion: 1 }), (e: unknown) => {
        assert.ok(e instanceof ConcurrencyError);
        assert.equal(e.actual, 3);
        return true;
      });
      await assert.rejects(env.store.append(c, stream, [{ type: 'X', data: {} }], { expectedVersion: 'no_stream' }), ConcurrencyError);
      // The transaction is still usable after a conflict.
      await env.store.append(c, stream, [{ type: 'Delivered', data: {}, metadata: { correlationId: 'c-1', actor: 'svc:test' } }], { expectedVersion: 'any' });
    });
    await assert.rejects(inTx((c) => env.store.append(c, stream, [], { expectedVersion: 'any' })), RangeError);
    const events = await env.store.readStream(env.pool, 'order', 'o-1');
    assert.deepEqual(events.map((e) => [e.version, e.type]), [[1, 'Placed'], [2, 'Paid'], [3, 'Shipped'], [4, 'Delivered']]);
    assert.deepEqual(events[3]?.metadata, { correlationId: 'c-1', actor: 'svc:test' });
    assert.equal(await env.store.streamVersion(env.pool, 'order', 'o-missing'), 0);
    assert.ok(events.every((e) => e.partition === env.store.partitionOf('order', 'o-1')));
  });

  test('append refuses a transaction other than READ COMMITTED, clearly, and leaves it usable', async () => {
    const c = await env.pool.connect();
    try {
      await c.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await assert.rejects(
        env.store.append(c, { type: 'rr', id: 'r-1' }, [{ type: 'E', data: {} }], { expectedVersion: 'no_stream' }),
        (e: unknown) => e instanceof RangeError && /READ COMMITTED/.test(e.message) && /repeatable read/.test(e.message),
      );
      assert.equal((await c.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one, 1, 'the transaction goes on');
      await c.query('ROLLBACK');
    } finally {
      c.release();
    }
    assert.equal(await env.store.streamVersion(env.pool, 'rr', 'r-1'), 0);
  });

  test('inTransaction: a statement that failed and was swallowed makes COMMIT a rollback, and it throws', async () => {
    await env.pool.query('CREATE TABLE swallowed (n int)');
    await assert.rejects(
      inTx(async (c) => {
        await c.query('INSERT INTO swallowed VALUES (1)');
        await c.query('SELECT 1/0').catch(() => {});
      }),
      TransactionRolledBackError,
    );
    assert.equal((await env.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM swallowed')).rows[0]?.n, 0, 'nothing was committed');
  });

  test('two concurrent appends expecting the same version: exactly one wins', async () => {
    const stream = { type: 'race', id: 'r-1' };
    const attempt = () => inTx((c) => env.store.append(c, stream, [{ type: 'Won', data: {} }], { expectedVersion: 'no_stream' }));
    const outcomes = await Promise.allSettled([attempt(), attempt(), attempt()]);
    assert.equal(outcomes.filter((o) => o.status === 'fulfilled').length, 1);
    assert.ok(outcomes.filter((o) => o.status === 'rejected').every((o) => o.reason instanceof ConcurrencyError));
  });

  test('appendMany refuses to continue a stream from an older transaction, so per-stream order holds', async () => {
    const older = await env.pool.connect();
    try {
      await older.query('BEGIN');
      await older.query('SELECT pg_current_xact_id()'); // the older transaction gets its id first
      await inTx((c) => env.store.appendMany(c, [{ streamType: 'many', streamId: 'm-1', version: 1, event: { type: 'One', data: {} } }]));
      await assert.rejects(
        env.store.appendMany(older, [{ streamType: 'many', streamId: 'm-1', version: 2, event: { type: 'Two', data: {} } }]),
        StreamOrderConflictError,
      );
      await older.query('ROLLBACK');
    } finally {
      older.release();
    }
    // Retried in a new transaction, it goes through.
    await inTx((c) => env.store.appendMany(c, [{ streamType: 'many', streamId: 'm-1', version: 2, event: { type: 'Two', data: {} } }]));
    assert.deepEqual((await env.store.readStream(env.pool, 'many', 'm-1')).map((e) => e.type), ['One', 'Two']);
    // Further along a stream (the check reads its latest event only): an older transaction is
    // refused after two newer ones, through appendMany and through append alike.
    const oldest = await env.pool.connect();
    try {
      await oldest.query('BEGIN');
      await oldest.query('SELECT pg_current_xact_id()');
      await inTx((c) => env.store.appendMany(c, [{ streamType: 'many', streamId: 'm-1', version: 3, event: { type: 'Three', data: {} } }]));
      await inTx((c) => env.store.appendMany(c, [{ streamType: 'many', streamId: 'm-1', version: 4, event: { type: 'Four', data: {} } }]));
      await oldest.query('SAVEPOINT s');
      await assert.rejects(env.store.appendMany(oldest, [{ streamType: 'many', streamId: 'm-1', version: 5, event: { type: 'Five', data: {} } }]), StreamOrderConflictError);
      await oldest.query('ROLLBACK TO SAVEPOINT s');
      await assert.rejects(env.store.append(oldest, { type: 'many', id: 'm-1' }, [{ type: 'Five', data: {} }], { expectedVersion: 4 }), StreamOrderConflictError);
      await oldest.query('ROLLBACK');
    } finally {
      oldest.release();
    }
    assert.equal(await env.store.streamVersion(env.pool, 'many', 'm-1'), 4);
  });

  test('appendStatement: the append as constants stores what appendMany stores, and checks the same', async () => {
    // Text that a constant must carry whole: quotes, backslashes, escapes, dollar quotes, and
    // characters outside ASCII, in every column that takes text.
    const awkward = `it's \\ "q" \\u0041 $$ $q$ E'x' é 𝄞 \n`;
    const entries = (id: string) => [1, 2].map((version) => ({
      streamType: 'stmt',
      streamId: `${id}-${awkward}`,
      version,
      event: { type: `T${version}`, schemaVersion: version, data: { note: awkward, n: version, nested: { list: [awkward, null, 1.5] } }, metadata: { actor: awkward, ip: '127.0.0.1' } },
    }));
    await inTx((c) => env.store.appendMany(c, entries('many')));
    await inTx(async (c) => {
      const text = await env.store.appendStatement(c, entries('stmt'));
      assert.ok(text !== null);
      // Sent with the simple protocol, as the ledger sends it with its own statements.
      await c.query(text);
    });
    const read = async (id: string) =>
      (await env.store.readStream(env.pool, 'stmt', `${id}-${awkward}`)).map((e) => [e.version, e.type, e.schemaVersion, e.data, e.metadata, e.partition]);
    const many = await read('many');
    assert.equal(many.length, 2);
    assert.deepEqual(await read('stmt'), many.map((row) => [...row.slice(0, 5), env.store.partitionOf('stmt', `stmt-${awkward}`)]));
    assert.equal(await env.store.appendStatement(env.pool, []), null);
    // The same checks, in the statement: a stream continued from an older transaction is
    // refused when the statement runs (SQLSTATE LL409, the stream in DETAIL), nothing is
    // inserted, and streamOrderConflict turns the error back into the typed one.
    const older = await env.pool.connect();
    try {
      await older.query('BEGIN');
      await older.query('SELECT pg_current_xact_id()');
      await inTx((c) => env.store.appendMany(c, [{ streamType: 'stmt', streamId: 'order', version: 1, event: { type: 'One', data: {} } }]));
      const text = await env.store.appendStatement(older, [
        { streamType: 'stmt', streamId: 'order-new', version: 1, event: { type: 'New', data: {} } },
        { streamType: 'stmt', streamId: 'order', version: 2, event: { type: 'Two', data: {} } },
      ]);
      assert.ok(text !== null);
      const refused = await older.query(text).then(() => null, (error: unknown) => error);
      assert.equal((refused as { code?: string } | null)?.code, STREAM_ORDER_CONFLICT_SQLSTATE);
      const conflict = streamOrderConflict(refused);
      assert.ok(conflict instanceof StreamOrderConflictError);
      assert.deepEqual([conflict.streamType, conflict.streamId, conflict.actual], ['stmt', 'order', 1]);
      await older.query('ROLLBACK');
    } finally {
      older.release();
    }
    assert.deepEqual((await env.store.readStream(env.pool, 'stmt', 'order')).map((e) => e.type), ['One']);
    assert.equal(await env.store.streamVersion(env.pool, 'stmt', 'order-new'), 0);
    // Not every error is one: anything else passes through as it is.
    assert.equal(streamOrderConflict(new Error('other')), null);
    assert.equal(streamOrderConflict(Object.assign(new Error('unique'), { code: '23505' })), null);
  });

  test('versions an append gives must follow on: out of order in one call, a skipped version, or a stale one are refused, and readers see each stream in order', async () => {
    const at = (id: string, version: number, type = `V${version}`): StreamEvent => ({ streamType: 'vers', streamId: id, version, event: { type, data: {} } });
    await inTx((c) => env.store.appendMany(c, [at('a', 1), at('b', 1)]));
    // In one call, a stream's versions rise by one in the order given (positions follow it).
    await assert.rejects(inTx((c) => env.store.appendMany(c, [at('a', 3), at('a', 2)])), /vers\/a: version 2 follows version 3 in one append/);
    await assert.rejects(inTx((c) => env.store.appendMany(c, [at('a', 2), at('a', 4)])), /version 4 follows version 2/);
    // A first version that skips one is refused in the statement (LL412, ConcurrencyError),
    // and so is a stale one (the stream moved on), before the unique key would: nothing is inserted.
    const skipped = await inTx((c) => env.store.appendMany(c, [at('b', 2), at('a', 3)])).then(() => null, (error: unknown) => error);
    assert.ok(skipped instanceof ConcurrencyError, String(skipped));
    assert.deepEqual([skipped.streamType, skipped.streamId, skipped.expected, skipped.actual], ['vers', 'a', 2, 1]);
    assert.equal(((skipped as Error).cause as { code?: string }).code, STREAM_VERSION_CONFLICT_SQLSTATE);
    await inTx((c) => env.store.appendMany(c, [at('a', 2), at('a', 3), at('b', 2)]));
    const stale = await inTx((c) => env.store.appendMany(c, [at('a', 3, 'Again')])).then(() => null, (error: unknown) => error);
    assert.ok(stale instanceof ConcurrencyError && stale.expected === 2 && stale.actual === 3, String(stale));
    // appendStatement, the ledger's, carries the same check; the server's error maps the same way.
    const text = await env.store.appendStatement(env.pool, [at('b', 4)]);
    const refused = await env.pool.query(text!).then(() => null, (error: unknown) => error);
    assert.deepEqual([streamVersionConflict(refused)?.expected, streamVersionConflict(refused)?.actual], [3, 2]);
    assert.equal(streamVersionConflict(new Error('other')), null);
    // A stream whose events were all archived continues after its archived versions.
    const moved = await env.pool.query("WITH moved AS (DELETE FROM events.events WHERE stream_type = 'vers' AND stream_id = 'b' RETURNING *) INSERT INTO events.archived_events SELECT *, now() FROM moved");
    assert.equal(moved.rowCount, 2);
    await assert.rejects(inTx((c) => env.store.appendMany(c, [at('b', 2)])), ConcurrencyError);
    await inTx((c) => env.store.appendMany(c, [at('b', 3)]));
    for (const id of ['a', 'b']) {
      const all = (await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 10_000 })).filter((e) => e.streamType === 'vers' && e.streamId === id);
      assert.deepEqual(all.map((e) => e.version), [1, 2, 3]);
    }
  });

  test('the global order never skips a transaction that commits late', async () => {
    const slow = await env.pool.connect();
    try {
      // Catch up with everything committed so far. (A transaction of this database still
      // open, such as a pool connection's, may hold the horizon back for a moment, so wait
      // rather than stop at the first empty read.)
      const { rows } = await env.pool.query<{ max: string }>('SELECT coalesce(max(position), 0)::text AS max FROM events.events');
      const last = BigInt(rows[0]?.max ?? '0');
      let cp = CHECKPOINT_START;
      await waitFor('catch-up', async () => {
        for (const e of await env.store.readAll(env.pool, { after: cp, limit: 1000 })) cp = checkpointOf(e);
        return cp.position >= last;
      });
      // A slow transaction appends first and stays open; a fast one appends and commits.
      await slow.query('BEGIN');
      await env.store.append(slow, { type: 'slow', id: 's' }, [{ type: 'Slow', data: {} }], { expectedVersion: 'any' });
      await inTx((c) => env.store.append(c, { type: 'fast', id: 'f' }, [{ type: 'Fast', data: {} }], { expectedVersion: 'any' }));
      // The reader must not move past the open transaction: it sees nothing yet.
      assert.deepEqual(await env.store.readAll(env.pool, { after: cp, limit: 10 }), []);
      await slow.query('COMMIT');
      // Both appear, in transaction order. (Other databases' transactions on the same server
      // can hold the horizon for a moment, so read until both are there.)
      let seen: StoredEvent[] = [];
      await waitFor('both events', async () => {
        seen = await env.store.readAll(env.pool, { after: cp, limit: 10 });
        return seen.length >= 2;
      });
      assert.deepEqual(seen.map((e) => e.type), ['Slow', 'Fast']);
    } finally {
      slow.release();
    }
  });
});

describe('running a relay for a service', () => {
  test('with the broker unreachable it waits without failing the service, and stops promptly', async () => {
    const errors: unknown[] = [];
    const relay = runRelay({
      pool: env.pool, store: env.store, natsUrl: 'nats://127.0.0.1:1',
      streamName: env.streamName, subjectPrefix: env.subjectPrefix, onError: (e) => errors.push(e),
    });
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(relay.stats(), null, 'nothing is published while the broker is away');
    const started = Date.now();
    await relay.stop();
    assert.ok(Date.now() - started < 2000, 'stop does not wait for a broker that never came');
  });

  test('with the broker up it publishes what the service appends', async () => {
    const relay = runRelay({ pool: env.pool, store: env.store, natsUrl: NATS_URL, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
    try {
      await inTx((c) => env.store.append(c, { type: 'svc', id: 's-1' }, [{ type: 'Hello', data: {} }], { expectedVersion: 'no_stream' }));
      await waitFor('the relay to publish', () => Promise.resolve((relay.stats()?.published ?? 0) >= 1));
    } finally {
      await relay.stop();
    }
  });
});

describe('relay and consumer', () => {
  test('every appended event reaches the consumer exactly once, per-stream order kept', async () => {
    const consumerName = 'c-order';
    const seenOrder: Array<[string, number]> = [];
    const consumer = new EventConsumer({
      pool: env.pool,
      nats: env.nats,
      name: consumerName,
      streamName: env.streamName,
      filterSubject: `${env.subjectPrefix}.>`,
      onError: (e) => console.error('consumer', e),
      handler: async (e, tx) => {
        seenOrder.push([e.streamId, e.version]);
        await recordEffect(consumerName)(e, tx);
      },
    });
    const relay = new OutboxRelay({
      pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
      eventsPerMessageMax: 50, onError: (e) => console.error('relay', e),
    });
    await consumer.start();
    relay.start();
    try {
      const ids: string[] = [];
      for (let tx = 0; tx < 20; tx += 1) {
        await inTx(async (c) => {
          for (let s = 0; s < 5; s += 1) {
            const r = await env.store.append(c, { type: 'acct', id: `a-${s}` }, Array.from({ length: 10 }, (_, i) => ({ type: 'Moved', data: { i } })), { expectedVersion: 'any' });
            assert.equal(r.positions.length, 10);
          }
        });
      }
      const all = await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_type = 'acct'");
      ids.push(...all.rows.map((r) => r.id));
      assert.equal(ids.length, 1000);
      await waitFor('all effects', async () => {
        const counts = await effectCounts(consumerName);
        return ids.every((id) => counts.has(id));
      });
      const counts = await effectCounts(consumerName);
      assert.ok(ids.every((id) => counts.get(id) === 1), 'each event took effect exactly once');
      for (let s = 0; s < 5; s += 1) {
        const versions = seenOrder.filter(([id]) => id === `a-${s}`).map(([, v]) => v);
        assert.deepEqual(versions, Array.from({ length: 200 }, (_, i) => i + 1), `stream a-${s} in order`);
      }
      // The relay counts a round's messages once its checkpoint is written, which may come
      // after the consumer's commits: wait for it rather than race it.
      await waitFor('the relay to checkpoint every event', () => Promise.resolve(relay.stats().published >= ids.length));
      assert.ok(relay.stats().messages >= 20, 'events travel in batches of at most 50');
    } finally {
      await relay.stop();
      await consumer.stop();
    }
  });

  test("the consumer's database connections cut again and again: every event takes effect once, none is dead-lettered for it", async () => {
    // Given a consumer that gives an event up after two attempts, whose connections go through
    // a proxy that resets them every few milliseconds (a flapping network or pooler),
    const consumerName = 'c-cut';
    const { proxy, url } = await behindFaultProxy(env.db.url);
    // (Guarded as the services guard theirs: a client whose connection is cut between two
    // queries emits 'error', which would otherwise end the process.)
    const pool = guardPool(new pg.Pool({ connectionString: url, max: 4 }), () => {});
    const errors: unknown[] = [];
    const consumer = new EventConsumer({
      pool, nats: env.nats, name: consumerName, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
      dlqSubjectPrefix: env.dlqSubjectPrefix, maxDeliver: 2, backoffMs: [5, 10, 20],
      onError: (e) => errors.push(e),
      // One statement a message, as a set-based handler writes: a transaction of a statement an
      // event (messages of earlier tests carry 50) rarely fits between two cuts on a loaded
      // machine, and the run then only retries (it timed out in CI at 60 s).
      handleBatch: async (batch, tx) => {
        await tx.query('INSERT INTO effects (event_id, consumer) SELECT unnest($1::uuid[]), $2', [batch.map((e) => e.id), consumerName]);
      },
    });
    const relay = new OutboxRelay({
      pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
      eventsPerMessageMax: 10, onError: (e) => console.error('relay', e),
    });
    // (The cuts start once the consumer has registered.)
    await consumer.start();
    relay.start();
    const cutter = cutRepeatedly(proxy, 10, 15, testRandom('events consumer connection cuts'));
    try {
      // when events flow through it,
      const ids: string[] = [];
      for (let tx = 0; tx < 10; tx += 1) {
        await inTx(async (c) => {
          for (let s = 0; s < 4; s += 1) {
            await env.store.append(c, { type: 'cut', id: `k-${s}` }, Array.from({ length: 10 }, (_, i) => ({ type: 'Moved', data: { i } })), { expectedVersion: 'any' });
          }
        });
      }
      const appended = await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_type = 'cut'");
      ids.push(...appended.rows.map((r) => r.id));
      assert.equal(ids.length, 400);
      // (A dead letter ends the wait at once: the assertions below then say what went wrong.)
      await waitFor('all effects, or a dead letter', async () => {
        if (consumer.stats().deadLettered > 0) return true;
        const counts = await effectCounts(consumerName);
        return ids.every((id) => counts.has(id));
      }, 60_000);
      const cuts = await cutter.stop();
      // then each took effect exactly once, though many attempts failed on a cut connection,
      // and none was given up: a lost connection says nothing about an event.
      console.log(`[cut] connections cut=${cuts}, consumer failures=${errors.length}, retries=${consumer.stats().retries}, dead-lettered=${consumer.stats().deadLettered}`);
      assert.equal(consumer.stats().deadLettered, 0);
      const counts = await effectCounts(consumerName);
      assert.ok(ids.every((id) => counts.get(id) === 1), 'each event took effect exactly once');
      assert.ok(cuts > 0 && errors.length > 0, 'connections were cut under the consumer');
      const dead = await env.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM events.dead_letters WHERE consumer = $1', [consumerName]);
      assert.equal(dead.rows[0]?.n, 0);
    } finally {
      await cutter.stop();
      await relay.stop();
      await consumer.stop();
      await pool.end();
      await proxy.close();
    }
  });

  test('two relays at once: each partition has one publisher; when one stops, the other takes over', async () => {
    const consumerName = 'c-two-relays';
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: env.streamName,
      filterSubject: `${env.subjectPrefix}.>`, handler: recordEffect(consumerName),
    });
    const relayOptions = { pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, eventsPerMessageMax: 20 };
    const first = new OutboxRelay(relayOptions);
    const second = new OutboxRelay(relayOptions);
    await consumer.start();
    first.start();
    second.start();
    try {
      await waitFor('every partition held', () => Promise.resolve(first.stats().partitionsHeld.length + second.stats().partitionsHeld.length === env.store.partitions));
      const held = [...first.stats().partitionsHeld, ...second.stats().partitionsHeld].sort((a, b) => a - b);
      assert.deepEqual(held, Array.from({ length: env.store.partitions }, (_, i) => i), 'no partition has two publishers');
      const append = async (round: number): Promise<void> => {
        await inTx(async (c) => {
          for (let s = 0; s < 8; s += 1) {
            await env.store.append(c, { type: 'two', id: `r${round}-${s}` }, [{ type: 'E', data: { round } }], { expectedVersion: 'no_stream' });
          }
        });
      };
      for (let round = 0; round < 5; round += 1) await append(round);
      await first.stop();
      // The survivor takes the stopped relay's partitions and carries on.
      await waitFor('takeover', () => Promise.resolve(second.stats().partitionsHeld.length === env.store.partitions));
      for (let round = 5; round < 10; round += 1) await append(round);
      const ids = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_type = 'two'")).rows.map((r) => r.id);
      assert.equal(ids.length, 80);
      await waitFor('all effects', async () => {
        const counts = await effectCounts(consumerName);
        return ids.every((id) => counts.has(id));
      });
      const counts = await effectCounts(consumerName);
      assert.ok(ids.every((id) => counts.get(id) === 1), 'each event took effect exactly once');
      await waitFor('the outbox to drain', async () => (await outboxLagSeconds(env.pool)) === 0);
    } finally {
      await first.stop();
      await second.stop();
      await consumer.stop();
    }
  });

  /**
   * Appends `count` events to a stream of the calling test's own and publishes everything
   * unpublished with a relay of its own, so that a test does not lean on events an earlier
   * test left (each runs alone by name, too).
   */
  async function appendAndPublish(stream: { type: string; id: string }, count: number): Promise<StoredEvent[]> {
    await inTx((c) => env.store.append(c, stream, Array.from({ length: count }, (_, i) => ({ type: 'Moved', data: { i } })), { expectedVersion: 'any' }));
    const relay = new OutboxRelay({
      pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
      eventsPerMessageMax: 50, onError: (e) => console.error('relay', e),
    });
    relay.start();
    try {
      await waitFor('the outbox to drain', async () => (await outboxLagSeconds(env.pool)) === 0);
    } finally {
      await relay.stop();
    }
    return env.store.readStream(env.pool, stream.type, stream.id);
  }

  /** Resolves once `consumer` has acknowledged every message of the stream up to `seq`. */
  async function consumedThrough(consumer: string, seq: number): Promise<void> {
    const jsm = await jetstreamManager(env.nats);
    await waitFor(`${consumer} to acknowledge through stream sequence ${seq}`, async () => (await jsm.consumers.info(env.streamName, consumer)).ack_floor.stream_seq >= seq);
  }

  test('the same batch published twice: the broker drops the copy; a re-cut batch is dropped by the inbox', async () => {
    const events = await appendAndPublish({ type: 'dup', id: 'd-0' }, 20);
    assert.equal(events.length, 20);
    const consumerName = 'c-dup';
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: env.streamName,
      filterSubject: `${env.subjectPrefix}.>`, handler: recordEffect(consumerName),
    });
    await consumer.start();
    try {
      const js = jetstream(env.nats);
      const subject = `${env.subjectPrefix}.p${events[0]?.partition}`;
      // Everything the stream holds so far, these 20 events among it, taken in once.
      const published = (await (await jetstreamManager(env.nats)).streams.info(env.streamName)).state.last_seq;
      await consumedThrough(consumerName, published);
      const ids = events.map((e) => e.id);
      const before = await effectCounts(consumerName);
      assert.ok(ids.every((id) => before.get(id) === 1), 'each event took effect once before the copies');
      const skippedBefore = consumer.stats().duplicatesSkipped;

      const first = await js.publish(subject, encodeBatch(events.slice(0, 10)), { msgID: 'dup-test-1' });
      const again = await js.publish(subject, encodeBatch(events.slice(0, 10)), { msgID: 'dup-test-1' });
      assert.equal(first.duplicate, false);
      assert.equal(again.duplicate, true, 'the broker drops a republished message id');
      const recut = await js.publish(subject, encodeBatch(events.slice(5, 20)), { msgID: 'dup-test-2' });
      await consumedThrough(consumerName, recut.seq);
      assert.equal(consumer.stats().duplicatesSkipped - skippedBefore, 25, 'the inbox dropped the 10 + 15 copies');
      const after = await effectCounts(consumerName);
      assert.ok(ids.every((id) => after.get(id) === 1), 'no effect applied twice');
    } finally {
      await consumer.stop();
    }
  });

  test('a message that carries one new event twice applies it once', async () => {
    // The relay never writes such a message; any publisher on the subject could.
    const consumerName = 'c-twice';
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: env.streamName,
      filterSubject: `${env.subjectPrefix}.>`, handler: recordEffect(consumerName),
    });
    await consumer.start();
    try {
      const event: StoredEvent = {
        position: 9_000_000n, transactionId: 1n, partition: 0, id: randomUUID(), streamType: 'twice', streamId: 't-1', version: 1,
        type: 'Happened', schemaVersion: 1, data: {}, metadata: {}, recordedAt: new Date(),
      };
      const copy: StoredEvent = { ...event };
      const sent = await jetstream(env.nats).publish(`${env.subjectPrefix}.p0`, encodeBatch([event, copy, event]), { msgID: `twice-${event.id}` });
      await consumedThrough(consumerName, sent.seq);
      assert.equal((await effectCounts(consumerName)).get(event.id), 1, 'one effect, however often the message names the event');
    } finally {
      await consumer.stop();
    }
  });

  test('past its deliveries, an event whose last try met only a database failure is tried again after a stop, not dead-lettered', async () => {
    // Given a consumer that gives a message up after one delivery, whose handler's session is
    // terminated (57P01, as in a failover) while `failing` is set, and that is stopped while it
    // waits to retry: the broker's next delivery is past maxDeliver, where each event is
    // recorded as a dead letter before its try, so that a handler that kills the process is
    // found dead. A database failure is no such verdict.
    const consumerName = 'c-last-try';
    const pool = guardPool(new pg.Pool({ connectionString: env.db.url, max: 4 }), () => {});
    let failing = true;
    let tries = 0;
    const consumerNow = (): EventConsumer =>
      new EventConsumer({
        pool, nats: env.nats, name: consumerName, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
        dlqSubjectPrefix: env.dlqSubjectPrefix, maxDeliver: 1, backoffMs: [60_000], onError: () => {},
        handler: async (e: StoredEvent, tx: pg.PoolClient) => {
          if (e.streamType !== 'last-try') return;
          tries += 1;
          if (failing) await tx.query('SELECT pg_terminate_backend(pg_backend_pid())');
          await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, consumerName]);
        },
      });
    const relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
    relay.start();
    try {
      await inTx((c) => env.store.append(c, { type: 'last-try', id: 'l-1' }, [{ type: 'Happened', data: {} }], { expectedVersion: 'no_stream' }));
      const id = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_type = 'last-try'")).rows[0]?.id as string;
      // Delivery 1 (the whole message) and delivery 2 (past maxDeliver: the event alone, its
      // record first) each meet the failure; each time the consumer is stopped while it waits.
      for (const delivery of [1, 2]) {
        const consumer = consumerNow();
        await consumer.start();
        await waitFor(`try ${delivery}`, () => Promise.resolve(tries >= delivery));
        await consumer.stop();
      }
      failing = false;
      const consumer = consumerNow();
      await consumer.start();
      try {
        await waitFor('the event to take effect', async () => (await effectCounts(consumerName)).get(id) === 1);
        assert.equal(tries, 3, 'tried on the third delivery');
        // The stream also holds the earlier tests' messages, handed back by the same stops: each
        // is past maxDeliver too, and each event of theirs has a dead-letter record while its own
        // try runs. Read the records once every message is acknowledged, not while one is in hand.
        const jsm = await jetstreamManager(env.nats);
        await consumedThrough(consumerName, (await jsm.streams.info(env.streamName)).state.last_seq);
        const dead = await env.pool.query('SELECT event_id::text AS id, error FROM events.dead_letters WHERE consumer = $1', [consumerName]);
        assert.deepEqual(dead.rows, [], 'nothing dead-lettered');
      } finally {
        await consumer.stop();
      }
    } finally {
      await relay.stop();
      await pool.end();
    }
  });

  test('an onError hook that throws changes nothing: the failed event is retried and applied once, and its lane goes on', async () => {
    const consumerName = 'c-loud';
    let failuresLeft = 1;
    let reported = 0;
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
      dlqSubjectPrefix: env.dlqSubjectPrefix, maxDeliver: 3, backoffMs: [5],
      onError: () => {
        reported += 1;
        throw new Error('the hook itself fails');
      },
      handler: async (e: StoredEvent, tx: pg.PoolClient) => {
        if (e.streamType === 'loud' && e.version === 1 && failuresLeft > 0) {
          failuresLeft -= 1;
          throw new Error('first try fails');
        }
        await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, consumerName]);
      },
    });
    const relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
    relay.start();
    await consumer.start();
    try {
      await inTx((c) => env.store.append(c, { type: 'loud', id: 'l-1' }, [{ type: 'Happened', data: {} }], { expectedVersion: 'no_stream' }));
      await inTx((c) => env.store.append(c, { type: 'loud', id: 'l-1' }, [{ type: 'Happened', data: {} }], { expectedVersion: 1 }));
      const ids = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_type = 'loud' ORDER BY version")).rows.map((r) => r.id);
      await waitFor('both events to take effect', async () => {
        const counts = await effectCounts(consumerName);
        return ids.every((id) => counts.get(id) === 1);
      });
      assert.ok(reported >= 1, 'the failure was reported');
      assert.deepEqual((await env.pool.query('SELECT 1 FROM events.dead_letters WHERE consumer = $1', [consumerName])).rows, []);
    } finally {
      await consumer.stop();
      await relay.stop();
    }
  });

  test('a message that is not a batch is recorded, goes to the dead-letter stream as it came, and is acknowledged', async () => {
    // On an event stream of its own: every consumer reads its stream from the start, and
    // garbage left on the shared one would reach the later tests' consumers too.
    const streamName = `${env.streamName}_G`;
    const subjectPrefix = `${env.subjectPrefix}g`;
    await ensureEventStream(env.nats, streamName, subjectPrefix);
    const jsm = await jetstreamManager(env.nats);
    const consumerName = 'c-garbage';
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName,
      filterSubject: `${subjectPrefix}.>`, dlqSubjectPrefix: env.dlqSubjectPrefix, handler: recordEffect(consumerName),
    });
    await consumer.start();
    try {
      // Given a message on an event subject that does not decode, and a good batch behind it,
      const js = jetstream(env.nats);
      const subject = `${subjectPrefix}.p0`;
      const garbage = await js.publish(subject, 'not a batch', { msgID: 'garbage-consumer-1' });
      const events = await inTx(async (c) => {
        await env.store.append(c, { type: 'after-garbage', id: 'g-0' }, Array.from({ length: 5 }, (_, i) => ({ type: 'Moved', data: { i } })), { expectedVersion: 'no_stream' });
        return env.store.readStream(c, 'after-garbage', 'g-0');
      });
      const good = await js.publish(subject, encodeBatch(events), { msgID: 'after-garbage-1' });
      // then the consumer acknowledges both, the garbage included (its ack floor passes it),
      const jsmInfo = async () => jsm.consumers.info(streamName, consumerName);
      await waitFor('the ack floor to pass both', async () => (await jsmInfo()).ack_floor.stream_seq >= good.seq);
      assert.equal((await jsmInfo()).num_ack_pending, 0, 'nothing left pending');
      assert.equal(consumer.stats().undecodable, 1);
      const counts = await effectCounts(consumerName);
      assert.ok(events.every((e) => counts.get(e.id) === 1), 'the batch behind it took effect');
      // and the dead-letter stream holds its bytes, where they came from and why.
      const dead = await jsm.streams.getMessage(env.dlqStreamName, { last_by_subj: `${env.dlqSubjectPrefix}.${consumerName}` });
      assert.ok(dead !== null);
      assert.equal(dead.string(), 'not a batch');
      assert.equal(dead.header.get('Ledgerline-Source-Subject'), subject);
      assert.equal(dead.header.get('Ledgerline-Source-Sequence'), String(garbage.seq));
      assert.match(dead.header.get('Ledgerline-Error'), /^undecodable: /);
      // and events.undecodable_messages records it where the operator looks (events:dlq).
      const recorded = await env.pool.query<{ stream_sequence: string; subject: string; size: number; head: Buffer; error: string }>(
        'SELECT stream_sequence::text, subject, size, head, error FROM events.undecodable_messages WHERE consumer = $1', [consumerName],
      );
      assert.deepEqual(recorded.rows.map((r) => [r.stream_sequence, r.subject, r.size, r.head.toString()]), [[String(garbage.seq), subject, 11, 'not a batch']]);
      assert.match(recorded.rows[0]?.error ?? '', /^undecodable: /);
    } finally {
      await consumer.stop();
      await jsm.streams.delete(streamName).catch(() => false);
    }
  });

  /** A JetStream event stream of the test's own, so that what it publishes reaches no other test's consumer. */
  async function ownStream(tag: string): Promise<{ streamName: string; subjectPrefix: string; drop: () => Promise<void> }> {
    const streamName = `${env.streamName}_${tag.toUpperCase()}`;
    const subjectPrefix = `${env.subjectPrefix}${tag}`;
    await ensureEventStream(env.nats, streamName, subjectPrefix);
    return { streamName, subjectPrefix, drop: async () => { await (await jetstreamManager(env.nats)).streams.delete(streamName).catch(() => false); } };
  }

  test('a batch whose event id is not a UUID is undecodable: recorded once, and the partition goes on', async () => {
    const own = await ownStream('badid');
    const consumerName = 'c-badid';
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: own.streamName, maxDeliver: 2, backoffMs: [10],
      filterSubject: `${own.subjectPrefix}.>`, dlqSubjectPrefix: env.dlqSubjectPrefix, handler: recordEffect(consumerName),
    });
    await consumer.start();
    try {
      const events = await inTx(async (c) => {
        await env.store.append(c, { type: 'badid', id: 'b-0' }, Array.from({ length: 3 }, (_, i) => ({ type: 'Moved', data: { i } })), { expectedVersion: 'no_stream' });
        return env.store.readStream(c, 'badid', 'b-0');
      });
      const js = jetstream(env.nats);
      const subject = `${own.subjectPrefix}.p0`;
      const first = events[0] as StoredEvent;
      await js.publish(subject, encodeBatch([{ ...first, id: 'not-a-uuid' }]), { msgID: 'badid-1' });
      await js.publish(subject, encodeBatch([{ ...first, position: 2n ** 63n }]), { msgID: 'badid-2' });
      const good = await js.publish(subject, encodeBatch(events), { msgID: 'badid-3' });
      const jsm = await jetstreamManager(env.nats);
      await waitFor('the ack floor to pass all three', async () => (await jsm.consumers.info(own.streamName, consumerName)).ack_floor.stream_seq >= good.seq);
      assert.equal(consumer.stats().undecodable, 2);
      const recorded = await env.pool.query<{ error: string }>('SELECT error FROM events.undecodable_messages WHERE consumer = $1 ORDER BY stream_sequence', [consumerName]);
      assert.deepEqual(recorded.rows.map((r) => r.error), ['undecodable: event batch holds an event id that is not a UUID', 'undecodable: event batch holds a position out of range']);
      const counts = await effectCounts(consumerName);
      assert.ok(events.every((e) => counts.get(e.id) === 1), 'the good batch behind them took effect once');
    } finally {
      await consumer.stop();
      await own.drop();
    }
  });

  test('a handler that swallows a failed statement does not get its event acked as handled: it is retried, then dead-lettered', async () => {
    const own = await ownStream('swallow');
    const consumerName = 'c-swallow';
    let tries = 0;
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: own.streamName, maxDeliver: 2, backoffMs: [10],
      filterSubject: `${own.subjectPrefix}.>`, dlqSubjectPrefix: env.dlqSubjectPrefix,
      handler: async (e, tx) => {
        await recordEffect(consumerName)(e, tx);
        if (e.type === 'Swallow') {
          tries += 1;
          // An optional side effect whose failure the handler means to tolerate: it aborts the transaction.
          await tx.query('INSERT INTO no_such_table VALUES (1)').catch(() => {});
        }
      },
    });
    await consumer.start();
    try {
      const events = await inTx(async (c) => {
        await env.store.append(c, { type: 'swallow', id: 's-0' }, [{ type: 'Fine', data: {} }, { type: 'Swallow', data: {} }, { type: 'Fine', data: {} }], { expectedVersion: 'no_stream' });
        return env.store.readStream(c, 'swallow', 's-0');
      });
      const good = await jetstream(env.nats).publish(`${own.subjectPrefix}.p0`, encodeBatch(events), { msgID: 'swallow-1' });
      const jsm = await jetstreamManager(env.nats);
      await waitFor('the ack floor to pass the message', async () => (await jsm.consumers.info(own.streamName, consumerName)).ack_floor.stream_seq >= good.seq);
      const dead = await env.pool.query<{ event_id: string; error: string }>('SELECT event_id::text, error FROM events.dead_letters WHERE consumer = $1', [consumerName]);
      const swallowed = events[1] as StoredEvent;
      assert.deepEqual(dead.rows.map((r) => r.event_id), [swallowed.id], 'the swallowing event is a dead letter');
      assert.match(dead.rows[0]?.error ?? '', /COMMIT rolled back/);
      assert.ok(tries >= 2, `tried ${tries} times`);
      const counts = await effectCounts(consumerName);
      assert.equal(counts.get(swallowed.id), undefined, 'its effect was rolled back, and nothing says otherwise');
      assert.equal(counts.get((events[0] as StoredEvent).id), 1);
      assert.equal(counts.get((events[2] as StoredEvent).id), 1);
      const inbox = await env.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM events.inbox WHERE consumer = $1 AND event_id = $2', [consumerName, swallowed.id]);
      assert.equal(inbox.rows[0]?.n, 0, 'not in the inbox: a replay will apply it');
    } finally {
      await consumer.stop();
      await own.drop();
    }
  });

  test('a batch handler gets every new event of a message at once, for set-based effects', async () => {
    assert.throws(() => new EventConsumer({ pool: env.pool, nats: env.nats, name: 'c-none', streamName: env.streamName, filterSubject: 'x.>' }), TypeError);
    const events = await appendAndPublish({ type: 'set', id: 's-0' }, 40);
    const consumerName = 'c-batch';
    const calls: number[] = [];
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: env.streamName,
      filterSubject: `${env.subjectPrefix}.>`,
      handleBatch: async (batch, tx) => {
        calls.push(batch.length);
        await tx.query('INSERT INTO effects (event_id, consumer) SELECT unnest($1::uuid[]), $2', [batch.map((e) => e.id), consumerName]);
      },
    });
    await consumer.start();
    try {
      const published = (await (await jetstreamManager(env.nats)).streams.info(env.streamName)).state.last_seq;
      await consumedThrough(consumerName, published);
      const counts = await effectCounts(consumerName);
      assert.ok(events.every((e) => counts.get(e.id) === 1), "this test's events took effect once each");
      assert.ok([...counts.values()].every((n) => n === 1), 'each event took effect once');
      assert.ok(calls.some((n) => n > 1), 'a call carries many events');
    } finally {
      await consumer.stop();
    }
  });

  test('a poisoned event is retried with backoff, then dead-lettered; the rest of its batch commits', async () => {
    const consumerName = 'c-dlq';
    const poisoned = await inTx((c) => env.store.append(c, { type: 'dlq', id: 'd-1' }, [
      { type: 'Fine', data: {} },
      { type: 'Poison', data: {} },
      { type: 'Fine', data: {} },
    ], { expectedVersion: 'no_stream' }));
    assert.equal(poisoned.version, 3);
    let attempts = 0;
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name: consumerName, streamName: env.streamName,
      filterSubject: `${env.subjectPrefix}.>`, maxDeliver: 3, backoffMs: [20, 40],
      dlqSubjectPrefix: env.dlqSubjectPrefix,
      handler: async (e, tx) => {
        if (e.type === 'Poison') {
          attempts += 1;
          throw new Error('cannot handle Poison');
        }
        await recordEffect(consumerName)(e, tx);
      },
    });
    const relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
    await consumer.start();
    relay.start();
    try {
      await waitFor('the dead letter', async () => (await env.pool.query("SELECT 1 FROM events.dead_letters WHERE consumer = 'c-dlq'")).rowCount === 1);
      const dl = await env.pool.query<{ attempts: number; error: string }>("SELECT attempts, error FROM events.dead_letters WHERE consumer = 'c-dlq'");
      assert.equal(dl.rows[0]?.attempts, 3);
      assert.match(dl.rows[0]?.error ?? '', /cannot handle Poison/);
      assert.ok(attempts >= 3);
      // The events after the poisoned one are applied after its dead letter is recorded (and
      // published), so wait for them rather than count at once.
      const fine = async (): Promise<number> => (await env.pool.query<{ n: number }>(
        "SELECT count(*)::int AS n FROM effects f JOIN events.events e ON e.event_id = f.event_id WHERE f.consumer = 'c-dlq' AND e.stream_type = 'dlq'",
      )).rows[0]?.n ?? 0;
      await waitFor('the good events of the batch', async () => (await fine()) >= 2);
      assert.equal(await fine(), 2, 'the two good events of the batch took effect');
      const jsm = await jetstreamManager(env.nats);
      // This consumer's subject only: other tests dead-letter to the same stream.
      const dlqSubject = `${env.dlqSubjectPrefix}.c-dlq`;
      const info = await jsm.streams.info(env.dlqStreamName, { subjects_filter: dlqSubject });
      assert.equal(info.state.subjects?.[dlqSubject], 1, 'the dead letter is on the dead-letter stream');
    } finally {
      await relay.stop();
      await consumer.stop();
    }
  });
});

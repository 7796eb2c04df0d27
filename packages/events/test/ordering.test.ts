/**
 * Consumer order under retries, on real PostgreSQL and NATS JetStream. A consumer handles
 * partitions (subjects) in parallel and each one sequentially; a message that fails is retried
 * in place while its partition waits, so no later event of the same stream takes effect first.
 *
 * Every handler records its effect with a sequence number (bigserial) in the inbox
 * transaction, so `seq` is the commit order of the effects.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type pg from 'pg';
import { EventConsumer, OutboxRelay, type ConsumerOptions, type StoredEvent } from '../src/index.ts';
import { eventsTestEnv, inTx, waitFor, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
let relay: OutboxRelay;

before(async () => {
  env = await eventsTestEnv();
  await env.pool.query(
    'CREATE TABLE effects (seq bigserial NOT NULL, consumer text NOT NULL, event_id uuid NOT NULL, stream_id text NOT NULL, version int NOT NULL)',
  );
  // Small messages, so that each stream spans several of them.
  relay = new OutboxRelay({
    pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, eventsPerMessageMax: 5,
  });
  relay.start();
});

after(async () => {
  await relay.stop();
  await env.close();
});

/** Two stream ids of `type` that live in different partitions, hence on different subjects. */
function streamsInTwoPartitions(type: string): [string, string] {
  const first = `${type}-0`;
  for (let i = 1; i < 100; i += 1) {
    const id = `${type}-${i}`;
    if (env.store.partitionOf(type, id) !== env.store.partitionOf(type, first)) return [first, id];
  }
  throw new Error('no second partition');
}

/** Appends `transactions` × 5 events to each stream, interleaved, and returns how many per stream. */
async function appendInterleaved(type: string, streams: readonly string[], transactions: number): Promise<number> {
  for (let t = 0; t < transactions; t += 1) {
    await inTx(env.pool, async (c) => {
      for (const id of streams) {
        await env.store.append(c, { type, id }, Array.from({ length: 5 }, (_, i) => ({ type: 'Step', data: { t, i } })), { expectedVersion: 'any' });
      }
    });
  }
  return transactions * 5;
}

async function recordEffect(consumer: string, e: StoredEvent, tx: pg.PoolClient): Promise<void> {
  await tx.query('INSERT INTO effects (consumer, event_id, stream_id, version) VALUES ($1, $2, $3, $4)', [consumer, e.id, e.streamId, e.version]);
}

/** The versions of a stream's effects for a consumer, in commit order. */
async function committedVersions(consumer: string, streamId: string): Promise<number[]> {
  const r = await env.pool.query<{ version: number }>('SELECT version FROM effects WHERE consumer = $1 AND stream_id = $2 ORDER BY seq', [consumer, streamId]);
  return r.rows.map((x) => x.version);
}

const oneTo = (n: number): number[] => Array.from({ length: n }, (_, i) => i + 1);

function consumerOf(name: string, handler: ConsumerOptions['handler'], extra: Partial<ConsumerOptions> = {}): EventConsumer {
  return new EventConsumer({
    pool: env.pool, nats: env.nats, name, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
    dlqSubjectPrefix: env.dlqSubjectPrefix, partitionConcurrency: 4, maxDeliver: 1000, backoffMs: [10],
    handler, ...extra,
  });
}

describe('consumer order under retries', () => {
  test('a failing message is retried in place: its partition waits, other partitions go on, each stream stays in order', async () => {
    const type = 'held';
    const [slow, fast] = streamsInTwoPartitions(type);
    const perStream = await appendInterleaved(type, [slow, fast], 4);
    const name = 'c-held';
    const calls: Array<{ stream: string; version: number; ok: boolean }> = [];
    let fastHandled = 0;
    let releaseFast = (): void => {};
    const slowHeld = new Promise<void>((resolve) => (releaseFast = resolve));
    const consumer = consumerOf(name, async (e, tx) => {
      if (e.streamType !== type) return;
      // The slow stream's third event fails until every event of the other partition has
      // been handled: it can only succeed if that partition went on while this one waited.
      if (e.streamId === slow && e.version === 3 && fastHandled < perStream) {
        calls.push({ stream: e.streamId, version: e.version, ok: false });
        releaseFast();
        throw new Error('not yet');
      }
      // The other partition starts once the slow one is held. Lanes run at their own pace: on a
      // loaded machine the other partition's lane could handle all its events before the slow
      // lane's first transaction got going, so the third event never failed and nothing was held.
      if (e.streamId === fast) await slowHeld;
      await recordEffect(name, e, tx);
      calls.push({ stream: e.streamId, version: e.version, ok: true });
      if (e.streamId === fast) fastHandled += 1;
    });
    await consumer.start();
    try {
      await waitFor('both streams', async () => (await committedVersions(name, slow)).length === perStream && (await committedVersions(name, fast)).length === perStream);
      assert.deepEqual(await committedVersions(name, slow), oneTo(perStream), 'the held stream committed in order, each event once');
      assert.deepEqual(await committedVersions(name, fast), oneTo(perStream), 'the other stream committed in order, each event once');
      const slowCalls = calls.filter((c) => c.stream === slow);
      const heldOk = slowCalls.findIndex((c) => c.version === 3 && c.ok);
      const firstLater = slowCalls.findIndex((c) => c.version > 3);
      assert.ok(slowCalls.some((c) => !c.ok), 'the third event failed at first');
      assert.ok(firstLater > heldOk, 'no later event of the held stream was even tried before the failing one succeeded');
      const stats = consumer.stats();
      assert.ok(stats.retries >= 1, 'retried in place');
      assert.equal(stats.redeliveries, 0, 'never handed back to the broker');
      assert.equal(stats.deadLettered, 0);
    } finally {
      // A handler of the other partition still waiting (the test failed) would keep stop() waiting.
      releaseFast();
      await consumer.stop();
    }
  });

  test('stopped while a partition is held: its messages go back to the broker in order, and the next instance keeps the order', async () => {
    const type = 'handback';
    const [slow] = streamsInTwoPartitions(type);
    const perStream = await appendInterleaved(type, [slow], 6);
    const name = 'c-handback';
    const failing = consumerOf(
      name,
      async (e, tx) => {
        if (e.streamType === type && e.version === 8) throw new Error('broken until the fix');
        if (e.streamType === type) await recordEffect(name, e, tx);
      },
      // Fewer messages in hand than the stream has, so that some were never delivered.
      { prefetchMessages: 1, maxAckPending: 3 },
    );
    await failing.start();
    await waitFor('the partition to be held', () => Promise.resolve(failing.stats().retries >= 3));
    await failing.stop();
    const before = await committedVersions(name, slow);
    assert.ok(before.length < 8, 'nothing from the failing event on took effect');
    assert.deepEqual(before, oneTo(before.length), 'what took effect is the start of the stream, in order');

    const fixed = consumerOf(name, async (e, tx) => {
      if (e.streamType === type) await recordEffect(name, e, tx);
    });
    await fixed.start();
    try {
      await waitFor('the rest of the stream', async () => (await committedVersions(name, slow)).length === perStream);
      assert.deepEqual(await committedVersions(name, slow), oneTo(perStream), 'in order, each event once, across the two instances');
    } finally {
      await fixed.stop();
    }
  });

  test('a failure after the commit gets the message redelivered at once, and the inbox skips it', async () => {
    const type = 'aftercommit';
    const [slow] = streamsInTwoPartitions(type);
    const perStream = await appendInterleaved(type, [slow], 3);
    const name = 'c-aftercommit';
    let failed = false;
    const consumer = consumerOf(
      name,
      async (e, tx) => {
        if (e.streamType === type) await recordEffect(name, e, tx);
      },
      {
        // Far longer than the wait below: only an immediate nak can bring the message back in time.
        ackWaitMs: 120_000,
        afterCommit: (events) => {
          if (!failed && events.some((e) => e.streamType === type)) {
            failed = true;
            throw new Error('the hook fails after the commit');
          }
        },
      },
    );
    await consumer.start();
    try {
      // (A copy counts as redelivered when it arrives, and as skipped once its inbox claim has
      // run: wait for the second, or the check races the claim.)
      await waitFor('the redelivered copy to meet the inbox', () =>
        Promise.resolve(failed && consumer.stats().redeliveries >= 1 && consumer.stats().duplicatesSkipped >= 1),
      );
      await waitFor('the whole stream', async () => (await committedVersions(name, slow)).length === perStream);
      assert.deepEqual(await committedVersions(name, slow), oneTo(perStream), 'in order, each event once');
    } finally {
      await consumer.stop();
    }
  });

  test('a dead letter that cannot be recorded keeps the message and holds the partition until it can', async () => {
    const type = 'dlfail';
    const [slow] = streamsInTwoPartitions(type);
    const perStream = await appendInterleaved(type, [slow], 2);
    const name = 'c-dlfail';
    // Recording a dead letter fails while the switch is on: the database refuses it.
    await env.pool.query('CREATE TABLE dl_switch (on_ boolean NOT NULL)');
    await env.pool.query('INSERT INTO dl_switch VALUES (true)');
    await env.pool.query(`CREATE FUNCTION refuse_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF (SELECT on_ FROM dl_switch) THEN RAISE EXCEPTION 'dead letters refused'; END IF; RETURN NEW; END $$`);
    await env.pool.query('CREATE TRIGGER refuse BEFORE INSERT ON events.dead_letters FOR EACH ROW EXECUTE FUNCTION refuse_dead_letter()');
    const errors: string[] = [];
    const consumer = consumerOf(
      name,
      async (e, tx) => {
        if (e.streamType !== type) return;
        if (e.version === 3) throw new Error('poisoned');
        await recordEffect(name, e, tx);
      },
      { maxDeliver: 2, onError: (error) => errors.push(String(error)) },
    );
    await consumer.start();
    try {
      await waitFor('the dead letter to be refused twice', () => Promise.resolve(errors.filter((m) => /dead letters refused/.test(m)).length >= 2));
      // The events before the poisoned one committed alone; nothing after it went through.
      assert.deepEqual(await committedVersions(name, slow), [1, 2]);
      await env.pool.query('UPDATE dl_switch SET on_ = false');
      await waitFor('the rest of the stream', async () => (await committedVersions(name, slow)).length === perStream - 1);
      assert.deepEqual(await committedVersions(name, slow), oneTo(perStream).filter((v) => v !== 3), 'in order, each event once, the poisoned one aside');
      const dl = await env.pool.query<{ attempts: number }>('SELECT attempts FROM events.dead_letters WHERE consumer = $1', [name]);
      assert.deepEqual(dl.rows, [{ attempts: 2 }]);
      assert.equal(consumer.stats().redeliveries, 0, 'the message was never given up to the broker');
    } finally {
      await consumer.stop();
    }
  });
});

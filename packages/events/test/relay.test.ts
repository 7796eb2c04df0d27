/**
 * The relay's wire format and its publish seam, on real PostgreSQL and NATS JetStream. The
 * relay splices each event's JSON from PostgreSQL's text instead of parsing and re-serialising
 * it; what a consumer decodes must still be exactly what the store holds.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { CHECKPOINT_START, decodeBatch, OutboxRelay, type OutboxEvent, type StoredEvent } from '../src/index.ts';
import { readOutbox, splitMessages } from '../src/relay.ts';
import { eventsTestEnv, inTx, waitFor, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;

before(async () => {
  env = await eventsTestEnv();
});

after(async () => {
  await env.close();
});

/** Every event the broker holds, decoded, in stream order. */
async function brokerEvents(): Promise<StoredEvent[]> {
  const jsm = await jetstreamManager(env.nats);
  const info = await jsm.streams.info(env.streamName);
  const out: StoredEvent[] = [];
  for (let seq = info.state.first_seq; seq <= info.state.last_seq && info.state.messages > 0; seq += 1) {
    const m = await jsm.streams.getMessage(env.streamName, { seq });
    if (m !== null) out.push(...decodeBatch(m.data));
  }
  return out;
}

describe('the relay', () => {
  test('what it publishes decodes to exactly what the store holds, awkward text and all', async () => {
    const awkward = {
      // (jsonb refuses \u0000, so the store never holds it.)
      quote: 'say "hi"\\ and \u0001\t\u2028 done',
      unicode: 'Zürich 東京 🚀',
      nested: { list: [1, 2.5, -3e-7, null, true], empty: {} },
      big: '123456789012345678901234567890',
    };
    await inTx(env.pool, async (c) => {
      await env.store.append(c, { type: 'wire', id: 'id "with" quotes\\ and ünïcode' }, [
        { type: 'Type "quoted"\n', data: awkward, metadata: { correlationId: 'c-1', actor: 'svc:"x"', traceparent: '00-abc-def-01' } },
        { type: 'Plain', data: {}, schemaVersion: 3 },
      ], { expectedVersion: 'no_stream' });
    });
    const stored = await env.store.readStream(env.pool, 'wire', 'id "with" quotes\\ and ünïcode');
    assert.equal(stored.length, 2);
    const relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
    relay.start();
    try {
      await waitFor('the relay to publish both', () => Promise.resolve(relay.stats().published >= 2));
    } finally {
      await relay.stop();
    }
    const published = (await brokerEvents()).filter((e) => e.streamType === 'wire');
    assert.deepEqual(published, stored, 'the decoded events equal the store\'s, field for field');
  });

  test('messages are cut by count and by bytes, the same way for the same events', async () => {
    const partition = env.store.partitionOf('cut', 'c-1');
    await inTx(env.pool, (c) => env.store.append(c, { type: 'cut', id: 'c-1' }, Array.from({ length: 30 }, (_, i) => ({
      type: 'Sized', data: { pad: 'x'.repeat(100 + i * 10), i },
    })), { expectedVersion: 'no_stream' }));
    let events: OutboxEvent[] = [];
    await waitFor('the horizon', async () => {
      events = (await readOutbox(env.pool, partition, CHECKPOINT_START, 1000)).filter((e) => e.streamType === 'cut');
      return events.length === 30;
    });
    assert.ok(events.every((e) => e.bytes === Buffer.byteLength(e.json)));
    const byCount = splitMessages(events, 7, 1 << 20);
    assert.deepEqual(byCount.map((m) => m.length), [7, 7, 7, 7, 2]);
    const bytesMax = 1000;
    const byBytes = splitMessages(events, 500, bytesMax);
    assert.deepEqual(byBytes.flat(), events, 'every event, once, in order');
    for (const m of byBytes) {
      const size = Buffer.byteLength(`{"events":[${m.map((e) => e.json).join(',')}]}`);
      assert.ok(size <= bytesMax || m.length === 1, `a message of ${m.length} events is ${size} bytes`);
    }
    assert.deepEqual(splitMessages(events, 500, bytesMax), byBytes, 'a pure function of the events');
  });

  test('a check before publishing that refuses holds its partition back; the others go on', async () => {
    const refused = 'held-0';
    let other = 'held-1';
    for (let i = 2; env.store.partitionOf('seam', other) === env.store.partitionOf('seam', refused); i += 1) other = `held-${i}`;
    const heldPartition = env.store.partitionOf('seam', refused);
    let refusing = true;
    const seen: string[] = [];
    const relay = new OutboxRelay({
      pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, failureWaitMsMax: 50,
      beforePublish: (partition, events) => {
        for (const e of events) seen.push(`${e.streamType}/${e.streamId}`);
        if (refusing && events.some((e) => e.streamType === 'seam' && e.streamId === refused)) {
          throw new Error(`residency: ${refused} may not leave (partition ${partition})`);
        }
      },
    });
    const published = async (id: string): Promise<number> => (await brokerEvents()).filter((e) => e.streamType === 'seam' && e.streamId === id).length;
    relay.start();
    try {
      await inTx(env.pool, async (c) => {
        await env.store.append(c, { type: 'seam', id: refused }, [{ type: 'A', data: {} }, { type: 'B', data: {} }], { expectedVersion: 'no_stream' });
        await env.store.append(c, { type: 'seam', id: other }, [{ type: 'A', data: {} }], { expectedVersion: 'no_stream' });
      });
      await waitFor('the other partition to be published', async () => (await published(other)) === 1);
      await waitFor('the check to refuse at least twice', () => Promise.resolve(seen.filter((s) => s === `seam/${refused}`).length >= 4));
      assert.equal(await published(refused), 0, 'nothing of the refused stream left');
      const cp = await env.pool.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM events.events e JOIN events.relay_checkpoints c ON c.partition = e.partition
          WHERE e.stream_type = 'seam' AND e.stream_id = $1 AND (e.transaction_id, e.position) <= (c.transaction_id, c.position)`,
        [refused],
      );
      assert.equal(cp.rows[0]?.n, 0, `partition ${heldPartition}'s checkpoint did not move past the refused events`);
      refusing = false;
      await waitFor('the held partition to go on', async () => (await published(refused)) === 2);
      const versions = (await brokerEvents()).filter((e) => e.streamType === 'seam' && e.streamId === refused).map((e) => e.version);
      assert.deepEqual(versions, [1, 2], 'once each, in order');
    } finally {
      await relay.stop();
    }
  });

  test('a message the broker refuses is never overtaken: the next waits for it, so the bus keeps the order', async () => {
    // A stream of its own that refuses messages over 1500 bytes: the first event's message is
    // refused, the four after it would be stored. Published back to back, they were, and the
    // retry stored the first after them (versions 2, 3, 4, 5, 1 on the bus).
    const jsm = await jetstreamManager(env.nats);
    const streamName = `${env.streamName}_ORDER`;
    const subjectPrefix = `${env.subjectPrefix}order`;
    await jsm.streams.add({ name: streamName, subjects: [`${subjectPrefix}.>`], max_msg_size: 1500, duplicate_window: 120_000_000_000 });
    const errors: string[] = [];
    const relay = new OutboxRelay({
      pool: env.pool, store: env.store, nats: env.nats, streamName, subjectPrefix, eventsPerMessageMax: 1, failureWaitMsMax: 50,
      onError: (e) => errors.push(String(e)),
    });
    try {
      await inTx(env.pool, (c) => env.store.append(c, { type: 'order', id: 'o-1' }, [
        { type: 'Big', data: { pad: 'x'.repeat(3000) } },
        ...Array.from({ length: 4 }, (_, i) => ({ type: 'Small', data: { i } })),
      ], { expectedVersion: 'no_stream' }));
      const onBus = async (): Promise<number[]> => {
        const info = await jsm.streams.info(streamName);
        const versions: number[] = [];
        for (let seq = info.state.first_seq; seq <= info.state.last_seq && info.state.messages > 0; seq += 1) {
          const m = await jsm.streams.getMessage(streamName, { seq });
          if (m !== null) versions.push(...decodeBatch(m.data).filter((e) => e.streamType === 'order').map((e) => e.version));
        }
        return versions;
      };
      relay.start();
      await waitFor('the broker to refuse the big message a few times', () => Promise.resolve(errors.length >= 3));
      assert.match(errors[0] ?? '', /maximum|size|exceed/i, 'refused for its size');
      assert.deepEqual(await onBus(), [], 'nothing after the refused message was published');
      const info = await jsm.streams.info(streamName);
      await jsm.streams.update(streamName, { ...info.config, max_msg_size: -1 });
      await waitFor('the relay to publish all five', async () => (await onBus()).length >= 5);
      assert.deepEqual(await onBus(), [1, 2, 3, 4, 5], 'the stream\'s events are on the bus in order, once each');
    } finally {
      await relay.stop();
      await jsm.streams.delete(streamName).catch(() => false);
    }
  });
});

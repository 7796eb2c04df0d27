/**
 * The relay when a partition fails: it fails alone. A partition refused by `beforePublish`
 * (or by the broker, or the database) waits with its own backoff while the others go on, and
 * an event too large for the broker holds its partition, said clearly and not at every try.
 * Real PostgreSQL and NATS JetStream.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { decodeBatch, EventStore, OutboxRelay, type StoredEvent } from '../src/index.ts';
import { EventTooLargeForBrokerError } from '../src/relay.ts';
import { eventsTestEnv, inTx, waitFor, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;

before(async () => {
  env = await eventsTestEnv();
});

after(async () => {
  await env.close();
});

async function brokerEvents(type: string): Promise<StoredEvent[]> {
  const jsm = await jetstreamManager(env.nats);
  const info = await jsm.streams.info(env.streamName);
  const out: StoredEvent[] = [];
  for (let seq = info.state.first_seq; seq <= info.state.last_seq && info.state.messages > 0; seq += 1) {
    const m = await jsm.streams.getMessage(env.streamName, { seq });
    if (m !== null) out.push(...decodeBatch(m.data).filter((e) => e.streamType === type));
  }
  return out;
}

/** A stream id of `type` that hashes to `partition`. */
function idIn(type: string, partition: number, prefix: string): string {
  for (let i = 0; ; i += 1) if (env.store.partitionOf(type, `${prefix}-${i}`) === partition) return `${prefix}-${i}`;
}

/** How many of the stream's events are at or behind its partition's checkpoint. */
async function checkpointed(type: string, id: string): Promise<number> {
  const r = await env.pool.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM events.events e JOIN events.relay_checkpoints c ON c.partition = e.partition
      WHERE e.stream_type = $1 AND e.stream_id = $2 AND (e.transaction_id, e.position) <= (c.transaction_id, c.position)`,
    [type, id],
  );
  return r.rows[0]?.n ?? 0;
}

function relayOptions(extra: Partial<ConstructorParameters<typeof OutboxRelay>[0]>): ConstructorParameters<typeof OutboxRelay>[0] {
  return { pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, ...extra };
}

describe('a partition that keeps failing', () => {
  test('holds back only itself: the partitions after it in the round are published', async () => {
    const type = 'starve';
    // Partition 0 is taken first, so it is the first of the round: every other comes after it.
    // Until 2026-12-07 its refusal ended the round, and partitions 1 to 3 were never published.
    const refused = idIn(type, 0, 'r');
    const others = Array.from({ length: env.store.partitions - 1 }, (_, i) => idIn(type, i + 1, `o${i + 1}`));
    // Appended before the relay starts, so its first round sees them all.
    await inTx(env.pool, async (c) => {
      await env.store.append(c, { type, id: refused }, [{ type: 'A', data: {} }], { expectedVersion: 'no_stream' });
      for (const id of others) await env.store.append(c, { type, id }, [{ type: 'A', data: {} }], { expectedVersion: 'no_stream' });
    });
    let refusals = 0;
    const errors: unknown[] = [];
    const relay = new OutboxRelay(relayOptions({
      failureWaitMsMax: 50,
      onError: (e) => errors.push(e),
      beforePublish: (partition, events) => {
        if (events.some((e) => e.streamType === type && e.streamId === refused)) {
          refusals += 1;
          throw new Error(`may not leave (partition ${partition})`);
        }
      },
    }));
    relay.start();
    try {
      // Every round tries partition 0 first; the second refusal comes after a whole round.
      await waitFor('two refusals', () => Promise.resolve(refusals >= 2), 10_000);
      assert.deepEqual(relay.stats().partitionsHeld, Array.from({ length: env.store.partitions }, (_, i) => i));
      const published = (await brokerEvents(type)).map((e) => `${e.streamId}@p${e.partition}`).sort();
      assert.deepEqual(published, others.map((id, i) => `${id}@p${i + 1}`).sort(), `after ${refusals} refusals of partition 0`);
      assert.equal(await checkpointed(type, refused), 0, 'partition 0 did not move past the refused event');
      assert.ok(errors.length >= 2 && errors.every((e) => /may not leave \(partition 0\)/.test(String(e))), 'each refusal reported');
    } finally {
      await relay.stop();
    }
  });

  test('its backoff does not delay the others', async () => {
    const type = 'slow';
    const refused = idIn(type, 0, 'r');
    const other = idIn(type, env.store.partitions - 1, 'o');
    await inTx(env.pool, (c) => env.store.append(c, { type, id: refused }, [{ type: 'A', data: {} }], { expectedVersion: 'no_stream' }));
    let refusals = 0;
    const relay = new OutboxRelay(relayOptions({
      failureWaitMsMax: 60_000,
      beforePublish: (_, events) => {
        if (events.some((e) => e.streamType === type && e.streamId === refused)) {
          refusals += 1;
          throw new Error('may not leave');
        }
      },
    }));
    relay.start();
    try {
      // After five refusals partition 0 waits 50 * 2^5 = 1600 ms before its next try.
      await waitFor('five refusals', () => Promise.resolve(refusals >= 5), 10_000);
      // Each append comes right after the one before was published: a relay that waited out
      // partition 0's backoff before each round would hold each for up to 1600 ms.
      for (let version = 1; version <= 3; version += 1) {
        const started = Date.now();
        await inTx(env.pool, (c) => env.store.append(c, { type, id: other }, [{ type: 'A', data: { version } }], { expectedVersion: version - 1 === 0 ? 'no_stream' : version - 1 }));
        await waitFor(`version ${version} of the other stream`, async () => (await brokerEvents(type)).some((e) => e.streamId === other && e.version === version), 5000);
        const took = Date.now() - started;
        assert.ok(took < 800, `version ${version} took ${took} ms to be published, behind partition 0's backoff`);
      }
      assert.equal(await checkpointed(type, refused), 0);
    } finally {
      await relay.stop();
    }
  });
});

describe('an event too large for the broker', () => {
  test('holds its partition at it, published up to it, said once a minute, and the other partitions go on', async () => {
    const maxPayload = env.nats.info?.max_payload ?? 1024 * 1024;
    // A store that lets it in: one opened with a larger limit (the default refuses it at append).
    const lax = await EventStore.open(env.pool, { eventBytesMax: 4 * maxPayload });
    const type = 'huge';
    const id = idIn(type, 1, 'h');
    const other = idIn(type, 2, 'o');
    await inTx(env.pool, async (c) => {
      await lax.append(c, { type, id }, [
        // Over messageBytesMax (512 KiB), within max_payload: goes alone.
        { type: 'Medium', data: { pad: 'm'.repeat(700 * 1024) } },
        { type: 'Big', data: { pad: 'x'.repeat(maxPayload + 1000) } },
        { type: 'Small', data: {} },
      ], { expectedVersion: 'no_stream' });
    });
    const [, big] = await env.store.readStream(env.pool, type, id);
    assert.ok(big !== undefined);
    const errors: unknown[] = [];
    let tries = 0;
    const relay = new OutboxRelay(relayOptions({
      failureWaitMsMax: 50,
      onError: (e) => errors.push(e),
      beforePublish: (partition) => {
        if (partition === 1) tries += 1;
      },
    }));
    relay.start();
    try {
      await waitFor('the oversized event to be reported', () => Promise.resolve(errors.length > 0), 10_000);
      await inTx(env.pool, (c) => env.store.append(c, { type, id: other }, [{ type: 'A', data: {} }], { expectedVersion: 'no_stream' }));
      await waitFor('the other partition', async () => (await brokerEvents(type)).some((e) => e.streamId === other));
      const triesBefore = tries;
      await waitFor('a few more tries of partition 1', () => Promise.resolve(tries >= triesBefore + 5), 10_000);
      assert.equal(errors.length, 1, `reported once, not at each of ${tries} tries: ${errors.map(String).join('; ')}`);
      const error = errors[0];
      assert.ok(error instanceof EventTooLargeForBrokerError, String(error));
      assert.equal(error.partition, 1);
      assert.equal(error.eventId, big.id);
      assert.equal(error.position, big.position);
      assert.equal(error.maxPayload, maxPayload);
      assert.ok(error.bytes > maxPayload, `${error.bytes} bytes`);
      assert.match(error.message, new RegExp(`event ${big.id} .*max_payload of ${maxPayload}: partition 1 is held`));
      const versions = (await brokerEvents(type)).filter((e) => e.streamId === id).map((e) => e.version);
      assert.deepEqual([...new Set(versions)], [1], 'the event before it was published; it and the one after it were not');
      assert.equal(await checkpointed(type, id), 1, 'the checkpoint stands just before it');
    } finally {
      await relay.stop();
    }
  });
});

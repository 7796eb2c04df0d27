/**
 * The store refuses an event too large to be published: one whose broker message (its envelope
 * as the relay sends it, alone, in the message's frame) would be over `eventBytesMax`. Before,
 * it took an event of any size, and the relay could never publish it: its partition stalled.
 * Real PostgreSQL (and NATS for the relay's side of the limit).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { CHECKPOINT_START, EventStore, type StreamEvent } from '../src/index.ts';
import { readOutbox } from '../src/relay.ts';
import { EVENT_BYTES_MAX, EVENT_MESSAGE_FIXED_BYTES, EventTooLargeError } from '../src/store.ts';
import { eventsTestEnv, inTx, waitFor, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;

before(async () => {
  env = await eventsTestEnv();
});

after(async () => {
  await env.close();
});

async function count(type: string): Promise<number> {
  const r = await env.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM events.events WHERE stream_type = $1', [type]);
  return r.rows[0]?.n ?? 0;
}

/** The store's size of an event `{ pad }` of `type` on stream `type`/`id`, metadata `{}`: what it must refuse above the limit. */
function sizeOf(type: string, id: string, eventType: string, pad: string): number {
  const json = (s: string): number => Buffer.byteLength(JSON.stringify(s)) - 2;
  // jsonb's text: a space after the key's colon.
  return EVENT_MESSAGE_FIXED_BYTES + json(type) + json(id) + json(eventType) + Buffer.byteLength(`{"pad": ${JSON.stringify(pad)}}`) + 2;
}

describe('the size of an event', () => {
  test('the default is below NATS\'s default max_payload, with room for the headers', async () => {
    assert.ok(EVENT_BYTES_MAX <= 1024 * 1024 - 256);
    assert.equal(env.store.eventBytesMax, EVENT_BYTES_MAX);
    const maxPayload = env.nats.info?.max_payload;
    assert.ok(maxPayload === undefined || EVENT_BYTES_MAX + 256 <= maxPayload, `max_payload ${maxPayload}`);
    await assert.rejects(EventStore.open(env.pool, { eventBytesMax: 100 }), RangeError);
  });

  test('an event over the limit is refused at append, by append, appendMany and appendStatement: nothing written, the transaction usable', async () => {
    const type = 'big';
    const big = { type: 'Big', data: { pad: 'x'.repeat(EVENT_BYTES_MAX) } };
    await inTx(env.pool, async (c) => {
      const refused = await env.store.append(c, { type, id: 'b-1' }, [{ type: 'Small', data: {} }, big], { expectedVersion: 'no_stream', region: 'eu' }).then(
        () => null,
        (e: unknown) => e,
      );
      assert.ok(refused instanceof EventTooLargeError, String(refused));
      assert.equal(refused.index, 1);
      assert.equal(refused.streamType, type);
      assert.equal(refused.streamId, 'b-1');
      assert.equal(refused.eventType, 'Big');
      assert.equal(refused.bytesMax, EVENT_BYTES_MAX);
      assert.ok(refused.bytes > EVENT_BYTES_MAX);
      assert.match(refused.message, /event 1 of the append \("Big" on stream big\/b-1\) would be at least \d+ bytes on the broker, more than the \d+ the store allows/);
      const entries: StreamEvent[] = [
        { streamType: type, streamId: 'b-2', version: 1, event: { type: 'Small', data: {} } },
        { streamType: type, streamId: 'b-3', version: 1, event: big },
      ];
      await assert.rejects(env.store.appendMany(c, entries), EventTooLargeError);
      await assert.rejects(env.store.appendStatement(c, entries), EventTooLargeError);
      // Metadata counts too.
      await assert.rejects(
        env.store.append(c, { type, id: 'b-4' }, [{ type: 'Small', data: {}, metadata: { actor: 'x'.repeat(EVENT_BYTES_MAX) } }], { expectedVersion: 'no_stream' }),
        EventTooLargeError,
      );
      // Nothing was written, not even the first region tag, and the transaction goes on.
      const tags = await c.query('SELECT 1 FROM events.stream_regions WHERE stream_type = $1', [type]);
      assert.equal(tags.rowCount, 0);
      await env.store.append(c, { type, id: 'b-1' }, [{ type: 'Small', data: {} }], { expectedVersion: 'no_stream' });
    });
    assert.equal(await count(type), 1);
  });

  test('the limit is exact: an event of exactly the limit is taken, and fits in it on the wire; one byte more is refused', async () => {
    const bytesMax = 8192;
    const store = await EventStore.open(env.pool, { eventBytesMax: bytesMax });
    const type = 'edge';
    // Two-byte characters and escapes (six bytes for \u0001), whose bytes the bound overestimates:
    // PostgreSQL measures an event this close to the limit.
    const unit = 'ü\u0001"x';
    const base = sizeOf(type, 'e-1', 'Edge', '');
    const pad = (extra: number): string => {
      const perUnit = sizeOf(type, 'e-1', 'Edge', unit) - base;
      const units = Math.floor((bytesMax - base - extra) / perUnit);
      const rest = bytesMax - base - units * perUnit;
      return unit.repeat(units) + 'y'.repeat(rest + extra);
    };
    const exact = pad(0);
    assert.equal(sizeOf(type, 'e-1', 'Edge', exact), bytesMax);
    assert.equal(sizeOf(type, 'e-1', 'Edge', exact + 'y'), bytesMax + 1);
    await inTx(env.pool, async (c) => {
      const refused = await store.append(c, { type, id: 'e-1' }, [{ type: 'Edge', data: { pad: `${exact}y` } }], { expectedVersion: 'no_stream' }).catch((e: unknown) => e);
      assert.ok(refused instanceof EventTooLargeError, String(refused));
      assert.equal(refused.bytes, bytesMax + 1, refused.message);
      await store.append(c, { type, id: 'e-1' }, [{ type: 'Edge', data: { pad: exact } }], { expectedVersion: 'no_stream' });
    });
    const partition = store.partitionOf(type, 'e-1');
    await waitFor('the relay\'s read', async () => (await readOutbox(env.pool, partition, CHECKPOINT_START, 1000)).some((e) => e.streamType === type));
    const [event] = (await readOutbox(env.pool, partition, CHECKPOINT_START, 1000)).filter((e) => e.streamType === type);
    assert.ok(event !== undefined);
    assert.deepEqual((JSON.parse(event.json) as { data: unknown }).data, { pad: exact });
    // The store counts the numbers at their widest; the message is no larger.
    const message = event.bytes + Buffer.byteLength('{"events":[]}');
    assert.ok(message <= bytesMax && message > bytesMax - 64, `a message of ${message} bytes`);
  });

  test('numbers written with an exponent count at the width jsonb gives them: a small event of them that would be too large is refused', async () => {
    // `1e+300` is 6 characters of JSON and 301 digits of jsonb text. 100 of them are about 700
    // bytes of JSON and 30 KB on the broker: the bound by characters took them, and the relay
    // could not publish the event.
    const bytesMax = 20_000;
    const store = await EventStore.open(env.pool, { eventBytesMax: bytesMax });
    const type = 'exponent';
    const many = { type: 'Huge', data: { n: Array.from({ length: 100 }, () => 1e300) } };
    const few = { type: 'Huge', data: { n: Array.from({ length: 20 }, () => -1.5e-300), m: 1e21 } };
    await inTx(env.pool, async (c) => {
      const refused = await store.append(c, { type, id: 'x-1' }, [many], { expectedVersion: 'no_stream' }).catch((e: unknown) => e);
      assert.ok(refused instanceof EventTooLargeError, String(refused));
      assert.ok(refused.bytes > bytesMax, refused.message);
      await assert.rejects(store.appendMany(c, [{ streamType: type, streamId: 'x-2', version: 1, event: many }]), EventTooLargeError);
      // Among many small events, in a chunk sized together.
      const small = Array.from({ length: 40 }, (_, i) => ({ streamType: type, streamId: `s-${i}`, version: 1, event: { type: 'Small', data: { i } } }));
      const refusedAmong = await store.appendMany(c, [...small.slice(0, 10), { streamType: type, streamId: 'x-3', version: 1, event: many }, ...small.slice(10)]).catch((e: unknown) => e);
      assert.ok(refusedAmong instanceof EventTooLargeError, String(refusedAmong));
      assert.equal(refusedAmong.index, 10);
      // 20 of them (about 6 KB on the broker) are taken, and published whole.
      await store.append(c, { type, id: 'x-4' }, [few], { expectedVersion: 'no_stream' });
    });
    assert.equal(await count(type), 1);
    const partition = store.partitionOf(type, 'x-4');
    await waitFor('the relay\'s read', async () => (await readOutbox(env.pool, partition, CHECKPOINT_START, 10_000)).some((e) => e.streamType === type));
    const [event] = (await readOutbox(env.pool, partition, CHECKPOINT_START, 10_000)).filter((e) => e.streamType === type);
    assert.ok(event !== undefined);
    const message = event.bytes + Buffer.byteLength('{"events":[]}');
    assert.ok(message > 6000 && message <= bytesMax, `a message of ${message} bytes`);
    assert.deepEqual((JSON.parse(event.json) as { data: unknown }).data, few.data);
  });

  test('a many-event append is sized event by event and written whole: one event over the limit is found wherever it is', async () => {
    const store = await EventStore.open(env.pool, { eventBytesMax: 8192 });
    const type = 'many';
    // 1500-byte events: 32 of them together are over the bound, each alone is well under.
    const entries: StreamEvent[] = Array.from({ length: 100 }, (_, i) => ({
      streamType: type, streamId: `m-${i}`, version: 1,
      event: { type: 'Each', data: { i, pad: 'p'.repeat(i % 2 === 0 ? 1500 : 10) }, metadata: { correlationId: `c-${i}` } },
    }));
    const over = entries.map((e, i) => (i === 70 ? { ...e, event: { ...e.event, data: { pad: 'x'.repeat(9000) } } } : e));
    await inTx(env.pool, async (c) => {
      const refused = await store.appendMany(c, over).catch((e: unknown) => e);
      assert.ok(refused instanceof EventTooLargeError, String(refused));
      assert.equal(refused.index, 70);
      assert.equal(refused.streamId, 'm-70');
      await store.appendMany(c, entries);
      await env.store.appendMany(c, entries.map((e) => ({ ...e, streamId: `${e.streamId}-default` })));
    });
    const r = await env.pool.query<{ stream_id: string; data: unknown; metadata: unknown }>(
      'SELECT stream_id, data, metadata FROM events.events WHERE stream_type = $1 ORDER BY position', [type]);
    const expected = [...entries, ...entries.map((e) => ({ ...e, streamId: `${e.streamId}-default` }))];
    assert.deepEqual(r.rows, expected.map((e) => ({ stream_id: e.streamId, data: e.event.data, metadata: e.event.metadata })));
  });
});

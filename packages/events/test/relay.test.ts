/**
 * The relay's wire format and its publish seam, on real PostgreSQL and NATS JetStream. The
 * relay splices each event's JSON from PostgreSQL's text instead of parsing and re-serialising
 * it; what a consumer decodes must still be exactly what the store holds.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import pg from 'pg';
import { CHECKPOINT_START, decodeBatch, OutboxRelay, RELAY_LOCK_CLASS, type OutboxEvent, type StoredEvent } from '../src/index.ts';
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

/** The backends of this database that hold relay partition locks. */
async function lockHolders(): Promise<number[]> {
  const r = await env.pool.query<{ pid: number }>(
    `SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
      WHERE l.locktype = 'advisory' AND l.classid = $1::bigint::oid AND l.granted AND d.datname = current_database()`,
    [RELAY_LOCK_CLASS],
  );
  return r.rows.map((x) => x.pid);
}

/** Stops a relay, failing (not hanging) when that takes over `ms`. */
async function stopWithin(relay: OutboxRelay, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`relay.stop() took over ${ms} ms`)), ms);
  });
  try {
    await Promise.race([relay.stop(), late]);
  } finally {
    clearTimeout(timer);
  }
}

describe('the relay\'s lock session', () => {
  test('a lock session that stops answering is given up at once, and the partitions are taken again on a new one', async () => {
    const errors: string[] = [];
    const relay = new OutboxRelay({
      pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
      lockSessionTimeoutMs: 300,
      onError: (e) => errors.push(String(e)),
    });
    relay.start();
    let stopped: number | null = null;
    try {
      await waitFor('every partition held', () => Promise.resolve(relay.stats().partitionsHeld.length === env.store.partitions));
      const [holder, ...others] = await lockHolders();
      assert.ok(holder !== undefined && others.length === 0, 'one session holds the locks');
      // The server stalls that session: it neither answers nor lets its locks go (a dead
      // network path behaves the same for the relay: no answer, and no error either).
      process.kill(holder, 'SIGSTOP');
      stopped = holder;
      await waitFor('the relay to give the partitions up', () => Promise.resolve(relay.stats().partitionsHeld.length === 0), 5000);
      assert.ok(errors.some((e) => /timeout/i.test(e)), `the unanswered check was reported: ${errors.join('; ')}`);
      // While the stalled session keeps its locks, no partition is taken again.
      await new Promise((resolve) => setTimeout(resolve, 500));
      assert.deepEqual(relay.stats().partitionsHeld, [], 'nothing is published while the old session may still hold the locks');
      process.kill(holder, 'SIGCONT');
      stopped = null;
      await waitFor('every partition held again', () => Promise.resolve(relay.stats().partitionsHeld.length === env.store.partitions));
      const now = await lockHolders();
      assert.equal(now.length, 1);
      assert.notEqual(now[0], holder, 'taken on a new session');
      const before = relay.stats().published;
      await inTx(env.pool, (c) => env.store.append(c, { type: 'lock-stall', id: 's-1' }, [{ type: 'E', data: {} }], { expectedVersion: 'no_stream' }));
      await waitFor('the relay to publish again', () => Promise.resolve(relay.stats().published > before));
    } finally {
      if (stopped !== null) process.kill(stopped, 'SIGCONT');
      await stopWithin(relay, 3000);
    }
  });

  test('a lost lock session gives its connection back, so losing it again and again never exhausts the pool', async () => {
    const pool = new pg.Pool({ connectionString: env.db.url, max: 3 });
    pool.on('error', () => {});
    const errors: string[] = [];
    const relay = new OutboxRelay({
      pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
      onError: (e) => errors.push(String(e)),
    });
    relay.start();
    try {
      await waitFor('every partition held', () => Promise.resolve(relay.stats().partitionsHeld.length === env.store.partitions));
      for (let loss = 1; loss <= 4; loss += 1) {
        const [holder] = await lockHolders();
        assert.ok(holder !== undefined);
        await env.pool.query('SELECT pg_terminate_backend($1)', [holder]);
        await waitFor(`the locks taken again after loss ${loss}`, async () => {
          const now = await lockHolders();
          return now.length === 1 && now[0] !== holder && relay.stats().partitionsHeld.length === env.store.partitions;
        });
      }
      const before = relay.stats().published;
      await inTx(env.pool, (c) => env.store.append(c, { type: 'lock-loss', id: 's-1' }, [{ type: 'E', data: {} }], { expectedVersion: 'no_stream' }));
      await waitFor('the relay to publish after four losses', () => Promise.resolve(relay.stats().published > before));
      assert.ok(pool.totalCount <= 3 && pool.waitingCount === 0, `the pool is not exhausted (total ${pool.totalCount}, waiting ${pool.waitingCount})`);
    } finally {
      await stopWithin(relay, 3000);
      await pool.end();
    }
  });
});

/**
 * The consumer's retry budget and dead letters under stops, lock timeouts and replays, on real
 * PostgreSQL and NATS JetStream:
 *
 * - messages that stop() gives back (nak'ed, so the broker's delivery count grows) keep their
 *   whole budget of tries at the next delivery, on the normal path and past `maxDeliver`
 *   deliveries;
 * - a lock timeout (55P03, a real lock held by another session) is not the event's fault;
 * - an event dead-lettered a second time (a replay that fails again) is a second message on the
 *   dead-letter stream, not a duplicate the broker drops.
 *
 * Each test publishes to a JetStream stream of its own, so that no other test's consumer sees
 * its messages.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';
import pg from 'pg';
import { headers } from '@nats-io/transport-node';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import { encodeBatch, ensureEventStream, EventConsumer, replayDeadLetters, type ConsumerOptions, type StoredEvent } from '../src/index.ts';
import { eventsNotAtFault } from '../src/consumer.ts';
import { EVENT_BYTES_MAX, EVENT_MESSAGE_FIXED_BYTES } from '../src/store.ts';
import { suiteWithEffects, waitFor, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
const { inTx, effectCounts } = suiteWithEffects((made) => (env = made));

interface OwnStream {
  streamName: string;
  subjectPrefix: string;
  drop: () => Promise<void>;
}

/** A JetStream event stream of the test's own. */
async function ownStream(tag: string): Promise<OwnStream> {
  const streamName = `${env.streamName}_${tag.toUpperCase()}`;
  const subjectPrefix = `${env.subjectPrefix}${tag}`;
  await ensureEventStream(env.nats, streamName, subjectPrefix);
  return { streamName, subjectPrefix, drop: async () => { await (await jetstreamManager(env.nats)).streams.delete(streamName).catch(() => false); } };
}

/** Appends `types` as the events of one new stream and publishes each as a message of its own, on one subject (one lane). */
async function publishEachAlone(own: OwnStream, streamType: string, types: readonly string[]): Promise<StoredEvent[]> {
  const events = await inTx(async (c) => {
    await env.store.append(c, { type: streamType, id: `${streamType}-1` }, types.map((type) => ({ type, data: {} })), { expectedVersion: 'no_stream' });
    return env.store.readStream(c, streamType, `${streamType}-1`);
  });
  const js = jetstream(env.nats);
  for (const e of events) await js.publish(`${own.subjectPrefix}.p${e.partition}`, encodeBatch([e]), { msgID: `${streamType}:${e.id}` });
  return events;
}

function consumerOn(own: OwnStream, name: string, options: Partial<ConsumerOptions> & Pick<ConsumerOptions, 'handler'>): EventConsumer {
  return new EventConsumer({
    pool: env.pool, nats: env.nats, name, streamName: own.streamName, filterSubject: `${own.subjectPrefix}.>`,
    dlqSubjectPrefix: env.dlqSubjectPrefix, onError: () => {}, ...options,
  });
}

async function deadLetterRows(consumer: string): Promise<Array<{ event_id: string; attempts: number; error: string }>> {
  return (await env.pool.query<{ event_id: string; attempts: number; error: string }>(
    'SELECT event_id::text, attempts, error FROM events.dead_letters WHERE consumer = $1 ORDER BY position', [consumer],
  )).rows;
}

/** Raises a real PostgreSQL error with this SQLSTATE in the handler's transaction. */
async function raiseSqlstate(tx: pg.PoolClient, sqlstate: string): Promise<void> {
  await tx.query(`DO $$ BEGIN RAISE EXCEPTION 'raised %', '${sqlstate}' USING ERRCODE = '${sqlstate}'; END $$`);
}

describe('the retry budget survives stops', () => {
  /**
   * Two messages in one lane: the first's handler meets a serialization failure (not the
   * event's fault, so it uses none of its budget) while `blocking` is set, and holds the lane
   * in a long retry wait; the second waits behind it, untried. The consumer is stopped
   * `handBacks` times, each time giving both back. Then the first goes through, and the
   * second, whose handler refuses its first `maxDeliver - 1` tries, must still get its
   * `maxDeliver` tries and take effect, never dead-lettered: it had had none before.
   */
  async function handBacksThenFlaky(tag: string, maxDeliver: number, handBacks: number): Promise<void> {
    const own = await ownStream(tag);
    const name = `c-${tag}`;
    let blocking = true;
    let blockerTries = 0;
    let flakyTries = 0;
    const handler = async (e: StoredEvent, tx: pg.PoolClient): Promise<void> => {
      if (e.type === 'Blocker') {
        blockerTries += 1;
        if (blocking) await raiseSqlstate(tx, '40001');
      } else {
        flakyTries += 1;
        if (flakyTries < maxDeliver) throw new Error(`flaky: refused try ${flakyTries}`);
      }
      await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, name]);
    };
    const jsm = await jetstreamManager(env.nats);
    try {
      const [, flaky] = await publishEachAlone(own, tag, ['Blocker', 'Flaky']) as [StoredEvent, StoredEvent];
      for (let round = 1; round <= handBacks; round += 1) {
        const consumer = consumerOn(own, name, { maxDeliver, backoffMs: [60_000], handler });
        await consumer.start();
        try {
          await waitFor(`round ${round}: the blocker tried, the flaky message in hand behind it`, async () =>
            blockerTries >= round && (await jsm.consumers.info(own.streamName, name)).num_ack_pending === 2);
        } finally {
          await consumer.stop();
        }
      }
      assert.equal(flakyTries, 0, 'the flaky event was never tried while it waited behind the blocker');
      const info = await jsm.consumers.info(own.streamName, name);
      assert.equal(info.num_redelivered, 2, 'both messages were given back to the broker');
      blocking = false;
      const consumer = consumerOn(own, name, { maxDeliver, backoffMs: [10], handler });
      await consumer.start();
      try {
        // A row "recorded before a last try" is the one-at-a-time path's record of a try in
        // progress (its commit removes it), not a verdict: only the effect or a real dead letter ends the wait.
        await waitFor('the flaky event to take effect or be dead-lettered', async () =>
          (await effectCounts(name)).has(flaky.id) || (await deadLetterRows(name)).some((r) => !r.error.startsWith('recorded before a last try')));
        assert.deepEqual(await deadLetterRows(name), [], 'nothing dead-lettered');
        assert.equal((await effectCounts(name)).get(flaky.id), 1, 'the flaky event took effect once');
        assert.equal(flakyTries, maxDeliver, `tried ${maxDeliver} times (maxDeliver), the hand-backs not counted`);
      } finally {
        await consumer.stop();
      }
    } finally {
      await own.drop();
    }
  }

  test('messages stop() gave back untried get every try at the next delivery: not dead-lettered early', async () => {
    // Handed back twice, delivered a third time: the broker's count is maxDeliver.
    await handBacksThenFlaky('handback', 3, 2);
  });

  test('past maxDeliver deliveries that were only hand-backs, an event the handler refuses is tried maxDeliver times alone, not dead-lettered at once', async () => {
    // Handed back twice with maxDeliver 2: the third delivery goes the one-at-a-time way.
    await handBacksThenFlaky('handbackpast', 2, 2);
  });
});

describe('failures that are not the events\' fault', () => {
  test('a lock timeout (55P03) on a row another session holds: the event waits for the lock, it is not dead-lettered', async () => {
    const own = await ownStream('locked');
    const name = 'c-locked';
    await env.pool.query('CREATE TABLE lock_target (id int PRIMARY KEY, n int NOT NULL)');
    await env.pool.query('INSERT INTO lock_target VALUES (1, 0)');
    // Another session holds the row for a while, as a long transaction would.
    const holder = new pg.Client({ connectionString: env.db.url });
    await holder.connect();
    await holder.query('BEGIN');
    await holder.query('SELECT * FROM lock_target WHERE id = 1 FOR UPDATE');
    let lockTimeouts = 0;
    const consumer = consumerOn(own, name, {
      maxDeliver: 2, backoffMs: [10],
      onError: (error) => {
        if ((error as { code?: unknown }).code === '55P03') lockTimeouts += 1;
      },
      handler: async (e, tx) => {
        await tx.query("SET LOCAL lock_timeout = '50ms'");
        await tx.query('UPDATE lock_target SET n = n + 1 WHERE id = 1');
        await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, name]);
      },
    });
    try {
      const [event] = await publishEachAlone(own, 'locked', ['Counted']) as [StoredEvent];
      await consumer.start();
      // More lock timeouts than maxDeliver and the one-at-a-time try together.
      await waitFor('lock timeouts, or a dead letter', async () => lockTimeouts >= 5 || (await deadLetterRows(name)).length > 0);
      await holder.query('COMMIT');
      await waitFor('the event to take effect or be dead-lettered', async () =>
        (await effectCounts(name)).has(event.id) || (await deadLetterRows(name)).length > 0);
      assert.deepEqual(await deadLetterRows(name), [], 'not dead-lettered for a lock another session held');
      assert.equal((await effectCounts(name)).get(event.id), 1);
      assert.equal((await env.pool.query<{ n: number }>('SELECT n FROM lock_target')).rows[0]?.n, 1, 'its effect applied once');
      assert.equal(consumer.stats().deadLettered, 0);
    } finally {
      await holder.end().catch(() => {});
      await consumer.stop();
      await own.drop();
    }
  });

  test('which real PostgreSQL errors count against an event, and which do not', async () => {
    const raised = async (sqlstate: string): Promise<unknown> => {
      const c = await env.pool.connect();
      try {
        await raiseSqlstate(c, sqlstate);
      } catch (error) {
        return error;
      } finally {
        c.release();
      }
      throw new Error(`${sqlstate} not raised`);
    };
    const notTheEvents = ['55P03', '40001', '40P01', '57P01', '57P03', '08006', '53100', '53200', '53300', '53400'];
    const theEvents = ['57014', '23505', '23503', '22P02', '42P01', 'P0001', '40002'];
    for (const code of notTheEvents) assert.equal(eventsNotAtFault(await raised(code)), true, `${code} says nothing about the event`);
    for (const code of theEvents) assert.equal(eventsNotAtFault(await raised(code)), false, `${code} counts against the event`);
    // FATAL at connect: a database that is not there (3D000).
    const lost = new pg.Client({ connectionString: env.db.url.replace(/\/[^/?]+(\?|$)/, '/ll_no_such_database$1') });
    const fatal: unknown = await lost.connect().then(() => null, (error: unknown) => error);
    await lost.end().catch(() => {});
    assert.equal((fatal as { severity?: unknown }).severity, 'FATAL');
    assert.equal(eventsNotAtFault(fatal), true, 'a FATAL error ends the session: not the event');
    assert.equal(eventsNotAtFault(new Error('cannot handle it')), false);
    assert.equal(eventsNotAtFault(null), false);
  });
});

describe('dead letters, again', () => {
  test('an event dead-lettered again after a replay that fails again is a second message on the dead-letter stream', async () => {
    const own = await ownStream('twice');
    const name = 'c-twice';
    const consumer = consumerOn(own, name, {
      maxDeliver: 1, backoffMs: [10],
      handler: (e) => Promise.reject(new Error(`still broken: ${e.type}`)),
    });
    const jsm = await jetstreamManager(env.nats);
    const dlqSubject = `${env.dlqSubjectPrefix}.${name}`;
    const onDeadLetterStream = async (): Promise<number> =>
      (await jsm.streams.info(env.dlqStreamName, { subjects_filter: dlqSubject })).state.subjects?.[dlqSubject] ?? 0;
    try {
      const [event] = await publishEachAlone(own, 'twice', ['Broken']) as [StoredEvent];
      await consumer.start();
      await waitFor('the first dead letter', () => Promise.resolve(consumer.stats().deadLettered === 1));
      assert.equal(await onDeadLetterStream(), 1);
      // The operator replays before the fix (or the fix does not hold): the copy fails again.
      const [replayed] = await replayDeadLetters({
        pool: env.pool, nats: env.nats, store: env.store, streamName: own.streamName, subjectPrefix: own.subjectPrefix, consumer: name,
      });
      assert.equal(replayed?.status, 'published');
      await waitFor('the second dead letter', () => Promise.resolve(consumer.stats().deadLettered === 2));
      assert.equal(await onDeadLetterStream(), 2, 'the second dead letter is on the stream, not dropped as a duplicate');
      const last = await jsm.streams.getMessage(env.dlqStreamName, { last_by_subj: dlqSubject });
      assert.ok(last !== null);
      assert.equal((JSON.parse(last.string()) as { id: string }).id, event.id);
      assert.equal(last.header.get('Ledgerline-Source-Sequence'), String(replayed.seq), 'it names the replayed copy it came from');
      const [row] = await deadLetterRows(name);
      assert.equal(row?.event_id, event.id);
      // The second dead letter is pending again, and replays under a new id.
      const [again] = await replayDeadLetters({
        pool: env.pool, nats: env.nats, store: env.store, streamName: own.streamName, subjectPrefix: own.subjectPrefix, consumer: name,
      });
      assert.equal(again?.status, 'published');
      assert.notEqual(again.msgId, replayed.msgId);
    } finally {
      await consumer.stop();
      await own.drop();
    }
  });
});

describe('dead letters that would not fit on the dead-letter stream, or in PostgreSQL', () => {
  /** The last message on this consumer's dead-letter subject. */
  async function lastDeadLetter(name: string): Promise<{ size: number; headerBytes: number; error: string; truncatedFrom: string; body: Uint8Array }> {
    const jsm = await jetstreamManager(env.nats);
    const m = await jsm.streams.getMessage(env.dlqStreamName, { last_by_subj: `${env.dlqSubjectPrefix}.${name}` });
    assert.ok(m !== null, 'a message on the dead-letter stream');
    const headerBytes = m.header.keys().reduce((n, k) => n + Buffer.byteLength(`${k}: ${m.header.get(k)}\r\n`), Buffer.byteLength('NATS/1.0\r\n\r\n'));
    return { size: m.data.length + headerBytes, headerBytes, error: m.header.get('Ledgerline-Error'), truncatedFrom: m.header.get('Ledgerline-Truncated-From'), body: m.data };
  }

  test('an event at the store\'s size bound, refused with a long non-ASCII error, is dead-lettered and its lane goes on', async () => {
    // The header was cut to 500 UTF-16 units, up to 1,500 bytes of UTF-8 here, past the 1 KiB
    // the store leaves below max_payload: the client refused the dead letter, and the lane
    // retried it for ever, the next event never taking effect.
    const own = await ownStream('wide');
    const name = 'c-wide';
    const json = (v: string): number => Buffer.byteLength(JSON.stringify(v)) - 2;
    const pad = 'x'.repeat(EVENT_BYTES_MAX - (EVENT_MESSAGE_FIXED_BYTES + json('wide') + json('wide-1') + json('Poison') + Buffer.byteLength('{"pad": ""}') + 2));
    const refusal = '残高不足: 振替を処理できません。'.repeat(40);
    const consumer = consumerOn(own, name, {
      maxDeliver: 1, backoffMs: [10],
      handler: async (e, tx) => {
        if (e.type === 'Poison') throw new Error(refusal);
        await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, name]);
      },
    });
    try {
      const events = await inTx(async (c) => {
        await env.store.append(c, { type: 'wide', id: 'wide-1' }, [{ type: 'Poison', data: { pad } }, { type: 'Fine', data: {} }], { expectedVersion: 'no_stream' });
        return env.store.readStream(c, 'wide', 'wide-1');
      });
      const [poison, fine] = events as [StoredEvent, StoredEvent];
      const js = jetstream(env.nats);
      for (const e of events) await js.publish(`${own.subjectPrefix}.p${e.partition}`, encodeBatch([e]), { msgID: `wide:${e.id}` });
      await consumer.start();
      await waitFor('the event after the dead letter to take effect', async () => (await effectCounts(name)).get(fine.id) === 1);
      assert.deepEqual((await deadLetterRows(name)).map((r) => [r.event_id, r.error]), [[poison.id, refusal.slice(0, 2000)]], 'the whole error is recorded');
      const dl = await lastDeadLetter(name);
      assert.ok(Buffer.byteLength(dl.error) <= 256 && refusal.startsWith(dl.error) && dl.error.length > 0, `the header is a prefix of the error of at most 256 bytes: ${Buffer.byteLength(dl.error)}`);
      const maxPayload = env.nats.info?.max_payload ?? Infinity;
      assert.ok(dl.size <= maxPayload, `${dl.size} bytes within max_payload ${maxPayload}`);
      if (dl.truncatedFrom === '') assert.equal((JSON.parse(Buffer.from(dl.body).toString()) as { id: string }).id, poison.id);
      assert.equal(consumer.stats().deadLettered, 1);
    } finally {
      await consumer.stop();
      await own.drop();
    }
  });

  test('a refusal whose text holds NUL is recorded with U+FFFD in its place, and its lane goes on', async () => {
    // PostgreSQL text refuses NUL: the dead letter could never be recorded, and the lane retried
    // it for ever, leaving no row at all.
    const own = await ownStream('nul');
    const name = 'c-nul';
    const consumer = consumerOn(own, name, {
      maxDeliver: 1, backoffMs: [10],
      handler: async (e, tx) => {
        if (e.type === 'Poison') throw new Error('unexpected byte \u0000 in field "memo"');
        await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, name]);
      },
    });
    try {
      const [poison, fine] = await publishEachAlone(own, 'nul', ['Poison', 'Fine']) as [StoredEvent, StoredEvent];
      await consumer.start();
      await waitFor('the event after the dead letter to take effect', async () => (await effectCounts(name)).get(fine.id) === 1);
      assert.deepEqual((await deadLetterRows(name)).map((r) => [r.event_id, r.error]), [[poison.id, 'unexpected byte \ufffd in field "memo"']]);
      assert.equal((await lastDeadLetter(name)).error, 'unexpected byte \ufffd in field "memo"');
    } finally {
      await consumer.stop();
      await own.drop();
    }
  });

  test('an undecodable message at max_payload is recorded, put on the dead-letter stream cut to fit, and acknowledged once', async () => {
    // Copied whole with the consumer's headers, it was over max_payload: refused, nak'ed, and
    // delivered again for ever, holding one of the consumer's max_ack_pending slots.
    const own = await ownStream('huge');
    const name = 'c-huge';
    const maxPayload = env.nats.info?.max_payload;
    assert.ok(maxPayload !== undefined);
    const h = headers();
    h.set('X', '1');
    const body = new Uint8Array(maxPayload - 64).fill(0x41);
    await jetstream(env.nats).publish(`${own.subjectPrefix}.p0`, body, { headers: h });
    const consumer = consumerOn(own, name, { maxDeliver: 2, backoffMs: [10], handler: async () => {} });
    try {
      await consumer.start();
      await waitFor('the message to be settled', () => Promise.resolve(consumer.stats().undecodable === 1));
      const dl = await lastDeadLetter(name);
      assert.equal(dl.truncatedFrom, String(body.length), 'marked with the size it had');
      assert.ok(dl.size <= maxPayload, `${dl.size} bytes within max_payload ${maxPayload}`);
      assert.ok(dl.body.length > 0 && dl.body.every((b) => b === 0x41), 'its first bytes');
      const row = await env.pool.query<{ size: number }>('SELECT size FROM events.undecodable_messages WHERE consumer = $1', [name]);
      assert.deepEqual(row.rows, [{ size: body.length }]);
      const info = await (await jetstreamManager(env.nats)).consumers.info(own.streamName, name);
      assert.equal(info.num_ack_pending, 0, 'acknowledged');
      assert.equal(consumer.stats().messages, 1, 'delivered once');
    } finally {
      await consumer.stop();
      await own.drop();
    }
  });

  test('a message that names one new event twice counts one event handled and one duplicate', async () => {
    const own = await ownStream('stats');
    const name = 'c-stats';
    const consumer = consumerOn(own, name, { handler: async () => {} });
    try {
      await consumer.start();
      const event: StoredEvent = {
        position: 9_000_000n, transactionId: 1n, partition: 0, id: randomUUID(), streamType: 'twice', streamId: 't-1', version: 1,
        type: 'Happened', schemaVersion: 1, data: {}, metadata: {}, recordedAt: new Date(),
      };
      await jetstream(env.nats).publish(`${own.subjectPrefix}.p0`, encodeBatch([event, { ...event }]), { msgID: `twice-${event.id}` });
      await waitFor('the message to be acknowledged', async () => (await (await jetstreamManager(env.nats)).consumers.info(own.streamName, name)).ack_floor.stream_seq >= 1);
      const { handled, duplicatesSkipped } = consumer.stats();
      assert.deepEqual({ handled, duplicatesSkipped }, { handled: 1, duplicatesSkipped: 1 });
    } finally {
      await consumer.stop();
      await own.drop();
    }
  });
});

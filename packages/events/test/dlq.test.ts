/**
 * Dead-letter tooling on real PostgreSQL and NATS JetStream: a poisoned event is dead-lettered,
 * the cause is fixed, and a replay makes it take effect exactly once at the consumer that gave
 * up on it, while every other consumer's inbox drops the copy.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import {
  listDeadLetters,
  listUndecodableMessages,
  OutboxRelay,
  reconcile,
  registerConsumer,
  replayDeadLetters,
  type EventConsumer,
} from '../src/index.ts';
import { runCli } from '../src/cli.ts';
import { effectsConsumer, eventsTestEnvWithEffects, poolHelpers, runCliOn, waitFor, NATS_URL, type CliRun, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
let relay: OutboxRelay;
let target: EventConsumer;
let other: EventConsumer;
/** While set, `target` fails on poisoned events (the bug an operator fixes before replaying). */
let poisoned = true;

const { effectCounts } = poolHelpers(() => env.pool);


const cli = (args: string[]): Promise<CliRun> => runCliOn(env, args);

function consumerOf(name: string): EventConsumer {
  return effectsConsumer(env, name, (e) => name === 'target' && poisoned && e.data.poison === true);
}

before(async () => {
  env = await eventsTestEnvWithEffects();
  target = consumerOf('target');
  other = consumerOf('other');
  await target.start();
  await other.start();
  relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
  relay.start();
});

after(async () => {
  await relay.stop();
  await target.stop();
  await other.stop();
  await env.close();
});

describe('dead letters', () => {
  test('a poisoned event is dead-lettered; after the fix a replay applies it exactly once, and other consumers are unaffected', async () => {
    const c = await env.pool.connect();
    try {
      await c.query('BEGIN');
      await env.store.append(c, { type: 'order', id: 'o-1' }, [
        { type: 'Placed', data: {} },
        { type: 'Paid', data: { poison: true } },
        { type: 'Shipped', data: {} },
      ], { expectedVersion: 'no_stream' });
      await c.query('COMMIT');
    } finally {
      c.release();
    }
    const ids = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_id = 'o-1' ORDER BY position")).rows.map((r) => r.id);
    const poison = ids[1] as string;
    await waitFor('the dead letter', async () => (await listDeadLetters(env.pool, { consumer: 'target' })).length === 1);
    await waitFor('the other consumer', async () => (await effectCounts('other')).size === 3);

    const [dl] = await listDeadLetters(env.pool, { pendingOnly: true });
    assert.ok(dl !== undefined);
    assert.deepEqual(
      [dl.consumer, dl.eventId, dl.streamType, dl.streamId, dl.version, dl.type, dl.attempts, dl.replayedAt],
      ['target', poison, 'order', 'o-1', 2, 'Paid', 2, null],
    );
    assert.match(dl.error, /poisoned event/);
    assert.deepEqual(await listDeadLetters(env.pool, { consumer: 'other' }), []);
    const listed = await cli(['dlq', 'list', '--consumer', 'target']);
    assert.equal(listed.code, 0, listed.err);
    assert.match(listed.out, new RegExp(`\\[target\\] ${poison} pos \\d+ order/o-1 v2 Paid: 2 attempts, .*PENDING: target: poisoned event`));
    const listedJson = JSON.parse((await cli(['dlq', 'list', '--json'])).out) as Array<{ eventId: string }>;
    assert.deepEqual(listedJson.map((x) => x.eventId), [poison]);
    const targetBefore = await effectCounts('target');
    assert.equal(targetBefore.has(poison), false);
    assert.equal(targetBefore.size, 2);
    const otherBefore = await effectCounts('other');

    // The fix, then the replay.
    poisoned = false;
    const skippedBefore = other.stats().duplicatesSkipped;
    const outcomes = await replayDeadLetters({
      pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target',
    });
    assert.equal(outcomes.length, 1);
    assert.equal(outcomes[0]?.status, 'published');
    assert.match(outcomes[0]?.msgId ?? '', new RegExp(`^replay:target:${poison}:\\d+$`));
    await waitFor('the replayed effect', async () => (await effectCounts('target')).get(poison) === 1);
    await waitFor('the other consumer to drop the copy', () => Promise.resolve(other.stats().duplicatesSkipped > skippedBefore));
    const after1 = await effectCounts('target');
    assert.deepEqual([...after1.values()], [1, 1, 1], 'every event once at the target');
    assert.deepEqual(await effectCounts('other'), otherBefore, "the other consumer's effects are unchanged");
    const [replayed] = await listDeadLetters(env.pool, { consumer: 'target' });
    assert.ok(replayed?.replayedAt instanceof Date, 'replayed_at is set');
    assert.deepEqual(await listDeadLetters(env.pool, { pendingOnly: true }), []);

    // A replay tool that crashed before marking runs again after the target handled the event.
    await env.pool.query("UPDATE events.dead_letters SET replayed_at = NULL WHERE consumer = 'target'");
    const again = await replayDeadLetters({
      pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target',
      eventIds: [poison],
    });
    // Its inbox has the event, so nothing is published; the dead letter is marked.
    assert.deepEqual(again.map((o) => o.status), ['already_handled']);
    assert.deepEqual(await effectCounts('target'), after1);

    // Nothing pending: a named event is reported as not dead-lettered.
    const none = await replayDeadLetters({
      pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target',
      eventIds: [poison],
    });
    assert.deepEqual(none.map((o) => o.status), ['not_dead_lettered']);

    // The range reconciles: the dead letter was replayed and handled.
    const range = await env.pool.query<{ lo: Date; hi: Date }>("SELECT min(recorded_at) AS lo, max(recorded_at) AS hi FROM events.events WHERE stream_id = 'o-1'");
    const report = await reconcile({
      pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
      from: range.rows[0]?.lo as Date, to: new Date((range.rows[0]?.hi as Date).getTime() + 1),
      effectCounts: (name) => effectCounts(name),
    });
    assert.equal(report.ok, true, JSON.stringify(report.issues));
    assert.equal(report.broker.republished, 1, 'the replay is a republished copy');
  });

  test('the same dead letter replayed twice before it is handled: the broker drops the second copy', async () => {
    // The target is stopped, so the first replay is not handled before the second.
    await target.stop();
    let id = '';
    try {
      const c = await env.pool.connect();
      try {
        await c.query('BEGIN');
        await env.store.append(c, { type: 'order', id: 'o-2' }, [{ type: 'Paid', data: {} }], { expectedVersion: 'no_stream' });
        await c.query('COMMIT');
      } finally {
        c.release();
      }
      id = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_id = 'o-2'")).rows[0]?.id as string;
      await waitFor('the other consumer', async () => (await effectCounts('other')).has(id));
      // A dead letter as the target would have written it.
      await env.pool.query("INSERT INTO events.dead_letters (consumer, event_id, position, attempts, error) SELECT 'target', event_id, position, 5, 'boom' FROM events.events WHERE event_id = $1", [id]);
      const opts = { pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target' };
      const first = await replayDeadLetters(opts);
      assert.deepEqual(first.map((o) => o.status), ['published']);
      await env.pool.query("UPDATE events.dead_letters SET replayed_at = NULL WHERE event_id = $1", [id]);
      const second = await replayDeadLetters(opts);
      assert.deepEqual(second.map((o) => [o.status, o.msgId]), [['duplicate', first[0]?.msgId]]);
    } finally {
      target = consumerOf('target');
      await target.start();
    }
    // Caught up on this test's event, which it applied once; and no event applied twice.
    await waitFor('the target catches up', async () => (await effectCounts('target')).get(id) === 1);
    assert.ok([...(await effectCounts('target')).values()].every((n) => n === 1));
  });

  test('replays that cannot publish: the event is not in the store; the CLI reports it and exits 1', async () => {
    const ghost = randomUUID();
    await env.pool.query("INSERT INTO events.dead_letters (consumer, event_id, position, attempts, error) VALUES ('other', $1, 1, 5, 'lost')", [ghost]);
    const r = await cli(['dlq', 'replay', '--consumer', 'other']);
    assert.equal(r.code, 1, r.err);
    assert.match(r.out, new RegExp(`${ghost}: event_missing`));
    const listed = await cli(['dlq', 'list', '--pending']);
    assert.match(listed.out, /\(not in the store\)/);
    assert.equal((await cli(['dlq', 'replay'])).code, 2, 'a consumer is required');
    assert.equal((await cli(['dlq', 'replay', '--consumer', 'nobody'])).code, 2);
    assert.equal((await cli(['dlq', 'replay', '--consumer', 'other', '--event', 'not-a-uuid'])).code, 2);
    const json = await cli(['dlq', 'replay', '--consumer', 'other', '--event', ghost, '--json']);
    assert.deepEqual((JSON.parse(json.out) as Array<{ status: string }>).map((o) => o.status), ['event_missing']);
    await assert.rejects(listDeadLetters(env.pool, { limit: 0 }), RangeError);
  });

  test('a dead letter whose stream retention archived is listed and replayed from the archive, and applied once', async () => {
    const poisonedBefore = poisoned;
    poisoned = true;
    const c = await env.pool.connect();
    try {
      await c.query('BEGIN');
      await env.store.append(c, { type: 'order', id: 'o-archived' }, [{ type: 'Paid', data: { poison: true } }], { expectedVersion: 'no_stream' });
      await c.query('COMMIT');
    } finally {
      c.release();
    }
    const id = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_id = 'o-archived'")).rows[0]?.id as string;
    // The target gives up on it; then retention moves the stream to the archive (as
    // applyRetention's statement does): pending dead letters do not hold it back.
    await waitFor('the target to dead-letter it', async () => (await listDeadLetters(env.pool, { consumer: 'target', pendingOnly: true })).some((d) => d.eventId === id));
    await env.pool.query('WITH moved AS (DELETE FROM events.events WHERE event_id = $1 RETURNING *) INSERT INTO events.archived_events SELECT *, now() FROM moved', [id]);
    const [listed] = (await listDeadLetters(env.pool, { consumer: 'target', pendingOnly: true })).filter((d) => d.eventId === id);
    assert.deepEqual([listed?.streamType, listed?.streamId, listed?.type], ['order', 'o-archived', 'Paid'], 'listed with its event, from the archive');
    poisoned = false;
    try {
      const outcomes = await replayDeadLetters({ pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target', eventIds: [id] });
      assert.deepEqual(outcomes.map((o) => o.status), ['published']);
      await waitFor('the replay to be applied', async () => (await effectCounts('target')).get(id) === 1);
    } finally {
      poisoned = poisonedBefore;
    }
    assert.equal((await effectCounts('other')).get(id), 1, 'the other consumer applied it once, the copy dropped by its inbox');
  });

  test('a replay applies the relay\'s residency policy: an event it keeps from the broker now is withheld, and stays pending', async () => {
    const poisonedBefore = poisoned;
    poisoned = true;
    const c = await env.pool.connect();
    try {
      await c.query('BEGIN');
      await env.store.append(c, { type: 'order', id: 'o-eu' }, [{ type: 'Paid', data: { poison: true } }], { expectedVersion: 'no_stream', region: 'eu' });
      await c.query('COMMIT');
    } finally {
      c.release();
    }
    const id = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_id = 'o-eu'")).rows[0]?.id as string;
    await waitFor('the target to dead-letter it', async () => (await listDeadLetters(env.pool, { consumer: 'target', pendingOnly: true })).some((d) => d.eventId === id));
    poisoned = false;
    try {
      // The policy now keeps eu data in eu-west-1, and the broker is elsewhere.
      const policy = { allowed: { eu: ['eu-west-1'] } };
      const opts = { pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target', eventIds: [id] };
      const [withheld] = await replayDeadLetters({ ...opts, residency: { policy, location: 'us-east-1' } });
      assert.deepEqual([withheld?.status, withheld?.msgId], ['withheld', null]);
      assert.match(withheld?.reason ?? '', /eu/);
      const cliEnv = { DATABASE_URL: env.db.url, NATS_URL, EVENTS_STREAM: env.streamName, EVENTS_SUBJECT_PREFIX: env.subjectPrefix, EVENTS_RESIDENCY_POLICY: JSON.stringify({ eu: ['eu-west-1'] }) };
      let out = '';
      assert.equal(await runCli(['dlq', 'replay', '--consumer', 'target', '--event', id], { env: { ...cliEnv, EVENTS_BROKER_LOCATION: 'us-east-1' }, stdout: (t) => (out += t), stderr: () => {} }), 1);
      assert.match(out, new RegExp(`${id}: withheld`));
      assert.equal(await runCli(['dlq', 'replay', '--consumer', 'target'], { env: cliEnv, stdout: () => {}, stderr: () => {} }), 2, 'a policy without the broker\'s location is a usage error');
      // Still pending, never published: nothing reached the target.
      assert.ok((await listDeadLetters(env.pool, { consumer: 'target', pendingOnly: true })).some((d) => d.eventId === id));
      assert.equal((await effectCounts('target')).get(id), undefined);
      // Where the policy allows it, it is replayed and applied once.
      assert.equal(await runCli(['dlq', 'replay', '--consumer', 'target', '--event', id], { env: { ...cliEnv, EVENTS_BROKER_LOCATION: 'eu-west-1' }, stdout: () => {}, stderr: () => {} }), 0);
      await waitFor('the replay to be applied', async () => (await effectCounts('target')).get(id) === 1);
    } finally {
      poisoned = poisonedBefore;
    }
  });

  test('undecodable messages are listed by the CLI, with what they start with', async () => {
    // Given a consumer's record of a message it could not decode (the consumer's own path is
    // in events.test.ts), bytes that are partly not printable among them,
    await registerConsumer(env.pool, 'sniffer');
    const bytes = Buffer.concat([Buffer.from('{"v":9,"garbage'), Buffer.from([0, 1, 255]), Buffer.from(' tail')]);
    await env.pool.query(
      `INSERT INTO events.undecodable_messages (consumer, stream_sequence, subject, error, size, head) VALUES ('sniffer', 42, 'x.p3', 'undecodable: not a batch', $1, $2)`,
      [bytes.length, bytes],
    );
    // then the CLI lists it, per consumer, as text and as JSON with its bytes in base64.
    const text = await cli(['dlq', 'undecodable', '--consumer', 'sniffer']);
    assert.equal(text.code, 0, text.err);
    assert.match(text.out, /^1 undecodable message\(s\)$/m);
    assert.match(text.out, /\[sniffer\] seq 42 on x\.p3, 23 bytes, dead \S+: undecodable: not a batch; starts "\{"v":9,"garbage\.\.\. tail"/);
    const json = await cli(['dlq', 'undecodable', '--json']);
    const rows = JSON.parse(json.out) as Array<{ consumer: string; streamSequence: string; size: number; head: string }>;
    const mine = rows.filter((r) => r.consumer === 'sniffer');
    assert.deepEqual(mine.map((r) => [r.streamSequence, r.size, Buffer.from(r.head, 'base64').equals(bytes)]), [['42', 23, true]]);
    assert.match((await cli(['dlq', 'undecodable', '--consumer', 'nobody'])).out, /^0 undecodable message\(s\)$/m);
    await assert.rejects(listUndecodableMessages(env.pool, { limit: 0 }), RangeError);
  });

  test('several --consumer options list the dead letters and undecodable messages of each', async () => {
    // Given two consumers with a dead letter and an undecodable message each, and a third's,
    for (const name of ['left', 'right', 'third']) {
      await registerConsumer(env.pool, name);
      await env.pool.query("INSERT INTO events.dead_letters (consumer, event_id, position, attempts, error) VALUES ($1, gen_random_uuid(), 1, 3, 'boom')", [name]);
      await env.pool.query(
        "INSERT INTO events.undecodable_messages (consumer, stream_sequence, subject, error, size, head) VALUES ($1, 7, 'x.p0', 'not a batch', 1, '\\x00')",
        [name],
      );
    }
    // then naming two lists both of theirs, and nobody else's (until 2026-12-07 only the first's).
    const dead = await cli(['dlq', 'list', '--consumer', 'left', '--consumer', 'right', '--json']);
    assert.equal(dead.code, 0, dead.err);
    assert.deepEqual((JSON.parse(dead.out) as Array<{ consumer: string }>).map((r) => r.consumer).sort(), ['left', 'right']);
    assert.match((await cli(['dlq', 'list', '--consumer', 'left', '--consumer', 'right'])).out, /^2 dead letter\(s\)$/m);
    const undecodable = await cli(['dlq', 'undecodable', '--consumer', 'right', '--consumer', 'left', '--json']);
    assert.equal(undecodable.code, 0, undecodable.err);
    assert.deepEqual((JSON.parse(undecodable.out) as Array<{ consumer: string }>).map((r) => r.consumer).sort(), ['left', 'right']);
    assert.deepEqual((await listDeadLetters(env.pool, { consumer: ['third'] })).map((d) => d.consumer), ['third']);
    // A replay is of one consumer's dead letters: two are refused.
    const replay = await cli(['dlq', 'replay', '--consumer', 'left', '--consumer', 'right']);
    assert.equal(replay.code, 2);
    assert.match(replay.err, /dlq replay needs exactly one --consumer/);
  });
});

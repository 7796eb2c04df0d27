/**
 * Inbox pruning on real PostgreSQL and NATS JetStream: the rows of handled events go, a copy of
 * every pruned event that comes again is still skipped, a dead-lettered event stays replayable
 * once, the prune never passes an event the consumer owes, reconciliation still proves the
 * range, and the lock between claims and prunes holds.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { jetstream } from '@nats-io/jetstream';
import {
  CHECKPOINT_START,
  encodeBatch,
  EventConsumer,
  INBOX_LOCK_CLASS,
  inboxHorizon,
  OutboxRelay,
  pruneInbox,
  reconcile,
  registerConsumer,
  replayDeadLetters,
  type StoredEvent,
} from '../src/index.ts';
import { eventsTestEnvWithEffects, poolHelpers, runCliOn, waitFor, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
let relay: OutboxRelay;
let keeper: EventConsumer;
let target: EventConsumer;
/** While set, `target` fails on poisoned events. */
let poisoned = true;

const { inTx, effectCounts } = poolHelpers(() => env.pool);

function consumerOf(name: string): EventConsumer {
  return new EventConsumer({
    pool: env.pool, nats: env.nats, name, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
    dlqSubjectPrefix: env.dlqSubjectPrefix, maxDeliver: 2, backoffMs: [20],
    handler: async (e: StoredEvent, tx: pg.PoolClient) => {
      if (name === 'target' && poisoned && e.data.poison === true) throw new Error('target: poisoned event');
      await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, name]);
    },
  });
}

/** Appends one stream of `data.length` events of type `tag`; returns their ids in order. */
async function appendStream(tag: string, id: string, data: Array<Record<string, unknown>>): Promise<string[]> {
  await inTx((c) => env.store.append(c, { type: tag, id }, data.map((d) => ({ type: 'Happened', data: d })), { expectedVersion: 'no_stream' }));
  const r = await env.pool.query<{ id: string }>('SELECT event_id::text AS id FROM events.events WHERE stream_type = $1 AND stream_id = $2 ORDER BY position', [tag, id]);
  return r.rows.map((x) => x.id);
}

/** The stored events of the given ids, in the global order. */
async function storedEvents(ids: readonly string[]): Promise<StoredEvent[]> {
  const all = await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 10_000 });
  const wanted = new Set(ids);
  return all.filter((e) => wanted.has(e.id));
}

/** Publishes copies of `events`, as a publisher other than the relay would: one message per partition. */
async function publishCopies(events: readonly StoredEvent[], tag: string): Promise<void> {
  const js = jetstream(env.nats);
  const byPartition = new Map<number, StoredEvent[]>();
  for (const e of events) byPartition.set(e.partition, [...(byPartition.get(e.partition) ?? []), e]);
  for (const [p, list] of byPartition) await js.publish(`${env.subjectPrefix}.p${p}`, encodeBatch(list), { msgID: `copy:${tag}:${p}` });
}

async function inboxIds(consumer: string): Promise<Set<string>> {
  const r = await env.pool.query<{ id: string }>('SELECT event_id::text AS id FROM events.inbox WHERE consumer = $1', [consumer]);
  return new Set(r.rows.map((x) => x.id));
}

async function dbNow(): Promise<Date> {
  return (await env.pool.query<{ now: Date }>('SELECT clock_timestamp() AS now')).rows[0]?.now as Date;
}

before(async () => {
  env = await eventsTestEnvWithEffects();
  keeper = consumerOf('keeper');
  target = consumerOf('target');
  await keeper.start();
  await target.start();
  relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
  relay.start();
});

after(async () => {
  await relay.stop();
  await keeper.stop();
  await target.stop();
  await env.close();
});

describe('inbox pruning', () => {
  test('removes the rows of handled events before the cut; copies of them, and of the rest, are still skipped; the range still reconciles', async () => {
    const early = [...(await appendStream('early', 'e-1', [{ n: 1 }, { n: 2 }, { n: 3 }])), ...(await appendStream('early', 'e-2', [{ n: 4 }, { n: 5 }]))];
    await waitFor('keeper to handle the early events', async () => {
      const rows = await inboxIds('keeper');
      return early.every((id) => rows.has(id));
    });
    await sleep(5);
    const cut = await dbNow();
    await sleep(5);
    const late = await appendStream('late', 'l-1', [{ n: 6 }, { n: 7 }]);
    await waitFor('keeper to handle the late events', async () => {
      const rows = await inboxIds('keeper');
      return late.every((id) => rows.has(id));
    });
    const rowsBefore = await inboxIds('keeper');
    for (const id of [...early, ...late]) assert.ok(rowsBefore.has(id), `keeper handled ${id}`);

    const report = await pruneInbox({ pool: env.pool, consumer: 'keeper', before: cut, pageSize: 2 });
    assert.equal(report.stop.reason, 'before');
    assert.equal(report.from, null);
    assert.equal(report.eventsPassed, 5);
    assert.equal(report.inboxRowsRemoved, 5);
    assert.equal(report.opened, 0);
    const early5 = await storedEvents(early);
    const lastEarly = early5.at(-1) as StoredEvent;
    assert.deepEqual(report.through, { transactionId: lastEarly.transactionId, position: lastEarly.position });
    assert.deepEqual(await inboxHorizon(env.pool, 'keeper'), report.through);
    const rowsAfter = await inboxIds('keeper');
    for (const id of early) assert.equal(rowsAfter.has(id), false, `the row of ${id} is pruned`);
    for (const id of late) assert.ok(rowsAfter.has(id), `the row of ${id} (after the cut) stays`);

    // Copies of all seven: the early ones are skipped by the horizon, the late ones by their rows.
    const effectsBefore = await effectCounts('keeper');
    const skippedBefore = keeper.stats().duplicatesSkipped;
    await publishCopies(await storedEvents([...early, ...late]), 'first');
    await waitFor('keeper to skip the copies', () => Promise.resolve(keeper.stats().duplicatesSkipped >= skippedBefore + 7));
    assert.equal(keeper.stats().duplicatesSkipped, skippedBefore + 7);
    const effectsAfter = await effectCounts('keeper');
    assert.deepEqual(effectsAfter, effectsBefore, 'no effect applied again');
    for (const id of [...early, ...late]) assert.equal(effectsAfter.get(id), 1, `${id} took effect once`);

    // Reconciliation takes the pruned events as consumed, with the count said apart.
    const all = await storedEvents([...early, ...late]);
    const report2 = await reconcile({
      pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumers: ['keeper'],
      from: (all[0] as StoredEvent).recordedAt, to: new Date((all.at(-1) as StoredEvent).recordedAt.getTime() + 1),
      effectCounts: (name) => effectCounts(name),
    });
    assert.equal(report2.ok, true, JSON.stringify(report2.issues));
    const k = report2.consumers.find((c) => c.name === 'keeper');
    assert.equal(k?.consumed, 7);
    assert.equal(k?.consumedBeforeInboxHorizon, 5);

    // A second prune from the horizon, up to now: the late ones go too.
    const second = await pruneInbox({ pool: env.pool, consumer: 'keeper', before: await dbNow() });
    assert.deepEqual(second.from, report.through);
    assert.ok(second.eventsPassed >= 2, `the late events passed (${second.eventsPassed})`);
    const remaining = await inboxIds('keeper');
    for (const id of late) assert.equal(remaining.has(id), false);
  });

  test('a dead-lettered event is left open: a replay applies it once, and a copy after that is skipped', async () => {
    const ids = await appendStream('poison', 'p-1', [{ n: 1 }, { n: 2, poison: true }, { n: 3 }]);
    const poison = ids[1] as string;
    await waitFor('the dead letter', async () => (await env.pool.query("SELECT 1 FROM events.dead_letters WHERE consumer = 'target' AND event_id = $1", [poison])).rowCount === 1);
    await waitFor('target to handle the others', async () => (await inboxIds('target')).has(ids[2] as string));
    const report = await pruneInbox({ pool: env.pool, consumer: 'target', before: await dbNow() });
    assert.equal(report.opened, 1, JSON.stringify(report, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v)));
    const open = await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.inbox_open WHERE consumer = 'target'");
    assert.deepEqual(open.rows.map((r) => r.id), [poison]);
    assert.equal((await effectCounts('target')).has(poison), false);

    poisoned = false;
    const outcomes = await replayDeadLetters({
      pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target', eventIds: [poison],
    });
    assert.deepEqual(outcomes.map((o) => o.status), ['published']);
    await waitFor('the replayed effect', async () => (await effectCounts('target')).get(poison) === 1);
    assert.equal((await env.pool.query("SELECT 1 FROM events.inbox_open WHERE consumer = 'target'")).rowCount, 0, 'the claim took it off the open list');

    // Again, by copies of all three: every one is skipped.
    const skippedBefore = target.stats().duplicatesSkipped;
    await publishCopies(await storedEvents(ids), 'poison');
    await waitFor('target to skip the copies', () => Promise.resolve(target.stats().duplicatesSkipped >= skippedBefore + 3));
    const effects = await effectCounts('target');
    for (const id of ids) assert.equal(effects.get(id), 1, `${id} took effect once`);

    // A replay tool run again sees it handled (its inbox row), even past the horizon.
    await env.pool.query("UPDATE events.dead_letters SET replayed_at = NULL WHERE consumer = 'target'");
    const again = await replayDeadLetters({
      pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'target', eventIds: [poison],
    });
    assert.deepEqual(again.map((o) => o.status), ['already_handled']);
  });

  test('never passes an event the consumer owes: it stops there and names it (CLI exit 1)', async () => {
    await registerConsumer(env.pool, 'laggard');
    // The laggard handled the first two events of a stream (inbox rows as its claims write them), not the third.
    const ids = await appendStream('owed', 'o-1', [{ n: 1 }, { n: 2 }, { n: 3 }]);
    const events = await storedEvents(ids);
    await env.pool.query(
      "INSERT INTO events.inbox (consumer, event_id, position) SELECT 'laggard', * FROM unnest($1::uuid[], $2::bigint[])",
      [ids.slice(0, 2), events.slice(0, 2).map((e) => e.position.toString())],
    );
    // Every earlier event of the store, handled too, so that the first one owed is the third.
    await env.pool.query(
      `INSERT INTO events.inbox (consumer, event_id, position)
       SELECT 'laggard', event_id, position FROM events.events WHERE position < $1 ON CONFLICT DO NOTHING`,
      [(events[0] as StoredEvent).position.toString()],
    );
    const run = await runCliOn(env, ['inbox', 'prune', '--consumer', 'laggard', '--before', new Date(Date.now() + 60_000).toISOString()]);
    assert.equal(run.code, 1, run.err);
    assert.match(run.out, new RegExp(`stopped at event ${ids[2]} \\(position ${(events[2] as StoredEvent).position}`));
    const horizon = await inboxHorizon(env.pool, 'laggard');
    assert.deepEqual(horizon, { transactionId: (events[1] as StoredEvent).transactionId, position: (events[1] as StoredEvent).position });
    const left = await inboxIds('laggard');
    assert.equal(left.size, 0, 'every row before the owed event is pruned');

    // Once it handles the owed event, the prune goes on past it.
    await env.pool.query("INSERT INTO events.inbox (consumer, event_id, position) VALUES ('laggard', $1, $2)", [ids[2], (events[2] as StoredEvent).position.toString()]);
    const json = await runCliOn(env, ['inbox', 'prune', '--consumer', 'laggard', '--before', new Date(Date.now() + 60_000).toISOString(), '--json']);
    assert.equal(json.code, 0, json.err);
    const parsed = JSON.parse(json.out) as { eventsPassed: number; stop: { reason: string } };
    assert.ok(parsed.eventsPassed >= 1);
    assert.notEqual(parsed.stop.reason, 'unhandled');

    const usage = await runCliOn(env, ['inbox', 'prune']);
    assert.equal(usage.code, 2);
    assert.match(usage.err, /inbox prune needs exactly one --consumer/);
    const unknown = await runCliOn(env, ['inbox', 'prune', '--consumer', 'nobody']);
    assert.equal(unknown.code, 2);
    assert.match(unknown.err, /consumer nobody is not registered/);
  });

  test('a claim reads the horizon after the lock: one that waits for a prune sees the horizon the prune set', async () => {
    await registerConsumer(env.pool, 'locked');
    const pruner = await env.pool.connect();
    const claimer = await env.pool.connect();
    try {
      await pruner.query('BEGIN');
      await pruner.query('SELECT pg_advisory_xact_lock($1, hashtext($2))', [INBOX_LOCK_CLASS, 'locked']);
      await pruner.query("INSERT INTO events.inbox_horizons (consumer, transaction_id, position) VALUES ('locked', '12345'::xid8, 678)");
      await claimer.query('BEGIN');
      const pending = claimer.query<{ transaction_id: string; position: string }>(
        "SELECT horizon_transaction_id::text AS transaction_id, horizon_position::text AS position FROM events.inbox_claim_horizon('locked')",
      );
      await waitFor('the claim to wait on the prune', async () => (
        await env.pool.query("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = $1::bigint::oid", [INBOX_LOCK_CLASS])
      ).rowCount === 1);
      await pruner.query('COMMIT');
      const seen = await pending;
      assert.deepEqual(seen.rows, [{ transaction_id: '12345', position: '678' }], 'the horizon committed while the claim waited');
      await claimer.query('COMMIT');

      // And a prune waits for a claim in flight before it removes anything.
      await registerConsumer(env.pool, 'inflight');
      await env.pool.query("INSERT INTO events.inbox (consumer, event_id, position) SELECT 'inflight', event_id, position FROM events.events");
      const rows = (await inboxIds('inflight')).size;
      assert.ok(rows > 0);
      await claimer.query('BEGIN');
      await claimer.query("SELECT * FROM events.inbox_claim_horizon('inflight')");
      let done = false;
      const prune = pruneInbox({ pool: env.pool, consumer: 'inflight', before: await dbNow() }).then((r) => {
        done = true;
        return r;
      });
      await waitFor('the prune to wait on the claim', async () => (
        await env.pool.query("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ExclusiveLock' AND classid = $1::bigint::oid", [INBOX_LOCK_CLASS])
      ).rowCount === 1);
      assert.equal(done, false);
      assert.equal((await inboxIds('inflight')).size, rows, 'nothing removed while the claim is in flight');
      await claimer.query('COMMIT');
      const r = await prune;
      assert.equal(r.inboxRowsRemoved, rows);
    } finally {
      await pruner.query('ROLLBACK').catch(() => {});
      await claimer.query('ROLLBACK').catch(() => {});
      pruner.release();
      claimer.release();
    }
  });

  test('a prune whose page another prune overtook reads again from the newer horizon', async () => {
    await registerConsumer(env.pool, 'overtaken');
    const ids = await appendStream('overtaken', 'v-1', Array.from({ length: 9 }, (_, n) => ({ n })));
    const events = await storedEvents(ids);
    // Handled: every event of the store up to these, and these.
    await env.pool.query(
      `INSERT INTO events.inbox (consumer, event_id, position) SELECT 'overtaken', event_id, position FROM events.events
        WHERE position <= $1`,
      [(events.at(-1) as StoredEvent).position.toString()],
    );
    const other = await env.pool.connect();
    try {
      // The other prune holds the lock while this one reads its first page (from no horizon)...
      await other.query('BEGIN');
      await other.query('SELECT pg_advisory_xact_lock($1, hashtext($2))', [INBOX_LOCK_CLASS, 'overtaken']);
      const cut = await dbNow();
      const prune = pruneInbox({ pool: env.pool, consumer: 'overtaken', before: cut, pageSize: 2 });
      await waitFor('the prune to wait for the lock', async () => (
        await env.pool.query("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ExclusiveLock' AND classid = $1::bigint::oid", [INBOX_LOCK_CLASS])
      ).rowCount === 1);
      // ...and moves the horizon past that page (to the sixth of these events), removing the rows.
      const sixth = events[5] as StoredEvent;
      await other.query(
        `DELETE FROM events.inbox WHERE consumer = 'overtaken' AND event_id IN
           (SELECT event_id FROM events.events WHERE (transaction_id, position) <= ($1::text::xid8, $2::bigint))`,
        [sixth.transactionId.toString(), sixth.position.toString()],
      );
      await other.query("INSERT INTO events.inbox_horizons (consumer, transaction_id, position) VALUES ('overtaken', $1::text::xid8, $2)", [
        sixth.transactionId.toString(),
        sixth.position.toString(),
      ]);
      await other.query('COMMIT');
      const report = await prune;
      // Had it applied its stale page, the horizon would have gone back to before the sixth, and
      // the next page would have met events with neither row nor horizon: a false gap.
      assert.equal(report.stop.reason, 'read_horizon', JSON.stringify(report.stop, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v)));
      const last = events.at(-1) as StoredEvent;
      assert.deepEqual(await inboxHorizon(env.pool, 'overtaken'), { transactionId: last.transactionId, position: last.position });
      assert.equal((await inboxIds('overtaken')).size, 0);
    } finally {
      await other.query('ROLLBACK').catch(() => {});
      other.release();
    }
  });

  test('two prunes at once remove each row once and leave one horizon', async () => {
    await registerConsumer(env.pool, 'twin');
    const ids = await appendStream('twin', 't-1', Array.from({ length: 12 }, (_, n) => ({ n })));
    await env.pool.query(
      `INSERT INTO events.inbox (consumer, event_id, position) SELECT 'twin', event_id, position FROM events.events ON CONFLICT DO NOTHING`,
    );
    const total = Number((await env.pool.query<{ n: string }>("SELECT count(*) AS n FROM events.inbox WHERE consumer = 'twin'")).rows[0]?.n);
    const cut = await dbNow();
    const [a, b] = await Promise.all([
      pruneInbox({ pool: env.pool, consumer: 'twin', before: cut, pageSize: 1 }),
      pruneInbox({ pool: env.pool, consumer: 'twin', before: cut, pageSize: 1 }),
    ]);
    assert.equal(a.inboxRowsRemoved + b.inboxRowsRemoved, total);
    assert.equal((await inboxIds('twin')).size, 0);
    const last = (await storedEvents(ids)).at(-1) as StoredEvent;
    const h = await inboxHorizon(env.pool, 'twin');
    assert.ok(h !== null && (h.transactionId > last.transactionId || (h.transactionId === last.transactionId && h.position >= last.position)));
    const recorded = await env.pool.query<{ pruned: string }>("SELECT pruned::text FROM events.inbox_horizons WHERE consumer = 'twin'");
    assert.equal(Number(recorded.rows[0]?.pruned), total);
  });
});

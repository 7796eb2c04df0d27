/**
 * Inbox pruning on real PostgreSQL and NATS JetStream: the rows of handled events go, a copy of
 * every pruned event that comes again is still skipped, a dead-lettered event stays replayable
 * once, the prune never passes an event the consumer owes, reconciliation still proves the
 * range, and the lock between claims and prunes holds.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import {
  CHECKPOINT_START,
  encodeBatch,
  EventConsumer,
  claimEvents,
  inboxHorizon,
  InboxPruneBusyError,
  inboxPruneLockKey,
  inTransaction,
  OutboxRelay,
  pruneInbox,
  reconcile,
  registerConsumer,
  replayDeadLetters,
  type StoredEvent,
} from '../src/index.ts';
import { effectCounts as effectCountsOn, effectsConsumer, eventsTestEnvWithEffects, poolHelpers, runCliOn, waitFor, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
let relay: OutboxRelay;
let keeper: EventConsumer;
let target: EventConsumer;
/** While set, `target` fails on poisoned events. */
let poisoned = true;

const { inTx, effectCounts } = poolHelpers(() => env.pool);

function consumerOf(name: string): EventConsumer {
  return effectsConsumer(env, name, (e) => name === 'target' && poisoned && e.data.poison === true);
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

/** Inbox rows for `consumer` for every event of the store, deleted ones too, but `except`. */
async function handledAll(consumer: string, except: readonly string[] = []): Promise<void> {
  await env.pool.query(
    `INSERT INTO events.inbox (consumer, event_id, position)
     SELECT $1, event_id, position FROM (SELECT event_id, position FROM events.events UNION ALL SELECT event_id, position FROM events.deleted_events) e
      WHERE NOT (event_id = ANY($2::uuid[]))
     ON CONFLICT DO NOTHING`,
    [consumer, except],
  );
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

  test('a snapshot older than the horizon keeps the rows: a claim under it still finds them, in REPEATABLE READ', async () => {
    await registerConsumer(env.pool, 'snap');
    const ids = await appendStream('snap', 's-1', [{ n: 1 }, { n: 2 }]);
    const [e1] = await storedEvents(ids);
    await handledAll('snap');
    const rows = (await inboxIds('snap')).size;
    const old = await env.pool.connect();
    try {
      // A claim transaction whose snapshot predates the prune (REPEATABLE READ keeps it to the end).
      await old.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await old.query('SELECT count(*) FROM events.inbox');
      const report = await pruneInbox({ pool: env.pool, consumer: 'snap', before: await dbNow(), snapshotWaitMs: 300 });
      assert.equal(report.stop.reason, 'snapshots');
      assert.equal(report.eventsPassed, rows);
      assert.equal(report.inboxRowsRemoved, 0);
      assert.ok((await inboxHorizon(env.pool, 'snap')) !== null, 'the horizon moved');
      assert.equal((await inboxIds('snap')).size, rows, 'the rows stay while the old snapshot lives');
      // Under the old snapshot the horizon is not seen, but the row is: the copy is not taken.
      assert.deepEqual([...(await claimEvents(old, 'snap', [e1 as StoredEvent]))], []);
      await old.query('ROLLBACK');

      const cli = await runCliOn(env, ['inbox', 'prune', '--consumer', 'snap', '--before', (await dbNow()).toISOString()]);
      assert.equal(cli.code, 0, cli.err);
      assert.match(cli.out, new RegExp(`${rows} inbox rows removed`));
      assert.equal((await inboxIds('snap')).size, 0);
      // Now the horizon alone drops the copy.
      const again = await env.pool.connect();
      try {
        await again.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
        assert.deepEqual([...(await claimEvents(again, 'snap', [e1 as StoredEvent]))], []);
        await again.query('ROLLBACK');
      } finally {
        again.release();
      }
    } finally {
      await old.query('ROLLBACK').catch(() => {});
      old.release();
    }
  });

  test('holds a consumer to an event retention deleted before it handled it', async () => {
    await registerConsumer(env.pool, 'ret');
    const ids = await appendStream('ret', 'r-1', [{ n: 1 }, { n: 2 }]);
    const [d1, d2] = await storedEvents(ids);
    await env.pool.query(
      "INSERT INTO events.inbox (consumer, event_id, position) SELECT 'ret', event_id, position FROM events.events WHERE event_id <> $1",
      [(d2 as StoredEvent).id],
    );
    // Retention deletes the stream, as applyRetention does: its events go, their places stay.
    await env.pool.query(
      `WITH gone AS (DELETE FROM events.events WHERE stream_type = 'ret' RETURNING position, event_id, transaction_id)
       INSERT INTO events.deleted_events (position, event_id, transaction_id) SELECT position, event_id, transaction_id FROM gone`,
    );
    const report = await pruneInbox({ pool: env.pool, consumer: 'ret', before: await dbNow() });
    assert.equal(report.stop.reason, 'unhandled');
    assert.ok(report.stop.reason === 'unhandled' && report.stop.event.eventId === (d2 as StoredEvent).id && report.stop.event.deleted);
    assert.deepEqual(report.through, { transactionId: (d1 as StoredEvent).transactionId, position: (d1 as StoredEvent).position });
    // A copy of it still on the broker is taken.
    assert.deepEqual([...(await inTx((c) => claimEvents(c, 'ret', [d2 as StoredEvent])))], [(d2 as StoredEvent).id]);

    // Retention of the release before, still running, writes no place: refused by the table.
    await assert.rejects(
      env.pool.query('INSERT INTO events.deleted_events (position, event_id) VALUES (0, gen_random_uuid())'),
      /deleted_events_placed/,
    );
    // A deletion recorded before its place was kept (the constraint spares such rows), owed by
    // the consumer: nothing passes.
    await registerConsumer(env.pool, 'ret-old');
    await env.pool.query("INSERT INTO events.inbox (consumer, event_id, position) SELECT 'ret-old', event_id, position FROM events.events");
    await env.pool.query('ALTER TABLE events.deleted_events DROP CONSTRAINT deleted_events_placed');
    await env.pool.query('UPDATE events.deleted_events SET transaction_id = NULL WHERE event_id = $1', [(d2 as StoredEvent).id]);
    await env.pool.query('ALTER TABLE events.deleted_events ADD CONSTRAINT deleted_events_placed CHECK (transaction_id IS NOT NULL) NOT VALID');
    const refused = await pruneInbox({ pool: env.pool, consumer: 'ret-old', before: await dbNow() });
    assert.equal(refused.stop.reason, 'unhandled');
    assert.ok(refused.stop.reason === 'unhandled' && refused.stop.event.transactionId === null && refused.stop.event.eventId === (d2 as StoredEvent).id);
    assert.equal(refused.eventsPassed, 0);
    await env.pool.query('UPDATE events.deleted_events SET transaction_id = $2::text::xid8 WHERE event_id = $1', [
      (d2 as StoredEvent).id,
      (d2 as StoredEvent).transactionId.toString(),
    ]);
  });

  test('an event the relay withheld and retention then deleted is owed to nobody: it is passed, listed open', async () => {
    await registerConsumer(env.pool, 'whdel');
    const ids = await appendStream('whdel', 'wd-1', [{ n: 1 }]);
    const e = (await storedEvents(ids))[0] as StoredEvent;
    await handledAll('whdel', [e.id]);
    // Retention deletes the stream and the relay's record of it; the deletion keeps the fact.
    await env.pool.query(
      `WITH gone AS (DELETE FROM events.events WHERE stream_type = 'whdel' RETURNING position, event_id, transaction_id)
       INSERT INTO events.deleted_events (position, event_id, transaction_id, withheld) SELECT position, event_id, transaction_id, true FROM gone`,
    );
    const report = await pruneInbox({ pool: env.pool, consumer: 'whdel', before: await dbNow() });
    assert.notEqual(report.stop.reason, 'unhandled', JSON.stringify(report.stop, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v)));
    assert.equal(report.withheld, 1);
    assert.equal((await env.pool.query("SELECT 1 FROM events.inbox_open WHERE consumer = 'whdel' AND event_id = $1", [e.id])).rowCount, 1);
  });

  test('a prune refuses a consumer that no instance of this release registered: the release before claims without the horizon', async () => {
    await env.pool.query("INSERT INTO events.consumers (name) VALUES ('oldclaims')");
    await assert.rejects(pruneInbox({ pool: env.pool, consumer: 'oldclaims', before: await dbNow() }), /has not been started on a release whose claim reads the inbox horizon/);
    await registerConsumer(env.pool, 'oldclaims');
    const r = await pruneInbox({ pool: env.pool, consumer: 'oldclaims', before: new Date(0) });
    assert.equal(r.stop.reason, 'before');
  });

  test('an event the relay recorded withheld is listed open: a copy that reached the broker after all takes effect once', async () => {
    await registerConsumer(env.pool, 'wh');
    const ids = await appendStream('wh', 'w-1', [{ n: 1 }]);
    const [w] = await storedEvents(ids);
    const e = w as StoredEvent;
    await handledAll('wh', [e.id]);
    await env.pool.query(
      `INSERT INTO events.relay_withheld (event_id, partition, position, transaction_id, stream_type, stream_id, region, location, reason)
       VALUES ($1, $2, $3, $4::text::xid8, 'wh', 'w-1', 'eu', 'us-east-1', 'test')`,
      [e.id, e.partition, e.position.toString(), e.transactionId.toString()],
    );
    const report = await pruneInbox({ pool: env.pool, consumer: 'wh', before: await dbNow() });
    assert.equal(report.opened, 1);
    assert.equal(report.withheld, 1);
    assert.notEqual(report.stop.reason, 'unhandled');
    assert.deepEqual([...(await inTx((c) => claimEvents(c, 'wh', [e])))], [e.id]);
    assert.deepEqual([...(await inTx((c) => claimEvents(c, 'wh', [e])))], [], 'once');
    assert.equal((await env.pool.query("SELECT 1 FROM events.inbox_open WHERE consumer = 'wh'")).rowCount, 0);
    await env.pool.query('DELETE FROM events.relay_withheld WHERE event_id = $1', [e.id]);
  });

  test('an open event handled while the prune runs keeps its inbox row, so its next copy is still skipped', async () => {
    for (const moment of ['before the move', 'during the wait'] as const) {
      const consumer = moment === 'before the move' ? 'openrace-a' : 'openrace-b';
      await registerConsumer(env.pool, consumer);
      const ids = await appendStream('openrace', `${consumer}-1`, [{ n: 1 }]);
      const e = (await storedEvents(ids))[0] as StoredEvent;
      await handledAll(consumer, [e.id]);
      // Dead-lettered: a dead letter, no inbox row.
      await env.pool.query('INSERT INTO events.dead_letters (consumer, event_id, position, attempts, error) VALUES ($1, $2, $3, 3, $4)', [
        consumer, e.id, e.position.toString(), 'boom',
      ]);
      // The replayed copy is claimed and committed by the consumer at that moment of the prune.
      let claimed: string[] | null = null;
      const trigger = moment === 'before the move' ? 'INSERT INTO events.inbox_open' : 'SELECT count(*)::int AS n FROM pg_stat_activity';
      const watch = async (sql: unknown): Promise<void> => {
        if (claimed === null && typeof sql === 'string' && sql.includes(trigger)) {
          claimed = [];
          claimed = [...(await inTx((c) => claimEvents(c, consumer, [e])))];
        }
      };
      const watched = <T extends object>(target: T): T =>
        new Proxy(target, {
          get(t, p, r) {
            if (p === 'query') return async (...a: unknown[]) => { await watch(a[0]); return (t as { query: (...x: unknown[]) => unknown }).query(...a); };
            if (p === 'connect') return async () => watched(await (t as unknown as pg.Pool).connect());
            const v: unknown = Reflect.get(t, p, r);
            return typeof v === 'function' ? (v as (...x: unknown[]) => unknown).bind(t) : v;
          },
        });
      const report = await pruneInbox({ pool: watched(env.pool), consumer, before: await dbNow() });
      assert.deepEqual(claimed, [e.id], `${moment}: the replayed copy took effect`);
      assert.equal(report.opened, 1, moment);
      const handled = await env.pool.query<{ h: boolean }>('SELECT events.inbox_handled($1, $2, $3::text::xid8, $4) AS h', [
        consumer, e.id, e.transactionId.toString(), e.position.toString(),
      ]);
      assert.equal(handled.rows[0]?.h, true, `${moment}: handled, as the inbox and its horizon say`);
      assert.deepEqual([...(await inTx((c) => claimEvents(c, consumer, [e])))], [], `${moment}: the next copy is skipped`);
    }
  });

  test('a prune run by another role, which cannot see the sessions\' types, still waits for their snapshots', async () => {
    await registerConsumer(env.pool, 'roles');
    await handledAll('roles');
    const role = `ll_inbox_${randomBytes(4).toString('hex')}`;
    await env.pool.query(`CREATE ROLE ${role} LOGIN`);
    await env.pool.query(`GRANT USAGE ON SCHEMA events TO ${role}; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA events TO ${role}`);
    const url = new URL(env.db.url);
    url.username = role;
    const opsPool = new pg.Pool({ connectionString: url.toString(), max: 3 });
    opsPool.on('error', () => {});
    const old = await env.pool.connect();
    try {
      // A claim transaction of the service's role, holding a snapshot from before the prune.
      await old.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await old.query('SELECT count(*) FROM events.inbox');
      const seen = await opsPool.query<{ backend_type: string | null }>(
        'SELECT backend_type FROM pg_stat_activity WHERE datname = current_database() AND backend_xmin IS NOT NULL AND pid <> pg_backend_pid()',
      );
      assert.ok(seen.rows.some((r) => r.backend_type === null), 'the operator role does not see the session\'s type');
      const report = await pruneInbox({ pool: opsPool, consumer: 'roles', before: await dbNow(), snapshotWaitMs: 300 });
      assert.equal(report.stop.reason, 'snapshots');
      assert.equal(report.inboxRowsRemoved, 0);
      assert.equal((await inboxIds('roles')).size > 0, true, 'the rows stay');
    } finally {
      await old.query('ROLLBACK').catch(() => {});
      old.release();
      await opsPool.end();
      await env.pool.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`);
    }
  });

  test('one prune per consumer at a time: a second is refused while the first holds the consumer', async () => {
    await registerConsumer(env.pool, 'busy');
    const holder = await env.pool.connect();
    try {
      await holder.query(`SELECT pg_advisory_lock(${inboxPruneLockKey('$1')})`, ['busy']);
      await assert.rejects(pruneInbox({ pool: env.pool, consumer: 'busy', before: await dbNow() }), InboxPruneBusyError);
      const cli = await runCliOn(env, ['inbox', 'prune', '--consumer', 'busy']);
      assert.equal(cli.code, 2);
      assert.match(cli.err, /another prune of busy's inbox is running/);
    } finally {
      await holder.query('SELECT pg_advisory_unlock_all()');
      holder.release();
    }
    const ok = await pruneInbox({ pool: env.pool, consumer: 'busy', before: new Date(0) });
    assert.equal(ok.stop.reason, 'before');
    // Two names whose 32-bit hashtext collide do not share the lock.
    const [a, b] = ['consumer-102', 'consumer-94717'];
    const same = await env.pool.query<{ same: boolean }>('SELECT hashtext($1) = hashtext($2) AS same', [a, b]);
    assert.equal(same.rows[0]?.same, true);
    await registerConsumer(env.pool, a);
    await registerConsumer(env.pool, b);
    const other = await env.pool.connect();
    try {
      await other.query(`SELECT pg_advisory_lock(${inboxPruneLockKey('$1')})`, [a]);
      const r = await pruneInbox({ pool: env.pool, consumer: b, before: new Date(0) });
      assert.equal(r.stop.reason, 'before');
    } finally {
      await other.query('SELECT pg_advisory_unlock_all()');
      other.release();
    }
  });

  test('two prunes at once: one runs, the other is refused or finds nothing left; each row is removed once', async () => {
    await registerConsumer(env.pool, 'twin');
    const ids = await appendStream('twin', 't-1', Array.from({ length: 12 }, (_, n) => ({ n })));
    await handledAll('twin');
    const total = Number((await env.pool.query<{ n: string }>("SELECT count(*) AS n FROM events.inbox WHERE consumer = 'twin'")).rows[0]?.n);
    const cut = await dbNow();
    const runs = await Promise.allSettled([
      pruneInbox({ pool: env.pool, consumer: 'twin', before: cut, pageSize: 1 }),
      pruneInbox({ pool: env.pool, consumer: 'twin', before: cut, pageSize: 1 }),
    ]);
    for (const r of runs) if (r.status === 'rejected') assert.ok(r.reason instanceof InboxPruneBusyError, String(r.reason));
    const done = runs.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    assert.ok(done.length >= 1);
    assert.equal(done.reduce((n, r) => n + r.inboxRowsRemoved, 0), total);
    assert.equal((await inboxIds('twin')).size, 0);
    const last = (await storedEvents(ids)).at(-1) as StoredEvent;
    const h = await inboxHorizon(env.pool, 'twin');
    assert.ok(h !== null && (h.transactionId > last.transactionId || (h.transactionId === last.transactionId && h.position >= last.position)));
    const recorded = await env.pool.query<{ pruned: string }>("SELECT pruned::text FROM events.inbox_horizons WHERE consumer = 'twin'");
    assert.equal(Number(recorded.rows[0]?.pruned), total);
  });
});

describe('inbox pruning and the consumer', () => {
  test('a message delivered again after a prune: the repeated-delivery path sees the pruned event handled and leaves its dead-letter record alone', async () => {
    const own = await eventsTestEnvWithEffects();
    let first = true;
    let pruned: Awaited<ReturnType<typeof pruneInbox>> | null = null;
    const c = new EventConsumer({
      pool: own.pool, nats: own.nats, name: 'again', streamName: own.streamName, filterSubject: `${own.subjectPrefix}.>`,
      dlqSubjectPrefix: own.dlqSubjectPrefix, maxDeliver: 1, backoffMs: [20],
      handler: async (e: StoredEvent, tx: pg.PoolClient) => {
        await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, 'again']);
      },
      afterCommit: async (events) => {
        if (!first) return;
        first = false;
        const e = events[0] as StoredEvent;
        // Dead-lettered once and replayed, as its record says; now handled, and its row pruned.
        await own.pool.query(
          "INSERT INTO events.dead_letters (consumer, event_id, position, attempts, error, replayed_at) VALUES ('again', $1, $2, 3, 'earlier failure', now())",
          [e.id, e.position.toString()],
        );
        pruned = await pruneInbox({ pool: own.pool, consumer: 'again', before: new Date(Date.now() + 60_000) });
        throw new Error('the ack is lost: the message comes again');
      },
    });
    const ownRelay = new OutboxRelay({ pool: own.pool, store: own.store, nats: own.nats, streamName: own.streamName, subjectPrefix: own.subjectPrefix });
    try {
      await c.start();
      ownRelay.start();
      await inTransaction(own.pool, (x) => own.store.append(x, { type: 'acct', id: 'a-1' }, [{ type: 'Opened', data: {} }], { expectedVersion: 'no_stream' }));
      await waitFor('the message delivered again', () => Promise.resolve(c.stats().messages >= 2));
      const jsm = await jetstreamManager(own.nats);
      await waitFor('the message acked', async () => (await jsm.consumers.info(own.streamName, 'again')).ack_floor.stream_seq >= 1);
      assert.equal((pruned as { inboxRowsRemoved: number } | null)?.inboxRowsRemoved, 1);
      const id = (await own.pool.query<{ id: string }>('SELECT event_id::text AS id FROM events.events')).rows[0]?.id as string;
      assert.equal((await effectCountsOn(own.pool, 'again')).get(id), 1);
      const dl = await own.pool.query<{ attempts: number; error: string; replayed: boolean }>(
        "SELECT attempts, error, replayed_at IS NOT NULL AS replayed FROM events.dead_letters WHERE consumer = 'again'",
      );
      assert.deepEqual(dl.rows, [{ attempts: 3, error: 'earlier failure', replayed: true }]);
      assert.equal(c.stats().deadLettered, 0);
    } finally {
      await ownRelay.stop();
      await c.stop().catch(() => {});
      await own.close();
    }
  });

  test('a consumer refuses to start on a schema without the inbox horizons, rather than dead-letter every event', async () => {
    const own = await eventsTestEnvWithEffects();
    try {
      await own.pool.query('ALTER TABLE events.inbox_horizons RENAME TO inbox_horizons_gone');
      const c = new EventConsumer({
        pool: own.pool, nats: own.nats, name: 'early', streamName: own.streamName, filterSubject: `${own.subjectPrefix}.>`,
        handler: async () => {},
      });
      await assert.rejects(c.start(), /no events\.inbox_horizons \(migration 1770600000000\): run migrateEvents/);
      await c.stop().catch(() => {});
    } finally {
      await own.close();
    }
  });
});

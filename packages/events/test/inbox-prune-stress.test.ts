/**
 * Inbox pruning under load, on real PostgreSQL and NATS JetStream: writers append, the relay
 * publishes, the consumer handles four partitions at once, a pruner prunes the consumer's inbox
 * over and over up to the present, and a second publisher sends copies of events already
 * appended (random ones, from a seeded generator: `INBOX_STRESS_SEED` replays a run). Some events
 * are poisoned: the handler refuses them until the cause is "fixed", so they are dead-lettered
 * (and listed open by the prunes that pass them), then replayed while the pruner still runs.
 * However those interleave, every event takes effect exactly once, and the inbox ends pruned.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import {
  CHECKPOINT_START,
  encodeBatch,
  EventConsumer,
  inTransaction,
  listDeadLetters,
  OutboxRelay,
  pruneInbox,
  replayDeadLetters,
  type PruneInboxReport,
  type StoredEvent,
} from '../src/index.ts';
import { seededRandom } from '@ledgerline/resilience';
import { effectCounts, eventsTestEnvWithEffects, waitFor, type EventsTestEnv } from './support.ts';

const SEED = Number(process.env.INBOX_STRESS_SEED ?? Date.now() % 2 ** 31);
const TRANSACTIONS = 150;
const EVENTS_PER_TRANSACTION = 20;
const STREAMS = 40;

let env: EventsTestEnv;
let relay: OutboxRelay;
let consumer: EventConsumer;
/** While set, the handler refuses poisoned events (the bug an operator fixes before replaying). */
let poisoned = true;

before(async () => {
  env = await eventsTestEnvWithEffects();
  consumer = new EventConsumer({
    pool: env.pool, nats: env.nats, name: 'stress', streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
    dlqSubjectPrefix: env.dlqSubjectPrefix, partitionConcurrency: 4, maxDeliver: 2, backoffMs: [20],
    handleBatch: async (events: StoredEvent[], tx: pg.PoolClient) => {
      if (poisoned && events.some((e) => e.data.poison === true)) throw new Error('stress: a poisoned event');
      await tx.query("INSERT INTO effects (event_id, consumer) SELECT unnest($1::uuid[]), 'stress'", [events.map((e) => e.id)]);
    },
  });
  await consumer.start();
  relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, eventsPerMessageMax: 25 });
  relay.start();
});

after(async () => {
  await relay.stop();
  await consumer.stop();
  await env.close();
});

test(`appends, copies and prunes interleaved: every event once, the inbox pruned (seed ${SEED})`, { timeout: 120_000 }, async () => {
  console.log(`inbox stress seed ${SEED} (INBOX_STRESS_SEED=${SEED} replays its choices)`);
  const random = seededRandom(SEED);
  const versions = new Map<string, number>();
  /** The pruner and the copier run until the dead letters are replayed. */
  let running = true;
  let copies = 0;
  const prunes: PruneInboxReport[] = [];

  const writer = (async () => {
    for (let t = 0; t < TRANSACTIONS; t += 1) {
      await inTransaction(env.pool, async (c) => {
        const entries = [];
        for (let i = 0; i < EVENTS_PER_TRANSACTION; i += 1) {
          const streamId = `s-${Math.floor(random() * STREAMS)}`;
          const version = (versions.get(streamId) ?? 0) + 1;
          versions.set(streamId, version);
          entries.push({ streamType: 'stress', streamId, version, event: { type: 'Happened', data: { t, i, poison: random() < 0.02 } } });
        }
        // appendMany wants each stream's versions together and rising: sort by stream, then version.
        entries.sort((a, b) => (a.streamId === b.streamId ? a.version - b.version : a.streamId < b.streamId ? -1 : 1));
        await env.store.appendMany(c, entries);
      });
      await sleep(Math.floor(random() * 15));
    }
  })();

  const js = jetstream(env.nats);
  const copier = (async () => {
    while (running) {
      const appended = await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 100_000 });
      if (appended.length > 0) {
        const picked: StoredEvent[] = [];
        for (let i = 0; i < 15; i += 1) picked.push(appended[Math.floor(random() * appended.length)] as StoredEvent);
        const byPartition = new Map<number, StoredEvent[]>();
        for (const e of picked) byPartition.set(e.partition, [...(byPartition.get(e.partition) ?? []), e]);
        for (const [p, list] of byPartition) {
          await js.publish(`${env.subjectPrefix}.p${p}`, encodeBatch(list), { msgID: `stress-copy-${copies}` });
          copies += 1;
        }
      }
      await sleep(20 + Math.floor(random() * 20));
    }
  })();

  const pruner = (async () => {
    while (running) {
      const now = (await env.pool.query<{ t: Date }>('SELECT clock_timestamp() AS t')).rows[0]?.t as Date;
      prunes.push(await pruneInbox({ pool: env.pool, consumer: 'stress', before: now, pageSize: 40, snapshotWaitMs: 5000 }));
      await sleep(25 + Math.floor(random() * 25));
    }
  })();

  await writer;
  const total = TRANSACTIONS * EVENTS_PER_TRANSACTION;
  const poisonedIds = new Set(
    (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE (data->>'poison')::boolean")).rows.map((r) => r.id),
  );
  // Every other event handled, every poisoned one dead-lettered; then the fix and the replays,
  // with the pruner and the copier still at work.
  await waitFor('every event handled or dead-lettered', async () => {
    const handled = (await effectCounts(env.pool, 'stress')).size;
    const dead = new Set((await listDeadLetters(env.pool, { consumer: 'stress', limit: 10_000 })).map((d) => d.eventId));
    return handled + [...poisonedIds].filter((id) => dead.has(id)).length >= total;
  }, 60_000);
  poisoned = false;
  const replayed = await replayDeadLetters({
    pool: env.pool, nats: env.nats, store: env.store, streamName: env.streamName, subjectPrefix: env.subjectPrefix, consumer: 'stress', limit: 10_000,
  });
  await waitFor('the replays handled', async () => (await effectCounts(env.pool, 'stress')).size === total, 60_000);
  running = false;
  await Promise.all([copier, pruner]);
  // Everything handled, and every copy taken off the broker (acked), before counting.
  await waitFor('every event handled', async () => (await effectCounts(env.pool, 'stress')).size === total, 60_000);
  const jsm = await jetstreamManager(env.nats);
  await waitFor('every message acked', async () => {
    const info = await jsm.consumers.info(env.streamName, 'stress');
    return info.num_pending === 0 && info.num_ack_pending === 0;
  }, 60_000);

  const effects = await effectCounts(env.pool, 'stress');
  const twice = [...effects].filter(([, n]) => n !== 1);
  assert.deepEqual(twice, [], `every event took effect once (seed ${SEED})`);
  assert.equal(effects.size, total);
  const passed = prunes.reduce((n, r) => n + r.eventsPassed, 0);
  assert.ok(prunes.length >= 3 && passed > 0, `the pruner ran (${prunes.length} runs, ${passed} events passed)`);
  assert.ok(copies > 0 && consumer.stats().duplicatesSkipped > 0, `copies were sent (${copies}) and skipped (${consumer.stats().duplicatesSkipped})`);
  assert.ok(poisonedIds.size > 0 && replayed.length > 0, `poisoned events were dead-lettered and replayed (${poisonedIds.size} poisoned, ${replayed.length} replays)`);
  const opened = prunes.reduce((n, r) => n + r.opened, 0);

  // A last prune passes everything, and the inbox holds no row its horizon covers but those of
  // the replayed events: an open event handled after the prune that listed it keeps its row (a
  // documented limit: the prune walks on from its horizon, never back).
  const now = (await env.pool.query<{ t: Date }>('SELECT clock_timestamp() AS t')).rows[0]?.t as Date;
  const last = await pruneInbox({ pool: env.pool, consumer: 'stress', before: now, snapshotWaitMs: 5000 });
  assert.equal(last.stop.reason, 'read_horizon', JSON.stringify(last.stop));
  const covered = await env.pool.query<{ id: string }>(
    `SELECT i.event_id::text AS id FROM events.inbox i JOIN events.events e ON e.event_id = i.event_id
       JOIN events.inbox_horizons h ON h.consumer = i.consumer
      WHERE i.consumer = 'stress' AND (e.transaction_id, e.position) <= (h.transaction_id, h.position)`,
  );
  const notPoisoned = covered.rows.filter((r) => !poisonedIds.has(r.id));
  assert.deepEqual(notPoisoned, [], 'every other row the horizon covers is gone');
  console.log(
    `inbox stress: ${total} events (${poisonedIds.size} poisoned, ${replayed.length} replays), ${copies} copy messages, ` +
      `${prunes.length} prunes passing ${passed} events (${opened} listed open), ${consumer.stats().duplicatesSkipped} copies skipped`,
  );
});

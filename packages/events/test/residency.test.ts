/**
 * The relay under a residency policy, on real PostgreSQL and NATS JetStream: `eu` data may only
 * be in eu-west-1 and the broker is in us-east-1. Eu-tagged events are withheld (recorded, the
 * checkpoint passes them), the rest go out in order, restarts neither republish nor re-record,
 * and reconciliation counts the withheld apart and reports any that got out as a breach.
 */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import type pg from 'pg';
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import {
  CHECKPOINT_START,
  decodeBatch,
  encodeBatch,
  EventConsumer,
  formatReconcileReport,
  OutboxRelay,
  parseResidencyPolicy,
  readCheckpoint,
  reconcile,
  relayResidencyFromEnv,
  ResidencyConfigError,
  type RelayOptions,
  type ReconcileReport,
  type StoredEvent,
} from '../src/index.ts';
import { readOutbox } from '../src/relay.ts';
import { eventsTestEnv, inTx as inTxOn, waitFor, type EventsTestEnv } from './support.ts';

const RESIDENCY = { policy: { allowed: { eu: ['eu-west-1'], us: ['us-east-1'] } }, location: 'us-east-1' };
const CONSUMER = 'sink';

let env: EventsTestEnv;
let consumer: EventConsumer;
/** What the consumer handled, in order: `<stream id> v<version>`. */
const handled: string[] = [];

const inTx = <T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> => inTxOn(env.pool, fn);

before(async () => {
  env = await eventsTestEnv();
  consumer = new EventConsumer({
    pool: env.pool, nats: env.nats, name: CONSUMER, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
    dlqSubjectPrefix: env.dlqSubjectPrefix,
    handler: (e: StoredEvent) => {
      handled.push(`${e.streamId} v${e.version}`);
      return Promise.resolve();
    },
  });
  await consumer.start();
});

after(async () => {
  await consumer.stop();
  await env.close();
});

function relayOptions(extra: Partial<RelayOptions> = {}): RelayOptions {
  return {
    pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
    residency: RESIDENCY, eventsPerMessageMax: 2, failureWaitMsMax: 50, ...extra,
  };
}

/** Stream ids `<tag>-<role>` (`-<n>` added as needed) of type `acct` that all hash to one partition. */
function streamsInOnePartition(tag: string, roles: readonly string[]): { partition: number; ids: string[] } {
  const partition = env.store.partitionOf('acct', `${tag}-${roles[0]}`);
  const ids = roles.map((role, i) => {
    let id = `${tag}-${role}`;
    for (let n = 1; i > 0 && env.store.partitionOf('acct', id) !== partition; n += 1) id = `${tag}-${role}-${n}`;
    return id;
  });
  return { partition, ids };
}

/** The broker's messages that carry events of the given streams: their ids and decoded events. */
async function brokerMessages(streamIds: readonly string[]): Promise<Array<{ msgId: string; events: StoredEvent[] }>> {
  const jsm = await jetstreamManager(env.nats);
  const info = await jsm.streams.info(env.streamName);
  const out: Array<{ msgId: string; events: StoredEvent[] }> = [];
  for (let seq = info.state.first_seq; info.state.messages > 0 && seq <= info.state.last_seq; seq += 1) {
    const m = await jsm.streams.getMessage(env.streamName, { seq });
    if (m === null) continue;
    const events = decodeBatch(m.data);
    if (events.some((e) => streamIds.includes(e.streamId))) out.push({ msgId: m.header.get('Nats-Msg-Id'), events });
  }
  return out;
}

async function withheldRows(streamIds: readonly string[]): Promise<Array<{ stream_id: string; version: number; region: string; location: string; reason: string; withheld_at: Date }>> {
  const r = await env.pool.query<{ stream_id: string; version: number; region: string; location: string; reason: string; withheld_at: Date }>(
    `SELECT w.stream_id, e.version, w.region, w.location, w.reason, w.withheld_at FROM events.relay_withheld w
       JOIN events.events e ON e.event_id = w.event_id AND e.position = w.position AND e.partition = w.partition
      WHERE w.stream_id = ANY($1::text[]) ORDER BY w.transaction_id, w.position`,
    [streamIds],
  );
  return r.rows;
}

async function positionsOf(streamIds: readonly string[]): Promise<Map<string, bigint>> {
  const r = await env.pool.query<{ k: string; position: string }>(
    `SELECT stream_id || ' v' || version AS k, position::text FROM events.events WHERE stream_id = ANY($1::text[])`,
    [streamIds],
  );
  return new Map(r.rows.map((x) => [x.k, BigInt(x.position)]));
}

/** Waits until every event of the test is below the read horizon, so each relay reads one and the same round. */
async function waitForHorizon(partition: number, streamIds: readonly string[], count: number): Promise<void> {
  await waitFor('the horizon', async () => {
    const events = await readOutbox(env.pool, partition, CHECKPOINT_START, 10_000);
    return events.filter((e) => streamIds.includes(e.streamId)).length === count;
  });
}

/** Whether every event of these streams is at or before its partition's checkpoint. */
async function checkpointPassed(streamIds: readonly string[]): Promise<boolean> {
  const r = await env.pool.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM events.events e LEFT JOIN events.relay_checkpoints c ON c.partition = e.partition
      WHERE e.stream_id = ANY($1::text[]) AND (c.partition IS NULL OR (e.transaction_id, e.position) > (c.transaction_id, c.position))`,
    [streamIds],
  );
  return r.rows[0]?.n === 0;
}

/** Runs a relay until `done`, then stops it and returns its stats. */
async function runRelayUntil(what: string, options: RelayOptions, done: (relay: OutboxRelay) => Promise<boolean>): Promise<ReturnType<OutboxRelay['stats']>> {
  const relay = new OutboxRelay(options);
  relay.start();
  try {
    await waitFor(what, () => done(relay));
  } finally {
    await relay.stop();
  }
  return relay.stats();
}

async function reconcileStreams(streamIds: readonly string[], extra: { from?: Date; to?: Date; publishLagMaxMs?: number } = {}): Promise<ReconcileReport> {
  const r = await env.pool.query<{ lo: Date; hi: Date }>(
    'SELECT min(recorded_at) AS lo, max(recorded_at) AS hi FROM events.events WHERE stream_id = ANY($1::text[])',
    [streamIds],
  );
  const row = r.rows[0];
  assert.ok(row !== undefined);
  return reconcile({
    pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
    from: extra.from ?? row.lo, to: extra.to ?? new Date(row.hi.getTime() + 1), consumers: [CONSUMER], pageSize: 3,
    ...(extra.publishLagMaxMs === undefined ? {} : { publishLagMaxMs: extra.publishLagMaxMs }),
  });
}

describe('the relay under a residency policy', () => {
  test('eu events are withheld and recorded, the rest published in order; restarts neither republish nor re-record', async () => {
    const { partition, ids } = streamsInOnePartition('r1', ['eu', 'free', 'us']);
    const [eu, free, us] = ids as [string, string, string];
    const append = (c: pg.PoolClient, id: string, region: string | null): Promise<unknown> =>
      env.store.append(c, { type: 'acct', id }, [{ type: 'Moved', data: { id } }], { expectedVersion: 'any', ...(region === null ? {} : { region }) });
    // Interleaved in one partition, three transactions apart in time (for the ranged check below).
    await inTx(async (c) => {
      await append(c, eu, 'eu');
      await append(c, free, null);
      await append(c, us, 'us');
    });
    await sleep(5);
    await inTx(async (c) => {
      await append(c, free, null);
      await append(c, eu, 'eu');
    });
    await sleep(5);
    await inTx(async (c) => {
      await append(c, us, 'us');
      await append(c, eu, 'eu');
      await append(c, free, null);
    });
    await waitForHorizon(partition, ids, 8);
    const allowed = [`${free} v1`, `${us} v1`, `${free} v2`, `${us} v2`, `${free} v3`];
    const pos = await positionsOf(ids);
    const at = (k: string): bigint => pos.get(k) as bigint;

    // A relay that "crashes" after every publish, before its checkpoint: it publishes, fails,
    // and publishes the same messages again. The broker keeps one copy of each.
    let publishes = 0;
    const crashing = await runRelayUntil('two publishes of the round', relayOptions({
      afterPublish: (p, events) => {
        if (p !== partition) return;
        assert.equal(events, 5, 'the allowed events of the round');
        publishes += 1;
        throw new Error('crash between publish and checkpoint');
      },
      onError: () => {},
    }), () => Promise.resolve(publishes >= 2));
    assert.deepEqual([crashing.published, crashing.withheld], [0, 0], 'nothing counted before a checkpoint');
    assert.deepEqual(await withheldRows(ids), [], 'nothing recorded before the checkpoint moves');
    assert.deepEqual(await readCheckpoint(env.pool, partition), CHECKPOINT_START);
    const messages = await brokerMessages(ids);
    assert.deepEqual(messages.map((m) => m.events.map((e) => `${e.streamId} v${e.version}`)), [allowed.slice(0, 2), allowed.slice(2, 4), allowed.slice(4)]);
    // Ids: first and last positions; a message with a withheld event inside also names its positions (a digest).
    assert.equal(messages[0]?.msgId, `${partition}:${at(`${free} v1`)}-${at(`${us} v1`)}`);
    assert.match(messages[1]?.msgId ?? '', new RegExp(`^${partition}:${at(`${free} v2`)}-${at(`${us} v2`)}~[A-Za-z0-9_-]{16}$`));
    assert.equal(messages[2]?.msgId, `${partition}:${at(`${free} v3`)}-${at(`${free} v3`)}`);

    // A new instance: republishes the same ids (dropped by the broker), withholds, checkpoints.
    const second = await runRelayUntil('the checkpoint to pass the round', relayOptions(), () => checkpointPassed(ids));
    assert.deepEqual([second.published, second.withheld], [5, 3]);
    assert.deepEqual((await brokerMessages(ids)).map((m) => m.msgId), messages.map((m) => m.msgId), 'no new message');
    await waitFor('the consumer', () => Promise.resolve(handled.filter((h) => ids.some((id) => h.startsWith(`${id} `))).length >= 5));
    await sleep(200); // anything more would arrive now
    assert.deepEqual(handled.filter((h) => ids.some((id) => h.startsWith(`${id} `))), allowed, 'exactly the allowed events, in order, once');
    const withheld = await withheldRows(ids);
    assert.deepEqual(
      withheld.map((w) => [w.stream_id, w.version, w.region, w.location]),
      [[eu, 1, 'eu', 'us-east-1'], [eu, 2, 'eu', 'us-east-1'], [eu, 3, 'eu', 'us-east-1']],
    );
    for (const w of withheld) {
      assert.equal(w.reason, `residency: replicate of stream acct/${eu} refused: its data is eu-resident and may not go to us-east-1; allowed: eu-west-1`);
    }
    const checkpoint = await readCheckpoint(env.pool, partition);
    assert.equal(checkpoint.position, at(`${free} v3`), 'the checkpoint is at the round\'s last event');
    const published = await env.pool.query<{ published: string }>('SELECT published::text FROM events.relay_checkpoints WHERE partition = $1', [partition]);
    assert.equal(published.rows[0]?.published, '5', 'only published events are counted as published');

    // Another instance finds nothing to do.
    const third = await runRelayUntil('every partition held', relayOptions(), async (r) => {
      if (r.stats().partitionsHeld.length < env.store.partitions) return false;
      await sleep(150); // several idle rounds
      return true;
    });
    assert.deepEqual([third.published, third.withheld, third.messages], [0, 0, 0]);

    // Even a checkpoint lost (a relay that re-reads the whole round) changes nothing: the same
    // ids are dropped by the broker, and the withheld records are not written twice.
    await env.pool.query('DELETE FROM events.relay_checkpoints WHERE partition = $1', [partition]);
    const fourth = await runRelayUntil('the checkpoint to pass the round again', relayOptions(), () => checkpointPassed(ids));
    assert.deepEqual([fourth.published, fourth.withheld], [5, 3]);
    assert.deepEqual((await brokerMessages(ids)).map((m) => m.msgId), messages.map((m) => m.msgId), 'no new message');
    assert.deepEqual(await withheldRows(ids), withheld, 'the same records, the same times');
    await sleep(200);
    assert.equal(handled.filter((h) => ids.some((id) => h.startsWith(`${id} `))).length, 5);

    // Reconciliation: clean, the eu events counted as withheld, not as unpublished.
    const report = await reconcileStreams(ids);
    assert.equal(report.ok, true, JSON.stringify(report.issues));
    assert.deepEqual(
      { events: report.events, seen: report.broker.eventsSeen, withheld: report.relay.withheld, republished: report.broker.republished, beyond: report.relay.beyondCheckpoint },
      { events: 8, seen: 5, withheld: 3, republished: 0, beyond: 0 },
    );
    assert.deepEqual(report.issues, []);
    assert.deepEqual(report.consumers.map((c) => [c.name, c.consumed, c.notConsumed]), [[CONSUMER, 5, 0]]);
    assert.match(formatReconcileReport(report), /3 withheld \(residency\)/);
    // The scan may stop early once every checkpointed event of the range is seen: withheld
    // events are not waited for. The first transaction alone: its two allowed events are the
    // first message.
    const first = await env.pool.query<{ t: Date }>('SELECT recorded_at AS t FROM events.events WHERE position = $1', [at(`${free} v1`).toString()]);
    const t1 = first.rows[0]?.t as Date;
    const early = await reconcileStreams(ids, { from: t1, to: new Date(t1.getTime() + 1), publishLagMaxMs: -3_600_000 });
    assert.equal(early.ok, true, JSON.stringify(early.issues));
    assert.deepEqual([early.events, early.relay.withheld, early.broker.stoppedBecause, early.broker.messages], [3, 1, 'past_range_end', 1]);
  });

  test('a withheld event that reached the broker or an inbox is reported as a residency breach', async () => {
    const { partition, ids } = streamsInOnePartition('r2', ['leaked', 'inboxed', 'free']);
    const [leaked, inboxed, free] = ids as [string, string, string];
    await inTx(async (c) => {
      await env.store.append(c, { type: 'acct', id: leaked }, [{ type: 'Moved', data: {} }], { expectedVersion: 'no_stream', region: 'eu' });
      await env.store.append(c, { type: 'acct', id: inboxed }, [{ type: 'Moved', data: {} }], { expectedVersion: 'no_stream', region: 'eu' });
      await env.store.append(c, { type: 'acct', id: free }, [{ type: 'Moved', data: {} }], { expectedVersion: 'no_stream' });
    });
    const stats = await runRelayUntil('the checkpoint to pass them', relayOptions(), () => checkpointPassed(ids));
    assert.deepEqual([stats.published, stats.withheld], [1, 2]);
    await waitFor('the consumer', () => Promise.resolve(handled.includes(`${free} v1`)));
    const clean = await reconcileStreams(ids);
    assert.deepEqual([clean.ok, clean.relay.withheld], [true, 2], JSON.stringify(clean.issues));

    // One gets out anyway (say, a relay run without the policy), and the consumer handles it;
    // the other turns up in the inbox without the broker.
    const [event] = await env.store.readStream(env.pool, 'acct', leaked);
    assert.ok(event !== undefined);
    await jetstream(env.nats).publish(`${env.subjectPrefix}.p${partition}`, encodeBatch([event]), { msgID: `leak-${event.id}` });
    await waitFor('the consumer to take the leaked event', () => Promise.resolve(handled.includes(`${leaked} v1`)));
    const [other] = await env.store.readStream(env.pool, 'acct', inboxed);
    assert.ok(other !== undefined);
    await env.pool.query('INSERT INTO events.inbox (consumer, event_id, position) VALUES ($1, $2, $3)', [CONSUMER, other.id, other.position.toString()]);

    const report = await reconcileStreams(ids);
    assert.equal(report.ok, false);
    assert.equal(report.relay.withheld, 2);
    assert.deepEqual(
      Object.entries(report.issueCounts).filter(([, n]) => n > 0),
      [['residency_breach', 3]],
      'breaches only: not unpublished, not missing, not unconsumed',
    );
    const breaches = report.issues.map((i) => [i.streamId, i.consumer, i.count ?? null]);
    assert.deepEqual(breaches, [[leaked, null, 1], [leaked, CONSUMER, null], [inboxed, CONSUMER, null]]);
    const [onBroker, leakedInbox, inboxOnly] = report.issues;
    assert.match(onBroker?.detail ?? '', /^the relay withheld it at .* \(residency: replicate of stream acct\/r2-leaked\S* refused: .* may not go to us-east-1; allowed: eu-west-1\), yet the broker has it \(stream sequence \d+\)$/);
    assert.match(leakedInbox?.detail ?? '', /yet the consumer received it \(an inbox row\)$/);
    assert.equal(inboxOnly?.eventId, other.id);
    assert.match(formatReconcileReport(report), /issues: residency_breach 3/);
  });
});

describe('residency configuration from the environment', () => {
  test('both variables or neither; bad values name the variable', () => {
    assert.equal(relayResidencyFromEnv({}), null);
    assert.equal(relayResidencyFromEnv({ EVENTS_RESIDENCY_POLICY: '', EVENTS_BROKER_LOCATION: '' }), null);
    assert.deepEqual(relayResidencyFromEnv({ EVENTS_RESIDENCY_POLICY: '{"eu":["eu-west-1"],"us":[]}', EVENTS_BROKER_LOCATION: 'us-east-1' }), {
      policy: { allowed: { eu: ['eu-west-1'], us: [] } },
      location: 'us-east-1',
    });
    const refused = (env: { EVENTS_RESIDENCY_POLICY?: string; EVENTS_BROKER_LOCATION?: string }, variable: string, message: RegExp): void => {
      assert.throws(() => relayResidencyFromEnv(env), (e: unknown) => {
        assert.ok(e instanceof ResidencyConfigError);
        assert.equal(e.variable, variable);
        assert.match(e.message, message);
        assert.ok(e.message.startsWith(`${variable} `));
        return true;
      });
    };
    refused({ EVENTS_RESIDENCY_POLICY: '{"eu":["eu-west-1"]}' }, 'EVENTS_BROKER_LOCATION', /is required when EVENTS_RESIDENCY_POLICY is set/);
    refused({ EVENTS_BROKER_LOCATION: 'us-east-1' }, 'EVENTS_RESIDENCY_POLICY', /is required when EVENTS_BROKER_LOCATION is set/);
    refused({ EVENTS_RESIDENCY_POLICY: 'nope', EVENTS_BROKER_LOCATION: 'us-east-1' }, 'EVENTS_RESIDENCY_POLICY', /is not JSON \(got "nope"\)/);
    refused({ EVENTS_RESIDENCY_POLICY: '{"eu":"eu-west-1"}', EVENTS_BROKER_LOCATION: 'us-east-1' }, 'EVENTS_RESIDENCY_POLICY', /must map each data region to an array/);
    refused({ EVENTS_RESIDENCY_POLICY: '["eu"]', EVENTS_BROKER_LOCATION: 'us-east-1' }, 'EVENTS_RESIDENCY_POLICY', /must map each data region/);
    refused({ EVENTS_RESIDENCY_POLICY: '{"EU":["eu-west-1"]}', EVENTS_BROKER_LOCATION: 'us-east-1' }, 'EVENTS_RESIDENCY_POLICY', /data region "EU", which is not a region tag/);
    refused({ EVENTS_RESIDENCY_POLICY: '{"eu":["eu-west-1 "]}', EVENTS_BROKER_LOCATION: 'us-east-1' }, 'EVENTS_RESIDENCY_POLICY', /location "eu-west-1 ", which is not a location/);
    refused({ EVENTS_RESIDENCY_POLICY: '{"eu":["eu-west-1"]}', EVENTS_BROKER_LOCATION: 'us east 1' }, 'EVENTS_BROKER_LOCATION', /must be a location/);
    // A long value is cut short in the message.
    assert.throws(() => parseResidencyPolicy(`{"eu": [${'"x",'.repeat(100)}`), (e: unknown) => e instanceof ResidencyConfigError && /is not JSON \(got "\{.*\.\.\."\)$/.test(e.message) && e.message.length < 200);
  });
});

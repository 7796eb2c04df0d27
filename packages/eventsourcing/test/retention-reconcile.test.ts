/**
 * Retention's deletion against reconciliation: a stream published, consumed and then lawfully
 * deleted leaves its inbox rows behind (a copy still on the broker must not apply again), and
 * the reconciliation of a range in which they were handled still comes out clean. Until
 * 2026-12-07 each such row was reported as naming an event the store never had
 * (`inbox_unknown_event`), so that range could never reconcile clean again. A row naming an
 * event that was never stored is still reported.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { EventConsumer, formatReconcileReport, OutboxRelay, reconcile } from '@ledgerline/events';
import { eventsTestEnv, inTx, waitFor, type EventsTestEnv } from '../../events/test/support.ts';
import { applyRetention, NO_LEGAL_HOLDS } from '../src/index.ts';

let env: EventsTestEnv;
before(async () => {
  env = await eventsTestEnv();
});
after(async () => {
  await env.close();
});

const DAY_MS = 86_400_000;

test('a deleted stream\'s inbox rows stay, and the range they were handled in still reconciles clean; an unknown one is still reported', async () => {
  const from = (await env.pool.query<{ t: Date }>('SELECT now() AS t')).rows[0]!.t;
  await inTx(env.pool, (c) => env.store.append(c, { type: 'session', id: 's-1' }, [{ type: 'Opened', data: {} }, { type: 'Closed', data: {} }], { expectedVersion: 'no_stream' }));
  await inTx(env.pool, (c) => env.store.append(c, { type: 'kept', id: 'k-1' }, [{ type: 'Kept', data: {} }], { expectedVersion: 'no_stream' }));
  const relay = new OutboxRelay({ pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix });
  relay.start();
  const consumer = new EventConsumer({
    pool: env.pool,
    nats: env.nats,
    name: 'c1',
    streamName: env.streamName,
    filterSubject: `${env.subjectPrefix}.>`,
    dlqSubjectPrefix: env.dlqSubjectPrefix,
    handler: async () => {},
  });
  await consumer.start();
  try {
    await waitFor('the three events in the inbox', async () => (await env.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM events.inbox')).rows[0]!.n === 3);
  } finally {
    await consumer.stop();
    await relay.stop();
  }
  // Where the doomed events stand in the global order, and one of them recorded as withheld by
  // the relay (retention deletes that record with the stream; the deletion keeps the fact).
  const doomed = await env.pool.query<{ position: string; transaction_id: string; event_id: string }>(
    "SELECT position::text, transaction_id::text, event_id::text FROM events.events WHERE stream_type = 'session' ORDER BY position",
  );
  const first = doomed.rows[0]!;
  await env.pool.query(
    `INSERT INTO events.relay_withheld (event_id, partition, position, transaction_id, stream_type, stream_id, region, location, reason)
     SELECT event_id, partition, position, transaction_id, stream_type, stream_id, 'eu', 'us-east-1', 'test' FROM events.events WHERE event_id = $1`,
    [first.event_id],
  );
  const report = await applyRetention(env.pool, { rules: [{ streamType: 'session', deleteAfterDays: 1 }], holds: NO_LEGAL_HOLDS, now: new Date(Date.now() + 2 * DAY_MS) });
  const placed = await env.pool.query<{ position: string; transaction_id: string; withheld: boolean }>(
    'SELECT position::text, transaction_id::text, withheld FROM events.deleted_events ORDER BY position',
  );
  assert.deepEqual(placed.rows, doomed.rows.map((r, i) => ({ position: r.position, transaction_id: r.transaction_id, withheld: i === 0 })));
  assert.equal(report.eventsDeleted, 2);
  // The inbox keeps its rows; the store keeps where the deleted events stood, and nothing of them else.
  assert.equal((await env.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM events.inbox')).rows[0]!.n, 3);
  const gone = await env.pool.query<{ position: string; event_id: string }>('SELECT position::text, event_id::text FROM events.deleted_events ORDER BY position');
  const handled = await env.pool.query<{ position: string; event_id: string }>(
    "SELECT position::text, event_id::text FROM events.inbox WHERE event_id NOT IN (SELECT event_id FROM events.events) ORDER BY position",
  );
  assert.deepEqual(gone.rows, handled.rows);
  assert.equal(gone.rows.length, 2);

  const range = { pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, from, to: new Date(), settleTimeoutMs: 2000 };
  const clean = await reconcile(range);
  assert.equal(clean.ok, true, formatReconcileReport(clean));
  assert.deepEqual(clean.issues, []);

  // An inbox row naming an event the store never had is stray still.
  await env.pool.query("INSERT INTO events.inbox (consumer, event_id, position) VALUES ('c1', $1, 999999)", [randomUUID()]);
  const stray = await reconcile({ ...range, to: new Date() });
  assert.equal(stray.ok, false);
  assert.deepEqual(stray.issues.map((i) => i.kind), ['inbox_unknown_event']);
});

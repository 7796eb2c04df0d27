/**
 * Reconciliation on real PostgreSQL and NATS JetStream: a clean range, and each kind of gap
 * made for real (a relay that never ran, a consumer that skipped, a dead letter, a doubled
 * effect, a stray inbox row, a message the broker lost).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from '@nats-io/jetstream';
import { ADMIN_DATABASE_URL } from '@ledgerline/testing';
import {
  encodeBatch,
  EventConsumer,
  formatReconcileReport,
  OutboxRelay,
  reconcile,
  ReconcileSessionError,
  registerConsumer,
  scanEventStream,
  type ReconcileOptions,
  type ReconcileReport,
  type StoredEvent,
} from '../src/index.ts';
import { runCli } from '../src/cli.ts';
import { eventsTestEnvWithEffects, poolHelpers, runCliOn, waitFor, NATS_URL, type CliRun, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
let relay: OutboxRelay | null = null;
const consumers: EventConsumer[] = [];
const CONSUMERS = ['alpha', 'beta'] as const;

const { inTx, effectCounts } = poolHelpers(() => env.pool);



function startRelay(): void {
  relay = new OutboxRelay({
    pool: env.pool, store: env.store, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix,
    eventsPerMessageMax: 20, onError: (e) => console.error('relay', e),
  });
  relay.start();
}

async function stopRelay(): Promise<void> {
  await relay?.stop();
  relay = null;
}

/** Appends `perStream` events to each of `streams` streams of type `tag`, one transaction per stream. */
async function appendScenario(tag: string, streams: number, perStream: number, type = 'Happened'): Promise<string[]> {
  for (let s = 0; s < streams; s += 1) {
    await inTx((c) => env.store.append(c, { type: tag, id: `${tag}-${s}` }, Array.from({ length: perStream }, (_, i) => ({ type, data: { i } })), {
      expectedVersion: 'no_stream',
    }));
  }
  const r = await env.pool.query<{ id: string }>('SELECT event_id::text AS id FROM events.events WHERE stream_type = $1 ORDER BY position', [tag]);
  return r.rows.map((x) => x.id);
}

/** The recorded-time range of one scenario's events, exactly: [min, max + 1 ms). */
async function rangeOf(tag: string): Promise<{ from: Date; to: Date }> {
  const r = await env.pool.query<{ lo: Date; hi: Date }>('SELECT min(recorded_at) AS lo, max(recorded_at) AS hi FROM events.events WHERE stream_type = $1', [tag]);
  const row = r.rows[0];
  assert.ok(row !== undefined);
  return { from: row.lo, to: new Date(row.hi.getTime() + 1) };
}

async function waitConsumed(ids: string[], who: readonly string[] = CONSUMERS): Promise<void> {
  await waitFor(`effects of ${who.join(', ')}`, async () => {
    for (const c of who) {
      const counts = await effectCounts(c);
      if (!ids.every((id) => counts.has(id))) return false;
    }
    return true;
  });
  // The ack follows the commit: wait until the broker has it, so ack floors are current.
  const jsm = await jetstreamManager(env.nats);
  await waitFor('acks', async () => {
    for (const c of who) {
      const info = await jsm.consumers.info(env.streamName, c);
      if (info.num_pending > 0 || info.num_ack_pending > 0) return false;
    }
    return true;
  });
}

/**
 * Appends a scenario (as appendScenario) and has the relay publish it: a test's own messages
 * on the broker, checkpointed (the relay stops only after its checkpoint) and consumed.
 */
async function publishedScenario(tag: string, streams: number, perStream: number): Promise<string[]> {
  startRelay();
  try {
    const ids = await appendScenario(tag, streams, perStream);
    await waitConsumed(ids);
    return ids;
  } finally {
    await stopRelay();
  }
}

async function run(tag: string, withEffects = true, extra: Partial<ReconcileOptions> = {}): Promise<ReconcileReport> {
  const { from, to } = await rangeOf(tag);
  return reconcile({
    pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, from, to,
    pageSize: 7, // several pages even for small scenarios
    ...(withEffects ? { effectCounts: (c: string) => effectCounts(c) } : {}),
    ...extra,
  });
}

const cli = (args: string[]): Promise<CliRun> => runCliOn(env, args);

before(async () => {
  env = await eventsTestEnvWithEffects();
  for (const name of CONSUMERS) {
    const consumer = new EventConsumer({
      pool: env.pool, nats: env.nats, name, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
      dlqSubjectPrefix: env.dlqSubjectPrefix, maxDeliver: 2, backoffMs: [20],
      handler: async (e: StoredEvent, tx: pg.PoolClient) => {
        // alpha cannot handle Poison; beta handles everything.
        if (name === 'alpha' && e.type === 'Poison') throw new Error('alpha cannot handle Poison');
        await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, name]);
      },
    });
    await consumer.start();
    consumers.push(consumer);
  }
});

after(async () => {
  await stopRelay();
  for (const c of consumers) await c.stop();
  await env.close();
});

describe('reconciliation', () => {
  test('a clean range: every event published and consumed once by each consumer; republished copies are counted, not errors', async () => {
    startRelay();
    try {
      const ids = await appendScenario('clean', 3, 10);
      await waitConsumed(ids);
      // A re-cut batch (a new message id), as a relay that crashed before its checkpoint sends.
      const events = await env.store.readStream(env.pool, 'clean', 'clean-0');
      await jetstream(env.nats).publish(`${env.subjectPrefix}.p${events[0]?.partition}`, encodeBatch(events.slice(0, 5)), { msgID: 'recut-clean' });
      const report = await run('clean');
      assert.equal(report.ok, true, JSON.stringify(report.issues));
      assert.equal(report.events, 30);
      assert.equal(report.broker.eventsSeen, 30);
      assert.equal(report.broker.republished, 5);
      assert.equal(report.broker.republishedCopies, 5);
      assert.equal(report.broker.complete, true);
      assert.deepEqual(report.issues, []);
      for (const c of report.consumers) {
        assert.equal(c.consumed, 30, c.name);
        assert.equal(c.effectsCounted, true);
        assert.ok(c.durable !== null);
      }
      // Told that publishing lags at most "minus an hour", the scan checks at its first message
      // whether every checkpointed event was seen; they were not, so it scans on to the end.
      const notes: string[] = [];
      const eager = await run('clean', true, { publishLagMaxMs: -3_600_000, onProgress: (m) => notes.push(m) });
      assert.equal(eager.ok, true, JSON.stringify(eager.issues));
      assert.equal(eager.broker.stoppedBecause, 'end_of_stream');
      assert.ok(notes.some((n) => /scanning on to the end of the stream/.test(n)), notes.join('\n'));
      const { from, to } = await rangeOf('clean');
      const r = await cli(['reconcile', '--from', from.toISOString(), '--to', to.toISOString()]);
      assert.equal(r.code, 0, r.err);
      assert.match(r.out, /: OK/);
      assert.match(r.out, /consumer alpha: 30 consumed/);
      const json = await cli(['reconcile', '--from', from.toISOString(), '--to', to.toISOString(), '--json', '--consumer', 'beta']);
      assert.equal(json.code, 0, json.err);
      const parsed = JSON.parse(json.out) as ReconcileReport;
      assert.deepEqual(parsed.consumers.map((c) => c.name), ['beta']);
    } finally {
      await stopRelay();
    }
  });

  test('an event appended but never published is reported as unpublished, and not held against the consumers', async () => {
    // Given batches published before this range: the scan that stops early (below) stops at one.
    await publishedScenario('unpub-before', 2, 2);
    const ids = await appendScenario('unpub', 1, 3);
    const report = await run('unpub');
    assert.equal(report.ok, false);
    assert.equal(report.issueCounts.unpublished, 3);
    assert.equal(report.issueCounts.not_consumed, 0);
    assert.equal(report.relay.beyondCheckpoint, 3);
    assert.deepEqual(report.issues.map((i) => i.eventId), ids);
    const first = report.issues[0];
    assert.ok(first !== undefined);
    assert.equal(first.kind, 'unpublished');
    assert.equal(first.consumer, null);
    assert.equal(first.streamType, 'unpub');
    assert.equal(first.streamId, 'unpub-0');
    assert.equal(first.version, 1);
    assert.match(first.position ?? '', /^\d+$/);
    assert.match(first.detail, /relay has not published it/);
    // Nothing of the range is checkpointed, so a scan past the (lag-adjusted) range end stops at once.
    const early = await run('unpub', true, { publishLagMaxMs: -3_600_000 });
    assert.equal(early.broker.stoppedBecause, 'past_range_end');
    assert.equal(early.broker.messages, 1);
    assert.equal(early.issueCounts.unpublished, 3);
    const { from, to } = await rangeOf('unpub');
    const r = await cli(['reconcile', '--from', from.toISOString(), '--to', to.toISOString()]);
    assert.equal(r.code, 1);
    assert.match(r.out, /GAPS FOUND/);
    assert.match(r.out, /unpublished 3/);
    // Once the relay runs, the same range reconciles.
    startRelay();
    try {
      await waitConsumed(ids);
      const again = await run('unpub');
      assert.equal(again.ok, true, JSON.stringify(again.issues));
    } finally {
      await stopRelay();
    }
  });

  test('a range that has not ended is reconciled only up to the database\'s clock, and says so; one that has not begun is refused', async () => {
    const clock = async (): Promise<Date> => (await env.pool.query<{ now: Date }>('SELECT statement_timestamp() AS now')).rows[0]?.now as Date;
    const from = await clock();
    // The run floors the clock to the millisecond: read in the same millisecond as `from`, it would end where the range begins.
    while ((await clock()).getTime() <= from.getTime() + 1) await new Promise((resolve) => setTimeout(resolve, 2));
    const asked = new Date(from.getTime() + 3_600_000);
    const options = { pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, from, to: asked, effectCounts: (c: string) => effectCounts(c) };
    const first = await reconcile(options);
    assert.equal(first.ok, true, JSON.stringify(first.issues));
    assert.equal(first.range.requestedTo, asked.toISOString());
    const end = new Date(first.range.to);
    assert.ok(end.getTime() < asked.getTime() && end.getTime() <= (await clock()).getTime(), first.range.to);
    assert.match(formatReconcileReport(first), /the range asked for ends at .*, which the database's clock had not reached: it is reconciled up to that clock/);
    // An event recorded after the run lies past the end it vouched for, not inside it unchecked.
    const ids = await appendScenario('not-ended', 1, 1);
    const recorded = (await env.pool.query<{ at: Date }>('SELECT recorded_at AS at FROM events.events WHERE event_id = $1', [ids[0]])).rows[0]?.at as Date;
    assert.ok(recorded.getTime() >= end.getTime(), `${recorded.toISOString()} < ${first.range.to}`);
    const vouched = await reconcile({ ...options, to: end });
    assert.deepEqual([vouched.ok, vouched.range.requestedTo, vouched.events], [true, null, 0]);
    // Asked again, the range reaches the event, which was never published.
    const again = await reconcile(options);
    assert.deepEqual([again.ok, again.issueCounts.unpublished], [false, 1]);
    await assert.rejects(reconcile({ ...options, from: asked, to: new Date(asked.getTime() + 1000) }), /the range starts at .*, which the database's clock \(.*\) has not passed: no part of it has ended/);
  });

  test('a transaction that began before the range ends and is still open: the run waits for it, and reports the range incomplete if it does not end', async () => {
    const ids = await publishedScenario('inflight-before', 1, 2);
    const { from } = await rangeOf('inflight-before');
    const late = await env.pool.connect();
    try {
      await late.query('BEGIN');
      await env.store.append(late, { type: 'inflight', id: 'i-0' }, [{ type: 'Happened', data: {} }], { expectedVersion: 'no_stream' });
      const to = new Date(Date.now() + 1);
      const options = { pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, from, to };
      // Given up waiting: the open transaction may still add to the range.
      const open = await reconcile({ ...options, settleTimeoutMs: 200 });
      assert.equal(open.openTransactions, 1);
      assert.equal(open.ok, false, 'not vouched for while a transaction of the range is open');
      assert.deepEqual(open.issues, [], 'and nothing else is wrong');
      assert.match(formatReconcileReport(open), /INCOMPLETE/);
      // Waited for: the transaction commits during the wait, and its event is counted.
      const committing = new Promise((resolve) => setTimeout(resolve, 300)).then(() => late.query('COMMIT'));
      const waited = await reconcile(options);
      await committing;
      assert.equal(waited.openTransactions, 0);
      assert.equal(waited.events, ids.length + 1, 'the late event is in the count');
      assert.equal(waited.issueCounts.unpublished, 1, 'and reported, as the relay has not published it');
      assert.equal(waited.ok, false);
    } finally {
      await late.query('ROLLBACK').catch(() => {});
      late.release();
    }
    startRelay();
    try {
      const [lateId] = (await env.store.readStream(env.pool, 'inflight', 'i-0')).map((e) => e.id);
      assert.ok(lateId !== undefined);
      await waitConsumed([lateId]);
    } finally {
      await stopRelay();
    }
  });

  test('a consumer that skipped an event is reported as not having consumed it', async () => {
    startRelay();
    try {
      const ids = await appendScenario('skip', 1, 4);
      await waitConsumed(ids);
    } finally {
      await stopRelay();
    }
    const ids = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_type = 'skip' ORDER BY position")).rows.map((r) => r.id);
    const [skipped, inboxLost] = ids;
    assert.ok(skipped !== undefined && inboxLost !== undefined);
    // Skipped outright: no inbox row, no effect. And an inbox row lost while the effect stayed.
    await env.pool.query("DELETE FROM events.inbox WHERE consumer = 'alpha' AND event_id = ANY($1::uuid[])", [[skipped, inboxLost]]);
    await env.pool.query("DELETE FROM effects WHERE consumer = 'alpha' AND event_id = $1", [skipped]);
    const report = await run('skip');
    assert.match(formatReconcileReport(report), new RegExp(`- not_consumed \\[alpha\\] event ${skipped} skip/skip-0 v1 pos \\d+ p\\d+: skipped`));
    assert.equal(report.ok, false);
    assert.equal(report.issueCounts.not_consumed, 2);
    const byEvent = new Map(report.issues.map((i) => [i.eventId, i]));
    const a = byEvent.get(skipped);
    assert.ok(a !== undefined);
    assert.equal(a.kind, 'not_consumed');
    assert.equal(a.consumer, 'alpha');
    assert.equal(a.streamId, 'skip-0');
    assert.match(a.detail, /^skipped: the consumer acked stream sequence \d+/);
    const b = byEvent.get(inboxLost);
    assert.ok(b !== undefined);
    assert.equal(b.consumer, 'alpha');
    assert.equal(b.count, 1);
    assert.match(b.detail, /effect was applied 1 time\(s\) without an inbox row/);
    const alpha = report.consumers.find((c) => c.name === 'alpha');
    const beta = report.consumers.find((c) => c.name === 'beta');
    assert.deepEqual([alpha?.consumed, alpha?.notConsumed, alpha?.pending], [2, 2, 0]);
    assert.deepEqual([beta?.consumed, beta?.notConsumed], [4, 0]);
  });

  test('a dead-lettered event is reported as dead-lettered, apart from missing ones', async () => {
    startRelay();
    try {
      await inTx((c) => env.store.append(c, { type: 'dead', id: 'dead-0' }, [
        { type: 'Fine', data: {} },
        { type: 'Poison', data: {} },
        { type: 'Fine', data: {} },
      ], { expectedVersion: 'no_stream' }));
      await waitFor('the dead letter', async () => (await env.pool.query("SELECT 1 FROM events.dead_letters WHERE consumer = 'alpha'")).rowCount === 1);
      const ids = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE stream_type = 'dead'")).rows.map((r) => r.id);
      await waitConsumed(ids, ['beta']);
    } finally {
      await stopRelay();
    }
    const poison = (await env.pool.query<{ id: string }>("SELECT event_id::text AS id FROM events.events WHERE type = 'Poison' AND stream_type = 'dead'")).rows[0]?.id;
    const report = await run('dead');
    assert.match(formatReconcileReport(report), /consumer alpha: 2 consumed, 0 not consumed \(0 pending\), 1 dead-lettered/);
    assert.equal(report.ok, false);
    assert.equal(report.issueCounts.dead_lettered, 1);
    assert.equal(report.issueCounts.not_consumed, 0);
    const issue = report.issues[0];
    assert.ok(issue !== undefined);
    assert.equal(issue.kind, 'dead_lettered');
    assert.equal(issue.eventId, poison);
    assert.equal(issue.consumer, 'alpha');
    assert.equal(issue.version, 2);
    assert.equal(issue.count, 2, 'attempts');
    assert.match(issue.detail, /alpha cannot handle Poison/);
    const alpha = report.consumers.find((c) => c.name === 'alpha');
    assert.deepEqual([alpha?.consumed, alpha?.deadLettered, alpha?.notConsumed], [2, 1, 0]);
  });

  test('a side effect applied twice is reported as a duplicate; a stray inbox row as an unknown event', async () => {
    startRelay();
    let ids: string[];
    try {
      ids = await appendScenario('dup', 1, 3);
      await waitConsumed(ids);
    } finally {
      await stopRelay();
    }
    const doubled = ids[2] as string;
    await env.pool.query("INSERT INTO effects (event_id, consumer) VALUES ($1, 'beta')", [doubled]);
    const stray = randomUUID();
    await env.pool.query("INSERT INTO events.inbox (consumer, event_id, position) VALUES ('beta', $1, 987654321)", [stray]);
    const report = await run('dup');
    assert.equal(report.ok, false);
    assert.equal(report.issueCounts.duplicate_effect, 1);
    assert.equal(report.issueCounts.inbox_unknown_event, 1);
    const dup = report.issues.find((i) => i.kind === 'duplicate_effect');
    assert.ok(dup !== undefined);
    assert.equal(dup.eventId, doubled);
    assert.equal(dup.consumer, 'beta');
    assert.equal(dup.count, 2);
    assert.equal(dup.streamId, 'dup-0');
    assert.equal(dup.version, 3);
    const unknown = report.issues.find((i) => i.kind === 'inbox_unknown_event');
    assert.equal(unknown?.eventId, stray);
    assert.equal(unknown?.position, '987654321');
    assert.equal(report.consumers.find((c) => c.name === 'beta')?.duplicateEffects, 1);
    // Without an effect counter the inbox cannot show a double effect (its key forbids two rows).
    const blind = await run('dup', false);
    assert.equal(blind.issueCounts.duplicate_effect, 0);
    assert.ok(blind.consumers.every((c) => !c.effectsCounted));
    await env.pool.query('DELETE FROM events.inbox WHERE event_id = $1', [stray]);
  });

  test('an event the relay checkpointed but the broker no longer has is reported as missing from the broker', async () => {
    startRelay();
    let ids: string[];
    try {
      ids = await appendScenario('lost', 1, 2);
      await waitConsumed(ids);
    } finally {
      await stopRelay();
    }
    // Find the messages that carry them, and delete them from the stream.
    const seqs: number[] = [];
    await scanEventStream({ nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, startTime: new Date(0) }, (m) => {
      if (m.events?.some((e) => ids.includes(e.id)) === true) seqs.push(m.seq);
      return undefined;
    });
    assert.ok(seqs.length >= 1);
    const jsm = await jetstreamManager(env.nats);
    for (const seq of seqs) await jsm.streams.deleteMessage(env.streamName, seq);
    const report = await run('lost');
    assert.equal(report.ok, false);
    assert.equal(report.issueCounts.missing_from_broker, 2);
    assert.equal(report.issueCounts.not_consumed, 0, 'both consumers have them in their inbox');
    assert.match(report.issues[0]?.detail ?? '', /relay checkpoint of partition \d+ covers it/);
  });

  test('the broker scan counts malformed messages and stops when told to', async () => {
    // A well-formed batch ahead of the malformed message, so the stream holds at least two.
    await publishedScenario('scan', 1, 2);
    await jetstream(env.nats).publish(`${env.subjectPrefix}.p0`, 'not a batch', { msgID: 'garbage-1' });
    let seen = 0;
    const all = await scanEventStream({ nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, startTime: new Date(0) }, () => {
      seen += 1;
      return undefined;
    });
    assert.equal(all.malformed, 1);
    assert.equal(all.stoppedBecause, 'end_of_stream');
    assert.equal(seen, all.messages);
    const two = await scanEventStream(
      { nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, startTime: new Date(0), fetchMessagesMax: 1 },
      (m) => m.seq >= (all.firstSeq ?? 0) + 1,
    );
    assert.deepEqual([two.messages, two.stoppedBecause], [2, 'past_range_end']);
    const later = await scanEventStream({ nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, startTime: new Date(Date.now() + 3_600_000) }, () => undefined);
    assert.deepEqual([later.messages, later.stoppedBecause], [0, 'empty']);
    await assert.rejects(
      reconcile({ pool: env.pool, nats: env.nats, streamName: 'NO_SUCH_STREAM', subjectPrefix: 'nope', from: new Date(0), to: new Date() }),
      /stream not found/,
    );
    await assert.rejects(reconcile({ pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, from: new Date(1), to: new Date(0) }), RangeError);
  });

  test('a consumer with no durable on the broker, and one that has not got there yet', async () => {
    // 30 events published (and consumed by alpha and beta), none of them by either consumer here.
    await publishedScenario('absent', 3, 10);
    await registerConsumer(env.pool, 'ghost');
    await registerConsumer(env.pool, 'laggard');
    const jsm = await jetstreamManager(env.nats);
    // A durable that has received nothing: its ack floor is 0.
    await jsm.consumers.add(env.streamName, { durable_name: 'laggard', ack_policy: AckPolicy.Explicit, deliver_policy: DeliverPolicy.All });
    const report = await run('absent', false, { consumers: ['ghost', 'laggard'], issuesMax: 40 });
    assert.equal(report.ok, false);
    assert.equal(report.issueCounts.not_consumed, 60);
    assert.equal(report.issues.length, 40);
    assert.equal(report.issuesOmitted, 20);
    const ghost = report.consumers.find((c) => c.name === 'ghost');
    const laggard = report.consumers.find((c) => c.name === 'laggard');
    assert.equal(ghost?.durable, null);
    assert.deepEqual([laggard?.durable?.ackFloorSeq, laggard?.pending, laggard?.notConsumed], [0, 30, 30]);
    assert.match(report.issues.find((i) => i.consumer === 'ghost')?.detail ?? '', /no durable consumer ghost/);
    assert.match(report.issues.find((i) => i.consumer === 'laggard')?.detail ?? '', /^pending: at stream sequence \d+, beyond the consumer's ack floor 0/);
    assert.match(formatReconcileReport(report), /and 20 more issues/);
    await jsm.consumers.delete(env.streamName, 'laggard');
  });

  test('on connections that are not one session, as behind a transaction pooler, it refuses with ReconcileSessionError; the CLI takes DATABASE_SESSION_URL', async () => {
    const ids = await appendScenario('pooled', 1, 3);
    // Given a pool whose sessions are reset before every statement, as a pooler that pools
    // transactions may give each statement (each its own transaction) another server session,
    const pooled = new pg.Pool({ connectionString: env.db.url, max: 2 });
    const checkout = pooled.connect.bind(pooled) as (callback?: unknown) => Promise<pg.PoolClient> | undefined;
    let resets = 0;
    Object.assign(pooled, {
      // pool.query checks a client out with a callback, for one statement: left as it is.
      connect: async (callback?: unknown) => {
        if (callback !== undefined) return checkout(callback);
        const client = (await checkout()) as pg.PoolClient;
        const query = client.query.bind(client) as (...args: unknown[]) => Promise<unknown>;
        Object.assign(client, {
          query: async (...args: unknown[]) => {
            await query('DISCARD ALL');
            resets += 1;
            return query(...args);
          },
        });
        return client;
      },
    });
    try {
      // when reconciliation runs on it, then it stops, saying why, instead of reporting on a
      // table it no longer has;
      const { from, to } = await rangeOf('pooled');
      await assert.rejects(
        reconcile({ pool: pooled, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, from, to }),
        (error: unknown) => error instanceof ReconcileSessionError && /pooler that pools transactions/.test(error.message),
      );
      assert.ok(resets >= 2, `the session was reset between statements (${resets})`);
    } finally {
      await pooled.end();
    }
    // and the CLI reconciles on DATABASE_SESSION_URL when it is set (DATABASE_URL here leads
    // nowhere): the three events, never published, are reported as such.
    const { from, to } = await rangeOf('pooled');
    let out = '';
    const code = await runCli(['reconcile', '--from', from.toISOString(), '--to', to.toISOString(), '--json'], {
      env: { DATABASE_URL: 'postgres://nobody@127.0.0.1:1/nowhere', DATABASE_SESSION_URL: env.db.url, NATS_URL, EVENTS_STREAM: env.streamName, EVENTS_SUBJECT_PREFIX: env.subjectPrefix },
      stdout: (t) => (out += t),
      stderr: () => {},
    });
    assert.equal(code, 1);
    const report = JSON.parse(out) as ReconcileReport;
    assert.deepEqual(report.issues.map((i) => [i.kind, i.eventId]).sort(), ids.map((id) => ['unpublished', id]).sort());
  });

  test('the CLI: usage errors exit 2', async () => {
    assert.equal((await cli(['reconcile', '--page-size', '-1'])).code, 2);
    assert.equal((await cli(['reconcile', '--page-size', '0'])).code, 2);
    const noSchema = await runCli(['reconcile'], { env: { DATABASE_URL: ADMIN_DATABASE_URL }, stderr: () => {} });
    assert.equal(noSchema, 2, 'a database without the events schema');
    // The script as npm runs it, in a process of its own.
    const child = spawnSync(process.execPath, [fileURLToPath(new URL('../src/cli.ts', import.meta.url)), '--help'], { encoding: 'utf8' });
    assert.equal(child.status, 0, child.stderr);
    assert.match(child.stdout, /usage:/);
    assert.equal((await cli(['nonsense'])).code, 2);
    assert.equal((await cli(['reconcile', '--from', 'yesterday-ish'])).code, 2);
    assert.equal((await cli(['reconcile', '--from', '2030-01-02T00:00:00Z', '--to', '2030-01-01T00:00:00Z'])).code, 2);
    assert.equal((await cli(['reconcile', '--consumer', 'nobody'])).code, 2);
    assert.equal((await cli(['--bogus'])).code, 2);
    const help = await cli(['--help']);
    assert.equal(help.code, 0);
    assert.match(help.out, /usage:/);
    let err = '';
    const code = await runCli(['reconcile'], { env: {}, stderr: (t) => (err += t) });
    assert.equal(code, 2);
    assert.match(err, /DATABASE_URL/);
  });
});

/** Moves streams of type `tag` into the archive, as applyRetention's statement does. */
async function archive(tag: string): Promise<number> {
  const r = await env.pool.query('WITH moved AS (DELETE FROM events.events WHERE stream_type = $1 RETURNING *) INSERT INTO events.archived_events SELECT *, now() FROM moved', [tag]);
  return r.rowCount ?? 0;
}

function runOver(range: { from: Date; to: Date }, extra: Partial<ReconcileOptions> = {}): Promise<ReconcileReport> {
  return reconcile({ pool: env.pool, nats: env.nats, streamName: env.streamName, subjectPrefix: env.subjectPrefix, ...range, pageSize: 7, ...extra });
}

describe('reconciliation: transactions not yet written, archived events, complete counts', () => {
  test('a transaction that began before the range ends and has only read so far is waited for: it may still append into the range', async () => {
    const reader = await env.pool.connect();
    try {
      // Given a transaction that has read (no transaction id yet) since before the range's end,
      await reader.query('BEGIN');
      const startedAt = (await reader.query<{ t: Date }>('SELECT now() AS t')).rows[0]?.t;
      assert.ok(startedAt !== undefined);
      await new Promise((resolve) => setTimeout(resolve, 20));
      const range = { from: startedAt, to: new Date() };
      // when the range is reconciled while it is open, then the report cannot vouch for it;
      const open = await runOver(range, { consumers: ['beta'], settleTimeoutMs: 200 });
      assert.equal(open.openTransactions, 1);
      assert.equal(open.ok, false);
      assert.deepEqual(open.issues, []);
      assert.match(formatReconcileReport(open), /INCOMPLETE/);
      // and rightly so: it appends, and its event is recorded at its start, inside the range.
      await env.store.append(reader, { type: 'reader', id: 'r-0' }, [{ type: 'Happened', data: {} }], { expectedVersion: 'no_stream' });
      const committing = new Promise((resolve) => setTimeout(resolve, 200)).then(() => reader.query('COMMIT'));
      // A run that waits sees it commit, and counts the event.
      const waited = await runOver(range, { consumers: ['beta'] });
      await committing;
      assert.equal(waited.openTransactions, 0);
      assert.equal(waited.events, 1);
      assert.equal(waited.issueCounts.unpublished, 1);
    } finally {
      await reader.query('ROLLBACK').catch(() => {});
      reader.release();
    }
    startRelay();
    try {
      const ids = (await env.store.readStream(env.pool, 'reader', 'r-0')).map((e) => e.id);
      await waitConsumed(ids);
    } finally {
      await stopRelay();
    }
  });

  test('events whose streams retention archived are still reconciled: consumed ones are clean, unconsumed ones are gaps', async () => {
    // Given events published and consumed by alpha and beta, and a consumer that never ran,
    const ids = await publishedScenario('archived', 2, 5);
    await registerConsumer(env.pool, 'never-ran');
    const range = await rangeOf('archived');
    const before = await runOver(range, { consumers: ['alpha', 'beta', 'never-ran'] });
    assert.equal(before.issueCounts.not_consumed, 10, 'never-ran has consumed none of them');
    // when retention moves their streams into the archive,
    assert.equal(await archive('archived'), 10);
    const after = await runOver(range, { consumers: ['alpha', 'beta', 'never-ran'], effectCounts: (c) => effectCounts(c) });
    // then they are still the range's events, consumed by alpha and beta (no inbox row taken
    // for a stray), and still not consumed by never-ran.
    assert.equal(after.events, 10);
    assert.deepEqual(after.positions, before.positions);
    assert.equal(after.broker.eventsSeen, 10);
    assert.deepEqual(
      after.consumers.map((c) => [c.name, c.consumed, c.notConsumed]),
      [['alpha', 10, 0], ['beta', 10, 0], ['never-ran', 0, 10]],
    );
    assert.deepEqual(
      Object.entries(after.issueCounts).filter(([, n]) => n > 0),
      [['not_consumed', 10]],
      JSON.stringify(after.issues.filter((i) => i.kind !== 'not_consumed')),
    );
    assert.deepEqual(after.issues.map((i) => i.eventId).sort(), [...ids].sort());
    const clean = await runOver(range, { consumers: ['alpha', 'beta'] });
    assert.equal(clean.ok, true, JSON.stringify(clean.issues));
    // An archived event also half in the hot table (a row copied back by hand) is reported,
    // and reconciled once.
    const [copied] = ids;
    await env.pool.query(
      `INSERT INTO events.events (position, transaction_id, partition, event_id, stream_type, stream_id, version, type, schema_version, data, metadata, recorded_at)
       OVERRIDING SYSTEM VALUE
       SELECT position, transaction_id, partition, event_id, stream_type, stream_id, version, type, schema_version, data, metadata, recorded_at
         FROM events.archived_events WHERE event_id = $1`,
      [copied],
    );
    try {
      const twice = await runOver(range, { consumers: ['alpha', 'beta'] });
      assert.equal(twice.events, 10);
      assert.deepEqual(Object.entries(twice.issueCounts).filter(([, n]) => n > 0), [['stored_twice', 1]]);
      assert.equal(twice.issues[0]?.eventId, copied);
      assert.match(twice.issues[0]?.detail ?? '', /both in events\.events .* and in events\.archived_events/);
      assert.deepEqual(twice.consumers.map((c) => c.consumed), [10, 10]);
    } finally {
      await env.pool.query('DELETE FROM events.events WHERE event_id = $1', [copied]);
    }
    // An inbox row naming an archived event at the wrong position is a mismatch, not an unknown event.
    const [, misplaced] = ids;
    await env.pool.query("UPDATE events.inbox SET position = position + 1000000 WHERE consumer = 'beta' AND event_id = $1", [misplaced]);
    try {
      const wrong = await runOver(range, { consumers: ['beta'] });
      assert.deepEqual(Object.entries(wrong.issueCounts).filter(([, n]) => n > 0), [['inbox_position_mismatch', 1]]);
      assert.equal(wrong.issues[0]?.eventId, misplaced);
      assert.match(wrong.issues[0]?.detail ?? '', /the store says \d+/);
    } finally {
      await env.pool.query("UPDATE events.inbox SET position = position - 1000000 WHERE consumer = 'beta' AND event_id = $1", [misplaced]);
    }
  });

  test('stray inbox rows are all counted, however few issues are listed', async () => {
    await registerConsumer(env.pool, 'strays');
    // A range of a millisecond with no event in it; the inbox rows are handled after it began.
    const from = new Date();
    const range = { from, to: new Date(from.getTime() + 1) };
    for (let i = 0; i < 5; i += 1) {
      await env.pool.query("INSERT INTO events.inbox (consumer, event_id, position) VALUES ('strays', $1, $2)", [randomUUID(), 900_000_000 + i]);
    }
    try {
      const none = await runOver(range, { consumers: ['strays'], issuesMax: 0, settleTimeoutMs: 200 });
      assert.equal(none.issueCounts.inbox_unknown_event, 5);
      assert.deepEqual([none.issues.length, none.issuesOmitted], [0, 5]);
      const two = await runOver(range, { consumers: ['strays'], issuesMax: 2, settleTimeoutMs: 200 });
      assert.equal(two.issueCounts.inbox_unknown_event, 5);
      assert.deepEqual(two.issues.map((i) => i.position), ['900000000', '900000001']);
      assert.equal(two.issuesOmitted, 3);
    } finally {
      await env.pool.query("DELETE FROM events.inbox WHERE consumer = 'strays'");
    }
  });

  test('a consumer named twice is reconciled once', async () => {
    await registerConsumer(env.pool, 'named-twice');
    const ids = await publishedScenario('twice', 1, 3);
    const range = await rangeOf('twice');
    const once = await runOver(range, { consumers: ['named-twice'] });
    const twice = await runOver(range, { consumers: ['named-twice', 'beta', 'named-twice'] });
    assert.equal(once.issueCounts.not_consumed, ids.length);
    assert.equal(twice.issueCounts.not_consumed, ids.length);
    assert.deepEqual(twice.consumers.map((c) => [c.name, c.consumed, c.notConsumed]), [['named-twice', 0, 3], ['beta', 3, 0]]);
  });

  test('the CLI: a stream, a subject prefix or a date it cannot use is a usage error naming the option, without a stack trace', async () => {
    const stackFrame = /^\s+at .+:\d+:\d+\)?$/m;
    const cases: Array<[string[], RegExp]> = [
      [['reconcile', '--stream', 'NO_SUCH_STREAM'], /--stream \(or EVENTS_STREAM\): the broker at \S+ has no stream NO_SUCH_STREAM/],
      [['reconcile', '--stream', 'bad name'], /--stream \(or EVENTS_STREAM\): not a stream name/],
      [['dlq', 'replay', '--consumer', 'alpha', '--stream', 'NO_SUCH_STREAM'], /has no stream NO_SUCH_STREAM/],
      [['reconcile', '--subject-prefix', 'a b'], /--subject-prefix .* got "a b"/],
      [['reconcile', '--from=-010000-01-01T00:00:00Z', '--to', '2020-01-01T00:00:00Z'], /--from must be a date-time from 4713 BC on/],
    ];
    for (const [args, message] of cases) {
      const r = await cli(args);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.err}`);
      assert.match(r.err, message, args.join(' '));
      assert.match(r.err, /usage:/);
      assert.doesNotMatch(r.err, stackFrame, `${args.join(' ')}:\n${r.err}`);
    }
    // The earliest date PostgreSQL holds is taken.
    const earliest = await cli(['reconcile', '--from=-004713-11-24T00:00:00Z', '--to', '1970-01-01T00:00:00Z']);
    assert.equal(earliest.code, 0, earliest.err);
    // A failure of what the command talks to is reported, without a stack; only a bug has one.
    const refused = await cli(['reconcile', '--nats-url', 'nats://127.0.0.1:1']);
    assert.equal(refused.code, 2);
    assert.match(refused.err, /^failed: ConnectionError: /m);
    assert.doesNotMatch(refused.err, stackFrame, refused.err);
    const noDatabase = await cli(['reconcile', '--database-url', `${env.db.url}_no_such_database`]);
    assert.equal(noDatabase.code, 2);
    assert.match(noDatabase.err, /^failed: .*does not exist \[SQLSTATE 3D000\]/m);
    assert.doesNotMatch(noDatabase.err, stackFrame, noDatabase.err);
  });
});

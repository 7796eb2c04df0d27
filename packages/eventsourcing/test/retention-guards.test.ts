/**
 * Retention never takes an event from under a reader or a writer: a stream is archived or
 * deleted only once every reader of the global order (relay, active projections, the audit
 * trail's tail, the read horizon) has passed all its hot events, and only if, under the
 * stream's append lock and in the removing statement, none of its events is recent. An
 * archived stream continues at its next version; held streams do not stop a run's progress.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { AuditSequencer, loadSigningKey, migrateAudit } from '@ledgerline/audit';
import { ConcurrencyError, StreamCorruptError } from '@ledgerline/events';
import { AggregateStore, applyRetention, DomainRejection, NO_LEGAL_HOLDS, paymentAggregate, type LegalHolds } from '../src/index.ts';
import { count, esTestEnv, inTx, passReaders as passReadersOf, type EsTestEnv } from './support.ts';

let env: EsTestEnv;
before(async () => {
  env = await esTestEnv();
});
after(async () => {
  await env.close();
});

const DAY_MS = 86_400_000;
const event = { type: 'memo.Noted', data: { text: 'x' } };
// A failing run must end: a wait on a lock that never comes is a failure, not a hang.
const T = { timeout: 60_000 };

async function appendNew(type: string, id: string, n = 1): Promise<void> {
  await inTx(env.pool, (c) => env.store.append(c, { type, id }, Array.from({ length: n }, () => event), { expectedVersion: 'no_stream' }));
}

async function backdate(type: string, days: number): Promise<void> {
  await env.pool.query(`UPDATE events.events SET recorded_at = now() - make_interval(days => $2) WHERE stream_type = $1`, [type, days]);
}

const passReaders = (): Promise<void> => passReadersOf(env.pool);

async function eventOf(type: string, id: string): Promise<{ tx: string; pos: string; partition: number }> {
  const r = await env.pool.query<{ tx: string; pos: string; partition: number }>(
    `SELECT transaction_id::text AS tx, position::text AS pos, partition FROM events.events WHERE stream_type = $1 AND stream_id = $2 ORDER BY version DESC LIMIT 1`,
    [type, id],
  );
  return r.rows[0]!;
}

const hot = (type: string): Promise<number> => count(env.pool, 'SELECT count(*) FROM events.events WHERE stream_type = $1', [type]);

test('retention periods under a day are refused', T, async () => {
  for (const days of [0, 0.5, -1, Number.NaN, Number.POSITIVE_INFINITY]) {
    await assert.rejects(
      applyRetention(env.pool, { rules: [{ streamType: 'memo', archiveAfterDays: days }], holds: NO_LEGAL_HOLDS, now: new Date() }),
      /memo: archiveAfterDays must be a number of days >= 1/,
    );
  }
  await assert.rejects(
    applyRetention(env.pool, { rules: [{ streamType: 'memo', archiveAfterDays: 30 }, { streamType: 'memo2', deleteAfterDays: 0 }], holds: NO_LEGAL_HOLDS, now: new Date() }),
    /memo2: deleteAfterDays must be a number of days >= 1/,
  );
});

test('a stream is not archived before the relay has published all of it, in its partition', T, async () => {
  await appendNew('relayed', 'r-1', 2);
  await backdate('relayed', 40);
  const rule = { rules: [{ streamType: 'relayed', archiveAfterDays: 30 }], holds: NO_LEGAL_HOLDS, now: new Date() };
  // No checkpoint for its partition: the relay has published nothing there yet.
  assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 0);
  // The relay has published the first event, not the second.
  const last = await eventOf('relayed', 'r-1');
  await env.pool.query(
    `INSERT INTO events.relay_checkpoints (partition, transaction_id, position) VALUES ($1, $2::text::xid8, $3::bigint - 1)`,
    [last.partition, last.tx, last.pos],
  );
  assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 0);
  // Other partitions' checkpoints far ahead do not count for this one.
  await env.pool.query(
    `INSERT INTO events.relay_checkpoints (partition, transaction_id, position)
     SELECT p, '4000000000'::xid8, 1 FROM generate_series(0, (SELECT partitions - 1 FROM events.settings)) p WHERE p <> $1`,
    [last.partition],
  );
  assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 0);
  await env.pool.query('UPDATE events.relay_checkpoints SET position = $2 WHERE partition = $1', [last.partition, last.pos]);
  assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 2);
  await env.pool.query('DELETE FROM events.relay_checkpoints');
});

test('a stream is not archived or deleted before every active projection generation has applied it', T, async () => {
  await appendNew('projected', 'p-1');
  await backdate('projected', 400);
  await passReaders();
  const p = await eventOf('projected', 'p-1');
  await env.pool.query(`INSERT INTO events.projections (name, generation, active, transaction_id, position) VALUES ('retention_a', 1, true, $1::text::xid8, $2::bigint - 1)`, [p.tx, p.pos]);
  await env.pool.query(`INSERT INTO events.projections (name, generation, active, transaction_id, position) VALUES ('retention_b', 1, true, $1::text::xid8, $2)`, [p.tx, p.pos]);
  for (const rules of [[{ streamType: 'projected', archiveAfterDays: 30 }], [{ streamType: 'projected', deleteAfterDays: 365 }]]) {
    const r = await applyRetention(env.pool, { rules, holds: NO_LEGAL_HOLDS, now: new Date() });
    assert.equal(r.eventsArchived + r.eventsDeleted, 0, 'projection retention_a has not applied p-1');
  }
  // An inactive generation (a rebuild beside the active one) does not hold retention back.
  await env.pool.query(`UPDATE events.projections SET position = $1 WHERE name = 'retention_a'`, [p.pos]);
  await env.pool.query(`INSERT INTO events.projections (name, generation, active) VALUES ('retention_a', 2, false)`);
  const r = await applyRetention(env.pool, { rules: [{ streamType: 'projected', archiveAfterDays: 30 }], holds: NO_LEGAL_HOLDS, now: new Date() });
  assert.equal(r.eventsArchived, 1);
  await env.pool.query(`DELETE FROM events.projections WHERE name LIKE 'retention_%'`);
});

test('an event of a transaction at or above the read horizon is not removed, whatever the checkpoints say', T, async () => {
  const open = await env.pool.connect();
  try {
    // A transaction of this database that may still commit events holds the horizon at its id.
    await open.query('BEGIN');
    await open.query('SELECT pg_current_xact_id()');
    await appendNew('horizon', 'h-1');
    await backdate('horizon', 40);
    await env.pool.query('DELETE FROM events.relay_checkpoints');
    await env.pool.query(`INSERT INTO events.relay_checkpoints (partition, transaction_id, position)
      SELECT p, '4000000000'::xid8, 1 FROM generate_series(0, (SELECT partitions - 1 FROM events.settings)) p`);
    const rule = { rules: [{ streamType: 'horizon', archiveAfterDays: 30 }], holds: NO_LEGAL_HOLDS, now: new Date() };
    assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 0);
    await open.query('ROLLBACK');
    assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 1);
  } finally {
    await open.query('ROLLBACK').catch(() => {});
    open.release();
    await env.pool.query('DELETE FROM events.relay_checkpoints');
  }
});

test('an append that holds the stream lock while retention lists the stream is waited for, and keeps the stream', T, async () => {
  await appendNew('locked', 'l-1');
  await backdate('locked', 400);
  await passReaders();
  const writer = await env.pool.connect();
  try {
    await writer.query('BEGIN');
    await env.store.append(writer, { type: 'locked', id: 'l-1' }, [event], { expectedVersion: 1 });
    const run = applyRetention(env.pool, { rules: [{ streamType: 'locked', deleteAfterDays: 365 }], holds: NO_LEGAL_HOLDS, now: new Date() });
    await sleep(300);
    await writer.query('COMMIT');
    const report = await run;
    assert.deepEqual({ deleted: report.eventsDeleted, versions: await hot('locked') }, { deleted: 0, versions: 2 });
  } finally {
    await writer.query('ROLLBACK').catch(() => {});
    writer.release();
  }
});

test('an event committed without the lock (appendMany) between the check and the removal stops the removal', T, async () => {
  for (const action of ['archive', 'delete'] as const) {
    const type = `unlocked-${action}`;
    await appendNew(type, 'u-1');
    await backdate(type, 400);
    await passReaders();
    let raced = false;
    const holds: LegalHolds = {
      async isHeld() {
        if (!raced) {
          raced = true;
          await inTx(env.pool, (c) => env.store.appendMany(c, [{ streamType: type, streamId: 'u-1', version: 2, event }]));
        }
        return false;
      },
    };
    const rule = action === 'archive' ? { streamType: type, archiveAfterDays: 30 } : { streamType: type, deleteAfterDays: 365 };
    const report = await applyRetention(env.pool, { rules: [rule], holds, now: new Date() });
    assert.ok(raced);
    assert.deepEqual({ removed: report.eventsArchived + report.eventsDeleted, versions: await hot(type) }, { removed: 0, versions: 2 }, action);
  }
});

test('an archived stream continues at its next version; a new stream of the same id is refused', T, async () => {
  await appendNew('ticket', 't-1', 2);
  await backdate('ticket', 40);
  await passReaders();
  const archive = { rules: [{ streamType: 'ticket', archiveAfterDays: 30 }], holds: NO_LEGAL_HOLDS, now: new Date() };
  assert.equal((await applyRetention(env.pool, archive)).eventsArchived, 2);
  await assert.rejects(
    inTx(env.pool, (c) => env.store.append(c, { type: 'ticket', id: 't-1' }, [event], { expectedVersion: 'no_stream' })),
    (e: unknown) => e instanceof ConcurrencyError && e.actual === 2,
  );
  const next = await inTx(env.pool, (c) => env.store.append(c, { type: 'ticket', id: 't-1' }, [event], { expectedVersion: 2 }));
  assert.equal(next.version, 3);
  // Once version 3 is in the hot table, it is the one the next append follows.
  const any = await inTx(env.pool, (c) => env.store.append(c, { type: 'ticket', id: 't-1' }, [event], { expectedVersion: 'any' }));
  assert.equal(any.version, 4);

  // The stream reads whole: its archived versions, then the hot one.
  assert.deepEqual((await env.store.readStream(env.pool, 'ticket', 't-1')).map((e) => e.version), [1, 2, 3, 4]);
  assert.deepEqual((await env.store.readStream(env.pool, 'ticket', 't-1', 2)).map((e) => e.version), [2, 3, 4]);
  assert.equal(await env.store.streamVersion(env.pool, 'ticket', 't-1'), 4);

  // An aggregate whose stream was archived (its snapshot dropped with it) loads from the
  // archive: it is neither started again from nothing nor stuck.
  const payments = new AggregateStore(env.store, paymentAggregate({ snapshotEvery: 2 }));
  await inTx(env.pool, (c) => payments.handle(c, 'pay-1', { type: 'Initiate', amountMinor: 1000n, currency: 'EUR', payer: 'a', payee: 'b', channel: 'card' }));
  await inTx(env.pool, (c) => payments.handle(c, 'pay-1', { type: 'Authorize', authorizationCode: 'A1' }));
  await inTx(env.pool, (c) => payments.handle(c, 'pay-1', { type: 'Capture', amountMinor: 1000n }));
  await passReaders();
  const r = await applyRetention(env.pool, { rules: [{ streamType: 'payment', archiveAfterDays: 30 }], holds: NO_LEGAL_HOLDS, now: new Date(Date.now() + 31 * DAY_MS) });
  assert.equal(r.eventsArchived, 3);
  assert.equal(await hot('payment'), 0);
  const loaded = await payments.load(env.pool, 'pay-1');
  assert.deepEqual([loaded.version, loaded.snapshotVersion, loaded.eventsFolded, loaded.state.status], [3, null, 3, 'captured']);
  await assert.rejects(
    inTx(env.pool, (c) => payments.handle(c, 'pay-1', { type: 'Initiate', amountMinor: 5n, currency: 'EUR', payer: 'x', payee: 'y', channel: 'card' })),
    (e: unknown) => e instanceof DomainRejection,
  );
  const refunded = await inTx(env.pool, (c) => payments.handle(c, 'pay-1', { type: 'Refund', refundId: 'r-1', amountMinor: 400n }));
  assert.deepEqual([refunded.version, refunded.state.status, refunded.state.refundedMinor], [4, 'captured', 400n]);
  assert.equal(await hot('payment'), 1);
  assert.equal((await payments.load(env.pool, 'pay-1')).state.refundedMinor, 400n);
});

test('a version held by both the hot table and the archive is refused, not folded twice', T, async () => {
  await appendNew('copied', 'c-1', 2);
  await env.pool.query("INSERT INTO events.archived_events SELECT *, now() FROM events.events WHERE stream_type = 'copied' AND version = 2");
  await assert.rejects(env.store.readStream(env.pool, 'copied', 'c-1'), (e: unknown) => e instanceof StreamCorruptError && e.version === 2 && /holds version 2 both/.test(e.message));
  assert.deepEqual((await env.store.readStream(env.pool, 'copied', 'c-1', 1, { asOf: { time: new Date(0) } })).length, 0, 'a read that stops before the copy is not refused');
});

test('held streams do not use up streamsMax: each run reaches the due streams after them', T, async () => {
  for (const id of ['h-a', 'h-b', 'h-c', 'z-free', 'z-free-2']) await appendNew('memo', id);
  await passReaders();
  const holds: LegalHolds = { isHeld: (_c, s) => Promise.resolve(s.streamId.startsWith('h-')) };
  const run = (): ReturnType<typeof applyRetention> =>
    applyRetention(env.pool, { rules: [{ streamType: 'memo', deleteAfterDays: 1 }], holds, now: new Date(Date.now() + 2 * DAY_MS), streamsMax: 2 });
  const first = await run();
  assert.deepEqual({ deleted: first.deleted.map((s) => s.streamId), held: first.held.map((s) => s.streamId) }, { deleted: ['z-free', 'z-free-2'], held: ['h-a', 'h-b', 'h-c'] });
  // streamsMax still bounds what one run removes.
  for (const id of ['z-1', 'z-2', 'z-3']) await appendNew('memo', id);
  await passReaders();
  assert.deepEqual((await run()).deleted.map((s) => s.streamId), ['z-1', 'z-2']);
  assert.deepEqual((await run()).deleted.map((s) => s.streamId), ['z-3']);
  assert.equal(await hot('memo'), 3);
});

// Last: with the audit schema in place, every run from here on has the trail's tail as a reader.
test('once the audit trail tails the events, a stream is not removed before the sequencer has recorded it', T, async () => {
  await migrateAudit(env.db.url);
  // The schema alone, with a sequencer that does not tail events, holds nothing back.
  await appendNew('receipt', 'r-0');
  await backdate('receipt', 40);
  await passReaders();
  const rule = { rules: [{ streamType: 'receipt', archiveAfterDays: 30 }], holds: NO_LEGAL_HOLDS, now: new Date() };
  assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 1);

  const sequencer = new AuditSequencer({ pool: env.pool, signer: loadSigningKey(undefined, { production: false }), origin: 'ledgerline/test', tailEvents: true, checkpointIntervalMs: 0 });
  try {
    const integrate = async (): Promise<void> => {
      for (let r = await sequencer.round(); r.records > 0; r = await sequencer.round());
    };
    await integrate();
    await appendNew('receipt', 'r-1');
    await backdate('receipt', 40);
    await passReaders();
    assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 0, 'the sequencer has not reached r-1');
    await integrate();
    assert.equal((await applyRetention(env.pool, rule)).eventsArchived, 1);
  } finally {
    await sequencer.close();
  }
});

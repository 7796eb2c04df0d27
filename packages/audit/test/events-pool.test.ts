/**
 * The sequencer reads the event store through a pool of its own (SequencerOptions.eventsPool:
 * the event store's owner's login, so that nothing the owner attaches to the table runs with
 * the sequencer's rights). When that pool cannot read, the round still integrates the queue,
 * and says why the events waited; once it reads again, the events are integrated where the
 * cursor stood, each once.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { AuditSequencer, verifyLog } from '../src/index.ts';
import { auditTestEnv, entry, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv({ withEvents: false });
});
after(async () => {
  await t.close();
});

test('an event store that cannot be read leaves the round to the queue, reported; then its events come, each once', async () => {
  for (let i = 0; i < 3; i += 1) {
    await t.events.append(t.pool, { type: 'ticket', id: `t-${i}` }, [{ type: 'TicketOpened', data: { i } }], { expectedVersion: 'no_stream' });
  }
  // Nothing listens on port 1: every connection of this pool is refused.
  const dead = new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:1/none', connectionTimeoutMillis: 1000, max: 1 });
  dead.on('error', () => {});
  const errors: string[] = [];
  const cut = new AuditSequencer({ pool: t.pool, eventsPool: dead, signer: t.signer, origin: 'ledgerline/test', tailEvents: true, checkpointIntervalMs: 0, onError: (e) => errors.push(String(e)) });
  try {
    t.sink.record(entry(1));
    t.sink.record(entry(2));
    await t.sink.flush();
    const round = await cut.round({ forceCheckpoint: true });
    assert.equal(round.records, 2, 'the queued entries, without the events');
    assert.equal(errors.length, 1);
    assert.match(errors[0] ?? '', /the event store could not be read, so this round integrates the queue only/);
    const leaves = async (): Promise<number> => Number((await t.pool.query<{ n: string }>('SELECT coalesce(sum(leaf_count), 0)::text AS n FROM audit.event_leaves')).rows[0]?.n);
    assert.equal(await leaves(), 0);
  } finally {
    await dead.end();
  }

  // A pool that reads: the three events, once, after the two records.
  const reader = new pg.Pool({ connectionString: t.db.url, max: 1 });
  const whole = new AuditSequencer({ pool: t.pool, eventsPool: reader, signer: t.signer, origin: 'ledgerline/test', tailEvents: true, checkpointIntervalMs: 0 });
  try {
    assert.equal((await whole.round({ forceCheckpoint: true })).records, 3);
    assert.equal((await whole.round({ forceCheckpoint: true })).records, 0);
  } finally {
    await reader.end();
  }
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
  assert.equal(report.records, 5);
});

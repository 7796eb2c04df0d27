/**
 * The sequencer's close under writers that do not stop (other instances of the service keep
 * writing while this one shuts down): it integrates what there was when it was called, signs a
 * final checkpoint over it, and returns.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { verifyLog } from '../src/index.ts';
import { auditTestEnv, entry, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv();
});
after(async () => {
  await t.close();
});

test('close returns while writers keep writing, with everything before it integrated and signed', async () => {
  let stop = false;
  let written = 0;
  const writer = (async () => {
    while (!stop) {
      written += 1;
      await t.events.append(t.pool, { type: 'ticket', id: `t-${written}` }, [{ type: 'TicketOpened', data: { n: written } }], { expectedVersion: 'no_stream' });
      t.sink.record(entry(written));
    }
  })();
  try {
    while (written < 200) await new Promise((r) => setTimeout(r, 5));
    await t.sink.flush();
    const before = await t.pool.query<{ tx: string; pos: string; queued: string }>(
      `SELECT e.transaction_id::text AS tx, e.position::text AS pos, (SELECT max(id) FROM audit.queue)::text AS queued
         FROM events.events e ORDER BY e.transaction_id DESC, e.position DESC LIMIT 1`,
    );
    const at = before.rows[0] as { tx: string; pos: string; queued: string };
    t.sequencer.start();
    const closed = await Promise.race([t.sequencer.close().then(() => 'closed'), new Promise((r) => setTimeout(() => r('still integrating'), 20_000))]);
    assert.equal(closed, 'closed', 'close returned while the writer kept writing');
    assert.ok(written > 200, 'the writer was still writing');
    const state = await t.pool.query<{ reached: boolean; left: boolean; size: string }>(
      `SELECT (s.event_transaction_id, s.event_position) >= ($1::text::xid8, $2::bigint) AS reached,
              EXISTS (SELECT 1 FROM audit.queue WHERE id <= $3::bigint) AS left,
              (SELECT max(tree_size) FROM audit.checkpoints)::text AS size
         FROM audit.sequencer_state s`,
      [at.tx, at.pos, at.queued],
    );
    assert.deepEqual({ reached: state.rows[0]?.reached, left: state.rows[0]?.left }, { reached: true, left: false });
    const leaves = await t.pool.query<{ n: string }>('SELECT ((SELECT coalesce(sum(leaf_count), 0) FROM audit.event_leaves) + (SELECT count(*) FROM audit.records))::text AS n');
    assert.equal(state.rows[0]?.size, leaves.rows[0]?.n, 'the final checkpoint covers every leaf');
  } finally {
    stop = true;
    await writer;
  }
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

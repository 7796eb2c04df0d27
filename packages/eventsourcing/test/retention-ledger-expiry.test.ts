/**
 * The ledger continues a pending transfer's stream (its expiry, or its posting, as version 2)
 * after retention deleted the stream's history. The append's version check (migration
 * 1770500000000) first refused that, since the stream was at version 0: every expiry sweep
 * failed on it, holds were never released, and a batch that met it failed whole (a review
 * found it before release). A stream with no event at all may be continued at any version.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ManualClock } from '@ledgerline/testing';
import { LedgerEngine, newId } from '@ledgerline/ledger';
import { ledgerTestDb } from '../../ledger/test/support.ts';
import { applyRetention, NO_LEGAL_HOLDS } from '../src/index.ts';

test('pending transfers whose streams retention deleted still expire, and their events are appended', async () => {
  const t = await ledgerTestDb();
  const clock = new ManualClock();
  const engine = new LedgerEngine({ pool: t.pool, clock: clock.now, events: t.events });
  try {
    const [a, b] = [newId(), newId()];
    await engine.createAccounts([a, b].map((id) => ({ id, ledger: 'USD', code: 10, flags: {} })));
    const [p1, p2] = [newId(), newId()];
    const made = await engine.createTransfers([
      { id: p1, debitAccountId: a, creditAccountId: b, amount: 5n, ledger: 'USD', code: 1, flags: { pending: true }, timeoutSeconds: 10 },
      { id: p2, debitAccountId: a, creditAccountId: b, amount: 7n, ledger: 'USD', code: 1, flags: { pending: true }, timeoutSeconds: 20 },
    ]);
    assert.deepEqual(made.map((r) => r.result), ['ok', 'ok']);
    // Every reader has passed everything (as a running relay would have), so retention may delete.
    const partitions = (await t.pool.query<{ partitions: number }>('SELECT partitions FROM events.settings')).rows[0]!.partitions;
    for (let p = 0; p < partitions; p++) {
      await t.pool.query('INSERT INTO events.relay_checkpoints (partition, transaction_id, position) SELECT $1, max(transaction_id), max(position) FROM events.events', [p]);
    }
    const deleted = await applyRetention(t.pool, { rules: [{ streamType: 'ledger.transfer', deleteAfterDays: 1 }], holds: NO_LEGAL_HOLDS, now: new Date(Date.now() + 3 * 86_400_000) });
    assert.equal(deleted.deleted.length, 2);
    clock.advanceSeconds(60);
    assert.equal(await engine.expirePendingTransfers(), 2);
    const versions = await t.pool.query<{ id: string; version: number }>("SELECT stream_id AS id, version FROM events.events WHERE stream_type = 'ledger.transfer' ORDER BY version");
    assert.deepEqual(versions.rows.map((r) => r.version), [2, 2]);
    assert.equal((await t.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM ledger.transfers WHERE pending_status = 'pending'")).rows[0]!.n, 0);
  } finally {
    await engine.close();
    await t.close();
  }
});

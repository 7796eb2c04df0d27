/**
 * An expiry inside a batch: the ledger expires a pending transfer at the point of the batch
 * where a transfer meets it, so its event must come at that point of the stream, or readers
 * folding in position order disagree with the ledger's own tables.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { ManualClock } from '@ledgerline/testing';
import { AccountFlag, LedgerEngine, LedgerEventType } from '@ledgerline/ledger';
import { ensureProjection, ledgerBalancesProjection as p, readProjectedBalances, rebuild, reconcileLedger, runBatch } from '../src/index.ts';
import { esTestEnv, waitFor, type EsTestEnv } from './support.ts';

const acct = (n: number): string => `00000000-0000-7000-8000-${String(n).padStart(12, '0')}`;
const tid = (n: number): string => `20000000-0000-7000-8000-${String(n).padStart(12, '0')}`;
const CLOSED = AccountFlag.closed;

let env: EsTestEnv;
before(async () => { env = await esTestEnv({ ledger: true }); await ensureProjection(env.pool, p); });
after(async () => { await env.close(); });

test('an expiry met inside a batch is recorded before the transfer that met it, and every reader agrees with the ledger', async () => {
  const clock = new ManualClock();
  const engine = new LedgerEngine({ pool: env.pool, clock: clock.now, events: env.store });
  const [a, b, c] = [acct(1), acct(2), acct(3)];
  try {
    await engine.createAccounts([a, b, c].map((id) => ({ id, ledger: 'USD', code: 1 })));
    await engine.createTransfers([{ id: tid(1), debitAccountId: a, creditAccountId: b, amount: 100n, ledger: 'USD', code: 1 }]);
    // P closes c, for one second.
    await engine.createTransfers([{ id: tid(2), debitAccountId: b, creditAccountId: c, amount: 5n, ledger: 'USD', code: 1, flags: { pending: true, closingCredit: true }, timeoutSeconds: 1 }]);
    clock.advanceSeconds(2);
    // One batch: the void finds P expired (expiring it reopens c; the void is rejected); Z then closes c again.
    const res = await engine.createTransfers([
      { id: tid(3), pendingId: tid(2), flags: { voidPendingTransfer: true } },
      { id: tid(4), debitAccountId: a, creditAccountId: c, amount: 7n, ledger: 'USD', code: 1, flags: { pending: true, closingCredit: true } },
    ]);
    assert.deepEqual(res.map((r) => r.result), ['pending_transfer_expired', 'ok']);
  } finally {
    await engine.close();
  }
  const ev = await env.pool.query<{ type: string; id: string; ts: string }>(
    `SELECT type, data->>'id' AS id, data->>'timestamp' AS ts FROM events.events
      WHERE stream_type = 'ledger.transfer' AND data->>'id' IN ($1, $2, $3) ORDER BY transaction_id, position`,
    [tid(2), tid(3), tid(4)],
  );
  assert.deepEqual(ev.rows.map((r) => [r.type, r.id]), [
    [LedgerEventType.transferPending, tid(2)],
    [LedgerEventType.pendingTransferExpired, tid(2)],
    [LedgerEventType.transferRejected, tid(3)],
    [LedgerEventType.transferPending, tid(4)],
  ]);
  // Position order and the ledger's timestamps agree (the expiry shares the void's timestamp).
  const ts = ev.rows.map((r) => BigInt(r.ts));
  for (let i = 1; i < ts.length; i += 1) assert.ok((ts[i] as bigint) >= (ts[i - 1] as bigint), `timestamps out of order: ${ts.join(', ')}`);
  assert.equal(ts[1], ts[2]);

  const live = await env.pool.query<{ flags: number }>(`SELECT flags FROM ledger.accounts WHERE id = $1`, [c]);
  assert.equal((live.rows[0]?.flags ?? 0) & CLOSED, CLOSED, 'the ledger closed c');
  await waitFor('catch up', async () => (await runBatch(env.pool, env.store, p, { generation: 'active', batchSize: 1000 })).applied === 0);
  assert.equal(((await readProjectedBalances(env.pool)).get(c)?.flags ?? 0) & CLOSED, CLOSED, 'incremental projection');
  const rep = await reconcileLedger(env.pool);
  assert.deepEqual(rep.differences, []);
  assert.equal(rep.ok, true);
  const incremental = await readProjectedBalances(env.pool);
  await rebuild(env.pool, env.store, p, { mode: 'blue-green', batchSize: 1000 });
  assert.deepEqual(await readProjectedBalances(env.pool), incremental, 'set-based rebuild equals incremental');
});

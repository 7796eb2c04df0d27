/**
 * The ledger service records who and why in every event a request causes.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { LedgerEngine, newId } from '@ledgerline/ledger';
import { buildLedgerService } from '../src/app.ts';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';

let t: LedgerTestDb;
before(async () => {
  t = await ledgerTestDb();
});
after(async () => {
  await t.close();
});

test('a transfer request carries correlation, causation, actor, client address and trace context into its events', async () => {
  const engine = new LedgerEngine({ pool: t.pool, events: t.events });
  const app = await buildLedgerService({ engine, pool: t.pool, logger: false });
  try {
    const [a, b] = [newId(), newId()];
    const opened = await app.inject({ method: 'POST', url: '/v1/accounts/batch', payload: { accounts: [{ id: a, ledger: 'USD', code: 1 }, { id: b, ledger: 'USD', code: 1 }] } });
    assert.equal(opened.statusCode, 200);
    const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
    const id = newId();
    const res = await app.inject({
      method: 'POST',
      url: '/v1/transfers',
      headers: { 'x-correlation-id': 'order-42', 'x-client-id': 'svc-payments', traceparent, 'x-request-id': 'req-1' },
      payload: { id, debit_account_id: a, credit_account_id: b, amount: '700', ledger: 'USD', code: 1 },
    });
    assert.equal(res.statusCode, 201);
    const { rows } = await t.pool.query<{ type: string; metadata: Record<string, string>; data: Record<string, unknown> }>(
      "SELECT type, metadata, data FROM events.events WHERE stream_type = 'ledger.transfer' AND stream_id = $1",
      [id],
    );
    assert.equal(rows.length, 1);
    assert.equal(rows[0]?.type, 'ledger.TransferPosted');
    // Auth is off: the x-client-id is carried as the caller's claim, not as an identity.
    assert.deepEqual(rows[0]?.metadata, { correlationId: 'order-42', causationId: 'req-1', actor: 'claimed:svc-payments', ip: '127.0.0.1', traceparent });
    assert.equal(rows[0]?.data.amount, '700');
    const accountEvents = await t.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM events.events WHERE stream_type = 'ledger.account'");
    assert.equal(accountEvents.rows[0]?.n, 2);
    // Without the headers: the request id correlates, the actor is anonymous.
    const plain = await app.inject({ method: 'POST', url: '/v1/transfers', payload: { id: newId(), debit_account_id: a, credit_account_id: b, amount: '1', ledger: 'USD', code: 1 } });
    assert.equal(plain.statusCode, 201);
    const last = await t.pool.query<{ metadata: Record<string, string> }>('SELECT metadata FROM events.events ORDER BY position DESC LIMIT 1');
    const requestId = plain.headers['x-request-id'];
    assert.deepEqual(last.rows[0]?.metadata, { correlationId: requestId, causationId: requestId, actor: 'anonymous', ip: '127.0.0.1' });
    await assertInvariants(t.pool, { events: true });
  } finally {
    await app.close();
    await engine.close();
  }
});

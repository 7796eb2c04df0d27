/**
 * The ledger service's observability: its own metrics (transfers, batches, pool) at
 * /metrics beside the runtime's, and the degradation state in /ready when load shedding is
 * configured, against a real, freshly migrated PostgreSQL.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { LedgerEngine, newId } from '@ledgerline/ledger';
import type { Service } from '@ledgerline/service-runtime';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { buildLedgerService } from '../src/app.ts';

describe('ledger metrics and degradation', () => {
  let t: LedgerTestDb;
  let engine: LedgerEngine;
  let app: Service;
  before(async () => {
    t = await ledgerTestDb();
    engine = new LedgerEngine({ pool: t.pool, events: t.events });
    app = await buildLedgerService({
      engine,
      pool: t.pool,
      logger: false,
      resilience: {
        metrics: { processMetrics: false },
        loadShedding: { concurrencyMax: 64, queueMax: 64, targetQueueMs: 50, intervalMs: 500 },
      },
    });
  });
  after(async () => {
    await app.close();
    await engine.close();
    await assertInvariants(t.pool, { events: true });
    await t.close();
  });

  it('exports transfers, batches and pool usage, and request metrics per route', async () => {
    const [a, b] = [newId(), newId()];
    for (const id of [a, b]) assert.equal((await app.inject({ method: 'POST', url: '/v1/accounts', payload: { id, ledger: 'USD', code: 10 } })).statusCode, 201);
    const transfer = { id: newId(), debit_account_id: a, credit_account_id: b, amount: '100', ledger: 'USD', code: 1 };
    assert.equal((await app.inject({ method: 'POST', url: '/v1/transfers', payload: transfer })).statusCode, 201);
    const text = (await app.inject('/metrics')).body;
    assert.match(text, /ledgerline_ledger_transfers_total 1\n/);
    assert.match(text, /ledgerline_ledger_batches_total 1\n/);
    assert.match(text, /ledgerline_ledger_batch_size_mean 1\n/);
    assert.match(text, /ledgerline_ledger_queued_transfers 0\n/);
    // No relay runs in this test: the transfer's and the accounts' events wait unpublished.
    const lag = Number(/ledgerline_events_outbox_lag_seconds ([0-9.e-]+)\n/.exec(text)?.[1]);
    assert.ok(lag > 0, `outbox lag ${lag}`);
    assert.match(text, /ledgerline_pg_pool_connections\{pool="default",state="max"\} 6/);
    assert.match(text, /ledgerline_http_requests_total\{method="POST",route="\/v1\/transfers",outcome="ok"\} 1/);
    assert.match(text, /ledgerline_http_requests_total\{method="POST",route="\/v1\/accounts",outcome="ok"\} 2/);
  });

  it('reports the degradation level in /ready', async () => {
    const ready = (await app.inject('/ready')).json<{ status: string; degradation: unknown }>();
    assert.equal(ready.status, 'ready');
    assert.deepEqual(ready.degradation, { level: 0, shedding: [], dependencies: {} });
  });
});

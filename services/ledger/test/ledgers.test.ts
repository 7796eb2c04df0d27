/**
 * Ledgers added while the service runs: known from the first request that needs one, with
 * its own scale (services/ledger/src/ledgers.ts). The service loaded its ledgers once, at
 * start, until 2026-12-07.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { randomUUID } from 'node:crypto';
import type { LedgerInfo } from '@ledgerline/ledger';
import { LedgerCatalog } from '../src/ledgers.ts';
import { ledgerServiceWithAccounts } from './support.ts';

test('a ledger added after the service started: accounts and transfers in it, read with its scale', async () => {
  const f = await ledgerServiceWithAccounts([]);
  try {
    await f.t.pool.query("INSERT INTO ledger.ledgers (code, scale, description) VALUES ('BHD', 3, 'Bahraini dinar'), ('OMR', 3, 'Omani rial')");
    const [a, b, c] = [randomUUID(), randomUUID(), randomUUID()];
    for (const id of [a, b]) {
      const r = await f.app.inject({ method: 'POST', url: '/v1/accounts', payload: { id, ledger: 'BHD', code: 10 } });
      assert.equal(r.statusCode, 201, r.body);
      assert.equal(r.json<{ scale: number }>().scale, 3);
    }
    const t = await f.app.inject({ method: 'POST', url: '/v1/transfers', payload: { id: randomUUID(), debit_account_id: a, credit_account_id: b, amount: '12345', ledger: 'BHD', code: 1 } });
    assert.equal(t.statusCode, 201, t.body);
    // An account another instance created in a ledger this one has not been asked about yet.
    const [created] = await f.engine.createAccounts([{ id: c, ledger: 'OMR', code: 10, flags: {} }]);
    assert.equal(created?.result, 'ok');
    const read = await f.app.inject({ method: 'GET', url: `/v1/accounts/${c}` });
    assert.equal(read.statusCode, 200, read.body);
    const account = read.json<{ ledger: string; scale: number }>();
    assert.deepEqual([account.ledger, account.scale], ['OMR', 3]);
    const list = (await f.app.inject({ method: 'GET', url: '/v1/ledgers' })).json<{ ledgers: LedgerInfo[] }>();
    assert.deepEqual(list.ledgers.filter((l) => l.code === 'BHD' || l.code === 'OMR').map((l) => [l.code, l.scale]), [['BHD', 3], ['OMR', 3]]);
    // A code that names no ledger is still refused, and nothing is written.
    const unknown = await f.app.inject({ method: 'POST', url: '/v1/accounts', payload: { id: randomUUID(), ledger: 'XYZ', code: 10 } });
    assert.equal(unknown.statusCode, 422, unknown.body);
    assert.equal(unknown.headers['content-type'], 'application/problem+json; charset=utf-8');
    assert.equal((await f.t.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM ledger.accounts WHERE ledger = 'XYZ'")).rows[0]?.n, 0);
  } finally {
    await f.close();
  }
});

test('the catalog: a miss waits for a load that began after it, and concurrent misses share loads', async () => {
  let rows: LedgerInfo[] = [{ code: 'USD', scale: 2, description: '' }];
  let loads = 0;
  let gate: (() => void) | null = null;
  const list = async (): Promise<LedgerInfo[]> => {
    loads += 1;
    // What the table holds when the query starts is what it returns.
    const snapshot = rows;
    if (gate === null) await new Promise<void>((resolve) => setImmediate(resolve));
    else await new Promise<void>((resolve) => (gate = resolve));
    return snapshot;
  };
  const catalog = await LedgerCatalog.load(list);
  assert.equal(loads, 1);

  // A load in flight that began before the ledger existed: a lookup after it waits for a newer one.
  gate = () => {};
  const inFlight = catalog.reload();
  rows = [...rows, { code: 'BHD', scale: 3, description: '' }];
  const lookup = catalog.require('BHD');
  const release = gate;
  gate = null;
  release();
  await inFlight;
  assert.equal((await lookup).scale, 3);
  assert.equal(loads, 3);

  // Fifty requests with codes that name no ledger, at once: two loads at most, not fifty.
  const before = loads;
  await Promise.all(Array.from({ length: 50 }, (_, i) => catalog.know([`NO${i}X`])));
  assert.ok(loads - before <= 2, `loads: ${loads - before}`);
  assert.equal(catalog.has('NO1X'), false);
  await assert.rejects(catalog.require('NOPE'), { name: 'UnknownLedgerError' });
});

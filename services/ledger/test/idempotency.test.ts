/**
 * Idempotency-Key on the ledger service, end to end against a real database: every POST route
 * replays its first response to a retry with the same key, and money moves once whatever the
 * client does: retry, reuse a key for something else, race duplicates, or find a key that a
 * crashed instance left in progress.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { LedgerEngine, newId } from '@ledgerline/ledger';
import { IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT, migrateRuntime, type Service } from '@ledgerline/service-runtime';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { buildLedgerService } from '../src/app.ts';

type Response = Awaited<ReturnType<Service['inject']>>;

interface Balances {
  debits_posted: string;
  credits_posted: string;
}

let t: LedgerTestDb;
let engine: LedgerEngine;
let app: Service;
let nowMs = Date.UTC(2026, 0, 1);

before(async () => {
  t = await ledgerTestDb();
  await migrateRuntime(t.db.url);
  engine = new LedgerEngine({ pool: t.pool });
  app = await buildLedgerService({ engine, pool: t.pool, logger: false, idempotency: { now: () => nowMs } });
});

after(async () => {
  await app.close();
  await engine.close();
  await assertInvariants(t.pool);
  await t.close();
});

function post(url: string, payload: Record<string, unknown>, key?: string): Promise<Response> {
  return app.inject({ method: 'POST', url, payload, headers: key === undefined ? {} : { 'idempotency-key': key } });
}

async function account(extra: Record<string, unknown> = {}): Promise<string> {
  const id = newId();
  const r = await post('/v1/accounts', { id, ledger: 'USD', code: 10, ...extra });
  assert.equal(r.statusCode, 201, r.body);
  return id;
}

async function balances(id: string): Promise<Balances> {
  const r = await app.inject({ method: 'GET', url: `/v1/accounts/${id}` });
  assert.equal(r.statusCode, 200, r.body);
  const { debits_posted, credits_posted } = r.json<Balances>();
  return { debits_posted, credits_posted };
}

async function transferCount(): Promise<number> {
  const r = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM ledger.transfers');
  return r.rows[0]!.n;
}

function assertReplay(retry: Response, first: Response): void {
  assert.equal(retry.statusCode, first.statusCode);
  assert.equal(retry.headers['idempotent-replayed'], 'true');
  assert.equal(first.headers['idempotent-replayed'], undefined);
  assert.equal(retry.body, first.body);
}

describe('POST /v1/transfers with Idempotency-Key', () => {
  test('a retry gets the replayed 201 (not 200 exists), and the money moves once', async () => {
    const [a, b] = [await account(), await account()];
    const transfer = { id: newId(), debit_account_id: a, credit_account_id: b, amount: '1250', ledger: 'USD', code: 1 };
    const key = newId();

    const first = await post('/v1/transfers', transfer, key);
    assert.equal(first.statusCode, 201, first.body);
    const retry = await post('/v1/transfers', transfer, key);
    assertReplay(retry, first);
    assert.equal(retry.json<{ result: string }>().result, 'ok');

    // Without the key the engine's own id check answers: 200 exists. Still nothing moves twice.
    const unkeyed = await post('/v1/transfers', transfer);
    assert.equal(unkeyed.statusCode, 200);
    assert.equal(unkeyed.json<{ result: string }>().result, 'exists');

    assert.deepEqual(await balances(a), { debits_posted: '1250', credits_posted: '0' });
    assert.deepEqual(await balances(b), { debits_posted: '0', credits_posted: '1250' });
  });

  test('the same key for a different transfer is 422 idempotency-key-mismatch and applies nothing', async () => {
    const [a, b] = [await account(), await account()];
    const key = newId();
    const first = await post('/v1/transfers', { id: newId(), debit_account_id: a, credit_account_id: b, amount: '10', ledger: 'USD', code: 1 }, key);
    assert.equal(first.statusCode, 201);
    const count = await transferCount();

    const reused = await post('/v1/transfers', { id: newId(), debit_account_id: a, credit_account_id: b, amount: '10', ledger: 'USD', code: 1 }, key);
    assert.equal(reused.statusCode, 422, reused.body);
    assert.equal(reused.json<{ type: string }>().type, 'https://ledgerline.dev/problems/idempotency-key-mismatch');
    assert.equal(await transferCount(), count);
    assert.deepEqual(await balances(a), { debits_posted: '10', credits_posted: '0' });
  });

  test('a rejection is final: the replay is the same 422, and the ledger is not asked again', async () => {
    const [a, b] = [await account({ flags: { debits_must_not_exceed_credits: true } }), await account()];
    const transfer = { id: newId(), debit_account_id: a, credit_account_id: b, amount: '5', ledger: 'USD', code: 1 };
    const key = newId();
    const first = await post('/v1/transfers', transfer, key);
    assert.equal(first.statusCode, 422, first.body);
    assert.equal(first.json<{ result: string }>().result, 'exceeds_credits');
    assertReplay(await post('/v1/transfers', transfer, key), first);
    assert.deepEqual(await balances(a), { debits_posted: '0', credits_posted: '0' });
  });

  test('a malformed transfer (fields missing) does not take its key: the corrected one runs under it, and the money moves once', async () => {
    const [a, b] = [await account(), await account()];
    const transfer = { id: newId(), debit_account_id: a, credit_account_id: b, amount: '7', ledger: 'USD', code: 1 };
    const key = newId();
    const { amount: _amount, ...missing } = transfer;
    const refused = await post('/v1/transfers', missing, key);
    assert.equal(refused.statusCode, 400, refused.body);
    assert.deepEqual(refused.json<{ errors: unknown[] }>().errors, [{ in: 'body', path: '/amount', message: 'is required' }]);
    // Until 2026-12-07 that 400 was stored, and this got 422 idempotency-key-mismatch.
    const corrected = await post('/v1/transfers', transfer, key);
    assert.equal(corrected.statusCode, 201, corrected.body);
    assert.equal(corrected.headers['idempotent-replayed'], undefined);
    assertReplay(await post('/v1/transfers', transfer, key), corrected);
    assert.deepEqual(await balances(a), { debits_posted: '7', credits_posted: '0' });
  });

  test('a key left in progress by a crashed instance: after the lock timeout the retry re-runs, and the engine reports exists', async () => {
    const [a, b] = [await account(), await account()];
    const transfer = { id: newId(), debit_account_id: a, credit_account_id: b, amount: '700', ledger: 'USD', code: 1 };
    const key = newId();
    assert.equal((await post('/v1/transfers', transfer, key)).statusCode, 201);
    // The instance applied the transfer, then died before storing its response.
    await t.pool.query(
      `UPDATE runtime.idempotency_keys
          SET state = 'in_progress', response_status = NULL, response_headers = NULL, response_body = NULL, locked_until = $2
        WHERE key = $1`,
      [key, new Date(nowMs + IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT)],
    );
    const early = await post('/v1/transfers', transfer, key);
    assert.equal(early.statusCode, 409);
    assert.equal(early.headers['retry-after'], '1');

    nowMs += IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT;
    const recovered = await post('/v1/transfers', transfer, key);
    assert.equal(recovered.statusCode, 200, recovered.body);
    assert.equal(recovered.json<{ result: string }>().result, 'exists');
    assertReplay(await post('/v1/transfers', transfer, key), recovered);
    assert.deepEqual(await balances(a), { debits_posted: '700', credits_posted: '0' });
  });

  test('concurrent duplicates on a listening server: one runs, the rest get 409 or the replay; the money moves once', async () => {
    const [a, b] = [await account(), await account()];
    const transfer = { id: newId(), debit_account_id: a, credit_account_id: b, amount: '33', ledger: 'USD', code: 1 };
    const key = newId();
    const server = await buildLedgerService({ engine, pool: t.pool, logger: false, idempotency: { now: () => nowMs } });
    const address = await server.listen({ port: 0, host: '127.0.0.1' });
    const DUPLICATES = 20;
    const outcomes = await Promise.all(
      Array.from({ length: DUPLICATES }, async () => {
        const res = await fetch(`${address}/v1/transfers`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': key },
          body: JSON.stringify(transfer),
        });
        await res.arrayBuffer();
        return `${res.status}${res.headers.get('idempotent-replayed') === 'true' ? ' replayed' : ''}`;
      }),
    );
    await server.close();
    assert.equal(outcomes.filter((o) => o === '201').length, 1, outcomes.join(', '));
    assert.ok(outcomes.every((o) => o === '201' || o === '201 replayed' || o === '409'), outcomes.join(', '));
    assert.deepEqual(await balances(a), { debits_posted: '33', credits_posted: '0' });
  });
});

describe('the other POST routes', () => {
  test('POST /v1/accounts: the retry replays 201 with the same body', async () => {
    const payload = { id: newId(), ledger: 'EUR', code: 7 };
    const key = newId();
    const first = await post('/v1/accounts', payload, key);
    assert.equal(first.statusCode, 201, first.body);
    assertReplay(await post('/v1/accounts', payload, key), first);
    assert.equal((await post('/v1/accounts', payload)).statusCode, 200);
  });

  test('POST /v1/accounts/batch and /v1/transfers/batch: the retry replays every result, and the money moves once', async () => {
    const [a, b] = [newId(), newId()];
    const accounts = { accounts: [{ id: a, ledger: 'USD', code: 1 }, { id: b, ledger: 'USD', code: 1 }] };
    const accountsKey = newId();
    const createdAccounts = await post('/v1/accounts/batch', accounts, accountsKey);
    assert.equal(createdAccounts.statusCode, 200, createdAccounts.body);
    assertReplay(await post('/v1/accounts/batch', accounts, accountsKey), createdAccounts);

    const transfers = {
      transfers: [
        { id: newId(), debit_account_id: a, credit_account_id: b, amount: '100', ledger: 'USD', code: 1 },
        { id: newId(), debit_account_id: b, credit_account_id: a, amount: '30', ledger: 'USD', code: 1 },
      ],
    };
    const transfersKey = newId();
    const createdTransfers = await post('/v1/transfers/batch', transfers, transfersKey);
    assert.equal(createdTransfers.statusCode, 200, createdTransfers.body);
    assert.deepEqual(createdTransfers.json<{ results: Array<{ result: string }> }>().results.map((r) => r.result), ['ok', 'ok']);
    assertReplay(await post('/v1/transfers/batch', transfers, transfersKey), createdTransfers);
    assert.deepEqual(await balances(a), { debits_posted: '100', credits_posted: '30' });
    assert.deepEqual(await balances(b), { debits_posted: '30', credits_posted: '100' });
  });

  test('GET routes ignore the header; a malformed key is 400 on every POST route', async () => {
    const id = await account();
    const get = await app.inject({ method: 'GET', url: `/v1/accounts/${id}`, headers: { 'idempotency-key': 'x' } });
    assert.equal(get.statusCode, 200);
    for (const url of ['/v1/accounts', '/v1/accounts/batch', '/v1/transfers', '/v1/transfers/batch']) {
      const payload = url.endsWith('batch')
        ? url.includes('accounts')
          ? { accounts: [{ id: newId(), ledger: 'USD', code: 1 }] }
          : { transfers: [{ id: newId(), debit_account_id: id, credit_account_id: id, amount: '1', ledger: 'USD', code: 1 }] }
        : url.includes('accounts')
          ? { id: newId(), ledger: 'USD', code: 1 }
          : { id: newId(), debit_account_id: id, credit_account_id: newId(), amount: '1', ledger: 'USD', code: 1 };
      const r = await post(url, payload, 'x'.repeat(256));
      assert.equal(r.statusCode, 400, `${url}: ${r.body}`);
      assert.equal(r.json<{ errors: Array<{ in: string }> }>().errors[0]?.in, 'headers');
    }
  });
});

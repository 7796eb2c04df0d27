/**
 * HTTP tests of the ledger service: every endpoint through `app.inject()`, against a real,
 * freshly migrated PostgreSQL database. Bad input must always be a 4xx problem+json that
 * writes nothing; an unreachable engine must be a 503 the client may retry.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { LedgerEngine, LedgerUnavailableError, newId } from '@ledgerline/ledger';
import type { InjectOptions } from 'fastify';
import type { Service } from '@ledgerline/service-runtime';
import type { LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { buildLedgerService } from '../src/app.ts';
import { ledgerServiceWithAccounts, type LedgerServiceFixture } from './support.ts';

type Response = Awaited<ReturnType<Service['inject']>>;

interface ProblemBody {
  type: string;
  title: string;
  status: number;
  detail: string;
  instance: string;
  request_id: string;
  errors?: Array<{ in: string; path: string; message: string }>;
  result?: string;
  outcome_unknown?: boolean;
  checks?: Record<string, string>;
}

interface AccountBody {
  id: string;
  ledger: string;
  scale: number;
  code: number;
  flags: { debits_must_not_exceed_credits: boolean; credits_must_not_exceed_debits: boolean; closed: boolean };
  metadata: Record<string, string>;
  debits_pending: string;
  debits_posted: string;
  credits_pending: string;
  credits_posted: string;
  timestamp: string;
}

interface ResultBody {
  id: string;
  result: string;
  timestamp: string | null;
  amount: string | null;
}

interface TransferBody {
  id: string;
  debit_account_id: string | null;
  credit_account_id: string | null;
  amount: string;
  pending_id: string | null;
  ledger: string | null;
  code: number | null;
  flags: Record<string, boolean>;
  timeout_seconds: number;
  metadata: Record<string, string>;
  timestamp: string;
  result: string;
  pending_status: string | null;
  expires_at: string | null;
  resolved_at: string | null;
}

interface BalanceBody {
  account_id: string;
  timestamp: string;
  debits_pending: string;
  debits_posted: string;
  credits_pending: string;
  credits_posted: string;
}

interface OpenApiOperation {
  requestBody?: { required?: boolean; content: Record<string, { schema: { type?: string; properties?: Record<string, unknown>; required?: string[]; additionalProperties?: unknown } }> };
  parameters?: Array<{ in: string; name: string; required?: boolean }>;
  responses: Record<string, { content?: Record<string, unknown> }>;
}

const DIGITS = /^[0-9]+$/;
const PROBLEM_BASE = 'https://ledgerline.dev/problems/';
const AMOUNT_MAX = '9223372036854775807';
const TWO_TO_63 = '9223372036854775808';
const NO_FLAGS = {
  linked: false,
  pending: false,
  post_pending_transfer: false,
  void_pending_transfer: false,
  balancing_debit: false,
  balancing_credit: false,
  closing_debit: false,
  closing_credit: false,
};

let t: LedgerTestDb;
let engine: LedgerEngine;
let app: Service;

/** Two USD accounts with no flags, created in `before`: valid targets that bad requests must not touch. */
const A = newId();
const B = newId();

let fixture: LedgerServiceFixture;

before(async () => {
  fixture = await ledgerServiceWithAccounts([A, B]);
  ({ t, engine, app } = fixture);
});

after(async () => {
  await fixture.close();
});

// -------------------------------------------------------------------------------------------
// Helpers

async function rowCounts(): Promise<{ accounts: number; transfers: number }> {
  const r = await t.pool.query<{ accounts: number; transfers: number }>(
    'SELECT (SELECT count(*) FROM ledger.accounts)::int AS accounts, (SELECT count(*) FROM ledger.transfers)::int AS transfers',
  );
  return r.rows[0]!;
}

/** Asserts the RFC 9457 shape every error shares and returns the body. */
function assertProblem(response: Response, status: number, typeSuffix: string): ProblemBody {
  assert.equal(response.statusCode, status, response.body);
  assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
  const body = response.json<ProblemBody>();
  assert.equal(typeof body.type, 'string');
  assert.ok(body.type.endsWith(typeSuffix), `type ${body.type} should end with ${typeSuffix}`);
  assert.ok(body.type === 'about:blank' || body.type.startsWith(PROBLEM_BASE), body.type);
  assert.equal(typeof body.title, 'string');
  assert.ok(body.title.length > 0);
  assert.equal(body.status, status);
  assert.equal(typeof body.detail, 'string');
  assert.ok(body.detail.length > 0);
  assert.equal(typeof body.instance, 'string');
  assert.equal(body.request_id, response.headers['x-request-id']);
  return body;
}

async function createAccount(extra: Record<string, unknown> = {}): Promise<AccountBody> {
  const r = await app.inject({ method: 'POST', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 10, ...extra } });
  assert.equal(r.statusCode, 201, r.body);
  return r.json<AccountBody>();
}

function transfer(debit: string, credit: string, amount: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { id: newId(), debit_account_id: debit, credit_account_id: credit, amount, ledger: 'USD', code: 1, ...extra };
}

function postTransfer(payload: Record<string, unknown>, service: Service = app): Promise<Response> {
  return service.inject({ method: 'POST', url: '/v1/transfers', payload });
}

async function getAccount(id: string): Promise<AccountBody> {
  const r = await app.inject({ method: 'GET', url: `/v1/accounts/${id}` });
  assert.equal(r.statusCode, 200, r.body);
  return r.json<AccountBody>();
}

async function balanceAt(id: string, at: string | bigint): Promise<Response> {
  return app.inject({ method: 'GET', url: `/v1/accounts/${id}/balance?at=${at}` });
}

// -------------------------------------------------------------------------------------------

describe('GET /v1/ledgers', () => {
  test('lists every ledger with its scale, in code order', async () => {
    const r = await app.inject({ method: 'GET', url: '/v1/ledgers' });
    assert.equal(r.statusCode, 200);
    assert.match(String(r.headers['content-type']), /^application\/json/);
    const { ledgers } = r.json<{ ledgers: Array<{ code: string; scale: number; description: string }> }>();
    assert.deepEqual(
      ledgers.map((l) => l.code),
      ['CHF', 'EUR', 'GBP', 'JPY', 'KWD', 'PLN', 'SEK', 'USD'],
    );
    assert.deepEqual(ledgers.find((l) => l.code === 'USD'), { code: 'USD', scale: 2, description: 'US dollar' });
    assert.deepEqual(ledgers.find((l) => l.code === 'JPY'), { code: 'JPY', scale: 0, description: 'Yen' });
    assert.deepEqual(ledgers.find((l) => l.code === 'KWD'), { code: 'KWD', scale: 3, description: 'Kuwaiti dinar' });
  });
});

describe('POST /v1/accounts', () => {
  test('creates (201), repeats idempotently (200), refuses a conflicting reuse of the id (409)', async () => {
    const id = newId();
    const payload = { id, ledger: 'EUR', code: 42, flags: { debits_must_not_exceed_credits: true }, metadata: { owner: 'alice' } };
    const before = await rowCounts();

    const created = await app.inject({ method: 'POST', url: '/v1/accounts', payload });
    assert.equal(created.statusCode, 201, created.body);
    assert.match(String(created.headers['content-type']), /^application\/json/);
    const body = created.json<AccountBody>();
    assert.match(body.timestamp, DIGITS);
    assert.deepEqual(body, {
      id,
      ledger: 'EUR',
      scale: 2,
      code: 42,
      flags: { debits_must_not_exceed_credits: true, credits_must_not_exceed_debits: false, closed: false },
      metadata: { owner: 'alice' },
      debits_pending: '0',
      debits_posted: '0',
      credits_pending: '0',
      credits_posted: '0',
      timestamp: body.timestamp,
    });

    const again = await app.inject({ method: 'POST', url: '/v1/accounts', payload });
    assert.equal(again.statusCode, 200, again.body);
    assert.deepEqual(again.json(), body, 'a retry returns the stored account, original timestamp included');

    // Ids are case-insensitive on the wire and stored lowercase.
    const upper = await app.inject({ method: 'POST', url: '/v1/accounts', payload: { ...payload, id: id.toUpperCase() } });
    assert.equal(upper.statusCode, 200, upper.body);
    assert.deepEqual(upper.json(), body);

    const conflict = await app.inject({ method: 'POST', url: '/v1/accounts', payload: { ...payload, code: 43 } });
    const problem = assertProblem(conflict, 409, '/id-conflict');
    assert.equal(problem.result, 'exists_with_different_code');
    assert.equal(problem.instance, '/v1/accounts');

    const flagsConflict = await app.inject({ method: 'POST', url: '/v1/accounts', payload: { ...payload, flags: {} } });
    assert.equal(assertProblem(flagsConflict, 409, '/id-conflict').result, 'exists_with_different_flags');

    assert.deepEqual(await rowCounts(), { ...before, accounts: before.accounts + 1 });
    assert.deepEqual(await getAccount(id), body);
  });

  test('rejects ids the ledger reserves with 422 and the result code, writing nothing', async () => {
    for (const [id, result] of [
      ['00000000-0000-0000-0000-000000000000', 'id_must_not_be_zero'],
      ['FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF', 'id_must_not_be_int_max'],
    ] as const) {
      const before = await rowCounts();
      const r = await app.inject({ method: 'POST', url: '/v1/accounts', payload: { id, ledger: 'USD', code: 1 } });
      assert.equal(assertProblem(r, 422, '/account-rejected').result, result);
      assert.deepEqual(await rowCounts(), before);
    }
    const both = await app.inject({
      method: 'POST',
      url: '/v1/accounts',
      payload: { id: newId(), ledger: 'USD', code: 1, flags: { debits_must_not_exceed_credits: true, credits_must_not_exceed_debits: true } },
    });
    assert.equal(assertProblem(both, 422, '/account-rejected').result, 'flags_are_mutually_exclusive');
  });
});

describe('POST /v1/accounts/batch', () => {
  test('answers one result per account, in order', async () => {
    const existing = await createAccount();
    const fresh = newId();
    const before = await rowCounts();
    const r = await app.inject({
      method: 'POST',
      url: '/v1/accounts/batch',
      payload: {
        accounts: [
          { id: fresh, ledger: 'JPY', code: 7 },
          { id: existing.id, ledger: 'USD', code: 10 },
          { id: existing.id, ledger: 'EUR', code: 10 },
          { id: '00000000-0000-0000-0000-000000000000', ledger: 'USD', code: 1 },
          { id: newId(), ledger: 'USD', code: 1, flags: { debits_must_not_exceed_credits: true, credits_must_not_exceed_debits: true } },
        ],
      },
    });
    assert.equal(r.statusCode, 200, r.body);
    const { results } = r.json<{ results: Array<{ id: string; result: string; timestamp: string | null }> }>();
    assert.equal(results.length, 5);
    assert.deepEqual(
      results.map((x) => x.result),
      ['ok', 'exists', 'exists_with_different_ledger', 'id_must_not_be_zero', 'flags_are_mutually_exclusive'],
    );
    assert.equal(results[0]!.id, fresh);
    assert.match(results[0]!.timestamp!, DIGITS);
    assert.equal(results[1]!.timestamp, existing.timestamp, 'exists reports the original timestamp');
    assert.equal(results[3]!.timestamp, null);
    assert.equal(results[4]!.timestamp, null);
    assert.deepEqual(await rowCounts(), { ...before, accounts: before.accounts + 1 });
    const created = await getAccount(fresh);
    assert.equal(created.ledger, 'JPY');
    assert.equal(created.scale, 0);
    assert.equal(created.timestamp, results[0]!.timestamp);
  });
});

describe('GET /v1/accounts/:id', () => {
  test('returns the account (any letter case) or a 404 problem', async () => {
    const account = await createAccount({ metadata: { k: 'v' } });
    assert.deepEqual(await getAccount(account.id), account);
    assert.deepEqual(await getAccount(account.id.toUpperCase()), account);

    const missing = newId();
    const r = await app.inject({ method: 'GET', url: `/v1/accounts/${missing}` });
    const problem = assertProblem(r, 404, '/not-found');
    assert.equal(problem.instance, `/v1/accounts/${missing}`);
    assert.match(problem.detail, new RegExp(missing));
  });
});

describe('POST /v1/transfers and GET /v1/transfers/:id', () => {
  test('applies (201), repeats idempotently (200 exists), refuses a different amount under the same id (409)', async () => {
    const debit = await createAccount();
    const credit = await createAccount();
    const payload = transfer(debit.id, credit.id, '250', { code: 7, metadata: { invoice: 'INV-1' } });
    const id = payload.id as string;

    const created = await postTransfer(payload);
    assert.equal(created.statusCode, 201, created.body);
    const result = created.json<ResultBody>();
    assert.match(result.timestamp!, DIGITS);
    assert.deepEqual(result, { id, result: 'ok', timestamp: result.timestamp, amount: '250' });

    const retry = await postTransfer(payload);
    assert.equal(retry.statusCode, 200, retry.body);
    assert.deepEqual(retry.json(), { id, result: 'exists', timestamp: result.timestamp, amount: '250' });

    const before = await rowCounts();
    const conflict = await postTransfer({ ...payload, amount: '251' });
    const problem = assertProblem(conflict, 409, '/id-conflict');
    assert.equal(problem.result, 'exists_with_different_amount');
    assert.deepEqual(await rowCounts(), before, 'an id conflict records nothing');

    assert.equal((await getAccount(debit.id)).debits_posted, '250');
    assert.equal((await getAccount(credit.id)).credits_posted, '250');

    const got = await app.inject({ method: 'GET', url: `/v1/transfers/${id.toUpperCase()}` });
    assert.equal(got.statusCode, 200, got.body);
    assert.deepEqual(got.json(), {
      id,
      debit_account_id: debit.id,
      credit_account_id: credit.id,
      amount: '250',
      pending_id: null,
      ledger: 'USD',
      code: 7,
      flags: NO_FLAGS,
      timeout_seconds: 0,
      metadata: { invoice: 'INV-1' },
      timestamp: result.timestamp!,
      result: 'ok',
      pending_status: null,
      expires_at: null,
      resolved_at: null,
    } satisfies TransferBody);

    const missing = newId();
    assertProblem(await app.inject({ method: 'GET', url: `/v1/transfers/${missing}` }), 404, '/not-found');
  });

  test('rejects a debit beyond the credits with 422 exceeds_credits, and the id stays rejected', async () => {
    const guarded = await createAccount({ flags: { debits_must_not_exceed_credits: true } });
    const other = await createAccount();
    const payload = transfer(guarded.id, other.id, '100');

    const rejected = await postTransfer(payload);
    const problem = assertProblem(rejected, 422, '/transfer-rejected');
    assert.equal(problem.result, 'exceeds_credits');
    assert.match(problem.detail, new RegExp(payload.id as string));

    // Fund the account: the same transfer would now fit, but its id has been decided.
    assert.equal((await postTransfer(transfer(other.id, guarded.id, '500'))).statusCode, 201);
    const replay = await postTransfer(payload);
    assert.equal(assertProblem(replay, 422, '/transfer-rejected').result, 'exceeds_credits');

    const stored = await app.inject({ method: 'GET', url: `/v1/transfers/${payload.id as string}` });
    assert.equal(stored.statusCode, 200);
    assert.equal(stored.json<TransferBody>().result, 'exceeds_credits');

    const fresh = await postTransfer({ ...payload, id: newId() });
    assert.equal(fresh.statusCode, 201, fresh.body);
    const account = await getAccount(guarded.id);
    assert.equal(account.debits_posted, '100');
    assert.equal(account.credits_posted, '500');
  });

  test('accepts the largest amount, 2^63-1, and then rejects an overflowing one', async () => {
    const debit = await createAccount();
    const credit = await createAccount();
    const max = await postTransfer(transfer(debit.id, credit.id, AMOUNT_MAX));
    assert.equal(max.statusCode, 201, max.body);
    assert.equal(max.json<ResultBody>().amount, AMOUNT_MAX);
    assert.equal((await getAccount(debit.id)).debits_posted, AMOUNT_MAX);
    assert.equal((await getAccount(credit.id)).credits_posted, AMOUNT_MAX);

    const overflow = await postTransfer(transfer(debit.id, credit.id, '1'));
    assert.equal(assertProblem(overflow, 422, '/transfer-rejected').result, 'overflows_debits_posted');
    assert.equal((await getAccount(debit.id)).debits_posted, AMOUNT_MAX);
  });

  test('two-phase: reserve, post part of it, and a later void is refused', async () => {
    const debit = await createAccount();
    const credit = await createAccount();
    const pending = transfer(debit.id, credit.id, '100', { flags: { pending: true }, timeout_seconds: 3600 });
    const pendingId = pending.id as string;

    const reserved = await postTransfer(pending);
    assert.equal(reserved.statusCode, 201, reserved.body);
    let d = await getAccount(debit.id);
    assert.deepEqual([d.debits_pending, d.debits_posted], ['100', '0']);
    const p = await app.inject({ method: 'GET', url: `/v1/transfers/${pendingId}` });
    const pendingBody = p.json<TransferBody>();
    assert.equal(pendingBody.pending_status, 'pending');
    assert.equal(pendingBody.timeout_seconds, 3600);
    assert.equal(pendingBody.flags.pending, true);
    assert.equal(BigInt(pendingBody.expires_at!), BigInt(pendingBody.timestamp) + 3600n * 1_000_000_000n);
    assert.equal(pendingBody.resolved_at, null);

    const postId = newId();
    const posted = await postTransfer({ id: postId, pending_id: pendingId, amount: '60', flags: { post_pending_transfer: true } });
    assert.equal(posted.statusCode, 201, posted.body);
    assert.equal(posted.json<ResultBody>().amount, '60');
    d = await getAccount(debit.id);
    assert.deepEqual([d.debits_pending, d.debits_posted], ['0', '60']);
    const c = await getAccount(credit.id);
    assert.deepEqual([c.credits_pending, c.credits_posted], ['0', '60']);

    const postedTransfer = (await app.inject({ method: 'GET', url: `/v1/transfers/${postId}` })).json<TransferBody>();
    assert.equal(postedTransfer.pending_id, pendingId);
    assert.equal(postedTransfer.amount, '60');
    assert.equal(postedTransfer.debit_account_id, debit.id, 'omitted fields come from the pending transfer');
    assert.equal(postedTransfer.flags.post_pending_transfer, true);

    const voided = await postTransfer({ id: newId(), pending_id: pendingId, flags: { void_pending_transfer: true } });
    assert.equal(assertProblem(voided, 422, '/transfer-rejected').result, 'pending_transfer_already_posted');

    const after = (await app.inject({ method: 'GET', url: `/v1/transfers/${pendingId}` })).json<TransferBody>();
    assert.equal(after.pending_status, 'posted');
    assert.match(after.resolved_at!, DIGITS);
  });
});

describe('POST /v1/transfers/batch', () => {
  test('a linked chain with a failing member fails as a whole; unrelated transfers apply', async () => {
    const guarded = await createAccount({ flags: { debits_must_not_exceed_credits: true } });
    const x = await createAccount();
    const y = await createAccount();
    const items = [
      transfer(x.id, y.id, '10'),
      transfer(x.id, y.id, '20', { flags: { linked: true } }),
      transfer(guarded.id, y.id, '30', { flags: { linked: true } }),
      transfer(y.id, x.id, '40'),
      transfer(y.id, x.id, '5'),
    ];
    const r = await app.inject({ method: 'POST', url: '/v1/transfers/batch', payload: { transfers: items } });
    assert.equal(r.statusCode, 200, r.body);
    const { results } = r.json<{ results: ResultBody[] }>();
    assert.deepEqual(
      results.map((res) => [res.id, res.result]),
      [
        [items[0]!.id, 'ok'],
        [items[1]!.id, 'linked_event_failed'],
        [items[2]!.id, 'exceeds_credits'],
        [items[3]!.id, 'linked_event_failed'],
        [items[4]!.id, 'ok'],
      ],
    );
    assert.match(results[0]!.timestamp!, DIGITS);
    assert.equal(results[0]!.amount, '10');
    assert.equal(results[4]!.amount, '5');

    const ax = await getAccount(x.id);
    assert.deepEqual([ax.debits_posted, ax.credits_posted], ['10', '5']);
    const ay = await getAccount(y.id);
    assert.deepEqual([ay.debits_posted, ay.credits_posted], ['5', '10']);
    assert.equal((await getAccount(guarded.id)).debits_posted, '0');

    // Retrying the whole batch applies nothing twice.
    const retry = await app.inject({ method: 'POST', url: '/v1/transfers/batch', payload: { transfers: items } });
    assert.equal(retry.statusCode, 200);
    assert.equal(retry.json<{ results: ResultBody[] }>().results[0]!.result, 'exists');
    assert.equal((await getAccount(x.id)).debits_posted, '10');
  });
});

describe('GET /v1/accounts/:id/balance', () => {
  test('answers balances as of a ledger timestamp; 422 naming `at` before the account existed; 404 for no account', async () => {
    const a = await createAccount();
    const b = await createAccount();
    const t1 = (await postTransfer(transfer(a.id, b.id, '100'))).json<ResultBody>();
    const t2 = (await postTransfer(transfer(a.id, b.id, '50'))).json<ResultBody>();
    const ts1 = BigInt(t1.timestamp!);
    const ts2 = BigInt(t2.timestamp!);

    const expect = async (at: bigint, debitsPosted: string): Promise<void> => {
      const r = await balanceAt(a.id, at);
      assert.equal(r.statusCode, 200, r.body);
      assert.deepEqual(r.json<BalanceBody>(), {
        account_id: a.id,
        timestamp: at.toString(),
        debits_pending: '0',
        debits_posted: debitsPosted,
        credits_pending: '0',
        credits_posted: '0',
      });
    };
    await expect(BigInt(a.timestamp), '0');
    await expect(ts1 - 1n, '0');
    await expect(ts1, '100');
    await expect(ts2 - 1n, '100');
    await expect(ts2, '150');
    await expect(BigInt(AMOUNT_MAX), '150');

    const r = await balanceAt(b.id, ts2);
    assert.equal(r.json<BalanceBody>().credits_posted, '150');

    for (const at of [BigInt(a.timestamp) - 1n, 1n, 0n]) {
      const early = assertProblem(await balanceAt(a.id, at), 422, '/before-account-created');
      assert.deepEqual(early.errors, [{ in: 'querystring', path: '/at', message: `must not be before the account's creation timestamp ${a.timestamp}` }]);
      assert.match(early.detail, new RegExp(`created at ledger timestamp ${a.timestamp}`));
      assert.doesNotMatch(early.detail, /No account/);
    }
    const missing = assertProblem(await balanceAt(newId(), ts2), 404, '/not-found');
    assert.match(missing.detail, /No account has id/);
  });
});

describe('GET /v1/accounts/:id/transfers', () => {
  test('pages with limit, after and order; next_cursor is null at the end', async () => {
    const a = await createAccount();
    const b = await createAccount();
    const ids: string[] = [];
    for (let i = 1; i <= 5; i += 1) {
      const r = await postTransfer(transfer(i % 2 === 0 ? b.id : a.id, i % 2 === 0 ? a.id : b.id, String(i)));
      assert.equal(r.statusCode, 201, r.body);
      ids.push(r.json<ResultBody>().id);
    }
    // A transfer of other accounts, which must not appear.
    await postTransfer(transfer(A, B, '1'));

    type Page = { transfers: TransferBody[]; next_cursor: string | null };
    const page = async (query: string): Promise<Page> => {
      const r = await app.inject({ method: 'GET', url: `/v1/accounts/${a.id}/transfers?${query}` });
      assert.equal(r.statusCode, 200, r.body);
      return r.json<Page>();
    };

    const p1 = await page('limit=2&order=asc');
    assert.deepEqual(p1.transfers.map((x) => x.id), ids.slice(0, 2));
    assert.equal(p1.next_cursor, p1.transfers[1]!.timestamp);
    assert.deepEqual(p1.transfers[0], {
      id: ids[0],
      debit_account_id: a.id,
      credit_account_id: b.id,
      amount: '1',
      pending_id: null,
      ledger: 'USD',
      code: 1,
      flags: NO_FLAGS,
      timeout_seconds: 0,
      metadata: {},
      timestamp: p1.transfers[0]!.timestamp,
      result: 'ok',
      pending_status: null,
      expires_at: null,
      resolved_at: null,
    });
    const p2 = await page(`limit=2&order=asc&after=${p1.next_cursor}`);
    assert.deepEqual(p2.transfers.map((x) => x.id), ids.slice(2, 4));
    const p3 = await page(`limit=2&order=asc&after=${p2.next_cursor}`);
    assert.deepEqual(p3.transfers.map((x) => x.id), ids.slice(4));
    assert.equal(p3.next_cursor, null);

    const all = await page('');
    assert.deepEqual(all.transfers.map((x) => x.id), [...ids].reverse(), 'newest first by default');
    assert.equal(all.next_cursor, null);

    const d1 = await page('limit=3');
    assert.deepEqual(d1.transfers.map((x) => x.id), [ids[4], ids[3], ids[2]]);
    const d2 = await page(`limit=3&order=desc&after=${d1.next_cursor}`);
    assert.deepEqual(d2.transfers.map((x) => x.id), [ids[1], ids[0]]);
    assert.equal(d2.next_cursor, null);

    // A page that happens to end exactly at the last transfer still has a cursor; the next is empty.
    const full = await page('limit=5&order=asc');
    assert.equal(full.transfers.length, 5);
    assert.equal(full.next_cursor, full.transfers[4]!.timestamp);
    assert.deepEqual(await page(`limit=5&order=asc&after=${full.next_cursor}`), { transfers: [], next_cursor: null });

    assertProblem(await app.inject({ method: 'GET', url: `/v1/accounts/${newId()}/transfers` }), 404, '/not-found');
  });
});

// -------------------------------------------------------------------------------------------
// Bad input: a table of requests that must each be a clear 4xx problem and write nothing.

interface BadCase {
  name: string;
  method?: 'GET' | 'POST' | 'PUT' | 'DELETE' | 'PATCH';
  url: string;
  payload?: string | Buffer | Record<string, unknown> | unknown[];
  headers?: Record<string, string>;
  /** A service other than the main one: a 2 KiB body limit, or an engine taking 2 transfers per call. */
  on?: 'smallBodies' | 'smallBatches';
  expectStatus: number;
  expectTypeSuffix: string;
  /** JSON Pointer of an expected `errors[]` entry (validation errors and unknown ledgers). */
  expectPath?: string;
  expectIn?: string;
}

const valid = (extra: Record<string, unknown> = {}): Record<string, unknown> => transfer(A, B, '10', extra);
const withoutId = (): Record<string, unknown> => {
  const { id: _id, ...rest } = valid();
  return rest;
};
const batchOf = (n: number): Record<string, unknown> => ({ transfers: Array.from({ length: n }, () => valid()) });
/** A valid transfer without `field`. */
const without = (field: string): Record<string, unknown> => Object.fromEntries(Object.entries(valid()).filter(([name]) => name !== field));
/** A valid transfer as JSON text, with `extra` members appended as written (a duplicate name, say). */
const validText = (extra: string): string => `${JSON.stringify(valid()).slice(0, -1)},${extra}}`;
/** A valid account whose metadata value holds these raw bytes. */
const accountWithBytes = (bytes: number[]): Buffer =>
  Buffer.concat([Buffer.from(`{"id":"${newId()}","ledger":"USD","code":10,"metadata":{"note":"a`), Buffer.from(bytes), Buffer.from('b"}}')]);
const UUID_NO_DASHES = newId().replaceAll('-', '');
const UUID_37 = `${newId()}a`;

const badCases: BadCase[] = [
  // Malformed bodies
  { name: 'malformed JSON', url: '/v1/transfers', payload: '{"id": "', headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json' },
  { name: 'empty JSON body', url: '/v1/transfers', payload: '', headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json' },
  { name: 'prototype poisoning', url: '/v1/transfers', payload: `{"__proto__": {"amount": "10"}, "id": "${newId()}"}`, headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json' },
  { name: 'body is null', url: '/v1/transfers', payload: 'null', headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '' },
  { name: 'body is an array', url: '/v1/transfers', payload: [valid()], expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '' },
  { name: 'no body at all', url: '/v1/transfers', expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '' },
  // Wrong types
  { name: 'amount as a JSON number', url: '/v1/transfers', payload: valid({ amount: 100 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'code as a string', url: '/v1/transfers', payload: valid({ code: '1' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/code' },
  { name: 'flags as a string', url: '/v1/transfers', payload: valid({ flags: 'linked' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/flags' },
  { name: 'a flag as a string', url: '/v1/transfers', payload: valid({ flags: { pending: 'true' } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/flags/pending' },
  { name: 'ledger in lowercase', url: '/v1/transfers', payload: valid({ ledger: 'usd' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/ledger' },
  { name: 'code zero', url: '/v1/transfers', payload: valid({ code: 0 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/code' },
  { name: 'code 65536', url: '/v1/transfers', payload: valid({ code: 65536 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/code' },
  { name: 'code fractional', url: '/v1/transfers', payload: valid({ code: 1.5 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/code' },
  { name: 'timeout negative', url: '/v1/transfers', payload: valid({ flags: { pending: true }, timeout_seconds: -1 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/timeout_seconds' },
  { name: 'timeout 2^31', url: '/v1/transfers', payload: valid({ flags: { pending: true }, timeout_seconds: 2 ** 31 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/timeout_seconds' },
  { name: 'account code as a string', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: '10' }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/code' },
  { name: 'account flags as a string', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 10, flags: 'closed' }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/flags' },
  // Missing and unknown fields
  { name: 'transfer without id', url: '/v1/transfers', payload: withoutId(), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id' },
  { name: 'account without id', url: '/v1/accounts', payload: { ledger: 'USD', code: 10 }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id' },
  { name: 'account without ledger', url: '/v1/accounts', payload: { id: newId(), code: 10 }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/ledger' },
  { name: 'batch without transfers', url: '/v1/transfers/batch', payload: {}, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/transfers' },
  { name: 'batch without accounts', url: '/v1/accounts/batch', payload: { transfers: [] }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/accounts' },
  { name: 'unknown field', url: '/v1/transfers', payload: valid({ memo: 'rent' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/memo' },
  { name: 'unknown flag', url: '/v1/transfers', payload: valid({ flags: { urgent: true } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/flags/urgent' },
  { name: 'unknown account field', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 10, balance: '100' }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/balance' },
  { name: 'unknown account flag', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 10, flags: { closed: true } }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/flags/closed' },
  { name: 'unknown field in a batch item', url: '/v1/transfers/batch', payload: { transfers: [valid(), valid({ fee: '1' })] }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/transfers/1/fee' },
  { name: 'unknown top-level batch field', url: '/v1/transfers/batch', payload: { ...batchOf(1), atomic: true }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/atomic' },
  // Amounts
  { name: 'amount negative', url: '/v1/transfers', payload: valid({ amount: '-5' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount zero', url: '/v1/transfers', payload: valid({ amount: '0' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount fractional', url: '/v1/transfers', payload: valid({ amount: '1.5' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount non-numeric', url: '/v1/transfers', payload: valid({ amount: 'abc' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount with leading zeros', url: '/v1/transfers', payload: valid({ amount: '007' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount empty', url: '/v1/transfers', payload: valid({ amount: '' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount with spaces', url: '/v1/transfers', payload: valid({ amount: ' 10' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount in exponent form', url: '/v1/transfers', payload: valid({ amount: '1e3' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount 2^63', url: '/v1/transfers', payload: valid({ amount: TWO_TO_63 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount 19 nines', url: '/v1/transfers', payload: valid({ amount: '9999999999999999999' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount of 20 digits', url: '/v1/transfers', payload: valid({ amount: '10000000000000000000' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'amount 2^63 in a batch', url: '/v1/transfers/batch', payload: { transfers: [valid(), valid(), valid({ amount: TWO_TO_63 })] }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/transfers/2/amount' },
  // Unknown currencies
  { name: 'transfer in an unknown currency', url: '/v1/transfers', payload: valid({ ledger: 'XXX' }), expectStatus: 422, expectTypeSuffix: '/unknown-ledger', expectPath: '/ledger' },
  { name: 'account in an unknown currency', url: '/v1/accounts', payload: { id: newId(), ledger: 'XXX', code: 10 }, expectStatus: 422, expectTypeSuffix: '/unknown-ledger', expectPath: '/ledger' },
  { name: 'unknown currency at batch index 3', url: '/v1/transfers/batch', payload: { transfers: [valid(), valid(), valid(), valid({ ledger: 'XXX' }), valid()] }, expectStatus: 422, expectTypeSuffix: '/unknown-ledger', expectPath: '/transfers/3/ledger' },
  { name: 'unknown currency in an account batch', url: '/v1/accounts/batch', payload: { accounts: [{ id: newId(), ledger: 'USD', code: 1 }, { id: newId(), ledger: 'XXX', code: 1 }] }, expectStatus: 422, expectTypeSuffix: '/unknown-ledger', expectPath: '/accounts/1/ledger' },
  // Batch sizes
  { name: 'transfer batch of 1001', url: '/v1/transfers/batch', payload: batchOf(1001), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/transfers' },
  { name: 'empty transfer batch', url: '/v1/transfers/batch', payload: { transfers: [] }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/transfers' },
  { name: 'account batch of 1001', url: '/v1/accounts/batch', payload: { accounts: Array.from({ length: 1001 }, () => ({ id: newId(), ledger: 'USD', code: 1 })) }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/accounts' },
  { name: 'empty account batch', url: '/v1/accounts/batch', payload: { accounts: [] }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/accounts' },
  { name: 'transfer batch over the engine batch size', on: 'smallBatches', url: '/v1/transfers/batch', payload: batchOf(3), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/transfers' },
  { name: 'account batch over the engine batch size', on: 'smallBatches', url: '/v1/accounts/batch', payload: { accounts: Array.from({ length: 3 }, () => ({ id: newId(), ledger: 'USD', code: 1 })) }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/accounts' },
  // Body size
  { name: 'body over the size limit', on: 'smallBodies', url: '/v1/transfers/batch', payload: batchOf(20), expectStatus: 413, expectTypeSuffix: 'about:blank' },
  // Ids in the body
  { name: 'id "abc"', url: '/v1/transfers', payload: valid({ id: 'abc' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id' },
  { name: 'id without dashes', url: '/v1/transfers', payload: valid({ id: UUID_NO_DASHES }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id' },
  { name: 'id of 37 characters', url: '/v1/transfers', payload: valid({ id: UUID_37 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id' },
  { name: 'id as a number', url: '/v1/transfers', payload: valid({ id: 12345 }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id' },
  { name: 'debit account id malformed', url: '/v1/transfers', payload: valid({ debit_account_id: 'abc' }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/debit_account_id' },
  { name: 'pending id malformed', url: '/v1/transfers', payload: { id: newId(), pending_id: UUID_37, flags: { void_pending_transfer: true } }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/pending_id' },
  { name: 'account id without dashes', url: '/v1/accounts', payload: { id: UUID_NO_DASHES, ledger: 'USD', code: 10 }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id' },
  // Metadata PostgreSQL cannot store, or outside the documented bounds
  { name: 'metadata value with a NUL', url: '/v1/transfers', payload: valid({ metadata: { note: 'a\u0000b' } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata/note' },
  { name: 'metadata value with a lone surrogate', url: '/v1/transfers', payload: valid({ metadata: { note: '\ud800' } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata/note' },
  { name: 'metadata key with a NUL', url: '/v1/transfers', payload: valid({ metadata: { 'a\u0000b': 'x' } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata' },
  { name: 'account metadata with a NUL', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 10, metadata: { k: '\u0000' } }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata/k' },
  { name: 'metadata key of 65 characters', url: '/v1/transfers', payload: valid({ metadata: { ['k'.repeat(65)]: 'x' } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata' },
  { name: 'metadata empty key', url: '/v1/transfers', payload: valid({ metadata: { '': 'x' } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata' },
  { name: 'metadata value of 257 characters', url: '/v1/transfers', payload: valid({ metadata: { k: 'v'.repeat(257) } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata/k' },
  { name: 'metadata value as a number', url: '/v1/transfers', payload: valid({ metadata: { k: 1 } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata/k' },
  { name: 'metadata value as a number under a key with a line break', url: '/v1/transfers', payload: valid({ metadata: { 'a\nb': 1 } }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata/a\nb' },
  { name: 'metadata with 17 keys', url: '/v1/transfers', payload: valid({ metadata: Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, 'v'])) }), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/metadata' },
  // Path parameters and query strings
  { name: 'account path id "not-a-uuid"', method: 'GET', url: '/v1/accounts/not-a-uuid', expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id', expectIn: 'params' },
  { name: 'account path id without dashes', method: 'GET', url: `/v1/accounts/${UUID_NO_DASHES}`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id', expectIn: 'params' },
  { name: 'transfer path id of 37 characters', method: 'GET', url: `/v1/transfers/${UUID_37}`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id', expectIn: 'params' },
  { name: 'balance path id malformed', method: 'GET', url: '/v1/accounts/abc/balance?at=1', expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id', expectIn: 'params' },
  { name: 'transfers path id malformed', method: 'GET', url: '/v1/accounts/abc/transfers', expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/id', expectIn: 'params' },
  { name: 'path id badly percent-encoded', method: 'GET', url: '/v1/transfers/%zz', expectStatus: 400, expectTypeSuffix: 'about:blank' },
  { name: 'balance without at', method: 'GET', url: `/v1/accounts/${A}/balance`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/at', expectIn: 'querystring' },
  { name: 'balance at non-numeric', method: 'GET', url: `/v1/accounts/${A}/balance?at=yesterday`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/at', expectIn: 'querystring' },
  { name: 'balance at negative', method: 'GET', url: `/v1/accounts/${A}/balance?at=-1`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/at', expectIn: 'querystring' },
  { name: 'balance at 2^63', method: 'GET', url: `/v1/accounts/${A}/balance?at=${TWO_TO_63}`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/at', expectIn: 'querystring' },
  { name: 'balance at 19 nines', method: 'GET', url: `/v1/accounts/${A}/balance?at=9999999999999999999`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/at', expectIn: 'querystring' },
  { name: 'balance with an unknown parameter', method: 'GET', url: `/v1/accounts/${A}/balance?at=1&currency=USD`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/currency', expectIn: 'querystring' },
  { name: 'transfers limit 0', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=0`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers limit 1001', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=1001`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers limit non-numeric', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=ten`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers order unknown', method: 'GET', url: `/v1/accounts/${A}/transfers?order=random`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/order', expectIn: 'querystring' },
  { name: 'transfers after 2^63', method: 'GET', url: `/v1/accounts/${A}/transfers?after=${TWO_TO_63}`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/after', expectIn: 'querystring' },
  { name: 'transfers after of 20 digits', method: 'GET', url: `/v1/accounts/${A}/transfers?after=10000000000000000000`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/after', expectIn: 'querystring' },
  // Duplicate member names and bytes that are not UTF-8 (JSON.parse kept the last, and U+FFFD)
  { name: 'duplicate amount, the last one valid', url: '/v1/transfers', payload: validText('"amount":"abc","amount":"7"'), headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json', expectPath: '/amount' },
  { name: 'duplicate amount spelled with an escape', url: '/v1/transfers', payload: validText('"\\u0061mount":"7"'), headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json', expectPath: '/amount' },
  { name: 'duplicate ledger in an account', url: '/v1/accounts', payload: `{"id":"${newId()}","ledger":"EUR","code":10,"ledger":"USD"}`, headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json', expectPath: '/ledger' },
  { name: 'duplicate flag in a batch item', url: '/v1/transfers/batch', payload: `{"transfers":[${JSON.stringify(valid())},${validText('"flags":{"pending":true,"pending":false}')}]}`, headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json', expectPath: '/transfers/1/flags/pending' },
  { name: 'duplicate metadata key', url: '/v1/transfers', payload: validText('"metadata":{"k/~":"a","k/~":"b"}'), headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json', expectPath: '/metadata/k~1~0' },
  { name: 'invalid UTF-8 in account metadata', url: '/v1/accounts', payload: accountWithBytes([0xff, 0xfe]), headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json' },
  { name: 'an encoded surrogate in account metadata', url: '/v1/accounts', payload: accountWithBytes([0xed, 0xa0, 0x80]), headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json' },
  { name: 'an overlong encoding in transfer metadata', url: '/v1/transfers', payload: Buffer.concat([Buffer.from(validText('"metadata":{"k":"').slice(0, -1)), Buffer.from([0xc0, 0xaf]), Buffer.from('"}}')]), headers: { 'content-type': 'application/json' }, expectStatus: 400, expectTypeSuffix: '/malformed-json' },
  // Fields a transfer needs unless it posts or voids a pending one (not a 422 "must not be zero")
  { name: 'transfer without debit_account_id', url: '/v1/transfers', payload: without('debit_account_id'), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/debit_account_id' },
  { name: 'transfer without credit_account_id', url: '/v1/transfers', payload: without('credit_account_id'), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/credit_account_id' },
  { name: 'transfer without amount', url: '/v1/transfers', payload: without('amount'), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'transfer without ledger', url: '/v1/transfers', payload: without('ledger'), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/ledger' },
  { name: 'transfer without code', url: '/v1/transfers', payload: without('code'), expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/code' },
  { name: 'pending transfer without amount', url: '/v1/transfers', payload: { ...without('amount'), flags: { pending: true } }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/amount' },
  { name: 'batch item 3 without debit_account_id', url: '/v1/transfers/batch', payload: { transfers: [valid(), valid(), valid(), without('debit_account_id'), valid()] }, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/transfers/3/debit_account_id' },
  // Integers in the query spelled any other way than as an integer (no truncation, hex, exponent or sign)
  { name: 'transfers limit 1.9', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=1.9`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers limit true', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=true`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers limit 0x10', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=0x10`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers limit 1e2', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=1e2`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers limit +5', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=%2B5`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  { name: 'transfers limit empty', method: 'GET', url: `/v1/accounts/${A}/transfers?limit=`, expectStatus: 400, expectTypeSuffix: '/validation-error', expectPath: '/limit', expectIn: 'querystring' },
  // Content types, routes, methods
  { name: 'text/plain body', url: '/v1/transfers', payload: JSON.stringify(valid()), headers: { 'content-type': 'text/plain' }, expectStatus: 415, expectTypeSuffix: 'about:blank' },
  { name: 'application/xml body', url: '/v1/accounts', payload: '<account/>', headers: { 'content-type': 'application/xml' }, expectStatus: 415, expectTypeSuffix: 'about:blank' },
  { name: 'form-encoded body', url: '/v1/transfers/batch', payload: 'transfers=1', headers: { 'content-type': 'application/x-www-form-urlencoded' }, expectStatus: 415, expectTypeSuffix: 'about:blank' },
  { name: 'unknown route', method: 'GET', url: '/v1/nothing-here', expectStatus: 404, expectTypeSuffix: 'about:blank' },
  { name: 'unknown version', method: 'POST', url: '/v2/transfers', payload: valid(), expectStatus: 404, expectTypeSuffix: 'about:blank' },
  { name: 'GET on a POST route', method: 'GET', url: '/v1/transfers', expectStatus: 405, expectTypeSuffix: 'about:blank' },
  { name: 'DELETE an account', method: 'DELETE', url: `/v1/accounts/${A}`, expectStatus: 405, expectTypeSuffix: 'about:blank' },
  { name: 'PUT a transfer', method: 'PUT', url: `/v1/transfers/${newId()}`, payload: valid(), expectStatus: 405, expectTypeSuffix: 'about:blank' },
];

describe('bad input: a 4xx problem+json that writes nothing', () => {
  const services = new Map<NonNullable<BadCase['on']>, Service>();
  let smallBatchEngine: LedgerEngine;

  before(async () => {
    services.set('smallBodies', await buildLedgerService({ engine, pool: t.pool, logger: false, bodyLimitBytes: 2048 }));
    smallBatchEngine = new LedgerEngine({ pool: t.pool, batchSizeMax: 2, queueTransfersMax: 2 });
    services.set('smallBatches', await buildLedgerService({ engine: smallBatchEngine, pool: t.pool, logger: false }));
  });

  after(async () => {
    for (const service of services.values()) await service.close();
    await smallBatchEngine.close();
  });

  for (const c of badCases) {
    test(`${c.name} → ${c.expectStatus}`, async () => {
      const service = c.on === undefined ? app : services.get(c.on)!;
      const requestId = `bad-${c.name.replaceAll(/[^A-Za-z0-9]+/g, '-')}`.slice(0, 128);
      const payload = c.payload === undefined || typeof c.payload === 'string' || Buffer.isBuffer(c.payload) ? c.payload : JSON.stringify(c.payload);
      const jsonByDefault = c.payload !== undefined && typeof c.payload !== 'string' ? { 'content-type': 'application/json' } : {};
      const options: InjectOptions = {
        method: c.method ?? 'POST',
        url: c.url,
        headers: { 'x-request-id': requestId, ...jsonByDefault, ...c.headers },
        ...(payload === undefined ? {} : { payload }),
      };
      if (c.on === 'smallBodies') assert.ok(payload !== undefined && payload.length > 2048, 'the case must exceed the limit');

      const before = await rowCounts();
      const response = await service.inject(options);
      assert.ok(response.statusCode >= 400 && response.statusCode < 500, `expected a 4xx, got ${response.statusCode}: ${response.body}`);
      const problem = assertProblem(response, c.expectStatus, c.expectTypeSuffix);
      assert.equal(problem.request_id, requestId);
      assert.equal(problem.instance, c.url);
      if (c.expectStatus === 405) assert.ok(typeof response.headers.allow === 'string' && response.headers.allow.length > 0, 'a 405 names the allowed methods');
      if (c.expectPath !== undefined) {
        assert.ok(Array.isArray(problem.errors) && problem.errors.length > 0, `expected errors[] in ${response.body}`);
        const match = problem.errors.find((e) => e.path === c.expectPath);
        assert.ok(match !== undefined, `expected an error at ${JSON.stringify(c.expectPath)}, got ${JSON.stringify(problem.errors)}`);
        assert.equal(match.in, c.expectIn ?? 'body');
        assert.equal(typeof match.message, 'string');
      }
      assert.deepEqual(await rowCounts(), before, 'a rejected request must write nothing');
    });
  }

  test('a transfer missing its required fields gets one issue per field, and its id stays unused', async () => {
    const id = newId();
    const before = await rowCounts();
    const r = await postTransfer({ id, metadata: { note: 'no fields' } });
    const problem = assertProblem(r, 400, '/validation-error');
    assert.deepEqual(problem.errors, ['debit_account_id', 'credit_account_id', 'amount', 'ledger', 'code'].map((field) => ({ in: 'body', path: `/${field}`, message: 'is required' })));
    assert.deepEqual(await rowCounts(), before);
    // Not recorded as a rejection: the id is still free for the transfer the client meant.
    assertProblem(await app.inject({ method: 'GET', url: `/v1/transfers/${id}` }), 404, '/not-found');
    assert.equal((await postTransfer({ ...valid(), id })).statusCode, 201);
    // Every item of a batch is checked before any is applied.
    const batchBefore = await rowCounts();
    const batch = await app.inject({ method: 'POST', url: '/v1/transfers/batch', payload: { transfers: [valid(), without('amount'), valid(), without('code')] } });
    assert.deepEqual(assertProblem(batch, 400, '/validation-error').errors, [
      { in: 'body', path: '/transfers/1/amount', message: 'is required' },
      { in: 'body', path: '/transfers/3/code', message: 'is required' },
    ]);
    assert.deepEqual(await rowCounts(), batchBefore);
    // Posting or voiding a pending transfer may still leave them out.
    const pending = await postTransfer(valid({ flags: { pending: true }, timeout_seconds: 60 }));
    assert.equal(pending.statusCode, 201, pending.body);
    const voided = await postTransfer({ id: newId(), pending_id: pending.json<ResultBody>().id, flags: { void_pending_transfer: true } });
    assert.equal(voided.statusCode, 201, voided.body);
  });

  test('a bad transfer sent concurrently with good ones does not disturb them', async () => {
    const good = Array.from({ length: 4 }, () => valid({ amount: '3' }));
    const bad = valid({ metadata: { note: 'nul\u0000' } });
    const before = await getAccount(A);
    const responses = await Promise.all([...good, bad, ...good.map(() => valid({ amount: '3' }))].map((p) => postTransfer(p)));
    assert.deepEqual(
      responses.map((r) => r.statusCode),
      [201, 201, 201, 201, 400, 201, 201, 201, 201],
    );
    assert.equal(BigInt((await getAccount(A)).debits_posted) - BigInt(before.debits_posted), 24n);
  });
});

// -------------------------------------------------------------------------------------------

describe('engine unavailable → 503 with Retry-After', () => {
  test('the service cannot be built without a database (it loads the ledgers at start-up)', async () => {
    const deadPool = new pg.Pool({ host: '127.0.0.1', port: 1, user: 'postgres', database: 'none', connectionTimeoutMillis: 200 });
    deadPool.on('error', () => {});
    const deadEngine = new LedgerEngine({ pool: deadPool, batchAttemptsMax: 1 });
    try {
      await assert.rejects(buildLedgerService({ engine: deadEngine, pool: deadPool, logger: false }), LedgerUnavailableError);
    } finally {
      await deadEngine.close();
      await deadPool.end();
    }
  });

  test('GET /ready is 503 when its pool cannot connect; /health stays 200', async () => {
    const deadPool = new pg.Pool({ host: '127.0.0.1', port: 1, user: 'postgres', database: 'none', connectionTimeoutMillis: 200 });
    deadPool.on('error', () => {});
    const service = await buildLedgerService({ engine, pool: deadPool, logger: false });
    try {
      const ready = await service.inject({ method: 'GET', url: '/ready' });
      const problem = assertProblem(ready, 503, '/not-ready');
      assert.deepEqual(problem.checks, { postgres: 'failed' });
      const health = await service.inject({ method: 'GET', url: '/health' });
      assert.equal(health.statusCode, 200);
    } finally {
      await service.close();
      await deadPool.end();
    }
  });

  test('every engine call answers 503 when the database is gone after start-up', async () => {
    const pool = new pg.Pool({ connectionString: t.db.url, max: 2, connectionTimeoutMillis: 200 });
    pool.on('error', () => {});
    const lostEngine = new LedgerEngine({ pool, batchAttemptsMax: 1 });
    const service = await buildLedgerService({ engine: lostEngine, pool, logger: false });
    await pool.end();
    try {
      const before = await rowCounts();
      const requests: Array<{ method: 'GET' | 'POST'; url: string; payload?: Record<string, unknown> }> = [
        { method: 'POST', url: '/v1/transfers', payload: valid() },
        { method: 'POST', url: '/v1/transfers/batch', payload: batchOf(2) },
        { method: 'POST', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 1 } },
        { method: 'POST', url: '/v1/accounts/batch', payload: { accounts: [{ id: newId(), ledger: 'USD', code: 1 }] } },
        { method: 'GET', url: `/v1/accounts/${A}` },
        { method: 'GET', url: `/v1/accounts/${A}/balance?at=${AMOUNT_MAX}` },
        { method: 'GET', url: `/v1/accounts/${A}/transfers` },
        { method: 'GET', url: `/v1/transfers/${newId()}` },
      ];
      for (const request of requests) {
        const response = await service.inject(request);
        const problem = assertProblem(response, 503, '/ledger-unavailable');
        assert.equal(response.headers['retry-after'], '1', `${request.method} ${request.url}`);
        assert.equal(problem.outcome_unknown, false);
        assert.match(problem.detail, /safe/);
      }
      assert.deepEqual(await rowCounts(), before);

      assertProblem(await service.inject({ method: 'GET', url: '/ready' }), 503, '/not-ready');
      assert.equal((await service.inject({ method: 'GET', url: '/health' })).statusCode, 200);
      // Answers that need no database still work: the ledger list is loaded at start-up.
      assert.equal((await service.inject({ method: 'GET', url: '/v1/ledgers' })).statusCode, 200);
    } finally {
      await service.close();
      await lostEngine.close();
    }
  });

  test('writes answer 503 once the engine is closed', async () => {
    const closingEngine = new LedgerEngine({ pool: t.pool });
    const service = await buildLedgerService({ engine: closingEngine, pool: t.pool, logger: false });
    await closingEngine.close();
    try {
      const before = await rowCounts();
      for (const request of [
        { url: '/v1/transfers', payload: valid() },
        { url: '/v1/transfers/batch', payload: batchOf(2) },
        { url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 1 } },
        { url: '/v1/accounts/batch', payload: { accounts: [{ id: newId(), ledger: 'USD', code: 1 }] } },
      ]) {
        const response = await service.inject({ method: 'POST', ...request });
        const problem = assertProblem(response, 503, '/ledger-unavailable');
        assert.equal(response.headers['retry-after'], '1');
        assert.equal(problem.outcome_unknown, false);
      }
      assert.deepEqual(await rowCounts(), before);
    } finally {
      await service.close();
    }
  });
});

// -------------------------------------------------------------------------------------------

describe('GET /openapi.json', () => {
  test('describes every route, its request schema and its problem responses', async () => {
    const r = await app.inject({ method: 'GET', url: '/openapi.json' });
    assert.equal(r.statusCode, 200);
    const doc = r.json<{ openapi: string; info: { title: string }; paths: Record<string, Record<string, OpenApiOperation>> }>();
    assert.equal(doc.openapi, '3.1.0');
    assert.equal(doc.info.title, 'Ledgerline ledger');

    const routes: Array<[string, string, number]> = [
      ['get', '/v1/ledgers', 200],
      ['post', '/v1/accounts', 201],
      ['post', '/v1/accounts/batch', 200],
      ['get', '/v1/accounts/{id}', 200],
      ['get', '/v1/accounts/{id}/balance', 200],
      ['get', '/v1/accounts/{id}/transfers', 200],
      ['post', '/v1/transfers', 201],
      ['post', '/v1/transfers/batch', 200],
      ['get', '/v1/transfers/{id}', 200],
      ['get', '/health', 200],
      ['get', '/ready', 200],
    ];
    assert.deepEqual(Object.keys(doc.paths).sort(), [...new Set(routes.map(([, path]) => path))].sort());
    for (const [method, path, success] of routes) {
      const op = doc.paths[path]?.[method];
      assert.ok(op !== undefined, `${method} ${path} is documented`);
      assert.ok(op.responses[String(success)]?.content?.['application/json'] !== undefined, `${method} ${path} ${success} is JSON`);
      for (const [status, response] of Object.entries(op.responses)) {
        if (Number(status) >= 400) {
          assert.ok(response.content?.['application/problem+json'] !== undefined, `${method} ${path} ${status} is problem+json`);
          assert.equal(response.content['application/json'], undefined, `${method} ${path} ${status} is only problem+json`);
        }
      }
      if (path.includes('{id}')) {
        assert.ok(op.parameters?.some((p) => p.in === 'path' && p.name === 'id' && p.required === true), `${path} documents its id`);
        assert.ok(op.responses['400'] !== undefined && op.responses['404'] !== undefined && op.responses['503'] !== undefined);
      }
      if (method === 'post') {
        for (const status of ['400', '409', '413', '415', '422', '503']) {
          assert.ok(op.responses[status] !== undefined, `${method} ${path} documents ${status}`);
        }
        // Every POST honours Idempotency-Key, which the idempotency plugin reads: it says so.
        const key = op.parameters?.find((p) => p.in === 'header' && p.name === 'idempotency-key');
        assert.ok(key !== undefined && key.required !== true, `${method} ${path} documents Idempotency-Key as optional`);
      } else {
        assert.equal(op.parameters?.find((p) => p.name === 'idempotency-key'), undefined, `${method} ${path}`);
      }
    }

    const body = (path: string) => doc.paths[path]!.post!.requestBody!.content['application/json']!.schema;
    const transfer = body('/v1/transfers');
    assert.deepEqual(Object.keys(transfer.properties!).sort(), [
      'amount', 'code', 'credit_account_id', 'debit_account_id', 'flags', 'id', 'ledger', 'metadata', 'pending_id', 'timeout_seconds',
    ]);
    assert.deepEqual(transfer.required, ['id']);
    assert.equal(transfer.additionalProperties, false);
    assert.deepEqual((transfer.properties!.amount as { pattern: string }).pattern, '^[1-9][0-9]{0,18}$');
    const account = body('/v1/accounts');
    assert.deepEqual(Object.keys(account.properties!).sort(), ['code', 'flags', 'id', 'ledger', 'metadata']);
    assert.deepEqual([...account.required!].sort(), ['code', 'id', 'ledger']);
    assert.equal(account.additionalProperties, false);
    const transferBatch = body('/v1/transfers/batch');
    assert.deepEqual(transferBatch.required, ['transfers']);
    const items = transferBatch.properties!.transfers as { type: string; minItems: number; maxItems: number; items: { properties: Record<string, unknown> } };
    assert.deepEqual([items.type, items.minItems, items.maxItems], ['array', 1, 1000]);
    assert.deepEqual(Object.keys(items.items.properties).sort(), Object.keys(transfer.properties!).sort());
    assert.deepEqual(body('/v1/accounts/batch').required, ['accounts']);

    const query = (path: string) => (doc.paths[path]!.get!.parameters ?? []).filter((p) => p.in === 'query');
    assert.deepEqual(query('/v1/accounts/{id}/balance').map((p) => [p.name, p.required]), [['at', true]]);
    assert.deepEqual(query('/v1/accounts/{id}/transfers').map((p) => p.name).sort(), ['after', 'limit', 'order']);
    // All three may be left out (the defaults fill limit and order in), and the document says so.
    assert.deepEqual(query('/v1/accounts/{id}/transfers').filter((p) => p.required === true), []);
    assert.equal((await app.inject({ method: 'GET', url: `/v1/accounts/${A}/transfers` })).statusCode, 200);
    assert.ok(doc.paths['/v1/accounts/{id}/balance']!.get!.responses['422']?.content?.['application/problem+json'] !== undefined, 'the balance documents its 422');
  });
});

describe('health', () => {
  test('GET /health is 200 and GET /ready is 200 with the database up', async () => {
    const health = await app.inject({ method: 'GET', url: '/health' });
    assert.equal(health.statusCode, 200);
    assert.deepEqual(health.json(), { status: 'ok' });
    const ready = await app.inject({ method: 'GET', url: '/ready' });
    assert.equal(ready.statusCode, 200, ready.body);
    assert.deepEqual(ready.json(), { status: 'ready', checks: { postgres: 'ok' } });
  });
});

/**
 * Property test (fast-check) of the ledger service's input handling: arbitrary bodies, and
 * valid requests with one field removed, replaced by an arbitrary JSON value, or joined by an
 * unknown one, sent to every write endpoint (and malformed JSON text beside them). The service
 * must never answer 5xx; every error must be RFC 9457 problem+json naming its status; and a
 * refusal of the request itself (400, 413, 415) must write nothing. A 422 is the ledger's
 * decision on a well-formed transfer (a rejection is recorded, so that the id stays failed),
 * and 2xx is a valid request that happened to be generated. GET routes get arbitrary ids and
 * query strings, with the same rule: never 5xx, every error problem+json.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { newId } from '@ledgerline/ledger';
import type { Service } from '@ledgerline/service-runtime';
import { assertFuzzAnswer, propertySeed } from '@ledgerline/testing';
import type { LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { ledgerServiceWithAccounts, type LedgerServiceFixture } from './support.ts';

let t: LedgerTestDb;
let app: Service;
const A = newId();
const B = newId();

let fixture: LedgerServiceFixture;

before(async () => {
  fixture = await ledgerServiceWithAccounts([A, B]);
  ({ t, app } = fixture);
});

after(async () => {
  await fixture.close();
});

/** What a write leaves behind: accounts, transfers and events. */
async function written(): Promise<string> {
  const r = await t.pool.query<{ n: string }>(
    `SELECT (SELECT count(*) FROM ledger.accounts) || '/' || (SELECT count(*) FROM ledger.transfers) || '/' ||
            (SELECT coalesce(sum(debits_posted + debits_pending + credits_posted + credits_pending), 0) FROM ledger.accounts) AS n`,
  );
  return r.rows[0]?.n ?? '';
}

const validTransfer = (): Record<string, unknown> => ({ id: newId(), debit_account_id: A, credit_account_id: B, amount: '5', ledger: 'USD', code: 1 });
const validAccount = (): Record<string, unknown> => ({ id: newId(), ledger: 'USD', code: 10 });

/** A JSON value of any shape, with the awkward numbers and strings a client might send. */
const anyJson = fc.oneof(
  fc.jsonValue({ maxDepth: 3 }),
  fc.constantFrom('-1', '0', '1.5', '1e3', '９', '9223372036854775808', '00012', ' 12', '', 'NaN', '0x10', newId(), 'not-a-uuid', '00000000-0000-0000-0000-000000000000', 'US\u0000D', '\uD800', { k: 'v\u0000' }, { 'k\u0000': 'v' }),
  fc.constantFrom(-1, 0, 1.5, 2 ** 53, Number.MAX_SAFE_INTEGER, 1e308, true, null),
);

/** A valid body with one field removed, replaced, or an unknown one added (or, now and then, left valid). */
function mutated(valid: () => Record<string, unknown>): fc.Arbitrary<unknown> {
  const changed = fc.tuple(fc.nat(), fc.constantFrom('remove', 'replace', 'add'), anyJson, fc.string({ maxLength: 12 })).map(([i, how, value, name]) => {
    const body = valid();
    const keys = Object.keys(body);
    const key = keys[i % keys.length] as string;
    if (how === 'remove') return Object.fromEntries(Object.entries(body).filter(([k]) => k !== key));
    if (how === 'replace') return { ...body, [key]: value };
    return { ...body, [name.length > 0 && !(name in body) ? name : `x_${name}`]: value };
  });
  return fc.oneof({ arbitrary: changed, weight: 9 }, { arbitrary: fc.constant(null).map(() => valid()), weight: 1 });
}

const requestArb = fc.oneof(
  fc.record({ url: fc.constant('/v1/transfers'), body: fc.oneof(mutated(validTransfer), anyJson) }),
  fc.record({ url: fc.constant('/v1/accounts'), body: fc.oneof(mutated(validAccount), anyJson) }),
  fc.record({
    url: fc.constant('/v1/transfers/batch'),
    body: fc.oneof(
      fc.array(mutated(validTransfer), { minLength: 1, maxLength: 3 }).map((transfers) => ({ transfers })),
      mutated(() => ({ transfers: [validTransfer()] })),
      anyJson,
    ),
  }),
  fc.record({
    url: fc.constant('/v1/accounts/batch'),
    body: fc.oneof(fc.array(mutated(validAccount), { minLength: 1, maxLength: 3 }).map((accounts) => ({ accounts })), anyJson),
  }),
);

/** Request bodies that are not JSON at all, or cut short. */
const rawArb = fc.record({
  url: fc.constantFrom('/v1/transfers', '/v1/accounts', '/v1/transfers/batch', '/v1/accounts/batch'),
  text: fc.oneof(fc.string({ maxLength: 40 }), fc.jsonValue().map((v) => (JSON.stringify(v) ?? '').slice(0, -1))),
});

test('property: no input makes a 5xx; every error is problem+json; a refused request writes nothing', async () => {
  const seed = propertySeed('ledger HTTP input fuzz');
  const statuses = new Map<number, number>();
  const check = async (url: string, payload: string, contentType: string): Promise<void> => {
    const before = await written();
    const res = await app.inject({ method: 'POST', url, headers: { 'content-type': contentType }, payload });
    assertFuzzAnswer(res, `${url} ${payload}`, statuses);
    if ([400, 413, 415].includes(res.statusCode)) assert.equal(await written(), before, `${url} ${payload} → ${res.statusCode} wrote something`);
  };
  await fc.assert(
    fc.asyncProperty(
      fc.oneof(requestArb.map((r) => ({ url: r.url, text: JSON.stringify(r.body) ?? 'null' })), rawArb),
      fc.oneof(
        { arbitrary: fc.constant('application/json'), weight: 8 },
        { arbitrary: fc.constantFrom('text/plain', 'application/x-www-form-urlencoded', 'application/json; charset=utf-8', 'application/xml'), weight: 1 },
      ),
      async ({ url, text }, contentType) => {
        await check(url, text, contentType);
      },
    ),
    { seed, numRuns: 800 },
  );
  // The generators reach both sides: refusals and, now and then, a valid request.
  assert.ok((statuses.get(400) ?? 0) > 100 && (statuses.get(415) ?? 0) > 0, JSON.stringify([...statuses]));
  assert.ok([...statuses.keys()].some((s) => s < 300), JSON.stringify([...statuses]));
});

/** A path segment or query value a client might send: ids in and out of format, numbers at and past the edges, text needing escapes. */
const anyParam = fc.oneof(
  fc.constantFrom(A, newId(), 'not-a-uuid', '00000000-0000-0000-0000-000000000000', '0', '-1', '1.5', '9223372036854775807', '9223372036854775808', '99999999999999999999', '', 'asc', 'desc', 'ASC', '%00', '%ff', '..', '1e3'),
  fc.string({ maxLength: 20 }).map(encodeURIComponent),
);

test('property: no path or query makes a GET answer 5xx; every error is problem+json', async () => {
  const seed = propertySeed('ledger HTTP GET fuzz');
  const statuses = new Map<number, number>();
  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom('/v1/accounts/{id}', '/v1/accounts/{id}/balance', '/v1/accounts/{id}/transfers', '/v1/transfers/{id}', '/v1/ledgers'),
      anyParam,
      fc.dictionary(fc.constantFrom('limit', 'order', 'after', 'at', 'x'), anyParam, { maxKeys: 3 }),
      async (route, id, query) => {
        const qs = Object.entries(query).map(([k, v]) => `${k}=${v}`).join('&');
        const url = `${route.replace('{id}', id)}${qs === '' ? '' : `?${qs}`}`;
        const res = await app.inject({ method: 'GET', url });
        assertFuzzAnswer(res, `GET ${url}`, statuses);
      },
    ),
    { seed, numRuns: 600 },
  );
  assert.ok((statuses.get(200) ?? 0) > 0 && (statuses.get(400) ?? 0) > 0 && (statuses.get(404) ?? 0) > 0, JSON.stringify([...statuses]));
});

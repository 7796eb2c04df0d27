/**
 * The ledger service with authentication and authorization on, against a real database:
 * the authorization matrix (every role × every endpoint, from a table), 401 and 403 as
 * problem+json and both audited, and the attacks: forged, unsigned, expired, wrong-audience
 * and edited tokens, IDOR on another customer's accounts and transfers, limits, hours,
 * and idempotency keys that must not cross principals.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import type { InjectOptions } from 'fastify';
import { importJWK } from 'jose';
import { AuditStore, checkEntry, loadSigningKey, MemoryAuditSink, migrateAudit, type AuditEntry } from '@ledgerline/audit';
import { ALL_ROLES, Authorizer, CUSTOMER_TRANSFER_MAX_MINOR, REFERENCE_POLICY, ROLES } from '@ledgerline/authz';
import { createTokenVerifier, localKeys, newSigningKey, signAccessToken, type AccessClaims } from '@ledgerline/identity';
import { LedgerEngine, newId } from '@ledgerline/ledger';
import { migrateRuntime, type Service } from '@ledgerline/service-runtime';
import { assertFuzzAnswer, propertySeed } from '@ledgerline/testing';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { buildLedgerService } from '../src/app.ts';
import { OWNER_METADATA_KEY } from '../src/auth.ts';

const ISSUER = 'https://identity.test';
/** A Monday, 10:00 UTC: inside the tellers' hours. */
const MONDAY_10 = Date.UTC(2026, 10, 23, 10, 0);
const SATURDAY_10 = Date.UTC(2026, 10, 28, 10, 0);

let t: LedgerTestDb;
let engine: LedgerEngine;
let app: Service;
let now = MONDAY_10;
const audit = new MemoryAuditSink();
let sign: (claims: Partial<AccessClaims> & { sub: string }, options?: { nowMs?: number; ttlSeconds?: number }) => Promise<string>;
let foreignSign: typeof sign;

/** The customer of the matrix and another customer, by principal id. */
const CUSTOMER = 'cust-1';
const OTHER = 'cust-2';
/** CUSTOMER's account, OTHER's account, an account nobody owns, and a transfer from CUSTOMER's to OTHER's. */
const OWN = newId();
const THEIRS = newId();
const UNOWNED = newId();
const OWN_TRANSFER = newId();
const THEIR_TRANSFER = newId();
/** A ledger timestamp at which OWN has a balance (OWN_TRANSFER's). */
let balanceAt = '';

before(async () => {
  t = await ledgerTestDb();
  await migrateRuntime(t.db.url);
  await migrateAudit(t.db.url);
  engine = new LedgerEngine({ pool: t.pool });
  const key = await newSigningKey();
  const privateKey = await importJWK(key.privateJwk, 'EdDSA');
  assert.ok(!(privateKey instanceof Uint8Array));
  const foreign = await newSigningKey();
  const foreignKey = await importJWK(foreign.privateJwk, 'EdDSA');
  assert.ok(!(foreignKey instanceof Uint8Array));
  const signWith = (k: { kid: string; privateKey: typeof privateKey }): typeof sign => (claims, options = {}) =>
    signAccessToken(k, { kind: 'user', roles: [], audience: 'ledger', ...claims }, { issuer: ISSUER, ttlSeconds: options.ttlSeconds ?? 300, nowMs: options.nowMs ?? now });
  sign = signWith({ kid: key.kid, privateKey });
  foreignSign = signWith({ kid: key.kid, privateKey: foreignKey });
  app = await buildLedgerService({
    engine,
    pool: t.pool,
    logger: false,
    auth: {
      verify: createTokenVerifier({ keys: localKeys({ keys: [key.publicJwk] }), issuer: ISSUER, audience: 'ledger', clock: () => now }),
      authorizer: new Authorizer({ policy: REFERENCE_POLICY, audit, clock: () => now }),
    },
    // The audit trail's search routes are ledger endpoints too, and need audit:read.
    audit: { sink: audit, store: { store: new AuditStore({ pool: t.pool, sink: audit, service: 'ledger' }), publicKey: loadSigningKey(undefined, { production: false }).publicKey } },
  });
  await engine.createAccounts([
    { id: OWN, ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: CUSTOMER } },
    { id: THEIRS, ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: OTHER } },
    { id: UNOWNED, ledger: 'USD', code: 1 },
  ]);
  const results = await engine.createTransfers([
    { id: OWN_TRANSFER, debitAccountId: OWN, creditAccountId: THEIRS, amount: 5n, ledger: 'USD', code: 1 },
    { id: THEIR_TRANSFER, debitAccountId: THEIRS, creditAccountId: UNOWNED, amount: 5n, ledger: 'USD', code: 1 },
  ]);
  assert.deepEqual(results.map((r) => r.result), ['ok', 'ok']);
  balanceAt = String(results[0]?.timestamp);
});

after(async () => {
  // Every record made here must be one the durable audit trail accepts.
  for (const entry of audit.entries) checkEntry(entry);
  await app.close();
  await engine.close();
  await assertInvariants(t.pool);
  await t.close();
});

/** Each role's principal for the matrix: a customer is CUSTOMER; staff and services have ids of their own. */
function principalOf(role: string): { sub: string; kind: 'user' | 'service'; roles: string[] } {
  if (role === ROLES.customer) return { sub: CUSTOMER, kind: 'user', roles: [role] };
  return role.startsWith('svc:') ? { sub: role.slice(4), kind: 'service', roles: [role] } : { sub: `${role}-1`, kind: 'user', roles: [role] };
}

interface Endpoint {
  name: string;
  /** A fresh request each time (POSTs get new ids, so an allowed one is a 201 every time). */
  request: () => InjectOptions;
  allowed: readonly string[];
}

const transfer = (debit = OWN, amount = '100', ledger = 'USD') => ({ id: newId(), debit_account_id: debit, credit_account_id: THEIRS === debit ? OWN : THEIRS, amount, ledger, code: 1 });

const ALL_PEOPLE = ['customer', 'teller', 'compliance_officer', 'auditor', 'admin'];
const READERS = ['customer', 'teller', 'compliance_officer', 'auditor', 'admin', 'svc:payments', 'svc:settlement', 'svc:reporting', 'svc:risk'];
const MONEY_MOVERS = ['customer', 'teller', 'svc:payments', 'svc:settlement'];
const AUDIT_READERS = ['compliance_officer', 'auditor', 'svc:audit'];

/** The matrix. A role not listed for an endpoint must get 403. */
const ENDPOINTS: readonly Endpoint[] = [
  { name: 'GET /v1/ledgers', request: () => ({ method: 'GET', url: '/v1/ledgers' }), allowed: [...ALL_PEOPLE, 'svc:payments', 'svc:reporting', 'svc:settlement', 'svc:risk', 'svc:fx'] },
  { name: 'POST /v1/accounts', request: () => ({ method: 'POST', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 1 } }), allowed: ['teller', 'admin'] },
  { name: 'POST /v1/accounts/batch', request: () => ({ method: 'POST', url: '/v1/accounts/batch', payload: { accounts: [{ id: newId(), ledger: 'USD', code: 1 }] } }), allowed: ['teller', 'admin'] },
  { name: 'GET /v1/accounts/:id', request: () => ({ method: 'GET', url: `/v1/accounts/${OWN}` }), allowed: READERS },
  { name: 'GET /v1/accounts/:id/balance', request: () => ({ method: 'GET', url: `/v1/accounts/${OWN}/balance?at=${balanceAt}` }), allowed: READERS },
  { name: 'GET /v1/accounts/:id/transfers', request: () => ({ method: 'GET', url: `/v1/accounts/${OWN}/transfers` }), allowed: READERS },
  { name: 'POST /v1/transfers', request: () => ({ method: 'POST', url: '/v1/transfers', payload: transfer() }), allowed: MONEY_MOVERS },
  { name: 'POST /v1/transfers/batch', request: () => ({ method: 'POST', url: '/v1/transfers/batch', payload: { transfers: [transfer(), transfer()] } }), allowed: MONEY_MOVERS },
  { name: 'GET /v1/transfers/:id', request: () => ({ method: 'GET', url: `/v1/transfers/${OWN_TRANSFER}` }), allowed: READERS },
  { name: 'GET /v1/audit/records', request: () => ({ method: 'GET', url: '/v1/audit/records?limit=1' }), allowed: AUDIT_READERS },
  { name: 'GET /v1/audit/public-key', request: () => ({ method: 'GET', url: '/v1/audit/public-key' }), allowed: AUDIT_READERS },
];

async function call(request: InjectOptions, token?: string) {
  return app.inject({ ...request, headers: { ...request.headers, ...(token === undefined ? {} : { authorization: `Bearer ${token}` }) } });
}

/** Access decisions only: with the audit trail on, commands and reads are recorded beside them. */
const decisions = (): AuditEntry[] => audit.entries.filter((e) => e.action === 'authz.decision');

function lastDecision(): AuditEntry {
  const entry = decisions().at(-1);
  assert.ok(entry !== undefined);
  return entry;
}

async function rowCounts(): Promise<string> {
  const r = await t.pool.query<{ n: string }>("SELECT (SELECT count(*) FROM ledger.accounts) || '/' || (SELECT count(*) FROM ledger.transfers) AS n");
  return r.rows[0]?.n ?? '';
}

/** `rowCounts()` with n more transfers. */
function bumpTransfers(counts: string, n: number): string {
  const [accounts = '', transfers = '0'] = counts.split('/');
  return `${accounts}/${Number(transfers) + n}`;
}

function assertProblem(response: Awaited<ReturnType<typeof call>>, status: number, slug: string): void {
  assert.equal(response.statusCode, status, response.body);
  assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
  const body = response.json<{ type: string; status: number }>();
  assert.equal(body.type, `https://ledgerline.dev/problems/${slug}`);
  assert.equal(body.status, status);
}

describe('the authorization matrix: every role × every endpoint', () => {
  test('the table covers every role and every protected route', () => {
    for (const e of ENDPOINTS) for (const role of e.allowed) assert.ok(ALL_ROLES.includes(role), `${e.name}: unknown role ${role}`);
    for (const e of ENDPOINTS) {
      const [method = '', url = ''] = e.name.split(' ');
      assert.ok(app.hasRoute({ method, url }), e.name);
    }
  });

  for (const endpoint of ENDPOINTS) {
    test(endpoint.name, async () => {
      for (const role of ALL_ROLES) {
        const expected = endpoint.allowed.includes(role);
        const principal = principalOf(role);
        const before = decisions().length;
        const response = await call(endpoint.request(), await sign(principal));
        if (expected) assert.ok(response.statusCode === 200 || response.statusCode === 201, `${role} should be allowed ${endpoint.name}: ${response.statusCode} ${response.body}`);
        else assertProblem(response, 403, 'forbidden');
        // At least one decision per request (a batch has one per item), all by this principal, the last one deciding.
        assert.ok(decisions().length > before, `${role} ${endpoint.name}: no decision audited`);
        const entry = lastDecision();
        assert.equal(entry.action, 'authz.decision');
        assert.deepEqual(entry.actor, { type: principal.kind, id: principal.sub });
        assert.equal(entry.outcome, expected ? 'success' : 'failure', `${role} ${endpoint.name}`);
        assert.equal(entry.payload?.policyVersion, REFERENCE_POLICY.version);
        assert.equal(entry.origin.service, 'ledger');
      }
    });
  }

  test('no token at all: 401 on every endpoint, with WWW-Authenticate, audited as anonymous', async () => {
    for (const endpoint of ENDPOINTS) {
      const counts = await rowCounts();
      const response = await call(endpoint.request());
      assertProblem(response, 401, 'unauthenticated');
      assert.equal(response.headers['www-authenticate'], 'Bearer');
      const entry = lastDecision();
      assert.deepEqual([entry.actor.type, entry.outcome, entry.reason], ['anonymous', 'failure', 'unauthenticated: no bearer token']);
      assert.equal(await rowCounts(), counts);
    }
  });

  test('a request refused 401 is recorded as anonymous, not as the service its x-client-id names', async () => {
    const from = audit.entries.length;
    const response = await call({ method: 'POST', url: '/v1/transfers', headers: { 'x-client-id': 'service:payments', authorization: 'Bearer not-a-token' }, payload: { id: newId(), debit_account_id: newId(), credit_account_id: newId(), amount: '1', ledger: 'USD', code: 1 } });
    assertProblem(response, 401, 'unauthenticated');
    await audit.flush();
    const records = audit.entries.slice(from).filter((e) => e.origin.requestId === response.headers['x-request-id']);
    assert.deepEqual(records.map((e) => [e.action, e.actor.type, e.actor.id, e.outcome]).sort(), [
      ['authz.decision', 'anonymous', 'anonymous', 'failure'],
      ['ledger.transfer.create', 'anonymous', 'anonymous', 'failure'],
    ]);
  });

  test('health, readiness and the OpenAPI document stay open; the document lists 401 and 403', async () => {
    assert.equal((await call({ method: 'GET', url: '/health' })).statusCode, 200);
    const doc = (await call({ method: 'GET', url: '/openapi.json' })).json<{ paths: Record<string, Record<string, { responses: Record<string, unknown> }>> }>();
    assert.ok(doc.paths['/v1/transfers']?.post?.responses['403'] !== undefined);
    assert.ok(doc.paths['/v1/accounts/{id}']?.get?.responses['401'] !== undefined);
  });

  test('the OpenAPI document declares the bearer scheme and requires it on every /v1/ operation, and only there', async () => {
    type Operation = { security?: unknown; parameters?: Array<{ in: string; name: string }> };
    const doc = (await call({ method: 'GET', url: '/openapi.json' })).json<{ components: { securitySchemes: Record<string, { type: string; scheme: string }> }; paths: Record<string, Record<string, Operation>> }>();
    assert.deepEqual([doc.components.securitySchemes.bearerAuth?.type, doc.components.securitySchemes.bearerAuth?.scheme], ['http', 'bearer']);
    let protectedOperations = 0;
    for (const [path, operations] of Object.entries(doc.paths)) {
      for (const [method, operation] of Object.entries(operations)) {
        if (path.startsWith('/v1/')) {
          protectedOperations += 1;
          assert.deepEqual(operation.security, [{ bearerAuth: [] }], `${method} ${path}`);
          // The token travels in the scheme, not as a parameter of its own.
          assert.ok(!(operation.parameters ?? []).some((p) => p.in === 'header' && p.name === 'authorization'), `${method} ${path}`);
        } else {
          assert.equal(operation.security, undefined, `${method} ${path} is open`);
        }
      }
    }
    assert.ok(protectedOperations >= ENDPOINTS.length);
  });

  test('the scheme is case-insensitive: bearer and BEARER are Bearer', async () => {
    const token = await sign(principalOf('teller'));
    for (const scheme of ['bearer', 'BEARER', 'Bearer']) {
      const response = await app.inject({ method: 'GET', url: '/v1/ledgers', headers: { authorization: `${scheme} ${token}` } });
      assert.equal(response.statusCode, 200, `${scheme}: ${response.body}`);
    }
  });
});

describe('attacks', () => {
  const customer = principalOf(ROLES.customer);

  test('forged, unsigned, expired, not-yet-valid, wrong-audience and edited tokens are 401, audited, and write nothing', async () => {
    const good = await sign(customer);
    const [header = '', payload = '', signature = ''] = good.split('.');
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString()) as Record<string, unknown>;
    const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const attacks: [string, string][] = [
      ['forged signature', await foreignSign(customer)],
      ['alg none', `${b64({ alg: 'none', typ: 'at+jwt' })}.${payload}.`],
      ['alg none with signature', `${b64({ alg: 'none', typ: 'at+jwt' })}.${payload}.${signature}`],
      ['expired', await sign(customer, { nowMs: now - 400_000 })],
      ['not yet valid', await sign(customer, { nowMs: now + 60_000 })],
      ['wrong audience', await sign({ ...customer, audience: 'payments' })],
      ['roles edited to admin', `${header}.${b64({ ...claims, roles: ['admin'] })}.${signature}`],
      ['roles edited to a money-moving service', `${header}.${b64({ ...claims, kind: 'service', roles: ['svc:payments'] })}.${signature}`],
      ['subject edited', `${header}.${b64({ ...claims, sub: OTHER })}.${signature}`],
      ['not a JWT', 'abc'],
    ];
    for (const [label, token] of attacks) {
      const counts = await rowCounts();
      const response = await call({ method: 'POST', url: '/v1/transfers', payload: transfer(THEIRS) }, token);
      assertProblem(response, 401, 'unauthenticated');
      assert.equal(response.headers['www-authenticate'], 'Bearer error="invalid_token"', label);
      const entry = lastDecision();
      assert.deepEqual([entry.actor.type, entry.outcome], ['anonymous', 'failure'], label);
      assert.match(entry.reason ?? '', /^unauthenticated: /, label);
      assert.equal(await rowCounts(), counts, label);
    }
    // A bad token is refused before the body is even validated.
    assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload: { nonsense: true } }, 'abc'), 401, 'unauthenticated');
    assertProblem(await call({ method: 'GET', url: '/v1/ledgers', headers: { authorization: `Basic ${good}` } }), 401, 'unauthenticated');
  });

  test('an admin opens accounts for nobody: one owned by a person (a customer it may have made, with a password it chose) is 403 and not opened; a teller may', async () => {
    const admin = await sign(principalOf(ROLES.admin));
    const teller = await sign(principalOf(ROLES.teller));
    const counts = await rowCounts();
    for (const [url, payload] of [
      ['/v1/accounts', { id: newId(), ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: CUSTOMER } }],
      ['/v1/accounts/batch', { accounts: [{ id: newId(), ledger: 'USD', code: 1 }, { id: newId(), ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: CUSTOMER } }] }],
    ] as const) {
      assertProblem(await call({ method: 'POST', url, payload }, admin), 403, 'forbidden');
      assert.deepEqual([lastDecision().payload?.rule, lastDecision().reason], ['admin-opens-house-accounts', 'has an owner']);
    }
    assert.deepEqual(await rowCounts(), counts, 'nothing opened');
    assert.equal((await call({ method: 'POST', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 1 } }, admin)).statusCode, 201);
    assert.equal((await call({ method: 'POST', url: '/v1/accounts', payload: { id: newId(), ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: CUSTOMER } } }, teller)).statusCode, 201);
  });

  test('IDOR: a customer cannot read or debit another customer\'s account, an unowned one, or one that does not exist', async () => {
    const token = await sign(customer);
    const counts = await rowCounts();
    for (const account of [THEIRS, UNOWNED, newId()]) {
      for (const url of [`/v1/accounts/${account}`, `/v1/accounts/${account}/balance?at=1`, `/v1/accounts/${account}/transfers`]) {
        assertProblem(await call({ method: 'GET', url }, token), 403, 'forbidden');
        assert.equal(lastDecision().reason, 'not own account');
      }
      assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload: transfer(account) }, token), 403, 'forbidden');
    }
    assertProblem(await call({ method: 'GET', url: `/v1/transfers/${THEIR_TRANSFER}` }, token), 403, 'forbidden');
    assertProblem(await call({ method: 'GET', url: `/v1/transfers/${newId()}` }, token), 403, 'forbidden');
    // A batch with one stolen debit is refused whole: nothing applied.
    assertProblem(await call({ method: 'POST', url: '/v1/transfers/batch', payload: { transfers: [transfer(), transfer(THEIRS)] } }, token), 403, 'forbidden');
    assert.equal(await rowCounts(), counts);
    // The other customer's token sees their own account, not this one.
    const other = await sign({ sub: OTHER, roles: [ROLES.customer] });
    assert.equal((await call({ method: 'GET', url: `/v1/accounts/${THEIRS}` }, other)).statusCode, 200);
    assertProblem(await call({ method: 'GET', url: `/v1/accounts/${OWN}` }, other), 403, 'forbidden');
    // Staff get the truth: 404 for an account that does not exist.
    assert.equal((await call({ method: 'GET', url: `/v1/accounts/${newId()}` }, await sign(principalOf(ROLES.teller)))).statusCode, 404);
  });

  test('IDOR through a pending transfer: posting or voiding another customer\'s pending debit is refused', async () => {
    const pendingId = newId();
    const teller = await sign(principalOf(ROLES.teller));
    const created = await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(THEIRS), id: pendingId, flags: { pending: true } } }, teller);
    assert.equal(created.statusCode, 201, created.body);
    const token = await sign(customer);
    for (const flag of ['post_pending_transfer', 'void_pending_transfer']) {
      assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload: { id: newId(), pending_id: pendingId, flags: { [flag]: true } } }, token), 403, 'forbidden');
    }
    // A pending transfer between two accounts of their own they may post or void; the amount
    // limit applies to the inherited amount.
    const second = newId();
    await engine.createAccounts([{ id: second, ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: CUSTOMER } }]);
    for (const flag of ['post_pending_transfer', 'void_pending_transfer']) {
      const own = newId();
      assert.equal((await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(), id: own, credit_account_id: second, flags: { pending: true } } }, token)).statusCode, 201);
      const resolved = await call({ method: 'POST', url: '/v1/transfers', payload: { id: newId(), pending_id: own, flags: { [flag]: true } } }, token);
      assert.equal(resolved.statusCode, 201, `${flag}: ${resolved.body}`);
    }
  });

  test('a customer cannot void or capture a hold a service placed on their account', async () => {
    const payments = await sign(principalOf('svc:payments'));
    const token = await sign(customer);
    // svc:payments reserves 50.00 of the customer's money for OTHER (a card authorisation).
    const hold = newId();
    const placed = await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(), id: hold, amount: '5000', flags: { pending: true } } }, payments);
    assert.equal(placed.statusCode, 201, placed.body);
    const counts = await rowCounts();
    const requests = [
      { id: newId(), pending_id: hold, flags: { void_pending_transfer: true } },
      { id: newId(), pending_id: hold, amount: '1', flags: { post_pending_transfer: true } },
      // Naming its own accounts as the sides changes nothing: a post or void is decided on the pending transfer's.
      { id: newId(), pending_id: hold, debit_account_id: OWN, credit_account_id: OWN, flags: { void_pending_transfer: true } },
    ];
    for (const payload of requests) {
      assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload }, token), 403, 'forbidden');
      assert.equal(lastDecision().reason, 'not own credit account');
    }
    // Even a hold the customer placed on their own account toward someone else stays: the
    // ledger does not record who created a pending transfer (docs/security.md).
    const mine = newId();
    assert.equal((await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(), id: mine, flags: { pending: true } } }, token)).statusCode, 201);
    assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload: { id: newId(), pending_id: mine, flags: { void_pending_transfer: true } } }, token), 403, 'forbidden');
    assert.equal(await rowCounts(), bumpTransfers(counts, 1));
    const held = await engine.getTransfer(hold);
    assert.equal(held?.pendingStatus, 'pending');
    // The service that placed it still resolves it.
    assert.equal((await call({ method: 'POST', url: '/v1/transfers', payload: { id: newId(), pending_id: hold, flags: { void_pending_transfer: true } } }, payments)).statusCode, 201);
  });

  test('a customer cannot close, or balance against, an account that is not theirs', async () => {
    const token = await sign(customer);
    const victim = newId();
    const second = newId();
    await engine.createAccounts([
      { id: victim, ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: OTHER } },
      { id: second, ledger: 'USD', code: 1, metadata: { [OWNER_METADATA_KEY]: CUSTOMER } },
    ]);
    const counts = await rowCounts();
    for (const flags of [{ pending: true, closing_credit: true }, { closing_credit: true }, { balancing_credit: true }, { pending: true, closing_debit: true, closing_credit: true }]) {
      const response = await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(), credit_account_id: victim, amount: '1', flags } }, token);
      assertProblem(response, 403, 'forbidden');
      assert.equal(lastDecision().reason, 'not own credit account', JSON.stringify(flags));
    }
    // A batch that hides one among plain transfers is refused whole.
    assertProblem(await call({ method: 'POST', url: '/v1/transfers/batch', payload: { transfers: [transfer(), { ...transfer(), credit_account_id: victim, flags: { pending: true, closing_credit: true } }] } }, token), 403, 'forbidden');
    assert.equal(await rowCounts(), counts);
    assert.equal((await engine.getAccount(victim))?.flags.closed ?? false, false);
    // The victim's account still takes money.
    assert.equal((await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(), credit_account_id: victim, amount: '1' } }, token)).statusCode, 201);
    // Their own second account they may close.
    const closing = await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(), credit_account_id: second, amount: '1', flags: { pending: true, closing_credit: true } } }, token);
    assert.equal(closing.statusCode, 201, closing.body);
    assert.equal((await engine.getAccount(second))?.flags.closed, true);
    // Services keep the flags: svc:payments closes the victim's account on the bank's behalf.
    const payments = await sign(principalOf('svc:payments'));
    const byService = await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(UNOWNED), credit_account_id: victim, amount: '1', flags: { pending: true, closing_credit: true } } }, payments);
    assert.equal(byService.statusCode, 201, byService.body);
    assert.equal((await engine.getAccount(victim))?.flags.closed, true);
  });

  test('limits, currencies and hours: the fine-grained conditions hold at the HTTP boundary', async () => {
    const token = await sign(customer);
    const limit = CUSTOMER_TRANSFER_MAX_MINOR.toString();
    assert.equal((await call({ method: 'POST', url: '/v1/transfers', payload: transfer(OWN, limit) }, token)).statusCode, 201);
    assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload: transfer(OWN, (CUSTOMER_TRANSFER_MAX_MINOR + 1n).toString()) }, token), 403, 'forbidden');
    assert.equal(lastDecision().reason, 'amount above limit');
    const jpy = newId();
    await engine.createAccounts([{ id: jpy, ledger: 'JPY', code: 1, metadata: { [OWNER_METADATA_KEY]: CUSTOMER } }]);
    assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload: { ...transfer(jpy, '1', 'JPY'), credit_account_id: jpy } }, token), 403, 'forbidden');
    assert.equal(lastDecision().reason, 'ledger not allowed');
    const teller = principalOf(ROLES.teller);
    now = SATURDAY_10;
    try {
      assertProblem(await call({ method: 'POST', url: '/v1/transfers', payload: transfer() }, await sign(teller)), 403, 'forbidden');
      assert.equal(lastDecision().reason, 'outside business hours');
      assert.equal((await call({ method: 'POST', url: '/v1/transfers', payload: transfer() }, await sign(principalOf('svc:payments')))).statusCode, 201);
    } finally {
      now = MONDAY_10;
    }
  });

  test('Idempotency-Key is scoped to the principal: the same key from another principal is not a replay', async () => {
    const body = transfer();
    const key = `key-${newId()}`;
    const payments = await sign(principalOf('svc:payments'));
    const settlement = await sign(principalOf('svc:settlement'));
    const first = await call({ method: 'POST', url: '/v1/transfers', payload: body, headers: { 'idempotency-key': key } }, payments);
    assert.equal(first.statusCode, 201);
    const replay = await call({ method: 'POST', url: '/v1/transfers', payload: body, headers: { 'idempotency-key': key } }, payments);
    assert.deepEqual([replay.statusCode, replay.headers['idempotent-replayed']], [201, 'true']);
    const other = await call({ method: 'POST', url: '/v1/transfers', payload: body, headers: { 'idempotency-key': key } }, settlement);
    assert.equal(other.statusCode, 200);
    assert.equal(other.headers['idempotent-replayed'], undefined);
    assert.equal(other.json<{ result: string }>().result, 'exists');
  });

  test('Idempotency-Key works for subjects as long as a token may carry, each its own scope', async () => {
    // 255 characters, the verifier's limit: `user:` and the subject no longer fit the key
    // store's 255, so the plugin keeps the scope as its hash; two subjects alike but for their last
    // character are two scopes.
    const [one, two] = [`${'c'.repeat(254)}1`, `${'c'.repeat(254)}2`];
    const body = transfer(UNOWNED);
    const key = `key-${newId()}`;
    const teller = async (sub: string): Promise<string> => sign({ sub, kind: 'user', roles: [ROLES.teller] });
    const first = await call({ method: 'POST', url: '/v1/transfers', payload: body, headers: { 'idempotency-key': key } }, await teller(one));
    assert.equal(first.statusCode, 201, first.body);
    const replay = await call({ method: 'POST', url: '/v1/transfers', payload: body, headers: { 'idempotency-key': key } }, await teller(one));
    assert.deepEqual([replay.statusCode, replay.headers['idempotent-replayed'], replay.body], [201, 'true', first.body]);
    const other = await call({ method: 'POST', url: '/v1/transfers', payload: body, headers: { 'idempotency-key': key } }, await teller(two));
    assert.deepEqual([other.statusCode, other.headers['idempotent-replayed'], other.json<{ result: string }>().result], [200, undefined, 'exists']);
  });
});

/** Text a token's claims or a header might carry, the odd kinds included. */
const oddText = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom('', ' ', 'cust-1', 'teller-1', 'a\u0000b', '\uD800', 'é😀', 'x'.repeat(300), 'user:x', 'svc:y', '../../etc', "'; DROP TABLE x; --") },
  { weight: 1, arbitrary: fc.string({ maxLength: 16 }) },
);

test('property: no Authorization header or signed claims make an endpoint answer 5xx; refusals are problem+json', async () => {
  const seed = propertySeed('ledger auth fuzz');
  const statuses = new Map<number, number>();
  const header = fc.oneof(
    oddText,
    oddText.map((t) => `Bearer ${t}`),
    fc.tuple(oddText, oddText, oddText).map(([a, b, c]) => `Bearer ${Buffer.from(a).toString('base64url')}.${Buffer.from(b).toString('base64url')}.${Buffer.from(c).toString('base64url')}`),
    // Tokens this issuer really signed, with claims of any shape.
    fc.record({
      sub: oddText,
      kind: fc.constantFrom('user', 'service', 'robot' as 'user'),
      roles: fc.array(fc.oneof(fc.constantFrom(...ALL_ROLES), oddText), { maxLength: 3 }),
      audience: fc.constantFrom('ledger', 'identity', ''),
    }).map((claims) => ({ claims })),
  );
  const endpoints = [
    (): InjectOptions => ({ method: 'GET', url: `/v1/accounts/${OWN}` }),
    (): InjectOptions => ({ method: 'POST', url: '/v1/transfers', payload: transfer(OWN, '1') }),
    (): InjectOptions => ({ method: 'POST', url: '/v1/transfers', headers: { 'idempotency-key': newId() }, payload: transfer(OWN, '1') }),
    (): InjectOptions => ({ method: 'GET', url: '/v1/audit/records?limit=1' }),
  ];
  await fc.assert(
    fc.asyncProperty(header, fc.nat({ max: endpoints.length - 1 }), async (h, which) => {
      const authorization = typeof h === 'string' ? h : `Bearer ${await sign({ ...h.claims })}`;
      const request = (endpoints[which] as () => InjectOptions)();
      const res = await app.inject({ ...request, headers: { ...(request.headers ?? {}), authorization } });
      assertFuzzAnswer(res, `${String(request.method)} ${JSON.stringify(request.url)} with ${JSON.stringify(h)}`, statuses);
    }),
    { seed, numRuns: 400 },
  );
  assert.ok((statuses.get(401) ?? 0) > 0 && (statuses.get(403) ?? 0) > 0, JSON.stringify([...statuses]));
});

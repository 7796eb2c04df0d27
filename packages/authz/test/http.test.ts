/**
 * The HTTP guard's own safety nets: a protected route must declare its permission, and a
 * protected route that answers 2xx without an authorization decision is a bug that must not
 * reach the client.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Type } from 'typebox';
import { auditHttp, checkEntry, MemoryAuditSink } from '@ledgerline/audit';
import { createService } from '@ledgerline/service-runtime';
import { ADDRESSES_MAX, Authorizer, AuthFailureThrottle, installHttpAuth, OTHER_ADDRESSES, REFERENCE_POLICY, THROTTLED_ACTION, type HttpAuthOptions, type Principal } from '../src/index.ts';

async function build(options: Pick<HttpAuthOptions, 'failureLimit' | 'failureTotalLimit' | 'clock'> = {}) {
  const app = await createService({ config: { LOG_LEVEL: 'fatal', BODY_LIMIT_BYTES: 1024 }, openapi: { title: 't', version: '1' }, logger: false });
  const audit = new MemoryAuditSink();
  const teller: Principal = { id: 'tina', kind: 'user', roles: ['teller'] };
  const auth = installHttpAuth(app, {
    verify: (token) => (token === 'good' ? Promise.resolve(teller) : Promise.reject(new Error('bad token'))),
    authorizer: new Authorizer({ policy: REFERENCE_POLICY, audit }),
    service: 'test',
    ...options,
  });
  return { app, audit, auth };
}

const Ok = { 200: Type.Object({ ok: Type.Boolean() }) };

describe('installHttpAuth', () => {
  test('a route under the protected prefix without a permission fails at registration', async () => {
    const { app } = await build();
    assert.throws(() => app.get('/v1/open', { schema: { response: Ok } }, () => ({ ok: true })), /must declare config.permission/);
    app.get('/internal/open', { schema: { response: Ok } }, () => ({ ok: true }));
    assert.equal((await app.inject({ method: 'GET', url: '/internal/open' })).statusCode, 200);
  });

  test('a protected route that forgets to authorize answers 500, not its 200', async () => {
    const { app, audit, auth } = await build();
    app.get('/v1/forgot', { config: { permission: 'account:read' }, schema: { response: Ok } }, () => ({ ok: true }));
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, (request) => {
      assert.equal(auth.needsOwners(request), false);
      assert.equal(auth.authorize(request, { type: 'account', id: '1' }).id, 'tina');
      return { ok: true };
    });
    const headers = { authorization: 'Bearer good' };
    assert.equal((await app.inject({ method: 'GET', url: '/v1/forgot', headers })).statusCode, 500);
    assert.equal((await app.inject({ method: 'GET', url: '/v1/checked', headers })).statusCode, 200);
    const bad = await app.inject({ method: 'GET', url: '/v1/checked', headers: { authorization: 'Bearer bad' } });
    assert.equal(bad.statusCode, 401);
    assert.equal(bad.headers['www-authenticate'], 'Bearer error="invalid_token"');
    assert.deepEqual(audit.entries.map((e) => [e.outcome, e.reason]), [['success', 'allowed'], ['failure', 'unauthenticated: bad token']]);
  });

  test('an oversized URL is still a 401 whose record the durable audit trail accepts', async () => {
    const { app, audit } = await build();
    app.get('/v1/t/:a/:b/:c/:d/:e', { config: { permission: 'account:read' }, schema: { response: Ok } }, () => ({ ok: true }));
    const segment = 'x'.repeat(90); // each within Fastify's 100-character parameter limit, 470 together
    const response = await app.inject({ method: 'GET', url: `/v1/t/${segment}/${segment}/${segment}/${segment}/${segment}?q=${'y'.repeat(2000)}` });
    assert.equal(response.statusCode, 401);
    const entry = audit.entries.at(-1);
    assert.ok(entry !== undefined);
    assert.equal(entry.resource.id.length, 200);
    checkEntry(entry);
  });

  test('the scheme is case-insensitive (RFC 7235 §2.1): bearer and BEARER carry a token as Bearer does', async () => {
    const { app, audit, auth } = await build();
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, (request) => {
      auth.authorize(request, { type: 'account', id: '1' });
      return { ok: true };
    });
    for (const header of ['Bearer good', 'bearer good', 'BEARER good', 'bEaReR good', 'Bearer  good']) {
      const response = await app.inject({ method: 'GET', url: '/v1/checked', headers: { authorization: header } });
      assert.equal(response.statusCode, 200, `${header}: ${response.body}`);
    }
    // A scheme that is not Bearer, or no token, is still no bearer token.
    for (const header of ['Basic good', 'Bearergood', 'Bearer', 'good']) {
      const response = await app.inject({ method: 'GET', url: '/v1/checked', headers: { authorization: header } });
      assert.equal(response.statusCode, 401, header);
      assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
      assert.match(response.json<{ detail: string }>().detail, /no bearer token/, header);
      assert.equal(response.headers['www-authenticate'], 'Bearer');
    }
    assert.equal(audit.entries.filter((e) => e.outcome === 'success').length, 5);
  });

  test('an address over its limit of authentication failures gets 429, recorded once for all; a valid token from it still passes', async () => {
    let now = Date.UTC(2026, 11, 6, 12, 0, 0);
    const { app, audit, auth } = await build({ failureLimit: { ratePerSecond: 1, burst: 3 }, clock: () => now });
    // The ledger's way: the command record of an audited route, beside the access decision.
    await app.register(auditHttp, { sink: audit, service: 'test', routes: { 'GET /v1/checked': { action: 'test.read', recordClass: 'access', resourceType: 'thing' } } });
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, (request) => {
      auth.authorize(request, { type: 'account', id: '1' });
      return { ok: true };
    });
    const get = (authorization?: string, remoteAddress = '203.0.113.7') =>
      app.inject({ method: 'GET', url: '/v1/checked', remoteAddress, headers: authorization === undefined ? {} : { authorization } });

    // The burst: refused as usual, each with its decision and its command record.
    for (let i = 0; i < 3; i += 1) assert.equal((await get('Bearer forged')).statusCode, 401);
    assert.equal(audit.entries.length, 6);
    // Over it: 429, with nothing recorded per request, bad token or none.
    for (const authorization of ['Bearer forged', undefined, 'Bearer forged', 'Basic x', 'Bearer forged']) {
      const r = await get(authorization);
      assert.equal(r.statusCode, 429, r.body);
      assert.equal(r.headers['retry-after'], '1');
      assert.match(String(r.headers['content-type']), /^application\/problem\+json/);
      assert.match(r.json<{ type: string; detail: string }>().detail, /without valid credentials \(from this address over 1 a second, burst 3/);
    }
    assert.equal(audit.entries.length, 6, 'no record per throttled request');
    // A client behind the same address with a valid token is neither counted nor refused.
    assert.equal((await get('Bearer good')).statusCode, 200);
    // Another address has a bucket of its own; an IPv6 one is keyed by its /64.
    assert.equal((await get('Bearer forged', '198.51.100.1')).statusCode, 401);
    // A second on, the address may fail once more.
    now += 1000;
    assert.equal((await get('Bearer forged')).statusCode, 401);
    assert.equal((await get('Bearer forged')).statusCode, 429);
    const perRequest = audit.entries.length;
    assert.match((await app.inject({ method: 'GET', url: '/metrics' })).body, /^ledgerline_auth_failures_throttled_total 6$/m);

    // Closing records the refusals: one record for the six, which the durable trail accepts.
    await app.close();
    const summaries = audit.entries.slice(perRequest);
    assert.equal(summaries.length, 1);
    const summary = summaries[0];
    assert.ok(summary !== undefined);
    checkEntry(summary);
    assert.deepEqual(
      { action: summary.action, outcome: summary.outcome, actor: summary.actor, resource: summary.resource, payload: summary.payload },
      {
        action: THROTTLED_ACTION,
        outcome: 'failure',
        actor: { type: 'anonymous', id: 'anonymous' },
        resource: { type: 'client-address', id: 'ip:203.0.113.7' },
        payload: { refused: 6, addresses: 1, from: '2026-12-06T12:00:00.000Z', to: '2026-12-06T12:00:01.000Z', ratePerSecond: 1, burst: 3, totalRatePerSecond: 200, totalBurst: 2000 },
      },
    );
    assert.match(summary.reason ?? '', /^6 request\(s\) without valid credentials refused \(429\) from the address/);
  });

  test('an IPv6 client is throttled by its /64, whichever of its addresses it sends from', async () => {
    const { app, audit } = await build({ failureLimit: { ratePerSecond: 1, burst: 1 }, clock: () => 0 });
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, () => ({ ok: true }));
    const from = async (remoteAddress: string): Promise<number> => (await app.inject({ method: 'GET', url: '/v1/checked', remoteAddress })).statusCode;
    assert.equal(await from('2001:db8:1:2::1'), 401);
    assert.equal(await from('2001:db8:1:2:ffff::9'), 429);
    assert.equal(await from('2001:db8:1:3::1'), 401, 'another /64');
    await app.close();
    assert.deepEqual(audit.entries.filter((e) => e.action === THROTTLED_ACTION).map((e) => [e.resource.id, e.payload?.refused]), [['ip6:2001:db8:1:2::/64', 1]]);
  });

  test('many addresses each within its limit are held to a total; past it every one gets 429, and the summaries stay few', async () => {
    const now = Date.UTC(2026, 11, 6, 12, 0, 0);
    const { app, audit } = await build({ failureLimit: { ratePerSecond: 1, burst: 2 }, failureTotalLimit: { ratePerSecond: 1, burst: 10 }, clock: () => now });
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, () => ({ ok: true }));
    const statuses: number[] = [];
    // 150 addresses, one failure each: the first ten are recorded one by one, then the total is spent.
    for (let i = 0; i < 150; i += 1) statuses.push((await app.inject({ method: 'GET', url: '/v1/checked', remoteAddress: `198.18.${i >> 8}.${i & 255}` })).statusCode);
    assert.deepEqual([statuses.filter((c) => c === 401).length, statuses.filter((c) => c === 429).length], [10, 140]);
    assert.deepEqual(statuses.slice(0, 10), Array<number>(10).fill(401));
    assert.equal(audit.entries.length, 10);
    await app.close();
    // 140 refused addresses: the 100 named, the other 40 in one record.
    const summaries = audit.entries.filter((e) => e.action === THROTTLED_ACTION);
    assert.equal(summaries.length, 101);
    const others = summaries.find((e) => e.resource.id === OTHER_ADDRESSES);
    assert.deepEqual({ refused: others?.payload?.refused, addresses: others?.payload?.addresses }, { refused: 40, addresses: 40 });
    assert.equal(summaries.reduce((n, e) => n + Number(e.payload?.refused), 0), 140, 'every refusal counted once');
    for (const e of summaries) checkEntry(e);
  });

  test('a clock that steps back refills nothing until it has made the step up', () => {
    let now = 10_000;
    const throttle = new AuthFailureThrottle({ ratePerSecond: 1, burst: 1 }, () => now);
    assert.equal(throttle.admit('ip:192.0.2.9'), true);
    now -= 5000;
    for (let i = 0; i < 1000; i += 1) assert.equal(throttle.admit('ip:192.0.2.9'), false);
    assert.equal(throttle.retryAfterMs('ip:192.0.2.9'), 1000, 'one second, however many failures the step saw');
    now = 11_000;
    assert.equal(throttle.admit('ip:192.0.2.9'), true, 'a second past the last refill: one more');
  });

  test('the failure throttle forgets idle addresses, and keeps the count of an evicted one', () => {
    let now = 0;
    const throttle = new AuthFailureThrottle({ ratePerSecond: 1, burst: 1 }, () => now, { ratePerSecond: 1_000_000, burst: 1_000_000 });
    assert.equal(throttle.admit('ip:192.0.2.1'), true);
    assert.equal(throttle.admit('ip:192.0.2.1'), false);
    assert.equal(throttle.retryAfterMs('ip:192.0.2.1'), 1000);
    // The address refused once is drained; one never refused is forgotten once its bucket is full again.
    assert.equal(throttle.admit('ip:192.0.2.2'), true);
    now = 5000;
    assert.deepEqual(throttle.drain().map((s) => [s.address, s.refused]), [['ip:192.0.2.1', 1]]);
    assert.deepEqual(throttle.drain(), []);
    // The table is bounded: the oldest address goes first, and its refusals still reach the summary.
    assert.equal(throttle.admit('ip:192.0.2.1'), true);
    assert.equal(throttle.admit('ip:192.0.2.1'), false);
    for (let i = 0; i < ADDRESSES_MAX; i += 1) throttle.admit(`ip:10.${i >> 16}.${(i >> 8) & 255}.${i & 255}`);
    // Evicted addresses are counted together, however many a flood evicts.
    assert.deepEqual(throttle.drain().map((s) => [s.address, s.refused, s.addresses]), [[OTHER_ADDRESSES, 1, 1]]);
  });

  test('the failure limit can be switched off: every failure is a 401 with its record', async () => {
    const { app, audit } = await build({ failureLimit: false });
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, () => ({ ok: true }));
    for (let i = 0; i < 150; i += 1) assert.equal((await app.inject({ method: 'GET', url: '/v1/checked' })).statusCode, 401);
    assert.equal(audit.entries.length, 150);
  });

  test('the OpenAPI document says which routes need a bearer token', async () => {
    const { app } = await build();
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, () => ({ ok: true }));
    app.get('/internal/open', { schema: { response: Ok } }, () => ({ ok: true }));
    const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json<{
      paths: Record<string, { get: { security?: unknown; responses: Record<string, { content?: Record<string, unknown> }> } }>;
      components: { securitySchemes: Record<string, { scheme: string }> };
    }>();
    assert.deepEqual(doc.paths['/v1/checked']?.get.security, [{ bearerAuth: [] }]);
    assert.equal(doc.paths['/internal/open']?.get.security, undefined);
    // The guard's own answers: 401 without a valid token, 429 past the failure limit, as problem+json.
    assert.deepEqual(Object.keys(doc.paths['/v1/checked']?.get.responses ?? {}).sort(), ['200', '401', '429', '503', '504']);
    assert.ok(doc.paths['/v1/checked']?.get.responses['429']?.content?.['application/problem+json'] !== undefined, JSON.stringify(doc.paths['/v1/checked']?.get.responses['429']));
    assert.deepEqual(Object.keys(doc.paths['/internal/open']?.get.responses ?? {}).sort(), ['200', '503', '504']);
    assert.equal(doc.components.securitySchemes.bearerAuth?.scheme, 'bearer');
  });
});

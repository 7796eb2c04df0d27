/**
 * The HTTP guard's own safety nets: a protected route must declare its permission, and a
 * protected route that answers 2xx without an authorization decision is a bug that must not
 * reach the client.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Type } from 'typebox';
import { checkEntry, MemoryAuditSink } from '@ledgerline/audit';
import { createService } from '@ledgerline/service-runtime';
import { Authorizer, installHttpAuth, REFERENCE_POLICY, type Principal } from '../src/index.ts';

async function build() {
  const app = await createService({ config: { LOG_LEVEL: 'fatal', BODY_LIMIT_BYTES: 1024 }, openapi: { title: 't', version: '1' }, logger: false });
  const audit = new MemoryAuditSink();
  const teller: Principal = { id: 'tina', kind: 'user', roles: ['teller'] };
  const auth = installHttpAuth(app, {
    verify: (token) => (token === 'good' ? Promise.resolve(teller) : Promise.reject(new Error('bad token'))),
    authorizer: new Authorizer({ policy: REFERENCE_POLICY, audit }),
    service: 'test',
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

  test('the OpenAPI document says which routes need a bearer token', async () => {
    const { app } = await build();
    app.get('/v1/checked', { config: { permission: 'account:read' }, schema: { response: Ok } }, () => ({ ok: true }));
    app.get('/internal/open', { schema: { response: Ok } }, () => ({ ok: true }));
    const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json<{ paths: Record<string, { get: { security?: unknown } }>; components: { securitySchemes: Record<string, { scheme: string }> } }>();
    assert.deepEqual(doc.paths['/v1/checked']?.get.security, [{ bearerAuth: [] }]);
    assert.equal(doc.paths['/internal/open']?.get.security, undefined);
    assert.equal(doc.components.securitySchemes.bearerAuth?.scheme, 'bearer');
  });
});

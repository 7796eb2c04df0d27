/**
 * The identity service over HTTP with a real PostgreSQL database and an injected clock: the
 * token endpoint for each grant, refresh-token replay, lockout, two-factor enrolment, the
 * administrative routes' 401/403, key rotation seen by a verifier that fetches the JWKS.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { InjectOptions } from 'fastify';
import { importJWK, SignJWT } from 'jose';
import pg from 'pg';
import { MemoryAuditSink } from '@ledgerline/audit';
import { ROLES } from '@ledgerline/authz';
import { createTokenVerifier, Identity, KEY_PUBLISH_LEAD_MS, migrateIdentity, newSigningKey, remoteKeys, totpCode } from '@ledgerline/identity';
import type { Service } from '@ledgerline/service-runtime';
import { ADMIN_DATABASE_URL, createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { AUDIT_ACTIONS, buildIdentityService, IDENTITY_BODY_LIMIT_BYTES_DEFAULT, TOKEN_ACTION } from '../src/app.ts';
import { bootstrap } from '../src/bootstrap.ts';
import { identityDatabase, ISSUER, PASSWORD } from './support.ts';

let now = Date.UTC(2026, 10, 23, 10, 0);
let db: TestDatabase;
let pool: pg.Pool;
let app: Service;
let identity: Identity;
const audit = new MemoryAuditSink();

before(async () => {
  const database = await identityDatabase('ll_identity_http', { clock: () => now, lockout: { failuresMax: 3, lockMs: 60_000 } });
  ({ db, pool, identity } = database);
  const logged: string[] = [];
  const log = { info: (_o: object, message: string) => logged.push(message) };
  await bootstrap(identity, database.config, log, audit);
  await bootstrap(identity, database.config, log, audit); // a restart: nothing is created twice, nothing fails
  assert.deepEqual(logged, ['identity: bootstrap admin user created', 'identity: bootstrap service client created']);
  app = await buildIdentityService({ identity, pool, issuer: ISSUER, audit, clock: () => now, logger: false });
});

after(async () => {
  await app.close();
  await pool.end();
  await db.drop();
});

interface Problem {
  type: string;
  status: number;
  error?: string;
  detail?: string;
}

const form = (fields: Record<string, string>): InjectOptions => ({
  method: 'POST',
  url: '/oauth/token',
  headers: { 'content-type': 'application/x-www-form-urlencoded' },
  payload: new URLSearchParams(fields).toString(),
});

async function token(fields: Record<string, string>) {
  return app.inject(form(fields));
}

function assertOAuthProblem(response: Awaited<ReturnType<Service['inject']>>, status: number, error: string): void {
  assert.equal(response.statusCode, status, response.body);
  assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
  const body = response.json<Problem>();
  assert.equal(body.error, error);
  assert.equal(body.type, `https://ledgerline.dev/problems/${error.replaceAll('_', '-')}`);
}

async function login(username: string, audience = 'identity', extra: Record<string, string> = {}): Promise<{ access_token: string; refresh_token: string }> {
  const r = await token({ grant_type: 'password', username, password: PASSWORD, audience, ...extra });
  assert.equal(r.statusCode, 200, r.body);
  assert.equal(r.headers['cache-control'], 'no-store');
  return r.json();
}

/**
 * A user under a name no other test uses: every test creates the users it needs, so it passes alone,
 * in any order, and beside the others in one shared database. Made directly, not over HTTP, so the
 * audit trail holds only what the test itself sends.
 */
let usernames = 0;
function uniqueUsername(label: string): string {
  usernames += 1;
  return `${label}-${usernames}`;
}

async function newUser(label: string, roles: string[]): Promise<string> {
  const username = uniqueUsername(label);
  await identity.createUser({ username, password: PASSWORD, roles });
  return username;
}

const bearer = (accessToken: string) => ({ authorization: `Bearer ${accessToken}` });

describe('the token endpoint', () => {
  test('password grant as a form and as JSON; bad requests are 400 problems', async () => {
    await login('root');
    const json = await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger' } });
    assert.equal(json.statusCode, 200, json.body);
    assertOAuthProblem(await token({ grant_type: 'password', username: 'root', audience: 'ledger' }), 400, 'invalid_request');
    assertOAuthProblem(await token({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'payments' }), 400, 'invalid_target');
    // Refused by the schema, before the handler: still an OAuth2 error code (RFC 6749 §5.2).
    const badGrant = await token({ grant_type: 'implicit' });
    assert.deepEqual([badGrant.statusCode, badGrant.json<Problem>().error], [400, 'unsupported_grant_type']);
    const unknownField = await token({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger', admin: 'true' });
    assert.deepEqual([unknownField.statusCode, unknownField.json<Problem>().error], [400, 'invalid_request']);
    const noGrant = await token({ username: 'root' });
    assert.deepEqual([noGrant.statusCode, noGrant.json<Problem>().error], [400, 'invalid_request']);
    const notAForm = await app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/xml' }, payload: '<grant/>' });
    assert.deepEqual([notAForm.statusCode, notAForm.json<Problem>().error], [415, 'invalid_request']);
    const revokeNothing = await app.inject({ method: 'POST', url: '/oauth/revoke', payload: {} });
    assert.deepEqual([revokeNothing.statusCode, revokeNothing.json<Problem>().error], [400, 'invalid_request']);
    assertOAuthProblem(await token({ grant_type: 'refresh_token' }), 400, 'invalid_request');
    assertOAuthProblem(await token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'x' }), 400, 'invalid_request');
    assertOAuthProblem(await token({ grant_type: 'client_credentials', audience: 'ledger', client_id: 'payments' }), 400, 'invalid_request');
  });

  test('brute force over HTTP: the third wrong password locks the account, even for the right password, and a locked account answers as an unknown one', async () => {
    const admin = await login('root');
    const created = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload: { username: 'erin', password: PASSWORD, roles: [ROLES.customer] } });
    assert.equal(created.statusCode, 201, created.body);
    assertOAuthProblem(await token({ grant_type: 'password', username: 'erin', password: 'wrong password 1', audience: 'ledger' }), 400, 'invalid_grant');
    assertOAuthProblem(await token({ grant_type: 'password', username: 'erin', password: 'wrong password 2', audience: 'ledger' }), 400, 'invalid_grant');
    const third = await token({ grant_type: 'password', username: 'erin', password: 'wrong password 3', audience: 'ledger' });
    const locked = await token({ grant_type: 'password', username: 'erin', password: PASSWORD, audience: 'ledger' });
    const unknown = await token({ grant_type: 'password', username: 'nobody-by-this-name', password: PASSWORD, audience: 'ledger' });
    for (const r of [third, locked, unknown]) assertOAuthProblem(r, 400, 'invalid_grant');
    // Nothing in the answer tells a locked account from a username that does not exist.
    const body = (r: typeof locked) => { const { instance: _instance, request_id: _requestId, ...rest } = r.json<Record<string, unknown>>(); return rest; };
    assert.deepEqual(body(locked), body(unknown));
    now += 60_000;
    await login('erin', 'ledger');
    // Each attempt is an authentication event in the audit trail, with why it failed.
    const attempts = audit.entries.filter((e) => e.action === 'identity.token' && e.actor.id === 'erin');
    assert.deepEqual(
      attempts.map((e) => [e.outcome, e.reason ?? null]),
      [['failure', 'invalid_grant'], ['failure', 'invalid_grant'], ['failure', 'account_locked'], ['failure', 'account_locked'], ['success', null]],
    );
    assert.deepEqual(attempts[0]?.resource, { type: 'token', id: 'password' });
    assert.equal(JSON.stringify(attempts).includes(PASSWORD), false);
  });

  test('a failed login names a known user, never what was typed as an unknown username: that is a keyed digest, the same for the same text', async () => {
    const username = await newUser('grace', [ROLES.customer]);
    // A password typed in the username field (the reviewer's case: it went verbatim into a trail nobody can erase).
    const typed = 'Tr0ub4dor&3-staple';
    const tokenActors = (from: number) => audit.entries.slice(from).filter((e) => e.action === TOKEN_ACTION).map((e) => [e.actor.type, e.actor.id, e.outcome]);
    const from = audit.entries.length;
    const wrong = await token({ grant_type: 'password', username: username.toUpperCase(), password: 'a wrong password', audience: 'ledger' });
    const unknown = await token({ grant_type: 'password', username: typed, password: 'a wrong password', audience: 'ledger' });
    const again = await token({ grant_type: 'password', username: typed, password: PASSWORD, audience: 'ledger' });
    const other = await token({ grant_type: 'password', username: `${typed}x`, password: PASSWORD, audience: 'ledger' });
    await login(username.toUpperCase(), 'ledger');
    for (const r of [wrong, unknown, again, other]) assertOAuthProblem(r, 400, 'invalid_grant');
    // The answers do not tell them apart.
    const body = (r: typeof wrong) => { const { instance: _instance, request_id: _requestId, ...rest } = r.json<Record<string, unknown>>(); return rest; };
    assert.deepEqual(body(unknown), body(wrong));
    const actors = tokenActors(from);
    const pseudonym = actors[1]?.[1] ?? '';
    assert.match(pseudonym, /^unknown-user:[0-9a-f]{16}$/);
    assert.deepEqual(actors, [
      ['user', username, 'failure'],
      ['user', pseudonym, 'failure'],
      ['user', pseudonym, 'failure'],
      ['user', actors[3]?.[1], 'failure'],
      ['user', username, 'success'],
    ]);
    assert.notEqual(actors[3]?.[1], pseudonym);
    assert.match(String(actors[3]?.[1]), /^unknown-user:[0-9a-f]{16}$/);
    // The same for a client id no client has (a secret set as the id), and a malformed refresh token.
    const secretAsId = 'payments-secret-1-as-id';
    assertOAuthProblem(await token({ grant_type: 'client_credentials', client_id: secretAsId, client_secret: 'payments', audience: 'ledger' }), 401, 'invalid_client');
    assertOAuthProblem(await token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'payments-secret-2', audience: 'ledger' }), 401, 'invalid_client');
    assertOAuthProblem(await token({ grant_type: 'refresh_token', refresh_token: typed }), 400, 'invalid_grant');
    const more = tokenActors(from + 5);
    assert.match(String(more[0]?.[1]), /^unknown-client:[0-9a-f]{16}$/);
    assert.deepEqual(more.slice(1), [['service', 'payments', 'failure'], ['user', 'refresh:malformed', 'failure']]);
    const trail = JSON.stringify(audit.entries.slice(from));
    for (const secret of [typed, typed.toLowerCase(), secretAsId]) assert.equal(trail.includes(secret), false, secret);
    // Instances given the same key name the same text alike.
    const pseudonymKey = new Uint8Array(32).fill(7);
    const services = await Promise.all([0, 1].map(() => buildIdentityService({ identity, pool, issuer: ISSUER, audit, clock: () => now, logger: false, pseudonymKey })));
    try {
      const named: unknown[] = [];
      for (const service of services) {
        await service.inject(form({ grant_type: 'password', username: typed, password: PASSWORD, audience: 'ledger' }));
        named.push(audit.entries.at(-1)?.actor.id);
      }
      assert.equal(named[0], named[1]);
      assert.notEqual(named[0], pseudonym);
    } finally {
      await Promise.all(services.map((service) => service.close()));
    }
  });

  test('refresh rotation; a replayed refresh token is refused and kills the session; revocation', async () => {
    const first = await login('root', 'ledger');
    const second = await token({ grant_type: 'refresh_token', refresh_token: first.refresh_token });
    assert.equal(second.statusCode, 200, second.body);
    assertOAuthProblem(await token({ grant_type: 'refresh_token', refresh_token: first.refresh_token }), 400, 'invalid_grant');
    assertOAuthProblem(await token({ grant_type: 'refresh_token', refresh_token: second.json<{ refresh_token: string }>().refresh_token }), 400, 'invalid_grant');
    const third = await login('root', 'ledger');
    const revoked = await app.inject({ method: 'POST', url: '/oauth/revoke', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: `token=${third.refresh_token}` });
    assert.equal(revoked.statusCode, 200);
    assertOAuthProblem(await token({ grant_type: 'refresh_token', refresh_token: third.refresh_token }), 400, 'invalid_grant');
    // An access token is not revocable here (it lives until it expires): RFC 7009's
    // unsupported_token_type, never a 200 that would say it was revoked; the session goes on.
    const fourth = await login('root', 'ledger');
    assert.ok(fourth.access_token.length > 128);
    const access = await app.inject({ method: 'POST', url: '/oauth/revoke', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: `token=${fourth.access_token}&token_type_hint=access_token` });
    assertOAuthProblem(access, 400, 'unsupported_token_type');
    assert.match(access.json<Problem>().detail ?? '', /refresh tokens only/);
    assert.deepEqual(
      audit.entries.filter((e) => e.action === 'identity.revoke').slice(-1).map((e) => [e.outcome, e.reason, e.actor.id]),
      [['failure', 'unsupported_token_type', 'refresh:malformed']],
    );
    assert.equal((await token({ grant_type: 'refresh_token', refresh_token: fourth.refresh_token })).statusCode, 200);
  });

  test('client credentials with a secret and with a signed assertion; a wrong secret is 401', async () => {
    const ok = await token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'payments-secret-1', audience: 'ledger' });
    assert.equal(ok.statusCode, 200, ok.body);
    assert.equal(ok.json<{ refresh_token?: string }>().refresh_token, undefined);
    assertOAuthProblem(await token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'payments-secret-2', audience: 'ledger' }), 401, 'invalid_client');
    assertOAuthProblem(await token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'payments-secret-1', audience: 'identity' }), 400, 'invalid_target');
    const key = await newSigningKey();
    const { d: _d, ...publicJwk } = key.privateJwk;
    await identity.createClient({ id: 'settlement', publicJwk, roles: ['svc:settlement'], audiences: ['ledger'] });
    const privateKey = await importJWK(key.privateJwk, 'EdDSA');
    const assertion = await new SignJWT({}).setProtectedHeader({ alg: 'EdDSA' }).setIssuer('settlement').setSubject('settlement').setAudience(ISSUER)
      .setIssuedAt(now / 1000).setExpirationTime(now / 1000 + 60).setJti('once').sign(privateKey);
    const fields = { grant_type: 'client_credentials', client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer', client_assertion: assertion, audience: 'ledger' };
    assert.equal((await token(fields)).statusCode, 200);
    assertOAuthProblem(await token(fields), 401, 'invalid_client');
    assert.deepEqual(
      audit.entries.filter((e) => e.action === 'identity.token' && e.actor.id === 'settlement').map((e) => [e.actor.type, e.outcome, e.reason ?? null]),
      [['service', 'success', null], ['service', 'failure', 'invalid_client']],
    );
    assertOAuthProblem(await token({ ...fields, client_assertion: 'not-a-jwt' }), 401, 'invalid_client');
    assert.equal(audit.entries.at(-1)?.actor.id, 'unknown-client');
  });
});

describe('administrative routes and two-factor enrolment', () => {
  test('creating users needs an admin token for this service: 401 without or with the wrong audience, 403 for others, all audited', async () => {
    const payload = { username: uniqueUsername('created'), password: PASSWORD, roles: [ROLES.customer] };
    const none = await app.inject({ method: 'POST', url: '/v1/users', payload });
    assert.equal(none.statusCode, 401);
    assert.equal(audit.entries.at(-1)?.outcome, 'failure');
    const ledgerToken = await login('root', 'ledger');
    assert.equal((await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(ledgerToken.access_token), payload })).statusCode, 401);
    const customer = await login(await newUser('customer', [ROLES.customer]));
    const forbidden = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(customer.access_token), payload });
    assert.equal(forbidden.statusCode, 403);
    assert.equal(audit.entries.at(-1)?.payload?.permission, 'user:create');
    const admin = await login('root');
    assert.equal((await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload })).statusCode, 201);
    assertOAuthProblem(await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload }), 409, 'conflict');
    assert.equal((await app.inject({ method: 'POST', url: '/v1/keys/rotate', headers: bearer(customer.access_token) })).statusCode, 403);
  });

  test('an admin gives a user a customer\'s role only: a staff, oversight or admin role is 403, recorded, and no user is made', async () => {
    // A role that could make a teller could move money through the account it made; one that
    // could make an auditor could read the trail through it (docs/security.md, "Who grants roles").
    const admin = await login('root');
    for (const roles of [[ROLES.teller], [ROLES.customer, ROLES.teller], [ROLES.auditor], [ROLES.complianceOfficer], [ROLES.admin]]) {
      const username = uniqueUsername('proxy');
      const rows = await identityRows();
      const response = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload: { username, password: PASSWORD, roles } });
      assert.equal(response.statusCode, 403, response.body);
      assert.equal(await identityRows(), rows, `no user made for ${roles.join(', ')}`);
      const decision = audit.entries.at(-1);
      assert.deepEqual([decision?.action, decision?.outcome, decision?.reason, decision?.payload?.permission, decision?.payload?.rule, decision?.payload?.grants], ['authz.decision', 'failure', 'role not grantable', 'user:create', 'admin-creates-customers', roles]);
    }
    // A customer, or a user with no role, it may.
    for (const roles of [[ROLES.customer], []]) {
      const response = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload: { username: uniqueUsername('plain'), password: PASSWORD, roles } });
      assert.equal(response.statusCode, 201, response.body);
    }
  });

  test('TOTP enrolment over HTTP, then the password alone is not enough', async () => {
    const username = await newUser('frank', [ROLES.teller]);
    const frank = await login(username);
    const enrol = await app.inject({ method: 'POST', url: '/v1/me/totp', headers: bearer(frank.access_token) });
    assert.equal(enrol.statusCode, 200, enrol.body);
    const { secret } = enrol.json<{ secret: string }>();
    assertOAuthProblem(await app.inject({ method: 'POST', url: '/v1/me/totp/confirm', headers: bearer(frank.access_token), payload: { code: totpCode(secret, now + 120_000), password: PASSWORD } }), 400, 'invalid_grant');
    // The bearer token alone does not bind a second factor: without the password the schema
    // refuses it, and a wrong one is refused (and counted) with the enrolment left pending.
    const noPassword = await app.inject({ method: 'POST', url: '/v1/me/totp/confirm', headers: bearer(frank.access_token), payload: { code: totpCode(secret, now) } });
    assert.equal(noPassword.statusCode, 400, noPassword.body);
    assert.ok(noPassword.json<{ errors: Array<{ path: string; message: string }> }>().errors.some((e) => /password/.test(`${e.path} ${e.message}`)), noPassword.body);
    assertOAuthProblem(await app.inject({ method: 'POST', url: '/v1/me/totp/confirm', headers: bearer(frank.access_token), payload: { code: totpCode(secret, now), password: 'someone else\'s guess' } }), 400, 'invalid_grant');
    assert.ok((await token({ grant_type: 'password', username, password: PASSWORD, audience: 'ledger' })).statusCode === 200, 'two-factor still off');
    const confirmed = await app.inject({ method: 'POST', url: '/v1/me/totp/confirm', headers: bearer(frank.access_token), payload: { code: totpCode(secret, now), password: PASSWORD } });
    assert.equal(confirmed.statusCode, 200, confirmed.body);
    assert.equal(confirmed.json<{ recovery_codes: string[] }>().recovery_codes.length, 10);
    assertOAuthProblem(await app.inject({ method: 'POST', url: '/v1/me/totp', headers: bearer(frank.access_token) }), 409, 'conflict');
    assertOAuthProblem(await token({ grant_type: 'password', username, password: PASSWORD, audience: 'ledger' }), 401, 'mfa_required');
    now += 30_000;
    await login(username, 'ledger', { totp_code: totpCode(secret, now) });
    assertOAuthProblem(await token({ grant_type: 'password', username, password: PASSWORD, audience: 'ledger', totp_code: totpCode(secret, now) }), 400, 'invalid_grant');
  });

  test('key rotation, seen by verifiers that fetch the JWKS over HTTP: published before it signs; old tokens still verify', async () => {
    const address = await app.listen({ port: 0, host: '127.0.0.1' });
    const verifier = () => createTokenVerifier({ keys: remoteKeys(`${address}/.well-known/jwks.json`), issuer: ISSUER, audience: 'ledger', clock: () => now, cacheEntriesMax: 0 });
    const kidOf = (accessToken: string) => (JSON.parse(Buffer.from(accessToken.split('.')[0] ?? '', 'base64url').toString()) as { kid: string }).kid;
    const verifyEarly = verifier();
    const before = await login('root', 'ledger');
    assert.equal((await verifyEarly(before.access_token)).kind, 'user');
    const jwks = await app.inject({ method: 'GET', url: '/.well-known/jwks.json' });
    assert.equal(jwks.headers['cache-control'], 'public, max-age=60');
    const admin = await login('root');
    const rotated = await app.inject({ method: 'POST', url: '/v1/keys/rotate', headers: bearer(admin.access_token) });
    assert.equal(rotated.statusCode, 200, rotated.body);
    const { kid, active_from } = rotated.json<{ kid: string; active_from: string }>();
    assert.equal(Date.parse(active_from), now + KEY_PUBLISH_LEAD_MS);
    // A verifier that fetches now already holds the new key, before any token is signed with it.
    const verifyLate = verifier();
    assert.equal((await verifyLate(before.access_token)).kind, 'user');
    assert.equal(kidOf((await login('root', 'ledger')).access_token), kidOf(before.access_token));
    now += KEY_PUBLISH_LEAD_MS;
    const afterRotation = await login('root', 'ledger');
    assert.equal(kidOf(afterRotation.access_token), kid);
    assert.equal((await verifyLate(afterRotation.access_token)).kind, 'user');
    assert.equal((await verifyLate(before.access_token)).kind, 'user');
    assert.equal((await app.inject({ method: 'GET', url: '/.well-known/jwks.json' })).json<{ keys: unknown[] }>().keys.length, 2);
  });
});

/** Rows that a refused request must leave as they were. */
async function identityRows(): Promise<string> {
  const r = await pool.query<{ n: string }>(
    "SELECT (SELECT count(*) FROM identity.users) || '/' || (SELECT count(*) FROM identity.refresh_tokens) || '/' || (SELECT count(*) FROM identity.clients) AS n",
  );
  return r.rows[0]?.n ?? '';
}

function assertValidationProblem(response: Awaited<ReturnType<Service['inject']>>, path: string, message: string): void {
  assert.equal(response.statusCode, 400, response.body);
  assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
  const body = response.json<Problem & { errors?: Array<{ in: string; path: string; message: string }> }>();
  assert.deepEqual(body.errors, [{ in: 'body', path, message }]);
}

describe('bad input to the token endpoint and the user routes', () => {
  test('a repeated form parameter is 400 invalid_request naming it (RFC 6749 §3.2), and nothing is issued', async () => {
    const before = audit.entries.length;
    const rows = await identityRows();
    const base = 'grant_type=client_credentials&client_id=payments&client_secret=payments-secret-1&audience=ledger';
    for (const [payload, name] of [
      [`${base}&grant_type=client_credentials`, 'grant_type'],
      [`grant_type=password&${base}`, 'grant_type'],
      [`${base}&audience=identity`, 'audience'],
      [`${base}&audience=ledger`, 'audience'],
      [`${base}&client_secret=other`, 'client_secret'],
    ] as const) {
      const response = await app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload });
      assertValidationProblem(response, `/${name}`, 'must not be repeated');
      assert.equal(response.json<Problem>().error, 'invalid_request', payload);
      assert.equal(response.headers['cache-control'], undefined, 'no token, nothing to keep from caches');
    }
    const revoke = await app.inject({ method: 'POST', url: '/oauth/revoke', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: 'token=a.b&token=c.d' });
    assertValidationProblem(revoke, '/token', 'must not be repeated');
    // No handler ran, but each token request and the revocation is an attempt refused in the
    // trail (PCI DSS 10.2.1.2), recorded after its answer: invalid_request, naming nobody (the
    // body was never read). Until 2026-12-07 none was recorded.
    for (let waitedMs = 0; audit.entries.length < before + 6 && waitedMs < 2000; waitedMs += 10) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.deepEqual(
      audit.entries.slice(before).map((e) => [e.action, e.actor.id, e.outcome, e.reason, e.payload?.errors]),
      [...['grant_type', 'grant_type', 'audience', 'audience', 'client_secret'].map((name) => [TOKEN_ACTION, name]), [AUDIT_ACTIONS.revoke, 'token']].map(([action, name]) => [
        action,
        'anonymous',
        'failure',
        'invalid_request',
        [{ in: 'body', path: `/${String(name)}`, message: 'must not be repeated' }],
      ]),
    );
    assert.equal(await identityRows(), rows);
    // Percent-encoding that does not decode to UTF-8 is refused too, rather than read as U+FFFD.
    const undecodable = await app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: base.replace('payments-secret-1', '%E0%A4%A') });
    assertValidationProblem(undecodable, '/client_secret', 'is not valid percent-encoded UTF-8');
    // The same form, each parameter once, is a token.
    assert.equal((await app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: base })).statusCode, 200);
  });

  test('text/plain is 415 (unsupported media type), not a puzzling "body must be object"', async () => {
    const response = await app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': 'text/plain' }, payload: 'grant_type=client_credentials' });
    assert.equal(response.statusCode, 415, response.body);
    assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
    assert.equal(response.json<Problem>().error, 'invalid_request');
  });

  test('an admin cannot give a user a service role: 400 naming the role, and no user is made', async () => {
    const admin = await login('root');
    for (const roles of [['svc:payments'], [ROLES.customer, 'svc:settlement']]) {
      const username = uniqueUsername('mallory');
      const rows = await identityRows();
      const response = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload: { username, password: PASSWORD, roles } });
      assertOAuthProblem(response, 400, 'invalid_request');
      assert.match(response.json<{ detail: string }>().detail, new RegExp(`role ${roles.at(-1) ?? ''} is a service role`));
      assert.equal(await identityRows(), rows);
      // And so nobody can log in as one to get a token carrying the role.
      assertOAuthProblem(await token({ grant_type: 'password', username, password: PASSWORD, audience: 'ledger' }), 400, 'invalid_grant');
    }
  });

  test('a password with a NUL or a lone surrogate is refused at creation, naming the field, and no user is made', async () => {
    const admin = await login('root');
    for (const password of [`${PASSWORD}\u0000`, `${PASSWORD}\ud800`, `\udc00${PASSWORD}`]) {
      const username = uniqueUsername('unstorable');
      const rows = await identityRows();
      const response = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload: { username, password, roles: [ROLES.teller] } });
      assert.equal(response.statusCode, 400, response.body);
      assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
      assert.ok(response.json<{ errors: Array<{ path: string }> }>().errors.some((e) => e.path === '/password'), response.body);
      assert.equal(await identityRows(), rows);
    }
  });

  test('the body limit is 64 KiB by default and bodyLimitBytes changes it, for forms and JSON alike', async () => {
    assert.equal(IDENTITY_BODY_LIMIT_BYTES_DEFAULT, 65_536);
    const oversized = `grant_type=client_credentials&scope=${'a'.repeat(IDENTITY_BODY_LIMIT_BYTES_DEFAULT)}`;
    const big = await app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: oversized });
    assert.equal(big.statusCode, 413);
    assert.match(big.json<{ detail: string }>().detail, /limit of 65536 bytes/);
    const small = await buildIdentityService({ identity, pool, issuer: ISSUER, audit, clock: () => now, logger: false, bodyLimitBytes: 2048 });
    try {
      const form = await small.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: `grant_type=client_credentials&scope=${'a'.repeat(3000)}` });
      assert.equal(form.statusCode, 413);
      assert.match(form.json<{ detail: string }>().detail, /limit of 2048 bytes/);
      const json = await small.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'client_credentials', scope: 'a'.repeat(3000) } });
      assert.equal(json.statusCode, 413);
    } finally {
      await small.close();
    }
  });
});

describe('the database out of reach', () => {
  test('token requests, revocation and the JWKS answer 503 with Retry-After, not 500, whether connections are refused or the database refuses them', async () => {
    // Nothing listens on port 1; and a real database that refuses connections (the reviewer's case:
    // ALLOW_CONNECTIONS false makes PostgreSQL end each new session with FATAL 55000).
    const closed = await createTestDatabase('ll_identity_closed');
    await migrateIdentity(closed.url);
    const admin = new pg.Client({ connectionString: ADMIN_DATABASE_URL });
    await admin.connect();
    await admin.query(`ALTER DATABASE ${closed.name} ALLOW_CONNECTIONS false`);
    // Well-formed, so that refreshing and revoking reach the database.
    const { refresh_token: refreshToken } = await login('root', 'ledger');
    const pools = [
      new pg.Pool({ host: '127.0.0.1', port: 1, user: 'postgres', database: 'none', connectionTimeoutMillis: 500 }),
      new pg.Pool({ connectionString: closed.url, max: 2 }),
    ];
    try {
      for (const deadPool of pools) {
        deadPool.on('error', () => {});
        const offline = new Identity({ pool: deadPool, issuer: ISSUER, userAudiences: ['ledger', 'identity'], clock: () => now });
        const service = await buildIdentityService({ identity: offline, pool: deadPool, issuer: ISSUER, audit, clock: () => now, logger: false });
        try {
          const requests: InjectOptions[] = [
            form({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'payments-secret-1', audience: 'ledger' }),
            form({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger' }),
            form({ grant_type: 'refresh_token', refresh_token: refreshToken }),
            { method: 'POST', url: '/oauth/revoke', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: `token=${refreshToken}` },
            { method: 'GET', url: '/.well-known/jwks.json' },
          ];
          for (const request of requests) {
            const response = await service.inject(request);
            assert.equal(response.statusCode, 503, `${String(request.method)} ${JSON.stringify(request.url)}: ${response.body}`);
            assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
            assert.equal(response.json<Problem>().type, 'https://ledgerline.dev/problems/database-unavailable');
            assert.equal(response.headers['retry-after'], '1');
          }
          // Each attempt is still an authentication event in the trail, failed for an error, the revocation too.
          assert.deepEqual(
            audit.entries.slice(-4).map((e) => [e.action, e.outcome, e.reason]),
            [...Array.from({ length: 3 }, () => [TOKEN_ACTION, 'failure', 'error']), [AUDIT_ACTIONS.revoke, 'failure', 'error']],
          );
        } finally {
          await service.close();
        }
      }
    } finally {
      for (const deadPool of pools) await deadPool.end();
      await admin.query(`ALTER DATABASE ${closed.name} ALLOW_CONNECTIONS true`);
      await admin.end();
      await closed.drop();
    }
  });
});

describe('the OpenAPI document', () => {
  interface Operation {
    requestBody?: { content: Record<string, unknown> };
    responses: Record<string, { content?: Record<string, unknown> }>;
    security?: unknown;
  }

  test('each route documents the statuses it produces, and the token endpoints their form body', async () => {
    const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json<{ paths: Record<string, Record<string, Operation>> }>();
    const statuses = (path: string, method: string) => Object.keys(doc.paths[path]?.[method]?.responses ?? {}).sort();
    // 503 and 504 are the runtime's (shutting down or shedding; the caller's deadline passed),
    // 429 on the administrative routes the bearer guard's (too many failed tokens from an address).
    assert.deepEqual(statuses('/oauth/token', 'post'), ['200', '400', '401', '413', '415', '503', '504']);
    assert.deepEqual(statuses('/oauth/revoke', 'post'), ['200', '400', '413', '415', '503', '504']);
    assert.deepEqual(statuses('/v1/users', 'post'), ['201', '400', '401', '403', '409', '413', '415', '429', '503', '504']);
    assert.deepEqual(statuses('/v1/me/totp', 'post'), ['200', '400', '401', '403', '409', '413', '415', '429', '503', '504']);
    assert.deepEqual(statuses('/v1/me/totp/confirm', 'post'), ['200', '400', '401', '403', '409', '413', '415', '429', '503', '504']);
    assert.deepEqual(statuses('/v1/keys/rotate', 'post'), ['200', '400', '401', '403', '413', '415', '429', '503', '504']);
    assert.deepEqual(statuses('/.well-known/jwks.json', 'get'), ['200', '503', '504']);
    for (const path of ['/oauth/token', '/oauth/revoke']) {
      assert.deepEqual(Object.keys(doc.paths[path]?.post?.requestBody?.content ?? {}).sort(), ['application/json', 'application/x-www-form-urlencoded'], path);
      assert.equal(doc.paths[path]?.post?.security, undefined, `${path} takes client credentials in the body, not a bearer token`);
    }
    assert.deepEqual(doc.paths['/v1/users']?.post?.security, [{ bearerAuth: [] }]);
    for (const [path, methods] of Object.entries(doc.paths)) {
      for (const [method, operation] of Object.entries(methods)) {
        for (const [status, response] of Object.entries(operation.responses)) {
          if (Number(status) >= 400) assert.ok(response.content?.['application/problem+json'] !== undefined, `${method} ${path} ${status} is problem+json`);
        }
      }
    }
  });
});

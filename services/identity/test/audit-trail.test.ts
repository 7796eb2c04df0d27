/**
 * The identity service's audit trail (PCI DSS 10.2.1.4, 10.2.1.5) with a real PostgreSQL
 * database: every authentication event and every change to credentials is recorded, with who
 * did it and how it ended, and never a secret. Revocation, token requests missing a field,
 * refresh-token reuse, a refused audience, and the administrative changes (users, two-factor
 * enrolment, keys) and the bootstrap's accounts.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { InjectOptions } from 'fastify';
import type pg from 'pg';
import { MemoryAuditSink, type AuditEntry } from '@ledgerline/audit';
import { ROLES } from '@ledgerline/authz';
import { totpCode, type Identity } from '@ledgerline/identity';
import type { Service } from '@ledgerline/service-runtime';
import type { TestDatabase } from '@ledgerline/testing';
import { buildIdentityService, TOKEN_ACTION } from '../src/app.ts';
import { bootstrap } from '../src/bootstrap.ts';
import { identityDatabase, ISSUER, PASSWORD } from './support.ts';

let now = Date.UTC(2026, 10, 23, 10, 0);
let db: TestDatabase;
let pool: pg.Pool;
let app: Service;
let identity: Identity;
const audit = new MemoryAuditSink();

before(async () => {
  const database = await identityDatabase('ll_identity_audit', { clock: () => now, lockout: { failuresMax: 3, lockMs: 60_000 } });
  ({ db, pool, identity } = database);
  await bootstrap(identity, database.config, { info: () => {} }, audit);
  await bootstrap(identity, database.config, { info: () => {} }, audit); // a restart creates nothing, records nothing
  app = await buildIdentityService({ identity, pool, issuer: ISSUER, audit, clock: () => now, logger: false });
});

after(async () => {
  await app.close();
  await pool.end();
  await db.drop();
});

const form = (fields: Record<string, string>, url = '/oauth/token'): InjectOptions => ({
  method: 'POST',
  url,
  headers: { 'content-type': 'application/x-www-form-urlencoded' },
  payload: new URLSearchParams(fields).toString(),
});
const token = (fields: Record<string, string>) => app.inject(form(fields));
const revoke = (value: string) => app.inject(form({ token: value }, '/oauth/revoke'));
const bearer = (accessToken: string) => ({ authorization: `Bearer ${accessToken}` });

async function login(username: string, audience = 'identity', extra: Record<string, string> = {}): Promise<{ access_token: string; refresh_token: string }> {
  const r = await token({ grant_type: 'password', username, password: PASSWORD, audience, ...extra });
  assert.equal(r.statusCode, 200, r.body);
  return r.json();
}

let usernames = 0;
async function newUser(label: string, roles: string[] = [ROLES.customer]): Promise<string> {
  usernames += 1;
  const username = `${label}-${usernames}`;
  await identity.createUser({ username, password: PASSWORD, roles });
  return username;
}

/** An answer without what differs on every request. */
function answerOf(r: Awaited<ReturnType<Service['inject']>>): unknown {
  const { instance: _instance, request_id: _requestId, ...rest } = r.json<Record<string, unknown>>();
  return [r.statusCode, rest];
}

/** The records of `action` from index `from` on, waiting (up to 5 s) until there are `count`: some actors are looked up after the answer. */
async function records(from: number, action: string, count: number, trail: MemoryAuditSink = audit): Promise<AuditEntry[]> {
  for (let waitedMs = 0; ; waitedMs += 10) {
    const found = trail.entries.slice(from).filter((e) => e.action === action);
    if (found.length >= count || waitedMs >= 5000) return found;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const brief = (e: AuditEntry) => [e.actor.type, e.actor.id, e.outcome, e.reason ?? null];

describe('revocation (RFC 7009) is in the trail', () => {
  test('a session revoked names the token by its id and the session it ended; unknown, wrong and malformed tokens are failures, all answered 200, no secret recorded', async () => {
    const username = await newUser('rita');
    const userId = await identity.userIdByUsername(username);
    const session = await login(username, 'ledger');
    const [tokenId, secret] = session.refresh_token.split('.') as [string, string];
    const from = audit.entries.length;
    const unknownId = '00000000-0000-4000-8000-000000000000';
    const typed = 'Tr0ub4dor&3-staple';
    const answers = [
      await revoke(session.refresh_token),
      await revoke(session.refresh_token), // again: the session was revoked already
      await revoke(`${tokenId}.${'A'.repeat(43)}`), // the right id, a wrong secret
      await revoke(`${unknownId}.${secret}`),
      await revoke(typed),
    ];
    for (const r of answers) assert.equal(r.statusCode, 200, r.body);
    const revocations = await records(from, 'identity.revoke', 5);
    assert.deepEqual(revocations.map(brief), [
      ['user', `refresh:${tokenId}`, 'success', null],
      ['user', `refresh:${tokenId}`, 'success', null],
      ['user', `refresh:${tokenId}`, 'failure', 'invalid_grant'],
      ['user', `refresh:${unknownId}`, 'failure', 'invalid_grant'],
      ['user', 'refresh:malformed', 'failure', 'invalid_grant'],
    ]);
    const familyId = revocations[0]?.resource.id;
    assert.match(String(familyId), /^[0-9a-f-]{36}$/);
    assert.deepEqual(revocations[0]?.resource, { type: 'session', id: familyId });
    assert.deepEqual(revocations[0]?.payload, { revoked: 1, user_id: userId });
    assert.deepEqual(revocations[1]?.payload, { revoked: 0, user_id: userId });
    assert.equal(revocations[0]?.recordClass, 'access');
    const trail = JSON.stringify(audit.entries.slice(from));
    for (const text of [secret, typed, typed.toLowerCase()]) assert.equal(trail.includes(text), false, text);
    // And the session is over.
    assert.equal((await token({ grant_type: 'refresh_token', refresh_token: session.refresh_token })).statusCode, 400);
  });
});

describe('token requests missing a field are in the trail', () => {
  test('each is a failure, invalid_request, naming its actor as any token request does: a known account, else a digest, never the typed text', async () => {
    const username = await newUser('mia');
    const typed = 'Tr0ub4dor&3-staple';
    const from = audit.entries.length;
    const knownUser = await token({ grant_type: 'password', username: username.toUpperCase(), audience: 'ledger' });
    const unknownUser = await token({ grant_type: 'password', username: typed, audience: 'ledger' });
    const noUser = await token({ grant_type: 'password', password: PASSWORD, audience: 'ledger' });
    const noToken = await token({ grant_type: 'refresh_token' });
    const knownClient = await token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'payments-secret-1' });
    const unknownClient = await token({ grant_type: 'client_credentials', client_id: typed, client_secret: 'payments-secret-1' });
    const noClient = await token({ grant_type: 'client_credentials', audience: 'ledger', client_secret: 'payments-secret-1' });
    const noSecret = await token({ grant_type: 'client_credentials', audience: 'ledger', client_id: 'payments' });
    for (const r of [knownUser, unknownUser, noUser, noToken, knownClient, unknownClient, noClient, noSecret]) {
      assert.deepEqual([r.statusCode, r.json<{ error: string }>().error], [400, 'invalid_request'], r.body);
    }
    // A known and an unknown name are answered alike.
    assert.deepEqual(answerOf(knownUser), answerOf(unknownUser));
    assert.deepEqual(answerOf(knownClient), answerOf(unknownClient));
    const attempts = await records(from, TOKEN_ACTION, 8);
    const byResource = (grant: string) => attempts.filter((e) => e.resource.id === grant).map(brief);
    // Records are written as their lookups end, in either order: the digest is found by its form.
    const userDigest = byResource('password').find((a) => String(a[1]).startsWith('unknown-user:'))?.[1];
    assert.match(String(userDigest), /^unknown-user:[0-9a-f]{16}$/);
    // The same text refused at the password is named by the same digest.
    const counted = audit.entries.length;
    await token({ grant_type: 'password', username: typed, password: PASSWORD, audience: 'ledger' });
    assert.equal(audit.entries.slice(counted).find((e) => e.action === TOKEN_ACTION)?.actor.id, userDigest);
    assert.deepEqual(byResource('password').sort(), [
      ['user', 'unknown-user', 'failure', 'invalid_request'],
      ['user', userDigest, 'failure', 'invalid_request'],
      ['user', username, 'failure', 'invalid_request'],
    ].sort());
    assert.deepEqual(byResource('refresh_token'), [['user', 'refresh:malformed', 'failure', 'invalid_request']]);
    const clientDigest = byResource('client_credentials').find((a) => String(a[1]).startsWith('unknown-client:'))?.[1];
    assert.match(String(clientDigest), /^unknown-client:[0-9a-f]{16}$/);
    assert.deepEqual(byResource('client_credentials').sort(), [
      ['service', 'payments', 'failure', 'invalid_request'],
      ['service', 'payments', 'failure', 'invalid_request'],
      ['service', clientDigest, 'failure', 'invalid_request'],
      ['service', 'unknown-client', 'failure', 'invalid_request'],
    ].sort());
    const trail = JSON.stringify(audit.entries.slice(from));
    for (const text of [typed, typed.toLowerCase(), 'payments-secret-1', PASSWORD]) assert.equal(trail.includes(text), false, text);
  });
});

describe('refresh-token reuse', () => {
  test('a spent token replayed is recorded as refresh_token_reused, a revoked one as refresh_token_revoked, a wrong one as invalid_grant; all are answered invalid_grant', async () => {
    const username = await newUser('theo');
    const first = await login(username, 'ledger');
    const [firstId] = first.refresh_token.split('.') as [string];
    const second = await token({ grant_type: 'refresh_token', refresh_token: first.refresh_token });
    assert.equal(second.statusCode, 200, second.body);
    const secondToken = second.json<{ refresh_token: string }>().refresh_token;
    const [secondId] = secondToken.split('.') as [string];
    const from = audit.entries.length;
    const mistyped = await token({ grant_type: 'refresh_token', refresh_token: `${firstId}.${'A'.repeat(43)}` });
    const replayed = await token({ grant_type: 'refresh_token', refresh_token: first.refresh_token }); // the thief's copy
    const revoked = await token({ grant_type: 'refresh_token', refresh_token: secondToken }); // the victim's, revoked by the reuse
    for (const r of [mistyped, replayed, revoked]) assert.deepEqual([r.statusCode, r.json<{ error: string }>().error], [400, 'invalid_grant']);
    assert.deepEqual((await records(from, TOKEN_ACTION, 3)).map(brief), [
      ['user', `refresh:${firstId}`, 'failure', 'invalid_grant'],
      ['user', `refresh:${firstId}`, 'failure', 'refresh_token_reused'],
      ['user', `refresh:${secondId}`, 'failure', 'refresh_token_revoked'],
    ]);
  });
});

describe('a refused audience', () => {
  test('names a user that exists, looked up after the answer has gone: the answer does not wait for it and is the same for an unknown name', async () => {
    const username = await newUser('aude');
    const typed = 'Tr0ub4dor&3-staple';
    // A service of its own whose lookups wait until released, to see that the answer does not.
    const trail = new MemoryAuditSink();
    const releases: Array<() => void> = [];
    const lookup = identity.knownAccount.bind(identity);
    identity.knownAccount = async (kind, name) => {
      await new Promise<void>((resolve) => releases.push(resolve));
      return lookup(kind, name);
    };
    const service = await buildIdentityService({ identity, pool, issuer: ISSUER, audit: trail, clock: () => now, logger: false });
    try {
      const known = await service.inject(form({ grant_type: 'password', username: username.toUpperCase(), password: PASSWORD, audience: 'payments' }));
      const unknown = await service.inject(form({ grant_type: 'password', username: typed, password: PASSWORD, audience: 'payments' }));
      for (const r of [known, unknown]) assert.deepEqual([r.statusCode, r.json<{ error: string }>().error], [400, 'invalid_target']);
      assert.deepEqual(answerOf(known), answerOf(unknown));
      assert.equal(releases.length, 2, 'both looked up, known or not');
      assert.equal(trail.entries.filter((e) => e.action === TOKEN_ACTION).length, 0, 'answered before the lookups ended');
      for (const release of releases) release();
      // The two lookups end in either order, and each record is written when its lookup ends.
      const refused = (await records(0, TOKEN_ACTION, 2, trail)).map(brief);
      assert.deepEqual(refused.filter((r) => r[1] === username), [['user', username, 'failure', 'invalid_target']]);
      const other = refused.filter((r) => r[1] !== username);
      assert.equal(other.length, 1);
      assert.match(String(other[0]?.[1]), /^unknown-user:[0-9a-f]{16}$/);
      assert.equal(JSON.stringify(trail.entries).includes(typed), false);
      // Closing waits for a lookup still running, so that its record is not lost.
      await service.inject(form({ grant_type: 'password', username, password: PASSWORD, audience: 'payments' }));
      const closed = service.close();
      await new Promise((resolve) => setTimeout(resolve, 20));
      releases.at(-1)?.();
      await closed;
      assert.equal(trail.entries.filter((e) => e.action === TOKEN_ACTION).length, 3);
    } finally {
      for (const release of releases) release();
      await service.close();
      delete (identity as Partial<Identity>).knownAccount; // the prototype's again
    }
    // And on the real service, with the real lookup.
    const from = audit.entries.length;
    await token({ grant_type: 'password', username, password: PASSWORD, audience: 'payments' });
    assert.deepEqual((await records(from, TOKEN_ACTION, 1)).map(brief), [['user', username, 'failure', 'invalid_target']]);
  });
});

describe('changes to credentials', () => {
  test('the bootstrap records the admin and the client it creates, once, and never their secrets', () => {
    const created = audit.entries.filter((e) => e.actor.id === 'identity-bootstrap');
    assert.deepEqual(created.map((e) => [e.action, e.resource.type, e.resource.id, e.outcome]), [
      ['identity.user.create', 'user', 'root', 'success'],
      ['identity.client.create', 'client', 'payments', 'success'],
    ]);
    assert.match(String(created[0]?.payload?.user_id), /^[0-9a-f-]{36}$/);
    assert.deepEqual(created[1]?.payload, { roles: ['svc:payments'], audiences: ['ledger'], authentication: 'client_secret' });
    const trail = JSON.stringify(created);
    for (const secret of [PASSWORD, 'payments-secret-1']) assert.equal(trail.includes(secret), false);
  });

  test('user creation, two-factor enrolment and confirmation, a recovery code spent and key rotation are each recorded with their outcome, naming who did it', async () => {
    const admin = await login('root');
    const adminId = await identity.userIdByUsername('root');
    const from = audit.entries.length;
    const payload = { username: 'nora-audit', password: PASSWORD, roles: [ROLES.customer] };
    const created = await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload });
    assert.equal(created.statusCode, 201, created.body);
    assert.equal((await app.inject({ method: 'POST', url: '/v1/users', headers: bearer(admin.access_token), payload })).statusCode, 409);
    const users = await records(from, 'identity.user.create', 2);
    assert.deepEqual(users.map(brief), [['user', adminId, 'success', null], ['user', adminId, 'failure', 'conflict']]);
    assert.deepEqual(users[0]?.resource, { type: 'user', id: 'nora-audit' });
    assert.deepEqual(users[0]?.payload, { user_id: created.json<{ id: string }>().id, roles: [ROLES.customer] });

    const nora = await login('nora-audit');
    const noraId = created.json<{ id: string }>().id;
    const enrol = await app.inject({ method: 'POST', url: '/v1/me/totp', headers: bearer(nora.access_token) });
    assert.equal(enrol.statusCode, 200, enrol.body);
    const { secret, uri } = enrol.json<{ secret: string; uri: string }>();
    assert.equal((await app.inject({ method: 'POST', url: '/v1/me/totp/confirm', headers: bearer(nora.access_token), payload: { code: totpCode(secret, now + 120_000), password: PASSWORD } })).statusCode, 400);
    const confirmed = await app.inject({ method: 'POST', url: '/v1/me/totp/confirm', headers: bearer(nora.access_token), payload: { code: totpCode(secret, now), password: PASSWORD } });
    assert.equal(confirmed.statusCode, 200, confirmed.body);
    assert.equal((await app.inject({ method: 'POST', url: '/v1/me/totp', headers: bearer(nora.access_token) })).statusCode, 409);
    assert.deepEqual((await records(from, 'identity.totp.enrol', 2)).map(brief), [['user', noraId, 'success', null], ['user', noraId, 'failure', 'conflict']]);
    const confirms = await records(from, 'identity.totp.confirm', 2);
    assert.deepEqual(confirms.map(brief), [['user', noraId, 'failure', 'invalid_grant'], ['user', noraId, 'success', null]]);
    assert.deepEqual(confirms[1]?.payload, { recovery_codes_issued: 10 });

    // A login with a recovery code says so (a credential spent); one with a TOTP code too.
    const [recoveryCode] = confirmed.json<{ recovery_codes: string[] }>().recovery_codes;
    const loginsFrom = audit.entries.length;
    await login('nora-audit', 'ledger', { recovery_code: recoveryCode ?? '' });
    now += 30_000;
    await login('nora-audit', 'ledger', { totp_code: totpCode(secret, now) });
    await login('root', 'ledger');
    const logins = await records(loginsFrom, TOKEN_ACTION, 3);
    assert.deepEqual(logins.map((e) => [e.actor.id, e.outcome, e.payload?.second_factor]), [
      ['nora-audit', 'success', 'recovery_code'],
      ['nora-audit', 'success', 'totp'],
      ['root', 'success', null],
    ]);

    const rotated = await app.inject({ method: 'POST', url: '/v1/keys/rotate', headers: bearer(admin.access_token) });
    assert.equal(rotated.statusCode, 200, rotated.body);
    const rotations = await records(from, 'identity.key.rotate', 1);
    assert.deepEqual(rotations.map(brief), [['user', adminId, 'success', null]]);
    assert.deepEqual(rotations[0]?.payload, rotated.json());

    const trail = JSON.stringify(audit.entries.slice(from));
    for (const text of [PASSWORD, secret, uri, ...confirmed.json<{ recovery_codes: string[] }>().recovery_codes]) assert.equal(trail.includes(text), false, text);
  });
});

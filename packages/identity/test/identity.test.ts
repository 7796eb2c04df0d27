/**
 * `Identity` on a real, freshly migrated PostgreSQL database with an injected clock: logins,
 * brute force until lockout, TOTP with replay, recovery codes, refresh-token rotation and
 * reuse, client credentials with a secret and with a signed assertion, and key rotation.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { importJWK, SignJWT } from 'jose';
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import {
  CLIENT_ASSERTION_TYPE,
  createTokenVerifier,
  Identity,
  IdentityError,
  KEY_PUBLISH_LEAD_MS,
  KEY_REFRESH_MS,
  localKeys,
  migrateIdentity,
  newSigningKey,
  totpCode,
  type IdentityErrorCode,
} from '../src/index.ts';

const ISSUER = 'https://identity.test';
const START_MS = Date.UTC(2026, 10, 23, 10, 0);
const PASSWORD = 'correct horse battery staple';

let db: TestDatabase;
let pool: pg.Pool;
let now = START_MS;
let identity: Identity;

before(async () => {
  db = await createTestDatabase('ll_identity');
  await migrateIdentity(db.url);
  pool = new pg.Pool({ connectionString: db.url, max: 4 });
  identity = new Identity({ pool, issuer: ISSUER, userAudiences: ['ledger', 'identity'], clock: () => now, lockout: { failuresMax: 3, lockMs: 60_000 } });
  await identity.ensureSigningKey();
});

after(async () => {
  await pool.end();
  await db.drop();
});

async function refusedWith(call: Promise<unknown>, code: IdentityErrorCode): Promise<void> {
  await assert.rejects(call, (error: unknown) => error instanceof IdentityError && error.code === code);
}

/**
 * A username no other test uses: every test creates the users it needs under its own names, so it
 * passes alone, in any order, and beside the others in one shared database.
 */
let usernames = 0;
function uniqueUsername(label: string): string {
  usernames += 1;
  return `${label}-${usernames}`;
}

async function newUser(label: string, roles: string[] = ['customer']): Promise<string> {
  const username = uniqueUsername(label);
  await identity.createUser({ username, password: PASSWORD, roles });
  return username;
}

async function verifierFor(audience: string) {
  return createTokenVerifier({ keys: localKeys(await identity.jwks()), issuer: ISSUER, audience, clock: () => now, cacheEntriesMax: 0 });
}

describe('users and logins', () => {
  test('a user logs in with the right password and gets a token for the asked audience only', async () => {
    const { id } = await identity.createUser({ username: 'Alice', password: PASSWORD, roles: ['customer'], tenant: 't1' });
    assert.equal(await identity.userIdByUsername('alice'), id);
    const tokens = await identity.login({ username: 'alice', password: PASSWORD, audience: 'ledger' });
    assert.equal(tokens.token_type, 'Bearer');
    assert.equal(tokens.expires_in, 300);
    const v = await (await verifierFor('ledger'))(tokens.access_token);
    assert.deepEqual([v.id, v.kind, v.roles, v.tenant], [id, 'user', ['customer'], 't1']);
    await assert.rejects((await verifierFor('identity'))(tokens.access_token));
    await refusedWith(identity.login({ username: 'alice', password: PASSWORD, audience: 'payments' }), 'invalid_target');
  });

  test('bad users are refused before anything is stored', async () => {
    // The taken name is made here, in another case: usernames conflict case-insensitively.
    const taken = uniqueUsername('taken');
    await identity.createUser({ username: taken.toUpperCase(), password: PASSWORD, roles: [] });
    await refusedWith(identity.createUser({ username: taken, password: PASSWORD, roles: [] }), 'conflict');
    const bob = uniqueUsername('bob');
    await refusedWith(identity.createUser({ username: bob, password: 'short', roles: [] }), 'invalid_request');
    await refusedWith(identity.createUser({ username: 'x', password: PASSWORD, roles: [] }), 'invalid_request');
    await refusedWith(identity.createUser({ username: bob, password: PASSWORD, roles: ['Admin!'] }), 'invalid_request');
    assert.equal(await identity.userIdByUsername(bob), null);
  });

  test('brute force: the third wrong password locks the user; the right one is refused until the lock ends', async () => {
    await identity.createUser({ username: 'victim', password: PASSWORD, roles: ['customer'] });
    const attempt = (password: string) => identity.login({ username: 'victim', password, audience: 'ledger' });
    await refusedWith(attempt('guess number one'), 'invalid_grant');
    await refusedWith(attempt('guess number two'), 'invalid_grant');
    await refusedWith(attempt('guess number three'), 'account_locked');
    await refusedWith(attempt(PASSWORD), 'account_locked');
    now += 59_999;
    await refusedWith(attempt(PASSWORD), 'account_locked');
    now += 1;
    assert.ok((await attempt(PASSWORD)).access_token.length > 0);
    // Success cleared the count: two more failures do not lock.
    await refusedWith(attempt('guess number four'), 'invalid_grant');
    await refusedWith(attempt('guess number five'), 'invalid_grant');
    assert.ok((await attempt(PASSWORD)).access_token.length > 0);
  });

  test('parallel guesses are counted one by one: no more than the limit get a password check', async () => {
    await identity.createUser({ username: 'parallel', password: PASSWORD, roles: ['customer'] });
    const results = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => identity.login({ username: 'parallel', password: `wrong guess ${i}xx`, audience: 'ledger' })));
    const codes = results.map((r) => (r.status === 'rejected' && r.reason instanceof IdentityError ? r.reason.code : 'ok')).sort();
    assert.deepEqual(codes, ['account_locked', 'account_locked', 'account_locked', 'account_locked', 'invalid_grant', 'invalid_grant']);
  });

  test('an unknown username is refused like a wrong password', async () => {
    await refusedWith(identity.login({ username: 'nobody', password: PASSWORD, audience: 'ledger' }), 'invalid_grant');
  });
});

describe('TOTP two-factor', () => {
  test('enrol, confirm, then every login needs a fresh code or an unused recovery code', async () => {
    const { id } = await identity.createUser({ username: 'carol', password: PASSWORD, roles: ['teller'] });
    const { secret, uri } = await identity.enrolTotp(id, 'Ledgerline');
    assert.match(uri, /^otpauth:\/\/totp\/Ledgerline:carol\?/);
    // Not on until confirmed: a password alone still works.
    assert.ok((await identity.login({ username: 'carol', password: PASSWORD, audience: 'ledger' })).access_token);
    await refusedWith(identity.confirmTotp(id, totpCode(secret, now - 120_000)), 'invalid_grant');
    const { recoveryCodes } = await identity.confirmTotp(id, totpCode(secret, now));
    assert.equal(recoveryCodes.length, 10);
    await refusedWith(identity.confirmTotp(id, totpCode(secret, now)), 'conflict');
    await refusedWith(identity.enrolTotp(id, 'Ledgerline'), 'conflict');

    const login = (extra: { totpCode?: string; recoveryCode?: string }) => identity.login({ username: 'carol', password: PASSWORD, audience: 'ledger', ...extra });
    await refusedWith(login({}), 'mfa_required');
    // The confirming code's step is spent: the same code cannot log in.
    await refusedWith(login({ totpCode: totpCode(secret, now) }), 'invalid_grant');
    now += 30_000;
    const code = totpCode(secret, now);
    assert.ok((await login({ totpCode: code })).access_token);
    await refusedWith(login({ totpCode: code }), 'invalid_grant'); // replay
    now += 30_000;
    assert.ok((await login({ totpCode: totpCode(secret, now) })).access_token); // clears the failure count
    await refusedWith(login({ totpCode: totpCode(secret, now - 90_000) }), 'invalid_grant'); // stale
    const recovery = recoveryCodes[0] ?? '';
    assert.ok((await login({ recoveryCode: recovery.toUpperCase() })).access_token);
    await refusedWith(login({ recoveryCode: recovery }), 'invalid_grant'); // good once only
  });
});

describe('refresh tokens', () => {
  test('rotation: each refresh spends the token; reuse of a spent one revokes the whole family', async () => {
    await identity.createUser({ username: 'dave', password: PASSWORD, roles: ['customer'] });
    const first = await identity.login({ username: 'dave', password: PASSWORD, audience: 'ledger' });
    const second = await identity.refresh(first.refresh_token ?? '');
    const third = await identity.refresh(second.refresh_token ?? '');
    assert.notEqual(second.refresh_token, third.refresh_token);
    // The attacker replays the first token: refused, and the live third one dies with it.
    await refusedWith(identity.refresh(first.refresh_token ?? ''), 'invalid_grant');
    await refusedWith(identity.refresh(third.refresh_token ?? ''), 'invalid_grant');
  });

  test('revocation, expiry, forged and malformed tokens', async () => {
    const username = await newUser('revoked');
    const a = await identity.login({ username, password: PASSWORD, audience: 'ledger' });
    const refresh = a.refresh_token ?? '';
    const [id = '', secret = ''] = refresh.split('.');
    await refusedWith(identity.refresh(`${id}.${secret.startsWith('A') ? 'B' : 'A'}${secret.slice(1)}`), 'invalid_grant');
    await refusedWith(identity.refresh('garbage'), 'invalid_grant');
    await identity.revoke('garbage');
    await identity.revoke(refresh);
    await refusedWith(identity.refresh(refresh), 'invalid_grant');
    const b = await identity.login({ username, password: PASSWORD, audience: 'ledger' });
    now += 8 * 3600 * 1000;
    await refusedWith(identity.refresh(b.refresh_token ?? ''), 'invalid_grant');
  });
});

describe('service clients (client credentials)', () => {
  test('a secret gets a token for one registered audience; a wrong secret, an unknown client or another audience do not', async () => {
    await identity.createClient({ id: 'payments', secret: 'payments-secret-1', roles: ['svc:payments'], audiences: ['ledger'] });
    const t = await identity.clientCredentials({ clientId: 'payments', secret: 'payments-secret-1' }, 'ledger');
    assert.equal(t.refresh_token, undefined);
    const v = await (await verifierFor('ledger'))(t.access_token);
    assert.deepEqual([v.id, v.kind, v.roles], ['payments', 'service', ['svc:payments']]);
    await refusedWith(identity.clientCredentials({ clientId: 'payments', secret: 'wrong-secret-xx' }, 'ledger'), 'invalid_client');
    await refusedWith(identity.clientCredentials({ clientId: 'nobody', secret: 'payments-secret-1' }, 'ledger'), 'invalid_client');
    await refusedWith(identity.clientCredentials({ clientId: 'payments', secret: 'payments-secret-1' }, 'identity'), 'invalid_target');
    await refusedWith(identity.createClient({ id: 'payments', secret: 'payments-secret-1', roles: [], audiences: ['ledger'] }), 'conflict');
    await refusedWith(identity.createClient({ id: 'bare', roles: [], audiences: ['ledger'] }), 'invalid_request');
    await refusedWith(identity.createClient({ id: 'x', secret: 'payments-secret-1', roles: [], audiences: ['ledger'] }), 'invalid_request');
    await refusedWith(identity.createClient({ id: 'noaud', secret: 'payments-secret-1', roles: [], audiences: [] }), 'invalid_request');
    await refusedWith(identity.createClient({ id: 'weak', secret: 'short', roles: [], audiences: ['ledger'] }), 'invalid_request');
  });

  test('private_key_jwt: a signed assertion works once; replayed, expired, wrong audience or wrong key does not', async () => {
    const clientKey = await newSigningKey();
    const { d: _d, ...publicOnly } = clientKey.privateJwk;
    await refusedWith(identity.createClient({ id: 'settlement', publicJwk: clientKey.privateJwk, roles: [], audiences: ['ledger'] }), 'invalid_request');
    await identity.createClient({ id: 'settlement', publicJwk: publicOnly, roles: ['svc:settlement'], audiences: ['ledger'] });
    const privateKey = await importJWK(clientKey.privateJwk, 'EdDSA');
    const assertion = (claims: { aud?: string; iatMs?: number; jti?: string; iss?: string }, key = privateKey) =>
      new SignJWT({})
        .setProtectedHeader({ alg: 'EdDSA' })
        .setIssuer(claims.iss ?? 'settlement')
        .setSubject(claims.iss ?? 'settlement')
        .setAudience(claims.aud ?? ISSUER)
        .setIssuedAt(Math.floor((claims.iatMs ?? now) / 1000))
        .setExpirationTime(Math.floor((claims.iatMs ?? now) / 1000) + 60)
        .setJti(claims.jti ?? crypto.randomUUID())
        .sign(key);
    const once = await assertion({ jti: 'a-1' });
    const t = await identity.clientCredentials({ assertion: once }, 'ledger');
    assert.deepEqual((await (await verifierFor('ledger'))(t.access_token)).roles, ['svc:settlement']);
    await refusedWith(identity.clientCredentials({ assertion: once }, 'ledger'), 'invalid_client');
    await refusedWith(identity.clientCredentials({ assertion: await assertion({ iatMs: now - 120_000 }) }, 'ledger'), 'invalid_client');
    await refusedWith(identity.clientCredentials({ assertion: await assertion({ aud: 'https://elsewhere.test' }) }, 'ledger'), 'invalid_client');
    await refusedWith(identity.clientCredentials({ assertion: await assertion({ iss: 'payments' }) }, 'ledger'), 'invalid_client');
    const stranger = await importJWK((await newSigningKey()).privateJwk, 'EdDSA');
    await refusedWith(identity.clientCredentials({ assertion: await assertion({}, stranger) }, 'ledger'), 'invalid_client');
    await refusedWith(identity.clientCredentials({ assertion: 'not.a.jwt' }, 'ledger'), 'invalid_client');
    assert.equal(CLIENT_ASSERTION_TYPE, 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer');
  });
});

describe('signing keys', () => {
  test('rotation: the new key is published first, signs after the lead, and the old one is published until its last token expired', async () => {
    await identity.createClient({ id: 'reporting', secret: 'reporting-secret', roles: ['svc:reporting'], audiences: ['ledger'] });
    const issue = () => identity.clientCredentials({ clientId: 'reporting', secret: 'reporting-secret' }, 'ledger');
    const kidOf = (token: string) => (JSON.parse(Buffer.from(token.split('.')[0] ?? '', 'base64url').toString()) as { kid: string }).kid;
    const before = await issue();
    const oldKid = kidOf(before.access_token);
    assert.deepEqual((await identity.jwks()).keys.map((k) => k.kid), [oldKid]);
    const { kid: newKid, activeFrom } = await identity.rotateKeys();
    assert.equal(activeFrom.getTime(), now + KEY_PUBLISH_LEAD_MS);
    // Published at once, but not yet signing (and the signer cache is not what holds it back: the lead is).
    assert.deepEqual((await identity.jwks()).keys.map((k) => k.kid), [newKid, oldKid]);
    now += KEY_REFRESH_MS;
    assert.equal(kidOf((await issue()).access_token), oldKid);
    now += KEY_PUBLISH_LEAD_MS - KEY_REFRESH_MS;
    const afterRotation = await issue();
    assert.equal(kidOf(afterRotation.access_token), newKid);
    // Both verify against the published set.
    assert.equal((await (await verifierFor('ledger'))(before.access_token)).id, 'reporting');
    assert.equal((await (await verifierFor('ledger'))(afterRotation.access_token)).id, 'reporting');
    // The old key goes once its last token (signed up to KEY_REFRESH_MS after it was superseded) has expired.
    now += 300_000 + KEY_REFRESH_MS;
    assert.deepEqual((await identity.jwks()).keys.map((k) => k.kid), [newKid]);
    await identity.ensureSigningKey();
    assert.equal((await identity.jwks()).keys.length, 1);
  });
});

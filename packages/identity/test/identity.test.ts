/**
 * `Identity` on a real, freshly migrated PostgreSQL database with an injected clock: logins,
 * brute force until lockout, TOTP with replay, recovery codes, refresh-token rotation and
 * reuse, client credentials with a secret and with a signed assertion, and key rotation.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { importJWK, SignJWT } from 'jose';
import pg from 'pg';
import { createTestDatabase, terminateBackends, type TestDatabase } from '@ledgerline/testing';
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

  test('users cannot hold service roles, nor service clients the roles of people; the refusal names the role', async () => {
    const mallory = uniqueUsername('mallory');
    await assert.rejects(identity.createUser({ username: mallory, password: PASSWORD, roles: ['customer', 'svc:payments'] }), (error: unknown) =>
      error instanceof IdentityError && error.code === 'invalid_request' && error.message.includes('svc:payments'));
    assert.equal(await identity.userIdByUsername(mallory), null);
    await assert.rejects(identity.createClient({ id: 'rogue-client', secret: 'rogue-secret-123', roles: ['svc:payments', 'admin'], audiences: ['ledger'] }), (error: unknown) =>
      error instanceof IdentityError && error.code === 'invalid_request' && error.message.includes('role admin'));
    await refusedWith(identity.clientCredentials({ clientId: 'rogue-client', secret: 'rogue-secret-123' }, 'ledger'), 'invalid_client');
  });

  test('a stale signing key does not deadlock the pool: pool-size + 1 parallel logins all answer', async () => {
    // The reviewer's case: every login held a connection and the user's row lock while reading
    // the (stale) signing key through the same pool, so with the pool full none could finish.
    const POOL_MAX = 4;
    const small = new pg.Pool({ connectionString: db.url, max: POOL_MAX });
    small.on('error', () => {});
    small.on('connect', (c) => c.on('error', () => {}));
    let clock = now;
    const own = new Identity({ pool: small, issuer: ISSUER, userAudiences: ['ledger'], clock: () => clock });
    const username = await newUser('stale-key');
    const within = <T>(p: Promise<T>, ms: number) => Promise.race([p.then((v) => ({ done: true as const, v })), new Promise<{ done: false }>((r) => setTimeout(() => r({ done: false }), ms).unref())]);
    try {
      await own.login({ username, password: PASSWORD, audience: 'ledger' }); // the signer is loaded
      clock += KEY_REFRESH_MS + 1000; // and now stale: the next token re-reads it
      const burst = Promise.allSettled(Array.from({ length: POOL_MAX + 1 }, () => own.login({ username, password: PASSWORD, audience: 'ledger' })));
      const r = await within(burst, 8000);
      assert.ok(r.done, 'the logins did not answer within 8 s: the pool is deadlocked');
      assert.deepEqual(r.v.map((x) => x.status), Array.from({ length: POOL_MAX + 1 }, () => 'fulfilled'));
      const jwks = await within(own.jwks(), 3000);
      assert.ok(jwks.done && jwks.v.keys.length > 0);
    } finally {
      // On failure the deadlocked backends are ended, so that the test ends too.
      const stuck = await within(small.end(), 1000);
      if (!stuck.done) await terminateBackends(db.name);
    }
  });

  test('a login that waits on a held row lock gives up after the lock timeout, as temporarily_unavailable', async () => {
    const username = await newUser('held');
    const holder = await pool.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM identity.users WHERE username = $1 FOR UPDATE', [username]);
      const started = performance.now();
      // Bounded here too, so that a login that would wait forever fails the test instead of hanging it.
      const timer = new Promise<'hung'>((r) => setTimeout(() => r('hung'), 9000).unref());
      const outcome = await Promise.race([identity.login({ username, password: PASSWORD, audience: 'ledger' }).then(() => 'issued', (e: unknown) => (e instanceof IdentityError ? e.code : String(e))), timer]);
      assert.equal(outcome, 'temporarily_unavailable');
      const waited = performance.now() - started;
      assert.ok(waited >= 4000, `waited ${waited} ms`);
    } finally {
      await holder.query('ROLLBACK');
      holder.release();
    }
    assert.ok((await identity.login({ username, password: PASSWORD, audience: 'ledger' })).access_token.length > 0);
  });

  test('an unknown username is refused like a wrong password', async () => {
    await refusedWith(identity.login({ username: 'nobody', password: PASSWORD, audience: 'ledger' }), 'invalid_grant');
  });

  test('an unknown username, a wrong password and a locked account cost the database the same: the same statements, a row updated, a COMMIT of a write', async () => {
    // The reviewer's case: a wrong password committed its count (a WAL flush) while an unknown
    // username rolled back, answering ~1.7 ms sooner of ~12: a timing oracle for usernames.
    const traced = new pg.Pool({ connectionString: db.url, max: 2 });
    const shapes: string[][] = [];
    const realConnect = traced.connect.bind(traced) as (callback?: unknown) => Promise<pg.PoolClient>;
    Object.assign(traced, {
      connect: async (callback?: unknown) => {
        if (callback !== undefined) return realConnect(callback); // pool.query's own checkout
        const client = await realConnect();
        const shape: string[] = [];
        shapes.push(shape);
        const clientQuery = client.query.bind(client) as (text: string, values?: unknown[]) => Promise<pg.QueryResult>;
        Object.assign(client, {
          query: async (text: string, values?: unknown[]) => {
            const kind = text.trim().split(/[\s;]/)[0]?.toUpperCase() ?? '';
            if (kind === 'COMMIT' || kind === 'ROLLBACK') {
              const wrote = await clientQuery('SELECT pg_current_xact_id_if_assigned() IS NOT NULL AS wrote');
              shape.push(`${kind}${(wrote.rows[0] as { wrote: boolean }).wrote ? ' after a write' : ''}`);
            } else {
              shape.push(kind);
            }
            return clientQuery(text, values);
          },
        });
        const release = client.release.bind(client);
        client.release = (error?: Error | boolean) => {
          delete (client as Partial<pg.PoolClient>).query;
          client.release = release;
          release(error);
        };
        return client;
      },
    });
    const own = new Identity({ pool: traced, issuer: ISSUER, userAudiences: ['ledger'], clock: () => now, lockout: { failuresMax: 2, lockMs: 60_000 } });
    const username = await newUser('same-work');
    const attempt = async (name: string, password: string, code: IdentityErrorCode) => {
      const before = shapes.length;
      await refusedWith(own.login({ username: name, password, audience: 'ledger' }), code);
      assert.equal(shapes.length, before + 1);
      return shapes.at(-1) ?? [];
    };
    try {
      const unknown = await attempt(uniqueUsername('nobody'), PASSWORD, 'invalid_grant');
      const wrong = await attempt(username, 'a wrong password', 'invalid_grant');
      const locking = await attempt(username, 'another wrong password', 'account_locked');
      const locked = await attempt(username, PASSWORD, 'account_locked');
      // The same statements in the same order: an unknown username updates a decoy row (migration
      // 1770400000000) where a wrong password updates the user's count.
      assert.deepEqual(wrong, ['BEGIN', 'SELECT', 'UPDATE', 'COMMIT after a write']);
      assert.deepEqual({ unknown, locking, locked }, { unknown: wrong, locking: wrong, locked: wrong });
    } finally {
      await traced.end();
    }
  });
});

describe('TOTP two-factor', () => {
  test('enrol, confirm, then every login needs a fresh code or an unused recovery code', async () => {
    const { id } = await identity.createUser({ username: 'carol', password: PASSWORD, roles: ['teller'] });
    const { secret, uri } = await identity.enrolTotp(id, 'Ledgerline');
    assert.match(uri, /^otpauth:\/\/totp\/Ledgerline:carol\?/);
    // Not on until confirmed: a password alone still works.
    assert.ok((await identity.login({ username: 'carol', password: PASSWORD, audience: 'ledger' })).access_token);
    await refusedWith(identity.confirmTotp(id, totpCode(secret, now - 120_000), PASSWORD), 'invalid_grant');
    // A token alone does not bind a second factor: the password too, a wrong one counted as a failed login.
    await refusedWith(identity.confirmTotp(id, totpCode(secret, now), 'not the password at all'), 'invalid_grant');
    assert.equal((await pool.query<{ n: number }>('SELECT failed_logins AS n FROM identity.users WHERE id = $1', [id])).rows[0]?.n, 1);
    const { recoveryCodes } = await identity.confirmTotp(id, totpCode(secret, now), PASSWORD);
    assert.equal(recoveryCodes.length, 10);
    await refusedWith(identity.confirmTotp(id, totpCode(secret, now), PASSWORD), 'conflict');
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

  test('reuse detection wins a race with a concurrent rotation: the thief\'s session does not survive', async () => {
    // The reviewer's race: the family was revoked by one UPDATE under READ COMMITTED, and a token
    // a concurrent rotation inserted and committed while that UPDATE waited escaped it.
    const username = await newUser('race');
    const TRIALS = 20;
    let escapes = 0;
    for (let trial = 0; trial < TRIALS; trial++) {
      const first = await identity.login({ username, password: PASSWORD, audience: 'ledger' });
      const stolen = first.refresh_token ?? '';
      // The thief rotates first (the victim's copy is now spent), then keeps rotating.
      let current = (await identity.refresh(stolen)).refresh_token ?? '';
      let stop = false;
      const thief = (async () => {
        while (!stop) {
          try {
            current = (await identity.refresh(current)).refresh_token ?? '';
          } catch {
            return false;
          }
        }
        return true;
      })();
      await new Promise((r) => setTimeout(r, 5 + (trial % 5) * 4));
      await refusedWith(identity.refresh(stolen), 'invalid_grant'); // the victim's spent copy: reuse
      await new Promise((r) => setTimeout(r, 30));
      stop = true;
      if (await thief) {
        try {
          await identity.refresh(current);
          escapes += 1;
        } catch {
          // revoked after all
        }
      }
    }
    assert.equal(escapes, 0, `the thief's session survived reuse detection in ${escapes} of ${TRIALS} trials`);
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
    // Correctly signed, with a jti the replay table cannot store (a NUL) or index (2,800
    // characters): refused as invalid_client, not a database error.
    await refusedWith(identity.clientCredentials({ assertion: await assertion({ jti: 'abc\u0000def' }) }, 'ledger'), 'invalid_client');
    await refusedWith(identity.clientCredentials({ assertion: await assertion({ jti: 'j'.repeat(2800) }) }, 'ledger'), 'invalid_client');
    // At the limit it is kept, and works once.
    const longest = await assertion({ jti: 'k'.repeat(255) });
    await identity.clientCredentials({ assertion: longest }, 'ledger');
    await refusedWith(identity.clientCredentials({ assertion: longest }, 'ledger'), 'invalid_client');
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

  test('two rotations in the same millisecond: one key, the other a conflict (409), not a server error', async () => {
    const keysBefore = (await identity.jwks()).keys.length;
    const [a, b] = await Promise.allSettled([identity.rotateKeys(), identity.rotateKeys()]);
    const outcomes = [a, b].map((r) => r.status);
    assert.deepEqual(outcomes.sort(), ['fulfilled', 'rejected']);
    const refused = [a, b].find((r) => r.status === 'rejected') as PromiseRejectedResult;
    assert.ok(refused.reason instanceof IdentityError, String(refused.reason));
    assert.equal(refused.reason.code, 'conflict');
    assert.equal((await identity.jwks()).keys.length, keysBefore + 1);
    // A moment later, a rotation goes through.
    now += 1;
    await identity.rotateKeys();
    assert.equal((await identity.jwks()).keys.length, keysBefore + 2);
  });
});

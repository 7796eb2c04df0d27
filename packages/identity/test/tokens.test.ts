/**
 * Token verification under attack, TOTP against RFC 6238's own test vectors, and the lockout
 * arithmetic. No database: keys are made here and verified through a local key set.
 */
import assert from 'node:assert/strict';
import { createHmac, generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';
import { describe, test } from 'node:test';
import { exportJWK, importJWK, SignJWT, type CryptoKey } from 'jose';
import { Secret } from 'otpauth';
import {
  afterFailure,
  AFTER_SUCCESS,
  createTokenVerifier,
  InvalidTokenError,
  isLocked,
  JWKS_CACHE_MAX_AGE_MS,
  localKeys,
  newRecoveryCodes,
  newSigningKey,
  recoveryCodeHash,
  RECOVERY_CODES_COUNT,
  remoteKeys,
  signAccessToken,
  totpCode,
  verifyTotp,
  type SigningKeyPair,
  type TotpParams,
} from '../src/index.ts';

const ISSUER = 'https://identity.test';
const NOW_MS = Date.UTC(2026, 10, 23, 10, 0);

async function signer(pair: SigningKeyPair): Promise<{ kid: string; privateKey: CryptoKey }> {
  const privateKey = await importJWK(pair.privateJwk, 'EdDSA');
  assert.ok(!(privateKey instanceof Uint8Array));
  return { kid: pair.kid, privateKey };
}

const b64 = (value: object | string) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

describe('access tokens: verification refuses every forgery', async () => {
  const pair = await newSigningKey();
  const key = await signer(pair);
  const other = await newSigningKey();
  const verify = createTokenVerifier({ keys: localKeys({ keys: [pair.publicJwk] }), issuer: ISSUER, audience: 'ledger', clock: () => NOW_MS });
  const claims = { sub: 'alice', kind: 'user' as const, roles: ['customer'], audience: 'ledger' };
  const good = await signAccessToken(key, claims, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS });
  const [header = '', payload = '', signature = ''] = good.split('.');
  const refused = async (token: string, code: string) => {
    await assert.rejects(verify(token), (error: unknown) => error instanceof InvalidTokenError && error.message === code);
  };

  test('a genuine token verifies, with its claims', async () => {
    const v = await verify(good);
    assert.deepEqual({ ...v, jti: typeof v.jti }, { id: 'alice', kind: 'user', roles: ['customer'], jti: 'string', audience: 'ledger', expiresAtMs: NOW_MS + 300_000 });
    const withTenant = await signAccessToken(key, { ...claims, tenant: 't1' }, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS });
    assert.equal((await verify(withTenant)).tenant, 't1');
  });

  test('a forged signature (same claims, another key with the same kid)', async () => {
    const forger = await signer({ ...other, kid: pair.kid });
    await refused(await signAccessToken(forger, claims, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS }), 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED');
    const flipped = `${signature.startsWith('A') ? 'B' : 'A'}${signature.slice(1)}`;
    await refused(`${header}.${payload}.${flipped}`, 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED');
  });

  test('privilege escalation by editing claims: roles, audience or subject changed, signature kept', async () => {
    const original = JSON.parse(Buffer.from(payload, 'base64url').toString()) as Record<string, unknown>;
    for (const edit of [{ roles: ['admin'] }, { aud: 'ledger', sub: 'bob' }, { kind: 'service', roles: ['svc:payments'] }, { exp: original.exp as number + 86_400 }]) {
      await refused(`${header}.${b64({ ...original, ...edit })}.${signature}`, 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED');
    }
  });

  test('alg: none, with or without a signature', async () => {
    const none = b64({ alg: 'none', typ: 'at+jwt', kid: pair.kid });
    await refused(`${none}.${payload}.`, 'malformed token');
    await refused(`${none}.${payload}.${signature}`, 'ERR_JOSE_ALG_NOT_ALLOWED');
  });

  test('HS256 keyed with the public key (key confusion), and an RS256 token', async () => {
    const hsHeader = b64({ alg: 'HS256', typ: 'at+jwt', kid: pair.kid });
    const mac = createHmac('sha256', JSON.stringify(pair.publicJwk)).update(`${hsHeader}.${payload}`).digest('base64url');
    await refused(`${hsHeader}.${payload}.${mac}`, 'malformed token'); // a 32-byte MAC is not a 64-byte signature
    const macX = createHmac('sha256', Buffer.from(pair.publicJwk.x ?? '', 'base64url')).update(`${hsHeader}.${payload}`).digest();
    const padded = Buffer.concat([macX, macX]).toString('base64url');
    await refused(`${hsHeader}.${payload}.${padded}`, 'ERR_JOSE_ALG_NOT_ALLOWED');
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const rsToken = await new SignJWT({ kind: 'user', roles: ['admin'] })
      .setProtectedHeader({ alg: 'RS256', kid: pair.kid, typ: 'at+jwt' })
      .setIssuer(ISSUER).setSubject('mallory').setAudience('ledger').setIssuedAt(NOW_MS / 1000).setNotBefore(NOW_MS / 1000).setExpirationTime(NOW_MS / 1000 + 60).setJti('j')
      .sign(rsa.privateKey);
    await refused(rsToken, 'malformed token'); // an RS256 signature is 256 bytes
    const rsaJwk = await exportJWK(rsa.publicKey);
    const rsaVerify = createTokenVerifier({ keys: localKeys({ keys: [pair.publicJwk, { ...rsaJwk, kid: 'rsa', alg: 'RS256' }] }), issuer: ISSUER, audience: 'ledger', clock: () => NOW_MS });
    const [h2 = '', p2 = ''] = rsToken.split('.');
    const sig64 = Buffer.alloc(64, 1).toString('base64url');
    await assert.rejects(rsaVerify(`${h2}.${p2}.${sig64}`), (e: unknown) => e instanceof InvalidTokenError && e.message === 'ERR_JOSE_ALG_NOT_ALLOWED');
  });

  test('an unknown kid', async () => {
    const stranger = await signer(other);
    await refused(await signAccessToken(stranger, claims, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS }), 'ERR_JWKS_NO_MATCHING_KEY');
  });

  test('expired, not yet valid, wrong audience, wrong issuer, wrong type', async () => {
    await refused(await signAccessToken(key, claims, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS - 306_000 }), 'ERR_JWT_EXPIRED');
    await refused(await signAccessToken(key, claims, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS + 60_000 }), 'ERR_JWT_CLAIM_VALIDATION_FAILED');
    await refused(await signAccessToken(key, { ...claims, audience: 'payments' }, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS }), 'ERR_JWT_CLAIM_VALIDATION_FAILED');
    await refused(await signAccessToken(key, claims, { issuer: 'https://evil.test', ttlSeconds: 300, nowMs: NOW_MS }), 'ERR_JWT_CLAIM_VALIDATION_FAILED');
    const idToken = await new SignJWT({ kind: 'user', roles: [] }).setProtectedHeader({ alg: 'EdDSA', kid: pair.kid })
      .setIssuer(ISSUER).setSubject('alice').setAudience('ledger').setIssuedAt(NOW_MS / 1000).setNotBefore(NOW_MS / 1000).setExpirationTime(NOW_MS / 1000 + 60).setJti('j')
      .sign(key.privateKey);
    await refused(idToken, 'ERR_JWT_CLAIM_VALIDATION_FAILED');
  });

  test('signed but malformed claims, and garbage', async () => {
    const sign = (body: Record<string, unknown>) =>
      new SignJWT(body).setProtectedHeader({ alg: 'EdDSA', kid: pair.kid, typ: 'at+jwt' })
        .setIssuer(ISSUER).setSubject('alice').setAudience('ledger').setIssuedAt(NOW_MS / 1000).setNotBefore(NOW_MS / 1000).setExpirationTime(NOW_MS / 1000 + 60).setJti('j')
        .sign(key.privateKey);
    await refused(await sign({ kind: 'root', roles: [] }), 'token claims malformed');
    await refused(await sign({ kind: 'user', roles: 'admin' }), 'token claims malformed');
    await refused(await sign({ kind: 'user', roles: [], tenant: 7 }), 'token claims malformed');
    await refused(await sign({ kind: 'user', roles: ['x'.repeat(256)] }), 'token claims malformed');
    await refused(await sign({ kind: 'user', roles: [], tenant: 't'.repeat(256) }), 'token claims malformed');
    const longSubject = await new SignJWT({ kind: 'user', roles: [] }).setProtectedHeader({ alg: 'EdDSA', kid: pair.kid, typ: 'at+jwt' })
      .setIssuer(ISSUER).setSubject('s'.repeat(256)).setAudience('ledger').setIssuedAt(NOW_MS / 1000).setNotBefore(NOW_MS / 1000).setExpirationTime(NOW_MS / 1000 + 60).setJti('j')
      .sign(key.privateKey);
    await refused(longSubject, 'token claims malformed');
    // A subject every consumer can store and compare (idempotency scopes, audit actors): printable
    // ASCII without spaces. This issuer's (user UUIDs, client ids) fit; others are refused here,
    // where they once failed later in the database as a 500.
    const withSubject = (subject: string, body: Record<string, unknown> = { kind: 'user', roles: [] }) =>
      new SignJWT(body).setProtectedHeader({ alg: 'EdDSA', kid: pair.kid, typ: 'at+jwt' })
        .setIssuer(ISSUER).setSubject(subject).setAudience('ledger').setIssuedAt(NOW_MS / 1000).setNotBefore(NOW_MS / 1000).setExpirationTime(NOW_MS / 1000 + 60).setJti('j')
        .sign(key.privateKey);
    for (const subject of ['', 'a b', 'a\u0000b', 'é', '\uD800', 'tab\t']) await refused(await withSubject(subject), 'token claims malformed');
    for (const subject of ['0197a1b2-0000-7000-8000-000000000001', 'svc.payments-1']) assert.equal((await verify(await withSubject(subject))).id, subject);
    await refused(await withSubject('alice', { kind: 'user', roles: [''] }), 'token claims malformed');
    await refused(await withSubject('alice', { kind: 'user', roles: [], tenant: 't\u0000' }), 'token claims malformed');
    assert.equal((await verify(await withSubject('alice', { kind: 'user', roles: [], tenant: 'Société' }))).tenant, 'Société');
    await refused('not-a-token', 'malformed token');
    await refused(`${good}${'A'.repeat(4096)}`, 'malformed token');
  });

  test('the cache: a verified token is served from memory until it expires, then refused', async () => {
    let now = NOW_MS;
    const cached = createTokenVerifier({ keys: localKeys({ keys: [pair.publicJwk] }), issuer: ISSUER, audience: 'ledger', clock: () => now, cacheEntriesMax: 1 });
    const second = await signAccessToken(key, { ...claims, sub: 'bob' }, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW_MS });
    assert.equal((await cached(good)).id, 'alice');
    assert.equal((await cached(good)).id, 'alice');
    assert.equal((await cached(second)).id, 'bob'); // evicts the first
    assert.equal((await cached(good)).id, 'alice');
    now = NOW_MS + 306_000;
    await assert.rejects(cached(good), InvalidTokenError);
  });

  test('cacheEntriesMax 0 keeps nothing: a token whose key is withdrawn is refused at its next use', async () => {
    let published = [pair.publicJwk];
    let lookups = 0;
    const keys: Parameters<typeof createTokenVerifier>[0]['keys'] = (header, token) => {
      lookups += 1;
      return localKeys({ keys: published })(header, token);
    };
    const fresh = createTokenVerifier({ keys, issuer: ISSUER, audience: 'ledger', clock: () => NOW_MS, cacheEntriesMax: 0 });
    assert.equal((await fresh(good)).id, 'alice');
    assert.equal((await fresh(good)).id, 'alice');
    assert.equal(lookups, 2, 'each use looked its key up');
    published = [];
    await assert.rejects(fresh(good), InvalidTokenError);
  });
});

describe('remote keys', () => {
  test('a key withdrawn from the JWKS stops verifying new tokens once the cached set is older than its max-age (60 s)', async (t) => {
    // The reviewer's case: with a 10-minute cache, a withdrawn (compromised) key kept verifying
    // freshly minted tokens for 10 minutes, while the docs promised a minute.
    assert.equal(JWKS_CACHE_MAX_AGE_MS, 60_000);
    const compromised = await newSigningKey();
    const good = await newSigningKey();
    let keys = [compromised.publicJwk, good.publicJwk];
    let fetches = 0;
    const server = createServer((_request, response) => {
      fetches += 1;
      response.setHeader('content-type', 'application/json');
      response.end(JSON.stringify({ keys }));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(() => server.close());
    const { port } = server.address() as { port: number };
    const verify = createTokenVerifier({ keys: remoteKeys(`http://127.0.0.1:${port}/jwks`), issuer: ISSUER, audience: 'ledger', cacheEntriesMax: 0 });
    const key = await signer(compromised);
    const mint = (sub: string) => signAccessToken(key, { sub, kind: 'service', roles: ['svc:payments'], audience: 'ledger' }, { issuer: ISSUER, ttlSeconds: 300, nowMs: Date.now() });
    assert.equal((await verify(await mint('before'))).id, 'before');
    const fresh = await mint('after-withdrawal');
    keys = [good.publicJwk];
    // jose reads Date.now for its cache's age; 70 s later the set is stale and fetched again.
    const later = Date.now() + JWKS_CACHE_MAX_AGE_MS + 10_000;
    t.mock.method(Date, 'now', () => later);
    await assert.rejects(verify(fresh), InvalidTokenError);
    assert.equal(fetches, 2);
  });
});

describe('TOTP (RFC 6238)', () => {
  // RFC 6238 Appendix B: 8 digits, 30 s steps; the seed is the ASCII digits, 20/32/64 bytes long.
  const seeds = { SHA1: '12345678901234567890', SHA256: '12345678901234567890123456789012', SHA512: '1234567890123456789012345678901234567890123456789012345678901234' } as const;
  const vectors: [number, string, string, string][] = [
    [59, '94287082', '46119246', '90693936'],
    [1111111109, '07081804', '68084774', '25091201'],
    [1111111111, '14050471', '67062674', '99943326'],
    [1234567890, '89005924', '91819424', '93441116'],
    [2000000000, '69279037', '90698825', '38618901'],
    [20000000000, '65353130', '77737706', '47863826'],
  ];

  test('Appendix B test vectors, for generation and verification', () => {
    for (const [seconds, ...codes] of vectors) {
      for (const [i, algorithm] of (['SHA1', 'SHA256', 'SHA512'] as const).entries()) {
        const params: TotpParams = { algorithm, digits: 8, periodSeconds: 30 };
        const secret = Secret.fromLatin1(seeds[algorithm]).base32;
        const expected = codes[i] ?? '';
        assert.equal(totpCode(secret, seconds * 1000, params), expected, `${algorithm} at ${seconds}`);
        assert.equal(verifyTotp(secret, expected, seconds * 1000, null, params), BigInt(Math.floor(seconds / 30)));
      }
    }
  });

  test('wrong, stale and replayed codes are refused; one step of drift either way is accepted', () => {
    const secret = Secret.fromLatin1(seeds.SHA1).base32;
    const params: TotpParams = { algorithm: 'SHA1', digits: 8, periodSeconds: 30 };
    const t = 1111111111 * 1000; // step 37037037, code 14050471
    assert.equal(verifyTotp(secret, '14050472', t, null, params), null);
    assert.equal(verifyTotp(secret, '1405047', t, null, params), null);
    assert.equal(verifyTotp(secret, '1405047a', t, null, params), null);
    // The code of step 37037036 (1111111109) one step later is drift, accepted; two steps later it is stale.
    assert.equal(verifyTotp(secret, '07081804', t, null, params), 37037036n);
    assert.equal(verifyTotp(secret, '07081804', t + 60_000, null, params), null);
    // Replay: once step 37037037 was used, its code (and any older one) is refused.
    assert.equal(verifyTotp(secret, '14050471', t, 37037037n, params), null);
    assert.equal(verifyTotp(secret, '07081804', t, 37037037n, params), null);
    assert.equal(verifyTotp(secret, '14050471', t, 37037036n, params), 37037037n);
    // The 6-digit default: the RFC's SHA-1 code truncated to its last six digits.
    assert.equal(totpCode(secret, t), '050471');
    assert.equal(verifyTotp(secret, '050471', t, null), 37037037n);
  });

  test('recovery codes: distinct, 80 bits, hashed after normalising', () => {
    const codes = newRecoveryCodes();
    assert.equal(codes.length, RECOVERY_CODES_COUNT);
    assert.equal(new Set(codes).size, codes.length);
    for (const code of codes) assert.match(code, /^[a-z2-7]{4}(-[a-z2-7]{4}){3}$/);
    const first = codes[0] ?? '';
    assert.deepEqual(recoveryCodeHash(first.toUpperCase().replaceAll('-', ' ')), recoveryCodeHash(first));
  });
});

describe('lockout', () => {
  const policy = { failuresMax: 3, lockMs: 60_000 };
  test('the failure that reaches the limit locks for lockMs; success clears; attempts during the lock do not extend it', () => {
    let c = AFTER_SUCCESS;
    c = afterFailure(c, policy, 0);
    c = afterFailure(c, policy, 1);
    assert.deepEqual(c, { failedLogins: 2, lockedUntil: null });
    assert.equal(isLocked(c, 2), false);
    c = afterFailure(c, policy, 2);
    assert.deepEqual(c, { failedLogins: 0, lockedUntil: new Date(60_002) });
    assert.equal(isLocked(c, 60_001), true);
    assert.equal(isLocked(c, 60_002), false);
  });
});

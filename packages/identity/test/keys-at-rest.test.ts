/**
 * Signing keys at rest (src/keys-at-rest.ts) on a real database: with a key-encryption key the
 * private keys are stored only as JWEs and tokens still verify; keys stored in clear before it
 * was configured are encrypted at start and keep signing; and a store opened without the key,
 * with another key, or with a JWE moved to another row refuses with a reason.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, beforeEach, test } from 'node:test';
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { createTokenVerifier, Identity, KeyEncryptionKeyError, localKeys, migrateIdentity, parseKeyEncryptionKey, type KeyEncryptionKey } from '../src/index.ts';

const ISSUER = 'https://identity.test';
const PASSWORD = 'correct horse battery staple';
const NOW = Date.UTC(2026, 11, 4, 12, 0);

let db: TestDatabase | undefined;
let pool: pg.Pool | undefined;

beforeEach(async () => {
  await pool?.end();
  await db?.drop();
  db = await createTestDatabase('ll_identity_keys');
  await migrateIdentity(db.url);
  pool = new pg.Pool({ connectionString: db.url, max: 3 });
});

after(async () => {
  await pool?.end();
  await db?.drop();
});

const newKek = (): KeyEncryptionKey => parseKeyEncryptionKey(randomBytes(32).toString('base64url'));

function identityWith(kek: KeyEncryptionKey | undefined): Identity {
  return new Identity({ pool: pool as pg.Pool, issuer: ISSUER, userAudiences: ['ledger'], clock: () => NOW, ...(kek === undefined ? {} : { keyEncryptionKey: kek }) });
}

/** Logs a user in through `identity` and verifies the token against its published keys. */
async function issuesVerifiableTokens(identity: Identity, username: string): Promise<void> {
  await identity.createUser({ username, password: PASSWORD, roles: ['customer'] });
  const { access_token } = await identity.login({ username, password: PASSWORD, audience: 'ledger' });
  const verifier = createTokenVerifier({ keys: localKeys(await identity.jwks()), issuer: ISSUER, audience: 'ledger', clock: () => NOW, cacheEntriesMax: 0 });
  assert.equal((await verifier(access_token)).kind, 'user');
}

async function storedKeys(): Promise<Array<{ kid: string; clear: boolean; jwe: string | null }>> {
  const r = await (pool as pg.Pool).query<{ kid: string; clear: boolean; jwe: string | null }>(
    'SELECT kid, private_jwk IS NOT NULL AS clear, private_jwe AS jwe FROM identity.signing_keys ORDER BY active_from',
  );
  return r.rows;
}

test('with a key-encryption key, the private signing key is stored only as a JWE, and tokens verify', async () => {
  const kek = newKek();
  const identity = identityWith(kek);
  await identity.ensureSigningKey();
  const [key] = await storedKeys();
  assert.equal(key?.clear, false);
  // A compact JWE (five parts) whose protected header names the key-encryption key and the
  // signing key, and which carries none of the JWK's members in clear.
  const parts = key?.jwe?.split('.') ?? [];
  assert.equal(parts.length, 5);
  const header = JSON.parse(Buffer.from(parts[0] as string, 'base64url').toString()) as Record<string, unknown>;
  assert.deepEqual(header, { alg: 'dir', enc: 'A256GCM', kid: kek.id, 'ledgerline.signing_kid': key?.kid });
  // Only base64url parts, so no JSON, and no JWK member, in clear. (It tested for the text
  // "OKP" once, which random ciphertext spells about once in a thousand runs: CI met one.)
  assert.match(key?.jwe ?? '', /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);
  await issuesVerifiableTokens(identity, 'alice');
});

test('keys stored in clear before the key-encryption key was set are encrypted at start and keep signing', async () => {
  // Given a store whose signing key was written in clear, and a token signed with it,
  const before = identityWith(undefined);
  await before.ensureSigningKey();
  await issuesVerifiableTokens(before, 'bob');
  const [clear] = await storedKeys();
  assert.equal(clear?.clear, true);
  // when the service starts with a key-encryption key,
  const kek = newKek();
  const after = identityWith(kek);
  await after.ensureSigningKey();
  // then the same key is now stored only encrypted, and still signs verifiable tokens.
  const [sealed] = await storedKeys();
  assert.deepEqual([sealed?.kid, sealed?.clear, typeof sealed?.jwe], [clear?.kid, false, 'string']);
  await issuesVerifiableTokens(after, 'carol');
});

test('a store with encrypted keys refuses to start without the key, with another key, or with a JWE moved to another row', async () => {
  const kek = newKek();
  const identity = identityWith(kek);
  await identity.ensureSigningKey();
  await identity.rotateKeys();
  // Without a key-encryption key:
  await assert.rejects(identityWith(undefined).ensureSigningKey(), (e: unknown) => e instanceof KeyEncryptionKeyError && /stored encrypted, and no key-encryption key is configured/.test(e.message));
  // With another one:
  const other = newKek();
  await assert.rejects(identityWith(other).ensureSigningKey(), (e: unknown) => e instanceof KeyEncryptionKeyError && e.message.includes(`not the configured ${other.id}`));
  // With a JWE moved from the newer key's row to the signing key's row (by a superuser):
  const [current, next] = await storedKeys();
  await (pool as pg.Pool).query('UPDATE identity.signing_keys SET private_jwe = $2 WHERE kid = $1', [current?.kid, next?.jwe]);
  const fresh = identityWith(kek);
  await fresh.createUser({ username: 'dave', password: PASSWORD, roles: ['customer'] });
  await assert.rejects(
    fresh.login({ username: 'dave', password: PASSWORD, audience: 'ledger' }),
    (e: unknown) => e instanceof KeyEncryptionKeyError && e.message.includes(`stored as ${String(current?.kid)} belongs to ${String(next?.kid)}`),
  );
});

test('rotation: started with "new,old", the keys under old are encrypted again under new; then new alone serves and old alone is refused', async () => {
  const oldText = randomBytes(32).toString('base64url');
  const newText = randomBytes(32).toString('base64url');
  const old = parseKeyEncryptionKey(oldText);
  const before = identityWith(old);
  await before.ensureSigningKey();
  await before.rotateKeys();
  await issuesVerifiableTokens(before, 'erin');
  const kids = (await storedKeys()).map((k) => k.kid);
  // Started with both keys, the store ends up wholly under the new one, the same signing keys.
  const rotating = parseKeyEncryptionKey(`${newText},${oldText}`);
  assert.deepEqual([...rotating.previous.keys()], [old.id]);
  await identityWith(rotating).ensureSigningKey();
  const stored = await storedKeys();
  assert.deepEqual(stored.map((k) => k.kid), kids);
  const under = stored.map((k) => JSON.parse(Buffer.from((k.jwe ?? '').split('.')[0] as string, 'base64url').toString()) as { kid: string });
  assert.deepEqual(under.map((h) => h.kid), kids.map(() => rotating.id));
  await issuesVerifiableTokens(identityWith(parseKeyEncryptionKey(newText)), 'frank');
  await assert.rejects(identityWith(old).ensureSigningKey(), (e: unknown) => e instanceof KeyEncryptionKeyError && e.message.includes(`not the configured ${old.id}`));
  assert.throws(() => parseKeyEncryptionKey(`${newText},${newText}`), /the same key twice/);
  assert.throws(() => parseKeyEncryptionKey(`${newText},nope`), /key 2 of 2/);
});

test('a malformed key-encryption key is refused with what it must be', () => {
  assert.throws(() => parseKeyEncryptionKey('not base64!'), /must be 32 random bytes in base64url/);
  assert.throws(() => parseKeyEncryptionKey(randomBytes(16).toString('base64url')), /must be 32 bytes; got 16/);
  // base64 with padding and the standard alphabet reads the same as base64url.
  const bytes = randomBytes(32);
  assert.deepEqual(parseKeyEncryptionKey(bytes.toString('base64')).key, parseKeyEncryptionKey(bytes.toString('base64url')).key);
});

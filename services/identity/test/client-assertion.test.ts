/**
 * The client-assertion grant against what anyone can send: an assertion is read for its
 * claimed client before its signature is checked, and that claim reaches a query and, as the
 * refusal's actor, the audit trail. Whatever it claims, the answer is a 4xx and the refusal is
 * recorded, with the audit sink the service runs by default (PostgreSQL's, which checks every
 * entry), not the in-memory one the other tests use. And a registered client's assertion may
 * not live longer than the server keeps assertions for (RFC 7523 §3).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { importJWK, SignJWT } from 'jose';
import pg from 'pg';
import { migrateAudit, PostgresAuditSink } from '@ledgerline/audit';
import { Identity, migrateIdentity, newSigningKey } from '@ledgerline/identity';
import type { Service } from '@ledgerline/service-runtime';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { buildIdentityService } from '../src/app.ts';

const ISSUER = 'https://identity.test';
const now = Date.UTC(2026, 10, 23, 10, 0);
let db: TestDatabase;
let pool: pg.Pool;
let app: Service;
let identity: Identity;
let sink: PostgresAuditSink;
let clientKey: Awaited<ReturnType<typeof importJWK>>;

before(async () => {
  db = await createTestDatabase('ll_identity_assertion');
  await migrateIdentity(db.url);
  await migrateAudit(db.url);
  pool = new pg.Pool({ connectionString: db.url, max: 4 });
  identity = new Identity({ pool, issuer: ISSUER, userAudiences: ['ledger', 'identity'], clock: () => now });
  await identity.ensureSigningKey();
  const key = await newSigningKey();
  const { d: _d, ...publicJwk } = key.privateJwk;
  await identity.createClient({ id: 'settlement', publicJwk, roles: ['svc:settlement'], audiences: ['ledger'] });
  clientKey = await importJWK(key.privateJwk, 'EdDSA');
  // The sink main.ts uses when AUDIT_ENABLED (the default).
  sink = new PostgresAuditSink({ pool, flushIntervalMs: 60_000 });
  app = await buildIdentityService({ identity, pool, issuer: ISSUER, audit: sink, clock: () => now, logger: false });
});

after(async () => {
  await app.close();
  await sink.close();
  await pool.end();
  await db.drop();
});

const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
/** An unsigned-looking JWT (garbage signature) claiming issuer `iss`: anyone can send one. */
const forged = (iss: string) => `${b64({ alg: 'EdDSA' })}.${b64({ iss, sub: iss, aud: ISSUER, jti: 'x', iat: now / 1000, exp: now / 1000 + 60 })}.${'A'.repeat(86)}`;

async function assertionRequest(assertion: string) {
  return app.inject({
    method: 'POST',
    url: '/oauth/token',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    payload: new URLSearchParams({ grant_type: 'client_credentials', client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer', client_assertion: assertion, audience: 'ledger' }).toString(),
  });
}

/** The refusals of the client-credentials grant recorded so far, by their actor's id. */
async function refusedActors(): Promise<string[]> {
  await sink.flush();
  const r = await pool.query<{ id: string }>(
    `SELECT q.entry::jsonb->'actor'->>'id' AS id FROM audit.queue q
      WHERE q.entry::jsonb->>'action' = 'identity.token' AND q.entry::jsonb->>'outcome' = 'failure' ORDER BY q.id`,
  );
  return r.rows.map((x) => x.id);
}

for (const [label, iss] of [['a NUL', 'settle\u0000ment'], ['an empty string', ''], ['a lone surrogate', '\uD800x'], ['upper case', 'Settlement'], ['65 characters', 'a'.repeat(65)]] as const) {
  test(`a forged client_assertion whose iss is ${label} is 401 invalid_client, recorded as an unknown client`, async () => {
    const before = (await refusedActors()).length;
    const r = await assertionRequest(forged(iss));
    assert.equal(r.statusCode, 401, r.body);
    assert.equal(r.json<{ error: string }>().error, 'invalid_client');
    assert.deepEqual((await refusedActors()).slice(before), ['unknown-client']);
  });
}

test('a forged assertion naming a real client is refused and recorded under that client', async () => {
  const before = (await refusedActors()).length;
  assert.equal((await assertionRequest(forged('settlement'))).statusCode, 401);
  assert.deepEqual((await refusedActors()).slice(before), ['settlement']);
});

test('a registered client\'s assertion may live five minutes at most: a later exp is refused, 401', async () => {
  const signed = (expSeconds: number): Promise<string> =>
    new SignJWT({}).setProtectedHeader({ alg: 'EdDSA' }).setIssuer('settlement').setSubject('settlement').setAudience(ISSUER)
      .setIssuedAt(now / 1000).setExpirationTime(expSeconds).setJti(crypto.randomUUID()).sign(clientKey);
  for (const exp of [1e13, now / 1000 + 301]) {
    const r = await assertionRequest(await signed(exp));
    assert.equal(r.statusCode, 401, `exp ${exp}: ${r.body}`);
  }
  const good = await assertionRequest(await signed(now / 1000 + 300));
  assert.equal(good.statusCode, 200, good.body);
});

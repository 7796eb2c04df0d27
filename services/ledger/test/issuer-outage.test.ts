/**
 * The ledger's one outbound dependency on the request path: the identity service's key set
 * (JWKS), fetched as main.ts fetches it (`remoteKeys`). While it cannot be fetched, a token the
 * ledger has not verified before cannot be checked: the answer is 503 with Retry-After, the
 * decision recorded as a deny with the reason (up to a limit a second, counted past it), and it
 * is not counted against the client's address as a failed authentication. Until 2026-12-07 it
 * was 401 invalid_token (so a client would throw a good token away) and counted, so an identity
 * outage turned into 429s. A token
 * that is wrong is still 401 while the keys are there, and a valid one passes once they are back.
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { after, before, test } from 'node:test';
import { errors as joseErrors, importJWK } from 'jose';
import { MemoryAuditSink } from '@ledgerline/audit';
import { Authorizer, REFERENCE_POLICY, ROLES, VERIFIER_UNAVAILABLE_CODE } from '@ledgerline/authz';
import { createTokenVerifier, InvalidTokenError, newSigningKey, remoteKeys, signAccessToken, TokenKeysUnavailableError } from '@ledgerline/identity';
import { LedgerEngine } from '@ledgerline/ledger';
import { migrateRuntime, type Service } from '@ledgerline/service-runtime';
import { ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { buildLedgerService } from '../src/app.ts';

const ISSUER = 'https://identity.test';
const audit = new MemoryAuditSink();
let t: LedgerTestDb;
let engine: LedgerEngine;
let app: Service;
let jwks: Server;
/** What the key set's server answers: the keys, a 500, or (closed) nothing at all. */
let serving: 'keys' | 'error' = 'error';
let keyJson = '';
let port = 0;
let tokenOf: (sub: string) => Promise<string>;

async function listen(): Promise<void> {
  jwks = createServer((_request, response) => {
    if (serving === 'error') {
      response.writeHead(500).end();
      return;
    }
    response.writeHead(200, { 'content-type': 'application/json' }).end(keyJson);
  });
  await new Promise<void>((resolve) => jwks.listen(port, '127.0.0.1', resolve));
  port = (jwks.address() as { port: number }).port;
}

async function stop(): Promise<void> {
  jwks.closeAllConnections();
  await new Promise((resolve) => jwks.close(resolve));
}

before(async () => {
  t = await ledgerTestDb();
  await migrateRuntime(t.db.url);
  engine = new LedgerEngine({ pool: t.pool });
  const key = await newSigningKey();
  const privateKey = await importJWK(key.privateJwk, 'EdDSA');
  assert.ok(!(privateKey instanceof Uint8Array));
  keyJson = JSON.stringify({ keys: [key.publicJwk] });
  tokenOf = (sub) => signAccessToken({ kid: key.kid, privateKey }, { sub, kind: 'user', roles: [ROLES.auditor], audience: 'ledger' }, { issuer: ISSUER, ttlSeconds: 300, nowMs: Date.now() });
  await listen();
  app = await buildLedgerService({
    engine,
    pool: t.pool,
    logger: false,
    auth: {
      // No token remembered between requests: each one needs the key set, which is fetched until
      // one fetch succeeds (then kept 60 s, JWKS_CACHE_MAX_AGE_MS): the outage comes first here.
      verify: createTokenVerifier({ keys: remoteKeys(`http://127.0.0.1:${port}/.well-known/jwks.json`), issuer: ISSUER, audience: 'ledger', cacheEntriesMax: 0 }),
      authorizer: new Authorizer({ policy: REFERENCE_POLICY, audit }),
      // Two failures an address before 429: an outage's answers must not use them up. Three
      // unverifiable requests recorded a second, the rest counted.
      failures: { failureLimit: { ratePerSecond: 0.001, burst: 2 }, unverifiableRecordsPerSecond: 3 },
    },
  });
});

after(async () => {
  await app.close();
  await engine.close();
  await stop().catch(() => {});
  await t.close();
});

async function read(token: string): Promise<Awaited<ReturnType<Service['inject']>>> {
  return app.inject({ method: 'GET', url: '/v1/ledgers', headers: { authorization: `Bearer ${token}` } });
}

function assertIssuerUnavailable(r: Awaited<ReturnType<Service['inject']>>): void {
  assert.equal(r.statusCode, 503, r.body);
  assert.equal(r.headers['retry-after'], '1');
  assert.equal(r.headers['www-authenticate'], undefined);
  assert.match(String(r.headers['content-type']), /^application\/problem\+json/);
  const body = r.json<{ type: string; title: string }>();
  assert.deepEqual([body.type, body.title], ['https://ledgerline.dev/problems/dependency-unavailable', 'Token issuer unavailable']);
}

test('the issuer\'s key set unreachable or failing: 503 with Retry-After, never 401 or 429, recorded up to a limit a second and not counted as a failed login; 401 for a bad token and 200 again once it is back', async () => {
  const token = await tokenOf('auditor-1');
  // The issuer answers 500: five requests, all 503, never 429; three recorded one by one (the
  // second's limit), the rest counted, so junk tokens cannot flood the trail while the keys are
  // away. (Five requests take well under the second.)
  const from = audit.entries.length;
  for (let i = 0; i < 5; i++) assertIssuerUnavailable(await read(token));
  const denies = audit.entries.slice(from);
  assert.equal(denies.length, 3);
  assert.ok(denies.every((e) => e.outcome === 'failure' && /the token could not be checked: the issuer's signing keys could not be fetched/.test(e.reason ?? '')), JSON.stringify(denies[0]));

  // The issuer down (connection refused).
  await stop();
  for (let i = 0; i < 3; i++) assertIssuerUnavailable(await read(token));

  // Back: the valid token passes; a token signed by no key of the set is 401 twice from the
  // same address (the outage's 503s used none of its allowance), then 429.
  serving = 'keys';
  await listen();
  assert.equal((await read(token)).statusCode, 200);
  const forged = `${token.slice(0, token.lastIndexOf('.') + 1)}${'A'.repeat(86)}`;
  for (let i = 0; i < 2; i++) assert.equal((await read(forged)).statusCode, 401);
  assert.equal((await read(forged)).statusCode, 429);
});

test('the verifier tells a key set it could not fetch from a token it refuses', async () => {
  const token = await tokenOf('auditor-2');
  const verifierWith = (keys: () => never) => createTokenVerifier({ keys, issuer: ISSUER, audience: 'ledger', cacheEntriesMax: 0 });
  const timedOut = await verifierWith(() => { throw new joseErrors.JWKSTimeout(); })(token).then(() => null, (error: unknown) => error);
  assert.ok(timedOut instanceof TokenKeysUnavailableError && timedOut.code === VERIFIER_UNAVAILABLE_CODE, String(timedOut));
  const fetchFailed = await verifierWith(() => { throw new TypeError('fetch failed'); })(token).then(() => null, (error: unknown) => error);
  assert.ok(fetchFailed instanceof TokenKeysUnavailableError, String(fetchFailed));
  const noKey = await verifierWith(() => { throw new joseErrors.JWKSNoMatchingKey(); })(token).then(() => null, (error: unknown) => error);
  assert.ok(noKey instanceof InvalidTokenError, String(noKey));
});

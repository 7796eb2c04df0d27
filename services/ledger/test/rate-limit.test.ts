/**
 * Rate limits with authentication on, over a real Redis: the bucket belongs to the verified
 * principal. A caller that changes x-client-id between requests still drains one bucket, and
 * another principal has its own. A request refused before authentication (401) takes no token.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { importJWK } from 'jose';
import { Redis } from 'ioredis';
import { MemoryAuditSink, type AuditEntry } from '@ledgerline/audit';
import { Authorizer, REFERENCE_POLICY, ROLES } from '@ledgerline/authz';
import { createTokenVerifier, localKeys, newSigningKey, signAccessToken } from '@ledgerline/identity';
import { LedgerEngine } from '@ledgerline/ledger';
import { migrateRuntime, RedisTokenBucket, type Service } from '@ledgerline/service-runtime';
import { ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { buildLedgerService } from '../src/app.ts';

const ISSUER = 'https://identity.test';
const NOW = Date.UTC(2026, 10, 23, 10, 0);
/** A burst of 2 that refills one token every 100 s: nothing refills during the test. */
const LIMIT = { ratePerSecond: 0.01, burst: 2 };

let t: LedgerTestDb;
let engine: LedgerEngine;
let app: Service;
let redis: Redis;
const prefix = `ll:test:rl:${randomBytes(6).toString('hex')}:`;
let tokenOf: (sub: string) => Promise<string>;
let signingKey: Awaited<ReturnType<typeof newSigningKey>>;

before(async () => {
  t = await ledgerTestDb();
  await migrateRuntime(t.db.url);
  engine = new LedgerEngine({ pool: t.pool });
  redis = new Redis('redis://127.0.0.1:6379', { lazyConnect: false, maxRetriesPerRequest: 1 });
  const key = await newSigningKey();
  signingKey = key;
  const privateKey = await importJWK(key.privateJwk, 'EdDSA');
  assert.ok(!(privateKey instanceof Uint8Array));
  tokenOf = (sub) =>
    signAccessToken({ kid: key.kid, privateKey }, { sub, kind: 'user', roles: [ROLES.auditor], audience: 'ledger' }, { issuer: ISSUER, ttlSeconds: 300, nowMs: NOW });
  const audit = new MemoryAuditSink();
  app = await buildLedgerService({
    engine,
    pool: t.pool,
    logger: false,
    auth: {
      verify: createTokenVerifier({ keys: localKeys({ keys: [key.publicJwk] }), issuer: ISSUER, audience: 'ledger', clock: () => NOW }),
      authorizer: new Authorizer({ policy: REFERENCE_POLICY, audit, clock: () => NOW }),
    },
    resilience: { rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }), defaultLimit: LIMIT } },
  });
});

after(async () => {
  await app.close();
  await engine.close();
  const keys = await redis.keys(`${prefix}*`);
  if (keys.length > 0) await redis.del(...keys);
  redis.disconnect();
  await t.close();
});

describe('rate limits per authenticated principal', () => {
  test('changing x-client-id does not buy a new bucket; another principal has its own', async () => {
    const alice = await tokenOf('alice');
    const bob = await tokenOf('bob');
    const get = (token: string | undefined, clientId: string) =>
      app.inject({ method: 'GET', url: '/v1/ledgers', headers: { 'x-client-id': clientId, ...(token === undefined ? {} : { authorization: `Bearer ${token}` }) } });

    // Refused before authentication: no token is taken from anyone's bucket.
    for (let i = 0; i < 3; i += 1) assert.equal((await get(undefined, 'alice')).statusCode, 401);

    const statuses = [];
    for (const clientId of ['one', 'two', 'three', 'four']) statuses.push((await get(alice, clientId)).statusCode);
    assert.deepEqual(statuses, [200, 200, 429, 429], 'alice has a burst of 2 whatever header she sends');
    const limited = await get(alice, 'five');
    assert.equal(limited.headers['content-type'], 'application/problem+json; charset=utf-8');
    assert.equal(limited.json<{ type: string }>().type, 'https://ledgerline.dev/problems/rate-limited');

    assert.deepEqual([(await get(bob, 'one')).statusCode, (await get(bob, 'one')).statusCode, (await get(bob, 'one')).statusCode], [200, 200, 429]);
    const keys = (await redis.keys(`${prefix}*`)).sort();
    assert.deepEqual(keys, [`${prefix}GET:/v1/ledgers:p:user:alice`, `${prefix}GET:/v1/ledgers:p:user:bob`]);
  });

  test('unknown paths answer 404 and wrong methods 405, with or without a token, limited by address', async () => {
    const alice = await tokenOf('alice');
    const bearer = { authorization: `Bearer ${alice}` };
    const unknown = await app.inject({ method: 'GET', url: '/no-such-path' });
    assert.equal(unknown.statusCode, 404, unknown.body);
    const unknownV1 = await app.inject({ method: 'GET', url: '/v1/no-such-path', headers: bearer });
    assert.equal(unknownV1.statusCode, 404, unknownV1.body);
    const wrongMethod = await app.inject({ method: 'DELETE', url: '/v1/ledgers', headers: bearer });
    assert.equal(wrongMethod.statusCode, 405, wrongMethod.body);
    assert.equal(wrongMethod.headers.allow, 'GET, HEAD');
    // Keyed by address, which the caller cannot choose, not by x-client-id.
    const keys = await redis.keys(`${prefix}*:ip:*`);
    assert.deepEqual(keys.sort(), [`${prefix}DELETE::ip:127.0.0.1`, `${prefix}GET::ip:127.0.0.1`]);
  });

  /** The service auditing into `trail`, its rate limit on a bucket of its own. */
  const audited = (trail: MemoryAuditSink, bucket: string, rateLimitedSummary?: { intervalMs: number }) =>
    buildLedgerService({
      engine,
      pool: t.pool,
      logger: false,
      auth: {
        verify: createTokenVerifier({ keys: localKeys({ keys: [signingKey.publicJwk] }), issuer: ISSUER, audience: 'ledger', clock: () => NOW }),
        authorizer: new Authorizer({ policy: REFERENCE_POLICY, audit: new MemoryAuditSink(), clock: () => NOW }),
      },
      resilience: { rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: `${prefix}${bucket}:` }), defaultLimit: LIMIT } },
      audit: { sink: trail, ...(rateLimitedSummary === undefined ? {} : { rateLimitedSummary }) },
    });
  const account = '0193a1c2-0000-7000-8000-00000000c0de';
  /** Twelve reads of one account as carol: two admitted, ten refused. */
  const twelveReads = async (app: Service): Promise<void> => {
    const carol = await tokenOf('carol');
    const statuses: number[] = [];
    for (let i = 0; i < 12; i += 1) {
      statuses.push((await app.inject({ method: 'GET', url: `/v1/accounts/${account}`, headers: { authorization: `Bearer ${carol}` } })).statusCode);
    }
    assert.deepEqual(statuses.slice(2), Array(10).fill(429));
  };
  const summaryOf = (e: AuditEntry | undefined) => [e?.action, e?.actor, e?.resource, e?.outcome, e?.reason, (e?.payload as { refused: number } | undefined)?.refused];
  const carolsSummary = ['ledger.account.read', { type: 'user', id: 'user:carol' }, { type: 'account', id: account }, 'failure', 'rate-limited', 10];

  test('on audited routes the refusals are recorded in a summary that names the principal, not one record each', async () => {
    const trail = new MemoryAuditSink();
    const own = await audited(trail, 'summary');
    try {
      await twelveReads(own);
      assert.equal(trail.entries.length, 2, 'the two admitted reads are recorded; the ten refusals wait for their summary');
    } finally {
      await own.close();
    }
    assert.deepEqual(trail.entries.slice(2).map(summaryOf), [carolsSummary]);
  });

  test("the service's rateLimitedSummary setting (AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS) sets how often summaries are written", async () => {
    const trail = new MemoryAuditSink();
    const own = await audited(trail, 'interval', { intervalMs: 100 });
    try {
      await twelveReads(own);
      // Written by the 100 ms timer, while the service runs (the default waits 10 s or the close).
      // The twelve reads may straddle a tick on a loaded machine: then the ten refusals come in
      // two summaries (6 and 4 were seen), each naming the principal.
      const refusedSoFar = (): number => trail.entries.slice(2).reduce((n, e) => n + ((e.payload as { refused?: number } | undefined)?.refused ?? 0), 0);
      const deadline = Date.now() + 5000;
      while (refusedSoFar() < 10 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
      const summaries = trail.entries.slice(2).map(summaryOf);
      assert.ok(summaries.length >= 1 && summaries.length <= 2, `one summary, or two across a tick: ${JSON.stringify(summaries)}`);
      for (const summary of summaries) assert.deepEqual(summary.slice(0, 5), carolsSummary.slice(0, 5));
      assert.equal(refusedSoFar(), 10, 'every refusal counted once, before the close');
    } finally {
      await own.close();
    }
  });
});

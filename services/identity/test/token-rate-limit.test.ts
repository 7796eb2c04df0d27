/**
 * The token endpoint's own rate limit, over a real Redis and PostgreSQL. Each password or
 * client-secret check costs an argon2id hash, so POST /oauth/token gets a small limit per
 * client address: a burst of N wrong guesses is answered by the handler (401/400 as always),
 * the next is refused with 429 problem+json and Retry-After before the identity layer is
 * called at all, so no hash is computed and no attempt counter moves. Headers the caller
 * chooses (x-client-id, x-forwarded-for) buy no new bucket; another address has its own; the
 * administrative routes are limited per verified principal. With rate limiting off, nothing
 * changes. Last, the process reads RATE_LIMIT_ENABLED and IDENTITY_TOKEN_* from its environment.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { InjectOptions } from 'fastify';
import { Redis } from 'ioredis';
import type pg from 'pg';
import { MemoryAuditSink, type AuditEntry } from '@ledgerline/audit';
import { Identity, type ClientAuthentication, type LoginRequest, type SecondFactor, type TokenResponse } from '@ledgerline/identity';
import { RedisTokenBucket, type RateLimit, type Service } from '@ledgerline/service-runtime';
import { createTestDatabase, testRandom, type TestDatabase } from '@ledgerline/testing';
import { buildIdentityService, TOKEN_ACTION, type IdentityServiceOptions } from '../src/app.ts';
import { bootstrap } from '../src/bootstrap.ts';
import { CLIENT_SECRET, identityDatabase, ISSUER, nameDigest, PASSWORD, startIdentityProcess } from './support.ts';

const NOW = Date.UTC(2026, 10, 23, 10, 0);
/** The token limit's burst in these tests; one token comes back every 100 s, so none refills during a test. */
const BURST = 3;
const TOKEN_LIMIT: RateLimit = { ratePerSecond: 0.01, burst: BURST };
const RATE_LIMITED = 'https://ledgerline.dev/problems/rate-limited';
/** The key of the trail's digests of typed names, so that a test can tell which name a digest stands for. */
const PSEUDONYM_KEY = new Uint8Array(32).fill(7);

/**
 * The identity layer with its grant calls counted. Each password or client-secret grant that
 * reaches it verifies exactly one argon2id hash (a decoy one for an unknown user or client),
 * so a call that is not counted computed none.
 */
class CountingIdentity extends Identity {
  logins = 0;
  clientChecks = 0;
  /** While set, a client-credentials call waits on it once counted, after calling `entered`: a test holds a request in its handler. */
  hold: { entered: () => void; until: Promise<void> } | undefined;

  /** The password grant (the service calls it; `login` is it too). */
  override authenticate(request: LoginRequest): Promise<{ tokens: TokenResponse; secondFactor: SecondFactor }> {
    this.logins += 1;
    return super.authenticate(request);
  }

  override clientCredentials(auth: ClientAuthentication, audience: string): Promise<TokenResponse> {
    this.clientChecks += 1;
    const hold = this.hold;
    if (hold === undefined) return super.clientCredentials(auth, audience);
    hold.entered();
    return hold.until.then(() => super.clientCredentials(auth, audience));
  }
}

// Keys unique to this run (and the seed printed), so parallel runs and earlier runs' keys never meet.
const random = testRandom('identity token rate limit key prefix');
const runPrefix = `ll:test:idrl:${process.pid}:${Math.floor(random() * 2 ** 32).toString(16)}:`;

let db: TestDatabase;
let pool: pg.Pool;
let redis: Redis;
let identity: CountingIdentity;
const audit = new MemoryAuditSink();
const apps: Service[] = [];

before(async () => {
  // A lockout far away, so that every wrong password moves the failure counter and none locks.
  const database = await identityDatabase('ll_identity_rl', { clock: () => NOW, lockout: { failuresMax: 100, lockMs: 60_000 } }, (options) => new CountingIdentity(options));
  ({ db, pool, identity } = database);
  await bootstrap(identity, database.config, { info: () => {} }, new MemoryAuditSink());
  redis = new Redis('redis://127.0.0.1:6379', { maxRetriesPerRequest: 1 });
});

after(async () => {
  for (const app of apps) await app.close();
  const keys = await redis.keys(`${runPrefix}*`);
  if (keys.length > 0) await redis.del(...keys);
  redis.disconnect();
  await pool.end();
  await db.drop();
});

/** What every service in this file is built from: the shared identity, pool and audit sink, and the fixed clock. */
function serviceBase(): Pick<IdentityServiceOptions, 'identity' | 'pool' | 'issuer' | 'audit' | 'clock' | 'logger' | 'pseudonymKey'> {
  return { identity, pool, issuer: ISSUER, audit, clock: () => NOW, logger: false, pseudonymKey: PSEUDONYM_KEY };
}

/** The service with rate limiting on in Redis under `prefix` (each test its own), or off. */
async function serve(limits: { prefix: string; token: RateLimit; default: RateLimit } | null): Promise<Service> {
  const app = await buildIdentityService({
    ...serviceBase(),
    ...(limits === null
      ? {}
      : {
          resilience: { rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: `${runPrefix}${limits.prefix}` }), defaultLimit: limits.default } },
          tokenRateLimit: limits.token,
          // Refusals over the limit are recorded in summaries: written every 100 ms here, not 10 s.
          rateLimitedSummary: { intervalMs: 100 },
        }),
  });
  apps.push(app);
  return app;
}

function tokenRequest(fields: Record<string, string>, extra: Partial<InjectOptions> = {}): InjectOptions {
  return {
    method: 'POST',
    url: '/oauth/token',
    ...extra,
    headers: { 'content-type': 'application/x-www-form-urlencoded', ...extra.headers },
    payload: new URLSearchParams(fields).toString(),
  };
}

const wrongSecret = { grant_type: 'client_credentials', client_id: 'payments', client_secret: 'not-the-secret', audience: 'ledger' };

function tokenAttempts(actorId: string): number {
  return audit.entries.filter((e) => e.action === TOKEN_ACTION && e.actor.id === actorId).length;
}

const refusedIn = (e: AuditEntry): number => (e.payload as { refused: number }).refused;

/**
 * The summaries of `actorId`'s token requests refused for the rate limit (one per actor,
 * address and audience an interval, not a record each), waiting (up to 5 s) until they count
 * `count` requests.
 */
async function rateLimitedAttempts(actorId: string, count: number): Promise<AuditEntry[]> {
  for (let waitedMs = 0; ; waitedMs += 10) {
    const found = audit.entries.filter((e) => e.action === TOKEN_ACTION && e.actor.id === actorId && e.reason === 'rate_limited');
    if (found.reduce((n, e) => n + refusedIn(e), 0) >= count || waitedMs >= 5000) return found;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

async function failedLogins(username: string): Promise<number> {
  const r = await pool.query<{ failed_logins: number }>('SELECT failed_logins FROM identity.users WHERE username = $1', [username]);
  const row = r.rows[0];
  assert.ok(row !== undefined, `no user ${username}`);
  return row.failed_logins;
}

function assertRateLimited(response: Awaited<ReturnType<Service['inject']>>): void {
  assert.equal(response.statusCode, 429, response.body);
  assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
  assert.equal(response.json<{ type: string }>().type, RATE_LIMITED);
  const retryAfter = Number(response.headers['retry-after']);
  assert.ok(Number.isInteger(retryAfter) && retryAfter >= 1, `Retry-After: ${String(response.headers['retry-after'])}`);
}

describe('POST /oauth/token with rate limiting on', () => {
  test('a burst of wrong client secrets from one address: the handler answers N, then 429 and no hash', async () => {
    const app = await serve({ prefix: 'secrets:', token: TOKEN_LIMIT, default: { ratePerSecond: 1000, burst: 2000 } });
    const checksBefore = identity.clientChecks;
    const auditedBefore = tokenAttempts('payments');

    // Each guess names a new x-client-id and a forged X-Forwarded-For: neither is the client.
    const statuses: number[] = [];
    for (let i = 0; i < BURST; i += 1) {
      const response = await app.inject(tokenRequest(wrongSecret, { headers: { 'x-client-id': `guess-${i}`, 'x-forwarded-for': `198.51.100.${i}` } }));
      assert.equal(response.json<{ error: string }>().error, 'invalid_client', response.body);
      statuses.push(response.statusCode);
    }
    assert.deepEqual(statuses, Array(BURST).fill(401), 'the first N are answered by the handler, as without a limit');
    assert.equal(identity.clientChecks - checksBefore, BURST, 'each of them checked the secret');

    const refused = await app.inject(tokenRequest(wrongSecret, { headers: { 'x-client-id': 'guess-new', 'x-forwarded-for': '203.0.113.9' } }));
    assertRateLimited(refused);
    assert.equal(refused.headers['cache-control'], undefined, 'the handler did not run (it sets no-store)');
    // The right secret is refused too: nothing is checked until the bucket refills.
    assertRateLimited(await app.inject(tokenRequest({ ...wrongSecret, client_secret: CLIENT_SECRET })));
    assert.equal(identity.clientChecks - checksBefore, BURST, 'the refused requests computed no hash');
    // Each refusal is in the trail as an attempt refused for the limit, naming the client it
    // tried by its digest: a 429 sheds work, so the name is not looked up (`unchecked-client:`,
    // the digest an unknown client id gets; until 2026-12-07 it was looked up and named
    // `payments`), never as a grant attempt that was checked.
    // Both are counted in the summary of their key (two, if an interval ended between them).
    const limited = await rateLimitedAttempts(`unchecked-client:${nameDigest(PSEUDONYM_KEY, 'client', 'payments')}`, 2);
    assert.equal(limited.reduce((n, e) => n + refusedIn(e), 0), 2);
    assert.deepEqual(new Set(limited.map((e) => JSON.stringify([e.outcome, e.reason, e.payload?.status, e.payload?.audience]))), new Set([JSON.stringify(['failure', 'rate_limited', 429, 'ledger'])]));
    assert.equal(tokenAttempts('payments') - auditedBefore, BURST, 'and reached no grant');
    assert.equal(JSON.stringify(limited).includes(CLIENT_SECRET), false);

    // The bucket is the address's, whatever the headers said; another address has its own.
    assert.deepEqual(await redis.keys(`${runPrefix}secrets:*`), [`${runPrefix}secrets:POST:/oauth/token:ip:127.0.0.1`]);
    const elsewhere = await app.inject(tokenRequest(wrongSecret, { remoteAddress: '192.0.2.7' }));
    assert.equal(elsewhere.statusCode, 401, elsewhere.body);
    assert.equal(identity.clientChecks - checksBefore, BURST + 1);

    // An IPv6 host holds a whole /64: its addresses share one bucket, so a new address in it
    // buys no new guesses; another /64 is another client.
    const v6 = [];
    for (let i = 1; i <= BURST + 2; i += 1) v6.push((await app.inject(tokenRequest(wrongSecret, { remoteAddress: `2001:db8:1:2::${i.toString(16)}` }))).statusCode);
    assert.deepEqual(v6, [...Array<number>(BURST).fill(401), 429, 429]);
    assert.equal((await app.inject(tokenRequest(wrongSecret, { remoteAddress: '2001:db8:1:3::1' }))).statusCode, 401);
    assert.equal(identity.clientChecks - checksBefore, 2 * BURST + 2, 'the refused IPv6 requests computed no hash');
    assert.ok((await redis.keys(`${runPrefix}secrets:*`)).includes(`${runPrefix}secrets:POST:/oauth/token:ip6:2001:db8:1:2::/64`));
  });

  test('a burst of wrong passwords: the failure counter moves N times, not on the 429', async () => {
    const app = await serve({ prefix: 'passwords:', token: TOKEN_LIMIT, default: { ratePerSecond: 1000, burst: 2000 } });
    await identity.createUser({ username: 'dana', password: PASSWORD, roles: [] });
    const loginsBefore = identity.logins;
    const wrongPassword = { grant_type: 'password', username: 'dana', password: 'not the password at all', audience: 'ledger' };

    for (let i = 0; i < BURST; i += 1) {
      const response = await app.inject(tokenRequest(wrongPassword));
      assert.equal(response.statusCode, 400, response.body);
      assert.equal(response.json<{ error: string }>().error, 'invalid_grant');
    }
    assert.equal(await failedLogins('dana'), BURST);

    assertRateLimited(await app.inject(tokenRequest(wrongPassword)));
    assertRateLimited(await app.inject(tokenRequest({ ...wrongPassword, password: PASSWORD })));
    assert.equal(await failedLogins('dana'), BURST, 'no attempt was counted: no password was checked');
    assert.equal(identity.logins - loginsBefore, BURST);
  });

  test('the administrative routes are limited per verified principal, never per header', async () => {
    const app = await serve({ prefix: 'admin:', token: { ratePerSecond: 1000, burst: 2000 }, default: { ratePerSecond: 0.01, burst: 2 } });
    const login = await app.inject(tokenRequest({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'identity' }));
    assert.equal(login.statusCode, 200, login.body);
    const bearer = `Bearer ${login.json<{ access_token: string }>().access_token}`;
    const rootId = await identity.userIdByUsername('root');
    assert.ok(rootId !== null);

    const createUser = (clientId: string, headers: Record<string, string> = { authorization: bearer }) =>
      app.inject({ method: 'POST', url: '/v1/users', headers: { ...headers, 'x-client-id': clientId }, payload: { username: `user-${clientId}`, password: PASSWORD, roles: [] } });
    // Refused by authentication (401) before the limiter: takes nothing from anyone's bucket.
    assert.equal((await createUser('root', {})).statusCode, 401);
    const statuses = [];
    for (const clientId of ['one', 'two', 'three']) statuses.push((await createUser(clientId)).statusCode);
    assert.deepEqual(statuses, [201, 201, 429], 'a new x-client-id buys no new bucket');
    assertRateLimited(await createUser('four'));
    assert.equal(await identity.userIdByUsername('user-three'), null, 'the refused request did nothing');

    assert.deepEqual((await redis.keys(`${runPrefix}admin:*`)).sort(), [
      `${runPrefix}admin:POST:/oauth/token:ip:127.0.0.1`,
      `${runPrefix}admin:POST:/v1/users:p:user:${rootId}`,
    ]);
  });
});

/**
 * `promise`, or a failure naming `what` if it has not settled within 10 s: a wait that is
 * never satisfied (a request never queued because nothing sheds) fails the test, not hangs it.
 */
async function within<T>(what: string, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), 10_000);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe('POST /oauth/token under load shedding', () => {
  test('is low priority: a queued token request is shed for a revocation (normal), before any hash, while the probes answer', async () => {
    // One slot and room for one waiter; waits long enough that only eviction refuses here.
    // The clock tells the test when a request joins the queue (the shedder sets its timer).
    let joined: () => void = () => {};
    const waitsSet = (): Promise<void> => new Promise((resolve) => { joined = resolve; });
    const clock = {
      now: () => performance.now(),
      setTimer: (callback: () => void, delayMs: number): unknown => {
        joined();
        return setTimeout(callback, delayMs);
      },
      clearTimer: (handle: unknown) => { clearTimeout(handle as NodeJS.Timeout); },
    };
    const app = await buildIdentityService({
      ...serviceBase(),
      resilience: { loadShedding: { concurrencyMax: 1, queueMax: 1, targetQueueMs: 50, intervalMs: 60_000, queueTimeoutMs: { critical: 10_000, high: 10_000, normal: 10_000, low: 10_000 }, clock } },
    });
    apps.push(app);
    const checksBefore = identity.clientChecks;

    // A token request holds the only slot, in its handler.
    let release: () => void = () => {};
    const entered = new Promise<void>((resolve) => {
      identity.hold = { entered: resolve, until: new Promise<void>((r) => { release = r; }) };
    });
    const holding = app.inject(tokenRequest({ ...wrongSecret, client_secret: CLIENT_SECRET }));
    try {
      await within('the first token request to reach its handler', entered);
      identity.hold = undefined;
      assert.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 200, 'the probes pass every gate');

      // Another token request waits for the slot; a revocation, of the default class (normal),
      // then finds the queue full and takes its place: only a waiter of a lower class is evicted.
      let queued = waitsSet();
      const waiting = app.inject(tokenRequest(wrongSecret));
      await within('the second token request to queue for the slot', queued);
      queued = waitsSet();
      const revocation = app.inject({ method: 'POST', url: '/oauth/revoke', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: 'token=not-a-refresh-token' });
      const shed = await waiting;
      assert.equal(shed.statusCode, 503, shed.body);
      assert.match(String(shed.headers['content-type']), /^application\/problem\+json/);
      assert.deepEqual([shed.json<{ priority: string }>().priority, shed.json<{ reason: string }>().reason], ['low', 'evicted']);
      assert.ok(shed.headers['retry-after'] !== undefined);
      assert.equal(identity.clientChecks - checksBefore, 1, 'the shed request computed no hash');
      await within('the revocation to queue for the slot', queued);

      release();
      assert.equal((await holding).statusCode, 200);
      const revoked = await revocation;
      assert.equal(revoked.statusCode, 200, revoked.body);
    } finally {
      identity.hold = undefined;
      release();
    }
  });
});

describe('POST /oauth/token with rate limiting off', () => {
  test('every guess is answered by the handler, as before, with no rate-limit header', async () => {
    const app = await serve(null);
    const checksBefore = identity.clientChecks;
    const statuses: number[] = [];
    for (let i = 0; i < BURST + 3; i += 1) statuses.push((await app.inject(tokenRequest(wrongSecret))).statusCode);
    assert.deepEqual(statuses, Array(BURST + 3).fill(401));
    assert.equal(identity.clientChecks - checksBefore, BURST + 3);
    const granted = await app.inject(tokenRequest({ ...wrongSecret, client_secret: CLIENT_SECRET }));
    assert.equal(granted.statusCode, 200, granted.body);
    assert.equal(granted.headers['ratelimit-remaining'], undefined);
  });
});

test('the process takes RATE_LIMIT_ENABLED and IDENTITY_TOKEN_* from its environment', async () => {
  const own = await createTestDatabase('ll_identity_rl_main');
  try {
    const service = await startIdentityProcess({
      DATABASE_URL: own.url,
      AUDIT_ENABLED: 'false',
      IDENTITY_BOOTSTRAP_CLIENT_SECRET: CLIENT_SECRET,
      RATE_LIMIT_ENABLED: 'true',
      RATE_LIMIT_KEY_PREFIX: `${runPrefix}main:`,
      IDENTITY_TOKEN_BURST: '2',
      IDENTITY_TOKEN_RATE_PER_SECOND: '0.01',
    });
    const { base } = service;
    let code: number | null | undefined;
    try {
      const post = () => fetch(`${base}/oauth/token`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams(wrongSecret).toString() });
      const statuses: number[] = [];
      let last: Response | undefined;
      for (let i = 0; i < 3; i += 1) {
        last = await post();
        statuses.push(last.status);
        await last.arrayBuffer();
      }
      assert.deepEqual(statuses, [401, 401, 429]);
      assert.ok(last !== undefined);
      assert.match(last.headers.get('content-type') ?? '', /^application\/problem\+json/);
      assert.ok(Number(last.headers.get('retry-after')) >= 1);
      // The service name prefixes the keys (resilienceFromConfig(config, 'identity')).
      assert.deepEqual(await redis.keys(`${runPrefix}main:*`), [`${runPrefix}main:identity:POST:/oauth/token:ip:127.0.0.1`]);
      const metrics = await (await fetch(`${base}/metrics`)).text();
      assert.match(metrics, /requests_rate_limited_total\{[^}]*route="\/oauth\/token"[^}]*\} 1/);
    } finally {
      code = await service.stop();
    }
    assert.equal(code, 0, 'a graceful shutdown closes the rate limiter\'s Redis client too');
  } finally {
    await own.drop();
  }
});

/**
 * The request gates over real HTTP: priority load shedding (503 + Retry-After, lowest class
 * first, ops routes always answered, the level in /ready and /metrics) and rate limiting in
 * a real Redis (atomic token bucket shared by two clients, 429 + Retry-After, per client and
 * per route, failing open when Redis is unreachable). Each test uses its own Redis key prefix
 * and deletes its keys.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { Type } from 'typebox';
import { DependencyPolicy } from '@ledgerline/resilience';
import { baseConfigSchema, createService, loadConfig, RedisTokenBucket, type Service } from '../src/index.ts';

const config = loadConfig(baseConfigSchema, {});
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

function redisClient(url = REDIS_URL): Redis {
  // Short command timeout and no offline queue: a limiter must fail fast, never hold requests.
  return new Redis(url, { commandTimeout: 200, enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true });
}

async function deleteKeys(redis: Redis, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
    if (keys.length > 0) await redis.del(...keys);
    cursor = next;
  } while (cursor !== '0');
}

describe('load shedding over HTTP', () => {
  let app: Service;
  let base = '';
  const gates: Array<() => void> = [];
  let closing = false;
  const ok = { 200: Type.Object({ ok: Type.Boolean() }) };

  before(async () => {
    app = await createService({
      config,
      openapi: { title: 'shed-test', version: '0' },
      logger: false,
      loadShedding: { concurrencyMax: 1, queueMax: 2, targetQueueMs: 20, intervalMs: 50, queueTimeoutMs: { critical: 5000, high: 5000, normal: 5000, low: 150 } },
      dependencies: [],
    });
    const hold = () => new Promise<{ ok: boolean }>((resolve) => {
      if (closing) resolve({ ok: true });
      else gates.push(() => { resolve({ ok: true }); });
    });
    app.post('/v1/transfers', { config: { priority: 'critical' }, schema: { response: ok } }, hold);
    app.get('/v1/reports', { config: { priority: 'low' }, schema: { response: ok } }, hold);
    app.get('/v1/history', { schema: { response: ok } }, hold);
    base = await app.listen({ port: 0, host: '127.0.0.1' });
  });
  after(async () => {
    closing = true;
    for (const g of gates.splice(0)) g();
    await app.close();
  });

  it('queues by priority, refuses the lowest class with 503 + Retry-After, and keeps ops routes answering', async () => {
    const first = fetch(`${base}/v1/history`);
    await waitFor(() => gates.length === 1);
    const low = fetch(`${base}/v1/reports`);
    const critical = fetch(`${base}/v1/transfers`, { method: 'POST' });
    // /health and /metrics pass the gates though the only slot is taken.
    assert.equal((await fetch(`${base}/health`)).status, 200);
    // The low request times out in the queue after 150 ms; critical is still waiting.
    const lowResponse = await low;
    assert.equal(lowResponse.status, 503);
    assert.ok(Number(lowResponse.headers.get('retry-after')) >= 1);
    const body = (await lowResponse.json()) as { type: string; priority: string; reason: string };
    assert.equal(body.type, 'https://ledgerline.dev/problems/overloaded');
    assert.deepEqual([body.priority, body.reason], ['low', 'queue_timeout']);
    // The standing queue has raised the level: low is now refused at the door.
    await new Promise((r) => setTimeout(r, 120));
    const ready = (await (await fetch(`${base}/ready`)).json()) as { degradation: { level: number; shedding: string[] } };
    assert.ok(ready.degradation.level >= 1, JSON.stringify(ready));
    assert.equal(ready.degradation.shedding[0], 'low');
    const refused = await fetch(`${base}/v1/reports`);
    assert.equal(refused.status, 503);
    assert.equal(((await refused.json()) as { reason: string }).reason, 'level');
    gates.shift()!();
    assert.equal((await first).status, 200);
    await waitFor(() => gates.length === 1);
    gates.shift()!();
    assert.equal((await critical).status, 200, 'critical waited and was served');
    const metrics = await (await fetch(`${base}/metrics`)).text();
    assert.match(metrics, /ledgerline_requests_shed_total\{priority="low",reason="queue_timeout"\} 1/);
    assert.match(metrics, /ledgerline_requests_shed_total\{priority="low",reason="level"\} 1/);
    assert.match(metrics, /ledgerline_http_requests_total\{method="GET",route="\/v1\/reports",outcome="shed"\} 2/);
  });

  it('a request whose deadline passed while it queued is answered 504 and not run', async () => {
    const first = fetch(`${base}/v1/transfers`, { method: 'POST' });
    await waitFor(() => gates.length === 1);
    const late = fetch(`${base}/v1/transfers`, { method: 'POST', headers: { 'x-deadline-remaining-ms': '50' } });
    await new Promise((r) => setTimeout(r, 100));
    gates.shift()!();
    assert.equal((await first).status, 200);
    assert.equal((await late).status, 504);
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(gates.length, 0, 'its handler never ran');
  });
});

describe('rate limiting in Redis', () => {
  const prefix = `ll:test:rl:${randomBytes(6).toString('hex')}:`;
  let redis: Redis;
  before(async () => {
    redis = redisClient();
    await redis.connect();
  });
  after(async () => {
    await deleteKeys(redis, prefix);
    redis.disconnect();
  });

  it('the token bucket is atomic across clients: exactly the burst passes a concurrent rush', async () => {
    const other = redisClient();
    await other.connect();
    try {
      const a = new RedisTokenBucket({ redis, keyPrefix: prefix });
      const b = new RedisTokenBucket({ redis: other, keyPrefix: prefix });
      const limit = { ratePerSecond: 0.001, burst: 10 };
      const results = await Promise.all(Array.from({ length: 100 }, (_, i) => (i % 2 === 0 ? a : b).take('rush', limit)));
      assert.equal(results.filter((r) => r?.allowed === true).length, 10);
      const refused = results.find((r) => r?.allowed === false);
      assert.ok(refused !== undefined && refused.retryAfterMs > 0);
    } finally {
      other.disconnect();
    }
  });

  it('refills at the rate', async () => {
    const bucket = new RedisTokenBucket({ redis, keyPrefix: prefix });
    const limit = { ratePerSecond: 50, burst: 2 };
    // Sent together on one connection, the three takes run back to back inside Redis, well
    // within the 20 ms a token takes to refill, however loaded this machine is.
    const [first, second, refused] = await Promise.all([bucket.take('refill', limit), bucket.take('refill', limit), bucket.take('refill', limit)]);
    assert.equal(first?.allowed, true);
    assert.equal(second?.allowed, true);
    assert.equal(refused?.allowed, false);
    assert.ok(refused.retryAfterMs > 0 && refused.retryAfterMs <= 20, `retry after ${refused.retryAfterMs} ms`);
    await new Promise((r) => setTimeout(r, 60));
    assert.equal((await bucket.take('refill', limit))?.allowed, true);
    const ttl = await redis.pttl(`${prefix}refill`);
    assert.ok(ttl > 0 && ttl <= 1040, `the key expires once the bucket would be full again (${ttl} ms)`);
  });

  it('answers 429 + Retry-After per client and per route; ops routes and opted-out routes are not limited', async () => {
    const app = await createService({
      config,
      openapi: { title: 'rl-test', version: '0' },
      logger: false,
      rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }), defaultLimit: { ratePerSecond: 0.5, burst: 2 } },
    });
    const ok = { 200: Type.Object({}) };
    app.get('/v1/a', { schema: { response: ok } }, () => ({}));
    app.get('/v1/b', { config: { rateLimit: { ratePerSecond: 0.5, burst: 1 } }, schema: { response: ok } }, () => ({}));
    app.get('/v1/free', { config: { rateLimit: false }, schema: { response: ok } }, () => ({}));
    try {
      // A client is its address by default (x-client-id is the caller's to choose, so it keys nothing).
      const get = (url: string, client = '192.0.2.1') => app.inject({ url, remoteAddress: client });
      assert.deepEqual([(await get('/v1/a')).statusCode, (await get('/v1/a')).statusCode], [200, 200]);
      const limited = await get('/v1/a');
      assert.equal(limited.statusCode, 429);
      assert.equal(limited.headers['retry-after'], '2');
      assert.equal(limited.json<{ type: string }>().type, 'https://ledgerline.dev/problems/rate-limited');
      assert.equal((await get('/v1/a', '192.0.2.2')).statusCode, 200, 'another client has its own bucket');
      assert.equal((await get('/v1/b')).statusCode, 200, 'another route has its own bucket');
      assert.equal((await get('/v1/b')).statusCode, 429, 'with its own limit');
      for (let i = 0; i < 5; i += 1) assert.equal((await get('/v1/free')).statusCode, 200);
      for (let i = 0; i < 5; i += 1) assert.equal((await get('/health')).statusCode, 200);
      assert.match((await app.inject('/metrics')).body, /ledgerline_requests_rate_limited_total\{route="\/v1\/a"\} 1/);
      // The OpenAPI document says which routes can answer 429, and that every route can answer
      // the runtime's 503 (shutting down, shedding) and 504 (deadline passed).
      const doc = (await app.inject('/openapi.json')).json<{ paths: Record<string, { get: { responses: Record<string, { content?: Record<string, unknown> }> } }> }>();
      const statuses = (path: string): string[] => Object.keys(doc.paths[path]?.get.responses ?? {}).sort();
      assert.deepEqual(statuses('/v1/a'), ['200', '429', '503', '504']);
      assert.deepEqual(statuses('/v1/b'), ['200', '429', '503', '504']);
      assert.deepEqual(statuses('/v1/free'), ['200', '503', '504']);
      assert.deepEqual(statuses('/health'), ['200', '503', '504']);
      assert.ok(doc.paths['/v1/a']?.get.responses['429']?.content?.['application/problem+json'] !== undefined);
    } finally {
      await app.close();
    }
  });

  it('lets requests through when Redis is unreachable, counts it, and stops asking once its breaker opens', async () => {
    const dead = redisClient('redis://127.0.0.1:1');
    dead.on('error', () => {});
    const bucket = new RedisTokenBucket({ redis: dead, keyPrefix: prefix });
    const app = await createService({ config, openapi: { title: 'rl-dead', version: '0' }, logger: false, rateLimit: { bucket, defaultLimit: { ratePerSecond: 1, burst: 1 } } });
    app.get('/v1/a', { schema: { response: { 200: Type.Object({}) } } }, () => ({}));
    try {
      for (let i = 0; i < 10; i += 1) assert.equal((await app.inject('/v1/a')).statusCode, 200);
      assert.equal(bucket.breaker.state, 'open');
      const text = (await app.inject('/metrics')).body;
      const errors = Number(/ledgerline_rate_limit_errors_total (\d+)/.exec(text)?.[1]);
      assert.ok(errors >= 5 && errors < 10, `errors counted until the breaker opened (${errors})`);
    } finally {
      await app.close();
      dead.disconnect();
    }
  });
});

describe('dependencies without shedding', () => {
  it('/ready reports the degradation when dependencies are registered', async () => {
    const policy = new DependencyPolicy({ name: 'risk', attemptTimeoutMs: 10, callTimeoutMs: 10, retry: false, bulkhead: false, breaker: false });
    const app = await createService({ config, openapi: { title: 'x', version: '0' }, logger: false, dependencies: [policy] });
    const ready = (await app.inject('/ready')).json<{ degradation: unknown }>();
    assert.deepEqual(ready.degradation, { level: 0, shedding: [], dependencies: { risk: 'closed' } });
    await app.close();
  });
});

async function waitFor(condition: () => boolean, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 2));
  }
}

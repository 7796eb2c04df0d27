/**
 * What a rate-limit bucket is keyed by, and which route limits are accepted, over a real Redis.
 * Each test uses its own key prefix and deletes its keys.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { connect, createServer } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { Type } from 'typebox';
import { baseConfigSchema, createService, loadConfig, RedisTokenBucket } from '../src/index.ts';

const config = loadConfig(baseConfigSchema, {});
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const ok = { 200: Type.Object({}) };

describe('rate-limit keys and route limits', () => {
  const prefix = `ll:test:rlkeys:${randomBytes(6).toString('hex')}:`;
  let redis: Redis;
  before(async () => {
    redis = new Redis(REDIS_URL, { commandTimeout: 500, enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true });
    await redis.connect();
  });
  after(async () => {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      if (keys.length > 0) await redis.del(...keys);
      cursor = next;
    } while (cursor !== '0');
    redis.disconnect();
  });

  it('HEAD runs the GET handler, so it takes from the GET bucket', async () => {
    const app = await createService({
      config, openapi: { title: 'rl-head', version: '0' }, logger: false,
      rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }), defaultLimit: { ratePerSecond: 0.01, burst: 2 } },
    });
    let runs = 0;
    app.get('/v1/report', { schema: { response: ok } }, () => { runs += 1; return {}; });
    try {
      const send = (method: 'GET' | 'HEAD') => app.inject({ method, url: '/v1/report', headers: { 'x-client-id': 'alice' } });
      assert.equal((await send('GET')).statusCode, 200);
      assert.equal((await send('GET')).statusCode, 200);
      assert.equal((await send('GET')).statusCode, 429);
      assert.equal((await send('HEAD')).statusCode, 429, 'HEAD is a second bucket for the same handler');
      assert.equal(runs, 2);
    } finally {
      await app.close();
    }
  });

  it('by default a client is its address: a new x-client-id on each request buys no new bucket', async () => {
    const app = await createService({
      config, openapi: { title: 'rl-rotate', version: '0' }, logger: false,
      rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }), defaultLimit: { ratePerSecond: 0.01, burst: 2 } },
    });
    app.get('/v1/rotate', { schema: { response: ok } }, () => ({}));
    try {
      const send = (clientId: string, remoteAddress = '192.0.2.10') => app.inject({ url: '/v1/rotate', remoteAddress, headers: { 'x-client-id': clientId } });
      const statuses = [];
      for (const clientId of ['one', 'two', 'three', 'four']) statuses.push((await send(clientId)).statusCode);
      assert.deepEqual(statuses, [200, 200, 429, 429], 'the caller chooses the header, so it names no bucket');
      // Naming another client spends nothing of that client's budget: its address is its own.
      assert.equal((await send('one', '192.0.2.11')).statusCode, 200, 'another address has its own bucket');
      assert.equal((await send('victim', '2001:db8:1:2::1')).statusCode, 200);
      assert.equal((await send('victim', '2001:db8:1:2::2')).statusCode, 200);
      assert.equal((await send('victim', '2001:db8:1:2::3')).statusCode, 429, 'an IPv6 client is its /64');
      const keys = (await redis.keys(`${prefix}GET:/v1/rotate:*`)).sort();
      assert.deepEqual(keys, [`${prefix}GET:/v1/rotate:ip6:2001:db8:1:2::/64`, `${prefix}GET:/v1/rotate:ip:192.0.2.10`, `${prefix}GET:/v1/rotate:ip:192.0.2.11`]);
    } finally {
      await app.close();
    }
  });

  it('with trustClientIdHeader, a well-formed x-client-id keys the bucket; a malformed one falls back to the address', async () => {
    const app = await createService({
      config, openapi: { title: 'rl-trusted', version: '0' }, logger: false,
      rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }), defaultLimit: { ratePerSecond: 0.01, burst: 1 }, trustClientIdHeader: true },
    });
    app.get('/v1/trusted', { schema: { response: ok } }, () => ({}));
    try {
      const send = (headers: Record<string, string>, remoteAddress = '192.0.2.20') => app.inject({ url: '/v1/trusted', remoteAddress, headers });
      assert.equal((await send({ 'x-client-id': 'svc-a' })).statusCode, 200);
      assert.equal((await send({ 'x-client-id': 'svc-a' }, '192.0.2.21')).statusCode, 429, 'one client from any address: the gateway vouches for it');
      assert.equal((await send({ 'x-client-id': 'svc-b' })).statusCode, 200, 'another client has its own bucket');
      assert.equal((await send({ 'x-client-id': 'no spaces allowed' })).statusCode, 200, 'a malformed header is keyed by address');
      assert.equal((await send({})).statusCode, 429, 'as is a request without one');
      const keys = (await redis.keys(`${prefix}GET:/v1/trusted:*`)).sort();
      assert.deepEqual(keys, [`${prefix}GET:/v1/trusted:c:svc-a`, `${prefix}GET:/v1/trusted:c:svc-b`, `${prefix}GET:/v1/trusted:ip:192.0.2.20`]);
    } finally {
      await app.close();
    }
    for (const trustClientIdHeader of ['true', 1]) {
      await assert.rejects(createService({
        config, openapi: { title: 'rl-trust-bad', version: '0' }, logger: false,
        rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }), defaultLimit: { ratePerSecond: 1, burst: 1 }, trustClientIdHeader: trustClientIdHeader as never },
      }), /trustClientIdHeader must be a boolean/);
    }
  });

  it('a clientId function wins over trustClientIdHeader', async () => {
    const app = await createService({
      config, openapi: { title: 'rl-own', version: '0' }, logger: false,
      rateLimit: {
        bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }),
        defaultLimit: { ratePerSecond: 0.01, burst: 1 },
        trustClientIdHeader: true,
        clientId: (request) => `sub:${String(request.headers['x-subject'])}`,
      },
    });
    app.get('/v1/own', { schema: { response: ok } }, () => ({}));
    try {
      const send = (clientId: string) => app.inject({ url: '/v1/own', headers: { 'x-subject': 'alice', 'x-client-id': clientId } });
      assert.deepEqual([(await send('one')).statusCode, (await send('two')).statusCode], [200, 429]);
      assert.deepEqual(await redis.keys(`${prefix}GET:/v1/own:*`), [`${prefix}GET:/v1/own:sub:alice`]);
    } finally {
      await app.close();
    }
  });

  it('a client id too long for a Redis key is keyed by its digest, not answered 500', async () => {
    const app = await createService({
      config, openapi: { title: 'rl-long', version: '0' }, logger: false,
      rateLimit: {
        bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }),
        defaultLimit: { ratePerSecond: 0.01, burst: 1 },
        // e.g. a subject taken from a token, which the service does not bound.
        clientId: (request) => `sub:${String(request.headers['x-subject'])}`,
      },
    });
    app.get('/v1/me', { schema: { response: ok } }, () => ({}));
    try {
      const long = 'a'.repeat(600);
      const send = (subject: string) => app.inject({ url: '/v1/me', headers: { 'x-subject': subject } });
      assert.equal((await send(long)).statusCode, 200);
      assert.equal((await send(long)).statusCode, 429);
      assert.equal((await send(`${long}b`)).statusCode, 200, 'another long id has its own bucket');
    } finally {
      await app.close();
    }
  });

  it('refuses, when the route is added, a route limit or priority the runtime cannot honour', async () => {
    const app = await createService({
      config, openapi: { title: 'rl-config', version: '0' }, logger: false,
      loadShedding: { concurrencyMax: 10, queueMax: 10, targetQueueMs: 50, intervalMs: 500 },
      rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: prefix }), defaultLimit: { ratePerSecond: 10, burst: 10 } },
    });
    try {
      for (const rateLimit of [{ ratePerSecond: 0, burst: 1 }, { ratePerSecond: 10, burst: 0 }, { ratePerSecond: 10, burst: 1.5 }, { ratePerSecond: -1, burst: 1 }]) {
        assert.throws(() => app.get(`/v1/bad-${randomBytes(4).toString('hex')}`, { config: { rateLimit }, schema: { response: ok } }, () => ({})),
          /ratePerSecond|burst/, JSON.stringify(rateLimit));
      }
      assert.throws(() => app.get('/v1/bad-priority', { config: { priority: 'urgent' as never }, schema: { response: ok } }, () => ({})), /priority/);
      // A valid one is accepted and limited as configured.
      app.get('/v1/good', { config: { rateLimit: { ratePerSecond: 0.01, burst: 1 }, priority: 'high' }, schema: { response: ok } }, () => ({}));
      assert.equal((await app.inject('/v1/good')).statusCode, 200);
      assert.equal((await app.inject('/v1/good')).statusCode, 429);
    } finally {
      await app.close();
    }
  });

  it('the bucket refuses a limit Redis cannot apply before asking Redis, so its breaker stays closed', async () => {
    // A script error from a bad limit is not Redis failing: counted against the breaker it would
    // open it and leave every route of the service unlimited for its open wait.
    const bucket = new RedisTokenBucket({ redis, keyPrefix: prefix });
    for (let i = 0; i < 10; i += 1) {
      await assert.rejects(bucket.take('bad', { ratePerSecond: 0, burst: 1 }), RangeError);
    }
    // A rate so slow that the bucket's expiry is past what the script can write (1e14 ms).
    await assert.rejects(bucket.take('slow', { ratePerSecond: 1e-9, burst: 1_000_000 }), RangeError);
    assert.equal(bucket.breaker.state, 'closed');
    await assert.rejects(createService({
      config, openapi: { title: 'rl-slow', version: '0' }, logger: false,
      rateLimit: { bucket, defaultLimit: { ratePerSecond: 1e-9, burst: 1_000_000 } },
    }), /ratePerSecond/);
    assert.equal((await bucket.take('good', { ratePerSecond: 0.01, burst: 1 }))?.allowed, true);
    assert.equal((await bucket.take('good', { ratePerSecond: 0.01, burst: 1 }))?.allowed, false);
  });
});

describe('a Redis that stops answering', () => {
  it('does not hold requests, even through a client made without a command timeout', { timeout: 30_000 }, async () => {
    const port = await new Promise<number>((resolve) => {
      const s = createServer();
      s.listen(0, '127.0.0.1', () => { const p = (s.address() as { port: number }).port; s.close(() => { resolve(p); }); });
    });
    // A private Redis: stopped (SIGSTOP) it keeps the connection open and answers nothing.
    const server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    const redis = new Redis(`redis://127.0.0.1:${port}`, { lazyConnect: true, retryStrategy: (times) => (times > 50 ? null : 100) });
    redis.on('error', () => {});
    const app = await createService({
      config, openapi: { title: 'rl-hang', version: '0' }, logger: false,
      rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: 'll:test:rlhang:' }), defaultLimit: { ratePerSecond: 1000, burst: 1000 } },
    });
    app.get('/v1/a', { schema: { response: ok } }, () => ({}));
    try {
      // Wait for the server to listen, then connect once.
      for (let i = 0; ; i += 1) {
        const listening = await new Promise<boolean>((resolve) => {
          const socket = connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true); });
          socket.on('error', () => { resolve(false); });
        });
        if (listening) break;
        if (i > 50) throw new Error('redis-server did not start');
        await new Promise((r) => setTimeout(r, 100));
      }
      await redis.connect();
      assert.ok((await app.inject('/v1/a')).headers['ratelimit-remaining'] !== undefined, 'limited while Redis answers');
      server.kill('SIGSTOP');
      for (let i = 0; i < 3; i += 1) {
        const started = performance.now();
        const answer = await Promise.race([app.inject('/v1/a'), new Promise<'hung'>((r) => setTimeout(() => { r('hung'); }, 3000))]);
        if (answer === 'hung') assert.fail('the request waited on Redis for 3 s');
        assert.equal(answer.statusCode, 200);
        assert.ok(performance.now() - started < 1000, `${Math.round(performance.now() - started)} ms`);
      }
    } finally {
      server.kill('SIGKILL');
      redis.disconnect();
      await app.close();
    }
  });
});

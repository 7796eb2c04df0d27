/**
 * The rate limiter while its Redis client is connecting, over a real Redis: at start-up and
 * when a healthy Redis drops the connection, the limit holds (the take waits for the connection
 * under way) instead of the client refusing the command, the breaker opening and the limiter
 * failing open for 5 s. A Redis that is really down still opens the breaker and fails open.
 * The limiter is built as the services build it (resilienceFromConfig). Each test uses its own
 * key prefix and deletes its keys, or a private redis-server on a spare port.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { connect, createServer, type Socket } from 'node:net';
import { describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { loadConfig, RateLimitUnavailableError, RedisTokenBucket, resilienceConfigSchema, resilienceFromConfig, type ResilienceFromConfig } from '../src/index.ts';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
/** A burst of 2 that refills one token every 100 s: nothing refills during a test. */
const LIMIT = { ratePerSecond: 0.01, burst: 2 };

/** The limiter exactly as a service with RATE_LIMIT_ENABLED builds it (by default a 50 ms Redis timeout). */
function limiterFromConfig(redisUrl: string, keyPrefix: string, redisTimeoutMs?: number): { resilience: ResilienceFromConfig; bucket: RedisTokenBucket } {
  const config = loadConfig(resilienceConfigSchema, {
    RATE_LIMIT_ENABLED: 'true', REDIS_URL: redisUrl, RATE_LIMIT_KEY_PREFIX: keyPrefix,
    ...(redisTimeoutMs === undefined ? {} : { RATE_LIMIT_REDIS_TIMEOUT_MS: String(redisTimeoutMs) }),
  });
  const resilience = resilienceFromConfig(config, 'svc');
  const rateLimit = resilience.options.rateLimit;
  assert.ok(rateLimit !== undefined && rateLimit !== false && rateLimit.bucket instanceof RedisTokenBucket);
  return { resilience, bucket: rateLimit.bucket };
}

/** 'allowed', 'refused', 'unknown' (breaker open) or 'failed' (Redis failed: let through). */
async function outcome(bucket: RedisTokenBucket, key: string): Promise<string> {
  try {
    const result = await bucket.take(key, LIMIT);
    if (result === undefined) return 'unknown';
    return result.allowed ? 'allowed' : 'refused';
  } catch (error) {
    assert.ok(error instanceof RateLimitUnavailableError);
    return 'failed';
  }
}

async function deleteKeys(url: string, pattern: string): Promise<void> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0 });
  await redis.connect();
  try {
    const keys = await redis.keys(pattern);
    if (keys.length > 0) await redis.del(...keys);
  } finally {
    redis.disconnect();
  }
}

async function sparePort(): Promise<number> {
  return new Promise<number>((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => { const p = (s.address() as { port: number }).port; s.close(() => { resolve(p); }); });
  });
}

/** A private redis-server (no persistence), once it accepts connections. */
async function startRedis(port: number): Promise<ChildProcess> {
  const server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  for (let i = 0; ; i += 1) {
    const listening = await new Promise<boolean>((resolve) => {
      const socket = connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true); });
      socket.on('error', () => { resolve(false); });
    });
    if (listening) return server;
    if (i > 100) { server.kill('SIGKILL'); throw new Error('redis-server did not start'); }
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function stopRedis(server: ChildProcess): Promise<void> {
  if (server.exitCode !== null || server.signalCode !== null) return;
  const exited = new Promise((resolve) => server.once('exit', resolve));
  server.kill('SIGKILL');
  await exited;
}

describe('the rate limiter while its Redis client connects', () => {
  it('used at once after construction, before the first connect completes, it enforces the limit', async () => {
    const prefix = `ll:test:rlconn:${randomBytes(6).toString('hex')}:`;
    // A wait long enough for a first connect on a loaded test machine: what is under test is
    // that the takes wait for it at all (before the fix the client refused them at once, whatever
    // the timeout).
    const { resilience, bucket } = limiterFromConfig(REDIS_URL, prefix, 1000);
    try {
      // Issued in the tick that made the client: it cannot have connected yet. Before the fix the
      // client refused all six ("Stream isn't writeable"), the breaker opened, and the limiter
      // let everything through for the next 5 s.
      const first = await Promise.all(Array.from({ length: 6 }, () => outcome(bucket, 'start')));
      assert.deepEqual(first, ['allowed', 'allowed', 'refused', 'refused', 'refused', 'refused']);
      assert.equal(bucket.breaker.state, 'closed');
      assert.equal(await outcome(bucket, 'start'), 'refused', 'and it goes on limiting');
    } finally {
      await resilience.close();
      await deleteKeys(REDIS_URL, `${prefix}*`);
    }
  });

  it('when a healthy Redis drops the connection, the takes right after wait for the reconnect and the limit holds', { timeout: 30_000 }, async () => {
    const port = await sparePort();
    const url = `redis://127.0.0.1:${port}`;
    const server = await startRedis(port);
    const { resilience, bucket } = limiterFromConfig(url, 'll:test:rlconn:');
    const admin = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0 });
    try {
      await admin.connect();
      // Connected first (this test is not about start-up): a take that decides.
      for (let i = 0; (await outcome(bucket, 'warm')) === 'failed'; i += 1) {
        assert.ok(i < 3, 'the limiter never reached Redis');
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(await outcome(bucket, 'drop'), 'allowed');
      // Redis stays up; only the limiter's connection is closed (as an idle timeout or a proxy would).
      assert.equal(await admin.call('CLIENT', 'KILL', 'TYPE', 'normal', 'SKIPME', 'yes'), 1);
      // Traffic goes on: a take every 2 ms, each started without waiting for the one before.
      const takes: Promise<string>[] = [];
      for (let i = 0; i < 20; i += 1) {
        takes.push(outcome(bucket, 'drop'));
        await new Promise((r) => setTimeout(r, 2));
      }
      const outcomes = await Promise.all(takes);
      // A take that raced the close may still fail (the client had not seen it yet): one or two,
      // not the half that open the breaker. Before the fix every take until ioredis's first retry
      // (50 to 250 ms, past the 50 ms a take waits) failed, the breaker opened, and the limiter
      // let everything through for 5 s.
      const failed = outcomes.filter((o) => o === 'failed').length;
      assert.ok(failed <= 2, outcomes.join(' '));
      assert.deepEqual(outcomes.filter((o) => o !== 'failed'), ['allowed', ...Array<string>(19 - failed).fill('refused')], outcomes.join(' '));
      assert.equal(bucket.breaker.state, 'closed');
    } finally {
      admin.disconnect();
      await resilience.close();
      await stopRedis(server);
    }
  });

  it('a Redis that is stopped opens the breaker quickly and fails open; started again, it is used within seconds', { timeout: 30_000 }, async () => {
    const port = await sparePort();
    const url = `redis://127.0.0.1:${port}`;
    let server = await startRedis(port);
    const { resilience, bucket } = limiterFromConfig(url, 'll:test:rlconn:');
    try {
      assert.equal(await outcome(bucket, 'restart'), 'allowed');
      await stopRedis(server);
      // Refused connections fail each take at once (or within its 50 ms wait for a reconnect):
      // a failure rate of half over at least five calls (the one success before included) opens
      // the breaker, and then nothing waits on Redis at all.
      const startedMs = performance.now();
      const down: string[] = [];
      for (let i = 0; i < 10; i += 1) down.push(await outcome(bucket, 'restart'));
      const failed = down.filter((o) => o === 'failed').length;
      assert.ok(failed >= 4 && failed <= 5, down.join(' '));
      assert.deepEqual(down, [...Array<string>(failed).fill('failed'), ...Array<string>(10 - failed).fill('unknown')]);
      assert.equal(bucket.breaker.state, 'open');
      assert.ok(performance.now() - startedMs < 1000, `${Math.round(performance.now() - startedMs)} ms`);

      server = await startRedis(port);
      // The breaker waits 5 s, then lets one trial through; the client reconnects within about
      // a second of Redis being back, so that trial finds a connection and limiting resumes.
      const deadlineMs = performance.now() + 15_000;
      let result = await outcome(bucket, 'restart');
      while ((result === 'unknown' || result === 'failed') && performance.now() < deadlineMs) {
        await new Promise((r) => setTimeout(r, 100));
        result = await outcome(bucket, 'restart');
      }
      // A fresh Redis (no persistence): a full bucket again.
      assert.deepEqual([result, await outcome(bucket, 'restart'), await outcome(bucket, 'restart')], ['allowed', 'allowed', 'refused']);
      assert.equal(bucket.breaker.state, 'closed');
    } finally {
      await resilience.close();
      await stopRedis(server);
    }
  });

  it('a Redis a few milliseconds away limits from the first request: the connection is ready in one round trip', { timeout: 30_000 }, async () => {
    // A proxy that delays every chunk 5 ms each way: a 10 ms round trip to the shared Redis.
    const sockets = new Set<Socket>();
    const proxy = createServer((client) => {
      sockets.add(client);
      const upstream = connect(6379, '127.0.0.1');
      sockets.add(upstream);
      for (const [from, to] of [[client, upstream], [upstream, client]] as const) {
        from.on('data', (d) => { setTimeout(() => { if (!to.destroyed) to.write(d); }, 5); });
        from.on('close', () => { setTimeout(() => { to.destroy(); }, 5); });
        from.on('error', () => {});
      }
    });
    await new Promise<void>((resolve) => { proxy.listen(0, '127.0.0.1', () => { resolve(); }); });
    const port = (proxy.address() as { port: number }).port;
    const prefix = `ll:test:rlnear:${randomBytes(4).toString('hex')}:`;
    const { resilience, bucket } = limiterFromConfig(`redis://127.0.0.1:${port}`, prefix);
    try {
      const seen: string[] = [];
      for (let i = 0; i < 40; i += 1) {
        seen.push(await outcome(bucket, 'near'));
        await new Promise((r) => setTimeout(r, 5));
      }
      assert.equal(seen.includes('unknown'), false, `never failed open on an open breaker: ${seen.join(' ')}`);
      assert.ok(seen.filter((o) => o === 'failed').length <= 2, seen.join(' '));
      assert.equal(seen.at(-1), 'refused', seen.join(' '));
      assert.equal(bucket.breaker.state, 'closed');
    } finally {
      await resilience.close();
      proxy.close();
      for (const s of sockets) s.destroy();
      await deleteKeys(REDIS_URL, `${prefix}*`);
    }
  });

  it('closed, it decides nothing and waits for nothing, even with its client reconnecting for good', async () => {
    const port = await sparePort();
    const { resilience, bucket } = limiterFromConfig(`redis://127.0.0.1:${port}`, 'll:test:rlclosed:');
    await resilience.close();
    const startMs = performance.now();
    assert.equal(await bucket.take('any', LIMIT), undefined);
    assert.ok(performance.now() - startMs < 20, `took ${performance.now() - startMs} ms`);
  });
});

/**
 * Requests the rate limiter refuses on audited routes are recorded in summaries, not one
 * record each: a client over its limit cannot grow the trail (and fill the sink, which then
 * refuses everyone's audited requests) at the rate it sends. Over a real Redis bucket.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { Redis } from 'ioredis';
import { Type } from 'typebox';
import { createService, problem, RedisTokenBucket } from '@ledgerline/service-runtime';
import { AuditBufferFullError, auditHttp, checkEntry, MemoryAuditSink, RATE_LIMITED_OVERFLOW_ACTION, RateLimitedSummaries, type AuditEntry, type RateLimitedRefusal } from '../src/index.ts';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
/** A burst of 2 that refills one token every 100 s: nothing refills during a test. */
const LIMIT = { ratePerSecond: 0.01, burst: 2 };
const T0 = Date.UTC(2026, 11, 7, 10, 0);

let redis: Redis;
const prefix = `ll:test:audit-rl:${randomBytes(6).toString('hex')}:`;

before(() => {
  redis = new Redis(REDIS_URL, { lazyConnect: false, maxRetriesPerRequest: 1 });
});

after(async () => {
  const keys = await redis.keys(`${prefix}*`);
  if (keys.length > 0) await redis.del(...keys);
  redis.disconnect();
});

async function limitedService(sink: MemoryAuditSink, clock: () => number, rateLimitedSummary?: { intervalMs?: number; keysMax?: number }) {
  const app = await createService({
    config: { LOG_LEVEL: 'fatal', BODY_LIMIT_BYTES: 1024 },
    openapi: { title: 'audit-rl', version: '0' },
    logger: false,
    rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: `${prefix}${randomBytes(4).toString('hex')}:` }), defaultLimit: LIMIT },
  });
  await app.register(auditHttp, {
    sink,
    service: 'test',
    clock,
    ...(rateLimitedSummary === undefined ? {} : { rateLimitedSummary }),
    routes: {
      'GET /v1/things/:id': { action: 'test.read', recordClass: 'access', resourceType: 'thing' },
      'POST /v1/busy': { action: 'test.busy', recordClass: 'command', resourceType: 'busy' },
    },
  });
  app.get('/v1/things/:id', { schema: { response: { 200: Type.Object({ ok: Type.Boolean() }) } } }, () => ({ ok: true }));
  // A 429 of the handler's own (not the rate limiter's) stays a record of its own.
  app.post('/v1/busy', { config: { rateLimit: false }, schema: { response: { 200: Type.Object({ ok: Type.Boolean() }) } } }, () => {
    throw problem(429, { type: 'https://ledgerline.dev/problems/busy', title: 'Busy', detail: 'Busy: try again later.' });
  });
  return app;
}

const summariesOf = (entries: AuditEntry[]) => entries.filter((e) => e.reason === 'rate-limited');

describe('rate-limited requests on audited routes', () => {
  test('are written as one summary per actor, address, route and resource, with the count and span', async () => {
    const sink = new MemoryAuditSink();
    let now = T0;
    const app = await limitedService(sink, () => now);
    try {
      const get = (id: string, client: string) =>
        app.inject({ method: 'GET', url: `/v1/things/${id}`, headers: { 'x-client-id': client, traceparent: `00-${'ab'.repeat(16)}-${'cd'.repeat(8)}-01` } });
      const statuses: number[] = [];
      // The default limiter keys by address, so both "clients" share one bucket; the trail
      // records each header as the caller's claim, so they are two actors.
      for (let i = 0; i < 40; i += 1) {
        now = T0 + i * 10;
        statuses.push((await get(i < 30 ? 'thing-a' : 'thing-b', i % 2 === 0 ? 'even' : 'odd')).statusCode);
      }
      assert.deepEqual(statuses.slice(0, 3), [200, 200, 429]);
      assert.equal(statuses.filter((s) => s === 429).length, 38);
      // The two admitted reads are recorded at once, each on its own; no refusal is, yet.
      assert.deepEqual(sink.entries.map((e) => [e.outcome, e.resource.id]), [['success', 'thing-a'], ['success', 'thing-a']]);
      // A 429 the handler answered itself is not the rate limiter's: recorded on its own.
      assert.equal((await app.inject({ method: 'POST', url: '/v1/busy', payload: {} })).statusCode, 429);
      assert.deepEqual(sink.entries.slice(2).map((e) => [e.action, e.reason]), [['test.busy', 'busy']]);
    } finally {
      // Closing writes the interval's summaries.
      await app.close();
    }
    const summaries = summariesOf(sink.entries);
    const byKey = new Map(summaries.map((e) => [`${e.actor.id} ${e.resource.id}`, e]));
    assert.deepEqual([...byKey.keys()].sort(), ['claimed:even thing-a', 'claimed:even thing-b', 'claimed:odd thing-a', 'claimed:odd thing-b']);
    // Refused: requests 2..29 on thing-a (14 even, 14 odd), 30..39 on thing-b (5 and 5).
    assert.deepEqual(summaries.map((e) => (e.payload as { refused: number }).refused).reduce((a, b) => a + b, 0), 38);
    const evenA = byKey.get('claimed:even thing-a');
    assert.ok(evenA !== undefined);
    assert.deepEqual(
      { ...evenA, origin: { ...evenA.origin, requestId: typeof evenA.origin.requestId } },
      {
        recordClass: 'access',
        actor: { type: 'anonymous', id: 'claimed:even' },
        action: 'test.read',
        outcome: 'failure',
        reason: 'rate-limited',
        // The first refusal's request id and trace, as a single record's origin.
        origin: { service: 'test', ip: '127.0.0.1', requestId: 'string', traceId: 'ab'.repeat(16) },
        resource: { type: 'thing', id: 'thing-a' },
        occurredAt: new Date(T0 + 280),
        payload: {
          method: 'GET',
          route: '/v1/things/:id',
          status: 429,
          refused: 14,
          from: new Date(T0 + 20).toISOString(),
          to: new Date(T0 + 280).toISOString(),
          firstRequestId: evenA.origin.requestId,
          lastRequestId: (evenA.payload as { lastRequestId: string }).lastRequestId,
          ratePerSecond: LIMIT.ratePerSecond,
          burst: LIMIT.burst,
        },
      },
    );
    assert.notEqual((evenA.payload as { lastRequestId: string }).lastRequestId, evenA.origin.requestId);
    assert.equal((byKey.get('claimed:odd thing-b')?.payload as { refused: number }).refused, 5);
  });

  test('are written every interval while the service runs', async () => {
    const sink = new MemoryAuditSink();
    const app = await limitedService(sink, Date.now, { intervalMs: 100 });
    const refused = (): number => summariesOf(sink.entries).reduce((n, e) => n + (e.payload as { refused: number }).refused, 0);
    let written: number;
    try {
      for (let i = 0; i < 6; i += 1) await app.inject({ method: 'GET', url: '/v1/things/t' });
      const deadline = Date.now() + 5000;
      // All four refusals written while the service runs (in one summary, or more if an interval
      // ended between the requests).
      while (refused() < 4) {
        assert.ok(Date.now() < deadline, `${refused()} of 4 refusals written within 5 s of a 100 ms interval`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      written = summariesOf(sink.entries).length;
    } finally {
      await app.close();
    }
    assert.equal(summariesOf(sink.entries).length, written, 'closing with nothing counted since writes nothing more');
    assert.equal(refused(), 4);
  });

  const refusal = (client: string, actor: string, resource: string, at: number, recordClass = 'access', ip = '10.0.0.1'): RateLimitedRefusal => ({
    recordClass, action: 'test.read', actor: { type: 'user', id: actor }, ip,
    resource: { type: 'thing', id: resource }, method: 'GET', route: '/v1/things/:id', requestId: `req-${at}`, limit: LIMIT, client, at: T0 + at,
  });

  test('one client cannot crowd the others out: past its own summaries, its refusals go into one catch-all that samples what they named', () => {
    const summaries = new RateLimitedSummaries({ keysMax: 6, perClientMax: 3 });
    // mallory varies the resource (and the address) every time: 3 summaries, then its catch-all.
    for (let i = 1; i <= 30; i += 1) summaries.add(refusal('p:mallory', 'mallory', `r-${i}`, i, 'access', `10.0.${i}.1`));
    // victim comes after, and still has a summary of its own, found by its actor and resource.
    summaries.add(refusal('p:victim', 'victim', 'thing-42', 31));
    summaries.add(refusal('p:victim', 'victim', 'thing-42', 32));
    // The table holds 6: mallory's 4 and victim's 1 leave one, which carol's summary takes;
    // dave's bucket finds it full and goes to the overflow of its class.
    summaries.add(refusal('p:carol', 'carol', 'c', 33));
    summaries.add(refusal('p:dave', 'dave', 'd', 34));
    summaries.add(refusal('p:dave', 'dave', 'd', 35));
    summaries.add(refusal('p:erin', 'erin', 'e', 36, 'command'));
    assert.equal(summaries.pending, 36);
    const out = summaries.drain('test');
    assert.deepEqual(out.map((o) => [o.entry.action, o.entry.recordClass, o.entry.actor.id, o.entry.resource.id, o.refused]), [
      ['test.read', 'access', 'mallory', 'r-1', 1],
      ['test.read', 'access', 'mallory', 'r-2', 1],
      ['test.read', 'access', 'mallory', 'r-3', 1],
      // The catch-all: 27 refusals, each naming another resource, credited to no one resource.
      ['test.read', 'access', 'anonymous', 'several', 27],
      ['test.read', 'access', 'victim', 'thing-42', 2],
      ['test.read', 'access', 'carol', 'c', 1],
      [RATE_LIMITED_OVERFLOW_ACTION, 'access', 'anonymous', 'test', 2],
      [RATE_LIMITED_OVERFLOW_ACTION, 'command', 'anonymous', 'test', 1],
    ]);
    const rest = out[3]?.entry.payload as Record<string, unknown>;
    assert.deepEqual(
      { bucket: rest.bucket, actors: rest.actors, resources: (rest.resources as string[]).length, addresses: (rest.addresses as string[]).length, unsampled: rest.unsampled, from: rest.from, to: rest.to },
      // 27 refusals, each a new resource and address: 20 of each sampled, 7 past the samples.
      { bucket: 'p:mallory', actors: ['user:mallory'], resources: 20, addresses: 20, unsampled: 7, from: new Date(T0 + 4).toISOString(), to: new Date(T0 + 30).toISOString() },
    );
    assert.deepEqual(out[6]?.entry.payload, {
      status: 429,
      refused: 2,
      from: new Date(T0 + 34).toISOString(),
      to: new Date(T0 + 35).toISOString(),
      actions: ['test.read'],
      clients: [{ client: 'p:dave', refused: 2 }],
      refusedByUnlistedClients: 0,
    });
    assert.equal(summaries.pending, 0);
    assert.deepEqual(summaries.drain('test'), [], 'a drain empties the table');
    assert.throws(() => new RateLimitedSummaries({ keysMax: 0 }), /keysMax must be a positive integer/);
    assert.throws(() => new RateLimitedSummaries({ perClientMax: 1.5 }), /perClientMax must be a positive integer/);
  });

  test('a catch-all names the actor when all its refusals named one (a bucket keyed by principal), and no resource when they named several', () => {
    const summaries = new RateLimitedSummaries({ perClientMax: 2 });
    for (let i = 1; i <= 5; i += 1) summaries.add(refusal('p:alice', 'alice', `r-${i}`, i));
    const rest = summaries.drain('test').at(-1)?.entry;
    assert.deepEqual([rest?.actor, rest?.resource, (rest?.payload as { refused: number }).refused], [{ type: 'user', id: 'alice' }, { type: 'thing', id: 'several' }, 3]);
  });

  test('a summary the sink refuses for a full buffer is offered again at the next write; only past the bound is one dropped, and its refusals counted', () => {
    const summaries = new RateLimitedSummaries({ keysMax: 2 });
    const written: AuditEntry[] = [];
    let refuse = true;
    const sink = {
      record: (entry: AuditEntry) => {
        if (refuse) throw new AuditBufferFullError('buffer full');
        written.push(entry);
      },
    };
    summaries.add(refusal('p:a', 'a', 'x', 1));
    summaries.add(refusal('p:a', 'a', 'x', 2));
    const first = summaries.writeTo(sink, 'test');
    assert.deepEqual([first.lost, String(first.error), written.length, summaries.pending], [0, 'AuditBufferFullError: buffer full', 0, 2]);
    summaries.add(refusal('p:b', 'b', 'y', 3));
    refuse = false;
    assert.deepEqual(summaries.writeTo(sink, 'test'), { lost: 0, error: null });
    assert.deepEqual(written.map((e) => [e.actor.id, (e.payload as { refused: number }).refused]), [['a', 2], ['b', 1]]);
    // Refused every time: kept up to keysMax entries; the oldest past that are dropped.
    refuse = true;
    for (let round = 0; round < 3; round += 1) {
      summaries.add(refusal(`p:c${round}`, 'c', 'z', 10 + round));
      summaries.add(refusal(`p:c${round}`, 'c', 'z', 20 + round));
      const r = summaries.writeTo(sink, 'test');
      assert.equal(r.lost, round === 2 ? 2 : 0);
    }
    assert.equal(summaries.pending, 4);
  });

  test('a summary the sink refuses for another reason (closed, or the entry invalid) is dropped at once and counted', () => {
    const summaries = new RateLimitedSummaries();
    summaries.add(refusal('p:a', 'a', 'x', 1));
    summaries.add(refusal('p:a', 'a', 'x', 2));
    const r = summaries.writeTo({ record: () => { throw new Error('the sink is closed'); } }, 'test');
    assert.deepEqual([r.lost, String(r.error), summaries.pending], [2, 'Error: the sink is closed', 0]);
  });

  test('a time no audit entry may carry (a clock in microseconds, NaN) is taken as now, so the summary can be written', () => {
    const summaries = new RateLimitedSummaries();
    summaries.add({ ...refusal('p:a', 'a', 'x', 1), at: Number.NaN });
    summaries.add({ ...refusal('p:b', 'b', 'y', 1), at: Date.now() * 1000 });
    const sink = new MemoryAuditSink();
    assert.deepEqual(summaries.writeTo({ record: (e) => { checkEntry(e); sink.record(e); } }, 'test'), { lost: 0, error: null });
    assert.equal(sink.entries.length, 2);
  });
});

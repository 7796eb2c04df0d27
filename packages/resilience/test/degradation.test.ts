/**
 * Fallbacks that degrade instead of failing, against a real PostgreSQL: reads answered from
 * the last good answer, marked stale; work deferred durably while the dependency's breaker
 * is open and handed back, once each, when it recovers. The database is created for this
 * file and dropped at the end.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import {
  CircuitOpenError,
  DeferredQueue,
  DeferredQueueFullError,
  DependencyPolicy,
  ManualClock,
  migrateResilience,
  StaleCache,
  type DeferredItem,
} from '../src/index.ts';

const breaker = { window: { kind: 'count' as const, calls: 2 }, minimumCalls: 2, failureRateThreshold: 0.5, slowCallRateThreshold: 1, slowCallDurationMs: Infinity, openWaitMs: 1000, halfOpenPermittedCalls: 1 };

describe('stale reads', () => {
  it('answers with the last good answer, marked stale with its age, while the dependency is down', async () => {
    const clock = new ManualClock();
    const cache = new StaleCache<string>({ entriesMax: 2, staleMaxMs: 60_000, clock });
    const policy = new DependencyPolicy({ name: 'fx', attemptTimeoutMs: 100, callTimeoutMs: 100, retry: false, bulkhead: false, breaker, clock });
    let up = true;
    const rate = () => cache.read('EURUSD', () => policy.execute(() => (up ? Promise.resolve('1.08') : Promise.reject(new Error('down')))));
    assert.deepEqual(await rate(), { value: '1.08', stale: false, ageMs: 0 });
    up = false;
    clock.set(clock.now() + 5000);
    assert.deepEqual(await rate(), { value: '1.08', stale: true, ageMs: 5000 });
    await rate();
    assert.equal(policy.breaker?.state, 'open');
    const whileOpen = await rate();
    assert.equal(whileOpen.stale, true, 'the breaker is open and the cache still answers');
    clock.set(clock.now() + 60_001);
    // Too old to serve: the failure shows (the breaker's wait has passed, so this was a trial call).
    await assert.rejects(rate(), /down/);
    assert.equal(policy.breaker?.state, 'open');
    await assert.rejects(rate(), CircuitOpenError);
  });

  it('keeps the newest answer, not the one that finished last, and dates it from when its load began', async () => {
    const clock = new ManualClock();
    const cache = new StaleCache<string>({ entriesMax: 2, staleMaxMs: 60_000, clock });
    const t0 = clock.now();
    let answerSlow = (_value: string): void => {};
    const slow = cache.read('EURUSD', () => new Promise<string>((resolve) => (answerSlow = resolve))); // asked at 0
    clock.set(t0 + 1000);
    assert.equal((await cache.read('EURUSD', () => Promise.resolve('1.09'))).value, '1.09'); // asked at 1000
    clock.set(t0 + 2000);
    answerSlow('1.08'); // the answer to the earlier question arrives last
    assert.equal((await slow).value, '1.08', 'the slow caller gets its own answer');
    clock.set(t0 + 3000);
    assert.deepEqual(await cache.read('EURUSD', () => Promise.reject(new Error('down'))), { value: '1.09', stale: true, ageMs: 2000 });
  });

  it('keeps at most entriesMax answers, dropping the least recently written', () => {
    const cache = new StaleCache<number>({ entriesMax: 2, staleMaxMs: 1000, clock: new ManualClock() });
    cache.set('a', 1);
    cache.set('b', 2);
    cache.set('a', 3);
    cache.set('c', 4);
    assert.equal(cache.size, 2);
    assert.equal(cache.get('b'), undefined);
    assert.equal(cache.get('a')?.value, 3);
    assert.throws(() => new StaleCache({ entriesMax: 0, staleMaxMs: 1 }), RangeError);
  });
});

describe('deferred work', () => {
  let db: TestDatabase;
  let pool: pg.Pool;
  before(async () => {
    db = await createTestDatabase('ll_resilience');
    await migrateResilience(db.url);
    await migrateResilience(db.url); // idempotent
    pool = new pg.Pool({ connectionString: db.url, max: 4 });
  });
  after(async () => {
    await pool.end();
    await db.drop();
  });

  it('is queued durably while the breaker is open and delivered once each when the dependency is back', async () => {
    const clock = new ManualClock();
    const queue = new DeferredQueue<{ to: string; text: string }>({ pool, queue: 'notifications', depthMax: 100 });
    const policy = new DependencyPolicy({ name: 'sms', attemptTimeoutMs: 100, callTimeoutMs: 100, retry: false, bulkhead: false, breaker, clock });
    const delivered: string[] = [];
    let up = false;
    const send = (n: { to: string; text: string }) => policy.execute(
      () => { if (!up) throw new Error('sms gateway down'); delivered.push(n.text); return 'sent' as const; },
      { fallback: async () => { await queue.enqueue(n, { dedupeKey: n.text }); return 'deferred' as const; } },
    );
    assert.equal(await send({ to: 'alice', text: 'm1' }), 'deferred');
    assert.equal(await send({ to: 'alice', text: 'm2' }), 'deferred');
    assert.equal(policy.breaker?.state, 'open');
    assert.equal(await send({ to: 'bob', text: 'm3' }), 'deferred');
    assert.equal(await send({ to: 'bob', text: 'm3' }), 'deferred', 'a repeated fallback defers once');
    assert.equal(await queue.depth(), 3);
    // A drain while the gateway is still down keeps every item, with an attempt counted.
    const failing = await queue.drain(async (item) => { await send(item.payload).then((r) => { if (r === 'deferred') throw new Error('still down'); }); });
    assert.deepEqual(failing, { done: 0, failed: 3 });
    const attempts = await pool.query<{ attempts: number }>('SELECT attempts FROM resilience.deferred_work ORDER BY id');
    assert.deepEqual(attempts.rows.map((r) => r.attempts), [1, 1, 1]);
    // The dependency heals; once the retry delay has passed, the items go out in order, once.
    up = true;
    clock.set(clock.now() + 1000);
    await pool.query('UPDATE resilience.deferred_work SET available_at = now()');
    const handled: Array<DeferredItem<{ to: string; text: string }>> = [];
    const drained = await queue.drain(async (item) => {
      handled.push(item);
      assert.equal(await send(item.payload), 'sent');
    });
    assert.deepEqual(drained, { done: 3, failed: 0 });
    assert.deepEqual(delivered, ['m1', 'm2', 'm3']);
    assert.deepEqual(handled.map((i) => i.attempts), [1, 1, 1]);
    assert.equal(await queue.depth(), 0);
  });

  it('two drainers never take the same item', async () => {
    const queue = new DeferredQueue<number>({ pool, queue: 'race', depthMax: 1000, batchMax: 50 });
    for (let i = 0; i < 100; i += 1) await queue.enqueue(i);
    const seen: number[] = [];
    const handler = async (item: DeferredItem<number>): Promise<void> => {
      seen.push(item.payload);
      await new Promise((r) => setTimeout(r, 1));
    };
    const results = await Promise.all([queue.drain(handler), queue.drain(handler)]);
    assert.equal(results[0].done + results[1].done, 100);
    assert.equal(new Set(seen).size, 100);
    assert.equal(seen.length, 100);
  });

  it('refuses work beyond depthMax instead of growing without bound', async () => {
    const queue = new DeferredQueue<number>({ pool, queue: 'small', depthMax: 2 });
    await queue.enqueue(1);
    await queue.enqueue(2);
    await assert.rejects(queue.enqueue(3), DeferredQueueFullError);
    assert.equal(await queue.depth(), 2);
    assert.throws(() => new DeferredQueue({ pool, queue: 'x', depthMax: 0 }), RangeError);
  });
});

/**
 * The priority load shedder on a manual clock: concurrency and queue bounds, priority order,
 * eviction of the lowest class, per-class queue timeouts, and the degradation level rising
 * on a standing queue (lowest classes first) and falling when it drains.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { LoadShedder, ManualClock, ShedError, type LoadShedderOptions, type Priority } from '../src/index.ts';

function make(overrides: Partial<LoadShedderOptions> = {}) {
  const clock = new ManualClock(0);
  const levels: Array<[number, number]> = [];
  const shed: string[] = [];
  const shedder = new LoadShedder({
    concurrencyMax: 2,
    queueMax: 4,
    queueTimeoutMs: { critical: 1000, high: 500, normal: 200, low: 100 },
    targetQueueMs: 50,
    intervalMs: 100,
    clock,
    onLevelChange: (level, previous) => levels.push([previous, level]),
    onShed: (e) => shed.push(`${e.priority}:${e.reason}`),
    ...overrides,
  });
  /** Starts a request; `state` says whether it is running, refused (with reason) or waiting. */
  const start = (priority: Priority) => {
    const r = { priority, state: 'waiting' as string };
    shedder.acquire(priority).then(
      () => { r.state = 'running'; },
      (e: unknown) => { r.state = e instanceof ShedError ? `shed:${e.reason}` : `error:${String(e)}`; },
    );
    return r;
  };
  return { clock, shedder, levels, shed, start };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('load shedder', () => {
  it('admits up to concurrencyMax at once, queues the rest, and serves the queue by priority', async () => {
    const { shedder, start } = make();
    const a = start('low');
    const b = start('low');
    const c = start('low');
    const d = start('critical');
    const e = start('normal');
    await tick();
    assert.deepEqual([a.state, b.state, c.state, d.state, e.state], ['running', 'running', 'waiting', 'waiting', 'waiting']);
    shedder.release();
    await tick();
    assert.equal(d.state, 'running', 'critical jumps the queue');
    shedder.release();
    await tick();
    assert.equal(e.state, 'running', 'then normal');
    shedder.release();
    await tick();
    assert.equal(c.state, 'running', 'then low');
    assert.equal(shedder.queued, 0);
    assert.equal(shedder.running, 2);
  });

  it('a full queue evicts the newest waiter of the lowest class below the arrival', async () => {
    const { start, shed } = make({ queueMax: 2 });
    start('normal');
    start('normal');
    const lowOld = start('low');
    const lowNew = start('low');
    const high = start('high');
    await tick();
    assert.equal(lowNew.state, 'shed:evicted');
    assert.equal(lowOld.state, 'waiting');
    assert.equal(high.state, 'waiting');
    const low3 = start('low');
    await tick();
    assert.equal(low3.state, 'shed:queue_full', 'nothing below low to evict');
    assert.deepEqual(shed, ['low:evicted', 'low:queue_full']);
  });

  it('a critical arrival is refused only when the queue holds nothing below it', async () => {
    const { start } = make({ queueMax: 1 });
    start('critical');
    start('critical');
    const queued = start('critical');
    const refused = start('critical');
    await tick();
    assert.equal(queued.state, 'waiting');
    assert.equal(refused.state, 'shed:queue_full');
  });

  it('each class waits at most its own queue timeout', async () => {
    const { clock, start } = make({ queueMax: 10 });
    start('critical');
    start('critical');
    const low = start('low');
    const normal = start('normal');
    const critical = start('critical');
    await clock.advance(100);
    assert.equal(low.state, 'shed:queue_timeout');
    assert.equal(normal.state, 'waiting');
    await clock.advance(100);
    assert.equal(normal.state, 'shed:queue_timeout');
    await clock.advance(799);
    assert.equal(critical.state, 'waiting');
    await clock.advance(1);
    assert.equal(critical.state, 'shed:queue_timeout');
  });

  it('a standing queue raises the level one class at a time; a calm one lowers it', async () => {
    const { clock, shedder, start, levels } = make({ queueMax: 100, queueTimeoutMs: { critical: 10_000, high: 10_000, normal: 10_000, low: 10_000 } });
    // Two requests hold the slots for good; a queue forms behind them and stays.
    start('critical');
    start('critical');
    for (let i = 0; i < 3; i += 1) start('high');
    await clock.advance(100);
    // Two requests were admitted at once (wait 0), but the queue behind them has stood for a
    // whole interval, longer than the 50 ms target: that is a standing queue.
    assert.equal(shedder.level, 1);
    const low = start('low');
    const normal = start('normal');
    await tick();
    assert.equal(low.state, 'shed:level');
    assert.equal(normal.state, 'waiting', 'level 1 sheds only low');
    await clock.advance(100);
    assert.equal(shedder.level, 2);
    assert.deepEqual(shedder.shedClasses(), ['low', 'normal']);
    await clock.advance(100);
    assert.equal(shedder.level, 3);
    await clock.advance(100);
    assert.equal(shedder.level, 3, 'capped at 3');
    const high = start('high');
    const critical = start('critical');
    await tick();
    assert.equal(high.state, 'shed:level');
    assert.equal(critical.state, 'waiting', 'critical is never shed by level');
    // Drain everything: the queue is gone, and the level steps down per calm interval.
    while (shedder.queued > 0) shedder.release();
    shedder.release();
    shedder.release();
    assert.equal(shedder.running, 0);
    await clock.advance(100);
    const probe = start('critical');
    await tick();
    assert.equal(probe.state, 'running');
    shedder.release();
    await clock.advance(100);
    assert.ok(shedder.level < 3);
    await clock.advance(500);
    assert.equal(shedder.level, 0, 'quiet intervals count as calm');
    assert.deepEqual(levels.map(([a, b]) => `${a}>${b}`).slice(0, 3), ['0>1', '1>2', '2>3']);
  });

  it('a burst that drains quickly does not raise the level', async () => {
    const { clock, shedder, start } = make({ queueMax: 100 });
    for (let round = 0; round < 10; round += 1) {
      start('low');
      start('low');
      start('low');
      await clock.advance(5);
      shedder.release(); // the queued one runs after 5 ms
      await clock.advance(5);
      shedder.release();
      shedder.release();
      await clock.advance(20);
    }
    assert.equal(shedder.level, 0);
  });

  it('a waiter whose signal aborts leaves the queue, and the slot goes to the next', async () => {
    const { shedder, clock, start } = make({ concurrencyMax: 1 });
    start('normal');
    const gone = new AbortController();
    let abandoned = 'waiting';
    shedder.acquire('normal', gone.signal).then(
      () => { abandoned = 'running'; },
      (e: unknown) => { abandoned = e instanceof Error ? e.message : String(e); },
    );
    const next = start('normal');
    await tick();
    assert.equal(shedder.queued, 2);
    gone.abort(new Error('client gone'));
    await tick();
    assert.equal(abandoned, 'client gone');
    assert.equal(shedder.queued, 1);
    shedder.release();
    await tick();
    assert.equal(next.state, 'running');
    assert.equal(shedder.running, 1);
    // Its queue timer was cleared: nothing fires for it later.
    await clock.advance(10_000);
    await tick();
    assert.equal(abandoned, 'client gone');
    // Already aborted: refused without queueing.
    await assert.rejects(shedder.acquire('normal', gone.signal), /client gone/);
    assert.equal(shedder.queued, 0);
  });

  it('checks its bounds', () => {
    const base = { concurrencyMax: 1, queueMax: 1, queueTimeoutMs: { critical: 1, high: 1, normal: 1, low: 1 }, targetQueueMs: 1, intervalMs: 1 };
    assert.throws(() => new LoadShedder({ ...base, concurrencyMax: 0 }), RangeError);
    assert.throws(() => new LoadShedder({ ...base, queueMax: -1 }), RangeError);
    assert.throws(() => new LoadShedder({ ...base, queueTimeoutMs: { ...base.queueTimeoutMs, low: -1 } }), RangeError);
    assert.throws(() => new LoadShedder({ ...base, targetQueueMs: 0 }), RangeError);
    const s = new LoadShedder(base);
    assert.throws(() => { s.release(); }, /invariant/);
  });
});

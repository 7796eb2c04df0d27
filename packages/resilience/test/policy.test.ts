/**
 * The call policy on a manual clock: retry bounds, backoff caps, the retry budget, the jitter
 * distribution (seeded, printed), timeouts and deadlines, bulkhead saturation, fallbacks.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { BulkheadRejectedError, TaskCancelledError } from 'cockatiel';
import {
  backoffDelayMs,
  Bulkhead,
  BulkheadFullError,
  BulkheadRejection,
  CircuitOpenError,
  Deadline,
  DeadlineExceededError,
  DEADLINE_HEADER,
  DependencyHttpError,
  DependencyPolicy,
  isTransientError,
  ManualClock,
  RetryBudget,
  seededRandom,
  type CallOutcome,
  type DependencyPolicyOptions,
} from '../src/index.ts';

const SEED = process.env.RESILIENCE_SEED !== undefined ? Number(process.env.RESILIENCE_SEED) : (Math.random() * 2 ** 32) >>> 0;
console.log(`[resilience] policy.test.ts seed=${SEED} (replay with RESILIENCE_SEED=${SEED})`);

function transient(): Error {
  return Object.assign(new Error('connection reset'), { code: 'ECONNRESET' });
}

function policy(clock: ManualClock, overrides: Partial<DependencyPolicyOptions> = {}) {
  const retries: number[] = [];
  const calls: CallOutcome[] = [];
  const p = new DependencyPolicy({
    name: 'dep',
    attemptTimeoutMs: 1000,
    callTimeoutMs: 60_000,
    retry: { attemptsMax: 4, backoff: { baseMs: 100, capMs: 250, jitter: 'none' }, budget: { ratio: 10, retriesMin: 100, windowMs: 10_000 } },
    breaker: false,
    bulkhead: false,
    clock,
    random: seededRandom(SEED),
    observer: {
      retry: (_d, _n, delayMs) => retries.push(delayMs),
      call: (_d, outcome) => calls.push(outcome),
    },
    ...overrides,
  });
  return { p, retries, calls };
}

/** Runs `promise` while advancing the clock in steps until it settles. */
async function drive<T>(clock: ManualClock, promise: Promise<T>, stepMs = 10, stepsMax = 100_000): Promise<T> {
  let settled = false;
  const watched = promise.finally(() => { settled = true; });
  watched.catch(() => {});
  for (let i = 0; i < stepsMax && !settled; i += 1) await clock.advance(stepMs);
  return watched;
}

describe('retry', () => {
  it('retries an idempotent call at most attemptsMax − 1 times, with capped exponential backoff', async () => {
    const clock = new ManualClock();
    const { p, retries, calls } = policy(clock);
    let attempts = 0;
    const error = await drive(clock, p.execute(() => { attempts += 1; throw transient(); }, { idempotent: true })).catch((e: unknown) => e);
    assert.equal((error as Error).message, 'connection reset');
    assert.equal(attempts, 4);
    assert.deepEqual(retries, [100, 200, 250], 'base × 2^(n−1), capped at 250');
    assert.deepEqual(calls, ['failure']);
  });

  it('never retries a call that is not idempotent', async () => {
    const clock = new ManualClock();
    const { p, retries } = policy(clock);
    let attempts = 0;
    await assert.rejects(drive(clock, p.execute(() => { attempts += 1; throw transient(); })));
    assert.equal(attempts, 1);
    assert.deepEqual(retries, []);
  });

  it('does not retry errors that are not transient', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock);
    let attempts = 0;
    await assert.rejects(drive(clock, p.execute(() => { attempts += 1; throw new Error('bad request'); }, { idempotent: true })));
    assert.equal(attempts, 1);
  });

  it('succeeds on a later attempt and reports success', async () => {
    const clock = new ManualClock();
    const { p, calls } = policy(clock);
    let attempts = 0;
    const value = await drive(clock, p.execute(() => { attempts += 1; if (attempts < 3) throw new DependencyHttpError('dep', 503); return 'ok'; }, { idempotent: true }));
    assert.equal(value, 'ok');
    assert.equal(attempts, 3);
    assert.deepEqual(calls, ['success']);
  });

  it('gives up when the next backoff would end past the deadline', async () => {
    const clock = new ManualClock();
    const { p, retries } = policy(clock);
    let attempts = 0;
    const deadline = Deadline.after(250, clock);
    await assert.rejects(drive(clock, p.execute(() => { attempts += 1; throw transient(); }, { idempotent: true, deadline })));
    // 1st attempt at 0, retry after 100 at 100; the next retry waits 200 but only 150 remain.
    assert.equal(attempts, 2);
    assert.deepEqual(retries, [100]);
  });

  it('classifies transient errors', () => {
    assert.equal(isTransientError(transient()), true);
    assert.equal(isTransientError(new TypeError('fetch failed', { cause: { code: 'ECONNREFUSED' } })), true);
    assert.equal(isTransientError(new DependencyHttpError('d', 503)), true);
    assert.equal(isTransientError(new DependencyHttpError('d', 500)), false);
    assert.equal(isTransientError(new DeadlineExceededError('d', 5)), true);
    assert.equal(isTransientError(new CircuitOpenError('d')), false);
    assert.equal(isTransientError(new BulkheadFullError('d', 1, 1)), false);
    assert.equal(isTransientError(new Error('x')), false);
  });
});

describe('retry budget', () => {
  it('allows retries up to ratio × calls (+ the floor) over the window, then refuses', () => {
    const clock = new ManualClock(0);
    const budget = new RetryBudget({ ratio: 0.2, retriesMin: 0, windowMs: 10_000, buckets: 10, clock });
    for (let i = 0; i < 10; i += 1) budget.recordCall();
    assert.equal(budget.tryRetry(), true);
    assert.equal(budget.tryRetry(), true);
    assert.equal(budget.tryRetry(), false, '3 retries would exceed 20% of 10 calls');
    assert.deepEqual(budget.usage, { calls: 10, retries: 2 });
    clock.set(10_000); // the window has slid past all of it
    assert.deepEqual(budget.usage, { calls: 0, retries: 0 });
    assert.equal(budget.tryRetry(), false);
  });

  it('the floor lets a quiet service retry', () => {
    const budget = new RetryBudget({ ratio: 0.2, retriesMin: 1, windowMs: 1000, clock: new ManualClock(0) });
    budget.recordCall();
    assert.equal(budget.tryRetry(), true);
    assert.equal(budget.tryRetry(), false);
  });

  it('caps a policy\'s retries during an outage at the budget', async () => {
    const clock = new ManualClock();
    const exhausted: string[] = [];
    const { p } = policy(clock, {
      retry: { attemptsMax: 5, backoff: { baseMs: 1, capMs: 1, jitter: 'none' }, budget: { ratio: 0.2, retriesMin: 0, windowMs: 60_000 } },
      observer: { retryBudgetExhausted: (d) => exhausted.push(d) },
    });
    let attempts = 0;
    for (let i = 0; i < 50; i += 1) {
      await assert.rejects(drive(clock, p.execute(() => { attempts += 1; throw transient(); }, { idempotent: true }), 1));
    }
    // Without the budget: 250 attempts. With it: 50 calls + at most 20% = 10 retries.
    assert.equal(attempts, 60);
    assert.ok(exhausted.length > 0);
  });
});

describe('jitter', () => {
  const N = 20_000;

  it(`full jitter is uniform on [0, min(cap, base·2^(n−1))) (seed ${SEED})`, () => {
    const random = seededRandom(SEED);
    const options = { baseMs: 100, capMs: 10_000, jitter: 'full' as const };
    for (const [retry, ceiling] of [[1, 100], [3, 400], [8, 10_000], [40, 10_000]] as const) {
      const samples = Array.from({ length: N }, () => backoffDelayMs(options, retry, 0, random));
      assert.ok(samples.every((d) => d >= 0 && d < ceiling), `retry ${retry}: all within [0, ${ceiling})`);
      const mean = samples.reduce((a, b) => a + b, 0) / N;
      // The mean of U(0, c) is c/2 with standard error c/√(12N) ≈ 0.002c: allow 5 of them.
      assert.ok(Math.abs(mean - ceiling / 2) < ceiling * 0.01, `retry ${retry}: mean ${mean} vs ${ceiling / 2}`);
      // Uniform: each tenth of the range holds about a tenth of the samples.
      const deciles = new Array<number>(10).fill(0);
      for (const d of samples) deciles[Math.floor((d / ceiling) * 10)]! += 1;
      for (const count of deciles) assert.ok(Math.abs(count / N - 0.1) < 0.012, `retry ${retry}: decile share ${count / N}`);
    }
  });

  it(`decorrelated jitter stays in [base, min(cap, 3·max(base, previous))], the first retry included, and grows (seed ${SEED})`, () => {
    const random = seededRandom(SEED + 1);
    const options = { baseMs: 50, capMs: 5000, jitter: 'decorrelated' as const };
    const firstSamples: number[] = [];
    for (let run = 0; run < N / 10; run += 1) {
      let previous = 0;
      for (let retry = 1; retry <= 10; retry += 1) {
        const d = backoffDelayMs(options, retry, previous, random);
        const upper = Math.min(options.capMs, Math.max(options.baseMs, previous) * 3);
        assert.ok(d >= options.baseMs && d <= upper, `delay ${d} outside [${options.baseMs}, ${upper}]`);
        if (retry === 1) firstSamples.push(d);
        previous = d;
      }
    }
    // The first retry, with no delay before it, is drawn as if the previous were base: U(base,
    // 3·base), mean 2·base, and spread, so clients that failed together do not retry together.
    const mean = firstSamples.reduce((a, b) => a + b, 0) / firstSamples.length;
    assert.ok(Math.abs(mean - 100) < 3, `mean ${mean} vs 100`);
    assert.ok(new Set(firstSamples).size > firstSamples.length / 2, 'first delays differ');
    assert.ok(Math.max(...firstSamples) > 140 && Math.min(...firstSamples) < 60, 'and cover [base, 3·base)');
  });

  it('the seeded PRNG replays exactly', () => {
    const a = seededRandom(SEED);
    const b = seededRandom(SEED);
    for (let i = 0; i < 100; i += 1) assert.equal(a(), b());
  });
});

describe('timeouts and deadlines', () => {
  it('an attempt that hangs fails at attemptTimeoutMs, and its signal aborts', async () => {
    const clock = new ManualClock();
    const { p, calls } = policy(clock, { retry: false, attemptTimeoutMs: 500 });
    let seen: AbortSignal | undefined;
    const started = clock.now();
    const error = await drive(clock, p.execute(({ signal }) => { seen = signal; return new Promise<never>(() => {}); })).catch((e: unknown) => e);
    assert.ok(error instanceof DeadlineExceededError);
    assert.ok(error instanceof TaskCancelledError);
    assert.equal(clock.now() - started, 500);
    assert.equal(seen?.aborted, true);
    assert.deepEqual(calls, ['timeout']);
  });

  it('each attempt gets min(attempt timeout, what is left of the deadline), in the header form too', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, { attemptTimeoutMs: 1000, retry: false });
    const budgets: string[] = [];
    await p.execute(({ deadline }) => { budgets.push(deadline.toHeader()); });
    await p.execute(({ deadline }) => { budgets.push(deadline.toHeader()); }, { deadline: Deadline.after(300, clock) });
    assert.deepEqual(budgets, ['1000', '300']);
  });

  it('an expired deadline fails before calling', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock);
    let called = false;
    const deadline = Deadline.after(0, clock);
    await assert.rejects(p.execute(() => { called = true; }, { deadline }), DeadlineExceededError);
    assert.equal(called, false);
  });

  it('parses and clamps the deadline header', () => {
    const clock = new ManualClock();
    assert.equal(DEADLINE_HEADER, 'x-deadline-remaining-ms');
    assert.equal(Deadline.fromHeader('250', clock)?.remainingMs(), 250);
    assert.equal(Deadline.fromHeader('-5', clock)?.remainingMs(), 0);
    assert.equal(Deadline.fromHeader('99999999', clock)?.remainingMs(), 300_000);
    assert.equal(Deadline.fromHeader('abc', clock), undefined);
    assert.equal(Deadline.fromHeader(undefined, clock), undefined);
    assert.equal(Deadline.fromHeader(['1', '2'], clock), undefined);
  });

  it('a deadline signal aborts on time and dispose clears its timer', async () => {
    const clock = new ManualClock();
    const d = Deadline.after(100, clock);
    const signal = d.signal;
    await clock.advance(99);
    assert.equal(signal.aborted, false);
    await clock.advance(1);
    assert.equal(signal.aborted, true);
    const e = Deadline.after(100, clock);
    assert.equal(e.signal.aborted, false);
    assert.equal(clock.pendingTimers, 1);
    e.dispose();
    assert.equal(clock.pendingTimers, 0);
  });

  it('the caller giving up aborts the attempt and does not count against the breaker', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, {
      breaker: { window: { kind: 'count', calls: 1 }, minimumCalls: 1, failureRateThreshold: 1, slowCallRateThreshold: 1, slowCallDurationMs: Infinity, openWaitMs: 1000, halfOpenPermittedCalls: 1 },
    });
    const controller = new AbortController();
    const call = p.execute(() => new Promise<never>(() => {}), { signal: controller.signal, idempotent: true });
    controller.abort(new Error('client left'));
    await assert.rejects(call, /client left/);
    assert.equal(p.breaker?.state, 'closed');
  });
});

describe('breaker inside the policy', () => {
  const breaker = { window: { kind: 'count' as const, calls: 4 }, minimumCalls: 4, failureRateThreshold: 0.5, slowCallRateThreshold: 1, slowCallDurationMs: 400, openWaitMs: 5000, halfOpenPermittedCalls: 1 };

  it('opens on failures, then fails fast without calling, and the fallback serves', async () => {
    const clock = new ManualClock();
    const { p, calls } = policy(clock, { breaker, retry: false });
    let attempts = 0;
    const failing = (): never => { attempts += 1; throw new DependencyHttpError('dep', 500); };
    for (let i = 0; i < 4; i += 1) await assert.rejects(p.execute(failing));
    assert.equal(p.breaker?.state, 'open');
    await assert.rejects(p.execute(failing), CircuitOpenError);
    assert.equal(attempts, 4, 'open: the dependency is not called');
    const value = await p.execute(failing, { fallback: (e) => (e instanceof CircuitOpenError ? 'cached' : 'other') });
    assert.equal(value, 'cached');
    assert.deepEqual(calls.slice(-2), ['circuit_open', 'fallback']);
  });

  it('an open breaker stops a retry loop at once', async () => {
    const clock = new ManualClock();
    const { p, retries } = policy(clock, { breaker: { ...breaker, minimumCalls: 2, window: { kind: 'count', calls: 2 } } });
    let attempts = 0;
    const error = await drive(clock, p.execute(() => { attempts += 1; throw transient(); }, { idempotent: true })).catch((e: unknown) => e);
    assert.ok(error instanceof CircuitOpenError);
    assert.equal(attempts, 2);
    assert.equal(retries.length, 2);
  });

  it('timeouts count as failures and as slow calls', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, { breaker: { ...breaker, failureRateThreshold: 1, slowCallRateThreshold: 0.5 }, retry: false, attemptTimeoutMs: 500 });
    await p.execute(() => 'fast');
    await p.execute(() => 'fast');
    for (let i = 0; i < 2; i += 1) await assert.rejects(drive(clock, p.execute(() => new Promise<never>(() => {}))), DeadlineExceededError);
    assert.equal(p.breaker?.state, 'open', '2 slow of 4: the slow rule opened it');
  });

  it('recovers on its own: after the wait one trial call closes it', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, { breaker, retry: false });
    for (let i = 0; i < 4; i += 1) await assert.rejects(p.execute(() => { throw new Error('down'); }));
    assert.equal(p.breaker?.state, 'open');
    await clock.advance(5000);
    assert.equal(await p.execute(() => 'up'), 'up');
    assert.equal(p.breaker?.state, 'closed');
  });

  it('isFailure decides what counts against the dependency', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, { breaker, retry: false, isFailure: (e) => !(e instanceof RangeError) });
    for (let i = 0; i < 8; i += 1) await assert.rejects(p.execute(() => { throw new RangeError('client error'); }));
    assert.equal(p.breaker?.state, 'closed');
  });
});

describe('bulkhead', () => {
  it('runs at most concurrencyMax, queues at most queueMax, rejects the rest', async () => {
    const clock = new ManualClock();
    const { p, calls } = policy(clock, { bulkhead: { concurrencyMax: 2, queueMax: 1 }, retry: false });
    const gates: Array<() => void> = [];
    let running = 0;
    let runningMax = 0;
    const fn = () => new Promise<string>((resolve) => {
      running += 1;
      runningMax = Math.max(runningMax, running);
      gates.push(() => { running -= 1; resolve('done'); });
    });
    const a = p.execute(fn);
    const b = p.execute(fn);
    const c = p.execute(fn);
    await clock.advance(0);
    assert.equal(p.bulkhead?.running, 2);
    assert.equal(p.bulkhead?.queued, 1);
    const d = await p.execute(fn).catch((e: unknown) => e);
    assert.ok(d instanceof BulkheadFullError);
    assert.ok(d instanceof BulkheadRejectedError, 'a cockatiel BulkheadRejectedError');
    gates.shift()!();
    await clock.advance(0);
    assert.equal(running, 2, 'the queued call took the freed slot');
    gates.shift()!();
    gates.shift()!();
    assert.deepEqual(await Promise.all([a, b, c]), ['done', 'done', 'done']);
    assert.equal(runningMax, 2);
    assert.equal(p.bulkhead?.running, 0);
    assert.ok(calls.includes('bulkhead_full'));
  });

  it('a queued call whose deadline passes leaves the queue at once', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, { bulkhead: { concurrencyMax: 1, queueMax: 1 }, retry: false });
    let release: () => void = () => {};
    const first = p.execute(() => new Promise<void>((resolve) => { release = resolve; }));
    const queued = p.execute(() => 'late', { deadline: Deadline.after(100, clock) });
    queued.catch(() => {});
    await clock.advance(0);
    assert.equal(p.bulkhead?.queued, 1);
    await clock.advance(100);
    await assert.rejects(queued, DeadlineExceededError);
    assert.equal(p.bulkhead?.queued, 0, 'its queue slot is free again');
    release();
    await first;
  });

  it('the slot stays taken until a timed-out call really ends', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, { bulkhead: { concurrencyMax: 1, queueMax: 0 }, retry: false, attemptTimeoutMs: 100 });
    let finish: () => void = () => {};
    const hung = p.execute(() => new Promise<void>((resolve) => { finish = resolve; }));
    hung.catch(() => {});
    await clock.advance(100);
    await assert.rejects(hung, DeadlineExceededError);
    await assert.rejects(p.execute(() => 'x'), BulkheadFullError, 'the abandoned request still holds the slot');
    finish();
    await clock.advance(0);
    assert.equal(await p.execute(() => 'x'), 'x');
  });

  it('a bulkhead rejection does not count against the breaker', async () => {
    const clock = new ManualClock();
    const { p } = policy(clock, {
      bulkhead: { concurrencyMax: 1, queueMax: 0 },
      breaker: { window: { kind: 'count', calls: 2 }, minimumCalls: 1, failureRateThreshold: 0.5, slowCallRateThreshold: 1, slowCallDurationMs: Infinity, openWaitMs: 1000, halfOpenPermittedCalls: 1 },
      retry: false,
    });
    let release: () => void = () => {};
    const first = p.execute(() => new Promise<void>((resolve) => { release = resolve; }));
    for (let i = 0; i < 5; i += 1) await assert.rejects(p.execute(() => 'x'), BulkheadFullError);
    release();
    await first;
    assert.equal(p.breaker?.state, 'closed');
    assert.equal(p.breaker?.snapshot().calls, 1);
  });

  it('Bulkhead alone: abort while queued, invariant on over-release, bounds checked', async () => {
    const b = new Bulkhead({ concurrencyMax: 1, queueMax: 2 });
    assert.equal(b.tryAcquire(), true);
    const controller = new AbortController();
    const w1 = b.acquire(controller.signal);
    const w2 = b.acquire();
    await assert.rejects(b.acquire(), BulkheadRejection);
    controller.abort(new Error('gone'));
    await assert.rejects(w1, /gone/);
    assert.equal(b.queued, 1);
    b.release();
    await w2;
    assert.equal(b.running, 1);
    b.release();
    assert.equal(b.running, 0);
    assert.throws(() => { b.release(); }, /invariant/);
    assert.throws(() => new Bulkhead({ concurrencyMax: 0, queueMax: 0 }), RangeError);
    assert.throws(() => new Bulkhead({ concurrencyMax: 1, queueMax: -1 }), RangeError);
  });
});

describe('policy options', () => {
  it('rejects unbounded or inconsistent settings', () => {
    const clock = new ManualClock();
    assert.throws(() => policy(clock, { attemptTimeoutMs: 0 }), RangeError);
    assert.throws(() => policy(clock, { attemptTimeoutMs: 1000, callTimeoutMs: 500 }), RangeError);
    assert.throws(() => policy(clock, { retry: { attemptsMax: 11, backoff: { baseMs: 1, capMs: 1, jitter: 'full' }, budget: { ratio: 0.2, retriesMin: 1, windowMs: 1000 } } }), RangeError);
    assert.throws(() => policy(clock, { retry: { attemptsMax: 3, backoff: { baseMs: 10, capMs: 5, jitter: 'full' }, budget: { ratio: 0.2, retriesMin: 1, windowMs: 1000 } } }), RangeError);
    assert.throws(() => new RetryBudget({ ratio: -1, retriesMin: 0, windowMs: 1000 }), RangeError);
  });
});

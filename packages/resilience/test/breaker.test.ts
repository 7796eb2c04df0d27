/**
 * The breaker's state machine through every transition, for a count window and a time
 * window, on a manual clock: closed → open (failure rate, slow-call rate, only once the
 * minimum number of calls is reached), open → half_open after the wait, half_open → closed
 * on good trials, half_open → open on bad ones, and the window sliding.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { BrokenCircuitError, handleAll, retry, wrap } from 'cockatiel';
import {
  CircuitBreaker,
  CircuitOpenError,
  ManualClock,
  NOT_PERMITTED,
  type BreakerTransition,
  type CircuitBreakerOptions,
  type SlidingWindow,
} from '../src/index.ts';

const FAST_MS = 10;
const SLOW_MS = 100;

function make(window: SlidingWindow, overrides: Partial<CircuitBreakerOptions> = {}) {
  const clock = new ManualClock();
  const transitions: BreakerTransition[] = [];
  const breaker = new CircuitBreaker({
    name: 'dep',
    window,
    minimumCalls: 4,
    failureRateThreshold: 0.5,
    slowCallRateThreshold: 0.5,
    slowCallDurationMs: SLOW_MS,
    openWaitMs: 1000,
    halfOpenPermittedCalls: 2,
    clock,
    ...overrides,
  });
  breaker.onStateChange((t) => transitions.push(t));
  /** One call's outcome: 'f' failed, 's' succeeded, 'S' succeeded slowly, 'F' failed slowly. */
  const call = (kind: 'f' | 's' | 'S' | 'F'): boolean => {
    const permit = breaker.tryAcquire();
    if (permit === NOT_PERMITTED) return false;
    breaker.record(permit, kind === 'f' || kind === 'F', kind === 'S' || kind === 'F' ? SLOW_MS : FAST_MS);
    return true;
  };
  const calls = (kinds: string): void => {
    for (const k of kinds) assert.ok(call(k as 'f'), `call ${k} was not permitted (state ${breaker.state})`);
  };
  const path = () => transitions.map((t) => `${t.from}>${t.to}`);
  return { clock, breaker, call, calls, path, transitions };
}

const WINDOWS: Array<[string, SlidingWindow]> = [
  ['count window', { kind: 'count', calls: 10 }],
  ['time window', { kind: 'time', durationMs: 10_000, buckets: 10 }],
];

for (const [label, window] of WINDOWS) {
  describe(`breaker, ${label}`, () => {
    it('stays closed below the minimum number of calls, whatever the failure rate', () => {
      const b = make(window);
      b.calls('fff');
      assert.equal(b.breaker.state, 'closed');
      assert.deepEqual(b.path(), []);
      assert.equal(b.breaker.snapshot().failureRate, 1);
    });

    it('stays closed at the minimum when the failure rate is below the threshold', () => {
      const b = make(window);
      b.calls('fsss');
      assert.equal(b.breaker.state, 'closed');
      b.calls('ss');
      assert.equal(b.breaker.state, 'closed');
    });

    it('closed → open on the failure rate once the minimum is reached', () => {
      const b = make(window);
      b.calls('fff');
      assert.equal(b.breaker.state, 'closed');
      b.calls('s'); // 3 of 4 failed: 0.75 ≥ 0.5
      assert.equal(b.breaker.state, 'open');
      assert.deepEqual(b.path(), ['closed>open']);
      const t = b.transitions[0]!;
      assert.equal(t.calls, 4);
      assert.equal(t.failureRate, 0.75);
      assert.equal(t.slowCallRate, 0);
    });

    it('opens at exactly the threshold (≥, not >)', () => {
      const b = make(window);
      b.calls('ssff');
      assert.equal(b.breaker.state, 'open');
    });

    it('opens at exactly the threshold where threshold × calls rounds up (0.55 × 100 = 55.000…01)', () => {
      for (const [rate, calls] of [[0.55, 100], [0.28, 25], [0.56, 25], [0.68, 50]] as const) {
        const failed = Math.round(rate * calls);
        const b = make(window.kind === 'count' ? { kind: 'count', calls } : window, { minimumCalls: calls, failureRateThreshold: rate, slowCallRateThreshold: 1 });
        b.calls('f'.repeat(failed) + 's'.repeat(calls - failed));
        assert.equal(b.breaker.state, 'open', `${failed}/${calls} at threshold ${rate}`);
      }
      // Half-open likewise: 14 failed trials of 25 at 0.56 reopen it, where it closed.
      const h = make(window, { minimumCalls: 1, failureRateThreshold: 0.56, slowCallRateThreshold: 1, halfOpenPermittedCalls: 25 });
      h.calls('f');
      assert.equal(h.breaker.state, 'open');
      h.clock.set(h.clock.now() + 1000);
      h.calls('f'.repeat(14));
      assert.equal(h.breaker.state, 'open', '14 of 25 trials failed');
      assert.deepEqual(h.path(), ['closed>open', 'open>half_open', 'half_open>open']);
    });

    it('closed → open on the slow-call rate with no failure at all', () => {
      const b = make(window);
      b.calls('sSsS');
      assert.equal(b.breaker.state, 'open');
      assert.equal(b.transitions[0]!.slowCallRate, 0.5);
      assert.equal(b.transitions[0]!.failureRate, 0);
    });

    it('a slow failure counts towards both rates', () => {
      const b = make(window, { failureRateThreshold: 1, slowCallRateThreshold: 1 });
      b.calls('FFF');
      assert.equal(b.breaker.state, 'closed');
      b.calls('F');
      assert.equal(b.breaker.state, 'open');
      assert.equal(b.transitions[0]!.failureRate, 1);
      assert.equal(b.transitions[0]!.slowCallRate, 1);
    });

    it('slowCallDurationMs = Infinity turns the slow rule off', () => {
      const b = make(window, { slowCallDurationMs: Infinity });
      b.calls('SSSSSS');
      assert.equal(b.breaker.state, 'closed');
    });

    it('open rejects every call until the wait has passed, then → half_open', () => {
      const b = make(window);
      b.calls('ffff');
      assert.equal(b.breaker.tryAcquire(), NOT_PERMITTED);
      b.clock.set(b.clock.now() + 999);
      assert.equal(b.breaker.tryAcquire(), NOT_PERMITTED);
      assert.equal(b.breaker.state, 'open');
      b.clock.set(b.clock.now() + 1);
      assert.equal(b.breaker.state, 'half_open');
      assert.deepEqual(b.path(), ['closed>open', 'open>half_open']);
    });

    it('half_open admits a bounded number of trials and rejects the surplus', () => {
      const b = make(window, { halfOpenPermittedCalls: 3 });
      b.calls('ffff');
      b.clock.set(b.clock.now() + 1000);
      const permits = [b.breaker.tryAcquire(), b.breaker.tryAcquire(), b.breaker.tryAcquire()];
      assert.ok(permits.every((p) => p !== NOT_PERMITTED));
      assert.equal(b.breaker.tryAcquire(), NOT_PERMITTED, 'the 4th caller is rejected, not queued');
      // A trial that was never made gives its slot back.
      b.breaker.release(permits[2]!);
      assert.notEqual(b.breaker.tryAcquire(), NOT_PERMITTED);
    });

    it('half_open → closed when every trial succeeds, with an empty window', () => {
      const b = make(window);
      b.calls('ffff');
      b.clock.set(b.clock.now() + 1000);
      b.calls('s');
      assert.equal(b.breaker.state, 'half_open');
      b.calls('s');
      assert.equal(b.breaker.state, 'closed');
      assert.deepEqual(b.path(), ['closed>open', 'open>half_open', 'half_open>closed']);
      assert.equal(b.breaker.snapshot().calls, 0);
      // The window starts afresh: three failures are below the minimum again.
      b.calls('fff');
      assert.equal(b.breaker.state, 'closed');
    });

    it('half_open → open on a failed trial, and the wait starts again', () => {
      const b = make(window);
      b.calls('ffff');
      b.clock.set(b.clock.now() + 1000);
      b.calls('f'); // 1 of 2 trials failed: 0.5 ≥ 0.5 is certain already
      assert.equal(b.breaker.state, 'open');
      assert.deepEqual(b.path(), ['closed>open', 'open>half_open', 'half_open>open']);
      b.clock.set(b.clock.now() + 999);
      assert.equal(b.breaker.state, 'open');
      b.clock.set(b.clock.now() + 1);
      assert.equal(b.breaker.state, 'half_open');
    });

    it('half_open → open on slow trials', () => {
      const b = make(window);
      b.calls('ffff');
      b.clock.set(b.clock.now() + 1000);
      b.calls('S');
      assert.equal(b.breaker.state, 'open');
      assert.equal(b.transitions.at(-1)!.slowCallRate, 1);
    });

    it('half_open decides only when the outcome is certain', () => {
      const b = make(window, { halfOpenPermittedCalls: 4, failureRateThreshold: 0.5 });
      b.calls('ffff');
      b.clock.set(b.clock.now() + 1000);
      b.calls('sf'); // 1 failure of 4 trials so far: not yet 2
      assert.equal(b.breaker.state, 'half_open');
      b.calls('s');
      assert.equal(b.breaker.state, 'half_open');
      b.calls('f'); // 2 of 4
      assert.equal(b.breaker.state, 'open');
    });

    it('a permit from before a transition records nothing', () => {
      const b = make(window);
      const stale = b.breaker.tryAcquire();
      b.calls('ffff');
      assert.equal(b.breaker.state, 'open');
      b.clock.set(b.clock.now() + 1000);
      assert.equal(b.breaker.state, 'half_open');
      // The closed-era call ends now, failing: it must not count as a trial.
      b.breaker.record(stale, true, FAST_MS);
      assert.equal(b.breaker.state, 'half_open');
      b.calls('ss');
      assert.equal(b.breaker.state, 'closed');
    });

    it('reset() closes the breaker by hand', () => {
      const b = make(window);
      b.calls('ffff');
      b.breaker.reset();
      assert.equal(b.breaker.state, 'closed');
      assert.notEqual(b.breaker.tryAcquire(), NOT_PERMITTED);
    });
  });
}

describe('breaker windows slide', () => {
  it('count window: the oldest outcome leaves as a new one arrives', () => {
    const b = make({ kind: 'count', calls: 4 }, { failureRateThreshold: 0.75 });
    b.calls('fsss'); // 1/4
    b.calls('f'); // s s s f: the first f left
    b.calls('f'); // s s f f
    assert.equal(b.breaker.state, 'closed', 'without eviction it would be 3/6 … still closed, but see next');
    assert.equal(b.breaker.snapshot().failures, 2);
    assert.equal(b.breaker.snapshot().calls, 4);
    b.calls('f'); // s f f f: 0.75 (without eviction 4/7 = 0.57 would stay closed)
    assert.equal(b.breaker.state, 'open');
  });

  it('time window: outcomes older than the window no longer count', () => {
    const b = make({ kind: 'time', durationMs: 1000, buckets: 10 }, { minimumCalls: 3 });
    const t0 = 1_000_000; // the manual clock's start, a multiple of the bucket width
    b.clock.set(t0);
    b.calls('f');
    b.clock.set(t0 + 100);
    b.calls('f');
    b.clock.set(t0 + 1050); // the first failure's bucket has slid out
    b.calls('s');
    assert.equal(b.breaker.snapshot().calls, 2);
    b.calls('s'); // f s s: 1/3 < 0.5 (with the stale failure it would be 2/4 and open)
    assert.equal(b.breaker.state, 'closed');
    b.calls('f'); // f s s f: 2/4
    assert.equal(b.breaker.state, 'open');
  });

  it('time window: a quiet spell longer than the window empties it', () => {
    const b = make({ kind: 'time', durationMs: 1000, buckets: 10 });
    b.calls('fff');
    b.clock.set(b.clock.now() + 60_000);
    assert.equal(b.breaker.snapshot().calls, 0);
    b.calls('fss');
    assert.equal(b.breaker.state, 'closed');
  });

  it('time window with a single bucket behaves as a tumbling window', () => {
    const b = make({ kind: 'time', durationMs: 1000, buckets: 1 });
    b.clock.set(2_000_000);
    b.calls('fff');
    b.clock.set(2_001_000);
    b.calls('f');
    assert.equal(b.breaker.state, 'closed');
    assert.equal(b.breaker.snapshot().calls, 1);
  });
});

describe('breaker options and cockatiel interop', () => {
  it('rejects configurations that could never work', () => {
    const base = { name: 'x', minimumCalls: 1, failureRateThreshold: 0.5, slowCallRateThreshold: 0.5, slowCallDurationMs: 100, openWaitMs: 10, halfOpenPermittedCalls: 1 };
    const bad: Array<Partial<CircuitBreakerOptions>> = [
      { window: { kind: 'count', calls: 0 } },
      { window: { kind: 'count', calls: 5 }, minimumCalls: 6 },
      { window: { kind: 'time', durationMs: 5, buckets: 10 } },
      { window: { kind: 'time', durationMs: 1000, buckets: 0 } },
      { failureRateThreshold: 0 },
      { failureRateThreshold: 1.5 },
      { slowCallRateThreshold: 0 },
      { slowCallDurationMs: 0 },
      { openWaitMs: -1 },
      { halfOpenPermittedCalls: 0 },
      { minimumCalls: 0 },
    ];
    for (const o of bad) {
      assert.throws(() => new CircuitBreaker({ ...base, window: { kind: 'count', calls: 10 }, ...o }), RangeError, JSON.stringify(o));
    }
  });

  it('implements cockatiel IPolicy: composes with wrap() and throws a BrokenCircuitError when open', async () => {
    const clock = new ManualClock();
    const breaker = new CircuitBreaker({ name: 'dep', window: { kind: 'count', calls: 2 }, minimumCalls: 2, failureRateThreshold: 1, slowCallRateThreshold: 1, slowCallDurationMs: Infinity, openWaitMs: 1000, halfOpenPermittedCalls: 1, clock });
    let calls = 0;
    const policy = wrap(retry(handleAll, { maxAttempts: 1 }), breaker);
    await assert.rejects(policy.execute(() => { calls += 1; throw new Error('boom'); }), /boom/);
    assert.equal(breaker.state, 'open');
    assert.equal(calls, 2, 'the retry ran a second attempt through the breaker');
    const error = await breaker.execute(() => 'never').catch((e: unknown) => e);
    assert.ok(error instanceof CircuitOpenError);
    assert.ok(error instanceof BrokenCircuitError);
    clock.set(clock.now() + 1000);
    assert.equal(await breaker.execute(() => 'ok'), 'ok');
    assert.equal(breaker.state, 'closed');
  });
});

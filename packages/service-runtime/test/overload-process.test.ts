/**
 * Overload with real processes: a service with a known capacity (2 workers × 10 ms = 200
 * requests/s, in a child process) is offered 5× that, open loop, in a mix of the four
 * priority classes. Moving money (critical, 10% of the offer = half the capacity) must be
 * served ahead of the lower classes, which are shed with 503 + Retry-After.
 *
 * The assertions are about order and shape, never about time: on a shared 2-core machine a
 * latency or success threshold measures the neighbours. `npm run bench:resilience` measures
 * critical p99 and success under the same 5× overload and reports them as figures.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { runOpenLoop } from '@ledgerline/resilience/fault';
import { OVERLOAD_MIX, spawnCapacityService } from './fixtures/spawn-capacity-service.ts';

const SEED = process.env.RESILIENCE_SEED !== undefined ? Number(process.env.RESILIENCE_SEED) : (Math.random() * 2 ** 32) >>> 0;
const CAPACITY_RPS = 200;
const OVERLOAD = 5;


describe('overload at 5× capacity, real processes', { timeout: 60_000 }, () => {
  it('critical is served first while the lower classes are shed', async () => {
    console.log(`[resilience] overload-process.test.ts seed=${SEED} (replay with RESILIENCE_SEED=${SEED})`);
    const service = await spawnCapacityService({ CAPACITY_SLOTS: '2', SERVICE_TIME_MS: '10' });
    try {
      const figures = await runOpenLoop({ baseUrl: service.url, ratePerSecond: CAPACITY_RPS * OVERLOAD, durationMs: 3000, warmupMs: 500, classes: OVERLOAD_MIX, seed: SEED });
      for (const [name, f] of Object.entries(figures)) {
        console.log(`[overload] ${name.padEnd(8)} sent ${f.sent} ok ${f.ok} (${f.successPct.toFixed(1)}%) shed ${f.shed} errors ${f.errors} p50 ${f.latencyMsP50.toFixed(1)} ms p99 ${f.latencyMsP99.toFixed(1)} ms`);
      }
      const { critical, high, low } = figures;
      assert.ok(critical && high && low);
      assert.ok(critical.ok > 0, 'critical requests are served');
      assert.ok(critical.successPct > low.successPct, `critical ${critical.successPct}% served, low ${low.successPct}%`);
      assert.ok(low.successPct < 50, `low mostly shed (${low.successPct}% served)`);
      assert.ok(low.shed > 0 && low.successPct <= high.successPct && high.successPct <= critical.successPct, 'lower classes are shed first');
      for (const f of Object.values(figures)) {
        assert.equal(f.errors, 0, 'no connection errors: refusals are answers, not failures');
        assert.equal(f.other, 0);
        assert.ok(f.retryAfterOnEvery503, 'every 503 carries Retry-After');
      }
      // What was served never exceeded the capacity (the shedder did not over-admit).
      const served = Object.values(figures).reduce((a, f) => a + f.ok, 0);
      assert.ok(served <= CAPACITY_RPS * 3 * 1.1, `served ${served} in 3 s`);
    } finally {
      await service.stop();
    }
  });
});

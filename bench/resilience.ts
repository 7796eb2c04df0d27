/**
 * `npm run bench:resilience`: what the resilience layer costs and what it buys
 * (REQUIREMENTS §3 and §7: a breaker decision well under 1 ms; MTTR under 30 s; spikes of 5×
 * absorbed by shedding, not by failing).
 *
 *   npm run bench:resilience -- [--decisions 1000000] [--policy-calls 200000] [--seconds 3]
 *                               [--capacity-slots 2] [--service-time-ms 10] [--overload 5] [--seed N]
 *
 * 1. Breaker decision: `tryAcquire()` + `record()` on a closed breaker, each timed alone with
 *    hrtime (the timer's own ~30-60 ns is included, so the figure is an upper bound), for a
 *    count window and a time window.
 * 2. Policy overhead: the full chain (retry with budget, breaker, bulkhead, per-attempt
 *    timeout, fallback) around a call that does nothing, minus nothing: what a caller pays.
 *    A bare `await` of the same call is reported beside it.
 * 3. Outage drill (the fault server in a child process): time for the breaker to open after
 *    the dependency starts failing, and time to recovery after it heals.
 * 4. Overload: the capacity fixture (child process, CAPACITY_SLOTS × 1000 / SERVICE_TIME_MS
 *    requests/s) offered `--overload`× its capacity, open loop, 10% critical / 20% high /
 *    30% normal / 40% low. Then (unless --no-baseline) the same with the shedder off: requests
 *    queue FIFO for the workers, which is what the shedder is there to prevent.
 *
 * Progress goes to stderr; the last line of stdout is one JSON object.
 */
import { cpus, loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import { CircuitBreaker, DependencyPolicy, NOT_PERMITTED, seededRandom, type SlidingWindow } from '@ledgerline/resilience';
import { runOpenLoop, runOutageScenario } from '@ledgerline/resilience/fault';
import { OVERLOAD_MIX, spawnCapacityService } from '../packages/service-runtime/test/fixtures/spawn-capacity-service.ts';
import { abortOnSignals, benchLog, exitWhenDone, intArg, quantile, seedArg } from './common.ts';

const log = benchLog('resilience');
const { values } = parseArgs({
  options: {
    decisions: { type: 'string' },
    'policy-calls': { type: 'string' },
    seconds: { type: 'string' },
    'capacity-slots': { type: 'string' },
    'service-time-ms': { type: 'string' },
    overload: { type: 'string' },
    seed: { type: 'string' },
    'no-baseline': { type: 'boolean', default: false },
  },
});

const decisions = intArg('decisions', values.decisions, 1_000_000, 1000);
const policyCalls = intArg('policy-calls', values['policy-calls'], 200_000, 1000);
const seconds = intArg('seconds', values.seconds, 3, 1);
const capacitySlots = intArg('capacity-slots', values['capacity-slots'], 2, 1);
const serviceTimeMs = intArg('service-time-ms', values['service-time-ms'], 10, 1);
const overload = intArg('overload', values.overload, 5, 1);
const seed = seedArg(values.seed);

const round = (x: number, digits = 1): number => Math.round(x * 10 ** digits) / 10 ** digits;

function breakerDecisionNs(window: SlidingWindow): { p50: number; p99: number; p999: number; mean: number } {
  const breaker = new CircuitBreaker({
    name: 'bench', window, minimumCalls: 100, failureRateThreshold: 0.5, slowCallRateThreshold: 0.5,
    slowCallDurationMs: 1000, openWaitMs: 1000, halfOpenPermittedCalls: 5,
  });
  const samples = new Float64Array(decisions);
  const random = seededRandom(seed);
  // Failures well under the threshold, so the breaker stays closed and every call decides.
  const failed = Array.from({ length: 1024 }, () => random() < 0.1);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < decisions; i += 1) {
    const start = process.hrtime.bigint();
    const permit = breaker.tryAcquire();
    if (permit !== NOT_PERMITTED) breaker.record(permit, failed[i & 1023] ?? false, 5);
    samples[i] = Number(process.hrtime.bigint() - start);
  }
  const totalNs = Number(process.hrtime.bigint() - t0);
  if (breaker.state !== 'closed') throw new Error('invariant: the benchmark breaker opened');
  samples.sort();
  return { p50: quantile(samples, 0.5), p99: quantile(samples, 0.99), p999: quantile(samples, 0.999), mean: totalNs / decisions };
}

async function policyOverheadUs(): Promise<{ p50: number; p99: number; bareP99: number }> {
  const policy = new DependencyPolicy({
    name: 'bench',
    attemptTimeoutMs: 1000,
    callTimeoutMs: 5000,
    retry: { attemptsMax: 3, backoff: { baseMs: 10, capMs: 100, jitter: 'full' }, budget: { ratio: 0.2, retriesMin: 10, windowMs: 10_000 } },
    breaker: { window: { kind: 'time', durationMs: 10_000, buckets: 10 }, minimumCalls: 20, failureRateThreshold: 0.5, slowCallRateThreshold: 0.5, slowCallDurationMs: 500, openWaitMs: 5000, halfOpenPermittedCalls: 3 },
    bulkhead: { concurrencyMax: 64, queueMax: 64 },
    random: seededRandom(seed),
  });
  const fn = (): Promise<number> => Promise.resolve(1);
  const fallback = (): number => 0;
  const withPolicy = new Float64Array(policyCalls);
  const bare = new Float64Array(policyCalls);
  for (let i = 0; i < policyCalls; i += 1) {
    let start = process.hrtime.bigint();
    await policy.execute(fn, { idempotent: true, fallback });
    withPolicy[i] = Number(process.hrtime.bigint() - start) / 1000;
    start = process.hrtime.bigint();
    await fn();
    bare[i] = Number(process.hrtime.bigint() - start) / 1000;
  }
  withPolicy.sort();
  bare.sort();
  return { p50: quantile(withPolicy, 0.5), p99: quantile(withPolicy, 0.99), bareP99: quantile(bare, 0.99) };
}

async function main(): Promise<void> {
  abortOnSignals(log);
  const loadStart = loadavg()[0] ?? 0;
  log(`seed ${seed}; load average ${loadavg().map((x) => x.toFixed(2)).join(' ')} on ${cpus().length} CPUs`);

  log(`breaker decisions: ${decisions} on a count window, then on a time window`);
  const countWindow = breakerDecisionNs({ kind: 'count', calls: 100 });
  const timeWindow = breakerDecisionNs({ kind: 'time', durationMs: 10_000, buckets: 10 });
  log(`  count window: p50 ${countWindow.p50} ns p99 ${countWindow.p99} ns mean ${countWindow.mean.toFixed(0)} ns`);
  log(`  time window:  p50 ${timeWindow.p50} ns p99 ${timeWindow.p99} ns mean ${timeWindow.mean.toFixed(0)} ns`);

  log(`policy overhead: ${policyCalls} calls through the full chain`);
  const overhead = await policyOverheadUs();
  log(`  p50 ${overhead.p50.toFixed(2)} µs p99 ${overhead.p99.toFixed(2)} µs (bare await p99 ${overhead.bareP99.toFixed(2)} µs)`);

  log('outage drill: healthy → failing → slow → healed');
  const windowMs = 2000;
  const outage = await runOutageScenario({
    callers: 4, intervalMs: 5, healthyMs: 1000, failingMs: 2000, slowMs: 2000, slowLatencyMs: 200, recoveryWaitMaxMs: 30_000, seed,
    log: (line) => { log(`  ${line}`); },
    policy: {
      attemptTimeoutMs: 400,
      callTimeoutMs: 1000,
      retry: { attemptsMax: 3, backoff: { baseMs: 10, capMs: 100, jitter: 'full' }, budget: { ratio: 0.2, retriesMin: 5, windowMs: 1000 } },
      breaker: { window: { kind: 'time', durationMs: windowMs, buckets: 10 }, minimumCalls: 10, failureRateThreshold: 0.5, slowCallRateThreshold: 0.5, slowCallDurationMs: 100, openWaitMs: 1000, halfOpenPermittedCalls: 3 },
      bulkhead: { concurrencyMax: 16, queueMax: 16 },
    },
  });
  const callerErrors = Object.values(outage.phases).reduce((a, p) => a + p.errors, 0);
  log(`  time to open ${outage.timeToOpenMs?.toFixed(0)} ms, recovery ${outage.recoveryMs?.toFixed(0)} ms, caller errors ${callerErrors}`);

  const capacityRps = (capacitySlots * 1000) / serviceTimeMs;
  const loadMid = loadavg()[0] ?? 0;
  log(`overload: capacity ${capacityRps} req/s offered ${overload}× = ${capacityRps * overload} req/s for ${seconds} s`);
  const service = await spawnCapacityService({ CAPACITY_SLOTS: String(capacitySlots), SERVICE_TIME_MS: String(serviceTimeMs) });
  let figures;
  try {
    figures = await runOpenLoop({ baseUrl: service.url, ratePerSecond: capacityRps * overload, durationMs: seconds * 1000, warmupMs: 500, classes: OVERLOAD_MIX, seed });
  } finally {
    await service.stop();
  }
  for (const [name, f] of Object.entries(figures)) {
    log(`  ${name.padEnd(8)} sent ${f.sent} ok ${f.ok} (${f.successPct.toFixed(1)}%) shed ${f.shed} errors ${f.errors} p50 ${f.latencyMsP50.toFixed(1)} ms p99 ${f.latencyMsP99.toFixed(1)} ms`);
  }
  const critical = figures.critical;
  let baseline: Awaited<ReturnType<typeof runOpenLoop>> | undefined;
  if (!values['no-baseline']) {
    log('baseline: the same overload with load shedding off (FIFO)');
    const fifo = await spawnCapacityService({ CAPACITY_SLOTS: String(capacitySlots), SERVICE_TIME_MS: String(serviceTimeMs), LOAD_SHEDDING: '0' });
    try {
      baseline = await runOpenLoop({ baseUrl: fifo.url, ratePerSecond: capacityRps * overload, durationMs: seconds * 1000, warmupMs: 500, classes: OVERLOAD_MIX, seed, timeoutMs: 5000 });
    } finally {
      await fifo.stop();
    }
    for (const [name, f] of Object.entries(baseline)) {
      log(`  ${name.padEnd(8)} sent ${f.sent} ok ${f.ok} (${f.successPct.toFixed(1)}%) errors ${f.errors} p99 ${f.latencyMsP99.toFixed(1)} ms`);
    }
  }
  const perClass = Object.fromEntries(Object.entries(figures).map(([name, f]) => [name, { success_pct: round(f.successPct), latency_ms_p99: round(f.latencyMsP99), shed: f.shed, sent: f.sent }]));

  const summary = {
    breaker_decision_ns_p99: countWindow.p99,
    breaker_decision_ns_p99_time_window: timeWindow.p99,
    breaker_decision_ns_p50: countWindow.p50,
    breaker_decision_ns_mean: round(countWindow.mean),
    policy_overhead_us_p99: round(overhead.p99, 2),
    policy_overhead_us_p50: round(overhead.p50, 2),
    bare_await_us_p99: round(overhead.bareP99, 2),
    time_to_open_ms: outage.timeToOpenMs === null ? null : round(outage.timeToOpenMs),
    breaker_window_ms: windowMs,
    recovery_s: outage.recoveryMs === null ? null : round(outage.recoveryMs / 1000, 3),
    outage_caller_errors: callerErrors,
    outage_closed_while_slow: outage.closedWhileSlow,
    overload_factor: overload,
    capacity_rps: capacityRps,
    critical_latency_ms_p99: round(critical?.latencyMsP99 ?? 0),
    critical_success_pct: round(critical?.successPct ?? 0, 2),
    classes: perClass,
    baseline_no_shedding_critical_latency_ms_p99: baseline?.critical === undefined ? null : round(baseline.critical.latencyMsP99),
    baseline_no_shedding_critical_success_pct: baseline?.critical === undefined ? null : round(baseline.critical.successPct, 2),
    seed,
    cpu_count: cpus().length,
    loadavg_1m_start: round(loadStart, 2),
    loadavg_1m_before_overload: round(loadMid, 2),
    loadavg_1m_end: round(loadavg()[0] ?? 0, 2),
    node: process.version,
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

exitWhenDone(main(), log);

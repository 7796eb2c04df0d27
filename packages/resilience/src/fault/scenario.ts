/**
 * The outage drill, shared by the real-process test and `npm run bench:resilience`: a
 * dependency in a child process (the fault server) is called under load through a
 * `DependencyPolicy` with a fallback, while it goes healthy → failing → slow → healthy.
 * It measures how long the breaker takes to open after the failure starts, whether callers
 * ever saw an error (the fallback should answer for every call), and the time to recovery
 * after the dependency heals (until the breaker has closed again on its own).
 */
import { DependencyPolicy, type DependencyPolicyOptions } from '../policy.ts';
import { httpCall, type HttpResult } from '../http.ts';
import type { BreakerState } from '../breaker.ts';
import { seededRandom } from '../random.ts';
import { spawnFault } from './process.ts';

export interface OutageScenarioOptions {
  /** Concurrent callers, each pacing itself by `intervalMs` between calls. */
  callers: number;
  intervalMs: number;
  healthyMs: number;
  failingMs: number;
  slowMs: number;
  /** The dependency's latency in the slow phase; above the policy's slow-call threshold. */
  slowLatencyMs: number;
  /** Give up waiting for recovery after this long. */
  recoveryWaitMaxMs: number;
  seed: number;
  policy: Omit<DependencyPolicyOptions, 'name' | 'observer' | 'random' | 'clock'>;
  log?: (line: string) => void;
}

type Phase = 'healthy' | 'failing' | 'slow' | 'recovering';

export interface PhaseFigures {
  calls: number;
  primary: number;
  fallback: number;
  errors: number;
  /** The callers' own latency (fallbacks included), p99 in ms. */
  latencyMsP99: number;
}

export interface OutageScenarioResult {
  seed: number;
  /** From the moment the dependency started failing to the breaker opening. */
  timeToOpenMs: number | null;
  /** From the moment the dependency healed to the breaker closing again. */
  recoveryMs: number | null;
  /** Whether the breaker closed while the dependency was still slow (it should not). */
  closedWhileSlow: boolean;
  transitions: Array<{ atMs: number; from: BreakerState; to: BreakerState }>;
  phases: Record<Phase, PhaseFigures>;
}

export async function runOutageScenario(options: OutageScenarioOptions): Promise<OutageScenarioResult> {
  const log = options.log ?? (() => {});
  const fault = await spawnFault('server', ['--seed', String(options.seed)]);
  const baseUrl = fault.url;
  if (baseUrl === undefined) throw new Error('invariant: a fault server has a URL');
  // Warm up (connections, JIT) outside the measurement, so the healthy phase is healthy.
  for (let i = 0; i < 20; i += 1) await (await fetch(`${baseUrl}/warmup`)).text();
  const startMs = performance.now();
  const at = (): number => performance.now() - startMs;
  const transitions: OutageScenarioResult['transitions'] = [];
  let phase: Phase = 'healthy';
  const samples: Record<Phase, { latencies: number[]; primary: number; fallback: number; errors: number }> = {
    healthy: { latencies: [], primary: 0, fallback: 0, errors: 0 },
    failing: { latencies: [], primary: 0, fallback: 0, errors: 0 },
    slow: { latencies: [], primary: 0, fallback: 0, errors: 0 },
    recovering: { latencies: [], primary: 0, fallback: 0, errors: 0 },
  };
  let failingAtMs = 0;
  let healedAtMs = 0;
  let closedWhileSlow = false;
  let closedAfterHeal: (() => void) | undefined;
  const policy = new DependencyPolicy({
    ...options.policy,
    name: 'downstream',
    random: seededRandom(options.seed),
    observer: {
      transition: (t) => {
        transitions.push({ atMs: at(), from: t.from, to: t.to });
        log(`breaker ${t.from} → ${t.to} at ${at().toFixed(0)} ms (phase ${phase})`);
        if (t.to === 'closed' && phase === 'slow') closedWhileSlow = true;
        if (t.to === 'closed' && phase === 'recovering') closedAfterHeal?.();
      },
    },
  });
  const url = `${baseUrl}/v1/quote`;
  const stale = (): HttpResult => ({ status: 200, headers: new Headers({ 'x-stale': '1' }), body: '{"stale":true}', fallback: true });
  let stop = false;
  const caller = async (): Promise<void> => {
    while (!stop) {
      const p = phase;
      const t0 = performance.now();
      try {
        const r = await httpCall(policy, url, { fallback: stale });
        if (r.fallback === true) samples[p].fallback += 1;
        else samples[p].primary += 1;
      } catch {
        samples[p].errors += 1;
      }
      samples[p].latencies.push(performance.now() - t0);
      await new Promise((r) => setTimeout(r, options.intervalMs));
    }
  };
  const callers = Array.from({ length: options.callers }, () => caller());
  const wait = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
  try {
    await wait(options.healthyMs);
    await fault.set({ errorRate: 1, errorStatus: 503 });
    failingAtMs = at();
    phase = 'failing';
    log(`dependency failing at ${failingAtMs.toFixed(0)} ms`);
    await wait(options.failingMs);
    await fault.set({ heal: true, latencyMs: options.slowLatencyMs });
    phase = 'slow';
    log(`dependency slow (${options.slowLatencyMs} ms) at ${at().toFixed(0)} ms`);
    await wait(options.slowMs);
    const closed = new Promise<void>((resolve) => { closedAfterHeal = resolve; });
    await fault.set({ heal: true });
    healedAtMs = at();
    phase = 'recovering';
    log(`dependency healed at ${healedAtMs.toFixed(0)} ms`);
    let giveUp: NodeJS.Timeout | undefined;
    const recovered = await Promise.race([
      closed.then(() => true),
      new Promise<boolean>((resolve) => { giveUp = setTimeout(() => { resolve(false); }, options.recoveryWaitMaxMs); }),
    ]);
    clearTimeout(giveUp);
    // A little traffic after recovery, to see the primary answering again.
    if (recovered) await wait(200);
  } finally {
    stop = true;
    await Promise.all(callers);
    await fault.stop();
  }
  const opened = transitions.find((t) => t.to === 'open' && t.atMs >= failingAtMs);
  const closedAgain = transitions.find((t) => t.to === 'closed' && t.atMs >= healedAtMs);
  const figures = (s: (typeof samples)[Phase]): PhaseFigures => {
    const sorted = s.latencies.sort((a, b) => a - b);
    return {
      calls: sorted.length,
      primary: s.primary,
      fallback: s.fallback,
      errors: s.errors,
      latencyMsP99: sorted.length === 0 ? 0 : (sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))] ?? 0),
    };
  };
  return {
    seed: options.seed,
    timeToOpenMs: opened === undefined ? null : opened.atMs - failingAtMs,
    recoveryMs: closedAgain === undefined ? null : closedAgain.atMs - healedAtMs,
    closedWhileSlow,
    transitions,
    phases: { healthy: figures(samples.healthy), failing: figures(samples.failing), slow: figures(samples.slow), recovering: figures(samples.recovering) },
  };
}

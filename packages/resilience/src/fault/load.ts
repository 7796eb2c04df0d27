/**
 * An open-loop HTTP load generator: requests are sent on a fixed schedule whatever the
 * server does, the way real clients keep arriving during an overload. (A closed loop,
 * where each client waits for its answer before the next request, slows down with the
 * server and never overloads it.) Latency is measured from each request's scheduled time,
 * so a request delayed by the generator itself still counts its whole wait.
 */
import { Agent, request as httpRequest } from 'node:http';
import { seededRandom } from '../random.ts';

export interface LoadClass {
  name: string;
  method: string;
  path: string;
  /** Relative share of the traffic. */
  share: number;
}

export interface OpenLoopOptions {
  baseUrl: string;
  ratePerSecond: number;
  durationMs: number;
  /** Sent but not counted, before the measured window. */
  warmupMs: number;
  classes: readonly LoadClass[];
  seed: number;
  /** Connections the generator may open; default 512. */
  socketsMax?: number;
  /** A request unanswered after this counts as an error; default 10 s. */
  timeoutMs?: number;
  headers?: Record<string, string>;
}

export interface ClassFigures {
  sent: number;
  ok: number;
  shed: number;
  rateLimited: number;
  other: number;
  errors: number;
  /** Share of requests answered 2xx, in percent. */
  successPct: number;
  /** Of the 2xx answers. */
  latencyMsP50: number;
  latencyMsP99: number;
  latencyMsMax: number;
  /** Every 503 carried Retry-After. */
  retryAfterOnEvery503: boolean;
}

const TICK_MS = 1;
/** At most this many requests leave in one tick, so a stalled loop catches up gradually. */
const BURST_PER_TICK_MAX = 200;

export async function runOpenLoop(options: OpenLoopOptions): Promise<Record<string, ClassFigures>> {
  const url = new URL(options.baseUrl);
  const agent = new Agent({ keepAlive: true, maxSockets: options.socketsMax ?? 512 });
  const random = seededRandom(options.seed);
  const totalShare = options.classes.reduce((a, c) => a + c.share, 0);
  const newStats = () => ({ sent: 0, ok: 0, shed: 0, rateLimited: 0, other: 0, errors: 0, latencies: [] as number[], missingRetryAfter: 0 });
  const classes = options.classes.map((c) => ({ ...c, stats: newStats() }));
  const last = classes.at(-1);
  if (last === undefined) throw new RangeError('runOpenLoop needs at least one class');
  const pick = (): (typeof classes)[number] => {
    let r = random() * totalShare;
    for (const c of classes) {
      r -= c.share;
      if (r < 0) return c;
    }
    return last;
  };
  const inFlight = new Set<Promise<void>>();
  const timeoutMs = options.timeoutMs ?? 10_000;
  const send = (c: (typeof classes)[number], scheduledMs: number, counted: boolean): Promise<void> =>
    new Promise<void>((resolve) => {
      const s = c.stats;
      if (counted) s.sent += 1;
      const req = httpRequest({ host: url.hostname, port: url.port, method: c.method, path: c.path, agent, timeout: timeoutMs, headers: { 'content-length': '0', ...options.headers } }, (res) => {
        res.resume();
        res.on('end', () => {
          if (counted) {
            const status = res.statusCode ?? 0;
            if (status >= 200 && status < 300) {
              s.ok += 1;
              s.latencies.push(performance.now() - scheduledMs);
            } else if (status === 503) {
              s.shed += 1;
              if (res.headers['retry-after'] === undefined) s.missingRetryAfter += 1;
            } else if (status === 429) {
              s.rateLimited += 1;
            } else {
              s.other += 1;
            }
          }
          resolve();
        });
      });
      req.on('timeout', () => { req.destroy(new Error('timeout')); });
      req.on('error', () => {
        if (counted) s.errors += 1;
        resolve();
      });
      req.end();
    });
  const startMs = performance.now();
  const endMs = startMs + options.warmupMs + options.durationMs;
  let sentTotal = 0;
  await new Promise<void>((resolve) => {
    const tick = (): void => {
      const now = performance.now();
      if (now >= endMs) {
        resolve();
        return;
      }
      const due = Math.floor(((now - startMs) / 1000) * options.ratePerSecond);
      let burst = 0;
      while (sentTotal < due && burst < BURST_PER_TICK_MAX) {
        // Each request's scheduled time, not the time this tick got round to sending it.
        const scheduledMs = startMs + (sentTotal / options.ratePerSecond) * 1000;
        const counted = scheduledMs - startMs >= options.warmupMs;
        const p = send(pick(), scheduledMs, counted);
        inFlight.add(p);
        void p.then(() => inFlight.delete(p));
        sentTotal += 1;
        burst += 1;
      }
      setTimeout(tick, TICK_MS);
    };
    tick();
  });
  await Promise.all(inFlight);
  agent.destroy();
  const result: Record<string, ClassFigures> = {};
  for (const { name, stats: s } of classes) {
    const sorted = s.latencies.sort((a, b) => a - b);
    const q = (p: number): number => (sorted.length === 0 ? 0 : (sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? 0));
    result[name] = {
      sent: s.sent,
      ok: s.ok,
      shed: s.shed,
      rateLimited: s.rateLimited,
      other: s.other,
      errors: s.errors,
      successPct: s.sent === 0 ? 0 : (100 * s.ok) / s.sent,
      latencyMsP50: q(0.5),
      latencyMsP99: q(0.99),
      latencyMsMax: sorted.at(-1) ?? 0,
      retryAfterOnEvery503: s.missingRetryAfter === 0,
    };
  }
  return result;
}

/**
 * What a fault double can be told to do, and the checks on it. One shape for the HTTP
 * server and the TCP proxy, in-process (methods) and out-of-process (the control API).
 */

export interface FaultSettings {
  /** Added before each answer (server) or each forwarded chunk (proxy). */
  latencyMs: number;
  /** Plus a uniform random extra in [0, latencyJitterMs). */
  latencyJitterMs: number;
  /** Share of requests answered with `errorStatus` (server only). */
  errorRate: number;
  errorStatus: number;
  /** Share of requests (server) or new connections (proxy) reset without an answer. */
  dropRate: number;
  /** Accept but never answer or forward: the dependency hangs. */
  blackhole: boolean;
}

export const FAULTS_NONE: Readonly<FaultSettings> = Object.freeze({
  latencyMs: 0,
  latencyJitterMs: 0,
  errorRate: 0,
  errorStatus: 503,
  dropRate: 0,
  blackhole: false,
});

/** An hour: anything longer is a test that forgot to clean up, not a fault. */
const LATENCY_MS_MAX = 3_600_000;

/** Merges `patch` into `current`, rejecting values out of range (an error names the field). */
export function mergeFaults(current: FaultSettings, patch: Partial<FaultSettings>): FaultSettings {
  const next = { ...current };
  for (const [key, value] of Object.entries(patch)) {
    switch (key) {
      case 'latencyMs':
      case 'latencyJitterMs':
        if (typeof value !== 'number' || !(value >= 0 && value <= LATENCY_MS_MAX)) throw new RangeError(`${key} must be a number in 0..${LATENCY_MS_MAX}`);
        next[key] = value;
        break;
      case 'errorRate':
      case 'dropRate':
        if (typeof value !== 'number' || !(value >= 0 && value <= 1)) throw new RangeError(`${key} must be a number in 0..1`);
        next[key] = value;
        break;
      case 'errorStatus':
        if (typeof value !== 'number' || !Number.isInteger(value) || value < 400 || value > 599) throw new RangeError('errorStatus must be an integer in 400..599');
        next.errorStatus = value;
        break;
      case 'blackhole':
        if (typeof value !== 'boolean') throw new RangeError('blackhole must be a boolean');
        next.blackhole = value;
        break;
      default:
        throw new RangeError(`unknown fault setting ${JSON.stringify(key)}`);
    }
  }
  return next;
}

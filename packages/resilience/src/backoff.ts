/**
 * Exponential backoff with jitter (Brooker, "Exponential Backoff And Jitter", AWS 2015).
 * Jitter spreads the retries of many clients that failed together, so they do not return
 * together and knock the recovering dependency over again.
 */
import type { Random } from './random.ts';

export type Jitter = 'full' | 'decorrelated' | 'none';

export interface BackoffOptions {
  /** The first delay's ceiling (full, none) or floor (decorrelated). */
  baseMs: number;
  /** No delay ever exceeds this. */
  capMs: number;
  jitter: Jitter;
}

/** Exponents beyond this overflow nothing but are pointless: 2^30 × base is past any cap. */
const EXPONENT_MAX = 30;

/**
 * The delay before retry number `retry` (1 for the first retry). `previousMs` is the delay
 * before the previous retry (decorrelated jitter feeds on it; pass 0 for the first).
 * - none:         min(cap, base × 2^(retry−1))
 * - full:         uniform in [0, min(cap, base × 2^(retry−1)))
 * - decorrelated: min(cap, uniform in [base, max(base, 3 × previous)))
 */
export function backoffDelayMs(options: BackoffOptions, retry: number, previousMs: number, random: Random): number {
  const { baseMs, capMs, jitter } = options;
  switch (jitter) {
    case 'none':
      return Math.min(capMs, baseMs * 2 ** Math.min(retry - 1, EXPONENT_MAX));
    case 'full':
      return random() * Math.min(capMs, baseMs * 2 ** Math.min(retry - 1, EXPONENT_MAX));
    case 'decorrelated': {
      // Brooker's "decorrelated jitter": the first delay is drawn as if the one before were
      // base, so clients that failed together do not all retry after exactly base.
      const upper = Math.max(baseMs, previousMs) * 3;
      return Math.min(capMs, baseMs + random() * (upper - baseMs));
    }
  }
}

export function validateBackoff(o: BackoffOptions): void {
  if (!(o.baseMs > 0 && Number.isFinite(o.baseMs))) throw new RangeError('backoff.baseMs must be a finite number > 0');
  if (!(o.capMs >= o.baseMs && Number.isFinite(o.capMs))) throw new RangeError('backoff.capMs must be finite and >= baseMs');
}

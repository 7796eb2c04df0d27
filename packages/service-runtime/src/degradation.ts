/**
 * The degradation level: one number an operator (and the dashboard, and /ready) can read to
 * know how much of the service is being held back, and why.
 *
 *   0 normal · 1 low priority shed, or some dependency's breaker not closed
 *   2 low and normal shed · 3 only critical (moving money) served
 *
 * It is the load shedder's level, raised to at least 1 while any registered dependency's
 * breaker is open or half-open (its fallbacks are answering: stale reads, deferred work).
 * Every change is logged at warn (or info when it returns to 0) and set on the
 * `degradation_level` gauge.
 */
import type { FastifyBaseLogger } from 'fastify';
import type { BreakerState, DependencyPolicy, LoadShedder, Priority } from '@ledgerline/resilience';

export interface DegradationSnapshot {
  level: number;
  /** The classes refused at the door right now, lowest first. */
  shedding: Priority[];
  /** Each registered dependency's breaker state. */
  dependencies: Record<string, BreakerState>;
}

export class DegradationTracker {
  readonly #shedder: LoadShedder | undefined;
  readonly #dependencies: readonly DependencyPolicy[];
  readonly #log: FastifyBaseLogger;
  readonly #onLevel: (level: number) => void;
  #level = 0;

  constructor(options: {
    shedder?: LoadShedder | undefined;
    dependencies?: readonly DependencyPolicy[];
    log: FastifyBaseLogger;
    onLevel?: (level: number) => void;
  }) {
    this.#shedder = options.shedder;
    this.#dependencies = options.dependencies ?? [];
    this.#log = options.log;
    this.#onLevel = options.onLevel ?? (() => {});
    for (const dependency of this.#dependencies) {
      dependency.breaker?.onStateChange(() => { this.refresh(); });
    }
  }

  /** Recomputes the level now; logs and reports a change. */
  refresh(): DegradationSnapshot {
    const shedding = this.#shedder?.shedClasses() ?? [];
    const dependencies: Record<string, BreakerState> = {};
    let degradedDependencies = 0;
    for (const d of this.#dependencies) {
      const state = d.breaker?.state ?? 'closed';
      dependencies[d.name] = state;
      if (state !== 'closed') degradedDependencies += 1;
    }
    const level = Math.max(shedding.length, degradedDependencies > 0 ? 1 : 0);
    if (level !== this.#level) {
      const previous = this.#level;
      this.#level = level;
      const fields = { degradation_level: level, previous_level: previous, shedding, dependencies };
      if (level > 0) this.#log.warn(fields, `degradation level ${previous} → ${level}`);
      else this.#log.info(fields, `degradation level ${previous} → 0: back to normal`);
      this.#onLevel(level);
    }
    return { level, shedding, dependencies };
  }
}

/**
 * Marks a response as served from a stale cache (a fallback): `x-stale: true`, `Age` in
 * seconds (RFC 9111 §5.1), and the `Warning: 110` that older clients and proxies understand.
 */
export function markStale(reply: { header(name: string, value: string): unknown }, ageMs: number): void {
  reply.header('x-stale', 'true');
  reply.header('age', String(Math.max(0, Math.floor(ageMs / 1000))));
  reply.header('warning', '110 - "Response is Stale"');
}

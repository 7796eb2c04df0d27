/**
 * Prometheus metrics for a service, at `GET /metrics` (prom-client's text format).
 *
 * Each service gets its own `Registry`, not prom-client's global one, so several services
 * (or test instances) in one process never collide. What is measured:
 * - `http_requests_total{method,route,outcome}` and `http_request_duration_seconds{method,route,outcome}`:
 *   `route` is the route template (`/v1/accounts/:id`), never the raw URL, so the label set
 *   stays bounded; unmatched paths share `route="__unmatched"`. `outcome` is one of ok,
 *   client_error, server_error, shed, rate_limited.
 * - dependencies (fed by a `PolicyObserver`): breaker state and transitions, call and attempt
 *   outcomes, retries, exhausted retry budgets;
 * - load shedding and rate limiting: shed and limited counts by priority, the degradation level;
 * - pg pool usage when a pool is given; process metrics (prom-client's defaults);
 * - whatever the service adds: `registerGauge` for values read at scrape time (outbox lag,
 *   queue depths), or any prom-client metric registered on `metrics.registry`.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type pg from 'pg';
import type { BreakerState, PolicyObserver } from '@ledgerline/resilience';

export type RequestOutcome = 'ok' | 'client_error' | 'server_error' | 'shed' | 'rate_limited';

export const UNMATCHED_ROUTE = '__unmatched';

export interface MetricsOptions {
  /** Prefix for every metric name; default `ledgerline_`. */
  prefix?: string;
  /** Process metrics (CPU, memory, event loop lag, GC); default true. */
  processMetrics?: boolean;
  /** Request latency buckets in seconds. The defaults bracket the 100 ms / 200 ms targets of REQUIREMENTS §7. */
  latencyBucketsSeconds?: readonly number[];
  /** Labels on every metric, e.g. `{ service: 'ledger' }`. */
  defaultLabels?: Record<string, string>;
}

const LATENCY_BUCKETS_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10];
const BREAKER_STATES: readonly BreakerState[] = ['closed', 'half_open', 'open'];

export class ServiceMetrics {
  readonly registry: Registry;
  readonly prefix: string;
  readonly httpRequests: Counter<'method' | 'route' | 'outcome'>;
  readonly httpDuration: Histogram<'method' | 'route' | 'outcome'>;
  readonly shed: Counter<'priority' | 'reason'>;
  readonly rateLimited: Counter<'route'>;
  readonly rateLimitErrors: Counter;
  readonly degradationLevel: Gauge;
  readonly breakerState: Gauge<'dependency' | 'state'>;
  readonly breakerTransitions: Counter<'dependency' | 'from' | 'to'>;
  readonly dependencyCalls: Counter<'dependency' | 'outcome'>;
  readonly dependencyDuration: Histogram<'dependency' | 'outcome'>;
  readonly dependencyAttempts: Counter<'dependency' | 'outcome'>;
  readonly dependencyRetries: Counter<'dependency'>;
  readonly retryBudgetExhausted: Counter<'dependency'>;
  readonly #pools = new Map<string, pg.Pool>();
  #poolGauge: Gauge<'pool' | 'state'> | undefined;

  constructor(options: MetricsOptions = {}) {
    const prefix = options.prefix ?? 'ledgerline_';
    this.prefix = prefix;
    const registers = [(this.registry = new Registry())];
    if (options.defaultLabels !== undefined) this.registry.setDefaultLabels(options.defaultLabels);
    if (options.processMetrics !== false) collectDefaultMetrics({ register: this.registry, prefix });
    const buckets = [...(options.latencyBucketsSeconds ?? LATENCY_BUCKETS_SECONDS)];
    this.httpRequests = new Counter({ name: `${prefix}http_requests_total`, help: 'HTTP requests answered, by route template and outcome.', labelNames: ['method', 'route', 'outcome'], registers });
    this.httpDuration = new Histogram({ name: `${prefix}http_request_duration_seconds`, help: 'HTTP request latency from arrival to the last byte, by route template and outcome.', labelNames: ['method', 'route', 'outcome'], buckets, registers });
    this.shed = new Counter({ name: `${prefix}requests_shed_total`, help: 'Requests refused with 503 by the load shedder, by priority class and reason.', labelNames: ['priority', 'reason'], registers });
    this.rateLimited = new Counter({ name: `${prefix}requests_rate_limited_total`, help: 'Requests refused with 429 by the rate limiter.', labelNames: ['route'], registers });
    this.rateLimitErrors = new Counter({ name: `${prefix}rate_limit_errors_total`, help: 'Rate-limit checks that failed (Redis unreachable); the request was let through.', registers });
    this.degradationLevel = new Gauge({ name: `${prefix}degradation_level`, help: 'Degradation level: 0 normal; 1 low shed; 2 low and normal shed; 3 only critical served. Dependencies with open breakers raise it to at least 1.', registers });
    this.breakerState = new Gauge({ name: `${prefix}breaker_state`, help: 'Circuit breaker state per dependency: 1 for the current state, 0 for the others.', labelNames: ['dependency', 'state'], registers });
    this.breakerTransitions = new Counter({ name: `${prefix}breaker_transitions_total`, help: 'Circuit breaker state transitions.', labelNames: ['dependency', 'from', 'to'], registers });
    this.dependencyCalls = new Counter({ name: `${prefix}dependency_calls_total`, help: 'Outbound calls by final outcome (fallback: a fallback answered).', labelNames: ['dependency', 'outcome'], registers });
    this.dependencyDuration = new Histogram({ name: `${prefix}dependency_call_duration_seconds`, help: 'Outbound call latency as the caller saw it, retries and fallbacks included.', labelNames: ['dependency', 'outcome'], buckets, registers });
    this.dependencyAttempts = new Counter({ name: `${prefix}dependency_attempts_total`, help: 'Outbound attempts by outcome.', labelNames: ['dependency', 'outcome'], registers });
    this.dependencyRetries = new Counter({ name: `${prefix}dependency_retries_total`, help: 'Outbound retries made.', labelNames: ['dependency'], registers });
    this.retryBudgetExhausted = new Counter({ name: `${prefix}dependency_retry_budget_exhausted_total`, help: 'Retries refused because the retry budget was spent.', labelNames: ['dependency'], registers });
  }

  /** Records one answered request. */
  observeRequest(method: string, route: string, outcome: RequestOutcome, durationSeconds: number): void {
    this.httpRequests.inc({ method, route, outcome });
    this.httpDuration.observe({ method, route, outcome }, durationSeconds);
  }

  /** Hooks for a `DependencyPolicy` (its `observer` option): call and attempt outcomes, retries. */
  policyObserver(): PolicyObserver {
    return {
      attempt: (dependency, outcome) => { this.dependencyAttempts.inc({ dependency, outcome }); },
      call: (dependency, outcome, durationMs) => {
        this.dependencyCalls.inc({ dependency, outcome });
        this.dependencyDuration.observe({ dependency, outcome }, durationMs / 1000);
      },
      retry: (dependency) => { this.dependencyRetries.inc({ dependency }); },
      retryBudgetExhausted: (dependency) => { this.retryBudgetExhausted.inc({ dependency }); },
      // Breaker states and transitions are recorded for the policies listed in
      // `createService({ dependencies })`, which also feed the degradation level.
    };
  }

  /** Sets the state gauge (e.g. at start-up, before any transition). */
  setBreakerState(dependency: string, state: BreakerState): void {
    for (const s of BREAKER_STATES) this.breakerState.set({ dependency, state: s }, s === state ? 1 : 0);
  }

  /**
   * `pg_pool_connections{pool,state}`: total, idle, waiting (clients queued for a connection)
   * and max. Call once per pool, each under its own `name`; they share the one metric.
   */
  observePool(pool: pg.Pool, name = 'default'): void {
    if (this.#pools.has(name)) throw new Error(`pg pool ${JSON.stringify(name)} is already observed`);
    this.#pools.set(name, pool);
    if (this.#poolGauge !== undefined) return;
    const pools = this.#pools;
    this.#poolGauge = new Gauge({
      name: `${this.prefix}pg_pool_connections`,
      help: 'PostgreSQL pool connections: total open, idle, clients waiting for one, and the configured max.',
      labelNames: ['pool', 'state'],
      registers: [this.registry],
      collect() {
        for (const [poolName, p] of pools) {
          this.set({ pool: poolName, state: 'total' }, p.totalCount);
          this.set({ pool: poolName, state: 'idle' }, p.idleCount);
          this.set({ pool: poolName, state: 'waiting' }, p.waitingCount);
          this.set({ pool: poolName, state: 'max' }, p.options.max ?? 10);
        }
      },
    });
  }

  /**
   * A gauge whose value is read at scrape time, e.g. the outbox lag:
   * `metrics.registerGauge('outbox_lag_seconds', 'Age of the oldest unpublished event.', () => relay.lagSeconds())`.
   * A read that throws or rejects leaves the gauge unset for that scrape.
   */
  registerGauge(name: string, help: string, read: () => number | Promise<number>): Gauge {
    return new Gauge({
      name: `${this.prefix}${name}`,
      help,
      registers: [this.registry],
      async collect() {
        try {
          this.set(await read());
        } catch {
          this.reset();
        }
      },
    });
  }

  /**
   * A counter fed at scrape time from a running total kept elsewhere (e.g. an engine's
   * `stats()`): it adds the difference since the last scrape, so it stays monotonic.
   */
  registerCounterFromTotal(name: string, help: string, readTotal: () => number): Counter {
    let last = 0;
    return new Counter({
      name: `${this.prefix}${name}`,
      help,
      registers: [this.registry],
      collect() {
        const total = readTotal();
        if (total > last) this.inc(total - last);
        last = Math.max(last, total);
      },
    });
  }
}

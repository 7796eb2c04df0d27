/**
 * The live runner of an asynchronous projection: batch after batch (projection.ts `runBatch`,
 * exactly once each), sleeping when caught up, with a Prometheus lag gauge.
 */
import type pg from 'pg';
import { Counter, Gauge, type Registry } from 'prom-client';
import type { EventStore, StoredEvent } from '@ledgerline/events';
import { projectionLag, runBatch, type Projection } from './projection.ts';

/** Projection metrics on a registry (a service's own, see service-runtime's metrics). */
export class ProjectionMetrics {
  readonly lagSeconds: Gauge<'projection'>;
  readonly eventsBehind: Gauge<'projection'>;
  readonly eventsApplied: Counter<'projection'>;

  constructor(registry: Registry, prefix = 'ledgerline_') {
    const registers = [registry];
    this.lagSeconds = new Gauge({
      name: `${prefix}projection_lag_seconds`,
      help: 'Age of the oldest committed event the projection has not applied yet (0 when caught up).',
      labelNames: ['projection'],
      registers,
    });
    this.eventsBehind = new Gauge({
      name: `${prefix}projection_events_behind`,
      help: 'Committed events after the projection checkpoint (counted up to 1,000,000).',
      labelNames: ['projection'],
      registers,
    });
    this.eventsApplied = new Counter({
      name: `${prefix}projection_events_applied_total`,
      help: 'Events applied to the projection by this process.',
      labelNames: ['projection'],
      registers,
    });
  }
}

export interface ProjectionRunnerOptions {
  pool: pg.Pool;
  store: EventStore;
  projection: Projection;
  /** Most events per transaction. */
  batchSize?: number;
  /** Sleep when caught up, before polling again. */
  idleMs?: number;
  /** How often the lag gauges are refreshed from the database (they count, so not every batch). */
  lagIntervalMs?: number;
  metrics?: ProjectionMetrics;
  onError?: (error: unknown) => void;
  /** Test hook: runs after a batch is applied and before it commits. */
  beforeCommit?: (events: readonly StoredEvent[]) => void | Promise<void>;
}

export interface ProjectionRunnerStats {
  batches: number;
  events: number;
  errors: number;
  /** Whether the last batch tried failed (nothing of it committed): the projection is not moving. */
  failing: boolean;
}

/** Backoff after a failed batch (nothing of it was committed), doubling up to the maximum. */
const ERROR_BACKOFF_MS_MAX = 5000;

export class ProjectionRunner {
  readonly #o: Required<Omit<ProjectionRunnerOptions, 'metrics' | 'beforeCommit'>> & Pick<ProjectionRunnerOptions, 'metrics' | 'beforeCommit'>;
  readonly #stats: ProjectionRunnerStats = { batches: 0, events: 0, errors: 0, failing: false };
  #running: Promise<void> | null = null;
  #stopping = false;
  #wake: (() => void) | null = null;

  constructor(options: ProjectionRunnerOptions) {
    this.#o = {
      batchSize: 1000,
      idleMs: 200,
      lagIntervalMs: 5000,
      onError: () => {},
      ...options,
    };
  }

  start(): void {
    if (this.#running !== null) return;
    this.#stopping = false;
    this.#running = this.#loop();
  }

  /** Finishes the batch in flight (or lets it roll back), then stops. */
  async stop(): Promise<void> {
    this.#stopping = true;
    this.#wake?.();
    await this.#running;
    this.#running = null;
  }

  stats(): ProjectionRunnerStats {
    return { ...this.#stats };
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      this.#wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  async #loop(): Promise<void> {
    const { pool, store, projection, batchSize, idleMs, lagIntervalMs, metrics } = this.#o;
    let lagCheckedAt = -Infinity;
    let backoffMs = 50;
    while (!this.#stopping) {
      try {
        const r = await runBatch(pool, store, projection, {
          generation: 'active',
          batchSize,
          ...(this.#o.beforeCommit === undefined ? {} : { beforeCommit: this.#o.beforeCommit }),
        });
        backoffMs = 50;
        this.#stats.failing = false;
        if (r.applied > 0) {
          this.#stats.batches += 1;
          this.#stats.events += r.applied;
          metrics?.eventsApplied.inc({ projection: projection.name }, r.applied);
        }
        if (metrics !== undefined && performance.now() - lagCheckedAt >= lagIntervalMs) {
          lagCheckedAt = performance.now();
          const lag = await projectionLag(pool, projection.name);
          metrics.lagSeconds.set({ projection: projection.name }, lag?.seconds ?? 0);
          metrics.eventsBehind.set({ projection: projection.name }, lag?.eventsBehind ?? 0);
        }
        if (!r.more) await this.#sleep(idleMs);
      } catch (error) {
        this.#stats.errors += 1;
        this.#stats.failing = true;
        this.#o.onError(error);
        await this.#sleep(backoffMs);
        backoffMs = Math.min(backoffMs * 2, ERROR_BACKOFF_MS_MAX);
      }
    }
  }
}

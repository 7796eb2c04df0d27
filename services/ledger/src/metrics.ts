/**
 * The ledger's own metrics, read from the engine's running totals at scrape time (nothing
 * is added to the transfer hot path): transfers and batches applied, the mean batch size,
 * transfers queued for a batch, and the pool's connections.
 *
 * A batch-size histogram would need the engine to report each batch as it commits; its
 * `stats()` gives totals only, so the mean is exported instead.
 */
import type { FastifyBaseLogger } from 'fastify';
import type pg from 'pg';
import { outboxLagSeconds, queryWithin } from '@ledgerline/events';
import type { LedgerEngine } from '@ledgerline/ledger';
import type { ServiceMetrics } from '@ledgerline/service-runtime';

/**
 * The longest a scrape waits for the outbox lag, connection wait included. /metrics must answer
 * while PostgreSQL hangs: that is when the other metrics matter most.
 */
export const OUTBOX_LAG_TIMEOUT_MS = 1000;

export function registerLedgerMetrics(
  metrics: ServiceMetrics,
  engine: LedgerEngine,
  pool: pg.Pool,
  options: { log?: FastifyBaseLogger; outboxLagTimeoutMs?: number } = {},
): void {
  metrics.observePool(pool);
  metrics.registerCounterFromTotal('ledger_transfers_total', 'Transfers decided in committed batches (applied or rejected).', () => engine.stats().transfers);
  metrics.registerCounterFromTotal('ledger_batches_total', 'Batches committed.', () => engine.stats().batches);
  metrics.registerCounterFromTotal('ledger_batch_attempts_total', 'Batch attempts, retries of transient database failures included.', () => engine.stats().batchAttempts);
  metrics.registerGauge('ledger_batch_size_mean', 'Mean transfers per committed batch since start.', () => engine.stats().batchSizeMean);
  metrics.registerGauge('ledger_queued_transfers', 'Transfers waiting for a batch.', () => engine.stats().queuedTransfers);
  metrics.registerGauge('events_outbox_lag_seconds', 'Age of the oldest event the relay has not published yet (0 when caught up; NaN when it could not be read in time).', boundedOutboxLag(pool, options.outboxLagTimeoutMs ?? OUTBOX_LAG_TIMEOUT_MS, options.log));
}

/**
 * Reads the outbox lag within `timeoutMs` (queryWithin: the wait for a pooled connection
 * included), else (timed out or failed) reports NaN and logs: the lag is unknown, and a stale
 * value would hide the outage. One read at a time: scrapes during a hang share it rather than
 * piling more waiters onto the pool.
 */
function boundedOutboxLag(pool: pg.Pool, timeoutMs: number, log: FastifyBaseLogger | undefined): () => Promise<number> {
  const db = { query: (text: string, values: unknown[] = []) => queryWithin(pool, text, values, timeoutMs) } as unknown as Pick<pg.ClientBase, 'query'>;
  let inFlight: Promise<number> | undefined;
  return async () => {
    inFlight ??= outboxLagSeconds(db).finally(() => { inFlight = undefined; });
    try {
      return await inFlight;
    } catch (error) {
      log?.warn({ err: error, timeoutMs }, 'metrics: the outbox lag could not be read in time; reporting NaN');
      return Number.NaN;
    }
  };
}

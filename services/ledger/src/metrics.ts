/**
 * The ledger's own metrics, read from the engine's running totals at scrape time (nothing
 * is added to the transfer hot path): transfers and batches applied, the mean batch size,
 * transfers queued for a batch, and the pool's connections.
 *
 * A batch-size histogram would need the engine to report each batch as it commits; its
 * `stats()` gives totals only, so the mean is exported instead.
 */
import type pg from 'pg';
import { outboxLagSeconds } from '@ledgerline/events';
import type { LedgerEngine } from '@ledgerline/ledger';
import type { ServiceMetrics } from '@ledgerline/service-runtime';

export function registerLedgerMetrics(metrics: ServiceMetrics, engine: LedgerEngine, pool: pg.Pool): void {
  metrics.observePool(pool);
  metrics.registerCounterFromTotal('ledger_transfers_total', 'Transfers decided in committed batches (applied or rejected).', () => engine.stats().transfers);
  metrics.registerCounterFromTotal('ledger_batches_total', 'Batches committed.', () => engine.stats().batches);
  metrics.registerCounterFromTotal('ledger_batch_attempts_total', 'Batch attempts, retries of transient database failures included.', () => engine.stats().batchAttempts);
  metrics.registerGauge('ledger_batch_size_mean', 'Mean transfers per committed batch since start.', () => engine.stats().batchSizeMean);
  metrics.registerGauge('ledger_queued_transfers', 'Transfers waiting for a batch.', () => engine.stats().queuedTransfers);
  metrics.registerGauge('events_outbox_lag_seconds', 'Age of the oldest event the relay has not published yet (0 when caught up).', () => outboxLagSeconds(pool));
}

export { DomainRejection, fold, type Decider, type DomainEvent } from './decider.ts';
export { UnknownSchemaVersionError, Upcasters, type Upcaster } from './upcast.ts';
export {
  AggregateStore,
  type AggregateDefinition,
  type HandleResult,
  type LoadedAggregate,
  type SnapshotOptions,
} from './aggregate.ts';
export {
  applyInline,
  checkpointLess,
  createGeneration,
  dropGeneration,
  ensureProjection,
  generationTables,
  projectionLag,
  rebuild,
  ReplayConflictError,
  rebuildFailureNote,
  replayInto,
  ResidencyReplayError,
  runBatch,
  swapGeneration,
  viewName,
  type BatchOptions,
  type BatchResult,
  type Projection,
  type ProjectionLag,
  type ProjectionReplay,
  type ReplayOptions,
  type RebuildMode,
  type RebuildReport,
  type ReplayReport,
  type TableNames,
} from './projection.ts';
export { ProjectionMetrics, ProjectionRunner, type ProjectionRunnerOptions, type ProjectionRunnerStats } from './runner.ts';
export {
  applyLedgerEvent,
  emptyLedgerState,
  ledgerBalanceAt,
  ledgerBalancesProjection,
  LedgerReplayError,
  readProjectedBalances,
  REPLAY_ACCOUNTS_MAX,
  type AccountBalances,
  type LedgerFoldState,
  type Reservation,
} from './ledger-balances.ts';
export {
  compareAccount,
  formatLedgerReconcileReport,
  reconcileLedger,
  type BalanceDifference,
  type BalanceField,
  type LedgerReconcileOptions,
  type LedgerReconcileReport,
} from './reconcile-ledger.ts';
export { exportEvents, type ExportOptions, type ExportReport } from './export.ts';
export { RANGE_SETTLE_WAIT_MS_DEFAULT, RangeNotSettledError, settledAsOfTime, settledThrough } from './settled.ts';
export { applyRetention, NO_LEGAL_HOLDS, type LegalHolds, type RetentionReport, type RetentionRule, type StreamRef } from './retention.ts';
export {
  decidePayment,
  evolvePayment,
  initialPaymentState,
  parsePaymentEvent,
  paymentAggregate,
  paymentDecider,
  paymentSnapshots,
  paymentUpcasters,
  PAYMENT_REFUNDS_MAX,
  PAYMENT_STREAM,
  type PaymentCommand,
  type PaymentEvent,
  type PaymentState,
  type PaymentStatus,
} from './payment.ts';

export {
  APPEND_EVENTS_MAX,
  CHECKPOINT_START,
  checkpointOf,
  ConcurrencyError,
  EventStore,
  StreamOrderConflictError,
  migrateEvents,
  type Checkpoint,
  type EventMetadata,
  type ExpectedVersion,
  type NewEvent,
  type StoredEvent,
  type StreamEvent,
} from './store.ts';
export { ensureEventStream, OutboxRelay, outboxLagSeconds, readCheckpoint, type RelayOptions, type RelayStats } from './relay.ts';
export {
  ensureDeadLetterStream,
  EventConsumer,
  registerConsumer,
  type ConsumerOptions,
  type ConsumerStats,
  type BatchEventHandler,
  type EventHandler,
} from './consumer.ts';
export { decodeBatch, encodeBatch, MalformedBatchError } from './wire.ts';
export { runRelay, type RunningRelay, type RunRelayOptions } from './run-relay.ts';
export {
  formatReconcileReport,
  ISSUE_KINDS,
  reconcile,
  scanEventStream,
  type BrokerScanOptions,
  type BrokerScanResult,
  type ConsumerReconciliation,
  type EffectCounter,
  type ReconcileIssue,
  type ReconcileIssueKind,
  type ReconcileOptions,
  type ReconcileReport,
  type ScannedMessage,
} from './reconcile.ts';
export {
  DEAD_LETTERS_LIMIT_DEFAULT,
  listDeadLetters,
  replayDeadLetters,
  type DeadLetter,
  type ListDeadLettersOptions,
  type ReplayDeadLettersOptions,
  type ReplayOutcome,
  type ReplayStatus,
} from './dlq.ts';

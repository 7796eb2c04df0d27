export { commit, databaseCannotNow, databaseSessionEnded, inTransaction, queryWithin, TransactionRolledBackError, transientDatabaseError, withQueryTimeout } from './transaction.ts';
export { readHorizon } from './horizon.ts';
export { newUuidV7 } from './ids.ts';
export { sqlArrayLiteral, sqlLiteral, storablePrefix, storableText } from './sql.ts';
export { cliStreams, dateOption, describeFailure, intOption, operatorDatabaseUrl, parseCommandLine, UsageError, type CliIo, type ParsedCommandLine } from './cli-kit.ts';
export {
  allowedLocations,
  APPEND_EVENTS_MAX,
  EVENT_BYTES_MAX,
  EVENT_MESSAGE_FIXED_BYTES,
  EventTooLargeError,
  assertResidency,
  CHECKPOINT_START,
  checkpointOf,
  ConcurrencyError,
  EventStore,
  ResidencyViolationError,
  STREAM_ORDER_CONFLICT_SQLSTATE,
  StreamCorruptError,
  StreamOrderConflictError,
  streamOrderConflict,
  STREAM_VERSION_CONFLICT_SQLSTATE,
  streamVersionConflict,
  StreamRegionMismatchError,
  migrateEvents,
  partitionByResidency,
  presentEventsAllowed,
  streamRegions,
  toEvent,
  type EventRecord,
  type AsOf,
  type ResidencyOperation,
  type ResidencyPolicy,
  type StoreResidency,
  type Checkpoint,
  type EventMetadata,
  type ExpectedVersion,
  type NewEvent,
  type StoredEvent,
  type StreamEvent,
} from './store.ts';
export {
  ensureEventStream,
  EventTooLargeForBrokerError,
  OutboxRelay,
  RELAY_LOCK_CLASS,
  outboxLagSeconds,
  readCheckpoint,
  type OutboxEvent,
  type RelayOptions,
  type RelayResidency,
  type RelayStats,
} from './relay.ts';
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
export { parseResidencyPolicy, relayResidencyFromEnv, ResidencyConfigError } from './residency-config.ts';
export { runRelay, type RunningRelay, type RunRelayOptions } from './run-relay.ts';
export {
  inboxHorizon,
  INBOX_LOCK_CLASS,
  pruneInbox,
  type PruneInboxOptions,
  type PruneInboxReport,
  type PruneStop,
  type UnhandledEvent,
} from './inbox-prune.ts';
export {
  formatReconcileReport,
  settleTransactionsBefore,
  ISSUE_KINDS,
  reconcile,
  ReconcileSessionError,
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
  listUndecodableMessages,
  replayDeadLetters,
  type DeadLetter,
  type ListDeadLettersOptions,
  type ReplayDeadLettersOptions,
  type ReplayOutcome,
  type ReplayStatus,
  type UndecodableMessage,
} from './dlq.ts';

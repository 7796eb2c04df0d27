export * from './sink.ts';
export { checkpointJson, keyTransitionJson, verifyBundle, type CheckpointJson, type ConsistencyBundle, type InclusionBundle, type KeyTransitionJson, type ProofBundle } from './bundle.ts';
export {
  checkpointBody,
  checkpointSignatureValid,
  type TrustedKeys,
  KeyEncryptionKeyError,
  keyIdOf,
  keyTransitionBody,
  loadSigningKey,
  parseKeyEncryptionKey,
  parsePublicKey,
  publicKeyPem,
  signCheckpoint,
  signKeyTransition,
  SigningKeyError,
  trustThroughTransitions,
  type Checkpoint,
  type KeyTransition,
  type CheckpointSigner,
  type KeyEncryptionKey,
} from './keys.ts';
export {
  consistencyRanges,
  EMPTY_ROOT,
  Frontier,
  inclusionRanges,
  leafHash,
  nodeHash,
  ProofError,
  rootFromInclusionProof,
  rootOf,
  verifyConsistency,
  verifyInclusion,
} from './merkle.ts';
export { AUDIT_SEQUENCER_ROLE, AUDIT_WRITER_ROLE, AuditLoginPrivilegedError, AuditSchemaBehindError, AuditSchemaCheckError, auditMigrationNames, checkAuditMigrations, migrateAudit, prepareAuditSchema, type AuditLogin, type SequencerPlacement } from './migrate.ts';
export { canonicalJson, canonicalResourceId, checkEntry, InvalidAuditEntryError, leafData, PAYLOAD_BYTES_MAX, resourceIdForms, type AuditRecordFields } from './record.ts';
export { AuditSequencer, BATCH_RECORDS_MAX_DEFAULT, INTERVAL_MS_DEFAULT, type RoundResult, type SequencerOptions } from './sequencer.ts';
export { eventEntry, eventLeafData, eventRecordId, EVENT_LEAF_VERSION } from './event-leaves.ts';
export {
  AuditStore,
  AuditUnrecordedError,
  EventStoreUnreadError,
  EXPIRE_BATCH_DEFAULT,
  EXPIRE_BATCH_MAX,
  LegalHoldError,
  SEARCH_LIMIT_MAX,
  type AuditRecordView,
  type LegalHold,
  type Requester,
  type SearchFilter,
  type SearchPage,
} from './store.ts';
export { consistencyProof, inclusionProof, loadFrontier } from './tree.ts';
export { storedKeyTransitions, verifyLog, type VerifyIssue, type VerifyIssueKind, type VerifyReport } from './verify.ts';
export { AuditBufferFullError, PostgresAuditSink, type PostgresAuditSinkOptions } from './writer.ts';
export { auditedByEvents, auditedInSummary, auditHttp, auditRoutes, defaultActor, originOf, reasonOf, type AuditHttpOptions, type AuditRoute, type AuditRoutesOptions } from './http.ts';
export {
  RATE_LIMITED_OVERFLOW_ACTION,
  RATE_LIMITED_SUMMARY_INTERVAL_MS_DEFAULT,
  RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT,
  RateLimitedSummaries,
  writeRateLimitedSummaries,
  type RateLimitedRefusal,
  type RateLimitedSummariesOptions,
  type RateLimitedSummarySettings,
} from './rate-limited.ts';
export { auditConfigSchema, DEFAULT_LOG_ORIGIN, rateLimitedSummaryFromConfig } from './config.ts';
export { SEQUENCER_APPLICATION_NAME, SEQUENCER_NICE_DEFAULT, SEQUENCER_RESTART_DELAY_MAX_MS_DEFAULT, SEQUENCER_RESTART_DELAY_MS_DEFAULT, startSequencerWorker, type SequencerSupervision, type SequencerWorker, type SequencerWorkerHandlers, type SequencerWorkerOptions } from './sequencer-worker.ts';
export { exportSequencerRestarts, serviceKeyEncryptionKey, previousPublicKeyPems, serviceSigner, startServiceSequencer, type ServiceSequencerConfig } from './startup.ts';
export { auditLegalHolds, type HeldResource, type HeldStream } from './holds.ts';

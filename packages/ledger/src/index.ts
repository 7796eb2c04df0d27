export {
  LedgerEngine,
  LedgerClosedError,
  LedgerOverloadedError,
  LedgerUnavailableError,
  type LedgerEngineOptions,
  type LedgerEngineStats,
} from './engine.ts';
export { migrateLedger } from './migrate.ts';
export { LedgerInputError, newId, isId, ID_ZERO, ID_INT_MAX } from './validate.ts';
export { isRecordedRejection } from './decide.ts';
export * from './types.ts';
export { ACCOUNT_STREAM, LedgerEventType, TRANSFER_STREAM } from './events.ts';

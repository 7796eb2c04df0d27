/**
 * The ledger's data model. Amounts and balances are bigint minor units; ids are 128-bit
 * values written as canonical lowercase UUID strings; timestamps are bigint nanoseconds since
 * the Unix epoch, assigned by the ledger: unique, and increasing in commit order for each
 * account (see the package README, "Batching and concurrency").
 */

/** Largest amount or balance: PostgreSQL's bigint, 2^63 − 1. */
export const AMOUNT_MAX = 9_223_372_036_854_775_807n;

/** Account flags, as stored (bit mask). */
export const AccountFlag = {
  debitsMustNotExceedCredits: 2,
  creditsMustNotExceedDebits: 4,
  closed: 32,
} as const;

/** Transfer flags, as stored (bit mask). */
export const TransferFlag = {
  linked: 1,
  pending: 2,
  postPendingTransfer: 4,
  voidPendingTransfer: 8,
  balancingDebit: 16,
  balancingCredit: 32,
  closingDebit: 64,
  closingCredit: 128,
} as const;

export type AccountFlagName = keyof typeof AccountFlag;
export type TransferFlagName = keyof typeof TransferFlag;
export type AccountFlags = Partial<Record<AccountFlagName, boolean>>;
export type TransferFlags = Partial<Record<TransferFlagName, boolean>>;

/** Small string-to-string metadata, bounded so that a row stays small. */
export type Metadata = Record<string, string>;
export const METADATA_KEYS_MAX = 16;
export const METADATA_KEY_LENGTH_MAX = 64;
export const METADATA_VALUE_LENGTH_MAX = 256;

export interface NewAccount {
  id: string;
  /** The ledger's asset code, for example "USD". */
  ledger: string;
  /** A chart-of-accounts code chosen by the user, 1..65535. */
  code: number;
  flags?: Omit<AccountFlags, 'closed'>;
  metadata?: Metadata;
}

export interface Account {
  id: string;
  ledger: string;
  code: number;
  flags: AccountFlags;
  metadata: Metadata;
  debitsPending: bigint;
  debitsPosted: bigint;
  creditsPending: bigint;
  creditsPosted: bigint;
  timestamp: bigint;
}

export interface NewTransfer {
  /** Chosen by the client; it is the idempotency key of the transfer. */
  id: string;
  /** Required unless this posts or voids a pending transfer (then it may be omitted). */
  debitAccountId?: string;
  creditAccountId?: string;
  /**
   * Minor units, 1..2^63−1. Required unless this posts or voids a pending transfer: there an
   * omitted amount means the pending transfer's full amount.
   */
  amount?: bigint;
  /** The pending transfer that this transfer posts or voids. */
  pendingId?: string;
  ledger?: string;
  code?: number;
  flags?: TransferFlags;
  /** Pending transfers only: seconds after which the reservation expires; 0 means never. */
  timeoutSeconds?: number;
  metadata?: Metadata;
}

export type PendingStatus = 'pending' | 'posted' | 'voided' | 'expired';

export interface Transfer {
  id: string;
  debitAccountId: string | null;
  creditAccountId: string | null;
  amount: bigint;
  pendingId: string | null;
  ledger: string | null;
  code: number | null;
  flags: TransferFlags;
  timeoutSeconds: number;
  metadata: Metadata;
  timestamp: bigint;
  /** `ok` for an applied transfer, otherwise the recorded rejection. */
  result: CreateTransferResultCode;
  /** Pending transfers only. */
  pendingStatus: PendingStatus | null;
  expiresAt: bigint | null;
  resolvedAt: bigint | null;
}

/**
 * Transfer result codes, in order of precedence: a transfer gets the first that applies.
 * The order is documented in packages/ledger/README.md and tested.
 */
export const TRANSFER_RESULT_CODES = [
  'ok',
  'linked_event_failed',
  'linked_event_chain_open',
  // Input validation: decided from the transfer alone, never recorded.
  'id_must_not_be_zero',
  'id_must_not_be_int_max',
  'flags_are_mutually_exclusive',
  'pending_id_must_be_zero',
  'pending_id_must_not_be_zero',
  'pending_id_must_not_be_int_max',
  'pending_id_must_be_different',
  'timeout_reserved_for_pending_transfer',
  'closing_transfer_must_be_pending',
  'debit_account_id_must_not_be_zero',
  'debit_account_id_must_not_be_int_max',
  'credit_account_id_must_not_be_zero',
  'credit_account_id_must_not_be_int_max',
  'accounts_must_be_different',
  'amount_must_not_be_zero',
  'ledger_must_not_be_empty',
  'code_must_not_be_zero',
  'metadata_invalid',
  // Idempotency: the id was seen before.
  'exists_with_different_flags',
  'exists_with_different_pending_id',
  'exists_with_different_timeout',
  'exists_with_different_debit_account_id',
  'exists_with_different_credit_account_id',
  'exists_with_different_amount',
  'exists_with_different_ledger',
  'exists_with_different_code',
  'exists_with_different_metadata',
  'exists',
  // Decided against stored state: recorded, so the id stays failed.
  'pending_transfer_not_found',
  'pending_transfer_not_pending',
  'pending_transfer_has_different_debit_account_id',
  'pending_transfer_has_different_credit_account_id',
  'pending_transfer_has_different_ledger',
  'pending_transfer_has_different_code',
  'exceeds_pending_transfer_amount',
  'pending_transfer_has_different_amount',
  'pending_transfer_already_posted',
  'pending_transfer_already_voided',
  'pending_transfer_expired',
  'debit_account_not_found',
  'credit_account_not_found',
  'ledger_mismatch',
  // Also for a post (never a void), after pending_transfer_expired: only a void may move money
  // in a closed account, so a closing transfer is never posted.
  'debit_account_already_closed',
  'credit_account_already_closed',
  'overflows_debits_pending',
  'overflows_credits_pending',
  'overflows_debits_posted',
  'overflows_credits_posted',
  'overflows_debits',
  'overflows_credits',
  'overflows_timeout',
  'exceeds_credits',
  'exceeds_debits',
] as const;

export type CreateTransferResultCode = (typeof TRANSFER_RESULT_CODES)[number];

export interface CreateTransferResult {
  id: string;
  result: CreateTransferResultCode;
  /**
   * The ledger timestamp of the transfer: for `ok` the new transfer's, for `exists` and for a
   * replayed rejection the original's. Null when nothing was recorded.
   */
  timestamp: bigint | null;
  /** The amount actually moved or reserved (differs from the request for balancing transfers). */
  amount: bigint | null;
}

export const ACCOUNT_RESULT_CODES = [
  'ok',
  'id_must_not_be_zero',
  'id_must_not_be_int_max',
  'flags_are_mutually_exclusive',
  'ledger_must_not_be_empty',
  'code_must_not_be_zero',
  'metadata_invalid',
  'exists_with_different_flags',
  'exists_with_different_ledger',
  'exists_with_different_code',
  'exists_with_different_metadata',
  'exists',
  'ledger_not_found',
] as const;

export type CreateAccountResultCode = (typeof ACCOUNT_RESULT_CODES)[number];

export interface CreateAccountResult {
  id: string;
  result: CreateAccountResultCode;
  timestamp: bigint | null;
}

export interface LedgerInfo {
  code: string;
  scale: number;
  description: string;
}

export interface AccountBalance {
  accountId: string;
  /** The balances include every transfer with a timestamp at or before this one. */
  timestamp: bigint;
  debitsPending: bigint;
  debitsPosted: bigint;
  creditsPending: bigint;
  creditsPosted: bigint;
}

export interface TransferPage {
  transfers: Transfer[];
  /** Pass as `after` to read the next page; null at the end. */
  nextCursor: bigint | null;
}

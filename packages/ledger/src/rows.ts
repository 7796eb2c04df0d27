import {
  AccountFlag,
  TransferFlag,
  type Account,
  type AccountFlags,
  type CreateTransferResultCode,
  type Metadata,
  type PendingStatus,
  type Transfer,
  type TransferFlags,
} from './types.ts';

/** An account as the engine holds it while deciding a batch: flags as a bit mask. */
export interface AccountRow {
  id: string;
  ledger: string;
  code: number;
  flags: number;
  metadata: Metadata;
  debitsPending: bigint;
  debitsPosted: bigint;
  creditsPending: bigint;
  creditsPosted: bigint;
  timestamp: bigint;
  /** The locked row's physical address, for the write of the same transaction. */
  ctid?: string;
}

/** A transfer as stored: applied (`result` = ok) or a recorded rejection. */
export interface TransferRow {
  id: string;
  debitAccountId: string | null;
  creditAccountId: string | null;
  amount: bigint;
  amountRequested: bigint | null;
  pendingId: string | null;
  ledger: string | null;
  code: number | null;
  flags: number;
  timeoutSeconds: number;
  metadata: Metadata;
  timestamp: bigint;
  result: CreateTransferResultCode;
  pendingStatus: PendingStatus | null;
  expiresAt: bigint | null;
  resolvedAt: bigint | null;
}

type FlagTable = Readonly<Record<string, number>>;

function flagsToMask<T extends FlagTable>(table: T, flags: Partial<Record<keyof T, boolean>> | undefined): number {
  let mask = 0;
  if (flags === undefined) return mask;
  for (const [name, bit] of Object.entries(table)) {
    if (flags[name] === true) mask |= bit;
  }
  return mask;
}

function flagsFromMask<T extends FlagTable>(table: T, mask: number): Partial<Record<keyof T, boolean>> {
  const flags: Partial<Record<keyof T, boolean>> = {};
  for (const [name, bit] of Object.entries(table)) {
    if ((mask & bit) !== 0) flags[name as keyof T] = true;
  }
  return flags;
}

export const accountFlagsToMask = (flags: AccountFlags | undefined): number => flagsToMask(AccountFlag, flags);
export const transferFlagsToMask = (flags: TransferFlags | undefined): number => flagsToMask(TransferFlag, flags);
export const accountFlagsFromMask = (mask: number): AccountFlags => flagsFromMask(AccountFlag, mask);
export const transferFlagsFromMask = (mask: number): TransferFlags => flagsFromMask(TransferFlag, mask);

export function accountFromRow(row: AccountRow): Account {
  return {
    id: row.id,
    ledger: row.ledger,
    code: row.code,
    flags: accountFlagsFromMask(row.flags),
    metadata: row.metadata,
    debitsPending: row.debitsPending,
    debitsPosted: row.debitsPosted,
    creditsPending: row.creditsPending,
    creditsPosted: row.creditsPosted,
    timestamp: row.timestamp,
  };
}

export function transferFromRow(row: TransferRow): Transfer {
  return {
    id: row.id,
    debitAccountId: row.debitAccountId,
    creditAccountId: row.creditAccountId,
    amount: row.amount,
    pendingId: row.pendingId,
    ledger: row.ledger,
    code: row.code,
    flags: transferFlagsFromMask(row.flags),
    timeoutSeconds: row.timeoutSeconds,
    metadata: row.metadata,
    timestamp: row.timestamp,
    result: row.result,
    pendingStatus: row.pendingStatus,
    expiresAt: row.expiresAt,
    resolvedAt: row.resolvedAt,
  };
}

/** Metadata equality that ignores key order, as jsonb does. */
export function metadataEqual(a: Metadata, b: Metadata): boolean {
  const aKeys = Object.keys(a);
  if (aKeys.length !== Object.keys(b).length) return false;
  for (const key of aKeys) {
    if (!Object.hasOwn(b, key) || a[key] !== b[key]) return false;
  }
  return true;
}

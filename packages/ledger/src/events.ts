/**
 * The ledger's domain events, appended in the same transaction as the balance change they
 * describe. Streams: `ledger.account/<id>` and `ledger.transfer/<id>`. Amounts and
 * timestamps are strings of digits.
 *
 * | stream | version | type | when |
 * |---|---|---|---|
 * | ledger.account | 1 | AccountOpened | an account is created |
 * | ledger.transfer | 1 | TransferPosted | a plain or balancing transfer is applied |
 * | ledger.transfer | 1 | TransferPending | a pending transfer reserves funds |
 * | ledger.transfer | 1 | PendingTransferPosted | a transfer posts a pending one (carries pendingId) |
 * | ledger.transfer | 1 | PendingTransferVoided | a transfer voids a pending one (carries pendingId) |
 * | ledger.transfer | 1 | TransferRejected | a rejection is recorded (the id stays failed) |
 * | ledger.transfer | 2 | PendingTransferExpired | a pending transfer's timeout released it |
 */
import type { EventMetadata, StreamEvent } from '@ledgerline/events';
import { TransferFlag } from './types.ts';
import { accountFlagsFromMask, transferFlagsFromMask, type AccountRow, type TransferRow } from './rows.ts';

export const ACCOUNT_STREAM = 'ledger.account';
export const TRANSFER_STREAM = 'ledger.transfer';

export const LedgerEventType = {
  accountOpened: 'ledger.AccountOpened',
  transferPosted: 'ledger.TransferPosted',
  transferPending: 'ledger.TransferPending',
  pendingTransferPosted: 'ledger.PendingTransferPosted',
  pendingTransferVoided: 'ledger.PendingTransferVoided',
  transferRejected: 'ledger.TransferRejected',
  pendingTransferExpired: 'ledger.PendingTransferExpired',
} as const;

const str = (v: bigint | null): string | null => (v === null ? null : v.toString());

function transferType(row: TransferRow): string {
  if (row.result !== 'ok') return LedgerEventType.transferRejected;
  if ((row.flags & TransferFlag.postPendingTransfer) !== 0) return LedgerEventType.pendingTransferPosted;
  if ((row.flags & TransferFlag.voidPendingTransfer) !== 0) return LedgerEventType.pendingTransferVoided;
  if ((row.flags & TransferFlag.pending) !== 0) return LedgerEventType.transferPending;
  return LedgerEventType.transferPosted;
}

export function transferEvent(row: TransferRow, metadata: EventMetadata): StreamEvent {
  return {
    streamType: TRANSFER_STREAM,
    streamId: row.id,
    version: 1,
    event: {
      type: transferType(row),
      data: {
        id: row.id,
        debitAccountId: row.debitAccountId,
        creditAccountId: row.creditAccountId,
        amount: row.amount.toString(),
        pendingId: row.pendingId,
        ledger: row.ledger,
        code: row.code,
        flags: transferFlagsFromMask(row.flags),
        timeoutSeconds: row.timeoutSeconds,
        metadata: row.metadata,
        timestamp: row.timestamp.toString(),
        result: row.result,
        expiresAt: str(row.expiresAt),
      },
      metadata,
    },
  };
}

/** The actor of events the ledger causes by itself, such as an expiry. */
export const LEDGER_SYSTEM_ACTOR = 'system:ledger';

export function expiryEvent(pending: TransferRow, metadata: EventMetadata): StreamEvent {
  return {
    streamType: TRANSFER_STREAM,
    streamId: pending.id,
    version: 2,
    event: {
      type: LedgerEventType.pendingTransferExpired,
      data: {
        id: pending.id,
        debitAccountId: pending.debitAccountId,
        creditAccountId: pending.creditAccountId,
        amount: pending.amount.toString(),
        ledger: pending.ledger,
        timestamp: str(pending.resolvedAt),
      },
      metadata,
    },
  };
}

export function accountEvent(account: Pick<AccountRow, 'id' | 'ledger' | 'code' | 'flags' | 'metadata' | 'timestamp'>, metadata: EventMetadata): StreamEvent {
  return {
    streamType: ACCOUNT_STREAM,
    streamId: account.id,
    version: 1,
    event: {
      type: LedgerEventType.accountOpened,
      data: {
        id: account.id,
        ledger: account.ledger,
        code: account.code,
        flags: accountFlagsFromMask(account.flags),
        metadata: account.metadata,
        timestamp: account.timestamp.toString(),
      },
      metadata,
    },
  };
}

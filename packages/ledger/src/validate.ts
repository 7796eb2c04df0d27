import { newUuidV7, storableText } from '@ledgerline/events';
import {
  AMOUNT_MAX,
  METADATA_KEY_LENGTH_MAX,
  METADATA_KEYS_MAX,
  METADATA_VALUE_LENGTH_MAX,
  type Metadata,
  type NewAccount,
  type NewTransfer,
} from './types.ts';

export const ID_ZERO = '00000000-0000-0000-0000-000000000000';
export const ID_INT_MAX = 'ffffffff-ffff-ffff-ffff-ffffffffffff';
const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const LEDGER_PATTERN = /^[A-Z][A-Z0-9]{2,11}$/;

/** A new 128-bit id, time-ordered (UUIDv7), for callers that do not choose their own. */
export function newId(): string {
  return newUuidV7();
}

/**
 * A call that breaks the engine's API contract (a malformed id, an amount outside bigint's
 * range, a non-integer code). It is thrown before anything is queued, so it never affects
 * other callers' transfers. Services validate their input first and never trigger it.
 */
export class LedgerInputError extends Error {
  override readonly name = 'LedgerInputError';
  readonly field: string;
  constructor(field: string, message: string) {
    super(`${field}: ${message}`);
    this.field = field;
  }
}

export function isId(value: unknown): value is string {
  return typeof value === 'string' && UUID_PATTERN.test(value);
}

function checkId(field: string, value: unknown): void {
  if (!isId(value)) {
    throw new LedgerInputError(field, 'must be a UUID string in canonical lowercase form');
  }
}

function checkOptionalId(field: string, value: unknown): void {
  if (value !== undefined) checkId(field, value);
}

function checkAmount(field: string, value: unknown): void {
  if (value === undefined) return;
  if (typeof value !== 'bigint') throw new LedgerInputError(field, 'must be a bigint');
  if (value < 0n || value > AMOUNT_MAX) {
    throw new LedgerInputError(field, 'must be between 0 and 2^63-1 minor units');
  }
}

/** Flags are omitted or an object of booleans; null (a JSON body's) or another type would fail deep inside a batch. */
function checkFlags(field: string, value: unknown): void {
  if (value === undefined) return;
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new LedgerInputError(field, 'must be an object of boolean flags');
  }
}

function checkCode(field: string, value: unknown): void {
  if (value === undefined) return;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 65535) {
    throw new LedgerInputError(field, 'must be an integer between 0 and 65535');
  }
}

function checkLedgerCode(field: string, value: unknown): void {
  if (value === undefined || value === '') return;
  if (typeof value !== 'string' || !LEDGER_PATTERN.test(value)) {
    throw new LedgerInputError(field, 'must be an asset code such as "USD"');
  }
}

/** Checks the API contract of a transfer; business rules become result codes instead. */
export function assertTransferShape(transfer: NewTransfer, index: number): void {
  const at = `transfers[${index}]`;
  if (transfer === null || typeof transfer !== 'object') {
    throw new LedgerInputError(at, 'must be an object');
  }
  checkId(`${at}.id`, transfer.id);
  checkOptionalId(`${at}.debitAccountId`, transfer.debitAccountId);
  checkOptionalId(`${at}.creditAccountId`, transfer.creditAccountId);
  checkOptionalId(`${at}.pendingId`, transfer.pendingId);
  checkAmount(`${at}.amount`, transfer.amount);
  checkCode(`${at}.code`, transfer.code);
  checkLedgerCode(`${at}.ledger`, transfer.ledger);
  checkFlags(`${at}.flags`, transfer.flags);
  const timeout = transfer.timeoutSeconds;
  if (
    timeout !== undefined &&
    (typeof timeout !== 'number' || !Number.isInteger(timeout) || timeout < 0 || timeout > 2 ** 31 - 1)
  ) {
    throw new LedgerInputError(`${at}.timeoutSeconds`, 'must be an integer between 0 and 2^31-1');
  }
}

export function assertAccountShape(account: NewAccount, index: number): void {
  const at = `accounts[${index}]`;
  if (account === null || typeof account !== 'object') {
    throw new LedgerInputError(at, 'must be an object');
  }
  checkId(`${at}.id`, account.id);
  checkCode(`${at}.code`, account.code);
  checkLedgerCode(`${at}.ledger`, account.ledger);
  checkFlags(`${at}.flags`, account.flags);
}

/** Whether metadata fits the documented bounds. */
export function metadataValid(metadata: unknown): metadata is Metadata {
  if (metadata === undefined) return true;
  if (metadata === null || typeof metadata !== 'object' || Array.isArray(metadata)) return false;
  const entries = Object.entries(metadata);
  if (entries.length > METADATA_KEYS_MAX) return false;
  for (const [key, value] of entries) {
    if (!storableText(key) || codePoints(key) === 0 || codePoints(key) > METADATA_KEY_LENGTH_MAX) return false;
    if (typeof value !== 'string' || !storableText(value) || codePoints(value) > METADATA_VALUE_LENGTH_MAX) return false;
  }
  return true;
}

/** Lengths count characters (code points), as JSON Schema's maxLength does. */
function codePoints(text: string): number {
  let n = 0;
  for (const _ of text) n += 1;
  return n;
}


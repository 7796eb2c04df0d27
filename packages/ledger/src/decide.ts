/**
 * The transfer state machine: pure, synchronous, no I/O. The engine loads the rows a batch
 * touches (accounts locked), calls `decideBatch`, and writes back what it returns.
 *
 * Transfers are decided one after another in batch order, each seeing the effects of those
 * before it, exactly as if they had been submitted one at a time. A linked chain is all or
 * nothing: its effects are undone if any member fails.
 */
import { metadataEqual, transferFlagsToMask, type AccountRow, type TransferRow } from './rows.ts';
import {
  AccountFlag,
  AMOUNT_MAX,
  TRANSFER_RESULT_CODES,
  TransferFlag,
  type CreateTransferResult,
  type CreateTransferResultCode,
  type NewTransfer,
} from './types.ts';
import { ID_INT_MAX, ID_ZERO, metadataValid } from './validate.ts';

const NS_PER_SECOND = 1_000_000_000n;
const FIRST_RECORDED = TRANSFER_RESULT_CODES.indexOf('pending_transfer_not_found');

/**
 * Rejections decided against stored state are recorded, so that the id stays failed. Input
 * errors are not: the same input fails the same way every time.
 */
export function isRecordedRejection(code: CreateTransferResultCode): boolean {
  return TRANSFER_RESULT_CODES.indexOf(code) >= FIRST_RECORDED;
}

export interface BatchState {
  /** Every account the batch references that exists, locked. Mutated in place. */
  accounts: Map<string, AccountRow>;
  /** Existing transfers with the batch's ids and pending ids. Mutated in place. */
  transfers: Map<string, TransferRow>;
}

export interface BatchDecision {
  /** One result list per segment (per caller), in order. */
  results: CreateTransferResult[][];
  /** New rows to insert: applied transfers and recorded rejections. */
  inserts: TransferRow[];
  /** Pre-existing pending transfers whose status changed. */
  resolvedPending: TransferRow[];
  /** Accounts whose balances or flags changed. */
  changedAccounts: Set<string>;
}

type Undo = () => void;

interface Context {
  state: BatchState;
  /** Ids of rows created by this batch (inserted, never updated). */
  created: Set<string>;
  resolvedPending: Map<string, TransferRow>;
  changedAccounts: Set<string>;
}

function has(flags: number, bit: number): boolean {
  return (flags & bit) !== 0;
}

/** Input validation: decided from the transfer alone, in precedence order. */
export function validateTransfer(t: NewTransfer): CreateTransferResultCode | null {
  const flags = transferFlagsToMask(t.flags);
  if (t.id === ID_ZERO) return 'id_must_not_be_zero';
  if (t.id === ID_INT_MAX) return 'id_must_not_be_int_max';
  const pending = has(flags, TransferFlag.pending);
  const post = has(flags, TransferFlag.postPendingTransfer);
  const voids = has(flags, TransferFlag.voidPendingTransfer);
  const balancing = has(flags, TransferFlag.balancingDebit | TransferFlag.balancingCredit);
  const closing = has(flags, TransferFlag.closingDebit | TransferFlag.closingCredit);
  if (Number(pending) + Number(post) + Number(voids) > 1) return 'flags_are_mutually_exclusive';
  if ((post || voids) && (balancing || closing)) return 'flags_are_mutually_exclusive';
  if (post || voids) {
    if (t.pendingId === undefined || t.pendingId === ID_ZERO) return 'pending_id_must_not_be_zero';
    if (t.pendingId === ID_INT_MAX) return 'pending_id_must_not_be_int_max';
    if (t.pendingId === t.id) return 'pending_id_must_be_different';
  } else if (t.pendingId !== undefined) {
    return 'pending_id_must_be_zero';
  }
  if (!pending && (t.timeoutSeconds ?? 0) > 0) return 'timeout_reserved_for_pending_transfer';
  if (closing && !pending) return 'closing_transfer_must_be_pending';
  if (post || voids) {
    if (t.debitAccountId === ID_ZERO) return 'debit_account_id_must_not_be_zero';
    if (t.creditAccountId === ID_ZERO) return 'credit_account_id_must_not_be_zero';
    if (t.amount === 0n) return 'amount_must_not_be_zero';
    if (t.code === 0) return 'code_must_not_be_zero';
  } else {
    if (t.debitAccountId === undefined || t.debitAccountId === ID_ZERO) {
      return 'debit_account_id_must_not_be_zero';
    }
    if (t.debitAccountId === ID_INT_MAX) return 'debit_account_id_must_not_be_int_max';
    if (t.creditAccountId === undefined || t.creditAccountId === ID_ZERO) {
      return 'credit_account_id_must_not_be_zero';
    }
    if (t.creditAccountId === ID_INT_MAX) return 'credit_account_id_must_not_be_int_max';
    if (t.debitAccountId === t.creditAccountId) return 'accounts_must_be_different';
    if (t.amount === undefined || t.amount === 0n) return 'amount_must_not_be_zero';
    if (t.ledger === undefined || t.ledger === '') return 'ledger_must_not_be_empty';
    if (t.code === undefined || t.code === 0) return 'code_must_not_be_zero';
  }
  if (!metadataValid(t.metadata)) return 'metadata_invalid';
  return null;
}

/** A retry of a known id: compare the fields the client sent with what was recorded. */
export function compareWithExisting(t: NewTransfer, e: TransferRow): CreateTransferResultCode {
  if (transferFlagsToMask(t.flags) !== e.flags) return 'exists_with_different_flags';
  if ((t.pendingId ?? null) !== e.pendingId) return 'exists_with_different_pending_id';
  if ((t.timeoutSeconds ?? 0) !== e.timeoutSeconds) return 'exists_with_different_timeout';
  if (t.debitAccountId !== undefined && t.debitAccountId !== e.debitAccountId) {
    return 'exists_with_different_debit_account_id';
  }
  if (t.creditAccountId !== undefined && t.creditAccountId !== e.creditAccountId) {
    return 'exists_with_different_credit_account_id';
  }
  if ((t.amount ?? null) !== e.amountRequested) return 'exists_with_different_amount';
  if (t.ledger !== undefined && t.ledger !== e.ledger) return 'exists_with_different_ledger';
  if (t.code !== undefined && t.code !== e.code) return 'exists_with_different_code';
  if (!metadataEqual(t.metadata ?? {}, e.metadata)) return 'exists_with_different_metadata';
  return e.result === 'ok' ? 'exists' : e.result;
}

function addBalance(
  ctx: Context,
  undo: Undo[] | null,
  account: AccountRow,
  field: 'debitsPending' | 'debitsPosted' | 'creditsPending' | 'creditsPosted',
  delta: bigint,
): void {
  account[field] += delta;
  ctx.changedAccounts.add(account.id);
  // Undo by delta, not by snapshot: a pending transfer that expires mid-chain changes the
  // same balances and must survive the chain's rollback.
  undo?.push(() => {
    account[field] -= delta;
  });
}

function setAccountFlag(undo: Undo[] | null, ctx: Context, account: AccountRow, bit: number, on: boolean): void {
  const before = account.flags;
  account.flags = on ? before | bit : before & ~bit;
  ctx.changedAccounts.add(account.id);
  undo?.push(() => {
    account.flags = before;
  });
}

function resolvePending(
  ctx: Context,
  undo: Undo[] | null,
  p: TransferRow,
  status: 'posted' | 'voided' | 'expired',
  timestamp: bigint,
): void {
  const before = { status: p.pendingStatus, resolvedAt: p.resolvedAt };
  p.pendingStatus = status;
  p.resolvedAt = timestamp;
  if (!ctx.created.has(p.id)) ctx.resolvedPending.set(p.id, p);
  undo?.push(() => {
    p.pendingStatus = before.status;
    p.resolvedAt = before.resolvedAt;
  });
}

function mustGetAccount(ctx: Context, id: string | null): AccountRow {
  const account = id === null ? undefined : ctx.state.accounts.get(id);
  // A stored pending transfer always references existing accounts, and the engine loads and
  // locks them before deciding. Anything else is an engine bug: stop, do not guess.
  if (account === undefined) throw new Error(`invariant: account ${id} of a pending transfer not loaded`);
  return account;
}

/** Releases a pending transfer whose timeout has passed. Not undone by a chain rollback. */
export function expirePending(ctx: Context, p: TransferRow, timestamp: bigint): void {
  const dr = mustGetAccount(ctx, p.debitAccountId);
  const cr = mustGetAccount(ctx, p.creditAccountId);
  addBalance(ctx, null, dr, 'debitsPending', -p.amount);
  addBalance(ctx, null, cr, 'creditsPending', -p.amount);
  resolvePending(ctx, null, p, 'expired', timestamp);
  if (has(p.flags, TransferFlag.closingDebit)) setAccountFlag(null, ctx, dr, AccountFlag.closed, false);
  if (has(p.flags, TransferFlag.closingCredit)) setAccountFlag(null, ctx, cr, AccountFlag.closed, false);
}

function baseRow(t: NewTransfer, flags: number, timestamp: bigint): TransferRow {
  return {
    id: t.id,
    debitAccountId: t.debitAccountId ?? null,
    creditAccountId: t.creditAccountId ?? null,
    amount: t.amount ?? 0n,
    amountRequested: t.amount ?? null,
    pendingId: t.pendingId ?? null,
    ledger: t.ledger ?? null,
    code: t.code ?? null,
    flags,
    timeoutSeconds: t.timeoutSeconds ?? 0,
    metadata: t.metadata ?? {},
    timestamp,
    result: 'ok',
    pendingStatus: null,
    expiresAt: null,
    resolvedAt: null,
  };
}

interface Outcome {
  result: CreateTransferResultCode;
  /** The row to insert if the transfer is applied (or its rejection recorded). */
  row: TransferRow | null;
  /** For `exists` and replayed rejections: the original row. */
  original?: TransferRow;
}

function postOrVoid(ctx: Context, undo: Undo[], t: NewTransfer, flags: number, ts: bigint): Outcome {
  const row = baseRow(t, flags, ts);
  const reject = (result: CreateTransferResultCode): Outcome => ({ result, row });
  const p = ctx.state.transfers.get(t.pendingId as string);
  if (p === undefined || p.result !== 'ok') return reject('pending_transfer_not_found');
  if (!has(p.flags, TransferFlag.pending)) return reject('pending_transfer_not_pending');
  if (t.debitAccountId !== undefined && t.debitAccountId !== p.debitAccountId) {
    return reject('pending_transfer_has_different_debit_account_id');
  }
  if (t.creditAccountId !== undefined && t.creditAccountId !== p.creditAccountId) {
    return reject('pending_transfer_has_different_credit_account_id');
  }
  if (t.ledger !== undefined && t.ledger !== p.ledger) return reject('pending_transfer_has_different_ledger');
  if (t.code !== undefined && t.code !== p.code) return reject('pending_transfer_has_different_code');
  const post = has(flags, TransferFlag.postPendingTransfer);
  const amount = post ? (t.amount ?? p.amount) : p.amount;
  if (post && amount > p.amount) return reject('exceeds_pending_transfer_amount');
  if (!post && t.amount !== undefined && t.amount !== p.amount) {
    return reject('pending_transfer_has_different_amount');
  }
  if (p.pendingStatus === 'posted') return reject('pending_transfer_already_posted');
  if (p.pendingStatus === 'voided') return reject('pending_transfer_already_voided');
  if (p.pendingStatus === 'expired') return reject('pending_transfer_expired');
  if (p.expiresAt !== null && p.expiresAt <= ts) {
    expirePending(ctx, p, ts);
    return reject('pending_transfer_expired');
  }
  const dr = mustGetAccount(ctx, p.debitAccountId);
  const cr = mustGetAccount(ctx, p.creditAccountId);
  // As in TigerBeetle, the only movement allowed in a closed account is voiding a pending
  // transfer. So a closing transfer itself can never be posted: only voided (which reopens
  // the account) or expired.
  if (post && has(dr.flags, AccountFlag.closed)) return reject('debit_account_already_closed');
  if (post && has(cr.flags, AccountFlag.closed)) return reject('credit_account_already_closed');
  if (post && dr.debitsPosted + amount > AMOUNT_MAX) return reject('overflows_debits_posted');
  if (post && cr.creditsPosted + amount > AMOUNT_MAX) return reject('overflows_credits_posted');

  addBalance(ctx, undo, dr, 'debitsPending', -p.amount);
  addBalance(ctx, undo, cr, 'creditsPending', -p.amount);
  if (post) {
    addBalance(ctx, undo, dr, 'debitsPosted', amount);
    addBalance(ctx, undo, cr, 'creditsPosted', amount);
  } else {
    // Voiding a closing transfer reopens the account it closed.
    if (has(p.flags, TransferFlag.closingDebit)) setAccountFlag(undo, ctx, dr, AccountFlag.closed, false);
    if (has(p.flags, TransferFlag.closingCredit)) setAccountFlag(undo, ctx, cr, AccountFlag.closed, false);
  }
  resolvePending(ctx, undo, p, post ? 'posted' : 'voided', ts);
  row.debitAccountId = p.debitAccountId;
  row.creditAccountId = p.creditAccountId;
  row.ledger = p.ledger;
  row.code = p.code;
  row.amount = amount;
  remember(ctx, undo, row);
  return { result: 'ok', row };
}

function single(ctx: Context, undo: Undo[], t: NewTransfer, ts: bigint): Outcome {
  const invalid = validateTransfer(t);
  if (invalid !== null) return { result: invalid, row: null };
  const existing = ctx.state.transfers.get(t.id);
  if (existing !== undefined) {
    return { result: compareWithExisting(t, existing), row: null, original: existing };
  }
  const flags = transferFlagsToMask(t.flags);
  if (has(flags, TransferFlag.postPendingTransfer | TransferFlag.voidPendingTransfer)) {
    return postOrVoid(ctx, undo, t, flags, ts);
  }
  const row = baseRow(t, flags, ts);
  const reject = (result: CreateTransferResultCode): Outcome => ({ result, row });
  const dr = ctx.state.accounts.get(t.debitAccountId as string);
  if (dr === undefined) return reject('debit_account_not_found');
  const cr = ctx.state.accounts.get(t.creditAccountId as string);
  if (cr === undefined) return reject('credit_account_not_found');
  if (dr.ledger !== cr.ledger || t.ledger !== dr.ledger) return reject('ledger_mismatch');
  if (has(dr.flags, AccountFlag.closed)) return reject('debit_account_already_closed');
  if (has(cr.flags, AccountFlag.closed)) return reject('credit_account_already_closed');

  let amount = t.amount as bigint;
  if (has(flags, TransferFlag.balancingDebit)) {
    const available = dr.creditsPosted - dr.debitsPosted - dr.debitsPending;
    amount = available <= 0n ? 0n : available < amount ? available : amount;
    if (amount === 0n) return reject('exceeds_credits');
  }
  if (has(flags, TransferFlag.balancingCredit)) {
    const available = cr.debitsPosted - cr.creditsPosted - cr.creditsPending;
    amount = available <= 0n ? 0n : available < amount ? available : amount;
    if (amount === 0n) return reject('exceeds_debits');
  }
  const pending = has(flags, TransferFlag.pending);
  if (pending && dr.debitsPending + amount > AMOUNT_MAX) return reject('overflows_debits_pending');
  if (pending && cr.creditsPending + amount > AMOUNT_MAX) return reject('overflows_credits_pending');
  if (!pending && dr.debitsPosted + amount > AMOUNT_MAX) return reject('overflows_debits_posted');
  if (!pending && cr.creditsPosted + amount > AMOUNT_MAX) return reject('overflows_credits_posted');
  if (dr.debitsPending + dr.debitsPosted + amount > AMOUNT_MAX) return reject('overflows_debits');
  if (cr.creditsPending + cr.creditsPosted + amount > AMOUNT_MAX) return reject('overflows_credits');
  const timeoutNs = BigInt(t.timeoutSeconds ?? 0) * NS_PER_SECOND;
  if (ts + timeoutNs > AMOUNT_MAX) return reject('overflows_timeout');
  if (
    has(dr.flags, AccountFlag.debitsMustNotExceedCredits) &&
    dr.debitsPending + dr.debitsPosted + amount > dr.creditsPosted
  ) {
    return reject('exceeds_credits');
  }
  if (
    has(cr.flags, AccountFlag.creditsMustNotExceedDebits) &&
    cr.creditsPending + cr.creditsPosted + amount > cr.debitsPosted
  ) {
    return reject('exceeds_debits');
  }

  if (pending) {
    addBalance(ctx, undo, dr, 'debitsPending', amount);
    addBalance(ctx, undo, cr, 'creditsPending', amount);
    row.pendingStatus = 'pending';
    row.expiresAt = timeoutNs > 0n ? ts + timeoutNs : null;
  } else {
    addBalance(ctx, undo, dr, 'debitsPosted', amount);
    addBalance(ctx, undo, cr, 'creditsPosted', amount);
  }
  if (has(flags, TransferFlag.closingDebit)) setAccountFlag(undo, ctx, dr, AccountFlag.closed, true);
  if (has(flags, TransferFlag.closingCredit)) setAccountFlag(undo, ctx, cr, AccountFlag.closed, true);
  row.amount = amount;
  remember(ctx, undo, row);
  return { result: 'ok', row };
}

/** Makes an applied transfer visible to later transfers of the batch (undone with its chain). */
function remember(ctx: Context, undo: Undo[], row: TransferRow): void {
  ctx.state.transfers.set(row.id, row);
  ctx.created.add(row.id);
  undo.push(() => {
    ctx.state.transfers.delete(row.id);
    ctx.created.delete(row.id);
  });
}

function isSuccess(result: CreateTransferResultCode): boolean {
  return result === 'ok' || result === 'exists';
}

/**
 * Decides a batch. `segments` are the callers' transfer lists, in arrival order; a linked
 * chain never crosses a segment boundary. Transfer i of the whole batch (counting across
 * segments) gets the timestamp `firstTimestamp + i`.
 */
export function decideBatch(state: BatchState, segments: NewTransfer[][], firstTimestamp: bigint): BatchDecision {
  const ctx: Context = {
    state,
    created: new Set(),
    resolvedPending: new Map(),
    changedAccounts: new Set(),
  };
  const inserts: TransferRow[] = [];
  const results: CreateTransferResult[][] = [];
  let ordinal = 0n;

  const record = (outcome: Outcome): CreateTransferResult & { ok: boolean } => {
    const { result, row, original } = outcome;
    if (original !== undefined) {
      const amount = result === 'exists' ? original.amount : null;
      return { id: original.id, result, timestamp: original.timestamp, amount, ok: isSuccess(result) };
    }
    if (row === null) return { id: '', result, timestamp: null, amount: null, ok: false };
    if (result !== 'ok' && !isRecordedRejection(result)) {
      return { id: row.id, result, timestamp: null, amount: null, ok: false };
    }
    inserts.push(row);
    if (result !== 'ok') {
      // A recorded rejection: keep the request's fields, no effect, and the id stays failed.
      row.result = result;
      row.pendingStatus = null;
      row.expiresAt = null;
      ctx.created.add(row.id);
      state.transfers.set(row.id, row);
    }
    return { id: row.id, result, timestamp: row.timestamp, amount: result === 'ok' ? row.amount : null, ok: result === 'ok' };
  };

  for (const segment of segments) {
    const out = new Array<CreateTransferResult>(segment.length);
    const base = ordinal;
    ordinal += BigInt(segment.length);
    let i = 0;
    while (i < segment.length) {
      const first = segment[i] as NewTransfer;
      if (first.flags?.linked !== true) {
        const r = record(single(ctx, [], first, firstTimestamp + base + BigInt(i)));
        out[i] = { id: first.id, result: r.result, timestamp: r.timestamp, amount: r.amount };
        i += 1;
        continue;
      }
      let end = i;
      while (end < segment.length && segment[end]?.flags?.linked === true) end += 1;
      if (end === segment.length) {
        // The chain never closes: nothing in it is applied.
        for (let k = i; k < end; k += 1) {
          const id = (segment[k] as NewTransfer).id;
          const result = k === end - 1 ? 'linked_event_chain_open' : 'linked_event_failed';
          out[k] = { id, result, timestamp: null, amount: null };
        }
        i = end;
        continue;
      }
      // Members i..end inclusive; the last one closes the chain.
      const undo: Undo[] = [];
      const outcomes: Outcome[] = [];
      let failedAt = -1;
      for (let k = i; k <= end; k += 1) {
        const outcome = single(ctx, undo, segment[k] as NewTransfer, firstTimestamp + base + BigInt(k));
        outcomes.push(outcome);
        if (!isSuccess(outcome.result)) {
          failedAt = k;
          break;
        }
      }
      if (failedAt < 0) {
        for (let k = i; k <= end; k += 1) {
          const r = record(outcomes[k - i] as Outcome);
          out[k] = { id: (segment[k] as NewTransfer).id, result: r.result, timestamp: r.timestamp, amount: r.amount };
        }
      } else {
        for (let u = undo.length - 1; u >= 0; u -= 1) (undo[u] as Undo)();
        for (let k = i; k <= end; k += 1) {
          const id = (segment[k] as NewTransfer).id;
          if (k === failedAt) {
            const outcome = outcomes[k - i] as Outcome;
            const r = record(outcome);
            // An original that the undo took out of the state was created by this chain and
            // never stored: there is no timestamp to report for it.
            const undone = outcome.original !== undefined && state.transfers.get(outcome.original.id) !== outcome.original;
            out[k] = { id, result: r.result, timestamp: undone ? null : r.timestamp, amount: null };
          } else {
            out[k] = { id, result: 'linked_event_failed', timestamp: null, amount: null };
          }
        }
      }
      i = end + 1;
    }
    results.push(out);
  }

  return {
    results,
    inserts,
    resolvedPending: [...ctx.resolvedPending.values()],
    changedAccounts: ctx.changedAccounts,
  };
}

/** Expires due pending transfers (the background sweep). Returns the rows it resolved. */
export function decideExpiry(state: BatchState, due: TransferRow[], firstTimestamp: bigint): BatchDecision {
  const ctx: Context = { state, created: new Set(), resolvedPending: new Map(), changedAccounts: new Set() };
  let ts = firstTimestamp;
  for (const p of due) {
    if (p.pendingStatus !== 'pending' || p.expiresAt === null || p.expiresAt > ts) continue;
    expirePending(ctx, p, ts);
    ts += 1n;
  }
  return { results: [], inserts: [], resolvedPending: [...ctx.resolvedPending.values()], changedAccounts: ctx.changedAccounts };
}

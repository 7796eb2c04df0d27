/**
 * Parallel replay of the ledger's balances. Worker threads read and decode pages of events
 * (the costly part: the driver's row decoding) and reduce each page to a summary; the main
 * thread merges the summaries in page order into the one in-memory state.
 *
 * A summary keeps what is order-free apart from what is not: plain TransferPosted amounts are
 * sums per account (addition commutes), while account openings and every event of a
 * reservation's life (pending, post, void, expiry, which also open and close accounts) stay
 * individual, in their order. Merging a page applies openings, then the ordered events, then
 * the sums, through the same `applyLedgerEvent` checks as a sequential replay.
 */
import type { StoredEvent } from '@ledgerline/events';
import { LedgerEventType } from '@ledgerline/ledger';
import { applyLedgerEvent, LedgerReplayError, type LedgerFoldState } from './ledger-balances.ts';

/** One page, reduced. Plain arrays of strings: cheap to pass between threads. */
export interface LedgerPageSummary {
  events: number;
  /** AccountOpened events, in order: [id, ledger, code, flags JSON]. */
  opened: Array<[string, string, string, string]>;
  /** Reservation events in order: [type, id, pendingId, debit, credit, amount, flags JSON]. */
  ordered: Array<[string, string, string | null, string, string, string, string]>;
  /** Sums of plain TransferPosted amounts: account → [debits posted, credits posted]. */
  posted: Array<[string, string, string]>;
}

const ORDERED: ReadonlySet<string> = new Set([
  LedgerEventType.transferPending,
  LedgerEventType.pendingTransferPosted,
  LedgerEventType.pendingTransferVoided,
  LedgerEventType.pendingTransferExpired,
]);

function text(v: unknown): string {
  if (v === null || v === undefined) return '';
  return typeof v === 'string' ? v : JSON.stringify(v);
}

function amountOf(e: StoredEvent): bigint {
  const v = e.data.amount;
  if (typeof v !== 'string' || !/^[0-9]{1,19}$/.test(v)) throw new LedgerReplayError(`${e.type} at position ${e.position}: amount ${String(v)} is not minor units`);
  return BigInt(v);
}

/** Reduces one page (events in global order) to its summary. Pure. */
export function summarizeLedgerPage(events: readonly StoredEvent[]): LedgerPageSummary {
  const opened: LedgerPageSummary['opened'] = [];
  const ordered: LedgerPageSummary['ordered'] = [];
  const sums = new Map<string, [bigint, bigint]>();
  const sum = (id: unknown, e: StoredEvent, side: 0 | 1, n: bigint): void => {
    if (typeof id !== 'string') throw new LedgerReplayError(`${e.type} at position ${e.position}: account missing`);
    const s = sums.get(id) ?? [0n, 0n];
    s[side] += n;
    sums.set(id, s);
  };
  for (const e of events) {
    const d = e.data;
    if (e.type === LedgerEventType.transferPosted) {
      const n = amountOf(e);
      sum(d.debitAccountId, e, 0, n);
      sum(d.creditAccountId, e, 1, n);
    } else if (e.type === LedgerEventType.accountOpened) {
      opened.push([text(d.id), text(d.ledger), text(d.code), text(d.flags)]);
    } else if (ORDERED.has(e.type)) {
      const pendingId = typeof d.pendingId === 'string' ? d.pendingId : null;
      ordered.push([e.type, text(d.id), pendingId, text(d.debitAccountId), text(d.creditAccountId), text(d.amount), text(d.flags)]);
    }
  }
  const posted = [...sums].map(([id, [dr, cr]]): [string, string, string] => [id, dr.toString(), cr.toString()]);
  return { events: events.length, opened, ordered, posted };
}

function present(v: string): string | undefined {
  return v === '' ? undefined : v;
}

/** Applies one page's summary to the state; adds every account it touched to `dirty`. */
export function mergeLedgerPage(state: LedgerFoldState, s: LedgerPageSummary, dirty: Set<string>): void {
  for (const [id, ledger, code, flags] of s.opened) {
    applyLedgerEvent(state, { type: LedgerEventType.accountOpened, data: { id, ledger, code, flags: present(flags) ?? null } });
    dirty.add(id);
  }
  for (const [type, id, pendingId, debitAccountId, creditAccountId, amount, flags] of s.ordered) {
    const data = {
      id,
      pendingId,
      debitAccountId: present(debitAccountId),
      creditAccountId: present(creditAccountId),
      amount: present(amount),
      flags: present(flags) ?? null,
    };
    applyLedgerEvent(state, { type, data });
    dirty.add(debitAccountId);
    dirty.add(creditAccountId);
  }
  for (const [id, dr, cr] of s.posted) {
    const a = state.accounts.get(id);
    if (a === undefined) throw new LedgerReplayError(`a transfer posted to account ${id}, which was never opened`);
    a.debitsPosted += BigInt(dr);
    a.creditsPosted += BigInt(cr);
    if (a.debitsPosted > AMOUNT_MAX || a.creditsPosted > AMOUNT_MAX) throw new LedgerReplayError(`account ${id}: posted balances overflow`);
    dirty.add(id);
  }
}

const AMOUNT_MAX = 9_223_372_036_854_775_807n;

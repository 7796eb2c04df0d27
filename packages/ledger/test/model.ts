/**
 * A reference model of the ledger: plain maps, one transfer at a time, chains undone by
 * restoring a snapshot. Written from the documented rules (README), independently of
 * decide.ts, so that comparing the two finds mistakes in either.
 */
import type { CreateTransferResultCode, NewAccount, NewTransfer } from '../src/index.ts';

const MAX = 2n ** 63n - 1n;
const ZERO = '00000000-0000-0000-0000-000000000000';
const FFFF = 'ffffffff-ffff-ffff-ffff-ffffffffffff';
const LEDGERS = new Set(['USD', 'EUR', 'GBP', 'CHF', 'JPY', 'KWD', 'SEK', 'PLN']);

export interface ModelAccount {
  id: string;
  ledger: string;
  code: number;
  mustNotExceedCredits: boolean;
  mustNotExceedDebits: boolean;
  closed: boolean;
  metadata: Record<string, string>;
  dp: bigint;
  dpo: bigint;
  cp: bigint;
  cpo: bigint;
}

interface ModelTransfer {
  req: NewTransfer;
  result: CreateTransferResultCode;
  timestamp: bigint;
  debit: string | null;
  credit: string | null;
  ledger: string | null;
  code: number | null;
  amount: bigint;
  status: 'pending' | 'posted' | 'voided' | 'expired' | null;
  expiresAt: bigint | null;
}

export interface ModelResult {
  result: string;
  timestamp: bigint | null;
  amount: bigint | null;
}

function flagsKey(t: NewTransfer): string {
  const f = t.flags ?? {};
  return Object.keys(f)
    .filter((k) => f[k as keyof typeof f] === true)
    .sort()
    .join(',');
}

function sameMetadata(a: Record<string, string> | undefined, b: Record<string, string> | undefined): boolean {
  const x = a ?? {};
  const y = b ?? {};
  return Object.keys(x).length === Object.keys(y).length && Object.keys(x).every((k) => x[k] === y[k]);
}

const RECORDED = new Set<string>([
  'pending_transfer_not_found', 'pending_transfer_not_pending',
  'pending_transfer_has_different_debit_account_id', 'pending_transfer_has_different_credit_account_id',
  'pending_transfer_has_different_ledger', 'pending_transfer_has_different_code',
  'exceeds_pending_transfer_amount', 'pending_transfer_has_different_amount',
  'pending_transfer_already_posted', 'pending_transfer_already_voided', 'pending_transfer_expired',
  'debit_account_not_found', 'credit_account_not_found', 'ledger_mismatch',
  'debit_account_already_closed', 'credit_account_already_closed',
  'overflows_debits_pending', 'overflows_credits_pending', 'overflows_debits_posted',
  'overflows_credits_posted', 'overflows_debits', 'overflows_credits', 'overflows_timeout',
  'exceeds_credits', 'exceeds_debits',
]);

export class LedgerModel {
  accounts = new Map<string, ModelAccount>();
  transfers = new Map<string, ModelTransfer>();
  lastTimestamp = 0n;

  #reserve(count: number, nowNs: bigint): bigint {
    const first = this.lastTimestamp + 1n > nowNs ? this.lastTimestamp + 1n : nowNs;
    this.lastTimestamp = first + BigInt(count) - 1n;
    return first;
  }

  createAccounts(list: NewAccount[], nowNs: bigint): string[] {
    this.#reserve(list.length, nowNs);
    return list.map((a) => {
      if (a.id === ZERO) return 'id_must_not_be_zero';
      if (a.id === FFFF) return 'id_must_not_be_int_max';
      const dr = a.flags?.debitsMustNotExceedCredits === true;
      const cr = a.flags?.creditsMustNotExceedDebits === true;
      if (dr && cr) return 'flags_are_mutually_exclusive';
      if (a.code === 0) return 'code_must_not_be_zero';
      const e = this.accounts.get(a.id);
      if (e !== undefined) {
        if (e.mustNotExceedCredits !== dr || e.mustNotExceedDebits !== cr) return 'exists_with_different_flags';
        if (e.ledger !== a.ledger) return 'exists_with_different_ledger';
        if (e.code !== a.code) return 'exists_with_different_code';
        if (!sameMetadata(e.metadata, a.metadata)) return 'exists_with_different_metadata';
        return 'exists';
      }
      if (!LEDGERS.has(a.ledger)) return 'ledger_not_found';
      this.accounts.set(a.id, {
        id: a.id, ledger: a.ledger, code: a.code, mustNotExceedCredits: dr, mustNotExceedDebits: cr,
        closed: false, metadata: a.metadata ?? {}, dp: 0n, dpo: 0n, cp: 0n, cpo: 0n,
      });
      return 'ok';
    });
  }

  #expire(p: ModelTransfer): void {
    const dr = this.accounts.get(p.debit as string) as ModelAccount;
    const cr = this.accounts.get(p.credit as string) as ModelAccount;
    dr.dp -= p.amount;
    cr.cp -= p.amount;
    p.status = 'expired';
    if (p.req.flags?.closingDebit === true) dr.closed = false;
    if (p.req.flags?.closingCredit === true) cr.closed = false;
  }

  /** The background sweep: expires what is due at `nowNs`, oldest deadline first. */
  sweep(nowNs: bigint): number {
    const due = [...this.transfers.values()]
      .filter((t) => t.status === 'pending' && t.expiresAt !== null && t.expiresAt <= nowNs)
      .sort((a, b) => (a.expiresAt! < b.expiresAt! ? -1 : a.expiresAt! > b.expiresAt! ? 1 : 0))
      .slice(0, 1000);
    if (due.length === 0) return 0;
    this.#reserve(due.length, nowNs);
    for (const p of due) this.#expire(p);
    return due.length;
  }

  #validate(t: NewTransfer): CreateTransferResultCode | null {
    const f = t.flags ?? {};
    const pv = f.postPendingTransfer === true || f.voidPendingTransfer === true;
    if (t.id === ZERO) return 'id_must_not_be_zero';
    if (t.id === FFFF) return 'id_must_not_be_int_max';
    const kinds = [f.pending, f.postPendingTransfer, f.voidPendingTransfer].filter((x) => x === true).length;
    if (kinds > 1) return 'flags_are_mutually_exclusive';
    if (pv && (f.balancingDebit || f.balancingCredit || f.closingDebit || f.closingCredit)) return 'flags_are_mutually_exclusive';
    if (pv) {
      if (t.pendingId === undefined || t.pendingId === ZERO) return 'pending_id_must_not_be_zero';
      if (t.pendingId === FFFF) return 'pending_id_must_not_be_int_max';
      if (t.pendingId === t.id) return 'pending_id_must_be_different';
    } else if (t.pendingId !== undefined) return 'pending_id_must_be_zero';
    if (f.pending !== true && (t.timeoutSeconds ?? 0) > 0) return 'timeout_reserved_for_pending_transfer';
    if ((f.closingDebit || f.closingCredit) && f.pending !== true) return 'closing_transfer_must_be_pending';
    if (pv) {
      if (t.debitAccountId === ZERO) return 'debit_account_id_must_not_be_zero';
      if (t.creditAccountId === ZERO) return 'credit_account_id_must_not_be_zero';
      if (t.amount === 0n) return 'amount_must_not_be_zero';
      if (t.code === 0) return 'code_must_not_be_zero';
      return null;
    }
    if (t.debitAccountId === undefined || t.debitAccountId === ZERO) return 'debit_account_id_must_not_be_zero';
    if (t.debitAccountId === FFFF) return 'debit_account_id_must_not_be_int_max';
    if (t.creditAccountId === undefined || t.creditAccountId === ZERO) return 'credit_account_id_must_not_be_zero';
    if (t.creditAccountId === FFFF) return 'credit_account_id_must_not_be_int_max';
    if (t.debitAccountId === t.creditAccountId) return 'accounts_must_be_different';
    if (t.amount === undefined || t.amount === 0n) return 'amount_must_not_be_zero';
    if (t.ledger === undefined || t.ledger === '') return 'ledger_must_not_be_empty';
    if (t.code === undefined || t.code === 0) return 'code_must_not_be_zero';
    return null;
  }

  #exists(t: NewTransfer, e: ModelTransfer): CreateTransferResultCode {
    if (flagsKey(t) !== flagsKey(e.req)) return 'exists_with_different_flags';
    if ((t.pendingId ?? null) !== (e.req.pendingId ?? null)) return 'exists_with_different_pending_id';
    if ((t.timeoutSeconds ?? 0) !== (e.req.timeoutSeconds ?? 0)) return 'exists_with_different_timeout';
    if (t.debitAccountId !== undefined && t.debitAccountId !== e.debit) return 'exists_with_different_debit_account_id';
    if (t.creditAccountId !== undefined && t.creditAccountId !== e.credit) return 'exists_with_different_credit_account_id';
    if ((t.amount ?? null) !== (e.req.amount ?? null)) return 'exists_with_different_amount';
    if (t.ledger !== undefined && t.ledger !== e.ledger) return 'exists_with_different_ledger';
    if (t.code !== undefined && t.code !== e.code) return 'exists_with_different_code';
    if (!sameMetadata(t.metadata, e.req.metadata)) return 'exists_with_different_metadata';
    return e.result === 'ok' ? 'exists' : e.result;
  }

  /** One transfer. Returns its result, and the pending transfers it expired on the way. */
  #one(t: NewTransfer, ts: bigint, expired: ModelTransfer[]): ModelResult {
    const invalid = this.#validate(t);
    if (invalid !== null) return { result: invalid, timestamp: null, amount: null };
    const e = this.transfers.get(t.id);
    if (e !== undefined) {
      const result = this.#exists(t, e);
      return { result, timestamp: e.timestamp, amount: result === 'exists' ? e.amount : null };
    }
    const f = t.flags ?? {};
    const rec: ModelTransfer = {
      req: t, result: 'ok', timestamp: ts, debit: t.debitAccountId ?? null, credit: t.creditAccountId ?? null,
      ledger: t.ledger ?? null, code: t.code ?? null, amount: t.amount ?? 0n, status: null, expiresAt: null,
    };
    const fail = (result: CreateTransferResultCode): ModelResult => {
      rec.result = result;
      return { result, timestamp: ts, amount: null };
    };
    const ok = (): ModelResult => {
      this.transfers.set(t.id, rec);
      return { result: 'ok', timestamp: ts, amount: rec.amount };
    };
    if (f.postPendingTransfer === true || f.voidPendingTransfer === true) {
      const post = f.postPendingTransfer === true;
      const p = this.transfers.get(t.pendingId as string);
      if (p === undefined || p.result !== 'ok') return fail('pending_transfer_not_found');
      if (p.req.flags?.pending !== true) return fail('pending_transfer_not_pending');
      if (t.debitAccountId !== undefined && t.debitAccountId !== p.debit) return fail('pending_transfer_has_different_debit_account_id');
      if (t.creditAccountId !== undefined && t.creditAccountId !== p.credit) return fail('pending_transfer_has_different_credit_account_id');
      if (t.ledger !== undefined && t.ledger !== p.ledger) return fail('pending_transfer_has_different_ledger');
      if (t.code !== undefined && t.code !== p.code) return fail('pending_transfer_has_different_code');
      const amount = post ? (t.amount ?? p.amount) : p.amount;
      if (post && amount > p.amount) return fail('exceeds_pending_transfer_amount');
      if (!post && t.amount !== undefined && t.amount !== p.amount) return fail('pending_transfer_has_different_amount');
      if (p.status === 'posted') return fail('pending_transfer_already_posted');
      if (p.status === 'voided') return fail('pending_transfer_already_voided');
      if (p.status === 'expired') return fail('pending_transfer_expired');
      if (p.expiresAt !== null && p.expiresAt <= ts) {
        this.#expire(p);
        expired.push(p);
        return fail('pending_transfer_expired');
      }
      const dr = this.accounts.get(p.debit as string) as ModelAccount;
      const cr = this.accounts.get(p.credit as string) as ModelAccount;
      // Only a void may move money in a closed account: a closing transfer is never posted.
      if (post && dr.closed) return fail('debit_account_already_closed');
      if (post && cr.closed) return fail('credit_account_already_closed');
      if (post && dr.dpo + amount > MAX) return fail('overflows_debits_posted');
      if (post && cr.cpo + amount > MAX) return fail('overflows_credits_posted');
      dr.dp -= p.amount;
      cr.cp -= p.amount;
      if (post) {
        dr.dpo += amount;
        cr.cpo += amount;
      } else {
        if (p.req.flags?.closingDebit === true) dr.closed = false;
        if (p.req.flags?.closingCredit === true) cr.closed = false;
      }
      p.status = post ? 'posted' : 'voided';
      Object.assign(rec, { debit: p.debit, credit: p.credit, ledger: p.ledger, code: p.code, amount });
      return ok();
    }
    const dr = this.accounts.get(t.debitAccountId as string);
    if (dr === undefined) return fail('debit_account_not_found');
    const cr = this.accounts.get(t.creditAccountId as string);
    if (cr === undefined) return fail('credit_account_not_found');
    if (dr.ledger !== cr.ledger || dr.ledger !== t.ledger) return fail('ledger_mismatch');
    if (dr.closed) return fail('debit_account_already_closed');
    if (cr.closed) return fail('credit_account_already_closed');
    let amount = t.amount as bigint;
    if (f.balancingDebit === true) {
      const avail = dr.cpo - dr.dpo - dr.dp;
      amount = avail < amount ? (avail > 0n ? avail : 0n) : amount;
      if (amount === 0n) return fail('exceeds_credits');
    }
    if (f.balancingCredit === true) {
      const avail = cr.dpo - cr.cpo - cr.cp;
      amount = avail < amount ? (avail > 0n ? avail : 0n) : amount;
      if (amount === 0n) return fail('exceeds_debits');
    }
    const pending = f.pending === true;
    if (pending && dr.dp + amount > MAX) return fail('overflows_debits_pending');
    if (pending && cr.cp + amount > MAX) return fail('overflows_credits_pending');
    if (!pending && dr.dpo + amount > MAX) return fail('overflows_debits_posted');
    if (!pending && cr.cpo + amount > MAX) return fail('overflows_credits_posted');
    if (dr.dp + dr.dpo + amount > MAX) return fail('overflows_debits');
    if (cr.cp + cr.cpo + amount > MAX) return fail('overflows_credits');
    const timeoutNs = BigInt(t.timeoutSeconds ?? 0) * 1_000_000_000n;
    if (ts + timeoutNs > MAX) return fail('overflows_timeout');
    if (dr.mustNotExceedCredits && dr.dp + dr.dpo + amount > dr.cpo) return fail('exceeds_credits');
    if (cr.mustNotExceedDebits && cr.cp + cr.cpo + amount > cr.dpo) return fail('exceeds_debits');
    if (pending) {
      dr.dp += amount;
      cr.cp += amount;
      rec.status = 'pending';
      rec.expiresAt = timeoutNs > 0n ? ts + timeoutNs : null;
    } else {
      dr.dpo += amount;
      cr.cpo += amount;
    }
    if (f.closingDebit === true) dr.closed = true;
    if (f.closingCredit === true) cr.closed = true;
    rec.amount = amount;
    return ok();
  }

  #record(t: NewTransfer, r: ModelResult, ts: bigint): ModelResult {
    if (RECORDED.has(r.result) && !this.transfers.has(t.id)) {
      this.transfers.set(t.id, {
        req: t, result: r.result as CreateTransferResultCode, timestamp: ts, debit: t.debitAccountId ?? null,
        credit: t.creditAccountId ?? null, ledger: t.ledger ?? null, code: t.code ?? null, amount: t.amount ?? 0n,
        status: null, expiresAt: null,
      });
    }
    return r;
  }

  createTransfers(list: NewTransfer[], nowNs: bigint): ModelResult[] {
    const first = this.#reserve(list.length, nowNs);
    const out: ModelResult[] = [];
    let i = 0;
    while (i < list.length) {
      const ts = (k: number): bigint => first + BigInt(k);
      if (list[i]!.flags?.linked !== true) {
        out.push(this.#record(list[i]!, this.#one(list[i]!, ts(i), []), ts(i)));
        i += 1;
        continue;
      }
      let end = i;
      while (end < list.length && list[end]!.flags?.linked === true) end += 1;
      if (end === list.length) {
        for (let k = i; k < end; k += 1) {
          out.push({ result: k === end - 1 ? 'linked_event_chain_open' : 'linked_event_failed', timestamp: null, amount: null });
        }
        break;
      }
      const snapshot = this.#snapshot();
      const expired: ModelTransfer[] = [];
      const chain: ModelResult[] = [];
      let failed = -1;
      for (let k = i; k <= end; k += 1) {
        const r = this.#one(list[k]!, ts(k), expired);
        chain.push(r);
        if (r.result !== 'ok' && r.result !== 'exists') {
          failed = k;
          break;
        }
      }
      if (failed < 0) {
        out.push(...chain);
      } else {
        this.#restore(snapshot);
        // Expiry is a consequence of time, not of the chain: it stays.
        for (const p of expired) this.#expire(this.transfers.get(p.req.id)!);
        for (let k = i; k <= end; k += 1) {
          if (k === failed) {
            const r = chain[k - i]!;
            // A clash with an earlier member of this chain: that member was rolled back with
            // the chain, so there is no original timestamp to report.
            const clashUndone = r.result.startsWith('exists_with_different_') && !this.transfers.has(list[k]!.id);
            out.push(this.#record(list[k]!, clashUndone ? { ...r, timestamp: null } : r, ts(k)));
          } else {
            out.push({ result: 'linked_event_failed', timestamp: null, amount: null });
          }
        }
      }
      i = end + 1;
    }
    return out;
  }

  #snapshot(): { accounts: Map<string, ModelAccount>; transfers: Map<string, ModelTransfer> } {
    return {
      accounts: new Map([...this.accounts].map(([k, v]) => [k, { ...v }])),
      transfers: new Map([...this.transfers].map(([k, v]) => [k, { ...v }])),
    };
  }

  #restore(s: { accounts: Map<string, ModelAccount>; transfers: Map<string, ModelTransfer> }): void {
    this.accounts = s.accounts;
    this.transfers = s.transfers;
  }
}

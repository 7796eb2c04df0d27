/**
 * The ledger fold refuses events that contradict the books, naming the event and its
 * position, instead of guessing (pure: no database). The page summaries used by parallel
 * replays fold to exactly what the events fold to one by one.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { LedgerEventType as T } from '@ledgerline/ledger';
import type { StoredEvent } from '@ledgerline/events';
import { applyLedgerEvent, emptyLedgerState, LedgerReplayError, type LedgerFoldState } from '../src/index.ts';
import { mergeLedgerPage, summarizeLedgerPage } from '../src/ledger-replay.ts';

const A = '00000000-0000-7000-8000-00000000000a';
const B = '00000000-0000-7000-8000-00000000000b';

function opened(): LedgerFoldState {
  const s = emptyLedgerState();
  applyLedgerEvent(s, { type: T.accountOpened, data: { id: A, ledger: 'USD', code: 1, flags: {} } });
  applyLedgerEvent(s, { type: T.accountOpened, data: { id: B, ledger: 'USD', code: '1', flags: '{"creditsMustNotExceedDebits":true}' } });
  return s;
}

const transfer = (type: string, data: Record<string, unknown>, position = 7n) => ({ type, data: { debitAccountId: A, creditAccountId: B, ...data }, position });

function refuses(state: LedgerFoldState, e: Parameters<typeof applyLedgerEvent>[1], message: RegExp): void {
  assert.throws(() => applyLedgerEvent(state, e), (x: unknown) => x instanceof LedgerReplayError && message.test(x.message));
}

describe('ledger fold: contradictions are refused with the event named', () => {
  test('accounts', () => {
    const s = opened();
    assert.equal(s.accounts.get(B)?.flags, 4, 'flags from JSON text (lean reads) and from objects alike');
    refuses(s, { type: T.accountOpened, data: { id: A, ledger: 'USD', code: 1 }, position: 3n }, /ledger.AccountOpened at position 3: account .* opened twice/);
    refuses(emptyLedgerState(), { type: T.accountOpened, data: { id: A, ledger: 'USD' } }, /code missing/);
    refuses(emptyLedgerState(), { type: T.accountOpened, data: { id: '', ledger: 'USD', code: 1 } }, /id missing/);
    refuses(s, transfer(T.transferPosted, { amount: '5', creditAccountId: 'nope' }), /account nope was never opened/);
  });
  test('amounts', () => {
    const s = opened();
    refuses(s, transfer(T.transferPosted, { amount: '-5' }), /amount -5 is not minor units/);
    refuses(s, transfer(T.transferPosted, { amount: '9223372036854775808' }), /is not minor units/);
    applyLedgerEvent(s, transfer(T.transferPosted, { amount: '9223372036854775807' }));
    refuses(s, transfer(T.transferPosted, { amount: '1' }), /debitsPosted of .* would become 9223372036854775808/);
  });
  test('reservations', () => {
    const s = opened();
    refuses(s, transfer(T.pendingTransferPosted, { id: 't2', pendingId: 'missing', amount: '1' }), /pending transfer missing is not pending/);
    applyLedgerEvent(s, transfer(T.transferPending, { id: 'p1', amount: '10', flags: { pending: true, closingDebit: true } }));
    assert.equal(s.accounts.get(A)?.flags, 32, 'a closing reservation closes the account');
    refuses(structuredClone(s), transfer(T.pendingTransferPosted, { id: 't3', pendingId: 'p1', amount: '11' }), /posts 11, more than the 10 reserved/);
    applyLedgerEvent(s, transfer(T.pendingTransferExpired, { id: 'p1', amount: '10' }));
    assert.deepEqual([s.accounts.get(A)?.flags, s.accounts.get(A)?.debitsPending, s.pending.size], [0, 0n, 0], 'expiry releases and reopens');
    refuses(s, transfer(T.pendingTransferVoided, { id: 't4', pendingId: 'p1' }), /p1 is not pending/);
    applyLedgerEvent(s, { type: 'other.Thing', data: {} });
    applyLedgerEvent(s, transfer(T.transferRejected, { id: 't5', amount: '1' }));
    assert.equal(s.accounts.get(A)?.debitsPosted, 0n, 'rejections and other events move nothing');
  });
});

describe('ledger page summaries', () => {
  test('summarize-then-merge equals folding one by one, and keeps the checks', () => {
    let position = 0n;
    const ev = (type: string, data: Record<string, unknown>): StoredEvent => {
      position += 1n;
      return { position, transactionId: 1n, partition: 0, id: `e${position}`, streamType: 'ledger.transfer', streamId: 's', version: 1, type, schemaVersion: 1, data, metadata: {}, recordedAt: new Date(0) };
    };
    const events = [
      ev(T.accountOpened, { id: A, ledger: 'USD', code: '1', flags: '{}' }),
      ev(T.accountOpened, { id: B, ledger: 'USD', code: '1', flags: null }),
      ev(T.transferPosted, { debitAccountId: A, creditAccountId: B, amount: '40' }),
      ev(T.transferPending, { id: 'p1', debitAccountId: B, creditAccountId: A, amount: '7', flags: '{"pending":true,"closingCredit":true}' }),
      ev(T.transferPosted, { debitAccountId: B, creditAccountId: A, amount: '3' }),
      ev(T.pendingTransferPosted, { id: 'x', pendingId: 'p1', debitAccountId: B, creditAccountId: A, amount: '5' }),
      ev(T.transferPending, { id: 'p2', debitAccountId: A, creditAccountId: B, amount: '2', flags: '{"pending":true}' }),
      ev(T.pendingTransferVoided, { id: 'y', pendingId: 'p2', debitAccountId: A, creditAccountId: B, amount: '2' }),
      ev(T.transferRejected, { id: 'z', debitAccountId: A, creditAccountId: B, amount: '1' }),
    ];
    const oneByOne = emptyLedgerState();
    for (const e of events) applyLedgerEvent(oneByOne, e);
    const merged = emptyLedgerState();
    const dirty = new Set<string>();
    for (const page of [events.slice(0, 4), events.slice(4)]) mergeLedgerPage(merged, summarizeLedgerPage(page), dirty);
    assert.deepEqual(merged, oneByOne);
    assert.deepEqual([...dirty].sort(), [A, B]);
    assert.throws(() => summarizeLedgerPage([ev(T.transferPosted, { debitAccountId: A, creditAccountId: B, amount: 'x' })]), /amount x is not minor units/);
    assert.throws(() => summarizeLedgerPage([ev(T.transferPosted, { creditAccountId: B, amount: '1' })]), /account missing/);
    assert.throws(() => mergeLedgerPage(emptyLedgerState(), summarizeLedgerPage([ev(T.transferPosted, { debitAccountId: A, creditAccountId: B, amount: '1' })]), dirty), /never opened/);
    const full = opened();
    full.accounts.get(A)!.debitsPosted = 9_223_372_036_854_775_807n;
    assert.throws(() => mergeLedgerPage(full, summarizeLedgerPage([ev(T.transferPosted, { debitAccountId: A, creditAccountId: B, amount: '1' })]), dirty), /posted balances overflow/);
  });
});

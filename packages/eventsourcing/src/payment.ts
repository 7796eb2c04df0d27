/**
 * A real aggregate: the lifecycle of a card payment.
 *
 *   initiated → authorized → captured (in one or more partial captures) → refunded
 *        ↘ failed         ↘ cancelled (before any capture)
 *
 * Amounts are minor units (bigint in the state, strings of digits in events). The money rules:
 * capture at most what was authorized, refund at most what was captured and not yet refunded,
 * and a refund id is applied once (the same refund again is a no-op; the same id with a
 * different amount is refused).
 *
 * Schema evolution: `payment.Initiated` v1 carried `amount`; v2 renamed it `amountMinor` and
 * added `channel`. Rows written as v1 stay v1 and are upcast when loaded.
 */
import { DomainRejection, type Decider } from './decider.ts';
import type { AggregateDefinition, SnapshotOptions } from './aggregate.ts';
import { Upcasters } from './upcast.ts';

export const PAYMENT_STREAM = 'payment';
/** Most refunds per payment: bounds the state and its snapshot. */
export const PAYMENT_REFUNDS_MAX = 100;
const AMOUNT_MAX = 9_223_372_036_854_775_807n;

export type PaymentStatus = 'none' | 'initiated' | 'authorized' | 'captured' | 'refunded' | 'cancelled' | 'failed';

export interface PaymentState {
  status: PaymentStatus;
  amountMinor: bigint;
  currency: string;
  capturedMinor: bigint;
  refundedMinor: bigint;
  /** Refund id → amount, so a retried refund is recognised. */
  refunds: ReadonlyMap<string, bigint>;
}

export type PaymentCommand =
  | { type: 'Initiate'; amountMinor: bigint; currency: string; payer: string; payee: string; channel: string }
  | { type: 'Authorize'; authorizationCode: string }
  | { type: 'Fail'; reason: string }
  | { type: 'Capture'; amountMinor: bigint }
  | { type: 'Cancel'; reason: string }
  | { type: 'Refund'; refundId: string; amountMinor: bigint };

export type PaymentEvent =
  | { type: 'payment.Initiated'; data: { amountMinor: string; currency: string; payer: string; payee: string; channel: string } }
  | { type: 'payment.Authorized'; data: { authorizationCode: string } }
  | { type: 'payment.Failed'; data: { reason: string } }
  | { type: 'payment.Captured'; data: { amountMinor: string } }
  | { type: 'payment.Cancelled'; data: { reason: string } }
  | { type: 'payment.Refunded'; data: { refundId: string; amountMinor: string } };

export const initialPaymentState: PaymentState = {
  status: 'none',
  amountMinor: 0n,
  currency: '',
  capturedMinor: 0n,
  refundedMinor: 0n,
  refunds: new Map(),
};

function reject(code: string, message: string): never {
  throw new DomainRejection(code, message);
}

function positiveAmount(amount: bigint): void {
  if (!(amount > 0n && amount <= AMOUNT_MAX)) reject('amount_invalid', `amount must be 1..2^63-1 minor units, got ${amount}`);
}

export function decidePayment(command: PaymentCommand, state: PaymentState): PaymentEvent[] {
  switch (command.type) {
    case 'Initiate': {
      if (state.status !== 'none') reject('payment_exists', `payment is already ${state.status}`);
      positiveAmount(command.amountMinor);
      if (!/^[A-Z]{3}$/.test(command.currency)) reject('currency_invalid', `currency must be ISO 4217, got ${command.currency}`);
      const { currency, payer, payee, channel } = command;
      return [{ type: 'payment.Initiated', data: { amountMinor: command.amountMinor.toString(), currency, payer, payee, channel } }];
    }
    case 'Authorize':
      if (state.status !== 'initiated') reject('payment_not_initiated', `only an initiated payment can be authorized; it is ${state.status}`);
      return [{ type: 'payment.Authorized', data: { authorizationCode: command.authorizationCode } }];
    case 'Fail':
      if (state.status !== 'initiated') reject('payment_not_initiated', `only an initiated payment can fail; it is ${state.status}`);
      return [{ type: 'payment.Failed', data: { reason: command.reason } }];
    case 'Cancel':
      if (state.status !== 'authorized') reject('payment_not_cancellable', `only an authorized, uncaptured payment can be cancelled; it is ${state.status}`);
      return [{ type: 'payment.Cancelled', data: { reason: command.reason } }];
    case 'Capture': {
      if (state.status !== 'authorized' && state.status !== 'captured') {
        reject('payment_not_authorized', `only an authorized payment can be captured; it is ${state.status}`);
      }
      positiveAmount(command.amountMinor);
      const left = state.amountMinor - state.capturedMinor;
      if (command.amountMinor > left) reject('exceeds_authorized', `capture of ${command.amountMinor} exceeds the ${left} left to capture`);
      return [{ type: 'payment.Captured', data: { amountMinor: command.amountMinor.toString() } }];
    }
    case 'Refund': {
      const earlier = state.refunds.get(command.refundId);
      if (earlier !== undefined) {
        if (earlier === command.amountMinor) return []; // a retry: already applied
        reject('refund_id_reused', `refund ${command.refundId} was ${earlier}, not ${command.amountMinor}`);
      }
      if (state.status !== 'captured') reject('payment_not_captured', `only a captured payment can be refunded; it is ${state.status}`);
      positiveAmount(command.amountMinor);
      const left = state.capturedMinor - state.refundedMinor;
      if (command.amountMinor > left) reject('exceeds_captured', `refund of ${command.amountMinor} exceeds the ${left} captured and not refunded`);
      if (state.refunds.size >= PAYMENT_REFUNDS_MAX) reject('too_many_refunds', `at most ${PAYMENT_REFUNDS_MAX} refunds per payment`);
      return [{ type: 'payment.Refunded', data: { refundId: command.refundId, amountMinor: command.amountMinor.toString() } }];
    }
  }
}

export function evolvePayment(state: PaymentState, event: PaymentEvent): PaymentState {
  switch (event.type) {
    case 'payment.Initiated':
      return { ...state, status: 'initiated', amountMinor: BigInt(event.data.amountMinor), currency: event.data.currency };
    case 'payment.Authorized':
      return { ...state, status: 'authorized' };
    case 'payment.Failed':
      return { ...state, status: 'failed' };
    case 'payment.Cancelled':
      return { ...state, status: 'cancelled' };
    case 'payment.Captured':
      return { ...state, status: 'captured', capturedMinor: state.capturedMinor + BigInt(event.data.amountMinor) };
    case 'payment.Refunded': {
      const refundedMinor = state.refundedMinor + BigInt(event.data.amountMinor);
      const refunds = new Map(state.refunds).set(event.data.refundId, BigInt(event.data.amountMinor));
      return { ...state, refundedMinor, refunds, status: refundedMinor === state.capturedMinor ? 'refunded' : 'captured' };
    }
  }
}

export const paymentDecider: Decider<PaymentCommand, PaymentEvent, PaymentState> = {
  initialState: initialPaymentState,
  decide: decidePayment,
  evolve: evolvePayment,
};

// ---------------------------------------------------------------------------------------------
// Reading stored events back: check every field, never trust the row.

function text(data: Record<string, unknown>, key: string, type: string): string {
  const v = data[key];
  if (typeof v !== 'string') throw new TypeError(`${type}: ${key} must be a string, got ${JSON.stringify(v)}`);
  return v;
}

function digits(data: Record<string, unknown>, key: string, type: string): string {
  const v = text(data, key, type);
  if (!/^[1-9][0-9]{0,18}$/.test(v) || BigInt(v) > AMOUNT_MAX) throw new TypeError(`${type}: ${key} must be minor units, got ${v}`);
  return v;
}

export function parsePaymentEvent(type: string, data: Record<string, unknown>): PaymentEvent {
  switch (type) {
    case 'payment.Initiated':
      return {
        type,
        data: {
          amountMinor: digits(data, 'amountMinor', type),
          currency: text(data, 'currency', type),
          payer: text(data, 'payer', type),
          payee: text(data, 'payee', type),
          channel: text(data, 'channel', type),
        },
      };
    case 'payment.Authorized':
      return { type, data: { authorizationCode: text(data, 'authorizationCode', type) } };
    case 'payment.Failed':
    case 'payment.Cancelled':
      return { type, data: { reason: text(data, 'reason', type) } };
    case 'payment.Captured':
      return { type, data: { amountMinor: digits(data, 'amountMinor', type) } };
    case 'payment.Refunded':
      return { type, data: { refundId: text(data, 'refundId', type), amountMinor: digits(data, 'amountMinor', type) } };
    default:
      throw new TypeError(`not a payment event: ${type}`);
  }
}

/** v1 → v2 of payment.Initiated: `amount` became `amountMinor`; `channel` was added. */
export const paymentUpcasters = new Upcasters({ 'payment.Initiated': 2 }, [
  {
    type: 'payment.Initiated',
    fromVersion: 1,
    upcast: ({ amount, ...rest }) => ({ ...rest, amountMinor: amount, channel: 'unknown' }),
  },
]);

const STATUSES: readonly PaymentStatus[] = ['none', 'initiated', 'authorized', 'captured', 'refunded', 'cancelled', 'failed'];

export const paymentSnapshots: SnapshotOptions<PaymentState> = {
  every: 10,
  stateVersion: 1,
  encode: (s) => ({
    status: s.status,
    amountMinor: s.amountMinor.toString(),
    currency: s.currency,
    capturedMinor: s.capturedMinor.toString(),
    refundedMinor: s.refundedMinor.toString(),
    refunds: [...s.refunds].map(([id, amount]) => [id, amount.toString()]),
  }),
  decode: (j) => {
    const status = STATUSES.find((x) => x === j.status);
    if (status === undefined || !Array.isArray(j.refunds)) throw new TypeError(`malformed payment snapshot: ${JSON.stringify(j)}`);
    const refunds = (j.refunds as unknown[]).map((pair): [string, bigint] => {
      const [id, amount] = pair as [unknown, unknown];
      return [String(id), BigInt(String(amount))];
    });
    return {
      status,
      amountMinor: BigInt(String(j.amountMinor)),
      currency: String(j.currency),
      capturedMinor: BigInt(String(j.capturedMinor)),
      refundedMinor: BigInt(String(j.refundedMinor)),
      refunds: new Map(refunds),
    };
  },
};

/** The payment aggregate; `snapshotEvery` overrides how often a snapshot is taken. */
export function paymentAggregate(options: { snapshotEvery?: number } = {}): AggregateDefinition<PaymentCommand, PaymentEvent, PaymentState> {
  return {
    streamType: PAYMENT_STREAM,
    decider: paymentDecider,
    upcasters: paymentUpcasters,
    parse: parsePaymentEvent,
    snapshots: { ...paymentSnapshots, every: options.snapshotEvery ?? paymentSnapshots.every },
  };
}

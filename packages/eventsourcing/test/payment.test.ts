/**
 * The payment aggregate's rules, as Given (past events) / When (command) / Then (new events or
 * the rejection code). Pure: no database.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  DomainRejection,
  fold,
  paymentDecider,
  paymentSnapshots,
  paymentUpcasters,
  parsePaymentEvent,
  PAYMENT_REFUNDS_MAX,
  UnknownSchemaVersionError,
  Upcasters,
  type PaymentCommand,
  type PaymentEvent,
} from '../src/index.ts';

function given(events: PaymentEvent[]): { when: (c: PaymentCommand) => { then: (e: PaymentEvent[]) => void; thenRejects: (code: string) => void } } {
  const state = fold(paymentDecider, paymentDecider.initialState, events);
  return {
    when: (command) => ({
      then: (expected) => assert.deepEqual(paymentDecider.decide(command, state), expected),
      thenRejects: (code) =>
        assert.throws(() => paymentDecider.decide(command, state), (e: unknown) => e instanceof DomainRejection && e.code === code),
    }),
  };
}

const initiated: PaymentEvent = {
  type: 'payment.Initiated',
  data: { amountMinor: '10000', currency: 'EUR', payer: 'alice', payee: 'shop', channel: 'card' },
};
const authorized: PaymentEvent = { type: 'payment.Authorized', data: { authorizationCode: 'A1' } };
const captured = (amountMinor: string): PaymentEvent => ({ type: 'payment.Captured', data: { amountMinor } });
const refunded = (refundId: string, amountMinor: string): PaymentEvent => ({ type: 'payment.Refunded', data: { refundId, amountMinor } });

describe('payment: Given / When / Then', () => {
  test('initiate a new payment', () => {
    given([]).when({ type: 'Initiate', amountMinor: 10000n, currency: 'EUR', payer: 'alice', payee: 'shop', channel: 'card' }).then([initiated]);
  });
  test('initiate twice is refused', () => {
    given([initiated]).when({ type: 'Initiate', amountMinor: 1n, currency: 'EUR', payer: 'a', payee: 'b', channel: 'card' }).thenRejects('payment_exists');
  });
  test('a zero, negative or oversized amount is refused', () => {
    for (const amountMinor of [0n, -5n, 2n ** 63n]) {
      given([]).when({ type: 'Initiate', amountMinor, currency: 'EUR', payer: 'a', payee: 'b', channel: 'card' }).thenRejects('amount_invalid');
    }
  });
  test('a malformed currency is refused', () => {
    given([]).when({ type: 'Initiate', amountMinor: 1n, currency: 'eur', payer: 'a', payee: 'b', channel: 'card' }).thenRejects('currency_invalid');
  });
  test('authorize an initiated payment; not twice', () => {
    given([initiated]).when({ type: 'Authorize', authorizationCode: 'A1' }).then([authorized]);
    given([initiated, authorized]).when({ type: 'Authorize', authorizationCode: 'A2' }).thenRejects('payment_not_initiated');
  });
  test('fail an initiated payment; a failed one cannot be authorized', () => {
    given([initiated]).when({ type: 'Fail', reason: 'declined' }).then([{ type: 'payment.Failed', data: { reason: 'declined' } }]);
    given([initiated, { type: 'payment.Failed', data: { reason: 'x' } }]).when({ type: 'Authorize', authorizationCode: 'A' }).thenRejects('payment_not_initiated');
    given([initiated, authorized]).when({ type: 'Fail', reason: 'late' }).thenRejects('payment_not_initiated');
  });
  test('capture in parts up to the authorized amount, never beyond', () => {
    given([initiated, authorized]).when({ type: 'Capture', amountMinor: 4000n }).then([captured('4000')]);
    given([initiated, authorized, captured('4000')]).when({ type: 'Capture', amountMinor: 6000n }).then([captured('6000')]);
    given([initiated, authorized, captured('4000')]).when({ type: 'Capture', amountMinor: 6001n }).thenRejects('exceeds_authorized');
    given([initiated]).when({ type: 'Capture', amountMinor: 1n }).thenRejects('payment_not_authorized');
    given([initiated, authorized]).when({ type: 'Capture', amountMinor: 0n }).thenRejects('amount_invalid');
  });
  test('cancel before capture only', () => {
    given([initiated, authorized]).when({ type: 'Cancel', reason: 'customer' }).then([{ type: 'payment.Cancelled', data: { reason: 'customer' } }]);
    given([initiated, authorized, captured('1')]).when({ type: 'Cancel', reason: 'late' }).thenRejects('payment_not_cancellable');
  });
  test('refund up to what was captured; a retried refund is a no-op; a reused id is refused', () => {
    const history = [initiated, authorized, captured('7000')];
    given(history).when({ type: 'Refund', refundId: 'r1', amountMinor: 2000n }).then([refunded('r1', '2000')]);
    given([...history, refunded('r1', '2000')]).when({ type: 'Refund', refundId: 'r1', amountMinor: 2000n }).then([]);
    given([...history, refunded('r1', '2000')]).when({ type: 'Refund', refundId: 'r1', amountMinor: 2500n }).thenRejects('refund_id_reused');
    given([...history, refunded('r1', '2000')]).when({ type: 'Refund', refundId: 'r2', amountMinor: 5001n }).thenRejects('exceeds_captured');
    given([initiated, authorized]).when({ type: 'Refund', refundId: 'r1', amountMinor: 1n }).thenRejects('payment_not_captured');
  });
  test('a full refund ends the payment as refunded', () => {
    const state = fold(paymentDecider, paymentDecider.initialState, [initiated, authorized, captured('7000'), refunded('r1', '3000'), refunded('r2', '4000')]);
    assert.equal(state.status, 'refunded');
    assert.equal(state.refundedMinor, 7000n);
    given([initiated, authorized, captured('7000'), refunded('r1', '7000')]).when({ type: 'Refund', refundId: 'r2', amountMinor: 1n }).thenRejects('payment_not_captured');
  });
  test(`at most ${PAYMENT_REFUNDS_MAX} refunds per payment`, () => {
    const refunds = Array.from({ length: PAYMENT_REFUNDS_MAX }, (_, i) => refunded(`r${i}`, '1'));
    given([initiated, authorized, captured('10000'), ...refunds]).when({ type: 'Refund', refundId: 'one-more', amountMinor: 1n }).thenRejects('too_many_refunds');
  });
});

describe('payment: stored events and snapshots', () => {
  test('v1 Initiated rows are upcast to v2', () => {
    const data = paymentUpcasters.upcast('payment.Initiated', 1, { amount: '500', currency: 'GBP', payer: 'p', payee: 'q' });
    assert.deepEqual(parsePaymentEvent('payment.Initiated', data), {
      type: 'payment.Initiated',
      data: { amountMinor: '500', currency: 'GBP', payer: 'p', payee: 'q', channel: 'unknown' },
    });
    assert.equal(paymentUpcasters.currentVersion('payment.Initiated'), 2);
    assert.equal(paymentUpcasters.currentVersion('payment.Captured'), 1);
  });
  test('a newer schema version, or a gap in the chain, is refused rather than guessed', () => {
    assert.throws(() => paymentUpcasters.upcast('payment.Initiated', 3, {}), UnknownSchemaVersionError);
    const gappy = new Upcasters({ x: 3 }, [{ type: 'x', fromVersion: 2, upcast: (d) => ({ ...d }) }]);
    assert.throws(() => gappy.upcast('x', 1, {}), /no upcaster path from 1/);
    assert.throws(() => new Upcasters({ x: 2 }, [{ type: 'x', fromVersion: 1, upcast: (d) => ({ ...d }) }, { type: 'x', fromVersion: 1, upcast: (d) => ({ ...d }) }]), /two upcasters/);
  });
  test('malformed stored events are refused with the field named', () => {
    assert.throws(() => parsePaymentEvent('payment.Captured', { amountMinor: '-1' }), /amountMinor must be minor units/);
    assert.throws(() => parsePaymentEvent('payment.Captured', { amountMinor: 5 }), /amountMinor must be a string/);
    assert.throws(() => parsePaymentEvent('payment.Unknown', {}), /not a payment event/);
    assert.throws(() => parsePaymentEvent('payment.Failed', {}), /reason must be a string/);
  });
  test('snapshots round-trip the state, and a malformed one is refused', () => {
    const state = fold(paymentDecider, paymentDecider.initialState, [initiated, authorized, captured('7000'), refunded('r1', '3000')]);
    assert.deepEqual(paymentSnapshots.decode(JSON.parse(JSON.stringify(paymentSnapshots.encode(state))) as Record<string, unknown>), state);
    assert.throws(() => paymentSnapshots.decode({ status: 'weird', refunds: [] }), /malformed payment snapshot/);
  });
});

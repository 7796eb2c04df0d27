/**
 * Retention, legal hold and GDPR erasure with an injected clock, and the sequencer's tail of
 * the event store. The tree must verify after every expiry and erasure.
 */
import assert from 'node:assert/strict';
import { afterEach, beforeEach, test } from 'node:test';
import { AuditSequencer, LegalHoldError, PostgresAuditSink, verifyLog, type AuditRecordView } from '../src/index.ts';
import { auditTestEnv, REVIEWER, type AuditTestEnv } from './support.ts';

const DAY_MS = 86_400_000;
const START_MS = Date.parse('2019-01-01T00:00:00Z');
let nowMs = START_MS;
const clock = (): Date => new Date(nowMs);

// Each test has a database and a clock of its own: holds, erasures and the moved clock of one
// are never another's, so each runs alone as in the file.
let t: AuditTestEnv;
beforeEach(async () => {
  nowMs = START_MS;
  t = await auditTestEnv({ now: clock });
});
afterEach(async () => {
  await t.close();
});

async function verified(): Promise<void> {
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
}

async function byResource(id: string): Promise<AuditRecordView[]> {
  return (await t.store.search({ resourceId: id }, { limit: 100 }, REVIEWER)).records;
}

const base = { actor: { type: 'user' as const, id: 'user:teller-7' }, action: 'ledger.account.read', outcome: 'success' as const, origin: { service: 'ledger' } };

test('retention expires payloads per class on the injected clock, except under a legal hold; the tree still verifies', async () => {
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-1' }, subject: 'cust-1', personal: { name: 'Ada' }, payload: { view: 'balance' } });
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-2' }, subject: 'cust-2', personal: { name: 'Bob' }, payload: { view: 'balance' } });
  t.sink.record({ ...base, recordClass: 'financial', action: 'ledger.TransferPosted', resource: { type: 'transfer', id: 't-1' }, payload: { amount: '100' } });
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-3' }, payload: { view: 'statement' } });
  await t.store.placeHold({ subject: 'cust-2' }, 'litigation 2019-17', REVIEWER);
  const resourceHold = await t.store.placeHold({ resource: { type: 'account', id: 'acc-3' } }, 'regulator inquiry', REVIEWER);
  await t.settle();
  assert.equal((await t.store.activeHolds()).length, 2);
  const [acc1] = await byResource('acc-1');
  assert.deepEqual({ personal: acc1?.personal, state: acc1?.personalState, payload: acc1?.payloadState }, { personal: { name: 'Ada' }, state: 'present', payload: 'present' });
  assert.equal(acc1?.occurredAt.toISOString(), '2019-01-01T00:00:00.000Z');

  // Eleven months on, nothing is due (access: 366 days).
  nowMs += 334 * DAY_MS;
  assert.equal(await t.store.expirePayloads(clock(), REVIEWER), 0);
  // Thirteen months on: the unheld access record loses its payload; the held ones and the
  // financial one (7 years) keep theirs.
  nowMs += 60 * DAY_MS;
  assert.equal(await t.store.expirePayloads(clock(), REVIEWER), 1);
  const [expired] = await byResource('acc-1');
  assert.deepEqual({ payload: expired?.payload, state: expired?.payloadState, personal: expired?.personalState }, { payload: null, state: 'expired', personal: 'expired' });
  assert.equal((await byResource('acc-2'))[0]?.payloadState, 'present');
  assert.equal((await byResource('acc-3'))[0]?.payloadState, 'present');
  assert.equal((await byResource('t-1'))[0]?.payloadState, 'present');
  await verified();

  // The database's clock bounds the caller's: a record from today is not due in 2100.
  nowMs = Date.now() - DAY_MS;
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-today' }, payload: { view: 'balance' } });
  await t.settle();
  // Due by now(): the 2019 financial record (7 years) and the 2019-2020 search records (access).
  assert.ok((await t.store.expirePayloads(new Date('2100-01-01T00:00:00Z'), REVIEWER)) >= 1);
  assert.equal((await byResource('acc-today'))[0]?.payloadState, 'present');
  assert.equal((await byResource('t-1'))[0]?.payloadState, 'expired');
  assert.equal((await byResource('acc-3'))[0]?.payloadState, 'present', 'still held');

  // Releasing the resource hold lets expiry proceed.
  assert.equal(await t.store.releaseHold(resourceHold, REVIEWER), true);
  assert.equal(await t.store.releaseHold(resourceHold, REVIEWER), false);
  // An id that is no hold id at all (a typo, a NUL) is refused the same way, not a database error.
  assert.equal(await t.store.releaseHold('not-a-uuid\u0000', REVIEWER), false);
  assert.equal(await t.store.expirePayloads(clock(), REVIEWER), 1);
  assert.equal((await byResource('acc-3'))[0]?.payloadState, 'expired');
  await verified();
  // Every hold action is audited, the refused second release as a failure.
  await t.settle();
  const holds = (await t.store.search({ resourceType: 'audit.legal_hold' }, { limit: 100 }, REVIEWER)).records.map((r) => `${r.action}:${r.outcome}`);
  assert.deepEqual(holds.sort(), ['audit.hold.place:success', 'audit.hold.place:success', 'audit.hold.release:failure', 'audit.hold.release:failure', 'audit.hold.release:success'].sort());
});

test('erasure destroys the subject key: data reads as erased, a hold blocks it, the tree verifies, and it is audited', async () => {
  // Given a subject under a legal hold, with a record about it,
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-2' }, subject: 'cust-2', personal: { name: 'Bob' }, payload: { view: 'balance' } });
  await t.store.placeHold({ subject: 'cust-2' }, 'litigation 2019-17', REVIEWER);
  // and another subject's record, free of holds,
  t.sink.record({ ...base, recordClass: 'command', resource: { type: 'account', id: 'acc-9' }, subject: 'cust-9', personal: { name: 'Eve', iban: 'DE00' }, payload: { status: 201 } });
  await t.settle();
  assert.deepEqual((await byResource('acc-9'))[0]?.personal, { name: 'Eve', iban: 'DE00' });

  assert.equal(await t.store.eraseSubject('cust-9', REVIEWER), true);
  const [erased] = await byResource('acc-9');
  assert.deepEqual({ personal: erased?.personal, state: erased?.personalState, payload: erased?.payload }, { personal: null, state: 'erased', payload: { status: 201 } });
  assert.equal(await t.store.eraseSubject('cust-9', REVIEWER), false, 'no key left to destroy');

  // cust-2 is under hold: refused, and the data stays readable.
  await assert.rejects(t.store.eraseSubject('cust-2', REVIEWER), LegalHoldError);
  assert.equal((await byResource('acc-2'))[0]?.personalState, 'present');
  // A hold on a resource of the subject's records blocks erasure too.
  t.sink.record({ ...base, recordClass: 'command', resource: { type: 'account', id: 'acc-10' }, subject: 'cust-10', personal: { name: 'Fay' } });
  await t.settle();
  const hold = await t.store.placeHold({ resource: { type: 'account', id: 'acc-10' } }, 'audit', REVIEWER);
  await assert.rejects(t.store.eraseSubject('cust-10', REVIEWER), LegalHoldError);
  await t.store.releaseHold(hold, REVIEWER);
  assert.equal(await t.store.eraseSubject('cust-10', REVIEWER), true);

  // After erasure, new data about the subject gets a new key; the old stays erased. (It occurs
  // after the erasure, whose time is the database's: the clock moves there from 2019.)
  nowMs = Date.now() + 1;
  t.sink.record({ ...base, recordClass: 'command', resource: { type: 'account', id: 'acc-9' }, subject: 'cust-9', personal: { name: 'Eve (new consent)' } });
  await t.settle();
  const states = (await byResource('acc-9')).map((r) => [r.personalState, r.personal]);
  assert.deepEqual(states, [['erased', null], ['present', { name: 'Eve (new consent)' }]]);
  await verified();

  // An erasure's record is queued by the database function in its transaction, a refusal's by
  // the sink a few milliseconds later: the two paths interleave in the log, so compared as a set.
  const erasures = (await t.store.search({ action: 'audit.subject.erase' }, {}, REVIEWER)).records;
  assert.deepEqual(
    erasures.map((r) => JSON.stringify([r.resource.id, r.outcome, r.reason, r.actor.id, (r.payload as { keyDestroyed?: boolean } | null)?.keyDestroyed ?? null])).sort(),
    [
      ['cust-9', 'success', null, 'user:reviewer', true],
      ['cust-9', 'success', null, 'user:reviewer', false],
      ['cust-2', 'failure', 'legal hold', 'user:reviewer', null],
      ['cust-10', 'failure', 'legal hold', 'user:reviewer', null],
      ['cust-10', 'success', null, 'user:reviewer', true],
    ].map((r) => JSON.stringify(r)).sort(),
  );
  const holds = (await t.store.search({ resourceType: 'audit.legal_hold' }, { limit: 100 }, REVIEWER)).records.map((r) => `${r.action}:${r.outcome}`);
  // This test's holds: on cust-2 (kept), on acc-10 (placed, then released).
  assert.deepEqual(holds.sort(), ['audit.hold.place:success', 'audit.hold.place:success', 'audit.hold.release:success'].sort());
});

test('a hold whose record the trail would refuse is not placed: no hold in force that nothing records', async () => {
  // A reason over the payload limit, an actor id over the trail's: the record is checked first.
  await assert.rejects(t.store.placeHold({ subject: 'cust-long-reason' }, 'x'.repeat(70_000), REVIEWER), /payload/i);
  await assert.rejects(
    t.store.placeHold({ subject: 'cust-long-actor' }, 'case 1', { ...REVIEWER, actor: { type: 'user', id: 'u'.repeat(501) } }),
    /actor/i,
  );
  await t.settle();
  assert.deepEqual(await t.store.activeHolds(), []);
  // And one the trail takes is placed and recorded.
  const id = await t.store.placeHold({ subject: 'cust-ok' }, 'case 2', REVIEWER);
  await t.settle();
  assert.deepEqual((await t.store.activeHolds()).map((h) => h.id), [id]);
  const placed = await t.store.search({ action: 'audit.hold.place' }, { limit: 10 }, REVIEWER);
  assert.deepEqual(placed.records.map((r) => r.resource.id), [id]);
});

test('erasure reaches what waits in the queue: recorded before, it reads as erased; recorded after, as present', async () => {
  // Given a subject with a record integrated and one still queued when the erasure runs,
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-q1' }, subject: 'cust-q', personal: { iban: 'DE00 1' } });
  await t.settle();
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-q2' }, subject: 'cust-q', personal: { iban: 'DE00 2' } });
  await t.sink.flush();
  // and a subject whose only record is queued, with no key yet,
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-q3' }, subject: 'cust-only-queued', personal: { name: 'Mallory' } });
  await t.sink.flush();
  assert.equal(await t.store.eraseSubject('cust-q', REVIEWER), true);
  assert.equal(await t.store.eraseSubject('cust-only-queued', REVIEWER), false, 'no key yet');
  await t.settle();
  for (const id of ['acc-q1', 'acc-q2', 'acc-q3']) {
    const [r] = await byResource(id);
    assert.deepEqual([r?.personalState, r?.personal], ['erased', null], id);
  }
  // Data that occurs after the erasure (the database's time: the clock moves there from 2019)
  // is the subject's anew, under a key of its own.
  nowMs = Date.now() + 1;
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-q4' }, subject: 'cust-q', personal: { iban: 'DE00 4' } });
  await t.settle();
  const [after] = await byResource('acc-q4');
  assert.deepEqual([after?.personalState, after?.personal], ['present', { iban: 'DE00 4' }]);
  assert.deepEqual([(await byResource('acc-q2'))[0]?.personalState], ['erased'], 'and the new key does not open the old data');
  await verified();
});

test('erasure reaches an entry still in a sink buffer: it occurred before the erasure, so it reads as erased though queued after', async () => {
  // A producer's sink that holds its entries while the erasure runs (a service's, between two
  // flushes), on the real clock: the erasure's time is the database's.
  nowMs = Date.now();
  const producer = new PostgresAuditSink({ pool: t.pool, flushIntervalMs: 60_000, now: clock });
  try {
    // Given a subject with a record integrated,
    t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-b1' }, subject: 'cust-b', personal: { iban: 'DE00 1' } });
    await t.settle();
    // and, in the producer's buffer, one more about it and one about a resource under hold,
    await t.store.placeHold({ resource: { type: 'account', id: 'acc-bh' } }, 'case 8', REVIEWER);
    nowMs = Date.now();
    producer.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-b2' }, subject: 'cust-b', personal: { iban: 'DE00 2' } });
    producer.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-bh' }, subject: 'cust-b', personal: { iban: 'DE00 H' } });
    assert.equal(producer.buffered, 2);
    // when the subject is erased, and only then are the buffered entries queued,
    assert.equal(await t.store.eraseSubject('cust-b', REVIEWER), true);
    await producer.flush();
    // and data about the subject that occurs after the erasure is recorded too,
    nowMs = Date.now() + 1;
    producer.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-b3' }, subject: 'cust-b', personal: { iban: 'DE00 3' } });
    await producer.flush();
    await t.settle();
    // then what occurred before the erasure reads as erased, wherever it waited,
    for (const id of ['acc-b1', 'acc-b2']) {
      const [r] = await byResource(id);
      assert.deepEqual([r?.personalState, r?.personal], ['erased', null], id);
    }
    // except the entry the hold covers, which a queued entry's hold would have kept from erasure,
    assert.deepEqual((await byResource('acc-bh'))[0]?.personal, { iban: 'DE00 H' });
    // and what occurred after is the subject's anew.
    assert.deepEqual((await byResource('acc-b3'))[0]?.personal, { iban: 'DE00 3' });
    await verified();
  } finally {
    await producer.close();
  }
});

test('a hold on the resource of a queued record of the subject refuses its erasure', async () => {
  await t.store.placeHold({ resource: { type: 'account', id: 'acc-held-q' } }, 'case 7', REVIEWER);
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'acc-held-q' }, subject: 'cust-hq', personal: { name: 'Hal' } });
  await t.sink.flush();
  await assert.rejects(t.store.eraseSubject('cust-hq', REVIEWER), LegalHoldError);
  await t.settle();
  assert.deepEqual((await byResource('acc-held-q'))[0]?.personal, { name: 'Hal' });
});

test('a hold on a UUID resource holds it in either case; another id keeps its case', async () => {
  const u = '0f3a9c2e-7b1d-4e8a-9c3f-5d6e7f8a9b0c';
  const v = '1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d';
  // Recorded as the HTTP plugin and the ledger write them (lower case), and as a producer
  // might hand one over (upper case, stored in lower case), and a case-sensitive id.
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: u }, subject: 'cust-u', personal: { name: 'Uma' }, payload: { view: 'balance' } });
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: v.toUpperCase() }, payload: { view: 'balance' } });
  t.sink.record({ ...base, recordClass: 'access', resource: { type: 'account', id: 'ACC-Case' }, payload: { view: 'balance' } });
  // Held as a statement prints the first id (upper case), the second in lower case, and a
  // different account whose id differs from the third only in case.
  await t.store.placeHold({ resource: { type: 'account', id: u.toUpperCase() } }, 'case 9', REVIEWER);
  await t.store.placeHold({ resource: { type: 'account', id: v } }, 'case 10', REVIEWER);
  await t.store.placeHold({ resource: { type: 'account', id: 'acc-case' } }, 'case 11', REVIEWER);
  await t.settle();
  assert.deepEqual((await t.store.activeHolds()).map((h) => h.resource?.id).sort(), [u, v, 'acc-case'].sort());
  // Found by either spelling of a UUID; stored in lower case.
  assert.deepEqual((await byResource(v.toUpperCase())).map((r) => r.resource.id), [v]);
  assert.deepEqual((await byResource(v)).map((r) => r.resource.id), [v]);
  assert.deepEqual((await byResource(u.toUpperCase())).map((r) => r.resource.id), [u]);
  assert.deepEqual((await byResource('ACC-Case')).map((r) => r.resource.id), ['ACC-Case']);
  assert.deepEqual(await byResource('acc-case'), []);
  // The database matches holds the same way, so a hold or a record written before ids were
  // canonical still matches: given in upper case, the lower-case hold is found.
  const held = async (id: string): Promise<unknown> => (await t.pool.query<{ held: boolean }>("SELECT audit.is_held(NULL, 'account', $1) AS held", [id])).rows[0]?.held;
  assert.deepEqual([await held(u.toUpperCase()), await held(v.toUpperCase()), await held('ACC-Case'), await held('acc-case')], [true, true, false, true]);

  // Thirteen months on, only the unheld account's payload expires.
  nowMs += 394 * DAY_MS;
  assert.equal(await t.store.expirePayloads(clock(), REVIEWER), 1);
  assert.equal((await byResource(u))[0]?.payloadState, 'present');
  assert.equal((await byResource(v))[0]?.payloadState, 'present');
  assert.equal((await byResource('ACC-Case'))[0]?.payloadState, 'expired');
  // And the subject of the held UUID's record cannot be erased.
  await assert.rejects(t.store.eraseSubject('cust-u', REVIEWER), LegalHoldError);
  assert.deepEqual((await byResource(u))[0]?.personal, { name: 'Uma' });
  await verified();
});

test('the sequencer tails the event store: every event once, rejections as failures with their reason', async () => {
  const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
  const append = async (id: string, result: string): Promise<void> => {
    const c = await t.pool.connect();
    try {
      await c.query('BEGIN');
      await t.events.append(c, { type: 'ledger.transfer', id }, [{ type: result === 'ok' ? 'ledger.TransferPosted' : 'ledger.TransferRejected', data: { id, amount: '5', result }, metadata: { actor: 'svc-payments', causationId: `req-${id}`, correlationId: 'order-1', traceparent } }], { expectedVersion: 'no_stream' });
      await c.query('COMMIT');
    } finally {
      c.release();
    }
  };
  await append('x-1', 'ok');
  await append('x-2', 'exceeds_credits');
  // Two sequencers race: the lock lets one integrate; the cursor moves with the records.
  const second = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: 'ledgerline/test', tailEvents: true });
  const [a, b] = await Promise.all([t.sequencer.round(), second.round()]);
  assert.equal(a.records + b.records >= 2, true);
  await t.settle();
  await second.round();
  const records = (await t.store.search({ resourceType: 'ledger.transfer' }, {}, REVIEWER)).records;
  assert.deepEqual(
    records.map((r) => [r.resource.id, r.action, r.outcome, r.reason, r.actor, r.origin.requestId, r.origin.traceId, r.recordClass]),
    [
      ['x-1', 'ledger.TransferPosted', 'success', null, { type: 'service', id: 'svc-payments' }, 'req-x-1', '4bf92f3577b34da6a3ce929d0e0e4736', 'financial'],
      ['x-2', 'ledger.TransferRejected', 'failure', 'exceeds_credits', { type: 'service', id: 'svc-payments' }, 'req-x-2', '4bf92f3577b34da6a3ce929d0e0e4736', 'financial'],
    ],
  );
  assert.deepEqual((records[1]?.payload as { data: unknown }).data, { id: 'x-2', amount: '5', result: 'exceeds_credits' });
  await append('x-3', 'ok');
  await t.settle();
  assert.equal((await t.store.search({ resourceType: 'ledger.transfer' }, {}, REVIEWER)).records.length, 3);
  // An event is a leaf where it is, hashed in PostgreSQL: any size the event store takes is
  // integrated like any other (a record row had a 64 KiB payload bound).
  const big = { id: 'x-4', blob: 'x'.repeat(70_000) };
  const c = await t.pool.connect();
  try {
    await t.events.append(c, { type: 'ledger.transfer', id: 'x-4' }, [{ type: 'ledger.TransferPosted', data: big }], { expectedVersion: 'no_stream' });
  } finally {
    c.release();
  }
  await append('x-5', 'ok');
  await t.settle();
  const odd = (await t.store.search({ resourceType: 'ledger.transfer', resourceId: 'x-4' }, {}, REVIEWER)).records;
  assert.deepEqual(odd.map((r) => [r.action, r.outcome, r.recordClass, r.actor.id]), [['ledger.TransferPosted', 'success', 'financial', 'unknown']]);
  assert.equal(((odd[0]?.payload as { data: { blob: string } }).data.blob).length, 70_000);
  assert.equal((await t.store.search({ resourceId: 'x-5' }, {}, REVIEWER)).records.length, 1);
  const once = await t.pool.query<{ n: number; positions: number; events: number }>(
    'SELECT count(*)::int AS n, count(DISTINCT p)::int AS positions, (SELECT count(*)::int FROM events.events) AS events FROM audit.event_leaves t, unnest(t.positions) p',
  );
  assert.deepEqual(once.rows[0], { n: 5, positions: 5, events: 5 }, 'each event exactly once');
  assert.equal((await t.pool.query("SELECT 1 FROM audit.records WHERE resource_type = 'ledger.transfer'")).rows.length, 0, 'events are not copied into records');
  await verified();
});

test('an event that commits late is integrated when it commits, after those that committed before it, never skipped', async () => {
  await t.settle();
  const tiles = async (): Promise<string[]> => {
    const r = await t.pool.query<{ stream_id: string }>(
      `SELECT e.stream_id FROM audit.event_leaves t, unnest(t.positions) WITH ORDINALITY AS u(position, i)
         JOIN events.events e ON e.position = u.position
        WHERE e.stream_type = 'late' ORDER BY t.first_seq, u.i`,
    );
    return r.rows.map((row) => row.stream_id);
  };
  const slow = await t.pool.connect();
  const quick = await t.pool.connect();
  try {
    // The slow transaction takes its transaction id first, then appends last.
    await slow.query('BEGIN');
    await slow.query('SELECT pg_current_xact_id()');
    await quick.query('BEGIN');
    await t.events.append(quick, { type: 'late', id: 'quick' }, [{ type: 'late.Noted', data: {} }], { expectedVersion: 'no_stream' });
    await quick.query('COMMIT');
    await t.events.append(slow, { type: 'late', id: 'slow' }, [{ type: 'late.Noted', data: {} }], { expectedVersion: 'no_stream' });
    // While the slow one runs, the tail holds back everything after its transaction id.
    await t.sequencer.round();
    assert.deepEqual(await tiles(), []);
    await slow.query('COMMIT');
    await t.settle();
    // In the global order (transaction id, then position): the slow one first.
    assert.deepEqual(await tiles(), ['slow', 'quick']);
  } finally {
    await slow.query('ROLLBACK').catch(() => {});
    slow.release();
    quick.release();
  }
  await verified();
});

/**
 * Subject keys at rest (keys.ts: `storedSubjectKey`, `clearSubjectKey`): with a key-encryption
 * key the sequencer stores each subject key wrapped, and wraps the keys it finds in clear; the
 * personal data still reads back, erasure still erases, and the tree verifies. A store without
 * the key, with another key, or with a wrapped key moved to another subject refuses to read.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { afterEach, beforeEach, test } from 'node:test';
import { AuditSequencer, AuditStore, KeyEncryptionKeyError, parseKeyEncryptionKey, verifyLog, type AuditRecordView } from '../src/index.ts';
import { auditTestEnv, REVIEWER, type AuditTestEnv } from './support.ts';

// Each test has a database of its own: the keys it wraps (or damages) are its own, so each
// runs alone as in the file.
let t: AuditTestEnv;
beforeEach(async () => {
  t = await auditTestEnv({ withEvents: false });
});
afterEach(async () => {
  await t.close();
});

const kekText = randomBytes(32).toString('base64url');
const kek = parseKeyEncryptionKey(kekText);
const base = { recordClass: 'command', actor: { type: 'user' as const, id: 'user:teller-7' }, action: 'ledger.account.read', outcome: 'success' as const, origin: { service: 'ledger' } };

function sequencerWith(key: typeof kek): AuditSequencer {
  return new AuditSequencer({ pool: t.pool, signer: t.signer, origin: 'ledgerline/test', checkpointIntervalMs: 0, keyEncryptionKey: key });
}

/** Flushes the sink and runs `sequencer` until the queue is empty. */
async function settleWith(sequencer: AuditSequencer): Promise<void> {
  for (let i = 0; i < 100; i += 1) {
    await t.sink.flush();
    const { records } = await sequencer.round();
    const left = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue');
    if (records === 0 && left.rows[0]?.n === 0) return;
  }
  throw new Error('the sequencer did not catch up');
}

async function storedKey(subject: string): Promise<{ length: number; kekId: string | null } | undefined> {
  const r = await t.pool.query<{ length: number; kek_id: string | null }>('SELECT length(key) AS length, kek_id FROM audit.subject_keys WHERE subject = $1', [subject]);
  const row = r.rows[0];
  return row === undefined ? undefined : { length: row.length, kekId: row.kek_id };
}

/**
 * Damages a subject key the way only a superuser still can: the database refuses a key changed
 * under the same key-encryption key (migration 1769100000000), so the triggers are switched off
 * for this transaction, as tamper.test.ts does.
 */
async function copyKeyAsSuperuser(from: string, to: string): Promise<void> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query('SET LOCAL session_replication_role = replica');
    await c.query('UPDATE audit.subject_keys SET key = (SELECT key FROM audit.subject_keys WHERE subject = $1) WHERE subject = $2', [from, to]);
    await c.query('COMMIT');
  } finally {
    c.release();
  }
}

async function byResource(store: AuditStore, id: string): Promise<AuditRecordView[]> {
  return (await store.search({ resourceId: id }, { limit: 10 }, REVIEWER)).records;
}

test('with a key-encryption key, subject keys are stored wrapped, clear ones are wrapped, data reads back, erasure erases', async () => {
  const sealed = sequencerWith(kek);
  const store = new AuditStore({ pool: t.pool, sink: t.sink, service: 'test', keyEncryptionKey: kek });
  // Given a subject whose key was made in clear (before the key-encryption key was set),
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-old' }, subject: 'cust-old', personal: { name: 'Ada' } });
  await t.settle();
  assert.deepEqual(await storedKey('cust-old'), { length: 32, kekId: null });
  // when the sequencer runs with the key-encryption key and a new subject's data arrives,
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-new' }, subject: 'cust-new', personal: { name: 'Bob' } });
  await settleWith(sealed);
  // then both keys are stored wrapped under it, none in clear,
  assert.deepEqual(await storedKey('cust-new'), { length: 72, kekId: kek.id });
  assert.deepEqual(await storedKey('cust-old'), { length: 72, kekId: kek.id });
  // both subjects' data reads back, including what was sealed before the wrapping,
  assert.deepEqual((await byResource(store, 'acc-old'))[0]?.personal, { name: 'Ada' });
  assert.deepEqual((await byResource(store, 'acc-new'))[0]?.personal, { name: 'Bob' });
  // erasure still destroys a wrapped key,
  assert.equal(await store.eraseSubject('cust-new', REVIEWER), true);
  assert.equal((await byResource(store, 'acc-new'))[0]?.personalState, 'erased');
  // and the tree verifies.
  await settleWith(sealed);
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
});

test('wrapped keys refuse to open without the key, with another key, or moved to another subject', async () => {
  const sealed = sequencerWith(kek);
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-a' }, subject: 'cust-a', personal: { name: 'Cy' } });
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-b' }, subject: 'cust-b', personal: { name: 'Di' } });
  await settleWith(sealed);
  // Without the key-encryption key, a read of personal data refuses, and so does a sequencer round that needs the key:
  await assert.rejects(byResource(t.store, 'acc-a'), (e: unknown) => e instanceof KeyEncryptionKeyError && /is wrapped, and no key-encryption key is configured/.test(e.message));
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-a' }, subject: 'cust-a', personal: { name: 'Cy again' } });
  await t.sink.flush();
  await assert.rejects(t.sequencer.round(), KeyEncryptionKeyError);
  await settleWith(sealed);
  // with another one, naming both,
  const other = parseKeyEncryptionKey(randomBytes(32).toString('base64url'));
  const otherStore = new AuditStore({ pool: t.pool, sink: t.sink, service: 'test', keyEncryptionKey: other });
  await assert.rejects(byResource(otherStore, 'acc-a'), (e: unknown) => e instanceof KeyEncryptionKeyError && e.message.includes(`under key-encryption key ${kek.id}, not the configured ${other.id}`));
  // and with cust-b's wrapped key copied onto cust-a (by a superuser), it does not open as cust-a's.
  await copyKeyAsSuperuser('cust-b', 'cust-a');
  const store = new AuditStore({ pool: t.pool, sink: t.sink, service: 'test', keyEncryptionKey: kek });
  await assert.rejects(byResource(store, 'acc-a'), (e: unknown) => e instanceof KeyEncryptionKeyError && /wrapped key of subject cust-a does not open/.test(e.message));
  assert.deepEqual((await byResource(store, 'acc-b'))[0]?.personal, { name: 'Di' });
});

test('rotation: with "new,old" keys under old still open, the sequencer wraps them under new, and then old can go', async () => {
  // Given two subjects' keys wrapped under `kek`, cust-a's damaged (cust-b's wrapped key
  // copied onto it, by a superuser),
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-a' }, subject: 'cust-a', personal: { name: 'Cy' } });
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-b' }, subject: 'cust-b', personal: { name: 'Di' } });
  await settleWith(sequencerWith(kek));
  await copyKeyAsSuperuser('cust-b', 'cust-a');
  // and a third subject's key wrapped under the key about to go, `before`,
  const old = randomBytes(32).toString('base64url');
  const next = randomBytes(32).toString('base64url');
  const before = parseKeyEncryptionKey(old);
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-rot' }, subject: 'cust-rot', personal: { name: 'Eve' } });
  await settleWith(sequencerWith(before));
  assert.deepEqual(await storedKey('cust-rot'), { length: 72, kekId: before.id });

  // The keys of cust-a and cust-b are under `kek`: the rotation names every key still in use.
  const rotating = parseKeyEncryptionKey(` ${next} , ${old},${kekText}`);
  assert.deepEqual([rotating.id, [...rotating.previous.keys()]], [parseKeyEncryptionKey(next).id, [before.id, kek.id]]);
  const store = new AuditStore({ pool: t.pool, sink: t.sink, service: 'test', keyEncryptionKey: rotating });
  // Before the sequencer has run: the old wrapping still opens, and the status says what is left.
  assert.deepEqual((await byResource(store, 'acc-rot'))[0]?.personal, { name: 'Eve' });
  const pending = await store.keyEncryptionStatus();
  assert.equal(pending.current, rotating.id);
  assert.ok(pending.pending >= 1 && (pending.keys[before.id] ?? 0) >= 1, JSON.stringify(pending));
  // One round wraps what is left under the new key, except cust-a's, damaged above (another
  // subject's wrapped key): it is reported, and the round records the rest.
  const errors: unknown[] = [];
  const rewrapping = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: 'ledgerline/test', checkpointIntervalMs: 0, keyEncryptionKey: rotating, onError: (e) => errors.push(e) });
  t.sink.record({ ...base, resource: { type: 'account', id: 'acc-during' }, subject: 'cust-during', personal: { name: 'Fay' } });
  await t.sink.flush();
  assert.ok((await rewrapping.round()).records >= 1);
  assert.deepEqual(await storedKey('cust-during'), { length: 72, kekId: rotating.id }, 'the round went on');
  assert.ok(errors.some((e) => e instanceof KeyEncryptionKeyError && /1 subject keys could not be opened to wrap again \(first: cust-a\)/.test(e.message)), String(errors));
  assert.deepEqual(await storedKey('cust-rot'), { length: 72, kekId: rotating.id });
  const done = await store.keyEncryptionStatus();
  assert.equal(done.pending, 1, JSON.stringify(done));
  assert.deepEqual(Object.keys(done.keys).sort(), [kek.id, rotating.id].sort());
  // The new key alone now opens everything; the old key alone opens nothing any more.
  const after = new AuditStore({ pool: t.pool, sink: t.sink, service: 'test', keyEncryptionKey: parseKeyEncryptionKey(next) });
  assert.deepEqual((await byResource(after, 'acc-rot'))[0]?.personal, { name: 'Eve' });
  const stale = new AuditStore({ pool: t.pool, sink: t.sink, service: 'test', keyEncryptionKey: before });
  await assert.rejects(byResource(stale, 'acc-rot'), (e: unknown) => e instanceof KeyEncryptionKeyError && /not the configured/.test(e.message));
  // A malformed list is refused, naming the key at fault; so is the same key twice.
  assert.throws(() => parseKeyEncryptionKey(`${next},short`), /key 2 of 2/);
  assert.throws(() => parseKeyEncryptionKey(`${next},${next}`), /the same key twice/);
  assert.equal((await verifyLog(t.pool, { publicKey: t.signer.publicKey })).ok, true);
});

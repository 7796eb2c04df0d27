/**
 * A sequencer that loads its tree (a restart: a fresh AuditSequencer on the same database)
 * holds storage to the latest checkpoint only once that checkpoint's signature verifies:
 * under its signing key, an earlier key it was given (`previousKeys`), or a key their signed
 * transitions lead to. Otherwise a superuser who rewrote a record together with its leaf hash
 * and the checkpoint's root got the next checkpoint signed with the real key over the forgery,
 * and a third party then accepted an inclusion proof of it. Each test has a log of its own:
 * ten records, checkpoints at 5 and 10.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { afterEach, beforeEach, test } from 'node:test';
import type pg from 'pg';
import { AuditSequencer, leafData, leafHash, loadSigningKey, publicKeyPem, rootOf, signCheckpoint, signKeyTransition, startSequencerWorker, verifyBundle, verifyLog, type CheckpointSigner } from '../src/index.ts';
import { AuditTreeMismatchError } from '../src/sequencer.ts';
import { fieldsOf, RECORD_COLUMNS, type RecordRow } from '../src/rows.ts';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

const ORIGIN = 'ledgerline/test';
let t: AuditTestEnv;

beforeEach(async () => {
  t = await auditTestEnv({ withEvents: false });
  for (const size of [5, 10]) {
    for (let i = size - 5; i < size; i += 1) t.sink.record(entry(i));
    await t.settle();
  }
  const sizes = (await t.pool.query<{ n: number }>('SELECT tree_size::int AS n FROM audit.checkpoints ORDER BY tree_size')).rows.map((r) => r.n);
  assert.deepEqual(sizes, [5, 10]);
});
afterEach(async () => {
  await t.close();
});

/** Runs `fn` in a committed transaction with triggers off, as a superuser could. */
async function asSuperuser(fn: (c: pg.PoolClient) => Promise<unknown>): Promise<void> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query('SET LOCAL session_replication_role = replica');
    await fn(c);
    await c.query('COMMIT');
  } catch (error) {
    await c.query('ROLLBACK');
    throw error;
  } finally {
    c.release();
  }
}

/**
 * The reviewer's forgery: record 7 rewritten (its actor and outcome) with a leaf hash that
 * matches, and checkpoint 10's root set to the root of the rewritten tree. Returns the root
 * checkpoint 10 really signed.
 */
async function forgeRecord7(): Promise<Buffer> {
  let signedRoot: Buffer = Buffer.alloc(0);
  await asSuperuser(async (c) => {
    const r = await c.query<RecordRow>(`SELECT ${RECORD_COLUMNS} FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq WHERE r.seq = 7`);
    const forged = { ...fieldsOf(r.rows[0] as RecordRow), actorId: 'user:innocent', outcome: 'success' as const, reason: null };
    await c.query('UPDATE audit.records SET actor_id = $1, outcome = $2, reason = NULL, leaf_hash = $3 WHERE seq = 7', [forged.actorId, forged.outcome, leafHash(leafData(forged))]);
    const leaves = (await c.query<{ leaf_hash: Buffer }>('SELECT leaf_hash FROM audit.records ORDER BY seq')).rows.map((row) => row.leaf_hash);
    signedRoot = (await c.query<{ root_hash: Buffer }>('SELECT root_hash FROM audit.checkpoints WHERE tree_size = 10')).rows[0]?.root_hash ?? signedRoot;
    await c.query('UPDATE audit.checkpoints SET root_hash = $1 WHERE tree_size = 10', [rootOf(leaves)]);
  });
  return signedRoot;
}

const queued = async (): Promise<number> => (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue')).rows[0]?.n ?? 0;
const latestSize = async (): Promise<number | undefined> => (await t.store.latestCheckpoint())?.treeSize;

function newSigner(): CheckpointSigner {
  return loadSigningKey(newPem(), { production: false });
}

const newPem = (): string => generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();

/** Polls until `done` holds, about ten seconds at most. */
async function eventually(done: () => Promise<boolean>): Promise<boolean> {
  for (let attempt = 0; attempt < 2000; attempt += 1) {
    if (await done()) return true;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return false;
}

test('a restarted sequencer refuses to sign over a checkpoint whose root was rewritten, so no proof of the forgery verifies', async () => {
  await forgeRecord7();
  // A sequencer starting now: nothing in memory, a record waiting.
  const errors: unknown[] = [];
  const fresh = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: ORIGIN, checkpointIntervalMs: 0, onError: (e) => errors.push(e) });
  t.sink.record(entry(10));
  await t.sink.flush();
  await assert.rejects(fresh.round(), (error: unknown) => {
    assert.ok(error instanceof AuditTreeMismatchError, String(error));
    assert.match(error.message, /latest checkpoint \(tree size 10\) has no signature the sequencer can trust: its signature does not verify under key [0-9a-f]{16}/);
    return true;
  });
  // Run as a service runs it: every round reports, nothing is signed or integrated.
  fresh.start();
  await new Promise((resolve) => setTimeout(resolve, 200));
  await fresh.close().catch((e: unknown) => errors.push(e));
  assert.ok(errors.length > 0 && errors.every((e) => e instanceof AuditTreeMismatchError), String(errors));
  assert.equal(await latestSize(), 10);
  assert.equal(await queued(), 1);
  // The only proof of record 7 is against checkpoint 10, and the real key never signed its root.
  const bundle = await t.store.inclusionBundle(7, undefined, REVIEWER);
  assert.ok(bundle !== null && bundle.checkpoint.treeSize === 10);
  assert.throws(() => verifyBundle(bundle, t.signer.publicKey), /checkpoint: the signature does not verify/);
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.deepEqual(report.issues.map((i) => [i.kind, i.treeSize]), [['checkpoint_signature_invalid', 10]]);
});

test('a checkpoint re-signed by another key, given the signer\'s key id, or with its time moved is refused; restored, the forged leaf is what fails', async () => {
  const signedRoot = await forgeRecord7();
  const intruder = newSigner();
  const c = (await t.store.latestCheckpoint())!;
  // The forged root, signed by the intruder's own key.
  const resigned = signCheckpoint(intruder, { origin: c.origin, treeSize: c.treeSize, rootHash: c.rootHash, issuedAt: c.issuedAt });
  await asSuperuser((db) => db.query('UPDATE audit.checkpoints SET key_id = $1, signature = $2 WHERE tree_size = 10', [resigned.keyId, resigned.signature]));
  const fresh = (): AuditSequencer => new AuditSequencer({ pool: t.pool, signer: t.signer, origin: ORIGIN, checkpointIntervalMs: 0 });
  t.sink.record(entry(10));
  await t.sink.flush();
  await assert.rejects(fresh().round(), { name: 'AuditTreeMismatchError', message: new RegExp(`names key ${resigned.keyId}, which is neither the signing key nor an earlier key`) });
  // The intruder's signature under the signer's key id: still no.
  await asSuperuser((db) => db.query('UPDATE audit.checkpoints SET key_id = $1 WHERE tree_size = 10', [t.signer.keyId]));
  await assert.rejects(fresh().round(), { name: 'AuditTreeMismatchError', message: /its signature does not verify/ });
  // A time rewritten under the real signature: the signature covers it.
  await asSuperuser((db) => db.query('UPDATE audit.checkpoints SET root_hash = $1, signature = $2, issued_at = issued_at + interval \'1 second\' WHERE tree_size = 10', [signedRoot, c.signature]));
  await assert.rejects(fresh().round(), { name: 'AuditTreeMismatchError', message: /its signature does not verify/ });
  assert.equal(await latestSize(), 10);
  // Checkpoint restored: the signature verifies, and the stored tree (record 7's forged leaf
  // hash) is what now fails, as before this change.
  await asSuperuser((db) => db.query('UPDATE audit.checkpoints SET issued_at = $1 WHERE tree_size = 10', [c.issuedAt]));
  await assert.rejects(fresh().round(), { name: 'AuditTreeMismatchError', message: /does not give the root its checkpoint signed/ });
});

test('after a rotation: the new key signs over the old key\'s checkpoint only given the old public key, and the old key follows the new one only through a transition it signed', async () => {
  const old = t.signer;
  const rotated = newSigner();
  t.sink.record(entry(10));
  await t.sink.flush();
  // Restarted with the new key alone: the old key's checkpoint cannot be checked, so nothing is signed.
  const alone = new AuditSequencer({ pool: t.pool, signer: rotated, origin: ORIGIN, checkpointIntervalMs: 0 });
  await assert.rejects(alone.round(), { name: 'AuditTreeMismatchError', message: new RegExp(`names key ${old.keyId}`) });
  assert.equal(await latestSize(), 10);
  // Given the old public key, it checks that checkpoint and signs its own.
  const newer = new AuditSequencer({ pool: t.pool, signer: rotated, previousKeys: [old.publicKey], origin: ORIGIN, checkpointIntervalMs: 0 });
  assert.equal((await newer.round()).checkpoint?.keyId, rotated.keyId);
  assert.equal(await latestSize(), 11);
  // From then on the new key needs nothing more: the latest checkpoint is its own.
  t.sink.record(entry(11));
  await t.sink.flush();
  assert.equal((await alone.round()).checkpoint?.treeSize, 12);

  // An instance still on the old key (a rolling restart) trusts no checkpoint of the new key by itself,
  t.sink.record(entry(12));
  await t.sink.flush();
  const older = (): AuditSequencer => new AuditSequencer({ pool: t.pool, signer: old, origin: ORIGIN, checkpointIntervalMs: 0 });
  await assert.rejects(older().round(), { name: 'AuditTreeMismatchError', message: new RegExp(`names key ${rotated.keyId}`) });
  // nor through a transition the old key did not sign, written into the database,
  const intruder = newSigner();
  const planted = signKeyTransition(intruder, ORIGIN, rotated.publicKey, new Date());
  await t.pool.query('INSERT INTO audit.key_transitions (from_key_id, to_key_id, origin, to_public_key, issued_at, signature) VALUES ($1, $2, $3, $4, $5, $6)', [
    old.keyId,
    rotated.keyId,
    ORIGIN,
    rotated.publicKey.export({ type: 'spki', format: 'der' }),
    planted.issuedAt,
    planted.signature,
  ]);
  await assert.rejects(older().round(), { name: 'AuditTreeMismatchError', message: new RegExp(`names key ${rotated.keyId}`) });
  await asSuperuser((db) => db.query('DELETE FROM audit.key_transitions'));
  // but through the transition the old key signed (as `audit key-transition` records it), it does.
  await t.store.recordKeyTransition(signKeyTransition(old, ORIGIN, rotated.publicKey, new Date()), old.publicKey, REVIEWER);
  const r = await older().round();
  assert.equal(r.checkpoint?.keyId, old.keyId);
  const report = await verifyLog(t.pool, { publicKey: old.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

test('the sequencer worker: restarted with a new key it signs nothing, counted as a tree mismatch, until given the old public key', async () => {
  const pem = newPem();
  const rotated = loadSigningKey(pem, { production: false });
  t.sink.record(entry(10));
  await t.sink.flush();
  const options = { databaseUrl: t.db.url, signingKeyPem: pem, production: false, origin: ORIGIN, intervalMs: 2, checkpointIntervalMs: 0 };
  const errors: string[] = [];
  const alone = await startSequencerWorker(options, { onError: (m) => errors.push(m) });
  try {
    assert.ok(await eventually(() => Promise.resolve(alone.treeMismatches() >= 2)), 'its rounds are refused, and counted');
    assert.match(errors[0] ?? '', new RegExp(`latest checkpoint \\(tree size 10\\) has no signature the sequencer can trust: it names key ${t.signer.keyId}`));
    assert.equal(await latestSize(), 10);
  } finally {
    await alone.close();
  }
  const given = await startSequencerWorker({ ...options, previousPublicKeysPem: [publicKeyPem(t.signer.publicKey)] });
  try {
    assert.ok(await eventually(async () => (await latestSize()) === 11));
    assert.equal((await t.store.latestCheckpoint())?.keyId, rotated.keyId);
    assert.equal(given.treeMismatches(), 0);
  } finally {
    await given.close();
  }
});

/**
 * Signing-key transitions (keys.ts `KeyTransition`): the outgoing key vouches for the
 * incoming one, so a verifier who holds only the old public key follows the log across a
 * rotation, in full verification and in proof bundles. A transition the trusted key did not
 * sign adds nothing, whoever wrote it into the database.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, test } from 'node:test';
import { runCli } from '../src/cli.ts';
import {
  AuditSequencer,
  keyIdOf,
  keyTransitionBody,
  loadSigningKey,
  signCheckpoint,
  signKeyTransition,
  SigningKeyError,
  trustThroughTransitions,
  verifyBundle,
  verifyLog,
  type CheckpointSigner,
  type InclusionBundle,
} from '../src/index.ts';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

const ORIGIN = 'ledgerline/test';
let t: AuditTestEnv;
const dir = mkdtempSync(join(tmpdir(), 'll-audit-keys-'));

function newSigner(): { signer: CheckpointSigner; pem: string } {
  const pem = generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  return { signer: loadSigningKey(pem, { production: false }), pem };
}

/**
 * Records `n` entries and integrates them under `signer`, which signs a checkpoint. It is given
 * the old public key, as a sequencer restarted with a new key must be: the latest checkpoint is
 * then the old key's, which it holds storage to only once its signature verifies.
 */
async function signedBy(signer: CheckpointSigner, from: number, n: number): Promise<number> {
  const sequencer = new AuditSequencer({ pool: t.pool, signer, previousKeys: [t.signer.publicKey], origin: ORIGIN, checkpointIntervalMs: 0 });
  for (let i = 0; i < n; i += 1) t.sink.record(entry(from + i));
  await t.sink.flush();
  for (let r = await sequencer.round(); r.records > 0; r = await sequencer.round());
  return (await t.store.latestCheckpoint())?.treeSize ?? 0;
}

/**
 * A rotation as an operator makes it: five records under a new key, then the old key vouching
 * for it (through the store, as the CLI does), and the record of that sequenced by the test
 * sequencer, under the old key. Returns the new key.
 */
async function vouchedRotation(): Promise<CheckpointSigner> {
  const incoming = newSigner().signer;
  assert.equal(await signedBy(incoming, 10, 5), 15);
  await t.store.recordKeyTransition(signKeyTransition(t.signer, ORIGIN, incoming.publicKey, new Date()), t.signer.publicKey, REVIEWER);
  await t.settle();
  return incoming;
}

// Each test has a log of its own, ten records under the old key: a rotation (and whatever is
// planted after it) is the test's own, so each runs alone as in the file.
beforeEach(async () => {
  t = await auditTestEnv({ withEvents: false });
  for (let i = 0; i < 10; i += 1) t.sink.record(entry(i));
  await t.settle();
});
afterEach(async () => {
  await t.close();
});

test('a rotation: the old key alone fails on the new checkpoints until the old key vouches for the new one (CLI), then the log verifies', async () => {
  const old = t.signer;
  const rotated = newSigner();
  const sizeOld = (await t.store.latestCheckpoint())?.treeSize ?? 0;
  const sizeNew = await signedBy(rotated.signer, 10, 5);
  assert.ok(sizeOld === 10 && sizeNew === 15, `${sizeOld} ${sizeNew}`);

  const before = await verifyLog(t.pool, { publicKey: old.publicKey });
  assert.equal(before.ok, false);
  assert.equal(before.firstDifference?.kind, 'checkpoint_signature_invalid');
  assert.equal(before.firstDifference?.treeSize, sizeNew);

  // The operator: the outgoing private key from a file, the incoming one as the services have it.
  const oldPemFile = join(dir, 'old.pem');
  writeFileSync(oldPemFile, old.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString());
  let out = '';
  const run = (args: string[]): Promise<number> =>
    runCli(args, { env: { DATABASE_URL: t.db.url, AUDIT_SIGNING_KEY: rotated.pem, AUDIT_LOG_ORIGIN: ORIGIN }, stdout: (s) => (out += s), stderr: () => {} });
  assert.equal(await run(['key-transition', '--previous-key', oldPemFile]), 2, '--as is required: the rotation is audited');
  assert.equal(await run(['key-transition', '--previous-key', oldPemFile, '--as', 'ops:olga']), 0);
  const printed = JSON.parse(out) as { fromKeyId: string; origin: string };
  assert.deepEqual([printed.fromKeyId, printed.origin], [old.keyId, ORIGIN]);

  const after = await verifyLog(t.pool, { publicKey: old.publicKey });
  assert.equal(after.ok, true, JSON.stringify(after.firstDifference));
  assert.deepEqual(
    after.keyTransitionsFollowed.map((x) => [x.fromKeyId, x.toKeyId]),
    [[old.keyId, rotated.signer.keyId]],
  );
  // The rotation is itself in the trail.
  await t.settle();
  const audited = await t.pool.query<{ actor_id: string; resource_id: string }>("SELECT actor_id, resource_id FROM audit.records WHERE action = 'audit.key.transition'");
  assert.deepEqual(audited.rows, [{ actor_id: 'ops:olga', resource_id: rotated.signer.keyId }]);
  // Recording it again changes nothing.
  assert.equal(await run(['key-transition', '--previous-key', oldPemFile, '--as', 'ops:olga']), 0);
  assert.equal((await t.pool.query('SELECT 1 FROM audit.key_transitions')).rowCount, 1);
});

test('a bundle carries the transitions: a third party with the old key alone checks a proof under the new key, and a forged or stripped transition fails', async () => {
  // Given a rotation (records 10 to 14 under the new key, which the old key vouched for),
  await vouchedRotation();
  const old = t.signer.publicKey;
  // against the checkpoint the new key signed (the later ones are the test sequencer's, old key).
  const bundle = (await t.store.inclusionBundle(12, 15)) as InclusionBundle;
  assert.ok(bundle !== null && bundle.keyTransitions?.length === 1);
  assert.match(verifyBundle(bundle, old), /record 12 is included/);
  const { keyTransitions: _dropped, ...stripped } = bundle;
  assert.throws(() => verifyBundle(stripped, old), /checkpoint: the signature does not verify/);
  const [carried] = bundle.keyTransitions ?? [];
  assert.ok(carried !== undefined);
  const flipped = Buffer.from(carried.signature, 'base64');
  flipped[0] = (flipped[0] ?? 0) ^ 1;
  assert.throws(() => verifyBundle({ ...bundle, keyTransitions: [{ ...carried, signature: flipped.toString('base64') }] }, old), /checkpoint: the signature does not verify/);
  assert.throws(() => verifyBundle({ ...bundle, keyTransitions: [{ ...carried, origin: 'another/log' }] }, old), /checkpoint: the signature does not verify/);
  assert.throws(() => verifyBundle({ ...bundle, keyTransitions: [{ ...carried, toPublicKey: 'AAAA' }] }, old), /keyTransitions\[0\]\.toPublicKey is not a public key/);
  // A consistency proof across the rotation checks with the old key alone, too.
  const consistency = await t.store.consistencyBundle(10, 15);
  assert.ok(consistency !== null);
  assert.match(verifyBundle(consistency, old), /at tree size 15 extends tree size 10/);
});

test('a transition the trusted key did not sign adds nothing, even written straight into the database', async () => {
  // Given a rotation the trusted key vouched for,
  await vouchedRotation();
  const old = t.signer;
  const intruder = newSigner().signer;
  const planted = newSigner().signer;
  // Signed by the intruder, but naming the trusted key as the outgoing one.
  const body = { origin: ORIGIN, fromKeyId: old.keyId, toPublicKey: planted.publicKey, issuedAt: new Date() };
  const forged = { ...body, signature: signKeyTransition(intruder, ORIGIN, planted.publicKey, body.issuedAt).signature };
  assert.deepEqual(trustThroughTransitions(old.publicKey, [forged], ORIGIN).followed, []);
  await assert.rejects(t.store.recordKeyTransition(forged, old.publicKey, REVIEWER), SigningKeyError);
  // As a superuser, past the store: the row is there, and still vouches for nothing.
  await t.pool.query('INSERT INTO audit.key_transitions (from_key_id, to_key_id, origin, to_public_key, issued_at, signature) VALUES ($1, $2, $3, $4, $5, $6)', [
    forged.fromKeyId,
    keyIdOf(planted.publicKey),
    ORIGIN,
    planted.publicKey.export({ type: 'spki', format: 'der' }),
    forged.issuedAt,
    forged.signature,
  ]);
  // A checkpoint the planted key signed over the real root: refused.
  const latest = await t.store.latestCheckpoint();
  assert.ok(latest !== null);
  const c = signCheckpoint(planted, { origin: ORIGIN, treeSize: latest.treeSize + 1000, rootHash: latest.rootHash, issuedAt: new Date() });
  await t.pool.query('INSERT INTO audit.checkpoints (tree_size, origin, root_hash, issued_at, key_id, signature) VALUES ($1, $2, $3, $4, $5, $6)', [c.treeSize, c.origin, c.rootHash, c.issuedAt, c.keyId, c.signature]);
  const report = await verifyLog(t.pool, { publicKey: old.publicKey });
  assert.equal(report.ok, false);
  assert.deepEqual(
    report.issues.map((i) => [i.kind, i.treeSize]),
    [['checkpoint_signature_invalid', c.treeSize]],
  );
  assert.equal(report.keyTransitionsFollowed.length, 1, 'only the real transition is followed');
  // The table is append-only, for the superuser too.
  await assert.rejects(t.pool.query('UPDATE audit.key_transitions SET origin = origin'), /append-only/);
  await assert.rejects(t.pool.query('DELETE FROM audit.key_transitions'), /append-only/);
});

test('keys: a transition is refused to the same key, and its signed note names both keys and the incoming key itself', () => {
  const a = newSigner().signer;
  assert.throws(() => signKeyTransition(a, ORIGIN, a.publicKey, new Date()), /the incoming key is the outgoing key/);
  assert.throws(() => signKeyTransition(a, 'two\nlines', newSigner().signer.publicKey, new Date()), /one line/);
  const b = newSigner().signer;
  const tr = signKeyTransition(a, ORIGIN, b.publicKey, new Date(1_700_000_000_000));
  const note = keyTransitionBody(tr).toString('utf8').split('\n');
  assert.deepEqual(note.slice(0, 4), ['ledgerline-audit-key-transition/v1', ORIGIN, a.keyId, b.keyId]);
  assert.equal(note[5], '1700000000000');
  // Chains: a vouches for b, b for c; a verifier holding a follows both, in order.
  const c = newSigner().signer;
  const next = signKeyTransition(b, ORIGIN, c.publicKey, new Date(1_700_000_001_000));
  const widened = trustThroughTransitions(a.publicKey, [next, tr], ORIGIN);
  assert.deepEqual(widened.followed, [tr, next]);
  assert.deepEqual(widened.keys.map(keyIdOf), [a.keyId, b.keyId, c.keyId]);
});

test('a key transition is stored with its record, or not at all', async () => {
  const incoming = newSigner().signer;
  // The queue refusing the transition's record, as a database refusing the write would.
  await t.pool.query(`CREATE FUNCTION public.refuse_transition() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.entry::jsonb ->> 'action' = 'audit.key.transition' THEN RAISE EXCEPTION 'the queue refuses this entry'; END IF;
      RETURN NEW;
    END $$`);
  await t.pool.query('CREATE TRIGGER refuse_transition BEFORE INSERT ON audit.queue FOR EACH ROW EXECUTE FUNCTION public.refuse_transition()');
  const transitions = async (): Promise<number> => (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.key_transitions')).rows[0]?.n ?? -1;
  try {
    await assert.rejects(t.store.recordKeyTransition(signKeyTransition(t.signer, ORIGIN, incoming.publicKey, new Date()), t.signer.publicKey, REVIEWER), /the queue refuses this entry/);
    assert.equal(await transitions(), 0, 'no transition in force that the trail does not show');
  } finally {
    await t.pool.query('DROP TRIGGER refuse_transition ON audit.queue');
    await t.pool.query('DROP FUNCTION public.refuse_transition()');
  }
  // Once the queue takes it, both are there: the transition and, integrated, its record.
  await t.store.recordKeyTransition(signKeyTransition(t.signer, ORIGIN, incoming.publicKey, new Date()), t.signer.publicKey, REVIEWER);
  assert.equal(await transitions(), 1);
  await t.settle();
  const [record] = (await t.store.search({ action: 'audit.key.transition' }, {}, REVIEWER)).records;
  assert.deepEqual([record?.resource, record?.outcome], [{ type: 'audit.signing_key', id: keyIdOf(incoming.publicKey) }, 'success']);
});

/**
 * Tampering by a superuser who bypasses the writer role and the append-only triggers
 * (session_replication_role = replica). Each tampering runs in a transaction that the
 * verifier reads from and that is then rolled back, so every case starts from the same
 * intact log of 100 records and 3 checkpoints (sizes 40, 70, 100).
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { after, before, test } from 'node:test';
import type pg from 'pg';
import { leafData, leafHash, signCheckpoint, verifyLog, type Checkpoint, type VerifyIssueKind, type VerifyReport } from '../src/index.ts';
import type { RecordRow } from '../src/rows.ts';
import { fieldsOf, RECORD_COLUMNS } from '../src/rows.ts';
import { auditTestEnv, entry, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv({ withEvents: false });
  for (const size of [40, 70, 100]) {
    const from = (await t.store.latestCheckpoint())?.treeSize ?? 0;
    for (let i = from; i < size; i += 1) t.sink.record(entry(i, i % 10 === 0 ? { subject: `cust-${i}`, personal: { name: `Customer ${i}` } } : {}));
    await t.settle();
  }
  const intact = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.deepEqual({ ok: intact.ok, records: intact.records, checkpoints: intact.checkpoints }, { ok: true, records: 100, checkpoints: 3 });
});
after(async () => {
  await t.close();
});

/** Tampers as a superuser with triggers off, verifies what that transaction sees, rolls back. */
async function tampered(tamper: (c: pg.PoolClient) => Promise<unknown>, trustedCheckpoints: Checkpoint[] = []): Promise<VerifyReport> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query('SET LOCAL session_replication_role = replica');
    await tamper(c);
    return await verifyLog(c, { publicKey: t.signer.publicKey, trustedCheckpoints });
  } finally {
    await c.query('ROLLBACK');
    c.release();
  }
}

function located(report: VerifyReport, kind: VerifyIssueKind, seq: number | null, treeSize: number | null = null): void {
  assert.equal(report.ok, false);
  const first = report.firstDifference;
  assert.ok(first !== null);
  assert.deepEqual({ kind: first.kind, seq: first.seq, ...(treeSize === null ? {} : { treeSize: first.treeSize }) }, { kind, seq, ...(treeSize === null ? {} : { treeSize }) }, JSON.stringify(report.issues));
}

test('changing one byte of a record is located at that record', async () => {
  const report = await tampered((c) => c.query("UPDATE audit.records SET actor_id = 'svc-9' WHERE seq = 57"));
  located(report, 'record_altered', 57);
  // The signed root of the checkpoint that covers it no longer matches either.
  assert.ok(report.issues.some((i) => i.kind === 'checkpoint_root_mismatch' && i.treeSize === 70));
});

test('changing one byte of a payload, or of encrypted personal data, is located at that record', async () => {
  located(await tampered((c) => c.query("UPDATE audit.payloads SET payload = replace(payload, '\"i\":33', '\"i\":34') WHERE seq = 33")), 'payload_altered', 33);
  located(
    await tampered((c) => c.query("UPDATE audit.payloads SET personal = set_byte(personal, 20, (get_byte(personal, 20) + 1) % 256) WHERE seq = 50")),
    'personal_altered',
    50,
  );
});

test('deleting a record is located at the missing sequence number', async () => {
  const report = await tampered(async (c) => {
    await c.query('DELETE FROM audit.payloads WHERE seq = 12');
    await c.query('DELETE FROM audit.records WHERE seq = 12');
  });
  located(report, 'record_missing', 12);
  // Reported once: each later record is held to its own leaf hash, and the stored subtrees past
  // the gap (which no longer line up with the leaves read) are not reported for it. Only the
  // signed roots that covered it disagree.
  assert.deepEqual(
    report.issues.map((i) => [i.kind, i.seq, i.treeSize]),
    [['record_missing', 12, null], ['checkpoint_root_mismatch', 0, 40], ['checkpoint_root_mismatch', 0, 70], ['checkpoint_root_mismatch', 0, 100]],
  );
});

test('deleting a record and renumbering the rest to close the gap is located at the first renumbered record', async () => {
  const report = await tampered(async (c) => {
    await c.query('DELETE FROM audit.payloads WHERE seq = 12');
    await c.query('DELETE FROM audit.records WHERE seq = 12');
    await c.query('UPDATE audit.payloads SET seq = seq + 1000 WHERE seq > 12');
    await c.query('UPDATE audit.records SET seq = seq + 1000 WHERE seq > 12');
    await c.query('UPDATE audit.records SET seq = seq - 1001 WHERE seq > 1000');
    await c.query('UPDATE audit.payloads SET seq = seq - 1001 WHERE seq > 1000');
  });
  located(report, 'record_altered', 12);
});

test('reordering two records is located at the first of them', async () => {
  const report = await tampered(async (c) => {
    for (const [from, to] of [[21, 1_000_000], [64, 21], [1_000_000, 64]]) {
      await c.query('UPDATE audit.records SET seq = $2 WHERE seq = $1', [from, to]);
      await c.query('UPDATE audit.payloads SET seq = $2 WHERE seq = $1', [from, to]);
    }
  });
  located(report, 'record_altered', 21);
  assert.ok(report.issues.some((i) => i.kind === 'record_altered' && i.seq === 64));
});

test('truncating the tail is located at the first record a checkpoint covers but storage lacks', async () => {
  const report = await tampered(async (c) => {
    await c.query('DELETE FROM audit.payloads WHERE seq >= 93');
    await c.query('DELETE FROM audit.records WHERE seq >= 93');
  });
  located(report, 'records_truncated', 93, 100);
  // Truncating the checkpoints as well leaves nothing signed to betray it but the one kept:
  // the tree must then end exactly at a checkpoint.
  const both = await tampered(async (c) => {
    await c.query('DELETE FROM audit.payloads WHERE seq >= 93');
    await c.query('DELETE FROM audit.records WHERE seq >= 93');
    await c.query('DELETE FROM audit.checkpoints WHERE tree_size = 100');
  });
  assert.equal(both.ok, true);
  assert.equal(both.unsignedRecords, 23, 'the records after the last checkpoint are reported as unsigned');
  // A checkpoint kept outside the database (say from a proof bundle a regulator holds) exposes it.
  const held = (await t.store.checkpointAt(100))!;
  const withHeld = await tampered(async (c) => {
    await c.query('DELETE FROM audit.payloads WHERE seq >= 93');
    await c.query('DELETE FROM audit.records WHERE seq >= 93');
    await c.query('DELETE FROM audit.checkpoints WHERE tree_size = 100');
  }, [held]);
  located(withHeld, 'records_truncated', 93, 100);
});

test('a forged checkpoint signature, or a checkpoint signed by another key, is located at that checkpoint', async () => {
  const flipped = await tampered((c) => c.query('UPDATE audit.checkpoints SET signature = set_byte(signature, 0, (get_byte(signature, 0) + 1) % 256) WHERE tree_size = 70'));
  located(flipped, 'checkpoint_signature_invalid', null, 70);

  const other = generateKeyPairSync('ed25519');
  const stranger = { privateKey: other.privateKey, publicKey: other.publicKey, keyId: 'stranger', development: false };
  const report = await tampered(async (c) => {
    const cp = (await t.store.checkpointAt(70))!;
    const forged = signCheckpoint(stranger, { origin: cp.origin, treeSize: 70, rootHash: Buffer.alloc(32, 7), issuedAt: cp.issuedAt });
    await c.query('UPDATE audit.checkpoints SET root_hash = $1, signature = $2, key_id = $3 WHERE tree_size = 70', [forged.rootHash, forged.signature, forged.keyId]);
  });
  located(report, 'checkpoint_signature_invalid', null, 70);
});

test('a rewrite that recomputes the stored leaf hash is still caught by the signed root, located to a checkpoint span', async () => {
  const report = await tampered(async (c) => {
    const r = await c.query<RecordRow>(`SELECT ${RECORD_COLUMNS} FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq WHERE r.seq = 45`);
    const fields = { ...fieldsOf(r.rows[0]!), outcome: 'success' as const, reason: null, actorId: 'svc-innocent' };
    await c.query('UPDATE audit.records SET actor_id = $1, outcome = $2, reason = NULL, leaf_hash = $3 WHERE seq = 45', [fields.actorId, fields.outcome, leafHash(leafData(fields))]);
  });
  located(report, 'checkpoint_root_mismatch', 40, 70);
  assert.match(report.firstDifference!.detail, /seq 40\.\.69/);
});

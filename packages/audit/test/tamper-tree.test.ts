/**
 * Tampering the tree walk once did not see: a record row forged inside an event tile's range
 * (never read by verification, shown by search), and a changed stored subtree in
 * audit.tree_nodes (proofs break; a restarted sequencer signed a root over it). The log: 3
 * records, one tile of 100 events (seq 3..102), 3 records; subtree (6, 0) covers 0..63.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type pg from 'pg';
import { AuditSequencer, leafData, leafHash, verifyBundle, verifyLog, type AuditRecordFields, type VerifyReport } from '../src/index.ts';
import { auditTestEnv, entry, inTransaction, REVIEWER, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv();
  for (let i = 0; i < 3; i += 1) t.sink.record(entry(i));
  await t.settle();
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    for (let j = 0; j < 100; j += 1) {
      await t.events.append(c, { type: 'ledger.transfer', id: `t-${j}` }, [{ type: 'ledger.TransferPosted', data: { id: `t-${j}`, amount: '1', result: 'ok' }, metadata: { actor: `user:u-${j % 3}` } }], { expectedVersion: 'no_stream' });
    }
    await c.query('COMMIT');
  } finally {
    c.release();
  }
  await t.settle();
  for (let i = 3; i < 6; i += 1) t.sink.record(entry(i));
  await t.settle();
  const tiles = await t.pool.query<{ first_seq: string; leaf_count: number }>('SELECT first_seq::text, leaf_count FROM audit.event_leaves');
  assert.deepEqual(tiles.rows, [{ first_seq: '3', leaf_count: 100 }]);
  const intact = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(intact.ok, true, JSON.stringify(intact.issues));
});
after(async () => {
  await t.close();
});

const forged = (seq: number): AuditRecordFields => ({
  seq,
  id: '01900000-0000-7000-8000-000000000001',
  occurredAt: new Date('2026-01-01T00:00:00Z'),
  recordClass: 'financial',
  actorType: 'user',
  actorId: 'user:ceo',
  action: 'ledger.transfer.approve',
  outcome: 'success',
  reason: null,
  originService: 'ledger',
  originIp: null,
  originRequestId: null,
  originTraceId: null,
  resourceType: 'transfer',
  resourceId: 't-forged',
  subject: null,
  payloadHash: null,
  personalHash: null,
});

const insertForged = (c: pg.ClientBase, seq: number): Promise<unknown> => {
  const f = forged(seq);
  return c.query(
    `INSERT INTO audit.records (seq, id, occurred_at, record_class, actor_type, actor_id, action, outcome, resource_type, resource_id, origin_service, leaf_hash)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)`,
    [seq, f.id, f.occurredAt, f.recordClass, f.actorType, f.actorId, f.action, f.outcome, f.resourceType, f.resourceId, f.originService, leafHash(leafData(f))],
  );
};

/** Runs `fn` in a transaction, as the sequencer's role or as a superuser with triggers off, and rolls it back unless `keep`. */
const inTx = <T>(as: 'sequencer' | 'superuser', fn: (c: pg.PoolClient) => Promise<T>, keep = false): Promise<T> =>
  inTransaction(t.pool, as === 'sequencer' ? 'SET LOCAL ROLE ledgerline_audit_sequencer' : 'SET LOCAL session_replication_role = replica', fn, keep);

const verifyIn = (c: pg.PoolClient): Promise<VerifyReport> => verifyLog(c, { publicKey: t.signer.publicKey });

test('the database refuses a record inside a tile, for every role with triggers on', async () => {
  // The sequencer's role (the one role that inserts records, migration 1769300000000);
  // migration 1769100000000 also binds its records to the next leaves, so either guard may
  // speak first.
  await assert.rejects(inTx('sequencer', (c) => insertForged(c, 50)), /audit\.records: /);
  // The schema owner, who passes the next-leaf guard, still meets this one.
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await assert.rejects(insertForged(c, 50), /inside the event tile at seq 3/);
  } finally {
    await c.query('ROLLBACK');
    c.release();
  }
});

test('a record forged inside a tile (triggers off) is reported at its seq by verification', async () => {
  const report = await inTx('superuser', async (c) => {
    await insertForged(c, 50);
    return verifyIn(c);
  });
  assert.equal(report.ok, false);
  assert.deepEqual({ kind: report.firstDifference?.kind, seq: report.firstDifference?.seq }, { kind: 'record_in_tile', seq: 50 }, JSON.stringify(report.issues));
});

test('search and proofs do not take a record forged inside a tile for the leaf there', async () => {
  await inTx('superuser', (c) => insertForged(c, 50), true);
  try {
    const byActor = await t.store.search({ actorId: 'user:ceo' }, { limit: 10 }, REVIEWER);
    assert.deepEqual(byActor.records, []);
    const all = await t.store.search({ resourceType: 'transfer' }, { limit: 1000, order: 'asc' }, REVIEWER);
    assert.equal(all.records.filter((r) => r.seq === 50).length, 0);
    const bundle = await t.store.inclusionBundle(50, undefined, REVIEWER);
    assert.ok(bundle !== null);
    verifyBundle(bundle, t.signer.publicKey);
  } finally {
    await inTx('superuser', (c) => c.query('DELETE FROM audit.records WHERE seq = 50'), true);
  }
});

test('a changed stored subtree (triggers off) is reported by verification at its level and index', async () => {
  const report = await inTx('superuser', async (c) => {
    await c.query("UPDATE audit.tree_nodes SET hash = sha256('x') WHERE level = 6 AND idx = 0");
    return verifyIn(c);
  });
  assert.equal(report.ok, false);
  const first = report.firstDifference;
  assert.deepEqual({ kind: first?.kind, node: first?.node, seq: first?.seq }, { kind: 'tree_node_altered', node: { level: 6, index: 0 }, seq: 0 }, JSON.stringify(report.issues));
  // A deleted one, too.
  const missing = await inTx('superuser', async (c) => {
    await c.query('DELETE FROM audit.tree_nodes WHERE level = 6 AND idx = 0');
    return verifyIn(c);
  });
  assert.deepEqual({ kind: missing.firstDifference?.kind, node: missing.firstDifference?.node }, { kind: 'tree_node_missing', node: { level: 6, index: 0 } }, JSON.stringify(missing.issues));
});

test('a restarted sequencer over a changed stored subtree refuses to sign or integrate, and says so', async () => {
  const original = await t.pool.query<{ hash: Buffer }>('SELECT hash FROM audit.tree_nodes WHERE level = 6 AND idx = 0');
  const before = await t.store.latestCheckpoint();
  await inTx('superuser', (c) => c.query("UPDATE audit.tree_nodes SET hash = sha256('x') WHERE level = 6 AND idx = 0"), true);
  try {
    const errors: unknown[] = [];
    const fresh = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: 'ledgerline/test', checkpointIntervalMs: 0, tailEvents: true, onError: (e) => errors.push(e) });
    t.sink.record(entry(99));
    await t.sink.flush();
    const queued = (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue')).rows[0]?.n ?? 0;
    assert.ok(queued >= 1);
    await assert.rejects(fresh.round(), { name: 'AuditTreeMismatchError' });
    // Run as a service runs it: every round reports, nothing is signed.
    fresh.start();
    await new Promise((resolve) => setTimeout(resolve, 300));
    await fresh.close().catch((e: unknown) => errors.push(e));
    assert.ok(errors.length > 0 && errors.every((e) => e instanceof Error && e.name === 'AuditTreeMismatchError'), String(errors));
    const after = await t.store.latestCheckpoint();
    assert.equal(after?.treeSize, before?.treeSize);
    // Nothing integrated: the queue is as it was.
    assert.equal((await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue')).rows[0]?.n, queued);
  } finally {
    await inTx('superuser', (c) => c.query('UPDATE audit.tree_nodes SET hash = $1 WHERE level = 6 AND idx = 0', [original.rows[0]?.hash]), true);
  }
  // Repaired, it goes on from where it stopped, and the log verifies.
  await t.settle();
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

/**
 * The audit log on PostgreSQL: sequencing, signed checkpoints, proofs a third party checks
 * with the public key alone, search, and append-only storage enforced by the database.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { after, before, test } from 'node:test';
import pg from 'pg';
import {
  AUDIT_WRITER_ROLE,
  AuditBufferFullError,
  AuditSequencer,
  checkpointSignatureValid,
  InvalidAuditEntryError,
  parsePublicKey,
  PostgresAuditSink,
  ProofError,
  SEQUENCER_APPLICATION_NAME,
  SEQUENCER_NICE_DEFAULT,
  startSequencerWorker,
  publicKeyPem,
  verifyBundle,
  verifyLog,
  type AuditEntry,
} from '../src/index.ts';
import { STORED_LEVEL_MIN } from '../src/tree.ts';
import { SEARCH_LIMIT_DEFAULT } from '../src/store.ts';
import { behindFaultProxy, testRandom } from '@ledgerline/testing';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv({ withEvents: false });
});
after(async () => {
  await t.close();
});

/**
 * Records `entry(i)` for `from <= i < to` and sequences them (a checkpoint included); returns
 * their seqs, in order. A test's own records, told apart from any other by their request ids.
 */
let sequencedCalls = 0;
async function sequenced(from: number, to: number): Promise<number[]> {
  sequencedCalls += 1;
  const batch = `sequenced-${sequencedCalls}`;
  for (let i = from; i < to; i += 1) t.sink.record(entry(i, { origin: { service: 'ledger', ip: '192.0.2.1', requestId: `${batch}-${i}` } }));
  await t.settle();
  const r = await t.pool.query<{ seq: number }>("SELECT seq::int AS seq FROM audit.records WHERE origin_request_id LIKE $1 || '-%' ORDER BY seq", [batch]);
  assert.equal(r.rows.length, to - from);
  return r.rows.map((row) => row.seq);
}

test('entries are sequenced in batches, signed, and verify; proofs check with the public key alone', async () => {
  for (let i = 0; i < 40; i += 1) t.sink.record(entry(i));
  assert.equal(await t.settle(), 40);
  const first = await t.store.latestCheckpoint();
  assert.equal(first?.treeSize, 40);
  assert.ok(checkpointSignatureValid(t.signer.publicKey, first));
  for (let i = 40; i < 77; i += 1) t.sink.record(entry(i));
  assert.equal(await t.settle(), 37);
  const latest = await t.store.latestCheckpoint();
  assert.equal(latest?.treeSize, 77);

  // The third party has the PEM and the bundles, nothing else.
  const publicKey = parsePublicKey(publicKeyPem(t.signer.publicKey));
  for (const seq of [0, 15, 16, 39, 40, 63, 64, 76]) {
    const bundle = await t.store.inclusionBundle(seq);
    assert.ok(bundle !== null);
    assert.match(verifyBundle(JSON.parse(JSON.stringify(bundle)) as typeof bundle, publicKey), new RegExp(`record ${seq} is included`));
    // The same proof claimed for a neighbouring leaf fails.
    assert.throws(() => verifyBundle({ ...bundle, leafIndex: seq === 0 ? 1 : seq - 1 }, publicKey), ProofError);
  }
  const old = await t.store.inclusionBundle(5, 40);
  assert.equal(old?.checkpoint.treeSize, 40);
  assert.equal(await t.store.inclusionBundle(77), null, 'not yet covered by a checkpoint');
  assert.equal(await t.store.inclusionBundle(5, 41), null, 'no checkpoint of that size');

  const consistency = await t.store.consistencyBundle(40, 77);
  assert.ok(consistency !== null);
  assert.match(verifyBundle(consistency, publicKey), /extends tree size 40/);
  assert.equal(await t.store.consistencyBundle(77, 40), null);
  // A forged checkpoint inside an otherwise valid bundle is refused.
  const forged = { ...consistency, to: { ...consistency.to, rootHash: consistency.from.rootHash } };
  assert.throws(() => verifyBundle(forged, publicKey), /signature does not verify/);
  const wrongProof = { ...consistency, proof: consistency.proof.slice(1) };
  assert.throws(() => verifyBundle(wrongProof, publicKey), ProofError);

  const report = await verifyLog(t.pool, { publicKey });
  assert.deepEqual({ ok: report.ok, records: report.records, checkpoints: report.checkpoints, unsigned: report.unsignedRecords }, { ok: true, records: 77, checkpoints: 2, unsigned: 0 });
});

test('search filters by actor, resource, type, outcome and time, pages by keyset, and is itself audited', async () => {
  // Given 77 records of this test's own (every actor, outcome and resource of `entry`),
  await sequenced(0, 77);
  const all = await t.store.search({}, { limit: 1000 }, REVIEWER);
  const n = all.records.length;
  assert.ok(n >= 77);
  const byActor = await t.store.search({ actorId: 'svc-1' }, { limit: 1000 }, REVIEWER);
  assert.ok(byActor.records.length > 0 && byActor.records.every((r) => r.actor.id === 'svc-1'));
  const failures = await t.store.search({ outcome: 'failure', action: 'ledger.transfer.create' }, {}, REVIEWER);
  assert.ok(failures.records.length > 0 && failures.records.every((r) => r.outcome === 'failure' && r.reason === 'exceeds_credits' && r.action === 'ledger.transfer.create'));
  const byResource = await t.store.search({ resourceType: 'transfer', resourceId: 't-3' }, {}, REVIEWER);
  assert.deepEqual(byResource.records.map((r) => r.resource.id), byResource.records.map(() => 't-3'));
  assert.deepEqual(byResource.records[0]?.payload, { i: 3, amount: '300', nested: { a: [1, 2, 'x'], b: 1 } });
  const none = await t.store.search({ from: new Date(Date.now() + 3600_000) }, {}, REVIEWER);
  assert.equal(none.records.length, 0);
  const window = await t.store.search({ from: new Date(Date.now() - 3600_000), to: new Date(Date.now() + 3600_000) }, { limit: 1000 }, REVIEWER);
  assert.ok(window.records.length >= 77);

  // Keyset pages, both orders: together exactly the records, no overlap.
  for (const order of ['asc', 'desc'] as const) {
    const seen: number[] = [];
    let after: number | undefined;
    for (;;) {
      const page = await t.store.search({ actorId: 'svc-2' }, { limit: 4, order, ...(after === undefined ? {} : { after }) }, REVIEWER);
      seen.push(...page.records.map((r) => r.seq));
      if (page.nextCursor === null) break;
      after = page.nextCursor;
    }
    const expected = (await t.store.search({ actorId: 'svc-2' }, { limit: 1000, order }, REVIEWER)).records.map((r) => r.seq);
    assert.deepEqual(seen, expected);
    assert.ok(expected.length > 4);
  }
  await assert.rejects(t.store.search({}, { limit: 0 }, REVIEWER), RangeError);
  await assert.rejects(t.store.search({ from: new Date('2016-12-31T23:59:60Z') }, {}, REVIEWER), /from is not a valid time/);

  // Each search above left a record of itself, naming the reviewer and the filter.
  await t.settle();
  const searches = await t.store.search({ action: 'audit.search', actorId: 'user:reviewer' }, { limit: 1000 }, REVIEWER);
  assert.ok(searches.records.length >= 10);
  const bySvc1 = searches.records.find((r) => (r.payload?.filter as { actorId?: string }).actorId === 'svc-1');
  assert.equal(bySvc1?.origin.ip, '10.0.0.9');
  assert.equal(bySvc1?.recordClass, 'access');
  assert.equal(bySvc1?.payload?.returned, byActor.records.length);
  // The refused one too, with why.
  const refused = searches.records.filter((r) => r.outcome === 'failure');
  assert.deepEqual(
    refused.map((r) => [r.payload?.limit, (r.payload?.filter as { from?: string }).from ?? null, r.reason]),
    [
      [0, null, 'limit must be an integer in 1..1000'],
      [SEARCH_LIMIT_DEFAULT, 'Invalid Date', 'from is not a valid time'],
    ],
  );
});

test('the writer role cannot update or delete; a trigger stops everyone else', async () => {
  // Given records of this test's own, with their payloads and a checkpoint, and enough of them
  // for the tree to have a stored node (a subtree of the lowest stored level): the trigger is
  // per row, and a statement that touches no row would pass it.
  const [seq] = await sequenced(0, 2 ** STORED_LEVEL_MIN);
  const c = await t.pool.connect();
  try {
    for (const sql of [`UPDATE audit.records SET actor_id = $$x$$ WHERE seq = ${seq}`, `DELETE FROM audit.records WHERE seq = ${seq}`, 'DELETE FROM audit.checkpoints', 'TRUNCATE audit.records CASCADE', 'UPDATE audit.payloads SET payload = NULL', 'DELETE FROM audit.payloads', 'DELETE FROM audit.subject_keys']) {
      await c.query('BEGIN');
      await c.query('SET LOCAL ROLE ledgerline_audit_writer');
      await assert.rejects(c.query(sql), /permission denied/, sql);
      await c.query('ROLLBACK');
    }
    // The superuser holds every privilege; the trigger still refuses.
    for (const sql of [`UPDATE audit.records SET actor_id = $$x$$ WHERE seq = ${seq}`, `DELETE FROM audit.records WHERE seq = ${seq}`, 'TRUNCATE audit.records CASCADE', 'UPDATE audit.checkpoints SET signature = $$\\x00$$', 'DELETE FROM audit.tree_nodes', 'UPDATE audit.payloads SET payload = NULL']) {
      await assert.rejects(c.query(sql), /append-only/, sql);
    }
  } finally {
    c.release();
  }
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true);
});

test('the sink checks entries at the call site, bounds its buffer, and a second sequencer waits its turn', async () => {
  const bad: [string, unknown][] = [
    ['recordClass', { ...entry(1), recordClass: 'Bad Class' }],
    ['actor.type', { ...entry(1), actor: { type: 'robot', id: 'x' } }],
    ['action', { ...entry(1), action: '' }],
    ['outcome', { ...entry(1), outcome: 'maybe' }],
    ['origin.service', { ...entry(1), origin: {} }],
    ['resource.id', { ...entry(1), resource: { type: 't', id: 'x'.repeat(501) } }],
    ['occurredAt', { ...entry(1), occurredAt: new Date(Number.NaN) }],
    ['payload', { ...entry(1), payload: [1, 2] }],
    ['payload', { ...entry(1), payload: { big: 'x'.repeat(70_000) } }],
    ['payload', { ...entry(1), payload: { n: 10n } }],
    ['subject', { ...entry(1), personal: { name: 'Ada' } }],
    ['NUL', { ...entry(1), reason: 'a\u0000b' }],
  ];
  for (const [what, e] of bad) assert.throws(() => t.sink.record(e as AuditEntry), InvalidAuditEntryError, what);

  const small = new PostgresAuditSink({ pool: t.pool, bufferEntriesMax: 10, flushIntervalMs: 60_000 });
  for (let i = 0; i < 10; i += 1) small.record(entry(i));
  assert.equal(small.saturated, true);
  assert.throws(() => small.record(entry(11)), AuditBufferFullError);
  await small.close();
  assert.equal(small.buffered, 0);
  assert.throws(() => small.record(entry(12)), /closed/);

  // Two sequencers: only the lock holder integrates; the other's round is empty, and it
  // resumes from storage (not its stale frontier) once it gets the lock.
  const other = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: 'ledgerline/test', checkpointIntervalMs: 0 });
  const holder = await t.pool.connect();
  try {
    await holder.query('BEGIN');
    await holder.query('SELECT 1 FROM audit.sequencer_state FOR UPDATE');
    assert.deepEqual(await other.round(), { records: 0, checkpoint: null });
    await holder.query('COMMIT');
  } finally {
    holder.release();
  }
  await t.sink.flush();
  const queued = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue');
  const r = await other.round();
  assert.equal(r.records, queued.rows[0]?.n);
  assert.ok(r.records >= 10);
  assert.equal(r.checkpoint?.treeSize, (await t.store.latestCheckpoint())?.treeSize);
  // The first sequencer's frontier is stale now; its next round must notice.
  t.sink.record(entry(99));
  assert.equal(await t.settle(), 1);
  // The lock is the cursor's row, which only a role that may update it can hold: the writer's
  // role (any service's login) cannot, and the advisory lock that was the lock once stops nothing.
  const intruder = await t.pool.connect();
  try {
    await intruder.query(`BEGIN; SET LOCAL ROLE ${AUDIT_WRITER_ROLE}`);
    await assert.rejects(intruder.query('SELECT 1 FROM audit.sequencer_state FOR UPDATE'), /permission denied/);
    await intruder.query('ROLLBACK');
    await intruder.query('BEGIN');
    await intruder.query("SELECT pg_advisory_xact_lock(hashtextextended('ledgerline.audit.sequencer', 0))");
    t.sink.record(entry(98));
    await t.sink.flush();
    assert.equal((await t.sequencer.round()).records, 1, 'the round ran beside the advisory lock');
    await intruder.query('COMMIT');
  } finally {
    intruder.release();
  }
  other.start();
  await other.close();

  // A row the sink did not write (garbage, or fields that fail the checks) becomes a record of
  // its own rejection: the sequencer neither stops nor drops it.
  await t.pool.query(`INSERT INTO audit.queue (entry) VALUES ('not json'), ($1)`, [JSON.stringify({ ...entry(1), id: 'nope', occurredAt: new Date().toISOString(), payloadJson: null, personalJson: null })]);
  assert.equal(await t.settle(), 2);
  const rejected = await t.store.search({ action: 'audit.entry.rejected' }, {}, REVIEWER);
  assert.deepEqual(rejected.records.map((r) => [r.outcome, r.recordClass, r.payload?.queued]), [
    ['failure', 'security', 'not json'],
    ['failure', 'security', rejected.records[1]?.payload?.queued],
  ]);
  assert.match(rejected.records[0]?.reason ?? '', /JSON/);
  assert.match(rejected.records[1]?.reason ?? '', /not a UUID/);
  const report2 = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report2.ok, true, JSON.stringify(report2.firstDifference));
});

test('a database that refuses: the sink keeps its entries, the sequencer reports and retries', async () => {
  const gone = new pg.Pool({ connectionString: t.db.url, max: 1 });
  await gone.end();
  const sink = new PostgresAuditSink({ pool: gone, flushIntervalMs: 60_000 });
  sink.record(entry(1));
  await assert.rejects(sink.flush());
  assert.equal(sink.buffered, 1, 'nothing is lost: the entry waits for the next flush');
  const errors: unknown[] = [];
  const sequencer = new AuditSequencer({ pool: gone, signer: t.signer, origin: 'ledgerline/test', intervalMs: 1, onError: (e) => errors.push(e) });
  sequencer.start();
  for (let attempt = 0; attempt < 1000 && errors.length < 2; attempt += 1) await new Promise((resolve) => setTimeout(resolve, 2));
  assert.ok(errors.length >= 2, 'every failed round is reported, and the loop goes on');
  await assert.rejects(sequencer.close());
});

/** The nice value of each thread of this process (Linux: field 19 of /proc/self/task/<tid>/stat). */
function threadNiceValues(): number[] {
  return readdirSync('/proc/self/task').map((tid) => {
    const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
  });
}

test("the sequencer worker's connections cut again and again: it lives through it and sequences what waited", async () => {
  // Given a worker whose connections go through a proxy that resets them every few milliseconds,
  const { proxy, url: proxied } = await behindFaultProxy(t.db.url);
  const failures: string[] = [];
  const worker = await startSequencerWorker(
    { databaseUrl: proxied, signingKeyPem: '', production: false, origin: 'ledgerline/test', intervalMs: 2, checkpointIntervalMs: 0 },
    { onError: (message) => failures.push(message) },
  );
  try {
    // when records arrive while the connections are cut for a second,
    const random = testRandom('sequencer worker connection cuts');
    let cuts = 0;
    const until = Date.now() + 1000;
    for (let i = 0; Date.now() < until; i += 1) {
      t.sink.record(entry(1000 + i));
      await new Promise((resolve) => setTimeout(resolve, 2 + random() * 6));
      cuts += proxy.dropConnections();
    }
    await t.sink.flush();
    // then its rounds failed and were retried, the thread lived, and it sequences the backlog.
    for (let attempt = 0; attempt < 2000; attempt += 1) {
      const r = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue');
      if (r.rows[0]?.n === 0) break;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    assert.equal((await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue')).rows[0]?.n, 0, 'the queue drained');
    assert.ok(cuts > 0 && failures.length > 0, `connections were cut under the sequencer (${cuts} cuts, ${failures.length} failed rounds)`);
    assert.deepEqual(failures.filter((m) => /no longer sequences/.test(m)), [], 'the worker thread lived');
  } finally {
    await worker.close();
    await proxy.close();
  }
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
});

/** Waits until the audit queue is empty (everything recorded has been sequenced). */
async function queueDrained(): Promise<void> {
  for (let attempt = 0; attempt < 2000; attempt += 1) {
    const r = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue');
    if (r.rows[0]?.n === 0) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  assert.fail('the audit queue did not drain within 10 s');
}

test('a sequencer worker thread that dies is replaced, and the new one sequences what waited meanwhile', async () => {
  const errors: string[] = [];
  const warnings: string[] = [];
  const worker = await startSequencerWorker(
    { databaseUrl: t.db.url, signingKeyPem: '', production: false, origin: 'ledgerline/test', intervalMs: 2, checkpointIntervalMs: 0, restartDelayMs: 100, restartDelayMaxMs: 400 },
    { onError: (message) => errors.push(message), onWarning: (message) => warnings.push(message) },
  );
  try {
    for (let death = 1; death <= 2; death += 1) {
      // Given a running thread that ends abruptly, as a crash would end it,
      const thread = worker.thread();
      assert.ok(thread !== null, 'a thread runs');
      await thread.terminate();
      // when records arrive while no thread runs,
      assert.equal(worker.thread(), null, 'no thread runs until the new one has started');
      for (let i = 0; i < 25; i += 1) t.sink.record(entry(3000 + death * 100 + i));
      await t.sink.flush();
      // then a new thread is started after a wait, and it sequences them.
      for (let attempt = 0; attempt < 1000 && worker.restarts() < death; attempt += 1) await new Promise((resolve) => setTimeout(resolve, 5));
      assert.equal(worker.restarts(), death, `restart ${death} happened`);
      assert.ok(worker.thread() !== null && worker.thread() !== thread, 'a new thread runs');
      await queueDrained();
    }
    const deaths = errors.filter((m) => /sequencer worker exited with 1; a new one starts in \d+ ms/.test(m));
    assert.equal(deaths.length, 2, `each death is reported: ${JSON.stringify(errors)}`);
    assert.deepEqual(warnings.filter((m) => /started again/.test(m)), ['audit sequencer worker started again (restart 1)', 'audit sequencer worker started again (restart 2)']);
  } finally {
    await worker.close();
  }
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
});

test('closing a worker whose thread died cancels the restart that was waiting', async () => {
  const errors: string[] = [];
  const worker = await startSequencerWorker(
    { databaseUrl: t.db.url, signingKeyPem: '', production: false, origin: 'ledgerline/test', intervalMs: 5, restartDelayMs: 20, restartDelayMaxMs: 20 },
    { onError: (message) => errors.push(message) },
  );
  await worker.thread()?.terminate();
  assert.equal(errors.length, 1, 'the death is reported');
  await worker.close();
  // Long enough for a restart that was not cancelled to have started a thread (which takes
  // some hundreds of milliseconds here); one that did is ended, so a failing run still ends.
  await new Promise((resolve) => setTimeout(resolve, 2000));
  const late = worker.thread();
  await late?.terminate();
  assert.equal(late, null, 'no new thread after close()');
  assert.equal(worker.restarts(), 0);
  assert.deepEqual(await worker.cpuUsage(), { user: 0, system: 0 }, 'no thread, no CPU');
  await assert.rejects(
    startSequencerWorker({ databaseUrl: t.db.url, signingKeyPem: '', production: false, origin: 'x', restartDelayMs: 0 }),
    /restartDelayMs must be positive/,
  );
});

test('the sequencer runs in a worker thread and signs a last checkpoint when closed', async () => {
  const worker = await startSequencerWorker({ databaseUrl: t.db.url, signingKeyPem: '', production: false, origin: 'ledgerline/test', intervalMs: 5, checkpointIntervalMs: 60_000 });
  for (let i = 0; i < 30; i += 1) t.sink.record(entry(i));
  await t.sink.flush();
  for (let attempt = 0; attempt < 2000; attempt += 1) {
    const r = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue');
    if (r.rows[0]?.n === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  // Below the service's priority, named in pg_stat_activity, and its CPU is its own.
  const named = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1', [SEQUENCER_APPLICATION_NAME]);
  assert.ok((named.rows[0]?.n ?? 0) >= 1, 'the worker connects under its application_name');
  if (process.platform === 'linux') assert.ok(threadNiceValues().includes(SEQUENCER_NICE_DEFAULT), `a thread of this process runs at nice ${SEQUENCER_NICE_DEFAULT}`);
  const cpu = await worker.cpuUsage();
  assert.ok(cpu.user + cpu.system > 0, 'the worker reports its own CPU time');
  await worker.close();
  await assert.rejects(startSequencerWorker({ databaseUrl: t.db.url, signingKeyPem: '', production: false, origin: 'x', nice: 20 }), /nice must be an integer in 0..19/);
  const size = await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.records');
  assert.equal((await t.store.latestCheckpoint())?.treeSize, size.rows[0]?.n, 'the final checkpoint covers every record');
  await assert.rejects(startSequencerWorker({ databaseUrl: t.db.url, signingKeyPem: '', production: true, origin: 'x' }), /required in production/);
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
});

/**
 * A sequencer that loads its frontier (a restart: a fresh AuditSequencer on the same database)
 * over many leaves past the latest checkpoint, records and event tiles mixed: it folds them in
 * from storage (sequencer.ts `checkedFrontier`, read as ranges by tree.ts
 * `storedLeafHashRange`), takes a tile's leaf where a record is forged inside its range, names
 * the first leaf storage lacks, and signs the root the log really has. The log: a first round
 * that signs (5 records, 40 events: size 45), then five times 3 records and 5,300 events in
 * rounds of at most 5,000 leaves that do not sign; more than 20,000 unsigned leaves, so the
 * frontier is read in more than one range and a range starts inside a tile.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import type pg from 'pg';
import { AuditSequencer, rootOf, signCheckpoint, verifyLog } from '../src/index.ts';
import { storedLeafHashes, storedLeafHashRange } from '../src/tree.ts';
import { auditTestEnv, drain, entry, inTransaction, type AuditTestEnv } from './support.ts';

const ORIGIN = 'ledgerline/test';
const SIGNED = 45;

interface Log {
  t: AuditTestEnv;
  tiles: { first: number; count: number }[];
  records: number[];
  size: number;
  events: number;
}

/** `n` events of streams of their own, written in one statement (the store's checks are not what is tested here). */
async function writeEvents(log: Pick<Log, 't' | 'events'>, n: number): Promise<void> {
  await log.t.pool.query(
    `INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata)
     SELECT 0, gen_random_uuid(), 'ticket', 't-' || g, 1, 'TicketOpened', jsonb_build_object('n', g), '{"actor":"user:u-1"}'
       FROM generate_series($1::int, $1::int + $2::int - 1) g`,
    [log.events, n],
  );
  log.events += n;
}

async function buildLog(): Promise<Log> {
  const t = await auditTestEnv();
  const log = { t, events: 0 };
  // Its first round signs (it has signed nothing yet); the later ones do not.
  const writer = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: ORIGIN, tailEvents: true, checkpointIntervalMs: 1e12, batchRecordsMax: 5000 });
  for (let i = 0; i < 5; i += 1) t.sink.record(entry(i));
  await writeEvents(log, 40);
  await drain(t, writer);
  for (let k = 0; k < 5; k += 1) {
    for (let i = 0; i < 3; i += 1) t.sink.record(entry(10 + k * 3 + i));
    await t.sink.flush();
    await writeEvents(log, 5300);
    await drain(t, writer);
  }
  const checkpoints = await t.pool.query<{ n: number }>('SELECT tree_size::int AS n FROM audit.checkpoints ORDER BY tree_size');
  assert.deepEqual(checkpoints.rows.map((r) => r.n), [SIGNED]);
  const tiles = (await t.pool.query<{ first: number; count: number }>('SELECT first_seq::int AS first, leaf_count AS count FROM audit.event_leaves ORDER BY first_seq')).rows;
  const records = (await t.pool.query<{ seq: number }>('SELECT seq::int FROM audit.records ORDER BY seq')).rows.map((r) => r.seq);
  const size = tiles.reduce((n, tile) => n + tile.count, 0) + records.length;
  assert.ok(size - SIGNED > 20_000, `${size - SIGNED} unsigned leaves`);
  assert.ok(tiles.some((tile) => tile.first > SIGNED && tiles.some((u) => u.first > tile.first)) && records.some((seq) => seq > SIGNED), 'records and tiles mixed past the checkpoint');
  return { ...log, tiles, records, size };
}

/**
 * Every leaf hash, read here without tree.ts: a record's unless a tile covers its seq (a
 * record forged inside a tile is left out), and each tile's leaves.
 */
async function allLeaves(pool: pg.Pool): Promise<Buffer[]> {
  const r = await pool.query<{ seq: number; h: Buffer }>(
    `SELECT seq::int, h FROM (
       SELECT r.seq, r.leaf_hash AS h FROM audit.records r
        WHERE NOT EXISTS (SELECT 1 FROM audit.event_leaves t WHERE r.seq >= t.first_seq AND r.seq < t.first_seq + t.leaf_count)
       UNION ALL
       SELECT t.first_seq + i, substring(t.leaf_hashes FROM i * 32 + 1 FOR 32) FROM audit.event_leaves t, generate_series(0, t.leaf_count - 1) i) x
     ORDER BY seq`,
  );
  r.rows.forEach((row, i) => assert.equal(row.seq, i, 'leaves are consecutive'));
  return r.rows.map((row) => row.h);
}

/** Runs `fn` in a committed transaction with triggers off, as a superuser could. */
const asSuperuser = <T>(pool: pg.Pool, fn: (c: pg.PoolClient) => Promise<T>): Promise<T> => inTransaction(pool, 'SET LOCAL session_replication_role = replica', fn, true);

/** A record forged at `seq` (inside a tile: the database's guards are off). */
const forgeRecord = (pool: pg.Pool, seq: number): Promise<unknown> =>
  asSuperuser(pool, (c) =>
    c.query(
      `INSERT INTO audit.records (seq, id, occurred_at, record_class, actor_type, actor_id, action, outcome, resource_type, resource_id, origin_service, leaf_hash)
       VALUES ($1, gen_random_uuid(), now(), 'financial', 'user', 'user:ceo', 'ledger.transfer.approve', 'success', 'transfer', 't-forged', 'ledger', $2)`,
      [seq, randomBytes(32)],
    ),
  );

const freshSequencer = (t: AuditTestEnv): AuditSequencer =>
  new AuditSequencer({ pool: t.pool, signer: t.signer, origin: ORIGIN, tailEvents: true, checkpointIntervalMs: 0 });

describe('a restarted sequencer over many unsigned leaves', () => {
  let log: Log;
  before(async () => {
    log = await buildLog();
  });
  after(async () => {
    await log.t.close();
  });

  test('signs the root of the log as stored, from a checkpoint inside a tile, past records forged inside tiles', async () => {
    const { t, tiles } = log;
    // A checkpoint inside the first unsigned tile (rounds sign at a tile's end; a checkpoint
    // signed elsewhere, or a range read starting mid-tile, must fold in the tile's rest).
    const straddling = tiles.find((tile) => tile.first > SIGNED) as { first: number; count: number };
    const mid = straddling.first + 1000;
    assert.ok(mid < straddling.first + straddling.count);
    const cp = signCheckpoint(t.signer, { origin: ORIGIN, treeSize: mid, rootHash: rootOf((await allLeaves(t.pool)).slice(0, mid)), issuedAt: new Date() });
    await t.pool.query('INSERT INTO audit.checkpoints (tree_size, origin, root_hash, issued_at, key_id, signature) VALUES ($1, $2, $3, $4, $5, $6)', [cp.treeSize, cp.origin, cp.rootHash, cp.issuedAt, cp.keyId, cp.signature]);
    // Records forged inside tiles past the checkpoint: the straddling one's and the last one's.
    const last = tiles.at(-1) as { first: number; count: number };
    const forged = [mid + 5, last.first + 2];
    for (const seq of forged) await forgeRecord(t.pool, seq);

    const fresh = freshSequencer(t);
    for (let i = 0; i < 4; i += 1) t.sink.record(entry(100 + i));
    await writeEvents(log, 30);
    await drain(t, fresh);
    const leaves = await allLeaves(t.pool);
    const latest = await t.store.latestCheckpoint();
    assert.equal(latest?.treeSize, leaves.length);
    assert.ok(leaves.length === log.size + 34, `${leaves.length} leaves`);
    assert.ok(latest?.rootHash.equals(rootOf(leaves)), 'the restarted sequencer signed the root of the stored leaves');

    await asSuperuser(t.pool, (c) => c.query('DELETE FROM audit.records WHERE seq = ANY($1::bigint[])', [forged]));
    const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
    assert.equal(report.ok, true, JSON.stringify(report.issues));
  });
});

describe('a restarted sequencer over unsigned leaves some of which were removed', () => {
  let log: Log;
  before(async () => {
    log = await buildLog();
  });
  after(async () => {
    await log.t.close();
  });

  /**
   * Commits `tamper`, then holds a fresh sequencer's round to the AuditTreeMismatchError
   * naming `seq`, with nothing signed or integrated; then commits `repair`.
   */
  async function refusesNaming(seq: number, tamper: (c: pg.PoolClient) => Promise<unknown>, repair: (c: pg.PoolClient) => Promise<unknown>): Promise<void> {
    const { t } = log;
    const checkpoints = async (): Promise<number> => (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.checkpoints')).rows[0]?.n ?? 0;
    const queued = async (): Promise<number> => (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue')).rows[0]?.n ?? 0;
    const before = await checkpoints();
    await asSuperuser(t.pool, tamper);
    try {
      t.sink.record(entry(500));
      await t.sink.flush();
      const waiting = await queued();
      assert.ok(waiting >= 1);
      const fresh = freshSequencer(t);
      await assert.rejects(fresh.round(), (error: Error) => {
        assert.equal(error.name, 'AuditTreeMismatchError');
        assert.match(error.message, new RegExp(`^audit tree: leaf ${seq} is missing from storage; `));
        return true;
      });
      assert.equal(await checkpoints(), before);
      assert.equal(await queued(), waiting, 'nothing integrated');
    } finally {
      await asSuperuser(t.pool, repair);
    }
  }

  /** What puts the row of `table` at `seq` (its key) back as it is now. */
  async function restorer(table: 'audit.records' | 'audit.event_leaves', seq: number): Promise<(c: pg.PoolClient) => Promise<unknown>> {
    const key = table === 'audit.records' ? 'seq' : 'first_seq';
    const saved = (await log.t.pool.query<{ j: string }>(`SELECT row_to_json(x)::text AS j FROM ${table} x WHERE ${key} = $1`, [seq])).rows[0]?.j;
    assert.ok(saved !== undefined, `${table} has a row at ${seq}`);
    return async (c) => {
      await c.query(`DELETE FROM ${table} WHERE ${key} = $1`, [seq]);
      await c.query(`INSERT INTO ${table} SELECT * FROM json_populate_record(NULL::${table}, $1::json)`, [saved]);
    };
  }

  const deleteRow = (table: 'audit.records' | 'audit.event_leaves', seq: number) => (c: pg.PoolClient) =>
    c.query(`DELETE FROM ${table} WHERE ${table === 'audit.records' ? 'seq' : 'first_seq'} = $1`, [seq]);

  test('a removed record, a removed tile or a cut tile stops it at the first leaf storage lacks', async () => {
    const { tiles, records } = log;
    const unsignedRecords = records.filter((seq) => seq >= SIGNED);
    // The first leaf after the checkpoint (a record).
    assert.equal(unsignedRecords[0], SIGNED);
    await refusesNaming(SIGNED, deleteRow('audit.records', SIGNED), await restorer('audit.records', SIGNED));
    // A record in the second range read, between two tiles.
    const later = unsignedRecords.find((seq) => seq > SIGNED + 20_000);
    assert.ok(later !== undefined);
    await refusesNaming(later, deleteRow('audit.records', later), await restorer('audit.records', later));
    // A whole tile (not the last: that would shorten the log).
    const middle = tiles[Math.floor(tiles.length / 2)] as { first: number; count: number };
    assert.ok(middle.first > SIGNED && middle !== tiles.at(-1));
    await refusesNaming(middle.first, deleteRow('audit.event_leaves', middle.first), await restorer('audit.event_leaves', middle.first));
    // A tile across the boundary of two range reads, cut to its first 3 leaves: the leaf after
    // them is the one missing, not the next range's first.
    const crossing = tiles.find((tile) => tile.first < SIGNED + 20_000 && tile.first + tile.count > SIGNED + 20_000);
    assert.ok(crossing !== undefined);
    await refusesNaming(
      crossing.first + 3,
      (c) => c.query('UPDATE audit.event_leaves SET leaf_count = 3, positions = positions[1:3], leaf_hashes = substring(leaf_hashes FROM 1 FOR 96) WHERE first_seq = $1', [crossing.first]),
      await restorer('audit.event_leaves', crossing.first),
    );

    // Repaired, a fresh sequencer integrates and signs, and the log verifies.
    await drain(log.t, freshSequencer(log.t));
    assert.equal((await log.t.store.latestCheckpoint())?.treeSize, log.size + 4);
    const report = await verifyLog(log.t.pool, { publicKey: log.t.signer.publicKey });
    assert.equal(report.ok, true, JSON.stringify(report.issues));
  });

  test('a range read gives the leaves a read of each seq gives, forged records and gaps included', async () => {
    const { t, tiles } = log;
    const size = log.size + 4;
    // Records forged inside a tile (at its first leaf, inside, at its last), and a tile removed.
    const inside = tiles[1] as { first: number; count: number };
    const forged = [inside.first, inside.first + 7, inside.first + inside.count - 1];
    const gone = tiles[3] as { first: number; count: number };
    const repair = await restorer('audit.event_leaves', gone.first);
    for (const seq of forged) await forgeRecord(t.pool, seq);
    await asSuperuser(t.pool, deleteRow('audit.event_leaves', gone.first));
    try {
      const edges = tiles.flatMap((tile) => [tile.first - 1, tile.first, tile.first + 1, tile.first + tile.count - 1, tile.first + tile.count]);
      const points = [...new Set([0, 1, SIGNED, size - 1, size, ...edges, ...forged])].filter((p) => p >= 0 && p <= size).sort((a, b) => a - b);
      const ranges: [number, number][] = [[0, size], [0, 0], [size, size]];
      for (let i = 0; i < 60; i += 1) {
        const a = points[Math.floor(Math.random() * points.length)] as number;
        const b = Math.min(size, a + Math.floor(Math.random() * 3) * Math.floor(Math.random() * 6000));
        ranges.push([a, b]);
      }
      for (const [from, to] of ranges) {
        const seqs = Array.from({ length: to - from }, (_, i) => from + i);
        const each = await storedLeafHashes(t.pool, seqs);
        const range = await storedLeafHashRange(t.pool, from, to);
        const missing = seqs.find((seq) => !each.has(seq));
        if (missing === undefined) {
          assert.ok(range.hashes?.equals(Buffer.concat(seqs.map((seq) => each.get(seq) as Buffer))), `leaves ${from}..${to}`);
        } else {
          assert.deepEqual({ missing: range.missing, malformed: range.hashes === null && range.malformed }, { missing, malformed: false }, `leaves ${from}..${to}`);
        }
      }
    } finally {
      await asSuperuser(t.pool, async (c) => {
        await c.query('DELETE FROM audit.records WHERE seq = ANY($1::bigint[])', [forged]);
        await repair(c);
      });
    }
    const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
    assert.equal(report.ok, true, JSON.stringify(report.issues));
  });
});

describe('a tile whose count was forged past its CHECK', () => {
  let t: AuditTestEnv;
  before(async () => {
    t = await auditTestEnv();
  });
  after(async () => {
    await t.close();
  });

  test('the range read names the first leaf it lacks, where offsets in int4 would overflow', async () => {
    // A superuser drops the table's CHECKs and plants a tile claiming 2^31 - 1 leaves with the
    // hashes of two: the read's offsets into it reach past 2^31 bytes.
    await asSuperuser(t.pool, async (c) => {
      const checks = await c.query<{ name: string }>(`SELECT conname AS name FROM pg_constraint WHERE conrelid = 'audit.event_leaves'::regclass AND contype = 'c'`);
      for (const { name } of checks.rows) await c.query(`ALTER TABLE audit.event_leaves DROP CONSTRAINT ${JSON.stringify(name)}`);
      await c.query(
        `INSERT INTO audit.event_leaves (first_seq, leaf_count, first_transaction_id, first_position, first_recorded_at, last_recorded_at, positions, leaf_hashes, actors, failures)
         VALUES (0, 2147483647, '1'::xid8, 1, now(), now(), '{1,2}', $1, '{}', 0)`,
        [randomBytes(64)],
      );
    });
    const from = 100_000_000;
    assert.deepEqual(await storedLeafHashRange(t.pool, from, from + 2), { hashes: null, missing: from, malformed: true });
    const start = await storedLeafHashRange(t.pool, 0, 3);
    assert.deepEqual(start.hashes === null ? [start.missing, start.malformed] : 'no refusal', [2, true]);
  });
});

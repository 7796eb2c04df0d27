/**
 * The Merkle tree as stored: leaf hashes on `audit.records`, completed subtrees of level
 * STORED_LEVEL_MIN and above in `audit.tree_nodes`. Any subtree hash, and so any proof or a
 * sequencer's frontier, costs O(log n) small reads.
 */
import type pg from 'pg';
import { sqlArrayLiteral } from '@ledgerline/events';
import { consistencyRanges, foldSubtrees, Frontier, HASH_BYTES, inclusionRanges, perfectSubtrees, rootOf, type Range, type Subtree } from './merkle.ts';

export type Queryable = Pick<pg.ClientBase, 'query'>;

/**
 * Subtrees below this level are hashed from at most 2^level - 1 stored leaf hashes (one
 * query). It was 4: storing every 16-leaf subtree cost the sequencer an index entry per 8
 * leaves, about half a microsecond per event (measured); at 6 it is one per 32. A log written
 * with 4 stays readable: its nodes at levels 4 and 5 are simply not read.
 */
export const STORED_LEVEL_MIN = 6;

const key = (level: number, index: number): string => `${level}/${index}`;

/**
 * SQL: the record row `r` lies inside an event tile's range (the last tile starting at or
 * before it, by the primary key). No record belongs there: the sequencer gives records and
 * tiles disjoint ranges, so such a row is forged (migration 1769000000000 refuses new ones).
 * Readers leave it out: the tree's leaf there is the tile's, and search must not show it.
 */
export const recordInTile = (r: string): string =>
  `EXISTS (SELECT 1 FROM (SELECT t.first_seq, t.leaf_count FROM audit.event_leaves t WHERE t.first_seq <= ${r}.seq ORDER BY t.first_seq DESC LIMIT 1) t
            WHERE ${r}.seq < t.first_seq + t.leaf_count)`;

/** Leaves stored: the records and the event tiles, whichever reaches further. */
export async function storedTreeSize(db: Queryable): Promise<number> {
  const r = await db.query<{ n: string }>(
    `SELECT greatest((SELECT coalesce(max(seq) + 1, 0) FROM audit.records),
                     coalesce((SELECT first_seq + leaf_count FROM audit.event_leaves ORDER BY first_seq DESC LIMIT 1), 0))::text AS n`,
  );
  return Number(r.rows[0]?.n ?? 0);
}

/** The hashes of perfect subtrees, in the order asked. Throws when storage lacks one. */
export async function subtreeHashes(db: Queryable, wanted: readonly { level: number; index: number }[]): Promise<Buffer[]> {
  const stored = wanted.filter((s) => s.level >= STORED_LEVEL_MIN);
  const low = wanted.filter((s) => s.level < STORED_LEVEL_MIN);
  const found = new Map<string, Buffer>();
  if (stored.length > 0) {
    const r = await db.query<{ level: number; idx: string; hash: Buffer }>(
      `SELECT n.level, n.idx::text, n.hash FROM audit.tree_nodes n
         JOIN unnest($1::smallint[], $2::bigint[]) AS w(level, idx) ON n.level = w.level AND n.idx = w.idx`,
      [stored.map((s) => s.level), stored.map((s) => s.index)],
    );
    for (const row of r.rows) found.set(key(row.level, Number(row.idx)), row.hash);
  }
  if (low.length > 0) {
    const seqs = low.flatMap((s) => Array.from({ length: 2 ** s.level }, (_, i) => s.index * 2 ** s.level + i));
    const leaves = await storedLeafHashes(db, seqs);
    for (const s of low) {
      const hashes = Array.from({ length: 2 ** s.level }, (_, i) => leaves.get(s.index * 2 ** s.level + i));
      if (hashes.every((h) => h !== undefined)) found.set(key(s.level, s.index), rootOf(hashes));
    }
  }
  return wanted.map((s) => {
    const h = found.get(key(s.level, s.index));
    if (h === undefined) throw new Error(`audit tree: subtree level ${s.level} index ${s.index} is missing from storage`);
    return h;
  });
}

/** The stored leaf hashes of `seqs`, from the records and the event tiles; absent ones are left out. */
export async function storedLeafHashes(db: Queryable, seqs: readonly number[]): Promise<Map<number, Buffer>> {
  const r = await db.query<{ seq: string; leaf_hash: Buffer }>(
    `SELECT r.seq::text, r.leaf_hash FROM audit.records r WHERE r.seq = ANY($1::bigint[]) AND NOT ${recordInTile('r')}
     UNION ALL
     SELECT s.seq::text, substring(t.leaf_hashes FROM (s.seq - t.first_seq)::integer * 32 + 1 FOR 32)
       FROM unnest($1::bigint[]) AS s(seq)
       CROSS JOIN LATERAL (SELECT * FROM audit.event_leaves t WHERE t.first_seq <= s.seq ORDER BY t.first_seq DESC LIMIT 1) t
      WHERE s.seq < t.first_seq + t.leaf_count`,
    [sqlArrayLiteral(seqs)],
  );
  return new Map(r.rows.map((row) => [Number(row.seq), row.leaf_hash]));
}

/**
 * The stored leaf hashes of leaves `from`..`to`-1, in order, 32 bytes each in one buffer: the
 * leaves `storedLeafHashes` gives for those sequence numbers, read as a range. One statement
 * (one snapshot): the records with seq in the range and the event tiles that overlap it (the
 * last one starting at or before `from`, and those starting inside), range scans of the two
 * primary keys, the tiles' hashes cut to the range in SQL (offsets computed in bigint and bounded
 * by the tile's count and its bytes: a tile ending long before `from`, or one whose count was
 * forged past its CHECK, must not overflow an integer) and spread here. Read a leaf
 * at a time (a probe of each table per leaf, and a slice of the tile's out-of-line bytea),
 * 50,000 unsigned leaves took a restarted sequencer about 190 ms; as a range, 7 (measured).
 *
 * The same leaves as `storedLeafHashes`: at each seq the leaf is the tile's when the last tile
 * starting at or before it covers it (a record there is forged and left out, as `recordInTile`
 * leaves it out), else the record's. `{ missing }`: the first seq in the range storage holds no
 * leaf for, or whose stored hash is not 32 bytes (`malformed`: only with a CHECK of the schema
 * dropped).
 */
export async function storedLeafHashRange(
  db: Queryable,
  from: number,
  to: number,
): Promise<{ hashes: Buffer; missing: null } | { hashes: null; missing: number; malformed: boolean }> {
  if (!(Number.isSafeInteger(from) && Number.isSafeInteger(to) && from >= 0 && from <= to)) throw new RangeError(`no leaf range ${from}..${to}`);
  const r = await db.query<{ tile: boolean; seq: string; count: number; hashes: Buffer }>(
    `SELECT true AS tile, t.first_seq::text AS seq, t.leaf_count AS count,
            substring(t.leaf_hashes FROM least(least(greatest(t.first_seq, $1::bigint) - t.first_seq, t.leaf_count::bigint) * 32 + 1, octet_length(t.leaf_hashes)::bigint + 1)::integer
                                    FOR least(greatest(0, least(t.first_seq + t.leaf_count, $2::bigint) - greatest(t.first_seq, $1::bigint)) * 32, octet_length(t.leaf_hashes)::bigint)::integer) AS hashes
       FROM ((SELECT t.first_seq, t.leaf_count, t.leaf_hashes FROM audit.event_leaves t WHERE t.first_seq <= $1::bigint ORDER BY t.first_seq DESC LIMIT 1)
             UNION ALL
             (SELECT t.first_seq, t.leaf_count, t.leaf_hashes FROM audit.event_leaves t WHERE t.first_seq > $1::bigint AND t.first_seq < $2::bigint)) t
     UNION ALL
     SELECT false, r.seq::text, 1, r.leaf_hash FROM audit.records r WHERE r.seq >= $1::bigint AND r.seq < $2::bigint`,
    [from, to],
  );
  const tiles: { first: number; end: number; at: number; hashes: Buffer }[] = [];
  const records: { seq: number; hash: Buffer }[] = [];
  for (const row of r.rows) {
    const first = Number(row.seq);
    if (row.tile) tiles.push({ first, end: first + row.count, at: Math.max(first, from), hashes: row.hashes });
    else records.push({ seq: first, hash: row.hashes });
  }
  tiles.sort((a, b) => a.first - b.first);
  records.sort((a, b) => a.seq - b.seq);
  const out = Buffer.allocUnsafe((to - from) * HASH_BYTES);
  // `ti`: the last tile starting at or before `seq`; `ri`: the first record at or after it.
  let ti = -1;
  let ri = 0;
  for (let seq = from; seq < to; ) {
    while (ti + 1 < tiles.length && (tiles[ti + 1] as (typeof tiles)[number]).first <= seq) ti += 1;
    const tile = tiles[ti];
    if (tile !== undefined && seq < tile.end) {
      // The tile's leaves up to its end, the range's, or the next tile's start (which takes over from there).
      const end = Math.min(tile.end, to, tiles[ti + 1]?.first ?? Number.POSITIVE_INFINITY);
      const lo = (seq - tile.at) * HASH_BYTES;
      const hi = (end - tile.at) * HASH_BYTES;
      if (tile.hashes.length < hi) return { hashes: null, missing: tile.at + Math.max(Math.floor(tile.hashes.length / HASH_BYTES), seq - tile.at), malformed: true };
      tile.hashes.copy(out, (seq - from) * HASH_BYTES, lo, hi);
      seq = end;
      continue;
    }
    while (ri < records.length && (records[ri] as (typeof records)[number]).seq < seq) ri += 1;
    const record = records[ri];
    if (record === undefined || record.seq !== seq) return { hashes: null, missing: seq, malformed: false };
    if (record.hash.length !== HASH_BYTES) return { hashes: null, missing: seq, malformed: true };
    record.hash.copy(out, (seq - from) * HASH_BYTES);
    seq += 1;
  }
  return { hashes: out, missing: null };
}

/** The hash of each range, MTH(D[lo:hi]), fetched in two queries at most. */
async function rangeHashes(db: Queryable, ranges: readonly Range[]): Promise<Buffer[]> {
  const parts = ranges.map((r) => perfectSubtrees(r.lo, r.hi));
  const hashes = await subtreeHashes(db, parts.flat());
  let at = 0;
  return parts.map((p) => {
    const slice = hashes.slice(at, at + p.length);
    at += p.length;
    return foldSubtrees(slice);
  });
}

/** The frontier of the stored tree of `size` leaves: what a sequencer resumes from. */
export async function loadFrontier(db: Queryable, size: number): Promise<Frontier> {
  const parts = perfectSubtrees(0, size);
  const hashes = await subtreeHashes(db, parts);
  const nodes: Subtree[] = parts.map((p, i) => ({ ...p, hash: hashes[i] as Buffer }));
  return new Frontier(size, nodes);
}

export async function inclusionProof(db: Queryable, index: number, treeSize: number): Promise<Buffer[]> {
  return rangeHashes(db, inclusionRanges(index, treeSize));
}

export async function consistencyProof(db: Queryable, size1: number, size2: number): Promise<Buffer[]> {
  return rangeHashes(db, consistencyRanges(size1, size2));
}

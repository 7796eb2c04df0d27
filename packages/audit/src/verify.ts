/**
 * Full verification: recompute the tree from storage, record by record, and hold it against
 * every signed checkpoint. It trusts nothing stored except through the public key: leaf
 * hashes are recomputed from the record's columns, payloads are hashed again, and each root
 * is compared with a checkpoint whose signature is checked first.
 *
 * Where a tampering is located:
 * - a changed column: the record whose recomputed leaf differs from its stored leaf hash;
 * - a changed, moved or renumbered event (events are leaves where they are, event-leaves.ts):
 *   the leaf recomputed from the event store differs from the tile's stored hash;
 * - a deleted event: its leaf, unless the financial class's retention, as the trail records
 *   it (retention-in-force.ts), has run out for it;
 * - a changed payload or personal ciphertext: the record whose hash no longer matches;
 * - a payload removed early (`payload_missing`): its record, when the record's class's retention,
 *   as the trail records it (retention-in-force.ts, counted from the record's occurred time as
 *   `audit.expire_payloads` counts it), has not run out, or when a legal hold the trail records
 *   (placed, signed, and no release recorded) covered the record before it ran out;
 * - a deleted record: the first missing sequence number, once (each later leaf is still held
 *   to its own hash);
 * - an event no leaf has: where it would stand among its tile's leaves, or after the tile and
 *   the records stored after it (a deleted tile's place);
 * - two records swapped: the first of them (a leaf commits to its own sequence number);
 * - a truncated tail: the first sequence number a checkpoint covers but storage lacks;
 * - a tile's search summary that no longer matches its events (`search_summary_altered`):
 *   the tile's first leaf. It is not evidence, but search trusts it to skip tiles;
 * - a record row inside an event tile's range (`record_in_tile`, a forgery: the tile's leaves
 *   are its events, and such a row would show in search): that row's sequence number;
 * - a changed, missing or extra stored subtree (`tree_node_altered`, `tree_node_missing`):
 *   that node, by level and index. Proofs and a restarting sequencer read them, so a changed
 *   one breaks proofs, or a checkpoint, without touching a leaf;
 * - a forged or altered checkpoint: that checkpoint;
 * - a rewrite that also recomputed the stored leaf hashes: the span between the last
 *   checkpoint that still matches and the first that does not.
 */
import { createPublicKey, type KeyObject } from 'node:crypto';
import { sqlArrayLiteral } from '@ledgerline/events';
import type { Checkpoint as EventCheckpoint } from '@ledgerline/events';
import { checkpointSignatureValid, keyIdOf, trustThroughTransitions, type Checkpoint, type KeyTransition, type TrustedKeys } from './keys.ts';
import { Frontier, leafHash, type Subtree } from './merkle.ts';
import { canonicalResourceId, leafData, sha256, type AuditRecordFields } from './record.ts';
import { CHECKPOINT_COLUMNS, checkpointOf, fieldsOf, RECORD_COLUMNS, type CheckpointRow, type RecordRow } from './rows.ts';
import { STORED_LEVEL_MIN, type Queryable } from './tree.ts';
import { changesOf, financialRetentionChanges, recordedHolds, RETAIN_DAYS_ORIGINAL, retentionChanges, retentionRunsOut, type RecordedHold, type RetentionChange, type RetentionChanges, type RetentionRunOut } from './retention-in-force.ts';
import { archiveExemptThrough, checkTile, compareOrder, ORDER_ORIGIN, recordedTimesMismatch, storedTileLeaves, stretchDetail, stretchEnd, stretchRows, summaryMismatch, tileStarts, type EventLeafCheck, type TileStart } from './event-leaves.ts';

export const VERIFY_PAGE_RECORDS = 5000;
export const VERIFY_ISSUES_MAX_DEFAULT = 100;
/** The lowest level audit.tree_nodes holds (logs written before STORED_LEVEL_MIN was 6 stored from 4). */
const TREE_NODE_LEVEL_MIN = 4;

export type VerifyIssueKind =
  | 'record_altered'
  | 'payload_altered'
  | 'payload_missing'
  | 'personal_altered'
  | 'record_missing'
  | 'checkpoint_signature_invalid'
  | 'checkpoint_root_mismatch'
  | 'records_truncated'
  | 'event_missing'
  | 'event_not_integrated'
  | 'event_misplaced'
  | 'event_duplicated'
  | 'search_summary_altered'
  | 'record_in_tile'
  | 'tree_node_altered'
  | 'tree_node_missing'
  | 'events_unread';

export interface VerifyIssue {
  kind: VerifyIssueKind;
  /** The first record concerned; for a root mismatch, the first record after the last good checkpoint. */
  seq: number | null;
  /** The checkpoint concerned, by its tree size. */
  treeSize: number | null;
  /** For a stored subtree (`tree_node_*`): its level and index; `seq` is then its first leaf. */
  node?: { level: number; index: number };
  detail: string;
}

export interface VerifyReport {
  ok: boolean;
  records: number;
  checkpoints: number;
  /** Records after the latest checkpoint: stored, not yet signed. */
  unsignedRecords: number;
  /** The stored signing-key transitions the trusted keys vouched for (in turn), which let checkpoints of later keys verify. */
  keyTransitionsFollowed: { fromKeyId: string; toKeyId: string; issuedAt: Date }[];
  firstDifference: VerifyIssue | null;
  issues: VerifyIssue[];
  issuesTruncated: boolean;
}

export interface VerifyOptions {
  /** The trusted public key, or several when the signing key was rotated (keys.ts `TrustedKeys`). */
  publicKey: TrustedKeys;
  /**
   * Checkpoints kept outside this database (by a third party, or from earlier proof bundles).
   * Storage alone cannot reveal a superuser who removed the tail records together with the
   * checkpoints that covered them; a checkpoint held elsewhere can.
   */
  trustedCheckpoints?: readonly Checkpoint[];
  issuesMax?: number;
  /** The clock retention is judged by (a missing event is expired, not deleted, once its class's retention has run out). */
  now?: () => Date;
  onProgress?: (records: number) => void;
  /**
   * Whether to read the event store, whose events are the tiles' leaves (default true). False:
   * nothing of it is read; the tiles' stored leaf hashes stand in for their events, unchecked,
   * and `events_unread` says so (the report is not `ok`). The audit CLI passes false to a login
   * that could alter the log on a database that had no event store when the run began: one
   * created meanwhile would run its owner's code with that login's rights when read.
   */
  readEventStore?: boolean;
}

/** The stored signing-key transitions (keys.ts `KeyTransition`), oldest first. */
export async function storedKeyTransitions(db: Queryable): Promise<KeyTransition[]> {
  const r = await db.query<{ origin: string; from_key_id: string; to_public_key: Buffer; issued_at: Date; signature: Buffer }>(
    'SELECT origin, from_key_id, to_public_key, issued_at, signature FROM audit.key_transitions ORDER BY issued_at, from_key_id, to_key_id',
  );
  const transitions: KeyTransition[] = [];
  for (const row of r.rows) {
    let toPublicKey: KeyObject;
    try {
      toPublicKey = createPublicKey({ key: row.to_public_key, format: 'der', type: 'spki' });
    } catch {
      continue; // not a key: it vouches for nothing
    }
    transitions.push({ origin: row.origin, fromKeyId: row.from_key_id, toPublicKey, issuedAt: row.issued_at, signature: row.signature });
  }
  return transitions;
}

/**
 * Pages through checkpoints in tree-size order, up to the largest one when verification began.
 * A later one may cover records signed after storage was read: on a log whose sequencer is
 * running, it would read as the records being gone (records_truncated) when they were only new.
 */
async function* checkpoints(db: Queryable): AsyncGenerator<Checkpoint, void> {
  const bound = await db.query<{ size: string | null }>('SELECT max(c.tree_size)::text AS size FROM audit.checkpoints c');
  const through = bound.rows[0]?.size ?? null;
  if (through === null) return;
  let after = 0;
  for (;;) {
    const r = await db.query<CheckpointRow>(
      `SELECT ${CHECKPOINT_COLUMNS} FROM audit.checkpoints c WHERE c.tree_size > $1 AND c.tree_size <= $2 ORDER BY c.tree_size LIMIT 1000`,
      [after, through],
    );
    for (const row of r.rows) yield checkpointOf(row);
    const last = r.rows.at(-1);
    if (last === undefined) return;
    after = Number(last.tree_size);
  }
}

export async function verifyLog(db: Queryable, options: VerifyOptions): Promise<VerifyReport> {
  const issuesMax = options.issuesMax ?? VERIFY_ISSUES_MAX_DEFAULT;
  const issues: VerifyIssue[] = [];
  let issuesTruncated = false;
  const report = (issue: VerifyIssue): void => {
    if (issues.length < issuesMax) issues.push(issue);
    else issuesTruncated = true;
  };
  const frontier = new Frontier();
  // The tree of the leaf hashes as stored, against which the stored subtrees are held: a
  // changed record is its own issue (record_altered), not also one for each subtree above it.
  const storedTree = new Frontier();
  let completed: Subtree[] = [];
  const appendStored = (h: Buffer): void => {
    for (const n of storedTree.append(h)) if (n.level >= TREE_NODE_LEVEL_MIN) completed.push(n);
  };
  /**
   * Leaves missing from storage so far (`record_missing`): the walk goes on at each stored
   * seq, so the tree expects `frontier.size + missing` next and every later leaf is still
   * held to its own hash, not reported again for having moved.
   */
  let missing = 0;
  /** Holds the stored subtrees completed since the last call to the ones recomputed. */
  const checkNodes = async (): Promise<void> => {
    if (completed.length === 0) return;
    const batch = completed;
    completed = [];
    // Past a missing range the stored tree is short of leaves: its subtrees no longer line up
    // with the stored ones, and the gap is already reported.
    if (missing > 0) return;
    const r = await db.query<{ hash: Buffer | null }>(
      `SELECT n.hash FROM unnest($1::smallint[], $2::bigint[]) WITH ORDINALITY AS w(level, idx, i)
         LEFT JOIN audit.tree_nodes n ON n.level = w.level AND n.idx = w.idx ORDER BY w.i`,
      [sqlArrayLiteral(batch.map((n) => n.level)), sqlArrayLiteral(batch.map((n) => n.index))],
    );
    for (const [i, n] of batch.entries()) {
      const stored = r.rows[i]?.hash ?? null;
      const at = { seq: n.index * 2 ** n.level, treeSize: null, node: { level: n.level, index: n.index } };
      const leaves = `leaves ${at.seq}..${at.seq + 2 ** n.level - 1}`;
      // Every subtree of STORED_LEVEL_MIN or above is stored; below it, only in logs written before.
      if (stored === null) {
        if (n.level >= STORED_LEVEL_MIN) report({ kind: 'tree_node_missing', ...at, detail: `the stored subtree at level ${n.level}, index ${n.index} (${leaves}) is missing: proofs and a restarting sequencer need it` });
      } else if (!stored.equals(n.hash)) {
        report({ kind: 'tree_node_altered', ...at, detail: `the stored subtree at level ${n.level}, index ${n.index} (${leaves}) does not match the subtree recomputed from its leaves: proofs through it fail, and a sequencer resuming from it would sign a wrong root` });
      }
    }
  };
  // The verifier's keys, widened per log origin by the stored transitions they vouched for.
  const transitions = await storedKeyTransitions(db);
  const followed = new Set<KeyTransition>();
  const keysByOrigin = new Map<string, TrustedKeys>();
  const keysFor = (origin: string): TrustedKeys => {
    let keys = keysByOrigin.get(origin);
    if (keys === undefined) {
      const widened = trustThroughTransitions(options.publicKey, transitions, origin);
      for (const t of widened.followed) followed.add(t);
      keys = widened.keys;
      keysByOrigin.set(origin, keys);
    }
    return keys;
  };
  const cps = checkpoints(db);
  const trusted = [...(options.trustedCheckpoints ?? [])].sort((a, b) => a.treeSize - b.treeSize);
  let stored: Checkpoint | null | undefined;
  /** The next checkpoint by tree size, from storage or from the trusted ones. */
  const nextCheckpoint = async (): Promise<Checkpoint | null> => {
    if (stored === undefined) {
      const r = await cps.next();
      stored = r.done === true ? null : r.value;
    }
    const t = trusted[0];
    if (t !== undefined && (stored === null || t.treeSize <= stored.treeSize)) return trusted.shift() ?? null;
    const s = stored;
    stored = undefined;
    return s;
  };
  let next = await nextCheckpoint();
  let checked = 0;
  let lastGoodSize = 0;

  /** Checks `cp` against the leaves recomputed so far (every stored record below its size). */
  const checkCheckpoint = (cp: Checkpoint, storageEnded: boolean): void => {
    checked += 1;
    if (!checkpointSignatureValid(keysFor(cp.origin), cp)) {
      report({ kind: 'checkpoint_signature_invalid', seq: null, treeSize: cp.treeSize, detail: `checkpoint at tree size ${cp.treeSize} (issued ${cp.issuedAt.toISOString()}, key ${cp.keyId}) has no valid signature under the trusted public keys` });
      return;
    }
    const end = frontier.size + missing;
    if (storageEnded && end < cp.treeSize) {
      report({ kind: 'records_truncated', seq: end, treeSize: cp.treeSize, detail: `checkpoint covers ${cp.treeSize} records but storage ends at seq ${end - 1}: seq ${end}..${cp.treeSize - 1} are gone` });
      return;
    }
    if (frontier.size !== cp.treeSize || !frontier.root().equals(cp.rootHash)) {
      report({ kind: 'checkpoint_root_mismatch', seq: lastGoodSize, treeSize: cp.treeSize, detail: `the tree recomputed from storage does not match the checkpoint at tree size ${cp.treeSize}: a record in seq ${lastGoodSize}..${cp.treeSize - 1} differs from what was signed` });
      return;
    }
    lastGoodSize = cp.treeSize;
  };

  /**
   * Events a tile's stretch of the global order holds after the tile's last event, and no
   * leaf has (`event_not_integrated`, seq still to be set): they belong after the tile and the
   * records stored right after it, where the walk next finds a gap, the next tile, or the end
   * of storage. They are reported there, after that place's own difference (the range of a
   * deleted tile is `record_missing` or `records_truncated` at its first seq).
   */
  let unplaced: VerifyIssue[] = [];
  const placeUnplaced = (at: number): void => {
    for (const issue of unplaced) report({ ...issue, seq: at });
    unplaced = [];
  };
  /**
   * Checks the checkpoints that cover only leaves before `seq`, then flags a gap before it.
   * At a gap, or at a tile's start (`boundary`), places the events left unplaced.
   */
  const reach = async (seq: number, boundary = false): Promise<void> => {
    // A checkpoint covers the leaves below its size: check every one this leaf passes, those
    // that end inside a gap after the gap (which is why they fail).
    const at = frontier.size + missing;
    while (next !== null && next.treeSize <= Math.min(seq, at)) {
      checkCheckpoint(next, false);
      next = await nextCheckpoint();
    }
    if (seq > at) {
      report({ kind: 'record_missing', seq: at, treeSize: null, detail: `seq ${at}..${seq - 1} missing from storage` });
      missing += seq - at;
    }
    while (next !== null && next.treeSize <= seq) {
      checkCheckpoint(next, false);
      next = await nextCheckpoint();
    }
    if (unplaced.length > 0 && (seq !== at || boundary)) placeUnplaced(at);
  };
  const now = (options.now ?? (() => new Date()))();
  /**
   * When retention may have removed the event of the leaf just reached: judged by the
   * signed time of the first checkpoint that covers the leaf (`next`, once `reach` has passed
   * every checkpoint below it), since its event was recorded before that checkpoint was issued,
   * and by the financial class's retention as the trail records it (retention-in-force.ts:
   * the original policy and the `audit.retention.change` records, read once, when the first
   * event is found missing). Nothing stored and unsigned (such as a tile's recorded times, or
   * `audit.retention_policies`) can make a deletion pass for an expiry. A leaf no checkpoint
   * covers yet is too recent to have expired.
   */
  let financialChanges: RetentionChange[] | undefined;
  const vouched = new Map<Checkpoint, RetentionRunOut>();
  const forEver: RetentionRunOut = { at: Infinity, keptBy: null };
  /** When the event of the leaf just reached may go (`at` past `now`: not yet), and the lengthening that kept it, if one did. */
  const eventRunsOut = async (): Promise<RetentionRunOut> => {
    if (next === null) return forEver;
    let runOut = vouched.get(next);
    if (runOut === undefined) {
      financialChanges ??= await financialRetentionChanges(db, (cp) => checkpointSignatureValid(keysFor(cp.origin), cp));
      runOut = checkpointSignatureValid(keysFor(next.origin), next) ? retentionRunsOut(financialChanges, next.issuedAt, now) : forEver;
      vouched.set(next, runOut);
    }
    return runOut;
  };
  /**
   * A record's payload row gone (expiry removes it, the hashes its leaf commits to stay; erasure
   * destroys the subject's key and leaves the row): lawful only once the retention of the
   * record's class, as the trail records it, has run out, counted from the record's occurred time
   * as `audit.expire_payloads` counts it, with the changes in force when the leaf was signed
   * (the first checkpoint covering it, as for an event; a leaf none covers yet: by `now`), and
   * then only if no legal hold the trail records covered the record from before that time on.
   * A hold counts from its signed placement (its stated time is the writer's word) until any
   * recorded release: a payload can have gone lawfully after the release, and verification
   * cannot tell when it went. A record with neither hash never had a row. The class changes and
   * holds are read once, when the first payload is found gone.
   */
  let payloadRules: { changes: RetentionChanges; holds: RecordedHold[]; byClass: Map<string, RetentionChange[]> } | undefined;
  const checkPayloadGone = async (row: RecordRow, fields: AuditRecordFields): Promise<void> => {
    if (row.has_payload_row || (row.payload_hash === null && row.personal_hash === null)) return;
    const valid = (cp: Checkpoint): boolean => checkpointSignatureValid(keysFor(cp.origin), cp);
    payloadRules ??= { changes: await retentionChanges(db, valid), holds: await recordedHolds(db, valid), byClass: new Map() };
    const { seq, recordClass } = fields;
    let changes = payloadRules.byClass.get(recordClass);
    if (changes === undefined) {
      changes = changesOf(payloadRules.changes, recordClass);
      payloadRules.byClass.set(recordClass, changes);
    }
    const original = Object.hasOwn(RETAIN_DAYS_ORIGINAL, recordClass) ? (RETAIN_DAYS_ORIGINAL[recordClass] ?? null) : null;
    const runOut = next !== null && !valid(next)
      ? forEver
      : retentionRunsOut(changes, next?.issuedAt ?? now, now, { from: fields.occurredAt, originalDays: original });
    if (runOut.at > now.getTime()) {
      const until = runOut.at === Infinity ? 'is kept for ever' : `runs out at ${new Date(runOut.at).toISOString()}`;
      report({ kind: 'payload_missing', seq, treeSize: null, detail: `the payload of record ${seq} (class ${recordClass}, occurred ${fields.occurredAt.toISOString()}) is gone, though its retention as the trail records it ${until}${keptByDetail(runOut.keptBy)}` });
      return;
    }
    const hold = payloadRules.holds.find((h) => !h.released && h.signedAt !== null && h.signedAt.getTime() <= runOut.at && holdCovers(h, fields));
    if (hold !== undefined) {
      report({ kind: 'payload_missing', seq, treeSize: null, detail: `the payload of record ${seq} is gone, though legal hold ${hold.holdId} (placed by record ${hold.seq}, signed ${hold.signedAt?.toISOString()}, no release recorded) covered it before its retention ran out at ${new Date(runOut.at).toISOString()}` });
    }
  };

  const readEvents = options.readEventStore !== false;
  let unreadReported = false;
  /** Once: what of the trail stands unchecked because the event store is not read. */
  const eventsUnread = (seq: number | null, what: string): void => {
    if (unreadReported) return;
    unreadReported = true;
    report({
      kind: 'events_unread',
      seq,
      treeSize: null,
      detail: `${what}, and this run does not read the event store (readEventStore: false): their stored leaf hashes stand in for them, unchecked. Verify as the event store's owner, or as a login that may only read`,
    });
  };
  let tiles: TileStart[] = [];
  let tilesWalked = 0;
  let exemptThrough: EventCheckpoint | undefined;
  for (let expected = 0; ; ) {
    if ((tiles[0]?.firstSeq ?? -1) < expected) tiles = await tileStarts(db, expected, 100);
    const tile = tiles[0];
    // The records before the next tile (all that are left when there is none), a page at a time.
    const page = await db.query<RecordRow>(
      `SELECT ${RECORD_COLUMNS} FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq
        WHERE r.seq >= $1 AND ($3::bigint IS NULL OR r.seq < $3) ORDER BY r.seq LIMIT $2`,
      [expected, VERIFY_PAGE_RECORDS, tile?.firstSeq ?? null],
    );
    for (const row of page.rows) {
      const fields = fieldsOf(row);
      const { seq } = fields;
      await reach(seq);
      // Recompute at its own seq, which the leaf commits to: a renumbered or moved record
      // differs (past a gap, `reach` has counted the missing seqs, so the tree expects this one).
      const recomputed = leafHash(leafData({ ...fields, seq }));
      if (!recomputed.equals(row.leaf_hash)) report({ kind: 'record_altered', seq, treeSize: null, detail: `record ${seq} (${fields.id}) does not hash to its stored leaf hash: a column was changed or the record moved` });
      checkPayload(row, seq, report);
      await checkPayloadGone(row, fields);
      frontier.append(recomputed);
      appendStored(row.leaf_hash);
      expected = seq + 1;
    }
    await checkNodes();
    options.onProgress?.(frontier.size);
    if (page.rows.length === VERIFY_PAGE_RECORDS) continue;
    if (tile === undefined) break;
    tiles.shift();
    await reach(tile.firstSeq, true);
    // At its own place: a tile moved elsewhere no longer matches.
    const leaves = readEvents ? await checkTile(db, tile.firstSeq, tile.firstSeq) : [];
    if (!readEvents) {
      eventsUnread(tile.firstSeq, `leaves ${tile.firstSeq}..${tile.firstSeq + tile.count - 1} and every later tile's are events`);
      for (const leaf of await storedTileLeaves(db, tile.firstSeq)) {
        await reach(leaf.seq);
        frontier.append(leaf.stored);
        appendStored(leaf.stored);
      }
    }
    for (const leaf of leaves) {
      await reach(leaf.seq);
      if (leaf.recomputed === null) {
        // Retention may remove an event once the financial class's retention has run out for
        // it; before that, a missing event is a deletion.
        const runOut = await eventRunsOut();
        if (runOut.at > now.getTime()) report({ kind: 'event_missing', seq: leaf.seq, treeSize: null, detail: `leaf ${leaf.seq} is event position ${leaf.position}, which the event store no longer holds, though its retention has not run out${keptByDetail(runOut.keptBy)}` });
      } else if (!leaf.recomputed.equals(leaf.stored)) {
        report({ kind: 'record_altered', seq: leaf.seq, treeSize: null, detail: `leaf ${leaf.seq} (event position ${leaf.position}) does not hash to its stored leaf hash: the event was changed or moved` });
      }
      frontier.append(leaf.recomputed ?? leaf.stored);
      appendStored(leaf.stored);
    }
    await checkNodes();
    // Complete as well as unaltered: every event the sequencer passed is a leaf, in its place.
    // The first tile's stretch begins at the start of the global order.
    if (readEvents) {
      exemptThrough ??= await archiveExemptThrough(db);
      await checkCompleteness(db, tile, leaves, tilesWalked === 0 ? ORDER_ORIGIN : tile.start, exemptThrough, issuesMax, report, (issue) => unplaced.push(issue));
    }
    tilesWalked += 1;
    // A tile's leaves are its events: a record row in its range is a forgery (the sequencer
    // gives records and tiles disjoint ranges, and the database refuses such rows since
    // migration 1769000000000). The walk above never reads one, and search would show it.
    const inside = await db.query<{ seq: string }>(
      'SELECT seq::text FROM audit.records WHERE seq >= $1 AND seq < $2 ORDER BY seq LIMIT $3',
      [tile.firstSeq, tile.firstSeq + tile.count, issuesMax],
    );
    for (const row of inside.rows) {
      report({ kind: 'record_in_tile', seq: Number(row.seq), treeSize: null, detail: `a record row at seq ${row.seq}, inside the tile of event leaves ${tile.firstSeq}..${tile.firstSeq + tile.count - 1}: no record belongs there (forged), and it is not in the tree` });
    }
    // Not evidence (nothing is signed over it), but search trusts it to skip tiles.
    const mismatch = tile.summary === null || !readEvents ? null : summaryMismatch(tile.summary, leaves);
    const times = readEvents ? recordedTimesMismatch(leaves) : null;
    for (const wrong of [mismatch, times]) {
      if (wrong !== null) report({ kind: 'search_summary_altered', seq: tile.firstSeq, treeSize: null, detail: `the tile of leaves ${tile.firstSeq}..${tile.firstSeq + tile.count - 1}: ${wrong}` });
    }
    expected = tile.firstSeq + tile.count;
    options.onProgress?.(frontier.size);
  }
  // With no tile at all, no event may lie at or before the sequencer's cursor.
  if (tilesWalked === 0 && readEvents) await checkCompleteness(db, null, [], ORDER_ORIGIN, ORDER_ORIGIN, issuesMax, report, report);
  if (tilesWalked === 0 && !readEvents && compareOrder(await stretchEnd(db, -1), FIRST_PLACE) !== 0) {
    eventsUnread(null, 'the sequencer\'s cursor has passed events of the event store, though no tile holds them');
  }
  while (next !== null) {
    checkCheckpoint(next, true);
    next = await nextCheckpoint();
  }
  placeUnplaced(frontier.size + missing);
  // A stored subtree reaching past the tree stands in no proof yet, but the sequencer would
  // fail to store the real one there, or a proof would use it once the tree grows.
  const beyond = await db.query<{ level: number; idx: string }>(
    'SELECT level, idx::text FROM audit.tree_nodes WHERE (idx + 1) * (1::bigint << level) > $1 ORDER BY level, idx LIMIT $2',
    [frontier.size + missing, issuesMax],
  );
  for (const n of beyond.rows) {
    const index = Number(n.idx);
    report({ kind: 'tree_node_altered', seq: index * 2 ** n.level, treeSize: null, node: { level: n.level, index }, detail: `a stored subtree at level ${n.level}, index ${index} reaches past the ${frontier.size + missing} leaves stored: no such subtree exists yet` });
  }
  return {
    ok: issues.length === 0,
    records: frontier.size,
    checkpoints: checked,
    unsignedRecords: frontier.size - lastGoodSize,
    keyTransitionsFollowed: [...followed].map((t) => ({ fromKeyId: t.fromKeyId, toKeyId: keyIdOf(t.toPublicKey), issuedAt: t.issuedAt })),
    firstDifference: issues[0] ?? null,
    issues,
    issuesTruncated,
  };
}

/** Where a stretch of the global order ends when the sequencer's cursor never moved (stretchEnd). */
const FIRST_PLACE: EventCheckpoint = { ...ORDER_ORIGIN, position: ORDER_ORIGIN.position + 1n };

/**
 * Completeness over `tile`'s stretch of the global order, [from, the next tile's first event
 * or just past the cursor): every event kept there (hot or archived) must be a leaf of the
 * tile, and every kept event of the tile must lie there. An event the sequencer passed by (its
 * cursor moved past it), or one written into the order's past, is not integrated; one
 * integrated twice (the cursor moved back) or moved in the order (its transaction id changed)
 * is misplaced; a position held by both the hot table and the archive is a planted copy. With
 * `tile` null (no tile at all), no event may lie at or before the cursor.
 *
 * A leaf is placed by its own event's transaction id and position, read in the statement that
 * recomputed it (`checkTile`), so an event that retention removes while this runs is neither
 * placed nor counted wrongly. The stretch is counted (an index-only walk); only when the count
 * differs from the tile's kept leaves in it is it read against the tile's positions
 * (`stretchDetail`, in SQL, at most `limit` of each kind), so a stretch of millions of events
 * is never held in memory. The stretch lies below the cursor, so every transaction in it has
 * ended: nothing can commit into it meanwhile.
 */
async function checkCompleteness(
  db: Queryable,
  tile: TileStart | null,
  leaves: readonly EventLeafCheck[],
  from: EventCheckpoint,
  exemptThrough: EventCheckpoint,
  limit: number,
  report: (issue: VerifyIssue) => void,
  reportAfterTile: (issue: VerifyIssue) => void,
): Promise<void> {
  const to = await stretchEnd(db, tile?.firstSeq ?? -1);
  // A sequencer that never moved (or a log without an event store) leaves nothing behind it.
  if (tile === null && compareOrder(to, FIRST_PLACE) === 0) return;
  let placed = 0;
  for (const leaf of leaves) {
    if (leaf.transactionId === null) continue;
    const at = { transactionId: leaf.transactionId, position: leaf.position };
    if (compareOrder(at, from) >= 0 && compareOrder(at, to) < 0) {
      placed += 1;
      continue;
    }
    report({
      kind: 'event_misplaced',
      seq: leaf.seq,
      treeSize: null,
      detail: `leaf ${leaf.seq} is event position ${leaf.position}, which lies outside its tile's stretch of the global order: the event was integrated twice (the sequencer's cursor moved back), or its transaction id was changed`,
    });
  }
  if ((await stretchRows(db, from, to)) === placed) return;
  const found = await stretchDetail(db, tile?.firstSeq ?? null, from, to, exemptThrough, limit);
  const place = tile === null ? 'and there is no tile of events' : `in the stretch of the global order of the tile of leaves ${tile.firstSeq}..${tile.firstSeq + tile.count - 1}`;
  // Each event where it would stand among the tile's leaves: at the first kept leaf whose event
  // follows it in the order, or after the tile (placed by the walk, `reportAfterTile`).
  const orderOf = tile === null ? new Map<bigint, EventCheckpoint>() : await orderOfEvents(db, found.notIntegrated);
  const inOrder = leaves.flatMap((l) => {
    if (l.transactionId === null) return [];
    const at = { transactionId: l.transactionId, position: l.position };
    return compareOrder(at, from) >= 0 && compareOrder(at, to) < 0 ? [{ seq: l.seq, at }] : [];
  });
  for (const position of found.notIntegrated) {
    const at = orderOf.get(position);
    const before = at === undefined ? undefined : inOrder.find((l) => compareOrder(l.at, at) > 0);
    if (tile !== null && before === undefined) {
      reportAfterTile({
        kind: 'event_not_integrated',
        seq: null,
        treeSize: null,
        detail: `event position ${position} lies before the sequencer's cursor ${place}, after its events, but is a leaf of none: the tile that held it was deleted, the cursor was moved past it, or it was written into the event store's past`,
      });
      continue;
    }
    report({
      kind: 'event_not_integrated',
      seq: before?.seq ?? null,
      treeSize: null,
      detail: `event position ${position} lies before the sequencer's cursor ${place}, but is a leaf of none: the cursor was moved past it, or it was written into the event store's past`,
    });
  }
  for (const position of found.duplicated) {
    report({
      kind: 'event_duplicated',
      seq: leaves.find((l) => l.position === position)?.seq ?? tile?.firstSeq ?? null,
      treeSize: null,
      detail: `event position ${position} is held by both the hot table and the archive: one is a planted copy (the trail, proofs and search take the hot row)`,
    });
  }
}

/** The places in the global order of the events at `positions` (hot or archived), to locate the ones no leaf has. */
async function orderOfEvents(db: Queryable, positions: readonly bigint[]): Promise<Map<bigint, EventCheckpoint>> {
  const order = new Map<bigint, EventCheckpoint>();
  if (positions.length === 0) return order;
  const r = await db.query<{ position: string; tx: string }>(
    `SELECT position::text, transaction_id::text AS tx FROM events.events WHERE position = ANY ($1::bigint[])
     UNION ALL SELECT position::text, transaction_id::text FROM events.archived_events WHERE position = ANY ($1::bigint[])`,
    [sqlArrayLiteral(positions.map(String))],
  );
  for (const row of r.rows) order.set(BigInt(row.position), { transactionId: BigInt(row.tx), position: BigInt(row.position) });
  return order;
}

/**
 * Names the lengthening that kept data past its earlier retention, with the time its record
 * states and the time it was signed: a record dated before it was queued (retention-in-force.ts)
 * makes data lawfully removed in between read as missing, and this is where a reader sees it.
 */
function keptByDetail(change: RetentionChange | null): string {
  if (change === null) return '';
  const signed = change.signedAt === null ? 'not yet signed' : `signed ${change.signedAt.toISOString()}`;
  return ` (kept by the retention lengthening recorded at seq ${change.seq}, stated as made ${change.occurredAt.toISOString()}, ${signed})`;
}

/** Whether a hold the trail records covers a record, as `audit.is_held` matches: by subject, or by resource (a UUID id in either case). */
function holdCovers(hold: RecordedHold, fields: AuditRecordFields): boolean {
  if (hold.subject !== null && hold.subject === fields.subject) return true;
  return hold.resource !== null && hold.resource.type === fields.resourceType && canonicalResourceId(hold.resource.id) === canonicalResourceId(fields.resourceId);
}

/** A present payload must hash to what the leaf committed; an absent one is judged by the walk (`checkPayloadGone`). */
function checkPayload(row: RecordRow, seq: number, report: (issue: VerifyIssue) => void): void {
  if (!row.has_payload_row) return;
  const payloadOk = row.payload === null ? true : row.payload_hash !== null && sha256(row.payload).equals(row.payload_hash);
  if (!payloadOk) report({ kind: 'payload_altered', seq, treeSize: null, detail: `the payload of record ${seq} does not match the hash its leaf commits to` });
  const personalOk = row.personal === null ? true : row.personal_hash !== null && sha256(row.personal).equals(row.personal_hash);
  if (!personalOk) report({ kind: 'personal_altered', seq, treeSize: null, detail: `the encrypted personal data of record ${seq} does not match the hash its leaf commits to` });
}

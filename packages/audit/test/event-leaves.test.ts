/**
 * Events as leaves where they are (src/event-leaves.ts): what a leaf commits to, proofs,
 * search across records and event leaves, and tampering with the event store found and
 * located by full verification.
 *
 * The log: 8 steps, each 2 queued records and 4 events, integrated by a sequencer that takes
 * at most 3 entries a round, so records and tiles interleave and tiles start at sequence
 * numbers whose text order is not their numeric order (2, 11, 20, ...).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import type pg from 'pg';
import { AuditSequencer, eventLeafData, leafHash, verifyBundle, verifyLog, type VerifyIssueKind, type VerifyReport } from '../src/index.ts';
import { eventLeafDataAt, searchEventLeaves } from '../src/event-leaves.ts';
import { propertySeed } from '@ledgerline/testing';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

const STEPS = 8;
const RECORDS_PER_STEP = 2;
const EVENTS_PER_STEP = 4;
const LEAVES = STEPS * (RECORDS_PER_STEP + EVENTS_PER_STEP);
/** A stream id that needs JSON escaping: the SQL leaf and eventLeafData must agree on it. */
const ODD_STREAM = 'q"\\\n\u0001é/€';

let t: AuditTestEnv;
let sequencer: AuditSequencer;

async function appendEvents(step: number): Promise<void> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    for (let j = 0; j < EVENTS_PER_STEP; j += 1) {
      const id = step === 3 && j === 1 ? ODD_STREAM : `t-${step}-${j}`;
      const rejected = j === 2;
      await t.events.append(
        c,
        { type: 'ledger.transfer', id },
        [{ type: rejected ? 'ledger.TransferRejected' : 'ledger.TransferPosted', data: { id, amount: String(100 * step + j), result: rejected ? 'exceeds_credits' : 'ok', note: 'ü\t"' }, metadata: { actor: `user:u-${j}`, causationId: `req-${step}-${j}` } }],
        { expectedVersion: 'no_stream' },
      );
    }
    await c.query('COMMIT');
  } finally {
    c.release();
  }
}

async function integrate(): Promise<void> {
  await t.sink.flush();
  for (let i = 0; i < 1000; i += 1) {
    const r = await sequencer.round();
    if (r.records === 0) return;
  }
  throw new Error('the sequencer did not finish');
}

before(async () => {
  t = await auditTestEnv();
  sequencer = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: 'ledgerline/test', tailEvents: true, batchRecordsMax: 3, checkpointIntervalMs: 0 });
  for (let step = 0; step < STEPS; step += 1) {
    for (let k = 0; k < RECORDS_PER_STEP; k += 1) t.sink.record(entry(step * RECORDS_PER_STEP + k));
    await appendEvents(step);
    await integrate();
  }
  const intact = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.deepEqual({ ok: intact.ok, records: intact.records, first: intact.firstDifference }, { ok: true, records: LEAVES, first: null });
});
after(async () => {
  await t.close();
});

interface LeafRow {
  seq: number;
  position: string;
  stored: Buffer;
}

async function eventLeaves(db: pg.ClientBase | pg.Pool = t.pool): Promise<LeafRow[]> {
  const r = await db.query<{ seq: string; position: string; stored: Buffer }>(
    `SELECT (t.first_seq + u.i - 1)::text AS seq, u.position::text, substring(t.leaf_hashes FROM (u.i::integer - 1) * 32 + 1 FOR 32) AS stored
       FROM audit.event_leaves t, unnest(t.positions) WITH ORDINALITY AS u(position, i) ORDER BY t.first_seq, u.i`,
  );
  return r.rows.map((row) => ({ seq: Number(row.seq), position: row.position, stored: row.stored }));
}

test('every event is one leaf, and its leaf hashes exactly what eventLeafData spells out', async () => {
  const leaves = await eventLeaves();
  assert.equal(leaves.length, STEPS * EVENTS_PER_STEP);
  assert.equal(new Set(leaves.map((l) => l.position)).size, leaves.length, 'no event twice');
  const tiles = await t.pool.query<{ first_seq: string }>('SELECT first_seq::text FROM audit.event_leaves ORDER BY first_seq');
  assert.ok(tiles.rows.length > 10, `${tiles.rows.length} tiles: records and tiles interleave`);
  for (const leaf of leaves) {
    const e = await t.pool.query<{ event_id: string; stream_type: string; stream_id: string; version: number; type: string; schema_version: number; data: string; metadata: string; us: string }>(
      `SELECT event_id::text, stream_type, stream_id, version, type, schema_version, data::text AS data, metadata::text AS metadata,
              (extract(epoch FROM recorded_at) * 1000000)::bigint::text AS us
         FROM events.events WHERE position = $1`,
      [leaf.position],
    );
    const row = e.rows[0];
    assert.ok(row !== undefined);
    const data = eventLeafData(
      leaf.seq,
      { position: BigInt(leaf.position), id: row.event_id, streamType: row.stream_type, streamId: row.stream_id, version: row.version, type: row.type, schemaVersion: row.schema_version, recordedAtUs: BigInt(row.us) },
      row.data,
      row.metadata,
    );
    assert.ok(leafHash(data).equals(leaf.stored), `leaf ${leaf.seq} (stream ${JSON.stringify(row.stream_id)})`);
    assert.ok((await eventLeafDataAt(t.pool, leaf.seq))?.equals(data));
    const parsed = JSON.parse(data.toString('utf8')) as { seq: number; data: unknown; metadata: unknown };
    assert.deepEqual([parsed.seq, parsed.data, parsed.metadata], [leaf.seq, JSON.parse(row.data), JSON.parse(row.metadata)], 'the whole event is inside');
  }
  assert.ok(leaves.length > 0 && (await eventLeafDataAt(t.pool, LEAVES + 5)) === null);
});

/** Text as it reaches a stream id or type: JSON's escapes, controls, non-BMP and odd separators, and anything else. */
const ODD_CHARS = ['"', '\\', '\n', '\r', '\t', '\b', '\f', '\u0001', '\u001f', '\u007f', '\u2028', '\u00e9', '\u20ac', '\u{1f600}', '/', '<'];
const oddText = fc.string({ unit: fc.oneof(fc.constantFrom(...ODD_CHARS), fc.string({ unit: 'grapheme', minLength: 1, maxLength: 1 })), maxLength: 12 });

test('property: the leaf PostgreSQL builds is the one eventLeafData spells out, over arbitrary text and JSON', async () => {
  const seed = propertySeed('audit event leaf bytes, SQL against Node');
  await fc.assert(
    fc.asyncProperty(
      fc.record({
        seq: fc.nat({ max: 2 ** 40 }),
        position: fc.bigInt({ min: 1n, max: 2n ** 62n }),
        id: fc.uuid(),
        streamType: oddText,
        streamId: oddText,
        version: fc.integer({ min: 1, max: 2 ** 31 - 1 }),
        type: oddText,
        schemaVersion: fc.integer({ min: 1, max: 32_767 }),
        recordedAtUs: fc.bigInt({ min: 0n, max: 4_102_444_800_000_000n }),
        data: fc.jsonValue(),
        metadata: fc.dictionary(oddText, fc.oneof(oddText, fc.integer())),
      }),
      async (e) => {
        const dataJson = JSON.stringify(e.data) ?? 'null';
        // PostgreSQL's text cannot hold U+0000, so jsonb refuses it: such an event never exists.
        fc.pre(!dataJson.includes('\\u0000') && !JSON.stringify(e.metadata).includes('\\u0000'));
        const r = await t.pool.query<{ leaf: Buffer; data: string; metadata: string }>(
          `SELECT audit.event_leaf_data($1::bigint, $2::bigint, $3::uuid, $4, $5, $6, $7, $8::smallint, $9::jsonb, $10::jsonb,
                                        'epoch'::timestamptz + $11::bigint * interval '1 microsecond') AS leaf,
                  $9::jsonb::text AS data, $10::jsonb::text AS metadata`,
          [e.seq, e.position.toString(), e.id, e.streamType, e.streamId, e.version, e.type, e.schemaVersion, dataJson, JSON.stringify(e.metadata), e.recordedAtUs.toString()],
        );
        const row = r.rows[0];
        assert.ok(row !== undefined);
        const spelled = eventLeafData(e.seq, e, row.data, row.metadata);
        assert.ok(spelled.equals(row.leaf), `SQL ${row.leaf.toString('utf8')}\nNode ${spelled.toString('utf8')}`);
        assert.deepEqual((JSON.parse(spelled.toString('utf8')) as { streamId: string }).streamId, e.streamId, 'the leaf is JSON that gives the stream id back');
      },
    ),
    { seed, numRuns: 300 },
  );
});

test('inclusion proofs of event leaves and of records check with the public key alone', async () => {
  const leaves = await eventLeaves();
  const cp = await t.store.latestCheckpoint();
  assert.equal(cp?.treeSize, LEAVES);
  for (let seq = 0; seq < LEAVES; seq += 1) {
    const bundle = await t.store.inclusionBundle(seq);
    assert.ok(bundle !== null, `leaf ${seq}`);
    assert.match(verifyBundle(bundle, t.signer.publicKey), new RegExp(`record ${seq} is included`));
  }
  // A bundle whose leaf data was altered, or claimed for another leaf, fails.
  const some = leaves[5] as LeafRow;
  const bundle = await t.store.inclusionBundle(some.seq);
  assert.ok(bundle !== null);
  const text = Buffer.from(bundle.leafData, 'base64').toString('utf8');
  const altered = { ...bundle, leafData: Buffer.from(text.replace('"version":1', '"version":2'), 'utf8').toString('base64') };
  assert.throws(() => verifyBundle(altered, t.signer.publicKey));
  assert.throws(() => verifyBundle({ ...bundle, leafIndex: some.seq + 1 }, t.signer.publicKey));
  const sizes = await t.pool.query<{ n: number }>('SELECT tree_size::int AS n FROM audit.checkpoints ORDER BY tree_size LIMIT 2');
  assert.equal(sizes.rows.length, 2);
  const consistency = await t.store.consistencyBundle(sizes.rows[0]?.n ?? 0, LEAVES);
  assert.ok(consistency !== null);
  verifyBundle(consistency, t.signer.publicKey);
});

test('search walks records and event leaves together in sequence order, both ways, page by page', async () => {
  for (const order of ['asc', 'desc'] as const) {
    const seen: number[] = [];
    let after: number | undefined;
    for (let pages = 0; pages < 100; pages += 1) {
      const page = await t.store.search({}, { limit: 5, order, ...(after === undefined ? {} : { after }) }, REVIEWER);
      seen.push(...page.records.map((r) => r.seq));
      if (page.nextCursor === null) break;
      after = page.nextCursor;
    }
    const expected = Array.from({ length: LEAVES }, (_, i) => (order === 'asc' ? i : LEAVES - 1 - i));
    assert.deepEqual(seen, expected, order);
  }
  // A stream named: found through the event store's stream index, one leaf.
  const odd = await t.store.search({ resourceType: 'ledger.transfer', resourceId: ODD_STREAM }, {}, REVIEWER);
  assert.deepEqual(
    odd.records.map((r) => [r.resource.id, r.action, r.actor, r.origin.requestId, r.recordClass, r.payloadState]),
    [[ODD_STREAM, 'ledger.TransferPosted', { type: 'user', id: 'user:u-1' }, 'req-3-1', 'financial', 'present']],
  );
  const leaf = (await eventLeaves()).find((l) => l.seq === odd.records[0]?.seq);
  assert.ok(leaf !== undefined, 'the stream search names the leaf by its sequence number');
  // Rejections are failures with their result as the reason; records keep their own outcome.
  const failures = await t.store.search({ outcome: 'failure', action: 'ledger.TransferRejected' }, { limit: 100 }, REVIEWER);
  assert.equal(failures.records.length, STEPS);
  assert.ok(failures.records.every((r) => r.reason === 'exceeds_credits' && r.outcome === 'failure'));
  const byActor = await t.store.search({ actorId: 'user:u-3' }, { limit: 100, order: 'desc' }, REVIEWER);
  assert.equal(byActor.records.length, STEPS);
  // Event leaves have no subject and are of class financial only.
  assert.equal((await t.store.search({ recordClass: 'command' }, { limit: 100 }, REVIEWER)).records.some((r) => r.recordClass !== 'command'), false);
  const hour = 3_600_000;
  assert.equal((await t.store.search({ from: new Date(Date.now() + hour) }, {}, REVIEWER)).records.length, 0);
  assert.equal((await t.store.search({ to: new Date(Date.now() - hour) }, {}, REVIEWER)).records.length, 0);
  const window = await t.store.search({ from: new Date(Date.now() - hour), to: new Date(Date.now() + hour), recordClass: 'financial' }, { limit: 1000 }, REVIEWER);
  assert.equal(window.records.length, STEPS * EVENTS_PER_STEP);
});

/** Tampers as a superuser with triggers off, verifies in that transaction, rolls back. */
async function tampered(tamper: (c: pg.PoolClient) => Promise<unknown>, now?: Date): Promise<VerifyReport> {
  return (await tamperedWith(tamper, () => Promise.resolve(undefined), now)).report;
}

/** As `tampered`, and runs `also` on the tampered state before the rollback. */
async function tamperedWith<T>(tamper: (c: pg.PoolClient) => Promise<unknown>, also: (c: pg.PoolClient) => Promise<T>, now?: Date): Promise<{ report: VerifyReport; also: T }> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query('SET LOCAL session_replication_role = replica');
    await tamper(c);
    const report = await verifyLog(c, { publicKey: t.signer.publicKey, ...(now === undefined ? {} : { now: () => now }) });
    return { report, also: await also(c) };
  } finally {
    await c.query('ROLLBACK');
    c.release();
  }
}

test('each tile summarises its events for search: the distinct actors and the failures, exactly', async () => {
  const r = await t.pool.query<{ first_seq: string; actors: string[]; failures: number; expected_actors: string[]; expected_failures: number }>(
    `SELECT t.first_seq::text, t.actors, t.failures,
            (SELECT array_agg(DISTINCT coalesce(e.metadata->>'actor', 'unknown') ORDER BY coalesce(e.metadata->>'actor', 'unknown'))
               FROM unnest(t.positions) p JOIN events.events e ON e.position = p) AS expected_actors,
            (SELECT count(*)::integer FROM unnest(t.positions) p JOIN events.events e ON e.position = p WHERE e.data->>'result' <> 'ok') AS expected_failures
       FROM audit.event_leaves t ORDER BY t.first_seq`,
  );
  assert.ok(r.rows.length > 10);
  for (const row of r.rows) {
    assert.deepEqual({ actors: row.actors, failures: row.failures }, { actors: row.expected_actors, failures: row.expected_failures }, `tile ${row.first_seq}`);
  }
  assert.ok(r.rows.some((row) => row.failures > 0) && r.rows.some((row) => row.failures === 0), 'tiles with and without failures');
});

test('search skips the tiles whose summary rules them out, reads those without one, and verification holds summaries to their events', async () => {
  // The tile holding ODD_STREAM's event (actor user:u-1, a success).
  const odd = await t.pool.query<{ first_seq: string; failures: number }>(
    `SELECT t.first_seq::text, t.failures FROM audit.event_leaves t JOIN events.events e ON e.position = ANY(t.positions) WHERE e.stream_id = $1`,
    [ODD_STREAM],
  );
  const tile = Number(odd.rows[0]?.first_seq);
  const rejected = await t.pool.query<{ first_seq: string }>('SELECT first_seq::text FROM audit.event_leaves WHERE failures > 0 ORDER BY first_seq LIMIT 1');
  const failingTile = Number(rejected.rows[0]?.first_seq);
  const page = { desc: false, after: null, limit: 1000 };
  const byActor = (c: pg.PoolClient): Promise<string[]> => searchEventLeaves(c, { actorId: 'user:u-1' }, page).then((rows) => rows.map((x) => x.event.streamId));
  const failing = (c: pg.PoolClient): Promise<number> => searchEventLeaves(c, { outcome: 'failure' }, page).then((rows) => rows.length);

  const intact = await tamperedWith(() => Promise.resolve(undefined), async (c) => ({ actor: await byActor(c), failures: await failing(c) }));
  assert.equal(intact.also.actor.length, STEPS);
  assert.ok(intact.also.actor.includes(ODD_STREAM));
  assert.equal(intact.also.failures, STEPS);

  // The actor taken out of the summary: search passes over the tile (so it does skip by it),
  // and verification locates the tile.
  const hidden = await tamperedWith((c) => c.query(`UPDATE audit.event_leaves SET actors = array_remove(actors, 'user:u-1') WHERE first_seq = $1`, [tile]), byActor);
  assert.deepEqual({ found: hidden.also.length, odd: hidden.also.includes(ODD_STREAM) }, { found: STEPS - 1, odd: false });
  located(hidden.report, 'search_summary_altered', tile);
  assert.match(hidden.report.firstDifference?.detail ?? '', /leaves out actor\(s\) "user:u-1"/);

  // Failures counted away: the same for a search by outcome.
  const uncounted = await tamperedWith((c) => c.query('UPDATE audit.event_leaves SET failures = 0 WHERE first_seq = $1', [failingTile]), failing);
  assert.ok(uncounted.also < STEPS);
  located(uncounted.report, 'search_summary_altered', failingTile);

  // Once retention has let an event go, the summary may name more than the events left, but
  // not count more failures than they and the missing one can hold.
  const later = new Date(Date.now() + (2557 + 1) * 86_400_000);
  const expiredOne = (c: pg.PoolClient): Promise<unknown> => c.query('DELETE FROM events.events WHERE stream_id = $1', [ODD_STREAM]);
  assert.equal((await tampered(expiredOne, later)).ok, true);
  const inflated = await tampered(async (c) => {
    await expiredOne(c);
    await c.query('UPDATE audit.event_leaves SET failures = leaf_count WHERE first_seq = $1', [tile]);
  }, later);
  located(inflated, 'search_summary_altered', tile);
  assert.match(inflated.firstDifference?.detail ?? '', /search for successes would pass over the tile/);

  // An actor added: search reads one tile more for nothing, and verification says so.
  located(await tampered((c) => c.query(`UPDATE audit.event_leaves SET actors = actors || '{user:nobody}' WHERE first_seq = $1`, [tile])), 'search_summary_altered', tile);

  // No summary (a tile integrated before summaries existed): read as before, and nothing to verify.
  const unsummarised = await tamperedWith((c) => c.query('UPDATE audit.event_leaves SET actors = NULL, failures = NULL'), async (c) => ({ actor: await byActor(c), failures: await failing(c) }));
  assert.deepEqual(unsummarised.also, intact.also);
  assert.equal(unsummarised.report.ok, true, JSON.stringify(unsummarised.report.issues));
});

function located(report: VerifyReport, kind: VerifyIssueKind, seq: number): void {
  assert.equal(report.ok, false);
  assert.deepEqual({ kind: report.firstDifference?.kind, seq: report.firstDifference?.seq }, { kind, seq }, JSON.stringify(report.issues));
}

test('changing one byte of an event, in its data or its metadata, is located at its leaf', async () => {
  const [a, b] = (await eventLeaves()).slice(9, 11) as [LeafRow, LeafRow];
  located(await tampered((c) => c.query(`UPDATE events.events SET data = jsonb_set(data, '{amount}', '"9"') WHERE position = $1`, [a.position])), 'record_altered', a.seq);
  located(await tampered((c) => c.query(`UPDATE events.events SET metadata = jsonb_set(metadata, '{actor}', '"user:x"') WHERE position = $1`, [b.position])), 'record_altered', b.seq);
  const report = await tampered((c) => c.query('UPDATE events.events SET recorded_at = recorded_at + interval \'1 microsecond\' WHERE position = $1', [a.position]));
  located(report, 'record_altered', a.seq);
  assert.ok(report.issues.some((i) => i.kind === 'checkpoint_root_mismatch'), 'the signed roots disagree too');
});

test('deleting an event is located at its leaf, unless its retention has run out', async () => {
  const leaf = (await eventLeaves())[17] as LeafRow;
  const remove = (c: pg.PoolClient): Promise<unknown> => c.query('DELETE FROM events.events WHERE position = $1', [leaf.position]);
  located(await tampered(remove), 'event_missing', leaf.seq);
  // Seven years (class financial) and a day later, the event store may have let it go: the
  // stored leaf hash stands in for it and every root still verifies.
  const later = new Date(Date.now() + (2557 + 1) * 86_400_000);
  const expired = await tampered(remove, later);
  assert.deepEqual({ ok: expired.ok, records: expired.records }, { ok: true, records: LEAVES });
  // Archived (retention moved it out of the hot table): still there, still verifies.
  const archived = await tampered((c) =>
    c.query(
      `WITH moved AS (DELETE FROM events.events WHERE position = $1 RETURNING *)
       INSERT INTO events.archived_events SELECT *, now() FROM moved`,
      [leaf.position],
    ),
  );
  assert.equal(archived.ok, true, JSON.stringify(archived.issues));
});

test('swapping the contents of two events, or the positions a tile names, is located at the first leaf moved', async () => {
  const leaves = await eventLeaves();
  const [a, b] = [leaves[4] as LeafRow, leaves[13] as LeafRow];
  located(
    await tampered((c) =>
      c.query(
        `UPDATE events.events e SET data = o.data, metadata = o.metadata
           FROM events.events o WHERE e.position IN ($1, $2) AND o.position IN ($1, $2) AND o.position <> e.position`,
        [a.position, b.position],
      ),
    ),
    'record_altered',
    a.seq,
  );
  const tile = await t.pool.query<{ first_seq: string }>('SELECT first_seq::text FROM audit.event_leaves WHERE leaf_count >= 2 ORDER BY first_seq LIMIT 1');
  const first = Number(tile.rows[0]?.first_seq);
  located(
    await tampered((c) => c.query('UPDATE audit.event_leaves SET positions = array[positions[2], positions[1]] || positions[3:] WHERE first_seq = $1', [first])),
    'record_altered',
    first,
  );
});

test('rewriting a stored leaf hash, or truncating the tiles, is found against the signed checkpoints', async () => {
  const leaf = (await eventLeaves())[20] as LeafRow;
  // Every bit of the hash's first byte flipped: writing a fixed byte there changed nothing
  // when the hash already began with it (one run in 256).
  const rewritten = await tampered((c) =>
    c.query(
      `UPDATE audit.event_leaves t SET leaf_hashes = set_byte(leaf_hashes, ($1::bigint - first_seq)::integer * 32,
                                                                 get_byte(leaf_hashes, ($1::bigint - first_seq)::integer * 32) # 255)
        WHERE first_seq = (SELECT max(first_seq) FROM audit.event_leaves WHERE first_seq <= $1)`,
      [leaf.seq],
    ),
  );
  located(rewritten, 'record_altered', leaf.seq);
});

test('deleting a tile is located at its first leaf, not at the intact tile before it (whose stretch of the global order its events then fall in), and reported once', async () => {
  const all = await tiles();
  const last = all.at(-1);
  assert.ok(last !== undefined);
  const deleteTile = (firstSeq: number) => (c: pg.PoolClient): Promise<unknown> => c.query('DELETE FROM audit.event_leaves WHERE first_seq = $1', [firstSeq]);
  // The last tile ends the tree: the tail is truncated from its first leaf, and its events,
  // which lie after the previous tile's in the global order, are reported there, after it.
  assert.equal(last.firstSeq + last.count, LEAVES, 'the last tile ends the tree');
  const truncated = await tampered(deleteTile(last.firstSeq));
  located(truncated, 'records_truncated', last.firstSeq);
  assert.deepEqual(
    issuesOf(truncated, 'event_not_integrated').map((i) => i.seq),
    Array.from({ length: last.count }, () => last.firstSeq),
  );
  // A tile in the middle, with records and tiles after it: a gap, reported once (each later
  // leaf is held to its own hash, not reported again as moved).
  const middle = all[Math.floor(all.length / 2)];
  assert.ok(middle !== undefined && middle.firstSeq > (all[0] as { firstSeq: number }).firstSeq);
  const inside = await tampered(deleteTile(middle.firstSeq));
  located(inside, 'record_missing', middle.firstSeq);
  assert.deepEqual(issuesOf(inside, 'event_not_integrated').map((i) => i.seq), Array.from({ length: middle.count }, () => middle.firstSeq));
  assert.deepEqual(inside.issues.filter((i) => i.kind === 'record_missing' || i.kind === 'record_altered').map((i) => [i.kind, i.seq]), [['record_missing', middle.firstSeq]]);
  // Nor are the stored subtrees past the gap, which no longer line up with the leaves read.
  assert.deepEqual([...new Set(inside.issues.map((i) => i.kind))].sort(), ['checkpoint_root_mismatch', 'event_not_integrated', 'record_missing']);
  // A deleted record, likewise, is the one difference among the records: those after it verify.
  const record = await t.pool.query<{ seq: string }>('SELECT seq::text FROM audit.records WHERE seq > $1 ORDER BY seq LIMIT 1', [middle.firstSeq]);
  const gone = Number(record.rows[0]?.seq);
  const deleted = await tampered(async (c) => {
    await c.query('DELETE FROM audit.payloads WHERE seq = $1', [gone]);
    await c.query('DELETE FROM audit.records WHERE seq = $1', [gone]);
  });
  located(deleted, 'record_missing', gone);
  assert.deepEqual(deleted.issues.filter((i) => i.kind !== 'checkpoint_root_mismatch').map((i) => [i.kind, i.seq]), [['record_missing', gone]]);
});

/** The tiles' first sequence numbers and starts in the global order, in sequence order. */
async function tiles(): Promise<{ firstSeq: number; count: number; tx: string; position: string }[]> {
  const r = await t.pool.query<{ first_seq: string; leaf_count: number; tx: string; position: string }>(
    'SELECT first_seq::text, leaf_count, first_transaction_id::text AS tx, first_position::text AS position FROM audit.event_leaves t ORDER BY t.first_seq',
  );
  return r.rows.map((row) => ({ firstSeq: Number(row.first_seq), count: row.leaf_count, tx: row.tx, position: row.position }));
}

/** A new event row written straight into the event store as the table's owner, at `tx` in the global order (default: now). */
async function writeEvent(c: pg.PoolClient, streamId: string, tx?: string): Promise<string> {
  const r = await c.query<{ position: string }>(
    `INSERT INTO events.events (transaction_id, partition, event_id, stream_type, stream_id, version, type, data, metadata)
     VALUES (coalesce($1::xid8, pg_current_xact_id()), 0, gen_random_uuid(), 'ledger.transfer', $2, 1, 'ledger.TransferPosted', '{"result":"ok"}', '{"actor":"user:x"}')
     RETURNING position::text`,
    [tx ?? null, streamId],
  );
  return r.rows[0]?.position ?? '';
}

function issuesOf(report: VerifyReport, kind: VerifyIssueKind): { seq: number | null; detail: string }[] {
  return report.issues.filter((i) => i.kind === kind).map((i) => ({ seq: i.seq, detail: i.detail }));
}

test('an event the sequencer passed by, or one written into the past of the global order, is found: verification proves the log complete', async () => {
  const all = await tiles();
  const last = all.at(-1);
  assert.ok(last !== undefined);
  // The cursor moved past two new events: the sequencer will never integrate them.
  let written: string[] = [];
  const passed = await tampered(async (c) => {
    written = [await writeEvent(c, 'passed-1'), await writeEvent(c, 'passed-2')];
    await c.query('UPDATE audit.sequencer_state SET event_transaction_id = pg_current_xact_id(), event_position = $1', [written[1]]);
  });
  // They lie after the last tile's events, so their place is after it and the records stored
  // after it: the end of the tree.
  located(passed, 'event_not_integrated', passed.records);
  assert.deepEqual(
    issuesOf(passed, 'event_not_integrated').map((i) => [i.seq, i.detail.split(' ')[2]]),
    written.map((p) => [passed.records, p]),
  );
  // Written behind the sequencer, before the first tile's first event in the global order.
  let backdated = '';
  const past = await tampered(async (c) => {
    backdated = await writeEvent(c, 'backdated', '3');
  });
  located(past, 'event_not_integrated', (all[0] as { firstSeq: number }).firstSeq);
  assert.match(past.firstDifference?.detail ?? '', new RegExp(`^event position ${backdated} `));
  // Without any tile, every event before the cursor is reported, under no sequence number.
  const untiled = await tampered((c) => c.query('DELETE FROM audit.event_leaves'));
  assert.equal(issuesOf(untiled, 'event_not_integrated').length, STEPS * EVENTS_PER_STEP);
  assert.ok(issuesOf(untiled, 'event_not_integrated').every((i) => i.seq === null));
  // New events after the cursor are the sequencer's next round, not a gap.
  const pending = await tampered((c) => writeEvent(c, 'next-round'));
  assert.equal(pending.ok, true, JSON.stringify(pending.issues));
});

test('an event integrated twice, or moved in the global order, is found at its leaf', async () => {
  const all = await tiles();
  const last = all.at(-1);
  assert.ok(last !== undefined && last.count >= 2);
  // The cursor moved back before the last tile: its events lie after the cursor, so the next
  // round would integrate them again.
  const back = await tampered((c) =>
    c.query('UPDATE audit.sequencer_state SET event_transaction_id = $1::xid8, event_position = $2::bigint - 1', [last.tx, last.position]),
  );
  located(back, 'event_misplaced', last.firstSeq);
  assert.deepEqual(
    issuesOf(back, 'event_misplaced').map((i) => i.seq),
    Array.from({ length: last.count }, (_, k) => last.firstSeq + k),
  );
  // An event whose transaction id was changed moves to the start of the order: its own tile
  // no longer covers it, and the first stretch holds an event no tile there has.
  const leaf = (await eventLeaves()).find((l) => l.seq > (all[2] as { firstSeq: number }).firstSeq) as LeafRow;
  const moved = await tampered((c) => c.query("UPDATE events.events SET transaction_id = '3' WHERE position = $1", [leaf.position]));
  assert.deepEqual(issuesOf(moved, 'event_misplaced').map((i) => i.seq), [leaf.seq]);
  assert.deepEqual(issuesOf(moved, 'event_not_integrated').map((i) => i.seq), [(all[0] as { firstSeq: number }).firstSeq]);
});

test('a tile\'s stored times are held to its events, and cannot make a deleted event pass for an expired one: retention is judged by the signed checkpoint', async () => {
  const leaf = (await eventLeaves())[17] as LeafRow;
  const backdated = await tampered(async (c) => {
    await c.query(
      `UPDATE audit.event_leaves SET first_recorded_at = now() - interval '8 years', last_recorded_at = now() - interval '8 years'
        WHERE first_seq = (SELECT max(first_seq) FROM audit.event_leaves WHERE first_seq <= $1)`,
      [leaf.seq],
    );
    await c.query('DELETE FROM events.events WHERE position = $1', [leaf.position]);
  });
  located(backdated, 'event_missing', leaf.seq);
  // The stored times alone moved: a search by time would pass over the tile's events.
  const tile = (await tiles()).filter((x) => x.firstSeq <= leaf.seq).at(-1) as { firstSeq: number };
  const moveTimes = (bounds: string) => (c: pg.PoolClient): Promise<unknown> => c.query(`UPDATE audit.event_leaves SET ${bounds} WHERE first_seq = $1`, [tile.firstSeq]);
  located(await tampered(moveTimes("first_recorded_at = now() - interval '8 years', last_recorded_at = now() - interval '8 years'")), 'search_summary_altered', tile.firstSeq);
  located(await tampered(moveTimes("first_recorded_at = first_recorded_at - interval '1 microsecond'")), 'search_summary_altered', tile.firstSeq);
  // A checkpoint whose time was moved back loses its signature, and with it its say on retention.
  const forgedTime = await tampered(async (c) => {
    await c.query("UPDATE audit.checkpoints SET issued_at = issued_at - interval '8 years'");
    await c.query('DELETE FROM events.events WHERE position = $1', [leaf.position]);
  });
  assert.deepEqual(issuesOf(forgedTime, 'event_missing').map((i) => i.seq), [leaf.seq]);
  assert.ok(forgedTime.issues.some((i) => i.kind === 'checkpoint_signature_invalid'));
});

test('an event archived while a round reads it, or before, is integrated once, from the table that held it; an archived copy or a backdated archive time hides nothing', async () => {
  const positionOf = async (streamId: string): Promise<string> =>
    (await t.pool.query<{ p: string }>('SELECT position::text AS p FROM events.events WHERE stream_id = $1 UNION ALL SELECT position::text FROM events.archived_events WHERE stream_id = $1', [streamId])).rows[0]?.p ?? '';
  const archive = (c: pg.ClientBase | pg.Pool, streamId: string): Promise<unknown> =>
    c.query('WITH moved AS (DELETE FROM events.events WHERE stream_id = $1 RETURNING *) INSERT INTO events.archived_events SELECT *, now() FROM moved', [streamId]);
  // Tampering first, on the log as it stands: an event the cursor passed, moved to the archive
  // with an archive time long before the trail, is still an event the trail lacks.
  const hidden = await tampered(async (c) => {
    const position = await writeEvent(c, 'passed-then-archived');
    await c.query('UPDATE audit.sequencer_state SET event_transaction_id = pg_current_xact_id(), event_position = $1', [position]);
    await archive(c, 'passed-then-archived');
    await c.query("UPDATE events.archived_events SET archived_at = '2000-01-01' WHERE stream_id = 'passed-then-archived'");
  });
  assert.deepEqual(issuesOf(hidden, 'event_not_integrated').length, 1, JSON.stringify(hidden.issues));
  // An event whose transaction id changed is misplaced in its tile; a copy of another event of
  // that tile planted in the archive does not make up for it.
  const all = await tiles();
  const tile = all.find((x) => x.count >= 2) as { firstSeq: number; count: number };
  const [moved, other] = (await eventLeaves()).filter((l) => l.seq >= tile.firstSeq && l.seq < tile.firstSeq + tile.count) as [LeafRow, LeafRow];
  const copied = await tampered(async (c) => {
    await c.query("UPDATE events.events SET transaction_id = '3' WHERE position = $1", [moved.position]);
    await c.query('INSERT INTO events.archived_events SELECT *, now() FROM events.events WHERE position = $1', [other.position]);
  });
  assert.deepEqual(issuesOf(copied, 'event_misplaced').map((i) => i.seq), [moved.seq]);

  // Then for real: a-1 archived in a transaction still open while the round reads it (the round
  // sees it in the hot table), a-2 archived before the round.
  for (const id of ['a-1', 'a-2', 'a-3']) {
    await t.events.append(t.pool, { type: 'ledger.transfer', id }, [{ type: 'ledger.TransferPosted', data: { id, result: 'ok' }, metadata: { actor: 'user:a' } }], { expectedVersion: 'no_stream' });
  }
  await archive(t.pool, 'a-2');
  const open = await t.pool.connect();
  try {
    await open.query('BEGIN');
    await archive(open, 'a-1');
    await integrate();
    await open.query('COMMIT');
  } finally {
    open.release();
  }
  const positions = await Promise.all(['a-1', 'a-2', 'a-3'].map(positionOf));
  const leaves = (await eventLeaves()).map((l) => l.position);
  for (const p of positions) assert.equal(leaves.filter((l) => l === p).length, 1, `position ${p} is one leaf`);
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

test('a copy of an event planted in the archive is passed over by the sequencer and reported by verification; so is an archived event the trail lacks, unless the log predates archive reading', async () => {
  await t.events.append(t.pool, { type: 'ledger.transfer', id: 'planted' }, [{ type: 'ledger.TransferPosted', data: { id: 'planted', result: 'ok' }, metadata: { actor: 'user:a' } }], { expectedVersion: 'no_stream' });
  await t.pool.query("INSERT INTO events.archived_events SELECT *, now() FROM events.events WHERE stream_id = 'planted'");
  await t.pool.query(`UPDATE events.archived_events SET data = jsonb_set(data, '{result}', '"forged"') WHERE stream_id = 'planted'`);
  await integrate();
  const position = (await t.pool.query<{ p: string }>("SELECT position::text AS p FROM events.events WHERE stream_id = 'planted'")).rows[0]?.p;
  const leaf = (await eventLeaves()).filter((l) => l.position === position);
  assert.equal(leaf.length, 1, 'one leaf, of the hot row');
  const seq = (leaf[0] as LeafRow).seq;
  assert.match(String((await eventLeafDataAt(t.pool, seq))?.toString('utf8')), /"result": "ok"/);
  const copied = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.deepEqual(copied.issues.map((i) => [i.kind, i.seq]), [['event_duplicated', seq]], JSON.stringify(copied.issues));
  await t.pool.query("DELETE FROM events.archived_events WHERE stream_id = 'planted'");
  assert.equal((await verifyLog(t.pool, { publicKey: t.signer.publicKey })).ok, true);

  // An archived event before the first tile that is no leaf: the trail lacks it...
  const behind = async (c: pg.PoolClient): Promise<void> => {
    await c.query(
      `INSERT INTO events.archived_events (position, transaction_id, partition, event_id, stream_type, stream_id, version, type, schema_version, data, metadata, recorded_at, archived_at)
       VALUES ((SELECT max(position) + 1000 FROM events.events), '3', 0, gen_random_uuid(), 'ledger.transfer', 'archived-early', 1, 'ledger.TransferPosted', 1, '{}', '{}', now(), now())`,
    );
  };
  located(await tampered(behind), 'event_not_integrated', (await tiles())[0]?.firstSeq ?? -1);
  // ...unless the log was sequenced before the sequencer read the archive, and the event lies
  // at or before the cursor as it stood then (migration 1769450000000).
  const upgraded = await tampered(async (c) => {
    await behind(c);
    await c.query('UPDATE audit.sequencer_state SET archive_exempt_transaction_id = event_transaction_id, archive_exempt_position = event_position');
  });
  assert.equal(upgraded.ok, true, JSON.stringify(upgraded.issues));
});

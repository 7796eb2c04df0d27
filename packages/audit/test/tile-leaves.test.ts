/**
 * A tile as the sequencer stores it, held event by event to what PostgreSQL computes from each
 * event alone: its leaf hash (`audit.event_leaf_data` at the event's sequence number), the
 * distinct actors in byte order, the failures, the recorded times to the millisecond. The tile
 * query reads the hot table and the archive in one merged walk and aggregates in the walk's
 * order (readEventTile); this checks that order and that merge over arbitrary events: text
 * that needs JSON's escapes, any JSON document, several actors and outcomes, archived events
 * among hot ones.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { propertySeed } from '@ledgerline/testing';
import { verifyLog } from '../src/index.ts';
import { auditTestEnv, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;

before(async () => {
  t = await auditTestEnv();
});
after(async () => {
  await t.close();
});

/** Text as it reaches a stream id, a type or an actor: JSON's escapes, controls, non-BMP characters, and anything else. */
const ODD_CHARS = ['"', '\\', '\n', '\r', '\t', '\b', '\f', '\u0001', '\u001f', '\u007f', '\u2028', '\u00e9', '\u20ac', '\u{1f600}', '\uff01', '/', '<', 'Z', 'a'];
const oddText = fc.string({ unit: fc.oneof(fc.constantFrom(...ODD_CHARS), fc.string({ unit: 'grapheme', minLength: 1, maxLength: 1 })), minLength: 1, maxLength: 10 });
/** JSON PostgreSQL can store: its text type holds no U+0000. */
const storable = (value: unknown): boolean => !JSON.stringify(value).includes('\\u0000');

const anEvent = fc.record({
  // The event store's stream types are names (events_stream_type_check); ids and types are any text.
  streamType: fc.stringMatching(/^[a-z][a-z0-9_.-]{0,20}$/),
  streamId: oddText,
  type: oddText,
  data: fc.oneof(fc.jsonValue(), fc.record({ result: fc.oneof(fc.constant('ok'), oddText, fc.integer()), note: oddText })).filter(storable),
  metadata: fc.record({ actor: fc.option(oddText, { nil: undefined }), extra: oddText }, { requiredKeys: [] }).filter(storable),
  archive: fc.boolean(),
});

const COLUMNS = 'position, event_id, stream_type, stream_id, version, type, schema_version, data, metadata, recorded_at';

interface TileNow {
  first_seq: string;
  leaf_hashes: Buffer;
  positions: string[];
  actors: string[];
  failures: number;
  first_ms: string;
  last_ms: string;
}

test('property: each tile the sequencer stores hashes its events, hot or archived, as audit.event_leaf_data does one by one, with their summaries', async () => {
  const seed = propertySeed('audit tile leaves, sequencer against SQL');
  let streams = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(anEvent, { minLength: 1, maxLength: 12 }), async (events) => {
      const c = await t.pool.connect();
      try {
        await c.query('BEGIN');
        for (const e of events) {
          streams += 1;
          await t.events.append(c, { type: e.streamType, id: `${e.streamId}#${streams}` }, [{ type: e.type, data: e.data as Record<string, unknown>, metadata: e.metadata }], {
            expectedVersion: 'no_stream',
          });
        }
        await c.query('COMMIT');
      } catch (error) {
        await c.query('ROLLBACK');
        throw error;
      } finally {
        c.release();
      }
      // Some of them archived before the round, as retention may before the cursor first moves.
      const archived = events.flatMap((e, i) => (e.archive ? [`${e.streamId}#${streams - events.length + i + 1}`] : []));
      if (archived.length > 0) {
        await t.pool.query(
          `WITH moved AS (DELETE FROM events.events WHERE stream_id = ANY($1::text[]) RETURNING *)
           INSERT INTO events.archived_events SELECT *, now() FROM moved`,
          [archived],
        );
      }
      const before = Number((await t.pool.query<{ n: string }>('SELECT count(*)::text AS n FROM audit.event_leaves')).rows[0]?.n);
      await t.settle();
      const tiles = await t.pool.query<TileNow>(
        `SELECT first_seq::text, leaf_hashes, positions::text[] AS positions, actors, failures,
                (extract(epoch FROM first_recorded_at) * 1000)::bigint::text AS first_ms, (extract(epoch FROM last_recorded_at) * 1000)::bigint::text AS last_ms
           FROM audit.event_leaves t ORDER BY t.first_seq OFFSET $1`,
        [before],
      );
      assert.ok(tiles.rows.length > 0, 'the round made a tile');
      let leaves = 0;
      for (const tile of tiles.rows) {
        // PostgreSQL's own leaves and summary of the same events, from wherever each is kept.
        const sql = await t.pool.query<{ hashes: Buffer; actors: string[]; failures: number; first_ms: string; last_ms: string }>(
          `SELECT string_agg(sha256('\\x00'::bytea || audit.event_leaf_data($1::bigint + u.i - 1, e.position, e.event_id, e.stream_type, e.stream_id, e.version,
                                                                            e.type, e.schema_version, e.data, e.metadata, e.recorded_at)), ''::bytea ORDER BY u.i) AS hashes,
                  array_agg(DISTINCT coalesce(e.metadata->>'actor', 'unknown') COLLATE "C") AS actors,
                  (count(*) FILTER (WHERE jsonb_typeof(e.data->'result') = 'string' AND e.data->>'result' <> 'ok'))::integer AS failures,
                  (extract(epoch FROM date_trunc('milliseconds', min(e.recorded_at))) * 1000)::bigint::text AS first_ms,
                  (extract(epoch FROM date_trunc('milliseconds', max(e.recorded_at))) * 1000)::bigint::text AS last_ms
             FROM unnest($2::bigint[]) WITH ORDINALITY AS u(position, i)
             JOIN (SELECT ${COLUMNS} FROM events.events UNION ALL SELECT ${COLUMNS} FROM events.archived_events) e ON e.position = u.position`,
          [tile.first_seq, tile.positions],
        );
        const expected = sql.rows[0];
        assert.ok(expected !== undefined);
        assert.ok(tile.leaf_hashes.equals(expected.hashes), `tile at ${tile.first_seq}: its leaf hashes are each event's own, in sequence order`);
        assert.deepEqual(tile.actors, expected.actors, 'actors: distinct, in byte order');
        assert.deepEqual([tile.failures, tile.first_ms, tile.last_ms], [expected.failures, expected.first_ms, expected.last_ms], 'failures and recorded times');
        leaves += tile.positions.length;
      }
      assert.equal(leaves, events.length, 'every event once, hot or archived');
    }),
    { seed, numRuns: 40 },
  );
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues.slice(0, 3)));
});

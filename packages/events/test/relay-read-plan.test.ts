/**
 * The relay's read walks the global-order index and stops after its limit, whatever the
 * planner knows about the table. On a table it has not analyzed (new, restored, just
 * upgraded) or whose statistics trail its tail, the planner estimated a few hundred rows
 * after the checkpoint and chose a bitmap scan of every row past it, other partitions' too,
 * and a sort: a cost that grew with the backlog, on every read of every partition. Measured
 * here by the rows PostgreSQL fetched from the table, which its statistics count exactly.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { CHECKPOINT_START, EventStore, inTransaction, migrateEvents, type StreamEvent } from '../src/index.ts';
import { readOutbox } from '../src/relay.ts';

const TRANSACTIONS = 40;
const EVENTS_PER_TRANSACTION = 200;
const EVENTS = TRANSACTIONS * EVENTS_PER_TRANSACTION;
const LIMIT = 10;

let db: TestDatabase;
let pool: pg.Pool;
let reader: pg.Client;

before(async () => {
  db = await createTestDatabase('ll_relay_plan');
  await migrateEvents(db.url);
  pool = new pg.Pool({ connectionString: db.url, max: 4 });
  pool.on('error', () => {});
  // No automatic ANALYZE during the test: the table stays as a fresh one is.
  await pool.query('ALTER TABLE events.events SET (autovacuum_enabled = false)');
  const store = await EventStore.open(pool);
  for (let t = 0; t < TRANSACTIONS; t += 1) {
    const entries: StreamEvent[] = Array.from({ length: EVENTS_PER_TRANSACTION }, (_, i) => ({
      streamType: 'plan',
      streamId: `s${t}-${i % 40}`,
      version: Math.floor(i / 40) + 1,
      event: { type: 'Planned', data: { t, i } },
    }));
    await inTransaction(pool, (c) => store.appendMany(c, entries));
  }
  reader = new pg.Client({ connectionString: db.url });
  await reader.connect();
});

after(async () => {
  await reader?.end();
  await pool?.end();
  await db?.drop();
});

/** Rows of events.events this session fetched so far, by any scan (flushed to the shared statistics first). */
async function rowsFetched(): Promise<number> {
  await reader.query('SELECT pg_stat_force_next_flush()');
  // The flush happens as the backend goes idle after the statement above.
  const r = await reader.query<{ n: string }>(
    `SELECT pg_stat_clear_snapshot();
     SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::text AS n
       FROM pg_stat_user_tables WHERE relid = 'events.events'::regclass`,
  ) as unknown as Array<pg.QueryResult<{ n: string }>>;
  return Number(r.at(-1)?.rows[0]?.n);
}

describe("the relay's read on a table the planner knows nothing about", () => {
  test('fetches about as many rows as it returns, from the start and from the middle', async () => {
    const analyzed = await pool.query<{ n: string }>(
      `SELECT (coalesce(analyze_count, 0) + coalesce(autoanalyze_count, 0))::text AS n FROM pg_stat_user_tables WHERE relid = 'events.events'::regclass`,
    );
    assert.equal(analyzed.rows[0]?.n, '0', 'the table has never been analyzed');
    const counts = await pool.query<{ partition: number; n: string }>('SELECT partition, count(*)::text AS n FROM events.events GROUP BY partition ORDER BY partition');
    assert.equal(counts.rows.length, 4, 'events in every partition');
    assert.equal(counts.rows.reduce((n, r) => n + Number(r.n), 0), EVENTS);

    for (const partition of [0, 3]) {
      const before0 = await rowsFetched();
      const first = await readOutbox(reader, partition, CHECKPOINT_START, LIMIT);
      const fetched = (await rowsFetched()) - before0;
      assert.equal(first.length, LIMIT);
      // The index walk passes the other partitions' rows between its own: about four
      // fetched per row returned. A scan of everything past the checkpoint fetches all 8,000.
      assert.ok(fetched <= LIMIT * 20, `partition ${partition} from the start: ${fetched} rows fetched for ${LIMIT}`);

      const middle = await readOutbox(reader, partition, CHECKPOINT_START, EVENTS / 8);
      const checkpoint = middle.at(-1);
      assert.ok(checkpoint !== undefined);
      const before1 = await rowsFetched();
      const next = await readOutbox(reader, partition, { transactionId: checkpoint.transactionId, position: checkpoint.position }, LIMIT);
      const fetched1 = (await rowsFetched()) - before1;
      assert.equal(next.length, LIMIT);
      assert.ok(next.every((e) => e.position > checkpoint.position), 'only events after the checkpoint');
      assert.ok(fetched1 <= LIMIT * 20, `partition ${partition} from the middle: ${fetched1} rows fetched for ${LIMIT}`);
    }
  });

  test('EventStore.readAll of one partition reads the same way, parsed as readAll parses', async () => {
    const store = await EventStore.open(pool);
    const before0 = await rowsFetched();
    const events = await store.readAll(reader, { after: CHECKPOINT_START, limit: LIMIT, partition: 2 });
    const fetched = (await rowsFetched()) - before0;
    assert.equal(events.length, LIMIT);
    assert.ok(fetched <= LIMIT * 20, `${fetched} rows fetched for ${LIMIT}`);
    assert.ok(events.every((e) => e.partition === 2 && typeof e.position === 'bigint' && e.recordedAt instanceof Date && typeof e.data.i === 'number'));
    const all = await store.readAll(reader, { after: CHECKPOINT_START, limit: EVENTS });
    assert.deepEqual(events, all.filter((e) => e.partition === 2).slice(0, LIMIT), 'the same events as a read of every partition, filtered');
    const lean = await store.readAll(reader, { after: CHECKPOINT_START, limit: LIMIT, partition: 2, fields: ['t', 'i'] });
    assert.deepEqual(lean.map((e) => [e.position, e.data.t, e.data.i]), events.map((e) => [e.position, String(e.data.t), String(e.data.i)]));
    assert.deepEqual((await reader.query('SHOW enable_sort')).rows, [{ enable_sort: 'on' }]);
  });

  test("the read's planner setting ends with it: the session's stays as it was", async () => {
    await readOutbox(reader, 1, CHECKPOINT_START, LIMIT);
    assert.deepEqual((await reader.query('SHOW enable_sort')).rows, [{ enable_sort: 'on' }]);
  });

  test('values that are not integers never reach the statement, whatever the static types say', async () => {
    await pool.query('CREATE TABLE public.canary (x int)');
    const store = await EventStore.open(pool);
    const injected = '10; DROP TABLE public.canary';
    // As a caller in plain JavaScript, or a checkpoint read back from JSON, could pass them.
    await assert.rejects(store.readAll(reader, { after: CHECKPOINT_START, limit: injected as unknown as number, partition: 0 }), TypeError);
    await assert.rejects(readOutbox(reader, 0, { transactionId: "0'::xid8, 0) OR true --" as unknown as bigint, position: 0n }, LIMIT), TypeError);
    await assert.rejects(readOutbox(reader, '0 OR true' as unknown as number, CHECKPOINT_START, LIMIT), TypeError);
    await assert.rejects(readOutbox(reader, 0, { transactionId: -1n, position: 0n }, LIMIT), TypeError);
    await assert.rejects(readOutbox(reader, 0, CHECKPOINT_START, 1.5), TypeError);
    assert.equal((await pool.query<{ kept: boolean }>("SELECT to_regclass('public.canary') IS NOT NULL AS kept")).rows[0]?.kept, true, 'the table is still there');
  });
});

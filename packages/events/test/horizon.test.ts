/**
 * The read horizon (src/horizon.ts) on a real PostgreSQL server: a write transaction left open
 * in another database no longer holds this database's readers back, one in this database
 * still does (it might append events), even for a role that may not see other roles'
 * sessions, and in REPEATABLE READ (where it cannot be trusted) the cluster-wide one is used.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { createTestDatabase, propertySeed, type TestDatabase } from '@ledgerline/testing';
import { setTimeout as sleep } from 'node:timers/promises';
import { CHECKPOINT_START, checkpointOf, readHorizon, type Checkpoint, type StoredEvent } from '../src/index.ts';
import { readOutbox } from '../src/relay.ts';
import { eventsTestEnv, inTx, type EventsTestEnv } from './support.ts';

let env: EventsTestEnv;
let other: TestDatabase;

before(async () => {
  env = await eventsTestEnv();
  other = await createTestDatabase('ll_horizon_other');
});

after(async () => {
  await env.close();
  await other.drop();
});

/**
 * A connection holding a transaction open with a transaction id; returns the id. A snapshot's
 * running list holds only ids below its xmax (the last completed id + 1), so a later
 * transaction is completed too: the open one is then below xmax, as on any busy server.
 */
async function openWriteTransaction(client: pg.Client): Promise<bigint> {
  await client.query('BEGIN');
  const r = await client.query<{ x: string }>('SELECT pg_current_xact_id()::text AS x');
  await env.pool.query('SELECT pg_current_xact_id()');
  return BigInt(r.rows[0]!.x);
}

async function append(id: string): Promise<StoredEvent> {
  await inTx(env.pool, (c) => env.store.append(c, { type: 'horizon', id }, [{ type: 'Happened', data: { id } }], { expectedVersion: 'no_stream' }));
  const [event] = await env.store.readStream(env.pool, 'horizon', id);
  return event!;
}

const ids = (events: readonly StoredEvent[]): string[] => events.filter((e) => e.streamType === 'horizon').map((e) => e.streamId);

describe('the read horizon', () => {
  test('a write transaction in another database does not hold readers back; one in this database does', async () => {
    const elsewhere = new pg.Client({ connectionString: other.url });
    const here = new pg.Client({ connectionString: env.db.url });
    await elsewhere.connect();
    await here.connect();
    try {
      const otherXid = await openWriteTransaction(elsewhere);
      const a = await append('a');
      const global = await env.pool.query<{ x: string }>('SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS x');
      // The cluster-wide horizon is held at the other database's transaction, below a's: the
      // readers used to wait for it, however long it ran.
      assert.ok(BigInt(global.rows[0]!.x) <= otherXid && otherXid < a.transactionId, 'the old horizon would hold a back');
      assert.ok((await readHorizon(env.pool)) > a.transactionId, 'the horizon passes the other database');
      assert.deepEqual(ids(await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 100 })), ['a']);
      const partition = env.store.partitionOf('horizon', 'a');
      assert.deepEqual((await readOutbox(env.pool, partition, CHECKPOINT_START, 100)).filter((e) => e.streamType === 'horizon').map((e) => e.streamId), ['a']);

      // A transaction of this database could still append events: it holds the horizon.
      const hereXid = await openWriteTransaction(here);
      const b = await append('b');
      assert.ok(hereXid < b.transactionId);
      assert.equal(await readHorizon(env.pool), hereXid);
      assert.deepEqual(ids(await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 100 })), ['a'], 'b waits behind the open transaction');
      // Events that transaction appends, before or after b in position, come out in its place.
      await env.store.appendMany(here, [{ streamType: 'horizon', streamId: 'c', version: 1, event: { type: 'Happened', data: { id: 'c' } } }]);
      await here.query('COMMIT');
      assert.deepEqual(ids(await env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 100 })), ['a', 'c', 'b']);
    } finally {
      await elsewhere.query('ROLLBACK').catch(() => {});
      await here.query('ROLLBACK').catch(() => {});
      await elsewhere.end();
      await here.end();
    }
  });

  test('in REPEATABLE READ it is the cluster-wide horizon; a role without pg_read_all_stats still sees the transactions here', async () => {
    const elsewhere = new pg.Client({ connectionString: other.url });
    await elsewhere.connect();
    const role = `ll_horizon_${randomBytes(4).toString('hex')}`;
    await env.pool.query(`CREATE ROLE ${role} LOGIN`);
    const hidden = new pg.Client({ connectionString: env.db.url });
    await hidden.connect();
    const url = new URL(env.db.url);
    url.username = role;
    const probe = new pg.Client({ connectionString: url.toString() });
    try {
      const otherXid = await openWriteTransaction(elsewhere);
      const c = await env.pool.connect();
      try {
        await c.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
        // The read that follows shares this snapshot, so only the cluster-wide horizon is safe.
        assert.ok((await readHorizon(c)) <= otherXid);
        await c.query('COMMIT');
        assert.ok((await readHorizon(c)) > otherXid, 'READ COMMITTED: past the other database');
      } finally {
        c.release();
      }

      // A superuser's transaction here, whose session the probe role may not inspect (it lacks
      // pg_read_all_stats), though it may read its transaction id: the horizon depends on that.
      const hiddenXid = await openWriteTransaction(hidden);
      await probe.connect();
      const seen = await probe.query<{ query: string; xid: string }>(
        'SELECT query, backend_xid::text AS xid FROM pg_stat_activity WHERE datname = current_database() AND backend_xid IS NOT NULL',
      );
      assert.deepEqual(seen.rows, [{ query: '<insufficient privilege>', xid: String(hiddenXid) }]);
      assert.equal(await readHorizon(probe), hiddenXid, 'held at the transaction here, past the one elsewhere');
      assert.ok(otherXid < hiddenXid);
    } finally {
      await elsewhere.query('ROLLBACK').catch(() => {});
      await hidden.query('ROLLBACK').catch(() => {});
      await probe.end().catch(() => {});
      await hidden.end();
      await elsewhere.end();
      await env.pool.query(`DROP ROLE ${role}`);
    }
  });

  test('under concurrent writers that take their ids early and commit late, a tailing reader misses nothing and reads nothing twice', async () => {
    // Writers like the ledger's batches: an id first (a write elsewhere), then the events,
    // then a random wait, then COMMIT or ROLLBACK; all while another database holds a write
    // transaction open, which the old horizon would have waited for to the end.
    const seed = propertySeed('read horizon under concurrent writers');
    let state = seed >>> 0;
    const random = (): number => {
      state = (state + 0x6d2b79f5) >>> 0;
      let t = Math.imul(state ^ (state >>> 15), 1 | state);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const elsewhere = new pg.Client({ connectionString: other.url });
    await elsewhere.connect();
    await openWriteTransaction(elsewhere);
    const committed: string[] = [];
    let writing = true;
    const writer = async (w: number): Promise<void> => {
      for (let i = 0; i < 12; i += 1) {
        const c = await env.pool.connect();
        try {
          await c.query('BEGIN');
          if (random() < 0.5) await c.query('SELECT pg_current_xact_id()');
          await sleep(Math.floor(random() * 30));
          const streamId = `w${w}-${i}`;
          const n = 1 + Math.floor(random() * 4);
          await env.store.append(c, { type: 'stress', id: streamId }, Array.from({ length: n }, (_, k) => ({ type: 'Step', data: { k } })), { expectedVersion: 'no_stream' });
          await sleep(Math.floor(random() * 30));
          if (random() < 0.15) await c.query('ROLLBACK');
          else {
            await c.query('COMMIT');
            for (let k = 0; k < n; k += 1) committed.push(`${streamId}#${k + 1}`);
          }
        } finally {
          c.release();
        }
      }
    };
    const read: StoredEvent[] = [];
    let readWhileWriting = 0;
    const reader = async (): Promise<void> => {
      let after: Checkpoint = CHECKPOINT_START;
      for (;;) {
        // Once every writer has ended, nothing of this database is running: the first empty
        // page means the reader is at the end, and anything it passed is missing for good.
        const done = !writing;
        const page = await env.store.readAll(env.pool, { after, limit: 7 });
        const last = page.at(-1);
        if (last !== undefined) after = checkpointOf(last);
        const mine = page.filter((e) => e.streamType === 'stress');
        read.push(...mine);
        if (writing) readWhileWriting += mine.length;
        if (done && page.length === 0) return;
        if (page.length === 0) await sleep(5);
      }
    };
    try {
      const readerDone = reader();
      await Promise.all(Array.from({ length: 6 }, (_, w) => writer(w)));
      writing = false;
      await readerDone;
    } finally {
      await elsewhere.query('ROLLBACK').catch(() => {});
      await elsewhere.end();
    }
    const ids = read.map((e) => `${e.streamId}#${e.version}`);
    assert.equal(new Set(ids).size, ids.length, 'nothing read twice');
    assert.deepEqual([...ids].sort(), [...committed].sort(), 'every committed event read, nothing rolled back');
    for (let i = 1; i < read.length; i += 1) {
      const [a, b] = [read[i - 1]!, read[i]!];
      assert.ok(a.transactionId < b.transactionId || (a.transactionId === b.transactionId && a.position < b.position), 'in the global order');
    }
    assert.ok(readWhileWriting > 0, 'the reader moved on while the other database\'s transaction stayed open');
  });
});

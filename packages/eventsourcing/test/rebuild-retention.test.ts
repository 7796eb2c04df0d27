/**
 * A rebuild racing retention's deletion: a generation being filled (blue/green, or kept
 * inactive) reads the global order from the start, and deleting a stream it has read only in
 * part leaves it with some of the stream's events and not the others, a state that neither the
 * history with the stream nor the one without it ever had. Deletion waits for every generation,
 * active or not, to have passed each of the stream's events, hot or archived.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  applyRetention,
  createGeneration,
  ensureProjection,
  NO_LEGAL_HOLDS,
  replayInto,
  runBatch,
  swapGeneration,
  type Projection,
} from '../src/index.ts';
import { esTestEnv, inTx, passReaders, waitFor, type EsTestEnv } from './support.ts';

let env: EsTestEnv;
before(async () => { env = await esTestEnv(); });
after(async () => { await env.close(); });

const T = { timeout: 60_000 };
const DAY_MS = 86_400_000;

function counting(name: string): Projection {
  return {
    name,
    schema: 'projections',
    tables: [name],
    async create(db, t) {
      await db.query(`CREATE TABLE ${t[name]} (stream_id text PRIMARY KEY, n int NOT NULL)`);
    },
    async apply(db, t, events) {
      for (const e of events) {
        await db.query(`INSERT INTO ${t[name]} VALUES ($1, 1) ON CONFLICT (stream_id) DO UPDATE SET n = ${t[name]}.n + 1`, [e.streamId]);
      }
    },
  };
}

async function appendOne(type: string, id: string, expectedVersion: number | 'no_stream'): Promise<void> {
  await inTx(env.pool, (c) => env.store.append(c, { type, id }, [{ type: `${type}.Noted`, data: {} }], { expectedVersion }));
}

async function counts(p: Projection): Promise<Record<string, number>> {
  const r = await env.pool.query<{ stream_id: string; n: number }>(`SELECT stream_id, n FROM projections.${p.name} ORDER BY stream_id`);
  return Object.fromEntries(r.rows.map((x) => [x.stream_id, x.n]));
}

const deleteDoomed = (type: string) => applyRetention(env.pool, {
  rules: [{ streamType: type, deleteAfterDays: 30 }],
  holds: NO_LEGAL_HOLDS,
  now: new Date(Date.now() + 40 * DAY_MS),
});

for (const archivedFirst of [false, true]) {
  test(`a stream a blue/green rebuild has read in part is not deleted under it (${archivedFirst ? 'archived' : 'hot'} stream)`, T, async () => {
    const p = counting(archivedFirst ? 'rr_archived' : 'rr_hot');
    const type = archivedFirst ? 'doomeda' : 'doomedh';
    await ensureProjection(env.pool, p);
    // The doomed stream's two events, with another stream's event between them.
    await appendOne(type, 's', 'no_stream');
    await appendOne('keep', `${type}-k`, 'no_stream');
    await appendOne(type, 's', 1);
    for (;;) if (!(await runBatch(env.pool, env.store, p, { generation: 'active', batchSize: 100 })).more) break;
    await passReaders(env.pool);
    if (archivedFirst) {
      const archived = await applyRetention(env.pool, { rules: [{ streamType: type, archiveAfterDays: 10 }], holds: NO_LEGAL_HOLDS, now: new Date(Date.now() + 40 * DAY_MS) });
      assert.equal(archived.eventsArchived, 2);
    }
    // A rebuild into a new generation has read the stream's first event, not its second.
    const g = await createGeneration(env.pool, p);
    let first = await runBatch(env.pool, env.store, p, { generation: g, batchSize: 1 });
    while (first.applied > 0 && (await env.pool.query(`SELECT 1 FROM projections.${p.name}_g${g} WHERE stream_id = 's'`)).rowCount === 0) {
      first = await runBatch(env.pool, env.store, p, { generation: g, batchSize: 1 });
    }
    const during = await deleteDoomed(type);
    assert.equal(during.deleted.length, 0, 'the stream is kept while a generation has read only part of it');
    await replayInto(env.pool, env.store, p, g, { batchSize: 1 });
    await swapGeneration(env.pool, env.store, p, g, { batchSize: 100 });
    const rebuilt = await counts(p);
    assert.equal(rebuilt.s, 2, `the rebuilt generation has both of the stream's events (got ${JSON.stringify(rebuilt)})`);
    // Once every generation has passed it, the stream goes.
    const later = await deleteDoomed(type);
    assert.deepEqual(later.deleted.map((s) => s.streamId), ['s']);
  });
}

test('a generation created while a deletion is committing does not read part of the stream', T, async () => {
  // The window between the removing statement and its commit: held open here by a lock on
  // the stream's snapshot row, which the deletion removes last. A generation created then and
  // read at once would see the stream's events (the deletion is not committed), apply the
  // first, and find the second gone after the commit.
  const p = counting('rr_window');
  const type = 'doomedw';
  await ensureProjection(env.pool, p);
  await appendOne(type, 's', 'no_stream');
  await appendOne('keep', `${type}-k`, 'no_stream');
  await appendOne(type, 's', 1);
  for (;;) if (!(await runBatch(env.pool, env.store, p, { generation: 'active', batchSize: 100 })).more) break;
  await passReaders(env.pool);
  await env.pool.query(`INSERT INTO events.snapshots (stream_type, stream_id, version, state_version, state) VALUES ($1, 's', 2, 1, '{}')`, [type]);
  const blocker = await env.pool.connect();
  let deletion: Promise<unknown> | undefined;
  let created: Promise<number> | undefined;
  try {
    await blocker.query('BEGIN');
    await blocker.query(`SELECT 1 FROM events.snapshots WHERE stream_type = $1 AND stream_id = 's' FOR UPDATE`, [type]);
    deletion = deleteDoomed(type);
    deletion.catch(() => {});
    await waitFor('the deletion to wait on the snapshot row', async () =>
      (await env.pool.query(`SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM events.snapshots%'`)).rowCount === 1);
    created = createGeneration(env.pool, p);
    created.catch(() => {});
    const first = await Promise.race([created, sleep(300).then(() => null)]);
    // Created meanwhile (nothing held it back): a rebuild starts reading at once.
    if (first !== null) {
      // As far as the stream's first event (the database holds the earlier tests' events too).
      while ((await runBatch(env.pool, env.store, p, { generation: first, batchSize: 1 })).applied > 0) {
        if ((await env.pool.query(`SELECT 1 FROM projections.${p.name}_g${first} WHERE stream_id = 's'`)).rowCount === 1) break;
      }
    }
  } finally {
    await blocker.query('ROLLBACK').catch(() => {});
    blocker.release();
  }
  await deletion;
  const g = await created;
  assert.ok(g !== undefined);
  await replayInto(env.pool, env.store, p, g, { batchSize: 1 });
  const n = (await env.pool.query<{ n: number }>(`SELECT n FROM projections.${p.name}_g${g} WHERE stream_id = 's'`)).rows[0]?.n ?? 0;
  assert.ok(n === 0 || n === 2, `the new generation has all of the stream or none of it, not ${n} of its 2 events`);
});

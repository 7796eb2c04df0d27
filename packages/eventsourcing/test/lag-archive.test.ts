/**
 * projectionLag counts archived events too: a projection created after retention archived
 * streams has them ahead of its checkpoint (its runner applies them through readAll), so they
 * are part of how far behind it is, in events and in age.
 */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import { applyRetention, ensureProjection, NO_LEGAL_HOLDS, projectionLag, runBatch, type Projection } from '../src/index.ts';
import { esTestEnv, inTx, passReaders, type EsTestEnv } from './support.ts';

let env: EsTestEnv;
before(async () => { env = await esTestEnv(); });
after(async () => { await env.close(); });

const counting: Projection = {
  name: 'lag_count',
  schema: 'projections',
  tables: ['lag_count'],
  async create(db, t) {
    await db.query(`CREATE TABLE ${t.lag_count} (stream_id text PRIMARY KEY, n int NOT NULL)`);
  },
  async apply(db, t, events) {
    for (const e of events) {
      await db.query(`INSERT INTO ${t.lag_count} VALUES ($1, 1) ON CONFLICT (stream_id) DO UPDATE SET n = ${t.lag_count}.n + 1`, [e.streamId]);
    }
  },
};

test('a projection created after streams were archived reports them in its lag', async () => {
  for (let i = 0; i < 3; i += 1) {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'memo', id: `m-${i}` }, [{ type: 'memo.Noted', data: { i } }, { type: 'memo.Noted', data: { i } }], { expectedVersion: 'no_stream' }));
  }
  await passReaders(env.pool);
  const report = await applyRetention(env.pool, { rules: [{ streamType: 'memo', archiveAfterDays: 30 }], holds: NO_LEGAL_HOLDS, now: new Date(Date.now() + 40 * 86_400_000) });
  assert.equal(report.eventsArchived, 6);
  await sleep(400);
  await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'hot' }, [{ type: 'note.Noted', data: {} }], { expectedVersion: 'no_stream' }));
  await ensureProjection(env.pool, counting);
  const lag = await projectionLag(env.pool, counting.name);
  assert.equal(lag?.eventsBehind, 7, 'six archived events and one hot one are ahead of the new projection');
  assert.ok((lag?.seconds ?? 0) >= 0.4, `the oldest event not applied is an archived one, at least 0.4 s old (got ${lag?.seconds})`);
  assert.equal((await projectionLag(env.pool, counting.name, 4))?.eventsBehind, 4, 'counted up to countMax');
  // Its runner applies all seven; then nothing is behind.
  const r = await runBatch(env.pool, env.store, counting, { generation: 'active', batchSize: 100 });
  assert.equal(r.applied, 7);
  const caughtUp = await projectionLag(env.pool, counting.name);
  assert.deepEqual([caughtUp?.eventsBehind, caughtUp?.seconds], [0, 0]);
});

/**
 * A replay or rebuild with a store that has a residency policy reads every event through the
 * store's checked read: the set-based fill and the worker threads, which read events.events
 * directly, are not taken, so a stream this location may not read is refused, not projected.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { EventStore, ResidencyViolationError } from '@ledgerline/events';
import { ensureProjection, ledgerBalancesProjection as p, readProjectedBalances, rebuild } from '../src/index.ts';
import { ResidencyReplayError } from '../src/projection.ts';
import { esTestEnv, inTx, type EsTestEnv } from './support.ts';

const acct = (n: number): string => `00000000-0000-7000-8000-${String(n).padStart(12, '0')}`;
const policy = { allowed: { eu: ['eu-west-1'] } };

let env: EsTestEnv;
before(async () => {
  env = await esTestEnv();
  for (const id of [acct(1), acct(2)]) {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'ledger.account', id }, [{ type: 'ledger.AccountOpened', data: { id, ledger: 'USD', code: 1, flags: {} } }],
      { expectedVersion: 'no_stream', region: 'eu' }));
  }
  await ensureProjection(env.pool, p);
});
after(async () => { await env.close(); });

async function generationCount(): Promise<number> {
  return (await env.pool.query(`SELECT 1 FROM events.projections WHERE name = $1`, [p.name])).rows.length;
}

test('a rebuild at a location the policy forbids is refused, set-based or with workers; nothing is projected or left behind', async () => {
  const us = await EventStore.open(env.pool, { residency: { policy, location: 'us-east-1' } });
  await assert.rejects(rebuild(env.pool, us, p, { mode: 'blue-green', batchSize: 100 }), ResidencyViolationError);
  await assert.rejects(rebuild(env.pool, us, p, { mode: 'blue-green', batchSize: 1, setBased: false, workers: { count: 1, databaseUrl: env.db.url } }), ResidencyReplayError);
  assert.equal((await readProjectedBalances(env.pool)).size, 0);
  assert.equal(await generationCount(), 1);
});

test('where the policy allows the data, the checked rebuild projects it', async () => {
  const eu = await EventStore.open(env.pool, { residency: { policy, location: 'eu-west-1' } });
  const r = await rebuild(env.pool, eu, p, { mode: 'blue-green', batchSize: 100 });
  assert.equal(r.events, 2);
  assert.deepEqual([...(await readProjectedBalances(env.pool)).keys()].sort(), [acct(1), acct(2)]);
});

/**
 * Asynchronous projections: the live runner, its lag metric, generations, and a blue/green
 * rebuild while the runner keeps applying events that writers keep appending.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Registry } from 'prom-client';
import type { StreamEvent } from '@ledgerline/events';
import {
  createGeneration,
  dropGeneration,
  ensureProjection,
  projectionLag,
  ProjectionMetrics,
  ProjectionRunner,
  rebuild,
  replayInto,
  runBatch,
  swapGeneration,
} from '../src/index.ts';
import { effectsProjection as projection } from './fixtures/effects.ts';
import { count, esTestEnv, inTx, waitFor, type EsTestEnv } from './support.ts';

let env: EsTestEnv;
before(async () => {
  env = await esTestEnv();
  await ensureProjection(env.pool, projection);
});
after(async () => {
  await env.close();
});

let streamNo = 0;
/** Appends `transactions` transactions of `perTx` events, each to a fresh stream. */
async function appendEvents(transactions: number, perTx: number): Promise<void> {
  for (let t = 0; t < transactions; t += 1) {
    streamNo += 1;
    const entries: StreamEvent[] = Array.from({ length: perTx }, (_, i) => ({
      streamType: 'thing',
      streamId: `s${streamNo}`,
      version: i + 1,
      event: { type: 'thing.Happened', data: { i } },
    }));
    await inTx(env.pool, (c) => env.store.appendMany(c, entries));
  }
}

/** Each committed event exactly once in the view, nothing else. */
async function assertExactlyOnce(): Promise<number> {
  const events = await count(env.pool, 'SELECT count(*) FROM events.events');
  const r = await env.pool.query<{ missing: number; twice: number; unknown: number; rows: number }>(`
    SELECT (SELECT count(*) FROM events.events e WHERE NOT EXISTS (SELECT 1 FROM projections.effects f WHERE f.event_id = e.event_id))::int AS missing,
           (SELECT count(*) FROM (SELECT event_id FROM projections.effects GROUP BY event_id HAVING count(*) > 1) d)::int AS twice,
           (SELECT count(*) FROM projections.effects f WHERE NOT EXISTS (SELECT 1 FROM events.events e WHERE e.event_id = f.event_id))::int AS unknown,
           (SELECT count(*) FROM projections.effects)::int AS rows`);
  assert.deepEqual(r.rows[0], { missing: 0, twice: 0, unknown: 0, rows: events });
  return events;
}

async function caughtUp(): Promise<boolean> {
  return (await projectionLag(env.pool, projection.name))?.eventsBehind === 0;
}

describe('asynchronous projections', () => {
  test('the runner applies each event once and reports its lag', async () => {
    const registry = new Registry();
    const metrics = new ProjectionMetrics(registry);
    const runner = new ProjectionRunner({ pool: env.pool, store: env.store, projection, batchSize: 7, idleMs: 10, lagIntervalMs: 0, metrics });
    await appendEvents(5, 6);
    runner.start();
    runner.start(); // already running: no second loop
    await waitFor('the runner to catch up', caughtUp);
    await runner.stop();
    assert.equal(await assertExactlyOnce(), 30);
    assert.equal(runner.stats().events, 30);
    const text = await registry.metrics();
    assert.match(text, /ledgerline_projection_events_applied_total\{projection="effects"\} 30/);
    assert.match(text, /ledgerline_projection_lag_seconds\{projection="effects"\} 0/);

    // Stopped: new events wait, and the lag says how many and how old the oldest is.
    await appendEvents(2, 4);
    const lag = await projectionLag(env.pool, projection.name);
    assert.equal(lag?.eventsBehind, 8);
    assert.ok(lag.seconds > 0, `lag ${lag.seconds} s`);
    assert.equal(lag.eventsApplied, 30n);
    assert.equal(await projectionLag(env.pool, 'no_such_projection'), null);
    runner.start();
    await waitFor('the runner to catch up again', caughtUp);
    await runner.stop();
    assert.equal(await assertExactlyOnce(), 38);
  });

  test('two runners at once still apply each event once (the checkpoint row lock)', async () => {
    await appendEvents(20, 5);
    const runners = [1, 2].map(() => new ProjectionRunner({ pool: env.pool, store: env.store, projection, batchSize: 3, idleMs: 5 }));
    for (const r of runners) r.start();
    await waitFor('both runners to catch up', caughtUp);
    await Promise.all(runners.map((r) => r.stop()));
    await assertExactlyOnce();
    assert.ok(runners.every((r) => r.stats().errors === 0));
  });

  test('blue/green rebuild while writers append and the live runner runs', async () => {
    const live = new ProjectionRunner({ pool: env.pool, store: env.store, projection, batchSize: 10, idleMs: 5 });
    live.start();
    let writing = true;
    const writer = (async () => {
      while (writing) await appendEvents(1, 3);
    })();
    const before = (await projectionLag(env.pool, projection.name))!.generation;
    const report = await rebuild(env.pool, env.store, projection, { mode: 'blue-green', batchSize: 25 });
    writing = false;
    await writer;
    assert.equal(report.generation, before + 1);
    assert.ok(report.events > 0 && report.rebuildSeconds >= report.seconds);
    await waitFor('the live runner to catch up on the new generation', caughtUp);
    await live.stop();
    await assertExactlyOnce();
    const gens = await env.pool.query<{ generation: number; active: boolean }>(`SELECT generation, active FROM events.projections WHERE name = 'effects'`);
    assert.deepEqual(gens.rows, [{ generation: before + 1, active: true }]);
    const old = await count(env.pool, `SELECT count(*) FROM pg_tables WHERE schemaname = 'projections' AND tablename = $1`, [`effects_g${before}`]);
    assert.equal(old, 0, 'the old generation is dropped');
  });

  test('generations: swap closes the gap to the live checkpoint; the active one cannot be dropped', async () => {
    await appendEvents(3, 2);
    await waitFor('caught up', async () => {
      await runBatch(env.pool, env.store, projection, { generation: 'active', batchSize: 1000 });
      return caughtUp();
    });
    const g = await createGeneration(env.pool, projection);
    // Replay only a little, then swap: the swap must apply the rest before it flips.
    await runBatch(env.pool, env.store, projection, { generation: g, batchSize: 5 });
    const old = await swapGeneration(env.pool, env.store, projection, g, { batchSize: 4 });
    assert.equal(old, g - 1);
    await assertExactlyOnce();
    assert.equal(await swapGeneration(env.pool, env.store, projection, g, { batchSize: 4 }), null, 'already active');
    await assert.rejects(dropGeneration(env.pool, projection, g), /is active; swap first/);
    await assert.rejects(swapGeneration(env.pool, env.store, projection, 999, { batchSize: 4 }), /generation 999 of effects does not exist/);
    await assert.rejects(replayInto(env.pool, env.store, projection, 999, { batchSize: 4 }), /generation 999 of effects does not exist/);
    await assert.rejects(runBatch(env.pool, env.store, projection, { generation: 'active', batchSize: 0 }), /batchSize must be a positive integer/);
    await assert.rejects(rebuild(env.pool, env.store, { ...projection, name: 'absent' }, { mode: 'in-place', batchSize: 5 }), /does not exist/);
    await assert.rejects(ensureProjection(env.pool, { ...projection, name: 'Bad-Name' }), /not a safe identifier/);
  });

  test('a failing projection rolls back its batch, backs off, and retries', async () => {
    await appendEvents(1, 3);
    let failures = 0;
    const errors: unknown[] = [];
    const flaky = {
      ...projection,
      apply: async (...args: Parameters<typeof projection.apply>) => {
        await projection.apply(...args);
        if (failures < 2) {
          failures += 1;
          throw new Error('read model write failed');
        }
      },
    };
    const runner = new ProjectionRunner({ pool: env.pool, store: env.store, projection: flaky, batchSize: 100, idleMs: 5, onError: (e) => errors.push(e) });
    runner.start();
    await waitFor('the runner to recover', caughtUp);
    await runner.stop();
    assert.equal(runner.stats().errors, 2);
    assert.match(String(errors[0]), /read model write failed/);
    await assertExactlyOnce();
  });
});

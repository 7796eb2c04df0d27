/**
 * SIGKILL a projection process in the middle of a batch (after it applied the events, before
 * COMMIT), with a real child process on real PostgreSQL. The restarted process must resume
 * from the last committed checkpoint: no event missing, none applied twice.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before, test } from 'node:test';
import type { StreamEvent } from '@ledgerline/events';
import { projectionLag } from '../src/index.ts';
import { count, esTestEnv, inTx, waitFor, type EsTestEnv } from './support.ts';

const PROJECTOR = fileURLToPath(new URL('./fixtures/projector.ts', import.meta.url));

interface Line {
  type: string;
  [key: string]: unknown;
}

const live = new Set<ChildProcess>();
afterEach(async () => {
  for (const child of live) {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await once(child, 'close');
    }
  }
  live.clear();
});

function startProjector(extra: Record<string, string>): { child: ChildProcess; lines: Line[]; closed: Promise<void> } {
  const child = spawn(process.execPath, [PROJECTOR], { env: { ...process.env, DATABASE_URL: env.db.url, ...extra }, stdio: ['ignore', 'pipe', 'inherit'] });
  live.add(child);
  const lines: Line[] = [];
  createInterface({ input: child.stdout }).on('line', (l) => lines.push(JSON.parse(l) as Line));
  const closed = once(child, 'close').then(() => undefined);
  return { child, lines, closed };
}

let env: EsTestEnv;
before(async () => {
  env = await esTestEnv();
});
after(async () => {
  await env.close();
});

async function appendEvents(transactions: number, perTx: number, tag: string): Promise<void> {
  for (let t = 0; t < transactions; t += 1) {
    const entries: StreamEvent[] = Array.from({ length: perTx }, (_, i) => ({
      streamType: 'thing',
      streamId: `${tag}-${t}`,
      version: i + 1,
      event: { type: 'thing.Happened', data: { i } },
    }));
    await inTx(env.pool, (c) => env.store.appendMany(c, entries));
  }
}

test('SIGKILL mid-batch: the projection resumes with no gap and nothing applied twice', { timeout: 90_000 }, async (t) => {
  await appendEvents(30, 20, 'a'); // 600 events
  await waitFor('the horizon to pass the events', async () => (await env.store.readAll(env.pool, { after: { transactionId: 0n, position: 0n }, limit: 601 })).length === 600);
  const first = startProjector({ BATCH: '100', KILL_ON_BATCH: '3' });
  await first.closed;
  assert.equal(first.child.signalCode, 'SIGKILL');
  const batches = first.lines.filter((l) => l.type === 'batch');
  assert.equal(batches.length, 3, 'it applied three batches and was killed in the third');
  assert.ok(first.lines.some((l) => l.type === 'killing'));
  // Two batches committed; the third was applied but never committed.
  assert.equal(await count(env.pool, 'SELECT count(*) FROM projections.effects'), 200);
  const lag = await projectionLag(env.pool, 'effects');
  assert.equal(lag?.checkpoint.position, BigInt(String(batches[1]!.last)));
  assert.equal(lag.eventsBehind, 400);

  // Restart while more events arrive.
  const second = startProjector({ BATCH: '100' });
  await appendEvents(10, 20, 'b');
  await waitFor('the restarted projection to catch up', async () => (await projectionLag(env.pool, 'effects'))?.eventsBehind === 0, 60_000);
  second.child.kill('SIGTERM');
  await second.closed;
  assert.equal(second.child.exitCode, 0);
  const resumed = second.lines.find((l) => l.type === 'batch');
  assert.equal(resumed?.first, batches[2]!.first, 'the restart re-reads the batch that was killed');

  const r = await env.pool.query<{ missing: number; twice: number; rows: number; events: number }>(`
    SELECT (SELECT count(*) FROM events.events e WHERE NOT EXISTS (SELECT 1 FROM projections.effects f WHERE f.event_id = e.event_id))::int AS missing,
           (SELECT count(*) FROM (SELECT event_id FROM projections.effects GROUP BY event_id HAVING count(*) > 1) d)::int AS twice,
           (SELECT count(*) FROM projections.effects)::int AS rows,
           (SELECT count(*) FROM events.events)::int AS events`);
  t.diagnostic(JSON.stringify(r.rows[0]));
  assert.deepEqual(r.rows[0], { missing: 0, twice: 0, rows: 800, events: 800 });
  // Applied in the global order: each effect row's position increases with its insertion.
  const order = await count(env.pool, `SELECT count(*) FROM (SELECT position < lag(position) OVER (ORDER BY applied_at, position) AS back FROM projections.effects) x WHERE back`);
  assert.equal(order, 0, 'effects were applied in global order');
});

/**
 * Reads of a fixed range of the global order against a transaction still in flight that will
 * add an event inside the range (it took its id before the range's end). Readers stop at the
 * read horizon, so until 2026-12-07 an export or a kept replay up to a position ended short of
 * it and reported success, and a balance as of a position gave one answer before the
 * transaction committed and another after (a review reproduced each). Each now waits until the
 * range is whole, or says it cannot be (RangeNotSettledError). And a replay from a later
 * position no longer folds, set-based, an older transaction's event that sorts before it.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { createTestDatabase } from '@ledgerline/testing';
import { runCli } from '../src/cli.ts';
import {
  createGeneration,
  dropGeneration,
  ensureProjection,
  exportEvents,
  ledgerBalanceAt,
  ledgerBalancesProjection,
  RangeNotSettledError,
  replayInto,
} from '../src/index.ts';
import { esTestEnv, inTx, waitFor, type EsTestEnv } from './support.ts';

let env: EsTestEnv;
let dir: string;
before(async () => {
  env = await esTestEnv();
  dir = mkdtempSync(join(tmpdir(), 'll-settled-'));
});
after(async () => {
  rmSync(dir, { recursive: true, force: true });
  await env.close();
});

const opened = (id: string) => ({ type: 'ledger.AccountOpened', data: { id, ledger: '1', code: 1, flags: {} } });
const posted = (debit: string, credit: string, amount: string) => ({ type: 'ledger.TransferPosted', data: { id: randomUUID(), debitAccountId: debit, creditAccountId: credit, amount } });

/** Two accounts, then a transaction that takes its id and stays open, then three committed transfers of 10, 20 and 30: the last one's position is the range's end. */
async function rangeWithOneInFlight(): Promise<{ a: string; b: string; late: pg.PoolClient; last: string }> {
  const [a, b] = [randomUUID(), randomUUID()];
  await inTx(env.pool, async (c) => {
    await env.store.append(c, { type: 'ledger.account', id: a }, [opened(a)], { expectedVersion: 'no_stream' });
    await env.store.append(c, { type: 'ledger.account', id: b }, [opened(b)], { expectedVersion: 'no_stream' });
  });
  const late = await env.pool.connect();
  await late.query('BEGIN');
  await late.query('SELECT pg_current_xact_id()');
  for (const amount of ['10', '20', '30']) {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'ledger.transfer', id: randomUUID() }, [posted(a, b, amount)], { expectedVersion: 'no_stream' }));
  }
  const last = (await env.pool.query<{ p: string }>('SELECT max(position)::text AS p FROM events.events')).rows[0]!.p;
  // The late transaction's transfer of 5: recorded after the three, in the range all the same.
  await env.store.append(late, { type: 'ledger.transfer', id: randomUUID() }, [posted(a, b, '5')], { expectedVersion: 'no_stream' });
  return { a, b, late, last };
}

/** Commits `late` after a moment, while the caller waits. */
async function commitSoon(late: pg.PoolClient): Promise<void> {
  await sleep(300);
  await late.query('COMMIT');
  late.release();
}

test('an export and a kept replay up to a position wait for the transaction in flight and hold its event; with no time to wait, they say so and leave nothing', async () => {
  const { a, late, last } = await rangeWithOneInFlight();
  const io = { env: { DATABASE_URL: env.db.url, EVENTS_REGION: 'eu-west-1', EVENTS_RESIDENCY_POLICY: '{"eu":["eu-west-1"]}' }, stdout: () => {}, stderr: () => {} };
  const until = (await env.store.checkpointAt(env.pool, BigInt(last)))!;

  const refusedFile = join(dir, 'refused.ndjson');
  await assert.rejects(exportEvents(env.pool, env.store, { policy: { allowed: {} }, targetLocation: 'eu-west-1', out: refusedFile, until, settleWaitMs: 100 }), RangeNotSettledError);
  assert.equal(existsSync(refusedFile) || existsSync(`${refusedFile}.partial`), false);
  await ensureProjection(env.pool, ledgerBalancesProjection);
  const g = await createGeneration(env.pool, ledgerBalancesProjection);
  await assert.rejects(replayInto(env.pool, env.store, ledgerBalancesProjection, g, { batchSize: 100, until, settleWaitMs: 100 }), RangeNotSettledError);
  await dropGeneration(env.pool, ledgerBalancesProjection, g);

  const file = join(dir, 'range.ndjson');
  const [code] = await Promise.all([runCli(['export', '--to', 'eu-west-1', '--out', file, '--from-position', '1', '--to-position', last], io), commitSoon(late)]);
  assert.equal(code, 0);
  const amounts = readFileSync(file, 'utf8').trim().split('\n').map((line) => (JSON.parse(line) as { data: { amount?: string } }).data.amount ?? 'opened');
  // In the global order: the late transaction's transfer sorts before the three (its id is older).
  assert.deepEqual(amounts, ['opened', 'opened', '5', '10', '20', '30']);

  assert.equal(await runCli(['replay', '--to-position', last, '--keep', '--json'], io), 0);
  const kept = await env.pool.query<{ generation: number }>('SELECT generation FROM events.projections WHERE name = $1 AND NOT active ORDER BY generation DESC LIMIT 1', [ledgerBalancesProjection.name]);
  const balance = await env.pool.query<{ d: string }>(`SELECT debits_posted::text AS d FROM projections.ledger_balances_g${kept.rows[0]!.generation} WHERE account_id = $1`, [a]);
  assert.equal(balance.rows[0]?.d, '65');
});

test('an export up to a position is whole while another database of the server has a transaction open', async () => {
  const neighbour = await createTestDatabase('ll_es_neighbour');
  const other = new pg.Client({ connectionString: neighbour.url });
  try {
    await other.connect();
    await other.query('BEGIN');
    await other.query('SELECT pg_current_xact_id()');
    const first = (await env.pool.query<{ p: string }>('SELECT coalesce(max(position), 0)::text AS p FROM events.events')).rows[0]!.p;
    for (let i = 0; i < 5; i++) await inTx(env.pool, (c) => env.store.append(c, { type: 'order', id: randomUUID() }, [{ type: 'Placed', data: { i } }], { expectedVersion: 'no_stream' }));
    const until = (await env.store.checkpointAt(env.pool, BigInt(first) + 5n))!;
    const after = (await env.store.checkpointAt(env.pool, BigInt(first) + 1n))!;
    const out = join(dir, 'neighbour.ndjson');
    const report = await exportEvents(env.pool, env.store, { policy: { allowed: {} }, targetLocation: 'eu-west-1', out, after: { transactionId: after.transactionId, position: after.position - 1n }, until, settleWaitMs: 2000 });
    assert.equal(report.events, 5);
  } finally {
    await other.query('ROLLBACK').catch(() => {});
    await other.end();
    await neighbour.drop();
  }
});

test('a balance as of a position or a time waits for a transaction in flight that may still add to it', async () => {
  const { a, late, last } = await rangeWithOneInFlight();
  const cp = (await env.store.checkpointAt(env.pool, BigInt(last)))!;
  await assert.rejects(ledgerBalanceAt(env.pool, a, { checkpoint: cp }, { settleWaitMs: 100 }), RangeNotSettledError);
  const now = (await env.pool.query<{ t: Date }>('SELECT now() AS t')).rows[0]!.t;
  await assert.rejects(ledgerBalanceAt(env.pool, a, { time: now }, { settleWaitMs: 100 }), RangeNotSettledError);
  // A time not yet past is the database's clock: the same wait.
  await assert.rejects(ledgerBalanceAt(env.pool, a, { time: new Date(now.getTime() + 3_600_000) }, { settleWaitMs: 100 }), RangeNotSettledError);
  const [atPosition] = await Promise.all([ledgerBalanceAt(env.pool, a, { checkpoint: cp }), commitSoon(late)]);
  assert.equal(atPosition?.debitsPosted, 65n);
  assert.equal((await ledgerBalanceAt(env.pool, a, { time: now }))?.debitsPosted, 65n);
});

test('a balance as of a time does not change once answered: a transaction that began after the time but holds an older id is waited for', async () => {
  const [a, b] = [randomUUID(), randomUUID()];
  await inTx(env.pool, async (c) => {
    await env.store.append(c, { type: 'ledger.account', id: a }, [opened(a)], { expectedVersion: 'no_stream' });
    await env.store.append(c, { type: 'ledger.account', id: b }, [opened(b)], { expectedVersion: 'no_stream' });
  });
  const early = await env.pool.connect();
  const late = await env.pool.connect();
  try {
    await early.query('BEGIN');
    await early.query('SELECT now()'); // begins before the time, no id yet
    await sleep(50);
    const asOf = (await env.pool.query<{ t: Date }>('SELECT clock_timestamp() AS t')).rows[0]!.t;
    await sleep(50);
    await late.query('BEGIN'); // begins after the time, and takes the older id
    await env.store.append(late, { type: 'ledger.transfer', id: randomUUID() }, [posted(a, b, '7')], { expectedVersion: 'no_stream' });
    await env.store.append(early, { type: 'ledger.transfer', id: randomUUID() }, [posted(a, b, '10')], { expectedVersion: 'no_stream' });
    await early.query('COMMIT');
    // The late transaction sorts before the early one and is recorded after the time: while it
    // is open the answer cannot be given for good.
    await assert.rejects(ledgerBalanceAt(env.pool, a, { time: asOf }, { settleWaitMs: 100 }), RangeNotSettledError);
    const [first] = await Promise.all([ledgerBalanceAt(env.pool, a, { time: asOf }), (async () => {
      await sleep(300);
      await late.query('COMMIT');
    })()]);
    // The cut is the late transfer (recorded after the time, first in the global order): the early one, after it, is out.
    assert.equal(first?.debitsPosted, 0n);
    // A write transaction younger than the cut cannot move it: it is not waited for.
    await early.query('BEGIN');
    await early.query('SELECT pg_current_xact_id()');
    assert.equal((await ledgerBalanceAt(env.pool, a, { time: asOf }, { settleWaitMs: 300 }))?.debitsPosted, 0n);
    await early.query('ROLLBACK');
  } finally {
    early.release();
    late.release();
  }
});

test('a replay from position 1 folds nothing that sorts before it, set-based or not', async () => {
  // A store of its own: the range must start at position 1, whose generation starts at
  // (its transaction, 0), which the set-based fill took for the very start.
  const env = await esTestEnv();
  try {
    await replayFromFirst(env);
  } finally {
    await env.close();
  }
});

async function replayFromFirst(env: EsTestEnv): Promise<void> {
  const [a, b] = [randomUUID(), randomUUID()];
  // The older transaction takes its id first and appends after the newer one: its event has the
  // later position and sorts first.
  const older = await env.pool.connect();
  await older.query('BEGIN');
  await older.query('SELECT pg_current_xact_id()');
  await inTx(env.pool, (c) => env.store.append(c, { type: 'ledger.account', id: a }, [opened(a)], { expectedVersion: 'no_stream' }));
  await env.store.append(older, { type: 'ledger.account', id: b }, [opened(b)], { expectedVersion: 'no_stream' });
  await older.query('COMMIT');
  older.release();
  const position = (await env.pool.query<{ p: string }>('SELECT position::text AS p FROM events.events WHERE stream_id = $1', [a])).rows[0]!.p;
  assert.equal(position, '1');
  await waitFor('both readable', async () => (await env.store.readAll(env.pool, { after: { transactionId: 0n, position: 0n }, limit: 10_000 })).some((e) => e.streamId === a));
  await ensureProjection(env.pool, ledgerBalancesProjection);
  const from = (await env.store.checkpointAt(env.pool, BigInt(position)))!;
  const start = { transactionId: from.transactionId, position: from.position - 1n };
  for (const setBased of [true, false]) {
    const g = await createGeneration(env.pool, ledgerBalancesProjection, start);
    await replayInto(env.pool, env.store, ledgerBalancesProjection, g, { batchSize: 100, setBased });
    const accounts = await env.pool.query<{ id: string }>(`SELECT account_id::text AS id FROM projections.ledger_balances_g${g} WHERE account_id = ANY($1::uuid[])`, [[a, b]]);
    assert.deepEqual(accounts.rows.map((r) => r.id), [a], `setBased ${setBased}`);
    await dropGeneration(env.pool, ledgerBalancesProjection, g);
  }
}

/**
 * The operator CLI: read-only commands never set up (migrate) a database they are pointed at,
 * and a failed replay or rebuild does not leave its generation behind unreported.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { inTransaction as inTx, migrateEvents, type EventStore } from '@ledgerline/events';
import { runCli } from '../src/cli.ts';
import { esTestEnv, type EsTestEnv } from './support.ts';

const acct = (n: number): string => `00000000-0000-7000-8000-${String(n).padStart(12, '0')}`;
const tid = (n: number): string => `20000000-0000-7000-8000-${String(n).padStart(12, '0')}`;

function cli(url: string): { lines: string[]; errs: string[]; io: Parameters<typeof runCli>[1] } {
  const lines: string[] = [];
  const errs: string[] = [];
  return { lines, errs, io: { env: { DATABASE_URL: url }, stdout: (s: string) => { lines.push(s); }, stderr: (s: string) => { errs.push(s); } } };
}

async function schemasOf(url: string): Promise<string[]> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return (await c.query<{ n: string }>(`SELECT nspname AS n FROM pg_namespace WHERE nspname IN ('events', 'projections', 'ledger') ORDER BY 1`)).rows.map((r) => r.n);
  } finally {
    await c.end();
  }
}

async function openAccount(pool: pg.Pool, store: EventStore, id: string): Promise<void> {
  await inTx(pool, (c) => store.append(c, { type: 'ledger.account', id }, [{ type: 'ledger.AccountOpened', data: { id, ledger: 'USD', code: 1, flags: {} } }], { expectedVersion: 'no_stream' }));
}

async function postTransfer(pool: pg.Pool, store: EventStore, id: string, dr: string, cr: string, amount: bigint): Promise<void> {
  await inTx(pool, (c) => store.append(c, { type: 'ledger.transfer', id }, [{
    type: 'ledger.TransferPosted',
    data: { id, debitAccountId: dr, creditAccountId: cr, amount: amount.toString(), pendingId: null, ledger: 'USD', code: 1, flags: {} },
  }], { expectedVersion: 'no_stream' }));
}

async function generations(pool: pg.Pool): Promise<{ generations: number[]; tables: string[] }> {
  const g = await pool.query<{ generation: number }>(`SELECT generation FROM events.projections WHERE name = 'ledger_balances' ORDER BY 1`);
  const t = await pool.query<{ tablename: string }>(`SELECT tablename FROM pg_tables WHERE schemaname = 'projections' ORDER BY 1`);
  return { generations: g.rows.map((r) => r.generation), tables: t.rows.map((r) => r.tablename) };
}

describe('read-only commands on a database that is not set up', () => {
  let empty: TestDatabase;
  let eventsOnly: TestDatabase;
  before(async () => {
    empty = await createTestDatabase('ll_es_cli_empty');
    eventsOnly = await createTestDatabase('ll_es_cli_events');
    await migrateEvents(eventsOnly.url);
  });
  after(async () => { await empty.drop(); await eventsOnly.drop(); });

  test('status, reconcile-ledger and balance-at refuse an empty database and change nothing', async () => {
    const status = cli(empty.url);
    assert.equal(await runCli(['status'], status.io), 1);
    assert.match(status.lines.join('\n'), /ledger_balances: not set up .*no events\.settings/);
    for (const argv of [['reconcile-ledger'], ['balance-at', '--account', acct(1), '--time', new Date().toISOString()]]) {
      const o = cli(empty.url);
      assert.equal(await runCli(argv, o.io), 2, argv[0]);
      assert.match(o.errs.join('\n'), /not set up for event sourcing .*nothing was changed/, argv[0]);
    }
    const drop = cli(empty.url);
    assert.equal(await runCli(['drop-generation', '--generation', '2'], drop.io), 2);
    assert.deepEqual(await schemasOf(empty.url), []);
  });

  test('status on a migrated database without the projection says "not set up" and does not create it', async () => {
    const o = cli(eventsOnly.url);
    assert.equal(await runCli(['status'], o.io), 1);
    assert.deepEqual(o.lines, ['ledger_balances: not set up']);
    const j = cli(eventsOnly.url);
    assert.equal(await runCli(['status', '--json'], j.io), 1);
    assert.deepEqual(JSON.parse(j.lines.join('')), { name: 'ledger_balances', setUp: false });
    assert.deepEqual(await schemasOf(eventsOnly.url), ['events']);
  });
});

describe('a failed replay or rebuild drops its generation and says so', () => {
  let env: EsTestEnv;
  before(async () => { env = await esTestEnv({ ledger: true }); });
  after(async () => { await env.close(); });

  test('replay from a position past the accounts fails; its generation is dropped, even with --keep', async () => {
    await openAccount(env.pool, env.store, acct(1));
    await openAccount(env.pool, env.store, acct(2));
    await postTransfer(env.pool, env.store, tid(1), acct(1), acct(2), 9n);
    const pos = (await env.pool.query<{ p: string }>(`SELECT position::text AS p FROM events.events WHERE stream_type = 'ledger.transfer'`)).rows[0]!.p;
    for (const keep of [[], ['--keep']]) {
      const o = cli(env.db.url);
      assert.equal(await runCli(['replay', '--from-position', pos, ...keep], o.io), 2);
      assert.match(o.errs.join('\n'), /replay failed: its generation \d+ of ledger_balances was dropped/);
      assert.deepEqual(await generations(env.pool), { generations: [1], tables: ['ledger_balances_g1', 'ledger_reservations_g1'] });
    }
  });

  test('a blue/green rebuild that fails drops its generation; the live one stays', async () => {
    await postTransfer(env.pool, env.store, tid(2), acct(9), acct(2), 1n); // account 9 was never opened
    const o = cli(env.db.url);
    assert.equal(await runCli(['rebuild'], o.io), 2);
    assert.match(o.errs.join('\n'), /rebuild failed: its generation \d+ of ledger_balances was dropped/);
    assert.match(o.errs.join('\n'), /which was never opened/);
    assert.deepEqual(await generations(env.pool), { generations: [1], tables: ['ledger_balances_g1', 'ledger_reservations_g1'] });
  });

  test('drop-generation drops a kept generation, and refuses one that does not exist', async () => {
    const kept = cli(env.db.url);
    assert.equal(await runCli(['replay', '--keep', '--json'], kept.io), 2); // the orphan above fails every full replay
    const o = cli(env.db.url);
    await env.pool.query(`DELETE FROM events.events WHERE stream_id = $1`, [tid(2)]);
    assert.equal(await runCli(['replay', '--keep', '--json'], o.io), 0);
    const g = (JSON.parse(o.lines.join('')) as { generation: number }).generation;
    assert.ok((await generations(env.pool)).generations.includes(g));
    const d = cli(env.db.url);
    assert.equal(await runCli(['drop-generation', '--generation', String(g)], d.io), 0);
    assert.deepEqual(await generations(env.pool), { generations: [1], tables: ['ledger_balances_g1', 'ledger_reservations_g1'] });
    const again = cli(env.db.url);
    assert.equal(await runCli(['drop-generation', '--generation', String(g)], again.io), 2);
    assert.match(again.errs.join('\n'), new RegExp(`ledger_balances has no generation ${g}`));
  });
});

describe('bad input and archived events', () => {
  let env: EsTestEnv;
  before(async () => {
    env = await esTestEnv();
    await openAccount(env.pool, env.store, acct(11));
    await openAccount(env.pool, env.store, acct(12));
    await postTransfer(env.pool, env.store, tid(11), acct(11), acct(12), 40n);
  });
  after(async () => { await env.close(); });

  const noStack = (errs: string[]): void => assert.doesNotMatch(errs.join('\n'), /\n\s+at /, 'no stack trace');

  test('balance-at with a time PostgreSQL cannot hold, or not a date-time, is a usage error without a stack', async () => {
    for (const time of ['-271821-04-20T00:00:00Z', 'yesterday']) {
      const o = cli(env.db.url);
      assert.equal(await runCli(['balance-at', '--account', acct(11), `--time=${time}`], o.io), 2);
      assert.match(o.errs.join('\n'), /--time must be /);
      noStack(o.errs);
    }
  });

  test('drop-generation of the active generation is refused without a stack, and nothing is dropped', async () => {
    assert.equal(await runCli(['rebuild'], cli(env.db.url).io), 0);
    const active = (await env.pool.query<{ generation: number }>(`SELECT generation FROM events.projections WHERE name = 'ledger_balances' AND active`)).rows[0]!.generation;
    const o = cli(env.db.url);
    assert.equal(await runCli(['drop-generation', '--generation', String(active)], o.io), 2);
    assert.match(o.errs.join('\n'), new RegExp(`generation ${active} of ledger_balances is active`));
    noStack(o.errs);
    assert.deepEqual((await generations(env.pool)).generations, [active]);
  });

  test('replay with --from-position after --to-position is a usage error, not an empty replay', async () => {
    const ps = (await env.pool.query<{ p: string }>(`SELECT position::text AS p FROM events.events ORDER BY transaction_id, position`)).rows.map((x) => x.p);
    const o = cli(env.db.url);
    assert.equal(await runCli(['replay', '--from-position', ps.at(-1)!, '--to-position', ps[0]!], o.io), 2);
    assert.match(o.errs.join('\n'), /--from-position .* is after --to-position/);
    noStack(o.errs);
  });
  test('a position of an archived event is a position: balance-at and replay take it', async () => {
    const first = (await env.pool.query<{ p: string }>(`SELECT position::text AS p FROM events.events ORDER BY transaction_id, position LIMIT 1`)).rows[0]!.p;
    const last = (await env.pool.query<{ p: string }>(`SELECT position::text AS p FROM events.events ORDER BY transaction_id DESC, position DESC LIMIT 1`)).rows[0]!.p;
    // As retention would leave them (the move itself is tested in retention-guards.test.ts).
    await env.pool.query(`WITH moved AS (DELETE FROM events.events RETURNING *) INSERT INTO events.archived_events SELECT *, now() FROM moved`);
    const o = cli(env.db.url);
    assert.equal(await runCli(['balance-at', '--account', acct(12), '--position', last, '--json'], o.io), 0, o.errs.join('\n'));
    assert.equal((JSON.parse(o.lines.join('')) as { creditsPosted: string }).creditsPosted, '40');
    const r = cli(env.db.url);
    assert.equal(await runCli(['replay', '--from-position', first, '--to-position', last, '--json'], r.io), 0, r.errs.join('\n'));
    assert.equal((JSON.parse(r.lines.join('')) as { events: number }).events, 3);
  });

});

test('run stopped while every batch fails exits 1 and says so (it exited 0)', async () => {
  const env = await esTestEnv();
  try {
    // A transfer between accounts no event opened: the fold refuses it, batch after batch.
    const orphan = { type: 'ledger.TransferPosted', data: { id: randomUUID(), debitAccountId: randomUUID(), creditAccountId: randomUUID(), amount: '1' } };
    await inTx(env.pool, (c) => env.store.append(c, { type: 'ledger.transfer', id: randomUUID() }, [orphan], { expectedVersion: 'no_stream' }));
    const out: string[] = [];
    const err: string[] = [];
    const io = { env: { DATABASE_URL: env.db.url }, stdout: (t: string) => out.push(t), stderr: (t: string) => err.push(t) };
    const failedTwice = (async () => {
      while (err.filter((line) => line.startsWith('[projections] ')).length < 2) await sleep(20);
    })();
    assert.equal(await runCli(['run', '--batch', '10'], { ...io, stopSignal: failedTwice }), 1);
    const stats = JSON.parse(out.at(-1)!) as { batches: number; errors: number; failing: boolean };
    assert.deepEqual([stats.batches, stats.failing], [0, true]);
    assert.ok(stats.errors >= 2);
    assert.match(err.at(-1)!, /stopped while failing: the last batch did not commit/);
  } finally {
    await env.close();
  }
});

/**
 * Concurrency and faults with real processes and a real database:
 * - two engine processes receive overlapping transfers, the same ids at the same moment;
 * - database backends are terminated mid-batch while clients keep submitting;
 * - the connections between the engine and the database are cut (a pooler or the network
 *   failing) while the backends live on and may commit what their client never hears of.
 * Each id must be applied exactly once and the books must balance.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { behindFaultProxy, terminateBackends } from '@ledgerline/testing';
import { LedgerEngine, LedgerUnavailableError, newId, type NewTransfer } from '../src/index.ts';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from './support.ts';

const WORKER = fileURLToPath(new URL('./fixtures/engine-worker.ts', import.meta.url));

let t: LedgerTestDb;
before(async () => {
  t = await ledgerTestDb();
});
after(async () => {
  await t.close();
});

/** A seeded generator, so that a failing run can be reproduced. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = Math.imul(s ^ (s >>> 15), 1 | s);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 2 ** 32;
  };
}

async function openAccounts(engine: LedgerEngine, count: number): Promise<string[]> {
  const ids = Array.from({ length: count }, () => newId());
  const r = await engine.createAccounts(ids.map((id) => ({ id, ledger: 'USD', code: 1 })));
  assert.ok(r.every((x) => x.result === 'ok'));
  return ids;
}

function randomTransfers(random: () => number, accounts: string[], count: number): NewTransfer[] {
  return Array.from({ length: count }, () => {
    const d = Math.floor(random() * accounts.length);
    const c = (d + 1 + Math.floor(random() * (accounts.length - 1))) % accounts.length;
    return { id: newId(), debitAccountId: accounts[d], creditAccountId: accounts[c], amount: BigInt(1 + Math.floor(random() * 1000)), ledger: 'USD', code: 1 };
  });
}

/** `startAt`: a wall-clock time (ms) at which the worker starts submitting; 0 starts at once. */
function runWorker(url: string, transfers: NewTransfer[], startAt = 0): Promise<Array<{ id: string; result: string }>> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [WORKER, url, '16', String(startAt)], { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => {
      out += chunk.toString();
    });
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) {
        reject(new Error(`engine worker exited with ${String(code)}`));
        return;
      }
      resolve(out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as { id: string; result: string }));
    });
    child.stdin.end(transfers.map((x) => JSON.stringify({ ...x, amount: String(x.amount) })).join('\n'));
  });
}

/** What the balances must be if every distinct transfer was applied exactly once. */
function expectedBalances(transfers: NewTransfer[]): Map<string, { debits: bigint; credits: bigint }> {
  const out = new Map<string, { debits: bigint; credits: bigint }>();
  const seen = new Set<string>();
  for (const x of transfers) {
    if (seen.has(x.id)) continue;
    seen.add(x.id);
    const d = out.get(x.debitAccountId as string) ?? { debits: 0n, credits: 0n };
    d.debits += x.amount as bigint;
    out.set(x.debitAccountId as string, d);
    const c = out.get(x.creditAccountId as string) ?? { debits: 0n, credits: 0n };
    c.credits += x.amount as bigint;
    out.set(x.creditAccountId as string, c);
  }
  return out;
}

async function assertAppliedExactlyOnce(transfers: NewTransfer[], accounts: string[], pool: pg.Pool = t.pool): Promise<void> {
  const distinct = [...new Set(transfers.map((x) => x.id))];
  const { rows } = await pool.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM ledger.transfers WHERE id = ANY($1::uuid[]) AND result = 'ok'",
    [distinct],
  );
  assert.equal(rows[0]?.n, distinct.length, 'every distinct transfer is applied once');
  const want = expectedBalances(transfers);
  const engine = new LedgerEngine({ pool, events: t.events });
  const got = await engine.getAccounts(accounts);
  await engine.close();
  for (const a of got) {
    const w = want.get(a.id) ?? { debits: 0n, credits: 0n };
    assert.deepEqual([a.debitsPosted, a.creditsPosted], [w.debits, w.credits], `balances of ${a.id}`);
  }
  await assertInvariants(pool, { events: true });
}

test('two engine processes, overlapping transfers and the same ids at the same moment', async () => {
  const seed = Number(process.env.TEST_SEED ?? Date.now() % 2 ** 31);
  console.log(`[concurrency] seed=${seed} (replay with TEST_SEED=${seed})`);
  const random = prng(seed);
  const engine = new LedgerEngine({ pool: t.pool, events: t.events });
  const accounts = await openAccounts(engine, 20);
  await engine.close();
  const shared = randomTransfers(random, accounts, 1500);
  const onlyA = randomTransfers(random, accounts, 500);
  const onlyB = randomTransfers(random, accounts, 500);
  // Both processes get every shared id, in the same order, so duplicates race head to head.
  const startAt = Date.now() + 2000;
  const [a, b] = await Promise.all([
    runWorker(t.db.url, [...shared, ...onlyA], startAt),
    runWorker(t.db.url, [...shared, ...onlyB], startAt),
  ]);
  const byId = new Map<string, string[]>();
  for (const r of [...a, ...b]) byId.set(r.id, [...(byId.get(r.id) ?? []), r.result]);
  for (const x of shared) {
    assert.deepEqual((byId.get(x.id) ?? []).sort(), ['exists', 'ok'], `shared id ${x.id}: one ok, one exists`);
  }
  for (const x of [...onlyA, ...onlyB]) assert.deepEqual(byId.get(x.id), ['ok']);
  await assertAppliedExactlyOnce([...shared, ...onlyA, ...onlyB], accounts);
});

/**
 * Polls the accounts' applied transfers while writers run. Each poll checks that no transfer
 * appeared with a timestamp at or below an account's largest timestamp seen by an earlier poll:
 * each account's timestamps must increase in commit order. Returns the polls made.
 */
async function watchTimestampOrder(accounts: string[], running: Promise<unknown>): Promise<number> {
  let done = false;
  void running.finally(() => {
    done = true;
  });
  const seen = new Map<string, { maxTs: bigint; ids: Set<string> }>();
  let polls = 0;
  while (!done) {
    const { rows } = await t.pool.query<{ account: string; id: string; ts: string }>(
      `SELECT a.account::text, x.id::text, x.timestamp::text AS ts
         FROM unnest($1::uuid[]) AS a(account)
         JOIN ledger.transfers x ON (x.debit_account_id = a.account OR x.credit_account_id = a.account) AND x.result = 'ok'`,
      [accounts],
    );
    const now = new Map<string, Array<{ id: string; ts: bigint }>>();
    for (const r of rows) now.set(r.account, [...(now.get(r.account) ?? []), { id: r.id, ts: BigInt(r.ts) }]);
    for (const [account, list] of now) {
      const before = seen.get(account);
      if (before !== undefined) {
        const late = list.filter((x) => x.ts <= before.maxTs && !before.ids.has(x.id));
        assert.deepEqual(late, [], `account ${account}: committed behind a timestamp already read (${before.maxTs})`);
      }
      seen.set(account, { maxTs: list.reduce((m, x) => (x.ts > m ? x.ts : m), 0n), ids: new Set(list.map((x) => x.id)) });
    }
    polls += 1;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return polls;
}

test('two engine processes: the same id with different accounts applies once; each account sees its timestamps in commit order', async () => {
  const seed = Number(process.env.TEST_SEED ?? Date.now() % 2 ** 31);
  console.log(`[concurrency] seed=${seed} (replay with TEST_SEED=${seed})`);
  const random = prng(seed);
  const engine = new LedgerEngine({ pool: t.pool, events: t.events });
  const accounts = await openAccounts(engine, 12);
  await engine.close();
  // Given ids that each process receives with its own, disjoint pair of accounts (so the two
  // batches share no lock and meet only in the primary key),
  const left = accounts.slice(0, 6);
  const right = accounts.slice(6);
  const contested = Array.from({ length: 300 }, () => newId());
  const asA = contested.map((id, i) => ({ ...(randomTransfers(random, left, 1)[0] as NewTransfer), id, amount: BigInt(1 + i) }));
  const asB = contested.map((id, i) => ({ ...(randomTransfers(random, right, 1)[0] as NewTransfer), id, amount: BigInt(1 + i) }));
  const plain = randomTransfers(random, accounts, 600);
  // when both run at once, with plain transfers across all accounts beside them, and a reader
  // polls every account's history meanwhile,
  const startAt = Date.now() + 2000;
  const workers = Promise.all([
    runWorker(t.db.url, [...asA, ...plain.slice(0, 300)], startAt),
    runWorker(t.db.url, [...asB, ...plain.slice(300)], startAt),
  ]);
  const polls = await watchTimestampOrder(accounts, workers);
  const [a, b] = await workers;
  assert.ok(polls > 1, `the reader polled ${polls} times`);
  // then each contested id applied exactly once, as one process's version, and the other
  // process was told which field differs;
  const results = new Map<string, string[]>();
  for (const r of [...a, ...b]) results.set(r.id, [...(results.get(r.id) ?? []), r.result]);
  const applied: NewTransfer[] = [...plain];
  const { rows } = await t.pool.query<{ id: string; debit: string }>(
    'SELECT id::text, debit_account_id::text AS debit FROM ledger.transfers WHERE id = ANY($1::uuid[])',
    [contested],
  );
  const winner = new Map(rows.map((r) => [r.id, r.debit]));
  contested.forEach((id, i) => {
    const got = (results.get(id) ?? []).sort();
    assert.equal(got.length, 2, `contested id ${id}: two results`);
    assert.ok(got.includes('ok'), `contested id ${id}: one ok (${got.join(', ')})`);
    assert.ok(got.some((r) => r.startsWith('exists_with_different_')), `contested id ${id}: one refused (${got.join(', ')})`);
    applied.push(winner.get(id) === asA[i]?.debitAccountId ? (asA[i] as NewTransfer) : (asB[i] as NewTransfer));
  });
  // and the books hold exactly the applied transfers.
  await assertAppliedExactlyOnce(applied, accounts);
});

/**
 * 32 clients submit `transfers` one per call while `fault` strikes every `pauseMs()`, each
 * retrying a transient failure (LedgerUnavailableError, nothing decided) with the same id
 * until it is answered `ok` or `exists`; any other answer or error fails the run, which then
 * stops the other clients and the fault. Returns each id's answer, the transient failures
 * retried and the fault's own count (what it struck).
 */
async function submitUnderFault(
  engine: LedgerEngine,
  transfers: NewTransfer[],
  fault: { pauseMs: () => number; strike: () => Promise<number> | number },
): Promise<{ answers: Map<string, string>; unavailable: number; struck: number }> {
  const answers = new Map<string, string>();
  let unavailable = 0;
  let next = 0;
  let done = false;
  const striker = (async () => {
    let struck = 0;
    for (;;) {
      await new Promise((r) => setTimeout(r, fault.pauseMs()));
      if (done) return struck;
      struck += await fault.strike();
    }
  })();
  const client = async (): Promise<void> => {
    while (!done && next < transfers.length) {
      const x = transfers[next++] as NewTransfer;
      for (let attempt = 1; !done; attempt += 1) {
        try {
          const [r] = await engine.createTransfers([x]);
          assert.ok(r?.result === 'ok' || r?.result === 'exists', `unexpected ${r?.result}`);
          answers.set(x.id, r.result);
          break;
        } catch (error) {
          assert.ok(error instanceof LedgerUnavailableError, String(error));
          assert.ok(attempt < 200, 'a transfer never got through');
          unavailable += 1;
          await new Promise((r) => setTimeout(r, 5));
        }
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: 32 }, client));
  } finally {
    done = true;
  }
  return { answers, unavailable, struck: await striker };
}

test('backends terminated mid-batch: clients retry with the same ids, nothing is lost or doubled', async () => {
  const seed = Number(process.env.TEST_SEED ?? (Date.now() + 1) % 2 ** 31);
  console.log(`[terminate] seed=${seed} (replay with TEST_SEED=${seed})`);
  const random = prng(seed);
  const engine = new LedgerEngine({ pool: t.pool, batchAttemptsMax: 2, events: t.events });
  const accounts = await openAccounts(engine, 30);
  const transfers = randomTransfers(random, accounts, 8000);
  let run: Awaited<ReturnType<typeof submitUnderFault>>;
  try {
    run = await submitUnderFault(engine, transfers, { pauseMs: () => 15 + random() * 30, strike: () => terminateBackends(t.db.name) });
  } finally {
    await engine.close();
  }
  const { unavailable, struck: kills } = run;
  console.log(`[terminate] backends terminated=${kills}, transient failures retried=${unavailable}, batch attempts=${engine.stats().batchAttempts}, batches=${engine.stats().batches}`);
  assert.ok(kills > 0, 'the test must actually terminate backends');
  // Check with connections opened after the last kill: an idle client of t.pool may not have
  // seen its backend's termination yet on a loaded machine, and its next query would fail.
  const fresh = new pg.Pool({ connectionString: t.db.url, max: 4 });
  try {
    await assertAppliedExactlyOnce(transfers, accounts, fresh);
  } finally {
    await fresh.end();
  }
});

test('connections cut between the engine and PostgreSQL: a commit the engine never heard of answers exists on the retry; nothing is lost or doubled', async () => {
  const seed = Number(process.env.TEST_SEED ?? (Date.now() + 2) % 2 ** 31);
  console.log(`[cut] seed=${seed} (replay with TEST_SEED=${seed})`);
  const random = prng(seed);
  // Given an engine whose connections go through a TCP proxy that resets them all at once, as
  // a pooler that restarts or a network that fails would: unlike a terminated backend, the
  // backend behind a cut connection lives on, and a COMMIT it had received still commits,
  const { proxy, url } = await behindFaultProxy(t.db.url);
  const pool = new pg.Pool({ connectionString: url, max: 5 });
  pool.on('error', () => {});
  const engine = new LedgerEngine({ pool, batchAttemptsMax: 2, events: t.events });
  const accounts = await openAccounts(engine, 30);
  const transfers = randomTransfers(random, accounts, 6000);
  // when clients keep submitting and retry each transient failure with the same id while the
  // connections are cut every few tens of milliseconds,
  let run: Awaited<ReturnType<typeof submitUnderFault>>;
  try {
    run = await submitUnderFault(engine, transfers, { pauseMs: () => 20 + random() * 40, strike: () => proxy.dropConnections() });
  } finally {
    await engine.close();
    await pool.end();
    await proxy.close();
  }
  const { answers, unavailable, struck: cuts } = run;
  const committedUnheard = [...answers.values()].filter((r) => r === 'exists').length;
  console.log(`[cut] connections cut=${cuts}, transient failures retried=${unavailable}, answered exists on a retry=${committedUnheard}, batches=${engine.stats().batches}`);
  assert.ok(cuts > 0 && unavailable > 0, 'the test must actually cut connections under load');
  // then every transfer was answered (`ok`, or `exists` where an earlier attempt, the engine's
  // or the client's, had applied it without hearing so), and the books hold each exactly once.
  assert.equal(answers.size, transfers.length);
  await assertAppliedExactlyOnce(transfers, accounts);
});

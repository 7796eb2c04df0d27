/**
 * Fault test with a real process: the ledger service is SIGKILLed under load, restarted, and
 * the clients retry every transfer with the same id. Nothing may be lost or applied twice.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { connect } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import { inTransaction, RELAY_LOCK_CLASS } from '@ledgerline/events';
import { SEQUENCER_APPLICATION_NAME } from '@ledgerline/audit';
import { newId } from '@ledgerline/ledger';
import { freePort, overLocalSocket } from '@ledgerline/testing';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';

const MAIN = fileURLToPath(new URL('../src/main.ts', import.meta.url));

// The service's relay publishes to a stream of this test's own, deleted at the end.
const TAG = randomBytes(4).toString('hex');
const EVENTS_ENV = { EVENTS_STREAM: `T_KILL_${TAG}`, EVENTS_SUBJECT_PREFIX: `tkill${TAG}.events` };

let t: LedgerTestDb;
before(async () => {
  t = await ledgerTestDb();
});
after(async () => {
  const nats = await connect({ servers: process.env.NATS_URL ?? 'nats://127.0.0.1:4222' });
  const jsm = await jetstreamManager(nats);
  await jsm.streams.delete(EVENTS_ENV.EVENTS_STREAM).catch(() => false);
  await nats.close();
  await t.close();
});

async function startService(port: number, extraEnv: Record<string, string> = {}): Promise<ChildProcess> {
  const child = spawn(process.execPath, [MAIN], {
    // Crash recovery is under test here, not tokens (services/ledger/test/auth*.test.ts cover those).
    env: { ...process.env, PORT: String(port), DATABASE_URL: t.db.url, LOG_LEVEL: 'warn', DATABASE_POOL_MAX: '6', LEDGER_AUTH: 'disabled', ...EVENTS_ENV, ...extraEnv },
    stdio: ['ignore', extraEnv.LOG_LEVEL === undefined ? 'ignore' : 'pipe', 'inherit'],
  });
  const deadline = Date.now() + 15_000;
  for (;;) {
    assert.equal(child.exitCode, null, 'the service exited during start');
    try {
      const res = await fetch(`http://127.0.0.1:${port}/ready`);
      if (res.status === 200) return child;
    } catch {
      // not listening yet
    }
    assert.ok(Date.now() < deadline, 'the service did not become ready within 15 s');
    await new Promise((r) => setTimeout(r, 50));
  }
}

function killed(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) {
      resolve();
      return;
    }
    child.once('exit', () => {
      resolve();
    });
  });
}

async function openAccounts(port: number, count: number): Promise<string[]> {
  const ids = Array.from({ length: count }, () => newId());
  for (const id of ids) {
    const res = await fetch(`http://127.0.0.1:${port}/v1/accounts`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ id, ledger: 'USD', code: 1 }),
    });
    assert.equal(res.status, 201);
  }
  return ids;
}

interface Body {
  id: string;
  debit_account_id: string;
  credit_account_id: string;
  amount: string;
  ledger: string;
  code: number;
}

async function post(port: number, body: Body): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${port}/v1/transfers`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  await res.arrayBuffer();
  return res.status;
}

test('SIGKILL under load, restart, retry everything with the same ids: exactly once', async () => {
  const port = await freePort();
  let service = await startService(port);
  try {
    const accounts = await openAccounts(port, 25);
    const transfers: Body[] = Array.from({ length: 3000 }, (_, i) => ({
      id: newId(),
      debit_account_id: accounts[i % 25] as string,
      credit_account_id: accounts[(i * 7 + 3) % 25 === i % 25 ? (i + 1) % 25 : (i * 7 + 3) % 25] as string,
      amount: String(1 + (i % 997)),
      ledger: 'USD',
      code: 1,
    }));

    // Phase 1: load, and a SIGKILL once a third of the transfers have answers.
    const answered = new Map<string, number>();
    let next = 0;
    let failures = 0;
    const client = async (): Promise<void> => {
      while (next < transfers.length) {
        const body = transfers[next++] as Body;
        try {
          answered.set(body.id, await post(port, body));
        } catch {
          failures += 1; // the process died under us: the outcome of this one is unknown
        }
      }
    };
    const load = Promise.all(Array.from({ length: 32 }, client));
    while (answered.size < transfers.length / 3) await new Promise((r) => setTimeout(r, 5));
    service.kill('SIGKILL');
    await killed(service);
    await load;
    assert.ok(failures > 0, 'the kill must interrupt requests in flight');
    assert.ok([...answered.values()].every((s) => s === 201), 'before the kill every answer is 201');

    // Phase 2: restart and retry everything, answered or not, with the same ids.
    service = await startService(port);
    const statuses = new Map<number, number>();
    next = 0;
    const retry = async (): Promise<void> => {
      while (next < transfers.length) {
        const body = transfers[next++] as Body;
        const status = await post(port, body);
        statuses.set(status, (statuses.get(status) ?? 0) + 1);
        // 201: first applied now; 200: already applied before the kill (an `exists` replay).
        assert.ok(status === 201 || status === 200, `unexpected status ${status} for ${body.id}`);
        if (answered.get(body.id) === 201) assert.equal(status, 200, 'an acknowledged transfer must replay as exists');
      }
    };
    await Promise.all(Array.from({ length: 32 }, retry));
    console.log(
      `[sigkill] answered before kill=${answered.size}, interrupted=${failures}, retry statuses=${JSON.stringify(Object.fromEntries(statuses))}`,
    );

    // Every transfer applied exactly once: the balances equal the sums of the plan.
    const want = new Map<string, [bigint, bigint]>();
    for (const x of transfers) {
      const d = want.get(x.debit_account_id) ?? [0n, 0n];
      d[0] += BigInt(x.amount);
      want.set(x.debit_account_id, d);
      const c = want.get(x.credit_account_id) ?? [0n, 0n];
      c[1] += BigInt(x.amount);
      want.set(x.credit_account_id, c);
    }
    const { rows } = await t.pool.query<{ id: string; debits_posted: string; credits_posted: string }>(
      'SELECT id::text, debits_posted::text, credits_posted::text FROM ledger.accounts',
    );
    for (const r of rows) {
      assert.deepEqual([BigInt(r.debits_posted), BigInt(r.credits_posted)], want.get(r.id) ?? [0n, 0n], `account ${r.id}`);
    }
    const count = await t.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM ledger.transfers WHERE result = 'ok'");
    assert.equal(count.rows[0]?.n, transfers.length);
    await assertInvariants(t.pool, { events: true });
  } finally {
    service.kill('SIGKILL');
    await killed(service);
  }
});

test('SIGTERM under load: requests in flight finish, queued batches commit, the process exits 0', async () => {
  const port = await freePort();
  // A linger makes every batch wait, so that SIGTERM lands while batches are queued. The
  // request log tells us when the service has received every request.
  const service = await startService(port, { LEDGER_BATCH_LINGER_MS: '100', LOG_LEVEL: 'info' });
  let received = 0;
  service.stdout?.on('data', (chunk: Buffer) => {
    received += chunk.toString().split('\n').filter((l) => l.includes('"incoming request"') && l.includes('/v1/transfers')).length;
  });
  const exited = new Promise<number | null>((resolve) => service.once('exit', (code) => {
    resolve(code);
  }));
  const accounts = await openAccounts(port, 2);
  const bodies: Body[] = Array.from({ length: 64 }, () => ({
    id: newId(),
    debit_account_id: accounts[0] as string,
    credit_account_id: accounts[1] as string,
    amount: '5',
    ledger: 'USD',
    code: 1,
  }));
  // Every request is on the wire before the signal; each must get its answer.
  const inFlight = bodies.map((b) => post(port, b));
  const deadline = Date.now() + 10_000;
  while (received < bodies.length) {
    assert.ok(Date.now() < deadline, `the service received only ${received} of ${bodies.length} requests`);
    await new Promise((r) => setTimeout(r, 2));
  }
  service.kill('SIGTERM');
  const statuses = await Promise.all(inFlight);
  assert.deepEqual(statuses, bodies.map(() => 201), 'every in-flight request completes');
  assert.equal(await exited, 0, 'a graceful shutdown exits 0');
  const { rows } = await t.pool.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM ledger.transfers WHERE id = ANY($1::uuid[]) AND result = 'ok'",
    [bodies.map((b) => b.id)],
  );
  assert.equal(rows[0]?.n, bodies.length, 'every acknowledged transfer is committed');
  await assertInvariants(t.pool, { events: true });
});

test('a bad configuration stops the service at start with a message naming the variable', async () => {
  const child = spawn(process.execPath, [MAIN], {
    env: { ...process.env, PORT: 'abc', LEDGER_BATCH_SIZE_MAX: '0', DATABASE_URL: t.db.url, DATABASE_SESSION_URL: 'mysql://127.0.0.1/test' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const code = await new Promise<number | null>((resolve) => child.once('exit', (c) => {
    resolve(c);
  }));
  assert.equal(code, 2);
  assert.match(stderr, /Invalid configuration/);
  assert.match(stderr, /PORT must be integer \(got "abc"\)/);
  assert.match(stderr, /LEDGER_BATCH_SIZE_MAX must be >= 1/);
  assert.match(stderr, /DATABASE_SESSION_URL/);
});

test('BODY_LIMIT_BYTES from the environment bounds every request body, as the README says', async () => {
  const port = await freePort();
  const service = await startService(port, { BODY_LIMIT_BYTES: '4096', EVENTS_RELAY_ENABLED: 'false' });
  try {
    const account = (pad: number) => JSON.stringify({ id: newId(), ledger: 'USD', code: 1, metadata: { pad: 'x'.repeat(pad) } });
    const before = (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM ledger.accounts')).rows[0]?.n;
    const over = await fetch(`http://127.0.0.1:${port}/v1/accounts`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: account(5000) });
    assert.equal(over.status, 413);
    assert.match(String(over.headers.get('content-type')), /^application\/problem\+json/);
    assert.match(((await over.json()) as { detail: string }).detail, /limit of 4096 bytes/);
    assert.equal((await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM ledger.accounts')).rows[0]?.n, before, 'nothing written');
    // Under the limit the same request is served (its metadata value is only over the ledger's own 256 characters).
    const under = await fetch(`http://127.0.0.1:${port}/v1/accounts`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: account(3000) });
    assert.equal(under.status, 400);
    assert.deepEqual(((await under.json()) as { errors: Array<{ path: string }> }).errors.map((e) => e.path), ['/metadata/pad']);
  } finally {
    service.kill('SIGTERM');
    await killed(service);
  }
});

test('a bad residency setting for the relay stops the service at start, naming the variable', async () => {
  const start = async (extra: Record<string, string>): Promise<{ code: number | null; stderr: string }> => {
    const child = spawn(process.execPath, [MAIN], { env: { ...process.env, DATABASE_URL: t.db.url, ...EVENTS_ENV, ...extra }, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    return { code, stderr };
  };
  const notJson = await start({ EVENTS_RESIDENCY_POLICY: '{eu: eu-west-1}', EVENTS_BROKER_LOCATION: 'us-east-1' });
  assert.equal(notJson.code, 2);
  assert.match(notJson.stderr, /^ledger: Invalid configuration: EVENTS_RESIDENCY_POLICY is not JSON \(got "\{eu: eu-west-1\}"\)$/m);
  const half = await start({ EVENTS_RESIDENCY_POLICY: '{"eu":["eu-west-1"]}' });
  assert.equal(half.code, 2);
  assert.match(half.stderr, /^ledger: Invalid configuration: EVENTS_BROKER_LOCATION is required when EVENTS_RESIDENCY_POLICY is set/m);
});

test('with EVENTS_RESIDENCY_POLICY and EVENTS_BROKER_LOCATION the relay withholds what may not go to its broker', async () => {
  const port = await freePort();
  const service = await startService(port, { EVENTS_RESIDENCY_POLICY: '{"eu":["eu-west-1"]}', EVENTS_BROKER_LOCATION: 'us-east-1' });
  try {
    const [resident, free] = [`resident-${TAG}`, `free-${TAG}`];
    await inTransaction(t.pool, async (c) => {
      await t.events.append(c, { type: 'note', id: resident }, [{ type: 'Noted', data: {} }], { expectedVersion: 'no_stream', region: 'eu' });
      await t.events.append(c, { type: 'note', id: free }, [{ type: 'Noted', data: {} }], { expectedVersion: 'no_stream' });
    });
    const passed = async (id: string): Promise<boolean> => {
      const r = await t.pool.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM events.events e JOIN events.relay_checkpoints c ON c.partition = e.partition
          WHERE e.stream_id = $1 AND (e.transaction_id, e.position) <= (c.transaction_id, c.position)`,
        [id],
      );
      return r.rows[0]?.n === 1;
    };
    const deadline = Date.now() + 15_000;
    while (!((await passed(resident)) && (await passed(free)))) {
      assert.ok(Date.now() < deadline, 'the relay did not get past both events within 15 s');
      await new Promise((r) => setTimeout(r, 50));
    }
    const withheld = await t.pool.query<{ stream_id: string; region: string; location: string }>(
      'SELECT stream_id, region, location FROM events.relay_withheld WHERE stream_id = ANY($1::text[])',
      [[resident, free]],
    );
    assert.deepEqual(withheld.rows, [{ stream_id: resident, region: 'eu', location: 'us-east-1' }]);
    // And the operator sees it counted.
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    assert.match(metrics, /^ledgerline_events_relay_withheld\{[^}]*\} 1$/m);
    assert.match(metrics, /^ledgerline_events_relay_published\{[^}]*\} [1-9]\d*$/m);
    assert.match(metrics, /^ledgerline_audit_sequencer_restarts_total\{[^}]*\} 0$/m, 'the sequencer thread has not died');
    assert.match(metrics, /^ledgerline_audit_tree_mismatches_total\{[^}]*\} 0$/m, 'the stored tree matches its checkpoints');
  } finally {
    service.kill('SIGTERM');
    await killed(service);
  }
});

test('with DATABASE_SESSION_URL the session-bound work runs there and the rest on DATABASE_URL', async () => {
  // Given the service with two ways into one database: DATABASE_URL over TCP, as a transaction
  // pooler would be, and DATABASE_SESSION_URL over the local socket, as a direct connection
  // would be, told apart by their application names and by client_addr (null on the socket),
  const port = await freePort();
  const service = await startService(port, { DATABASE_URL: `${t.db.url}${t.db.url.includes('?') ? '&' : '?'}application_name=ll-pooled`, DATABASE_SESSION_URL: overLocalSocket(t.db.url, 'll-session') });
  try {
    // when the relay holds its partitions and money moves,
    const holders = async (): Promise<Map<string, number>> => {
      const r = await t.pool.query<{ name: string; n: number }>(
        `SELECT a.application_name AS name, count(*)::int AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.objsubid = 2 AND l.granted AND a.datname = current_database() GROUP BY 1`,
        [RELAY_LOCK_CLASS],
      );
      return new Map(r.rows.map((row) => [row.name, row.n]));
    };
    const partitions = t.events.partitions;
    const deadline = Date.now() + 15_000;
    while ((await holders()).get('ll-session') !== partitions) {
      assert.ok(Date.now() < deadline, `the relay did not take its ${partitions} partition locks within 15 s`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const [a, b] = (await openAccounts(port, 2)) as [string, string];
    const res = await fetch(`http://127.0.0.1:${port}/v1/transfers`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ id: newId(), debit_account_id: a, credit_account_id: b, amount: '5', ledger: 'USD', code: 1 }),
    });
    assert.equal(res.status, 201);
    // then the relay's session locks are all held on DATABASE_SESSION_URL's connections, none
    // on DATABASE_URL's, and the requests' work runs on DATABASE_URL's connections.
    assert.deepEqual([...(await holders())], [['ll-session', partitions]]);
    const engine = await t.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'll-pooled'");
    assert.ok((engine.rows[0]?.n ?? 0) >= 1, 'the engine and the requests use DATABASE_URL');
    // The audit sequencer names its connections itself, and they come over the socket.
    const sequencer = await t.pool.query<{ socket: boolean; n: number }>(
      'SELECT client_addr IS NULL AS socket, count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1 GROUP BY 1',
      [SEQUENCER_APPLICATION_NAME],
    );
    assert.deepEqual(sequencer.rows.map((r) => r.socket), [true], 'the audit sequencer uses DATABASE_SESSION_URL');
  } finally {
    service.kill('SIGTERM');
    await killed(service);
  }
});

/**
 * The guards the database keeps on the trail whoever connects (migration
 * 1769100000000_database-guards.sql): payloads removed only when due, retention never
 * shortened under records still owed the longer one, subject keys only wrapped again, holds
 * serialised with expiry and erasure, and the tree growing only at its end. Each attempt here
 * is one the reviewer made succeed on the schema before the migration.
 */
import assert from 'node:assert/strict';
import { afterEach, beforeEach, test } from 'node:test';
import pg from 'pg';
import { inTransaction } from '@ledgerline/events';
import { AUDIT_SEQUENCER_ROLE, AUDIT_WRITER_ROLE, auditLegalHolds, verifyLog } from '../src/index.ts';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

const DAY_MS = 86_400_000;
const WRITER = AUDIT_WRITER_ROLE;
const SEQUENCER = AUDIT_SEQUENCER_ROLE;
/** The requester the governance functions record (migration 1769300000000). */
const BY = JSON.stringify({ actor: { type: 'user', id: 'user:dpo' }, origin: { service: 'guards-test' } });

let t: AuditTestEnv;
beforeEach(async () => {
  t = await auditTestEnv();
});
afterEach(async () => {
  await t.close();
});

/** Runs `sql` in its own transaction, as the schema owner (the test's login), the writer role or the sequencer's role. */
async function run(sql: string, params: unknown[] = [], as: 'owner' | 'writer' | 'sequencer' = 'owner'): Promise<pg.QueryResult> {
  return inTransaction(t.pool, async (c) => {
    if (as !== 'owner') await c.query(`SET LOCAL ROLE ${as === 'writer' ? WRITER : SEQUENCER}`);
    return c.query(sql, params);
  });
}

async function seqOf(resourceId: string): Promise<number> {
  const r = await t.pool.query<{ seq: string }>('SELECT seq::text FROM audit.records WHERE resource_id = $1', [resourceId]);
  assert.equal(r.rows.length, 1, `one record for ${resourceId}`);
  return Number(r.rows[0]?.seq);
}

/** A client with a statement timeout, so a lock that is never released fails the test instead of hanging it. */
async function client(): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: t.db.url, statement_timeout: 20_000 });
  await c.connect();
  return c;
}

/** Waits (at most `ms`) until backend `pid` waits on a lock; false if it never did. */
async function waitsOnLock(pid: number, ms = 3000): Promise<boolean> {
  for (const until = Date.now() + ms; Date.now() < until; ) {
    const r = await t.pool.query<{ w: boolean }>("SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) AS w FROM pg_stat_activity WHERE pid = $1", [pid]);
    if (r.rows[0]?.w === true) return true;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return false;
}

/** Waits (at most `ms`) until `settled()` or some backend waits to insert a hold. */
async function holdSettledOrWaiting(settled: () => boolean, ms = 3000): Promise<void> {
  for (const until = Date.now() + ms; Date.now() < until && !settled(); ) {
    const r = await t.pool.query(
      "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND (query LIKE 'INSERT INTO audit.legal_holds%' OR query LIKE 'SELECT audit.place_hold(%')",
    );
    if (r.rows.length > 0) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Whether an active hold matching `where` is committed (visible to a new statement). */
async function holdCommitted(where: string): Promise<boolean> {
  const r = await t.pool.query<{ n: number }>(`SELECT count(*)::int AS n FROM audit.legal_holds WHERE released_at IS NULL AND ${where}`);
  return (r.rows[0]?.n ?? 0) > 0;
}

/** Which of these accounts' records still have their payload. */
async function payloadsOf(ids: string[]): Promise<string[]> {
  const r = await t.pool.query<{ resource_id: string }>('SELECT r.resource_id FROM audit.payloads p JOIN audit.records r USING (seq) WHERE r.resource_id = ANY($1) ORDER BY 1', [ids]);
  return r.rows.map((x) => x.resource_id);
}

const old = (days: number): Date => new Date(Date.now() - days * DAY_MS);

test('a payload within its retention, or under a legal hold, cannot be deleted, by the owner either; expiry still removes what is due', async () => {
  t.sink.record(entry(1, { recordClass: 'command', resource: { type: 'account', id: 'fresh' }, subject: 'cust-1', personal: { name: 'Ada' } }));
  t.sink.record(entry(2, { recordClass: 'access', resource: { type: 'account', id: 'held' }, occurredAt: old(400) }));
  t.sink.record(entry(3, { recordClass: 'access', resource: { type: 'account', id: 'due' }, occurredAt: old(400) }));
  t.sink.record(entry(4, { recordClass: 'security', resource: { type: 'account', id: 'forever' }, occurredAt: old(4000) }));
  await t.settle();
  await t.store.placeHold({ resource: { type: 'account', id: 'held' } }, 'litigation', REVIEWER);
  await t.store.placeHold({ subject: 'cust-1' }, 'litigation', REVIEWER);

  await assert.rejects(run('DELETE FROM audit.payloads WHERE seq = $1', [await seqOf('fresh')]), /within its retention/);
  await assert.rejects(run('DELETE FROM audit.payloads WHERE seq = $1', [await seqOf('held')]), /legal hold/);
  await assert.rejects(run('DELETE FROM audit.payloads WHERE seq = $1', [await seqOf('forever')]), /kept for ever/);
  // The reviewer's statement: every payload of a held subject, in one DELETE.
  await assert.rejects(run("DELETE FROM audit.payloads p USING audit.records r WHERE r.seq = p.seq AND r.subject = 'cust-1'"));

  assert.equal(await t.store.expirePayloads(new Date(), REVIEWER), 1);
  const left = await t.pool.query<{ resource_id: string }>('SELECT r.resource_id FROM audit.payloads p JOIN audit.records r USING (seq) WHERE r.resource_type = $1 ORDER BY 1', ['account']);
  assert.deepEqual(
    left.rows.map((r) => r.resource_id),
    ['forever', 'fresh', 'held'],
  );
  await t.settle();
  assert.equal((await verifyLog(t.pool, { publicKey: t.signer.publicKey })).ok, true);
});

test('a financial shortening waits until the sequencer has integrated every event the store has numbered (the guard reads no event table)', async () => {
  // An event recorded long ago, past any retention: only its not being integrated refuses.
  const oldEvent = (id: string): Promise<pg.QueryResult> =>
    run(`INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata, recorded_at)
         VALUES (0, gen_random_uuid(), 'ledger.transfer', $1, 1, 'ledger.TransferPosted', '{}', '{}', now() - interval '3000 days')`, [id]);
  const shorten = (days: number): Promise<pg.QueryResult> => run(`UPDATE audit.retention_policies SET retain_days = ${days} WHERE record_class = 'financial'`);
  await oldEvent('old-1');
  await assert.rejects(shorten(10), /cannot be shortened yet: the event store has numbered events up to 1 and the sequencer has integrated up to 0/);
  await t.settle();
  await shorten(2000);
  // A number a rolled-back insert used errs towards refusing, until the next event is integrated.
  await assert.rejects(inTransaction(t.pool, async (c) => {
    await c.query("INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata) VALUES (0, gen_random_uuid(), 'ledger.transfer', 'gone', 1, 'x', '{}', '{}')");
    throw new Error('rolled back');
  }), /rolled back/);
  await assert.rejects(shorten(1000), /cannot be shortened yet: the event store has numbered events up to 2 and the sequencer has integrated up to 1/);
  await oldEvent('old-2');
  await t.settle();
  await shorten(1000);
});

test('retention is never shortened under records still owed the longer one; every change is kept and recorded in the trail', async () => {
  t.sink.record(entry(1, { recordClass: 'financial', resource: { type: 'transfer', id: 't-1' } }));
  t.sink.record(entry(2, { recordClass: 'security', resource: { type: 'key', id: 'k-1' } }));
  t.sink.record(entry(3, { recordClass: 'access', resource: { type: 'account', id: 'a-1' }, occurredAt: old(500) }));
  await t.settle();

  // The reviewer's shortening, and a policy added to a class kept for ever.
  await assert.rejects(run("UPDATE audit.retention_policies SET retain_days = 1 WHERE record_class = 'financial'"), /still owed the longer one/);
  await assert.rejects(run("INSERT INTO audit.retention_policies (record_class, retain_days) VALUES ('security', 30)"), /still owed the longer one/);
  await assert.rejects(run("UPDATE audit.retention_policies SET record_class = 'security' WHERE record_class = 'access'"), /still owed the longer one/);
  await assert.rejects(run('TRUNCATE audit.retention_policies'), /append-only/);
  // Ledger events are records of class financial before the sequencer reaches them too.
  await run("UPDATE audit.retention_policies SET retain_days = 3000 WHERE record_class = 'financial'");

  // Lengthening is always allowed; shortening is, once nothing within the old retention is left
  // (the one access record is 500 days old, past both 366 and 400 days).
  await run("UPDATE audit.retention_policies SET retain_days = 400 WHERE record_class = 'access'");
  await run("UPDATE audit.retention_policies SET retain_days = 366 WHERE record_class = 'access'");
  await run("INSERT INTO audit.retention_policies (record_class, retain_days) VALUES ('telemetry', 30)");
  await run("DELETE FROM audit.retention_policies WHERE record_class = 'telemetry'");

  const history = await t.pool.query<{ record_class: string; retain_days_before: number | null; retain_days_after: number | null }>(
    'SELECT record_class, retain_days_before, retain_days_after FROM audit.retention_policy_changes ORDER BY id',
  );
  assert.deepEqual(
    history.rows.map((h) => [h.record_class, h.retain_days_before, h.retain_days_after]),
    [
      ['access', null, 366],
      ['command', null, 2557],
      ['financial', null, 2557],
      ['financial', 2557, 3000],
      ['access', 366, 400],
      ['access', 400, 366],
      ['telemetry', null, 30],
      ['telemetry', 30, null],
    ],
  );
  await assert.rejects(run('UPDATE audit.retention_policy_changes SET retain_days_after = 1'), /append-only/);
  await assert.rejects(run('DELETE FROM audit.retention_policy_changes'), /append-only/);

  await t.settle();
  const me = (await t.pool.query<{ u: string }>('SELECT current_user AS u')).rows[0]?.u;
  const changes = (await t.store.search({ action: 'audit.retention.change' }, { limit: 10, order: 'asc' }, REVIEWER)).records;
  const change = (recordClass: string, before: number | null, after: number | null): unknown[] => [
    'governance',
    recordClass,
    { changedAs: me, recordClass, retainDaysAfter: after, retainDaysBefore: before },
  ];
  assert.deepEqual(
    changes.map((r) => [r.recordClass, r.resource.id, r.payload]),
    [change('financial', 2557, 3000), change('access', 366, 400), change('access', 400, 366), change('telemetry', null, 30), change('telemetry', 30, null)],
  );
  assert.equal((await verifyLog(t.pool, { publicKey: t.signer.publicKey })).ok, true);
});

test('the sequencer\'s role cannot destroy a subject key by UPDATE: only a re-wrapping under another key-encryption key passes; the writer role may not UPDATE at all', async () => {
  t.sink.record(entry(1, { subject: 'cust-1', personal: { name: 'Alice' } }));
  t.sink.record(entry(2, { subject: 'cust-2', personal: { name: 'Bob' } }));
  await t.settle();
  await t.store.placeHold({ subject: 'cust-1' }, 'litigation', REVIEWER);

  // The reviewer's UPDATE (a new key in clear) under a hold, and the same with the key merely changed.
  await assert.rejects(run("UPDATE audit.subject_keys SET key = sha256(random()::text::bytea), kek_id = NULL WHERE subject = 'cust-1'", [], 'sequencer'), /same key-encryption key/);
  await assert.rejects(run("UPDATE audit.subject_keys SET subject = 'cust-9' WHERE subject = 'cust-1'", [], 'sequencer'));
  const personal = (await t.store.search({ subject: 'cust-1' }, { limit: 10 }, REVIEWER)).records.map((r) => [r.personalState, r.personal]);
  assert.deepEqual(personal, [['present', { name: 'Alice' }]]);

  // A re-wrapping (here a stand-in of the right form: 72 bytes under a named key) passes, and
  // then neither a changed key under that key nor a return to clear does.
  const wrapped = "decode(repeat('ab', 72), 'hex')";
  await run(`UPDATE audit.subject_keys SET key = ${wrapped}, kek_id = 'kek-a' WHERE subject = 'cust-2'`, [], 'sequencer');
  await assert.rejects(run(`UPDATE audit.subject_keys SET key = decode(repeat('cd', 72), 'hex') WHERE subject = 'cust-2'`, [], 'sequencer'), /same key-encryption key/);
  await assert.rejects(run("UPDATE audit.subject_keys SET key = sha256('x'::bytea), kek_id = NULL WHERE subject = 'cust-2'", [], 'sequencer'), /only be wrapped/);
  await assert.rejects(run('TRUNCATE audit.subject_keys'), /append-only/);
  // The application's role holds no UPDATE since migration 1769300000000: not even a re-wrapping.
  await assert.rejects(run(`UPDATE audit.subject_keys SET key = ${wrapped}, kek_id = 'kek-b' WHERE subject = 'cust-1'`, [], 'writer'), /permission denied for table subject_keys/);
});

/** Clients for a race: a statement timeout each, ended whatever happens. */
async function withClients(n: number, fn: (clients: pg.Client[]) => Promise<void>): Promise<void> {
  const clients: pg.Client[] = [];
  try {
    for (let i = 0; i < n; i += 1) clients.push(await client());
    await fn(clients);
  } finally {
    await Promise.all(clients.map((c) => c.end()));
  }
}

async function pidOf(c: pg.Client): Promise<number> {
  return (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid ?? 0;
}

/** Begins a transaction on `c` that inserts a hold and stays open. */
async function holdUncommitted(c: pg.Client, target: string): Promise<void> {
  await c.query('BEGIN');
  await c.query(`SET LOCAL ROLE ${WRITER}`);
  const [column, value] = target.split('=') as [string, string];
  // As the service places one: the writer role may only call audit.place_hold, which queues the
  // hold's record in the same transaction.
  const sql =
    column === 'subject'
      ? "SELECT audit.place_hold(gen_random_uuid(), $1, NULL, NULL, 'litigation', $2::json)"
      : "SELECT audit.place_hold(gen_random_uuid(), NULL, 'account', $1, 'litigation', $2::json)";
  await c.query(sql, [value, BY]);
}

/** The statement's result, or the error it failed with (a race's loser fails; the test then says how). */
const settledAs = <R extends pg.QueryResultRow, T>(p: Promise<pg.QueryResult<R>>, pick: (r: pg.QueryResult<R>) => T): Promise<T | Error> =>
  p.then(pick, (error: unknown) => (error instanceof Error ? error : new Error(String(error))));

test('erase_subject waits for a hold being placed on the subject, and then refuses', async () => {
  t.sink.record(entry(1, { subject: 'cust-1', personal: { name: 'Alice' } }));
  await t.settle();
  await withClients(2, async ([holder, eraser]) => {
    if (holder === undefined || eraser === undefined) throw new Error('no clients');
    await holdUncommitted(holder, 'subject=cust-1');
    await eraser.query(`SET ROLE ${WRITER}`);
    const eraserPid = await pidOf(eraser);
    const erasing = settledAs(eraser.query<{ erased: boolean }>("SELECT audit.erase_subject('cust-1', $1::json) AS erased", [BY]), (r) => r.rows[0]?.erased);
    await waitsOnLock(eraserPid, 1500);
    await holder.query('COMMIT');
    const outcome = await erasing;
    assert.ok(outcome instanceof Error && /legal hold/.test(outcome.message), `erase_subject returned ${String(outcome)} under a hold committed before it checked`);
  });
});

test('a hold placed while erase_subject waits on a row lock waits for the erasure (the reviewer\'s race)', async () => {
  t.sink.record(entry(2, { subject: 'cust-2', personal: { name: 'Bob' } }));
  await t.settle();
  await withClients(2, async ([locker, eraser]) => {
    if (locker === undefined || eraser === undefined) throw new Error('no clients');
    await locker.query('BEGIN');
    await locker.query("SELECT 1 FROM audit.subject_keys WHERE subject = 'cust-2' FOR UPDATE");
    await eraser.query(`SET ROLE ${WRITER}`);
    const eraserPid = await pidOf(eraser);
    const erasing = settledAs(eraser.query<{ erased: boolean }>("SELECT audit.erase_subject('cust-2', $1::json) AS erased", [BY]), (r) => r.rows[0]?.erased);
    assert.ok(await waitsOnLock(eraserPid), 'erase_subject waits on the row lock');
    let settled = false;
    const holding = t.store.placeHold({ subject: 'cust-2' }, 'litigation', REVIEWER).finally(() => {
      settled = true;
    });
    await holdSettledOrWaiting(() => settled);
    // Read on the server while the erasure still waits: the order in which the clients'
    // callbacks run would not say which transaction committed first.
    const heldFirst = await holdCommitted("subject = 'cust-2'");
    await locker.query('COMMIT');
    const [erased] = await Promise.all([erasing, holding]);
    if (heldFirst) assert.ok(erased instanceof Error && /legal hold/.test(erased.message), `a hold committed while erase_subject waited, and it returned ${String(erased)}`);
    else assert.equal(erased, true, 'the erasure came first, and the hold waited for it');
    assert.equal(await holdCommitted("subject = 'cust-2'"), true);
  });
});

test('expire_payloads waits for a hold being placed on a resource, and then keeps its payload', async () => {
  t.sink.record(entry(1, { recordClass: 'access', resource: { type: 'account', id: 'due-1' }, occurredAt: old(400) }));
  t.sink.record(entry(2, { recordClass: 'access', resource: { type: 'account', id: 'due-2' }, occurredAt: old(400) }));
  await t.settle();
  await withClients(2, async ([holder, expirer]) => {
    if (holder === undefined || expirer === undefined) throw new Error('no clients');
    await holdUncommitted(holder, 'resource=due-1');
    await expirer.query(`SET ROLE ${WRITER}`);
    const expirerPid = await pidOf(expirer);
    const expiring = settledAs(expirer.query<{ n: number }>('SELECT audit.expire_payloads(now(), 10, $1::json) AS n', [BY]), (r) => r.rows[0]?.n);
    await waitsOnLock(expirerPid, 1500);
    await holder.query('COMMIT');
    assert.equal(await expiring, 1);
    assert.deepEqual(await payloadsOf(['due-1', 'due-2']), ['due-1'], 'due-1 was held before the expiry checked: kept');
  });
});

test('every SECURITY DEFINER function of the audit schema names pg_temp last in its search_path', async () => {
  // Else PostgreSQL looks in the caller's temporary schema first for type names, where a domain
  // named like a type could run the caller's code as the owner (docs/audit.md, Append-only).
  // Migration 1770000000000 first redefined expire_payloads without it.
  const r = await t.pool.query<{ fn: string; config: string[] | null }>(
    `SELECT p.oid::regprocedure::text AS fn, p.proconfig AS config FROM pg_proc p
      WHERE p.pronamespace = 'audit'::regnamespace AND p.prosecdef ORDER BY 1`,
  );
  assert.ok(r.rows.length >= 9, `the audit schema's SECURITY DEFINER functions: ${r.rows.length}`);
  const unsafe = r.rows.filter((row) => !(row.config ?? []).some((c) => /^search_path=.*, pg_temp$/.test(c)));
  assert.deepEqual(unsafe.map((row) => `${row.fn}: ${JSON.stringify(row.config)}`), []);
});

test('a policy change is dated when its row changed, in its history row as in its record', async () => {
  // The change transaction starts, waits (as one queued behind retention's lock would), then
  // changes the row: both dates are of the change, not of the transaction's start.
  const { started, history, queued } = await inTransaction(t.pool, async (c) => {
    const at = (await c.query<{ now: Date }>('SELECT now()')).rows[0]?.now;
    await c.query('SELECT pg_sleep(0.3)');
    await c.query("UPDATE audit.retention_policies SET retain_days = 800 WHERE record_class = 'access'");
    const h = await c.query<{ effective_from: Date; ms: string }>(
      "SELECT effective_from, to_char(effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS ms FROM audit.retention_policy_changes ORDER BY id DESC LIMIT 1",
    );
    const q = await c.query<{ occurred: string }>("SELECT entry::json ->> 'occurredAt' AS occurred FROM audit.queue WHERE entry LIKE '%\"audit.retention.change\"%' ORDER BY id DESC LIMIT 1");
    return { started: at, history: h.rows[0], queued: q.rows[0]?.occurred };
  });
  assert.ok(started !== undefined && history !== undefined && queued !== undefined);
  assert.ok(history.effective_from.getTime() - started.getTime() >= 250, `effective_from ${history.effective_from.toISOString()} is the change, not the transaction's start ${started.toISOString()}`);
  assert.equal(queued, history.ms, 'the record states the time the history row gives');
});

test('expire_payloads waits for a retention change in flight, and keeps a payload the lengthening reaches', async () => {
  // 400 days old, class access (366 days): due, until a lengthening to 800 days that is made
  // while the expiry runs. Unseen, the payload went under the old policy, and the change's
  // record, dated when its row changed, showed a policy decided before the removal it broke.
  t.sink.record(entry(1, { recordClass: 'access', resource: { type: 'account', id: 'due-1' }, occurredAt: old(400) }));
  await t.settle();
  await withClients(2, async ([changer, expirer]) => {
    if (changer === undefined || expirer === undefined) throw new Error('no clients');
    await changer.query('BEGIN');
    await changer.query("UPDATE audit.retention_policies SET retain_days = 800 WHERE record_class = 'access'");
    await expirer.query(`SET ROLE ${WRITER}`);
    const expirerPid = await pidOf(expirer);
    const expiring = settledAs(expirer.query<{ n: number }>('SELECT audit.expire_payloads(now(), 10, $1::json) AS n', [BY]), (r) => r.rows[0]?.n);
    const waited = await waitsOnLock(expirerPid);
    await changer.query('COMMIT');
    assert.equal(await expiring, 0, 'nothing removed: the lengthening, once committed, reaches the payload');
    assert.ok(waited, 'expire_payloads waited for the change in flight');
    assert.deepEqual(await payloadsOf(['due-1']), ['due-1']);
  });
  // A later expiry, through the store, reads the committed policy too.
  assert.equal(await t.store.expirePayloads(new Date(), REVIEWER), 0);
  assert.deepEqual(await payloadsOf(['due-1']), ['due-1']);
});

test('a hold placed while expire_payloads waits on a row lock waits for the expiry', async () => {
  t.sink.record(entry(2, { recordClass: 'access', resource: { type: 'account', id: 'due-2' }, occurredAt: old(400) }));
  await t.settle();
  await withClients(2, async ([locker, expirer]) => {
    if (locker === undefined || expirer === undefined) throw new Error('no clients');
    await locker.query('BEGIN');
    await locker.query('SELECT 1 FROM audit.payloads WHERE seq = $1 FOR UPDATE', [await seqOf('due-2')]);
    await expirer.query(`SET ROLE ${WRITER}`);
    const expirerPid = await pidOf(expirer);
    const expiring = settledAs(expirer.query<{ n: number }>('SELECT audit.expire_payloads(now(), 10, $1::json) AS n', [BY]), (r) => r.rows[0]?.n);
    assert.ok(await waitsOnLock(expirerPid), 'expire_payloads waits on the row lock');
    let settled = false;
    const holding = t.store.placeHold({ resource: { type: 'account', id: 'due-2' } }, 'litigation', REVIEWER).finally(() => {
      settled = true;
    });
    await holdSettledOrWaiting(() => settled);
    const heldFirst = await holdCommitted("resource_id = 'due-2'");
    await locker.query('COMMIT');
    const [removed] = await Promise.all([expiring, holding]);
    if (heldFirst) assert.deepEqual(await payloadsOf(['due-2']), ['due-2'], `a hold on due-2 committed while expire_payloads waited, and it returned ${String(removed)}`);
    else assert.equal(removed, 1, 'the expiry came first, and the hold waited for it');
  });
});

test('release, erasure and expiry record themselves, whoever calls them; the writer role has no way around the record', async () => {
  t.sink.record(entry(1, { subject: 'cust-1', personal: { name: 'Alice' } }));
  t.sink.record(entry(2, { recordClass: 'access', resource: { type: 'account', id: 'due-1' }, occurredAt: old(400) }));
  await t.settle();
  const hold = await t.store.placeHold({ subject: 'cust-9' }, 'litigation', REVIEWER);
  // A bare SQL session with the writer's rights, not the store: each call queues its record.
  const login = (await t.pool.query<{ u: string }>('SELECT session_user AS u')).rows[0]?.u;
  const asWriter = async (sql: string, params: unknown[]): Promise<unknown> => ((await run(sql, params, 'writer')).rows[0] as { r: unknown } | undefined)?.r;
  assert.equal(await asWriter('SELECT audit.release_hold($1, $2::json) AS r', [hold, BY]), true);
  assert.equal(await asWriter('SELECT audit.release_hold($1, $2::json) AS r', [hold, BY]), false, 'released once');
  assert.equal(await asWriter("SELECT audit.erase_subject('cust-1', $1::json) AS r", [BY]), true);
  assert.equal(await asWriter('SELECT audit.expire_payloads(now(), 10, $1::json) AS r', [BY]), 1);
  assert.equal(await asWriter('SELECT audit.expire_payloads(now(), 10, $1::json) AS r', [BY]), 0, 'nothing left to expire: no record');
  // The versions without a record, the table, and a requester without an actor: refused, nothing done.
  await assert.rejects(run("SELECT audit.erase_subject('cust-1')", [], 'writer'), /permission denied for function erase_subject/);
  await assert.rejects(run('SELECT audit.expire_payloads(now(), 10)', [], 'writer'), /permission denied for function expire_payloads/);
  await assert.rejects(run("UPDATE audit.legal_holds SET released_at = now(), released_by = 'x'", [], 'writer'), /permission denied for table legal_holds/);
  const other = await t.store.placeHold({ subject: 'cust-8' }, 'litigation', REVIEWER);
  await assert.rejects(run('SELECT audit.release_hold($1, $2::json)', [other, JSON.stringify({ origin: { service: 'x' } })], 'writer'), /must name its actor/);
  assert.equal((await t.store.activeHolds()).some((h) => h.id === other), true, 'still held');

  await t.settle();
  const governance = (await t.store.search({ actorId: 'user:dpo' }, { limit: 10 }, REVIEWER)).records;
  const expiry = governance[2]?.payload as { asOf?: string } | undefined;
  assert.match(expiry?.asOf ?? '', /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.ok(Math.abs(Date.parse(expiry?.asOf ?? '') - Date.now()) < 60_000, `asOf ${expiry?.asOf} is the expiry's now()`);
  assert.deepEqual(
    governance.map((r) => [r.action, r.recordClass, r.outcome, r.resource.id, r.origin.service, r.payload]),
    [
      ['audit.hold.release', 'governance', 'success', hold, 'guards-test', { databaseLogin: login }],
      ['audit.subject.erase', 'governance', 'success', 'cust-1', 'guards-test', { databaseLogin: login, keyDestroyed: true }],
      ['audit.retention.expire', 'governance', 'success', 'guards-test', 'guards-test', { asOf: expiry?.asOf, databaseLogin: login, removed: 1 }],
    ],
  );
  assert.equal((await verifyLog(t.pool, { publicKey: t.signer.publicKey })).ok, true);
});

test("event-store retention's hold check waits for a hold being placed on the stream, and then keeps it", async () => {
  const [holder, keeper] = [await client(), await client()];
  try {
    await holder.query('BEGIN');
    await holder.query(`SET LOCAL ROLE ${WRITER}`);
    await holder.query("SELECT audit.place_hold(gen_random_uuid(), NULL, 'ticket', 't-1', 'litigation', $1::json)", [BY]);
    const keeperPid = (await keeper.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid ?? 0;
    await keeper.query('BEGIN');
    await keeper.query(`SET LOCAL ROLE ${WRITER}`);
    const checking = auditLegalHolds().isHeld(keeper, { streamType: 'ticket', streamId: 't-1' }, { action: 'archive', now: new Date() });
    await waitsOnLock(keeperPid, 1500);
    await holder.query('COMMIT');
    assert.equal(await checking, true, 'a hold committed before the stream was removed holds it');
    await keeper.query('ROLLBACK');
  } finally {
    await Promise.all([holder.end(), keeper.end()]);
  }
});

test('a hold is placed with its record: the writer role cannot insert one without it, and a refused record means no hold', async () => {
  await withClients(1, async ([writer]) => {
    if (writer === undefined) throw new Error('no client');
    await writer.query(`SET ROLE ${WRITER}`);
    await assert.rejects(
      writer.query("INSERT INTO audit.legal_holds (id, subject, reason, placed_by) VALUES (gen_random_uuid(), 'cust-direct', 'r', 'user:lee')"),
      /permission denied/,
    );
    await writer.query("SELECT audit.place_hold(gen_random_uuid(), 'cust-fn', NULL, NULL, 'case 21', $1::json)", [BY]);
  });
  const queued = await t.pool.query<{ action: string; payload: string; resource: string }>(
    "SELECT entry::jsonb ->> 'action' AS action, entry::jsonb ->> 'payloadJson' AS payload, entry::jsonb -> 'resource' ->> 'type' AS resource FROM audit.queue WHERE entry::jsonb ->> 'action' = 'audit.hold.place'",
  );
  assert.deepEqual(queued.rows.map((r): unknown[] => [r.action, r.resource, JSON.parse(r.payload) as unknown]), [
    ['audit.hold.place', 'audit.legal_hold', { databaseLogin: 'postgres', reason: 'case 21', resource: null, subject: 'cust-fn' }],
  ]);
  await t.settle();
  const [record] = (await t.store.search({ action: 'audit.hold.place' }, {}, REVIEWER)).records;
  assert.deepEqual([record?.actor.id, record?.recordClass, record?.payload], ['user:dpo', 'governance', { databaseLogin: 'postgres', reason: 'case 21', resource: null, subject: 'cust-fn' }]);
  assert.equal((await verifyLog(t.pool, { publicKey: t.signer.publicKey })).ok, true);
});

test('the sequencer\'s role cannot plant a checkpoint, tree node, record or tile ahead of the log, the writer role none at all; the sequencer goes on signing', async () => {
  for (let i = 0; i < 10; i += 1) t.sink.record(entry(i));
  await t.settle();
  const size = Number((await t.pool.query<{ n: string }>('SELECT audit.leaf_count()::text AS n')).rows[0]?.n);
  assert.equal(size, 10);

  const planted = [
    "INSERT INTO audit.checkpoints VALUES (1000000000, 'x', sha256(''::bytea), now(), 'k', ''::bytea)",
    "INSERT INTO audit.tree_nodes VALUES (6, 0, sha256(''::bytea))",
    'INSERT INTO audit.records SELECT * FROM audit.records WHERE seq = 0',
    'INSERT INTO audit.payloads SELECT * FROM audit.payloads LIMIT 1',
    'INSERT INTO audit.event_leaves SELECT * FROM audit.event_leaves LIMIT 1',
  ];
  for (const sql of planted) await assert.rejects(run(sql, [], 'writer'), /permission denied for table/, sql);
  await assert.rejects(run("INSERT INTO audit.checkpoints VALUES (1000000000, 'x', sha256(''::bytea), now(), 'k', ''::bytea)", [], 'sequencer'), /not of the log's size/);
  await assert.rejects(run("INSERT INTO audit.tree_nodes VALUES (6, 0, sha256(''::bytea))", [], 'sequencer'), /does not have yet/);
  await assert.rejects(
    run(
      `INSERT INTO audit.records (seq, id, occurred_at, record_class, actor_type, actor_id, action, outcome, origin_service, resource_type, resource_id, leaf_hash)
       SELECT 1000000, id, occurred_at, record_class, actor_type, actor_id, action, outcome, origin_service, resource_type, resource_id, leaf_hash FROM audit.records WHERE seq = 0`,
      [],
      'sequencer',
    ),
    /not the next leaves/,
  );
  await assert.rejects(
    run(
      `INSERT INTO audit.event_leaves (first_seq, leaf_count, first_transaction_id, first_position, first_recorded_at, last_recorded_at, positions, leaf_hashes)
       VALUES (1000000, 1, '1', 1, now(), now(), '{1}', sha256(''::bytea))`,
      [],
      'sequencer',
    ),
    /not at the end of the log/,
  );

  for (let i = 0; i < 80; i += 1) t.sink.record(entry(i));
  await t.sink.flush();
  const round = await t.sequencer.round({ forceCheckpoint: true });
  assert.equal(round.records, 80);
  assert.equal(round.checkpoint?.treeSize, 90);
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
});

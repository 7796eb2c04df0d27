/**
 * Verification, search and proofs that may not read the event store (`readEventStore: false`):
 * what the audit CLI does for a login that could alter the log on a database with no event
 * store when it begins, since one created meanwhile would run its owner's code with that
 * login's rights when read. Nothing of the event store is read: here the event store is a view
 * that counts every row read of it (a read trap), and it counts none; the tiles' stored hashes
 * carry the tree, and the report says that their events went unchecked.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { runCli } from '../src/cli.ts';
import { AuditStore, EventStoreUnreadError, verifyLog } from '../src/index.ts';
import { auditTestEnv, entry, REVIEWER, transferTile, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
/** The seq of the first event leaf, and of a record row. */
let eventSeq: number;
let recordSeq: number;

/** Rows read of the event store since the trap was set. */
async function readsOfEventStore(): Promise<number> {
  return Number((await t.pool.query<{ n: string }>('SELECT count(*)::text AS n FROM public.trap_ran')).rows[0]?.n);
}

before(async () => {
  t = await auditTestEnv();
  t.sink.record(entry(1));
  await t.settle();
  await transferTile(t, 'unread');
  t.sink.record(entry(2));
  await t.settle();
  const leaves = await t.pool.query<{ first_seq: string }>('SELECT first_seq::text FROM audit.event_leaves ORDER BY first_seq LIMIT 1');
  eventSeq = Number(leaves.rows[0]?.first_seq);
  recordSeq = Number((await t.pool.query<{ seq: string }>('SELECT min(seq)::text AS seq FROM audit.records')).rows[0]?.seq);
  // Each event store table becomes a view of itself that counts the rows read through it.
  await t.pool.query(`CREATE TABLE public.trap_ran (at timestamptz NOT NULL DEFAULT clock_timestamp());
    CREATE FUNCTION public.trap() RETURNS boolean LANGUAGE sql VOLATILE AS $$ INSERT INTO public.trap_ran DEFAULT VALUES RETURNING true $$;
    ALTER TABLE events.events RENAME TO events_kept;
    CREATE VIEW events.events AS SELECT * FROM events.events_kept WHERE public.trap();
    ALTER TABLE events.archived_events RENAME TO archived_events_kept;
    CREATE VIEW events.archived_events AS SELECT * FROM events.archived_events_kept WHERE public.trap();`);
});

after(async () => {
  await t?.close();
});

test('verification that may not read the event store reads none of it, carries the tree on the stored hashes, and says the events went unchecked', async () => {
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey, readEventStore: false });
  assert.equal(await readsOfEventStore(), 0, 'nothing of the event store was read');
  assert.deepEqual(report.issues.map((i) => [i.kind, i.seq]), [['events_unread', eventSeq]], JSON.stringify(report.issues));
  assert.match(report.issues[0]?.detail ?? '', /does not read the event store \(readEventStore: false\): their stored leaf hashes stand in for them, unchecked/);
  assert.equal(report.ok, false);
  assert.equal(report.records, 4);
  // The premise: read, the same trail verifies, through the trap.
  const read = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(read.ok, true, JSON.stringify(read.issues));
  assert.ok((await readsOfEventStore()) > 0);
  await t.pool.query('TRUNCATE public.trap_ran');
});

test('a store that may not read the event store searches records only, and refuses to prove an event leaf', async () => {
  const unread = new AuditStore({ pool: t.pool, sink: t.sink, service: 'test', readEventStore: false });
  const found = await unread.search({}, { order: 'asc' }, REVIEWER);
  assert.equal(found.records.length, 2);
  assert.ok(found.records.every((r) => r.action !== 'ledger.TransferPosted'), JSON.stringify(found.records.map((r) => r.action)));
  await assert.rejects(unread.inclusionBundle(eventSeq, undefined, REVIEWER), EventStoreUnreadError);
  assert.notEqual(await unread.inclusionBundle(recordSeq, undefined, REVIEWER), null);
  assert.equal(await readsOfEventStore(), 0, 'nothing of the event store was read');
  // The premise: the default store finds and proves the events, reading the event store.
  const events = (await t.store.search({}, { order: 'asc' }, REVIEWER)).records.filter((r) => r.action === 'ledger.TransferPosted');
  assert.equal(events.length, 2);
  assert.notEqual(await t.store.inclusionBundle(eventSeq, undefined, REVIEWER), null);
  assert.ok((await readsOfEventStore()) > 0);
  await t.pool.query('TRUNCATE public.trap_ran');
});

test('the CLI, as a superuser on a database whose event store is gone, reads none of it: verify fails naming what went unchecked, prove refuses an event leaf', async () => {
  await t.pool.query('DROP SCHEMA events CASCADE');
  const run = async (...args: string[]): Promise<{ code: number; out: string; err: string }> => {
    let out = '';
    let err = '';
    const code = await runCli(args, { env: { DATABASE_URL: t.db.url }, stdout: (s) => (out += `${s}\n`), stderr: (s) => (err += `${s}\n`) });
    return { code, out, err };
  };
  const verified = await run('verify');
  assert.equal(verified.code, 1, verified.out + verified.err);
  assert.match(verified.err, /\[verify\] the event store is not read: there is none, and this login could alter the log/);
  assert.match(verified.out, /^FAILED: 4 records/m);
  assert.match(verified.out, new RegExp(`events_unread at seq ${eventSeq}: leaves ${eventSeq}\\.\\.${eventSeq + 1} and every later tile's are events`));
  const proved = await run('prove', '--seq', String(eventSeq), '--as', 'auditor:ann');
  assert.equal(proved.code, 2, proved.out + proved.err);
  assert.match(proved.err, new RegExp(`seq ${eventSeq} is not a record row but an event leaf \\(or nothing\\), and this store does not read the event store: prove it as the event store's owner`));
  assert.equal((await run('prove', '--seq', String(recordSeq), '--as', 'auditor:ann')).code, 0);
});

test('with no tile left but a cursor that moved, verification that may not read the event store still says events went unchecked', async () => {
  // A superuser removes every tile (the event store is already gone, above).
  await t.pool.query('ALTER TABLE audit.event_leaves DISABLE TRIGGER USER; DELETE FROM audit.event_leaves; ALTER TABLE audit.event_leaves ENABLE TRIGGER USER');
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey, readEventStore: false });
  const unread = report.issues.filter((i) => i.kind === 'events_unread');
  assert.deepEqual(unread.map((i) => i.seq), [null], JSON.stringify(report.issues));
  assert.match(unread[0]?.detail ?? '', /^the sequencer's cursor has passed events of the event store, though no tile holds them, and this run does not read the event store/);
  assert.equal(report.ok, false);
});

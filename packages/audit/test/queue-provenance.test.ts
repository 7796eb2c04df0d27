/**
 * Records only the database makes (src/provenance.ts, migration 1770200000000): a retention
 * change, or a successful hold placement, release, erasure or expiry, is integrated only when
 * the role that queued it could be the database's own code. The writer role (the services'
 * login) queueing one itself gets an `audit.entry.rejected` record instead, so a shortening or
 * a release it made up excuses no removal to verification. The tests' login is a superuser,
 * which stands for the schema's owner; the writer is `SET LOCAL ROLE ledgerline_audit_writer`,
 * as the services write. Each test has a database of its own and a clock set in the past.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { AUDIT_WRITER_ROLE } from '../src/migrate.ts';
import { recordedHolds } from '../src/retention-in-force.ts';
import { auditTestEnvPerTest, daysAgo, inTransaction, REVIEWER, testClock, transferTile, verifiedAfter, type AuditTestEnv } from './support.ts';

const clock = testClock();
let t: AuditTestEnv;
auditTestEnvPerTest(clock, (env) => {
  t = env;
});

const AS_WRITER = `SET LOCAL ROLE ${AUDIT_WRITER_ROLE}`;
/** The tests' own login: a superuser, as a deploy job acting as the schema's owner could be. */
const AS_OWNER = 'SET LOCAL application_name = owner';

/** A governance entry as the database's code queues it (the change trigger's form), queued under `setup`. */
async function queueGovernance(setup: string, action: string, outcome: 'success' | 'failure', resource: { type: string; id: string }, payload: object): Promise<void> {
  await inTransaction(
    t.pool,
    setup,
    (c) =>
      c.query(
        `INSERT INTO audit.queue (entry) VALUES (json_build_object(
           'id', gen_random_uuid()::text, 'occurredAt', $1::text, 'recordClass', 'governance',
           'actor', json_build_object('type', 'user', 'id', 'db:postgres'), 'action', $2::text, 'outcome', $3::text,
           ${outcome === 'failure' ? "'reason', 'refused'," : ''}
           'origin', json_build_object('service', 'postgresql'), 'resource', json_build_object('type', $4::text, 'id', $5::text),
           'payloadJson', $6::text, 'personalJson', NULL)::text)`,
        [new Date(clock.ms).toISOString(), action, outcome, resource.type, resource.id, JSON.stringify(payload)],
      ),
    true,
  );
}

/** A shortening of financial retention from seven years to a day, with no change of the stored policy. */
const shortening = (setup: string): Promise<void> =>
  queueGovernance(setup, 'audit.retention.change', 'success', { type: 'audit.retention_policy', id: 'financial' }, { changedAs: 'postgres', recordClass: 'financial', retainDaysAfter: 1, retainDaysBefore: 2557 });

async function records(action: string): Promise<{ outcome: string; reason: string | null; resource_id: string }[]> {
  return (await t.pool.query<{ outcome: string; reason: string | null; resource_id: string }>('SELECT outcome, reason, resource_id FROM audit.records WHERE action = $1 ORDER BY seq', [action])).rows;
}

const verifiedWithout = (position: string) =>
  verifiedAfter(t, async (c) => {
    const r = await c.query('DELETE FROM events.events WHERE position = $1', [position]);
    assert.equal(r.rowCount, 1);
  });

test('a retention shortening the writer role queues is rejected, and the removal it would have excused is reported', async () => {
  clock.ms = daysAgo(20);
  await shortening(AS_WRITER);
  await t.settle();
  assert.deepEqual(await records('audit.retention.change'), [], 'the forged shortening was integrated as a retention change');
  const rejected = await records('audit.entry.rejected');
  assert.equal(rejected.length, 1);
  assert.match(rejected[0]?.reason ?? '', /audit\.retention\.change success is a record only the database's own code queues, and this one was queued by role "ledgerline_audit_writer"/);
  // An event signed ten days ago: with the shortening honoured its day would have run out.
  clock.ms = daysAgo(10);
  const [z] = await transferTile(t, 'z');
  const report = await verifiedWithout(z ?? '');
  assert.equal(report.firstDifference?.kind, 'event_missing', JSON.stringify(report.issues));
});

test('the same shortening queued by the database (the owner or a superuser) is integrated, and the removal verifies', async () => {
  clock.ms = daysAgo(20);
  await shortening(AS_OWNER);
  await t.settle();
  assert.equal((await records('audit.retention.change')).length, 1);
  assert.deepEqual(await records('audit.entry.rejected'), []);
  clock.ms = daysAgo(10);
  const [z] = await transferTile(t, 'z');
  const report = await verifiedWithout(z ?? '');
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

test('a hold release the writer role queues counts neither while it waits nor once integrated; a release through audit.release_hold does', async () => {
  clock.ms = daysAgo(5);
  const forged = await t.store.placeHold({ subject: 'subject-1' }, 'litigation', REVIEWER);
  const kept = await t.store.placeHold({ subject: 'subject-2' }, 'litigation', REVIEWER);
  await t.settle();
  const released = async (): Promise<Map<string, boolean>> => new Map((await recordedHolds(t.pool, () => true)).map((h) => [h.holdId, h.released]));
  await queueGovernance(AS_WRITER, 'audit.hold.release', 'success', { type: 'audit.legal_hold', id: forged }, { databaseLogin: 'postgres' });
  assert.equal((await released()).get(forged), false, 'a forged release waiting in the queue counted');
  await t.settle();
  assert.equal((await released()).get(forged), false, 'a forged release counted once integrated');
  assert.deepEqual(await records('audit.hold.release'), []);
  assert.match((await records('audit.entry.rejected'))[0]?.reason ?? '', /audit\.hold\.release success is a record only the database's own code queues/);
  // The hold is still in force in the database, and the lawful release (the function, run as
  // the writer role by the store) is integrated as it always was.
  assert.equal(await t.store.releaseHold(forged, REVIEWER), true);
  await t.settle();
  assert.deepEqual(await records('audit.hold.release'), [{ outcome: 'success', reason: null, resource_id: forged }]);
  const after = await released();
  assert.equal(after.get(forged), true);
  assert.equal(after.get(kept), false);
});

test("the writer role's own governance failures and other records pass as before; a successful erasure or expiry it queues does not", async () => {
  clock.ms = daysAgo(5);
  await queueGovernance(AS_WRITER, 'audit.hold.release', 'failure', { type: 'audit.legal_hold', id: '0190a0a0-0000-7000-8000-000000000000' }, {});
  await queueGovernance(AS_WRITER, 'audit.subject.erase', 'failure', { type: 'audit.subject', id: 'subject-1' }, {});
  await queueGovernance(AS_WRITER, 'audit.key.transition', 'success', { type: 'audit.signing_key', id: 'k2' }, {});
  await queueGovernance(AS_WRITER, 'audit.subject.erase', 'success', { type: 'audit.subject', id: 'subject-1' }, {});
  await queueGovernance(AS_WRITER, 'audit.retention.expire', 'success', { type: 'audit.log', id: 'test' }, { removed: 1 });
  await queueGovernance(AS_WRITER, 'audit.hold.place', 'success', { type: 'audit.legal_hold', id: '0190a0a0-0000-7000-8000-000000000001' }, { subject: 'subject-3', reason: 'x' });
  await t.settle();
  assert.deepEqual((await records('audit.hold.release')).map((r) => r.outcome), ['failure']);
  assert.deepEqual((await records('audit.subject.erase')).map((r) => r.outcome), ['failure']);
  assert.equal((await records('audit.key.transition')).length, 1);
  assert.deepEqual(await records('audit.retention.expire'), []);
  assert.deepEqual(await records('audit.hold.place'), []);
  const rejected = (await records('audit.entry.rejected')).map((r) => /^(\S+) success is a record only the database's own code queues/.exec(r.reason ?? '')?.[1]);
  assert.deepEqual(rejected, ['audit.subject.erase', 'audit.retention.expire', 'audit.hold.place']);
});

test('the writer role may not say who queued an entry; the queue names the role that did', async () => {
  await assert.rejects(
    inTransaction(t.pool, AS_WRITER, (c) => c.query("INSERT INTO audit.queue (entry, queued_by) VALUES ('{}', 'postgres')"), true),
    (error: { code?: string }) => error.code === '42501',
  );
  // (RETURNING would need SELECT on the queue, which the writer role has not: read back as the owner.)
  await inTransaction(t.pool, AS_WRITER, (c) => c.query("INSERT INTO audit.queue (entry) VALUES ('{}')"), true);
  const by = await t.pool.query<{ by: string; database: boolean }>('SELECT queued_by::text AS by, audit.queued_by_database(queued_by) AS database FROM audit.queue');
  assert.deepEqual(by.rows, [{ by: AUDIT_WRITER_ROLE, database: false }]);
  const owner = await t.pool.query<{ database: boolean; unknown: boolean; missing: boolean }>(
    "SELECT audit.queued_by_database(current_user) AS database, audit.queued_by_database(NULL) AS unknown, audit.queued_by_database('no_such_role') AS missing",
  );
  assert.deepEqual(owner.rows[0], { database: true, unknown: false, missing: false });
});

test('a row queued before roles were recorded is judged as before; one that spells its class with escapes is still the writer\'s', async () => {
  clock.ms = daysAgo(5);
  const hold = await t.store.placeHold({ subject: 'subject-1' }, 'litigation', REVIEWER);
  await t.settle();
  const release = (id: string, recordClass: string): string =>
    `{"id":"${crypto.randomUUID()}","occurredAt":"${new Date(clock.ms).toISOString()}","recordClass":"${recordClass}","actor":{"type":"user","id":"db:postgres"},` +
    `"action":"audit.hold.release","outcome":"success","origin":{"service":"postgresql"},"resource":{"type":"audit.legal_hold","id":"${id}"},"payloadJson":"{}","personalJson":null}`;
  // As an upgrade finds it: the migration left queued_by empty on the rows already there.
  await t.pool.query('INSERT INTO audit.queue (entry, queued_by) VALUES ($1, NULL)', [release(hold, 'governance')]);
  // The writer, naming the class as JSON may (\u0065 is "e"): the lookup skips the row, which then counts as the writer's.
  await inTransaction(t.pool, AS_WRITER, (c) => c.query('INSERT INTO audit.queue (entry) VALUES ($1)', [release(hold, 'gov\\u0065rnance')]), true);
  // Verification counts the older row's release while it waits, as the sequencer will take it.
  assert.equal((await recordedHolds(t.pool, () => true)).find((h) => h.holdId === hold)?.released, true);
  await t.settle();
  assert.deepEqual(await records('audit.hold.release'), [{ outcome: 'success', reason: null, resource_id: hold }]);
  assert.match((await records('audit.entry.rejected'))[0]?.reason ?? '', /audit\.hold\.release success is a record only the database's own code queues, and this one was queued by role "ledgerline_audit_writer"/);
});

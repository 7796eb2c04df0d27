/**
 * Retention of event streams honours the audit trail's legal holds (#4's holds plugged into
 * #5's retention): a stream named by an active hold is neither archived nor deleted, a released
 * hold lets it go, and a hold on a differently named resource applies through `resourceOf`.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { AuditSequencer, auditLegalHolds, loadSigningKey, migrateAudit, verifyLog } from '@ledgerline/audit';
import { applyRetention } from '../src/index.ts';
import { count, esTestEnv, inTx, passReaders, type EsTestEnv } from './support.ts';

let env: EsTestEnv;
before(async () => {
  env = await esTestEnv();
  await migrateAudit(env.db.url);
});
after(async () => {
  await env.close();
});

const DAY_MS = 86_400_000;
const event = { type: 'case.Noted', data: { text: 'kept for the regulator' } };

async function placeHold(resourceType: string, resourceId: string): Promise<string> {
  const r = await env.pool.query<{ id: string }>(
    `INSERT INTO audit.legal_holds (id, resource_type, resource_id, reason, placed_by)
     VALUES (gen_random_uuid(), $1, $2, 'litigation', 'user:compliance') RETURNING id::text`,
    [resourceType, resourceId],
  );
  return (r.rows[0] as { id: string }).id;
}

test('streams under an active audit legal hold are kept; released holds and other resources are not', async () => {
  for (const id of ['c-free', 'c-held', 'c-released']) {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'case', id }, [event], { expectedVersion: 'no_stream' }));
  }
  await placeHold('case', 'c-held');
  const released = await placeHold('case', 'c-released');
  await env.pool.query(`UPDATE audit.legal_holds SET released_at = now(), released_by = 'user:compliance' WHERE id = $1`, [released]);
  // A hold on a subject, or on another resource type with the same id, does not hold the stream.
  await env.pool.query(`INSERT INTO audit.legal_holds (id, subject, reason, placed_by) VALUES (gen_random_uuid(), 'c-free', 'x', 'user:compliance')`);
  await placeHold('account', 'c-free');

  const later = new Date(Date.now() + 400 * DAY_MS);
  await passReaders(env.pool);
  const report = await applyRetention(env.pool, { rules: [{ streamType: 'case', deleteAfterDays: 365 }], holds: auditLegalHolds(), now: later });
  assert.deepEqual(report.deleted.map((s) => s.streamId).sort(), ['c-free', 'c-released']);
  assert.deepEqual(report.held.map((s) => s.streamId), ['c-held']);
  assert.equal(await count(env.pool, `SELECT count(*) FROM events.events WHERE stream_type = 'case'`), 1);
});

test('resourceOf maps a stream to the audit resource its hold names', async () => {
  await inTx(env.pool, (c) => env.store.append(c, { type: 'ledger.account', id: 'a-1' }, [event], { expectedVersion: 'no_stream' }));
  await inTx(env.pool, (c) => env.store.append(c, { type: 'ledger.account', id: 'a-2' }, [event], { expectedVersion: 'no_stream' }));
  await placeHold('account', 'a-1');
  const holds = auditLegalHolds((s) => ({ type: s.streamType.replace(/^ledger\./, ''), id: s.streamId }));
  const later = new Date(Date.now() + 40 * DAY_MS);
  await passReaders(env.pool);
  const report = await applyRetention(env.pool, { rules: [{ streamType: 'ledger.account', archiveAfterDays: 30 }], holds, now: later });
  assert.deepEqual(report.archived.map((s) => s.streamId), ['a-2']);
  assert.deepEqual(report.held.map((s) => s.streamId), ['a-1']);
  // Without the mapping, the hold on account a-1 does not name stream ledger.account/a-1.
  const unmapped = await applyRetention(env.pool, { rules: [{ streamType: 'ledger.account', archiveAfterDays: 30 }], holds: auditLegalHolds(), now: later });
  assert.deepEqual(unmapped.archived.map((s) => s.streamId), ['a-1']);
});

test('once events are leaves of the audit trail, deletion waits until a checkpoint issued the financial retention ago covers them; archiving does not', async () => {
  const signer = loadSigningKey(undefined, { production: false });
  // The sequencer's clock: eight years ago for its first rounds, then today. A checkpoint's
  // signed time says when the trail had taken its leaves.
  let clock = Date.now() - 8 * 365 * DAY_MS;
  const sequencer = new AuditSequencer({ pool: env.pool, signer, origin: 'ledgerline/test', tailEvents: true, checkpointIntervalMs: 0, now: () => new Date(clock) });
  const integrate = async (): Promise<void> => {
    for (let r = await sequencer.round(); r.records > 0; r = await sequencer.round());
  };
  const appendRecordedYearsAgo = async (id: string, years: number): Promise<void> => {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'receipt', id }, [event], { expectedVersion: 'no_stream' }));
    await env.pool.query(`UPDATE events.events SET recorded_at = now() - make_interval(years => $2) WHERE stream_type = 'receipt' AND stream_id = $1`, [id, years]);
  };
  await integrate();
  // r-old: recorded and taken by the trail eight years ago, alone in its tile.
  await appendRecordedYearsAgo('r-old', 8);
  await integrate();
  clock = Date.now();
  // r-backdated: recorded eight years ago, but taken by the trail only today (a store the
  // trail began tailing late): no checkpoint older than today vouches for it.
  await appendRecordedYearsAgo('r-backdated', 8);
  // Alone in its tile: its tile's recorded times are all eight years old.
  await integrate();
  for (const id of ['r-new', 'r-archived']) {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'receipt', id }, [event], { expectedVersion: 'no_stream' }));
  }
  await integrate();
  // r-late is not a leaf yet: deleting it would leave it out of the trail.
  await appendRecordedYearsAgo('r-late', 8);
  assert.ok(await count(env.pool, 'SELECT count(*) FROM audit.event_leaves') > 0);

  // A year on: r-new is a year old, inside the seven years of class financial; r-old's
  // checkpoint is eight years old; r-backdated's is today's.
  const later = new Date(Date.now() + 400 * DAY_MS);
  await passReaders(env.pool);
  const deleted = await applyRetention(env.pool, { rules: [{ streamType: 'receipt', deleteAfterDays: 365 }], holds: auditLegalHolds(), now: later });
  // r-late is not even due: the sequencer, a reader of the events, has not reached it.
  assert.deepEqual(deleted.deleted.map((s) => s.streamId), ['r-old']);
  assert.deepEqual(deleted.held.map((s) => s.streamId).sort(), ['r-archived', 'r-backdated', 'r-new']);
  await integrate();
  // Archiving is not held (archived events still verify), and the trail verifies with r-old gone.
  const archived = await applyRetention(env.pool, { rules: [{ streamType: 'receipt', archiveAfterDays: 365 }], holds: auditLegalHolds(), now: later });
  assert.deepEqual(archived.archived.map((s) => s.streamId).sort(), ['r-archived', 'r-backdated', 'r-late', 'r-new']);
  const report = await verifyLog(env.pool, { publicKey: signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
  // A clock set further ahead does not move the database's own: every checkpoint left is
  // today's, so every stream left is held.
  const far = new Date(Date.now() + 9 * 365 * DAY_MS);
  const next = await applyRetention(env.pool, { rules: [{ streamType: 'receipt', deleteAfterDays: 365 }], holds: auditLegalHolds(), now: far });
  assert.deepEqual(next.deleted, []);
  assert.deepEqual(next.held.map((s) => s.streamId).sort(), ['r-archived', 'r-backdated', 'r-late', 'r-new']);
  // Verification nine years on, by the same signed times, takes r-old's absence for expiry.
  const farReport = await verifyLog(env.pool, { publicKey: signer.publicKey, now: () => far });
  assert.equal(farReport.ok, true, JSON.stringify(farReport.issues));
  await sequencer.close();
});

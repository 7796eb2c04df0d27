/**
 * Queue rows PostgreSQL cannot store (a lone UTF-16 surrogate, a NUL, a year outside
 * 1..9999) once stopped the sequencer for good: each round's insert was refused, rolled back,
 * and the next round read the same row first. Now the checks refuse them at the sink, the
 * sequencer checks them again (other writers fill the queue too), and a row PostgreSQL still
 * refuses is found and recorded as rejected: integration and signing go on after it.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { newUuidV7 } from '@ledgerline/events';
import { checkEntry, InvalidAuditEntryError, verifyLog, type AuditEntry } from '../src/index.ts';
import type { QueuedEntry } from '../src/writer.ts';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv({ withEvents: false });
});
after(async () => {
  await t.close();
});

const LONE_SURROGATE = JSON.parse('"\\ud800"') as string;

/** Writes a queue row as another writer of the queue might, without the sink's checks; returns its queue id. */
async function enqueueRaw(e: AuditEntry, overrides: Partial<QueuedEntry> = {}): Promise<string> {
  const { payload, personal: _personal, occurredAt, ...fields } = e;
  const queued: QueuedEntry = { ...fields, id: newUuidV7(), occurredAt: (occurredAt ?? new Date()).toISOString(), payloadJson: payload === undefined ? null : JSON.stringify(payload), personalJson: null, ...overrides };
  const r = await t.pool.query<{ id: string }>('INSERT INTO audit.queue (entry) VALUES ($1) RETURNING id::text', [JSON.stringify(queued)]);
  return (r.rows[0] as { id: string }).id;
}

async function recordsFrom(seq: number): Promise<{ seq: number; action: string; resource: { type: string; id: string }; reason: string | null; actor: { id: string } }[]> {
  const page = await t.store.search({}, { limit: 1000, order: 'asc', after: seq - 1 }, REVIEWER);
  return page.records.filter((r) => r.action !== 'audit.search');
}

test('the checks refuse what PostgreSQL cannot store: a lone surrogate, NUL, a year outside 1..9999', () => {
  const refused: Partial<AuditEntry>[] = [
    { resource: { type: 'transfer', id: LONE_SURROGATE } },
    { actor: { type: 'user', id: 'u-\udc00x' } },
    { reason: `r\u0000` },
    { occurredAt: new Date('+010000-01-01T00:00:00Z') },
    { occurredAt: new Date('-000001-01-01T00:00:00Z') },
    { occurredAt: new Date('0000-06-01T00:00:00Z') },
    { occurredAt: new Date(Number.NaN) },
  ];
  for (const extra of refused) assert.throws(() => checkEntry(entry(1, extra)), InvalidAuditEntryError, JSON.stringify(extra));
  assert.throws(() => t.sink.record(entry(1, { resource: { type: 'transfer', id: LONE_SURROGATE } })), InvalidAuditEntryError);
  // A pair is text like any other, and the years at both ends are PostgreSQL's.
  for (const extra of [{ resource: { type: 'transfer', id: 'pair \u{1F600}' } }, { occurredAt: new Date('0001-01-01T00:00:00Z') }, { occurredAt: new Date('9999-12-31T23:59:59.999Z') }]) {
    assert.doesNotThrow(() => checkEntry(entry(1, extra)));
  }
});

test('poison queue rows become rejection records; what follows them is integrated and signed', async () => {
  await t.settle();
  const start = (await t.store.latestCheckpoint())?.treeSize ?? 0;
  const poison = new Map<number, string>(); // index in this batch -> queue id
  const good = new Map<number, AuditEntry>();
  const rows: (() => Promise<string>)[] = [
    () => enqueueRaw(entry(0)),
    () => enqueueRaw(entry(1, { resource: { type: 'transfer', id: LONE_SURROGATE } })),
    () => enqueueRaw(entry(2)),
    () => enqueueRaw(entry(3), { occurredAt: '+010000-01-01T00:00:00.000Z' }),
    () => enqueueRaw(entry(4), { occurredAt: '-000001-01-01T00:00:00.000Z' }),
    () => enqueueRaw(entry(5), { occurredAt: '0000-01-01T00:00:00.000Z' }),
    () => enqueueRaw(entry(6, { actor: { type: 'user', id: 'u\u0000' } })),
    () => enqueueRaw(entry(7), { payloadJson: '{"a":"\u0000"}' }),
    () => enqueueRaw(entry(8), { payloadJson: `{"a":"${LONE_SURROGATE}"}` }),
    () => enqueueRaw(entry(9)),
  ];
  for (const [i, row] of rows.entries()) {
    const queueId = await row();
    if ([0, 2, 9].includes(i)) good.set(i, entry(i));
    else poison.set(i, queueId);
  }
  await t.settle();
  assert.equal((await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue')).rows[0]?.n, 0);
  const records = await recordsFrom(start);
  assert.equal(records.length, rows.length);
  for (const [i, queueId] of poison) {
    const r = records[i]!;
    assert.deepEqual({ seq: r.seq, action: r.action, resource: r.resource }, { seq: start + i, action: 'audit.entry.rejected', resource: { type: 'audit.queue', id: queueId } });
  }
  for (const [i, e] of good) assert.deepEqual({ action: records[i]!.action, resource: records[i]!.resource }, { action: e.action, resource: e.resource });
  const cp = await t.store.latestCheckpoint();
  assert.ok(cp !== null && cp.treeSize >= start + rows.length);
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

test('a rejected row\'s record keeps its text but not its personal data, which no subject key would cover', async () => {
  const start = (await t.store.latestCheckpoint())?.treeSize ?? 0;
  const queueId = await enqueueRaw(entry(0, { actor: { type: 'user', id: 'u\u0000' }, subject: 'cust-7' }), { personalJson: '{"ssn":"123-45-6789"}' });
  await t.settle();
  const [r] = (await recordsFrom(start)).filter((x) => x.resource.id === queueId);
  assert.equal(r?.action, 'audit.entry.rejected');
  const kept = (await t.store.search({ resourceType: 'audit.queue', resourceId: queueId }, {}, REVIEWER)).records[0]?.payload as { queued: string };
  assert.ok(!kept.queued.includes('123-45-6789'), kept.queued);
  assert.deepEqual((JSON.parse(kept.queued) as { personalJson: unknown; subject: string }).personalJson, { withheld: 21 });
});

test('a row PostgreSQL still refuses is found in its batch and recorded as rejected; the rest of the batch is integrated', async () => {
  // Stands in for whatever the checks may yet miss: a value the table refuses.
  await t.pool.query("ALTER TABLE audit.records ADD CONSTRAINT test_refused CHECK (resource_id <> 'refused-by-postgres')");
  try {
    await t.settle(); // the searches above are records too
    const start = (await t.store.latestCheckpoint())?.treeSize ?? 0;
    const n = 300;
    const bad = [17, 18, 250];
    for (let i = 0; i < n; i += 1) t.sink.record(entry(i, bad.includes(i) ? { resource: { type: 'transfer', id: 'refused-by-postgres' } } : {}));
    await t.sink.flush();
    const round = await t.sequencer.round();
    assert.equal(round.records, n);
    assert.ok(round.checkpoint !== null && round.checkpoint.treeSize === start + n);
    const records = await recordsFrom(start);
    assert.equal(records.length, n);
    for (const [i, r] of records.entries()) {
      assert.equal(r.seq, start + i);
      if (bad.includes(i)) {
        assert.equal(r.action, 'audit.entry.rejected');
        assert.match(r.reason ?? '', /PostgreSQL refused the entry: .*test_refused/);
      } else {
        assert.deepEqual(r.resource, entry(i).resource);
      }
    }
    const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
    assert.equal(report.ok, true, JSON.stringify(report.issues));
  } finally {
    await t.pool.query('ALTER TABLE audit.records DROP CONSTRAINT test_refused');
  }
});

/**
 * Search against a reference (fast-check): random runs of ledger-like events and queued
 * records, integrated in rounds of random size (so records and tiles interleave, and tiles
 * differ in who acted and whether anything failed), then random filters paged through in both
 * orders with random page sizes. Every page sequence must be exactly what a plain scan of the
 * whole log, filtered in JavaScript, gives: search's shortcuts (tile summaries skipping tiles,
 * the stream index for a named stream, keyset pages over two sources) may never drop, repeat
 * or reorder a record.
 *
 * One log grows across the runs; each run checks the whole log as it stands.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { propertySeed } from '@ledgerline/testing';
import { AuditSequencer, type SearchFilter } from '../src/index.ts';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

const ACTORS = ['user:ann', 'user:bob', 'svc-payments', 'user:"odd"'];
const TYPES = ['ledger.TransferPosted', 'ledger.AccountOpened'];
const STREAMS = ['s-1', 's-2', 's-3', 's-4', 's-5'];

interface LeafView {
  seq: number;
  actor: string;
  action: string;
  outcome: 'success' | 'failure';
  resourceType: string;
  resourceId: string;
  recordClass: string;
}

let t: AuditTestEnv;
let recorded = 0;
const versions = new Map<string, number>();

before(async () => {
  t = await auditTestEnv();
});
after(async () => {
  await t.close();
});

/** Every leaf of the log in sequence order, read plainly: the records, and each tile's events by position. */
async function wholeLog(): Promise<LeafView[]> {
  const records = await t.pool.query<{ seq: string; actor_id: string; action: string; outcome: 'success' | 'failure'; resource_type: string; resource_id: string; record_class: string }>(
    'SELECT seq::text, actor_id, action, outcome, resource_type, resource_id, record_class FROM audit.records',
  );
  const events = await t.pool.query<{ seq: string; actor: string | null; type: string; result: unknown; stream_type: string; stream_id: string }>(
    `SELECT (t.first_seq + u.i - 1)::text AS seq, e.metadata->>'actor' AS actor, e.type, e.data->'result' AS result, e.stream_type, e.stream_id
       FROM audit.event_leaves t CROSS JOIN LATERAL unnest(t.positions) WITH ORDINALITY AS u(position, i)
       JOIN events.events e ON e.position = u.position`,
  );
  const leaves: LeafView[] = [
    ...records.rows.map((r) => ({ seq: Number(r.seq), actor: r.actor_id, action: r.action, outcome: r.outcome, resourceType: r.resource_type, resourceId: r.resource_id, recordClass: r.record_class })),
    ...events.rows.map((e) => ({
      seq: Number(e.seq),
      actor: e.actor ?? 'unknown',
      action: e.type,
      outcome: typeof e.result === 'string' && e.result !== 'ok' ? ('failure' as const) : ('success' as const),
      resourceType: e.stream_type,
      resourceId: e.stream_id,
      recordClass: 'financial',
    })),
  ];
  return leaves.sort((a, b) => a.seq - b.seq);
}

function matches(l: LeafView, f: SearchFilter): boolean {
  return (
    (f.actorId === undefined || l.actor === f.actorId) &&
    (f.action === undefined || l.action === f.action) &&
    (f.outcome === undefined || l.outcome === f.outcome) &&
    (f.resourceType === undefined || l.resourceType === f.resourceType) &&
    (f.resourceId === undefined || l.resourceId === f.resourceId) &&
    (f.recordClass === undefined || l.recordClass === f.recordClass)
  );
}

const eventArb = fc.record({
  actor: fc.option(fc.constantFrom(...ACTORS), { nil: undefined, freq: 6 }),
  type: fc.constantFrom(...TYPES),
  failed: fc.boolean(),
  stream: fc.constantFrom(...STREAMS),
});
const stepArb = fc.record({
  events: fc.array(eventArb, { maxLength: 6 }),
  records: fc.nat({ max: 3 }),
  roundMax: fc.integer({ min: 1, max: 8 }),
});
const filterArb: fc.Arbitrary<SearchFilter> = fc.record(
  {
    actorId: fc.constantFrom(...ACTORS, 'unknown', 'svc-1', 'user:nobody'),
    action: fc.constantFrom(...TYPES, 'ledger.transfer.create'),
    outcome: fc.constantFrom('success' as const, 'failure' as const),
    resourceType: fc.constantFrom('ledger.transfer', 'transfer'),
    resourceId: fc.constantFrom(...STREAMS, 't-1'),
    recordClass: fc.constantFrom('financial', 'command'),
  },
  { requiredKeys: [] },
);

test('property: search pages through exactly what a plain scan of the log filters, in both orders', async () => {
  const seed = propertySeed('audit search against a scan of the whole log');
  await fc.assert(
    fc.asyncProperty(
      fc.array(stepArb, { minLength: 1, maxLength: 4 }),
      fc.array(fc.record({ filter: filterArb, limit: fc.integer({ min: 1, max: 7 }), order: fc.constantFrom('asc' as const, 'desc' as const) }), { minLength: 1, maxLength: 6 }),
      async (steps, queries) => {
        for (const step of steps) {
          const c = await t.pool.connect();
          try {
            await c.query('BEGIN');
            for (const e of step.events) {
              const version = (versions.get(e.stream) ?? 0) + 1;
              versions.set(e.stream, version);
              await t.events.appendMany(c, [{
                streamType: 'ledger.transfer',
                streamId: e.stream,
                version,
                event: {
                  type: e.type,
                  data: { amount: String(version), result: e.failed ? 'exceeds_credits' : 'ok' },
                  metadata: e.actor === undefined ? {} : { actor: e.actor },
                },
              }]);
            }
            await c.query('COMMIT');
          } finally {
            c.release();
          }
          for (let k = 0; k < step.records; k += 1) t.sink.record(entry((recorded += 1)));
          await t.sink.flush();
          const sequencer = new AuditSequencer({ pool: t.pool, signer: t.signer, origin: 'ledgerline/test', tailEvents: true, batchRecordsMax: step.roundMax, checkpointIntervalMs: 0 });
          for (let rounds = 0; (await sequencer.round()).records > 0; rounds += 1) assert.ok(rounds < 1000, 'the sequencer did not finish');
        }
        // Searches are audited into the queue, which no round integrates until the next run:
        // the log stands still while it is read.
        const log = await wholeLog();
        for (const q of queries) {
          const expected = log.filter((l) => matches(l, q.filter)).map((l) => l.seq);
          if (q.order === 'desc') expected.reverse();
          const seen: number[] = [];
          let cursor: number | undefined;
          for (let pages = 0; ; pages += 1) {
            assert.ok(pages <= log.length + 1, 'search keeps paging');
            const page = await t.store.search(q.filter, { limit: q.limit, order: q.order, ...(cursor === undefined ? {} : { after: cursor }) }, REVIEWER);
            seen.push(...page.records.map((r) => r.seq));
            if (page.nextCursor === null) break;
            cursor = page.nextCursor;
          }
          assert.deepEqual(seen, expected, `filter ${JSON.stringify(q.filter)}, ${q.order}, pages of ${q.limit}`);
        }
      },
    ),
    { seed, numRuns: 60 },
  );
  // The runs made tiles with and without failures and with different actors, or the summaries were not exercised.
  const tiles = await t.pool.query<{ n: number; mixed: number }>(
    `SELECT count(*)::int AS n, count(DISTINCT actors)::int AS mixed FROM audit.event_leaves`,
  );
  assert.ok((tiles.rows[0]?.n ?? 0) > 10 && (tiles.rows[0]?.mixed ?? 0) > 3, JSON.stringify(tiles.rows[0]));
});

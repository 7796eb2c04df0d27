/**
 * Full verification of a log whose sequencer keeps running: a round that commits while
 * verification reads is no tampering. Verification reads storage and checkpoints in separate
 * statements; a checkpoint signed after storage was read covers records it never saw, and must
 * not be taken for a truncation of them.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type pg from 'pg';
import { verifyLog } from '../src/index.ts';
import { auditTestEnv, entry, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv({ withEvents: false });
});
after(async () => {
  await t.close();
});

test('a round that commits while verification reads is not reported as records gone', async () => {
  for (let i = 0; i < 7; i += 1) {
    t.sink.record(entry(i));
    await t.settle();
  }
  // The pool as verification sees it, except that the sequencer integrates one more record
  // and signs it just before verification's second look at the checkpoints: by then it has
  // read storage, in one page.
  let pages = 0;
  const racing = {
    query: async (...args: unknown[]): Promise<unknown> => {
      const text = typeof args[0] === 'string' ? args[0] : (args[0] as pg.QueryConfig).text;
      if (text.includes('FROM audit.checkpoints c WHERE c.tree_size > $1')) {
        pages += 1;
        if (pages === 2) {
          t.sink.record(entry(100));
          assert.ok((await t.settle()) >= 1, 'a round integrated a record meanwhile');
        }
      }
      return (t.pool.query as (...a: unknown[]) => Promise<unknown>)(...args);
    },
  } as unknown as pg.Pool;
  const report = await verifyLog(racing, { publicKey: t.signer.publicKey });
  assert.ok(pages >= 2, 'the race was run');
  assert.deepEqual(report.issues, []);
  assert.equal(report.ok, true);
  // And a second verification, with nothing racing it, covers the new record too.
  const again = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(again.ok, true);
  assert.ok(again.records > report.records - 1);
});

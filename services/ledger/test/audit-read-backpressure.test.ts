/**
 * An audit search or inclusion proof whose own record the trail's buffer refuses
 * (AuditBufferFullError, the buffer at its bound) is answered 503 audit-unavailable with
 * Retry-After, its results withheld: never a 500, and never results without their record.
 * (Until 2026-12-07 both answered 500.)
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { AuditBufferFullError, AuditStore, type AuditEntry } from '@ledgerline/audit';
import { buildLedgerService } from '../src/app.ts';
import { auditedLedgerTestDb, type AuditedLedgerFixture } from './support.ts';

let fx: AuditedLedgerFixture;
before(async () => {
  fx = await auditedLedgerTestDb();
});
after(async () => {
  await fx.close();
});

test('a search or a proof whose record the full buffer refuses is answered 503 with Retry-After, results withheld', async () => {
  const refused: AuditEntry[] = [];
  // The store's own sink at its bound: every record it offers is refused.
  const full = {
    record: (e: AuditEntry) => {
      refused.push(e);
      throw new AuditBufferFullError('audit buffer holds its bound; the audit store is not keeping up');
    },
    flush: () => Promise.resolve(),
  };
  const store = new AuditStore({ pool: fx.t.pool, sink: full, service: 'ledger' });
  const app = await buildLedgerService({ engine: fx.engine, pool: fx.t.pool, logger: false, audit: { sink: fx.sink, eventsAudited: true, store: { store, publicKey: fx.signer.publicKey } } });
  try {
    for (const url of ['/v1/audit/records?limit=5', '/v1/audit/records/0/proof']) {
      const res = await app.inject({ method: 'GET', url });
      assert.equal(res.statusCode, 503, `${url}: ${res.body}`);
      assert.equal(res.headers['retry-after'], '1', url);
      const body = res.json<{ type: string; records?: unknown }>();
      assert.match(body.type, /audit-unavailable$/, url);
      assert.equal(body.records, undefined, `${url}: no results without their record`);
    }
    assert.deepEqual(refused.map((e) => e.action).sort(), ['audit.record.prove', 'audit.search', 'audit.search'], 'each read offered its record (a search its success, then its failure)');
  } finally {
    await app.close();
  }
});

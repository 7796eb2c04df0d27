/**
 * Test support for the ledger service: the service on a fresh database, with accounts that bad
 * requests must leave untouched.
 */
import assert from 'node:assert/strict';
import { loadSigningKey, migrateAudit, PostgresAuditSink, type CheckpointSigner } from '@ledgerline/audit';
import { LedgerEngine } from '@ledgerline/ledger';
import type { Service } from '@ledgerline/service-runtime';
import { assertInvariants, ledgerTestDb, type LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { buildLedgerService } from '../src/app.ts';

export interface LedgerServiceFixture {
  t: LedgerTestDb;
  engine: LedgerEngine;
  app: Service;
  /** Closes the service and the engine, asserts the ledger's invariants, and drops the database. */
  close(): Promise<void>;
}

/** The ledger service (auth off) on a fresh database, with a USD account (code 10, no flags) for each of `accountIds`. */
export async function ledgerServiceWithAccounts(accountIds: readonly string[]): Promise<LedgerServiceFixture> {
  const t = await ledgerTestDb();
  const engine = new LedgerEngine({ pool: t.pool });
  const app = await buildLedgerService({ engine, pool: t.pool, logger: false });
  for (const id of accountIds) {
    const r = await app.inject({ method: 'POST', url: '/v1/accounts', payload: { id, ledger: 'USD', code: 10 } });
    assert.equal(r.statusCode, 201, r.body);
  }
  return {
    t,
    engine,
    app,
    close: async () => {
      await app.close();
      await engine.close();
      await assertInvariants(t.pool);
      await t.close();
    },
  };
}

export interface AuditedLedgerFixture {
  t: LedgerTestDb;
  /** The engine, appending its events to the event store (the trail's event leaves). */
  engine: LedgerEngine;
  /** A sink that flushes every millisecond. */
  sink: PostgresAuditSink;
  /** A development signing key, for a sequencer and the service's proofs. */
  signer: CheckpointSigner;
  /** Closes the sink and the engine and drops the database. */
  close(): Promise<void>;
}

/** A fresh database with the event store and the audit schema, for the ledger service with its trail. */
export async function auditedLedgerTestDb(): Promise<AuditedLedgerFixture> {
  const t = await ledgerTestDb();
  await migrateAudit(t.db.url);
  const engine = new LedgerEngine({ pool: t.pool, events: t.events });
  const sink = new PostgresAuditSink({ pool: t.pool, flushIntervalMs: 1 });
  return {
    t,
    engine,
    sink,
    signer: loadSigningKey(undefined, { production: false }),
    close: async () => {
      await sink.close();
      await engine.close();
      await t.close();
    },
  };
}

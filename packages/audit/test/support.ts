/** Test setup for the audit package: a fresh database with the event store and the audit schema. */
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { EventStore, migrateEvents } from '@ledgerline/events';
import { AuditSequencer, AuditStore, loadSigningKey, migrateAudit, PostgresAuditSink, type AuditEntry, type Requester } from '../src/index.ts';

export interface AuditTestEnv {
  db: TestDatabase;
  pool: pg.Pool;
  events: EventStore;
  sink: PostgresAuditSink;
  sequencer: AuditSequencer;
  store: AuditStore;
  signer: ReturnType<typeof loadSigningKey>;
  /** Flushes the sink and runs sequencer rounds until nothing is left; returns records integrated. */
  settle(): Promise<number>;
  close(): Promise<void>;
}

export const REVIEWER: Requester = { actor: { type: 'user', id: 'user:reviewer' }, origin: { service: 'audit-test', ip: '10.0.0.9' } };

export async function auditTestEnv(options: { now?: () => Date; withEvents?: boolean } = {}): Promise<AuditTestEnv> {
  const db = await createTestDatabase('ll_audit');
  await migrateEvents(db.url);
  await migrateAudit(db.url);
  const pool = new pg.Pool({ connectionString: db.url, max: 6 });
  pool.on('error', () => {});
  const events = await EventStore.open(pool);
  const signer = loadSigningKey(undefined, { production: false });
  const sink = new PostgresAuditSink({ pool, flushIntervalMs: 1, ...(options.now === undefined ? {} : { now: options.now }) });
  const sequencer = new AuditSequencer({
    pool,
    signer,
    origin: 'ledgerline/test',
    checkpointIntervalMs: 0,
    ...(options.withEvents === false ? {} : { tailEvents: true }),
    ...(options.now === undefined ? {} : { now: options.now }),
  });
  const store = new AuditStore({ pool, sink, service: 'test' });
  return {
    db,
    pool,
    events,
    sink,
    sequencer,
    store,
    signer,
    settle: async () => {
      let total = 0;
      // A round reads only events older than every transaction running in the cluster (a
      // concurrent sink flush, another test's long transaction), so repeat until the queue is
      // empty and the tail has reached the end; bounded, about a minute.
      for (let attempt = 0; attempt < 6000; attempt += 1) {
        await sink.flush();
        const { records } = await sequencer.round();
        total += records;
        if (records === 0 && (await caughtUp(pool))) return total;
        if (records === 0) await new Promise((resolve) => setTimeout(resolve, 10));
      }
      throw new Error('the sequencer did not catch up');
    },
    close: async () => {
      await sink.close();
      await pool.end();
      await db.drop();
    },
  };
}

async function caughtUp(pool: pg.Pool): Promise<boolean> {
  const r = await pool.query<{ behind: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM audit.queue) OR EXISTS (
       SELECT 1 FROM events.events e, audit.sequencer_state s
        WHERE (e.transaction_id, e.position) > (s.event_transaction_id, s.event_position)) AS behind`,
  );
  return r.rows[0]?.behind === false;
}

/** A plausible entry; `i` varies actor, resource and outcome. */
export function entry(i: number, extra: Partial<AuditEntry> = {}): AuditEntry {
  return {
    recordClass: i % 3 === 0 ? 'access' : 'command',
    actor: { type: 'service', id: `svc-${i % 4}` },
    action: i % 2 === 0 ? 'ledger.transfer.create' : 'ledger.account.read',
    outcome: i % 5 === 0 ? 'failure' : 'success',
    ...(i % 5 === 0 ? { reason: 'exceeds_credits' } : {}),
    origin: { service: 'ledger', ip: '192.0.2.1', requestId: `req-${i}` },
    resource: { type: 'transfer', id: `t-${i % 7}` },
    payload: { i, amount: String(i * 100), nested: { b: 1, a: [1, 2, 'x'] } },
    ...extra,
  };
}

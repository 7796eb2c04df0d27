/** Test setup for the audit package: a fresh database with the event store and the audit schema. */
import { afterEach, beforeEach } from 'node:test';
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { EventStore, migrateEvents } from '@ledgerline/events';
import { AuditSequencer, AuditStore, loadSigningKey, migrateAudit, PostgresAuditSink, verifyLog, type AuditEntry, type Requester, type VerifyReport } from '../src/index.ts';

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
    settle: () => drain({ sink, pool }, sequencer),
    close: async () => {
      await sink.close();
      await pool.end();
      await db.drop();
    },
  };
}

/**
 * Flushes the sink and runs rounds of `sequencer` until nothing is left; returns records
 * integrated. A round reads only events older than every transaction running in the cluster (a
 * concurrent sink flush, another test's long transaction), so repeat until the queue is empty
 * and the tail has reached the end; bounded, about a minute.
 */
export async function drain(t: Pick<AuditTestEnv, 'sink' | 'pool'>, sequencer: AuditSequencer): Promise<number> {
  let total = 0;
  for (let attempt = 0; attempt < 6000; attempt += 1) {
    await t.sink.flush();
    const { records } = await sequencer.round();
    total += records;
    if (records === 0 && (await caughtUp(t.pool))) return total;
    if (records === 0) await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error('the sequencer did not catch up');
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

export const DAY = 86_400_000;

/** `days` before the real time, in ms since the epoch. */
export const daysAgo = (days: number): number => Date.now() - days * DAY;

/** A clock a test sets (`ms`, since the epoch), for the sink and the sequencer. */
export interface TestClock {
  ms: number;
  now: () => Date;
}

export function testClock(): TestClock {
  const clock: TestClock = { ms: 0, now: () => new Date(clock.ms) };
  return clock;
}

/**
 * Registers hooks giving each test of the file an environment of its own (passed to `use`),
 * whose sink and sequencer read `clock`, set `startDaysAgo` days back before the environment
 * is made; closed after the test.
 */
export function auditTestEnvPerTest(clock: TestClock, use: (env: AuditTestEnv) => void, startDaysAgo = 3000): void {
  let env: AuditTestEnv;
  beforeEach(async () => {
    clock.ms = daysAgo(startDaysAgo);
    env = await auditTestEnv({ now: clock.now });
    use(env);
  });
  afterEach(async () => {
    await env.close();
  });
}

/** One tile of two `ledger.transfer` events, integrated and signed (at `t`'s clock's time); returns their positions. */
export async function transferTile(t: AuditTestEnv, name: string): Promise<string[]> {
  for (let j = 0; j < 2; j += 1) {
    const id = `${name}-${j}`;
    await t.events.append(t.pool, { type: 'ledger.transfer', id }, [{ type: 'ledger.TransferPosted', data: { id, result: 'ok' }, metadata: { actor: 'user:u' } }], { expectedVersion: 'no_stream' });
  }
  await t.settle();
  const r = await t.pool.query<{ position: string }>("SELECT position::text FROM events.events WHERE stream_id LIKE $1 || '-%' ORDER BY position", [name]);
  return r.rows.map((row) => row.position);
}

/**
 * Runs `fn` in a transaction on `pool`, after `setup` (a `SET LOCAL`); commits it if `commit`,
 * else rolls it back; rolls it back if anything throws.
 */
export async function inTransaction<T>(pool: pg.Pool, setup: string, fn: (c: pg.PoolClient) => Promise<T>, commit: boolean): Promise<T> {
  const c = await pool.connect();
  try {
    await c.query('BEGIN');
    await c.query(setup);
    const r = await fn(c);
    await c.query(commit ? 'COMMIT' : 'ROLLBACK');
    return r;
  } catch (error) {
    await c.query('ROLLBACK');
    throw error;
  } finally {
    c.release();
  }
}

/**
 * Verification at `now` (default: the real time) of the log as a transaction sees it after
 * `tamper` ran in it as a superuser with triggers off; the transaction is rolled back after.
 */
export const verifiedAfter = (t: AuditTestEnv, tamper: (c: pg.PoolClient) => Promise<unknown>, now: () => Date = () => new Date()): Promise<VerifyReport> =>
  inTransaction(
    t.pool,
    'SET LOCAL session_replication_role = replica',
    async (c) => {
      await tamper(c);
      return await verifyLog(c, { publicKey: t.signer.publicKey, now });
    },
    false,
  );

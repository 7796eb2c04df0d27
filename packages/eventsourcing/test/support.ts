/** Test setup for event sourcing: a fresh database with the events (and ledger) schemas. */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { EventStore, migrateEvents, type StoreResidency } from '@ledgerline/events';
import { migrateLedger } from '@ledgerline/ledger';

export interface EsTestEnv {
  db: TestDatabase;
  pool: pg.Pool;
  store: EventStore;
  close(): Promise<void>;
}

export async function esTestEnv(options: { ledger?: boolean; residency?: StoreResidency } = {}): Promise<EsTestEnv> {
  const db = await createTestDatabase('ll_es');
  await migrateEvents(db.url);
  if (options.ledger === true) await migrateLedger(db.url);
  const pool = new pg.Pool({ connectionString: db.url, max: 6 });
  pool.on('error', () => {});
  const store = await EventStore.open(pool, options.residency === undefined ? {} : { residency: options.residency });
  return {
    db,
    pool,
    store,
    close: async () => {
      await pool.end();
      await db.drop();
    },
  };
}

/** Runs `fn` in a transaction of its own: commit on success, roll back on error. */
export { inTransaction as inTx } from '@ledgerline/events';

/**
 * Polls until `check` holds; fails after `timeoutMs`. The read horizon (readHorizon) waits for
 * this database's open transactions, so readers can be held back for a while.
 */
export async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const started = Date.now();
  while (!(await check())) {
    assert.ok(Date.now() - started < timeoutMs, `timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

export async function count(pool: pg.Pool, sql: string, params: unknown[] = []): Promise<number> {
  const r = await pool.query<{ n: number }>(`SELECT (${sql})::int AS n`, params);
  return r.rows[0]?.n ?? 0;
}

/**
 * Moves the relay's checkpoint (every partition) and every active projection's past every
 * event so far, as if they had caught up: retention removes only what every reader has passed.
 */
export async function passReaders(pool: pg.Pool): Promise<void> {
  await pool.query(
    `WITH last AS (SELECT transaction_id, position FROM events.events ORDER BY transaction_id DESC, position DESC LIMIT 1),
          relay AS (
            INSERT INTO events.relay_checkpoints (partition, transaction_id, position)
            SELECT p, last.transaction_id, last.position FROM generate_series(0, (SELECT partitions - 1 FROM events.settings)) p, last
            ON CONFLICT (partition) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, position = EXCLUDED.position)
     UPDATE events.projections g SET transaction_id = last.transaction_id, position = last.position FROM last WHERE g.active`,
  );
}

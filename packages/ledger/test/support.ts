/** Shared test setup for the ledger: a fresh migrated database and the invariant checks. */
import assert from 'node:assert/strict';
import pg from 'pg';
import { guardPool } from '@ledgerline/service-runtime';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { EventStore, migrateEvents } from '@ledgerline/events';
import { migrateLedger } from '../src/index.ts';

export interface LedgerTestDb {
  db: TestDatabase;
  pool: pg.Pool;
  events: EventStore;
  close(): Promise<void>;
}

export async function ledgerTestDb(poolMax = 6): Promise<LedgerTestDb> {
  const db = await createTestDatabase('ll_ledger');
  await migrateLedger(db.url);
  await migrateEvents(db.url);
  const pool = new pg.Pool({ connectionString: db.url, max: poolMax });
  // A terminated backend surfaces as an 'error' event on its client; the engine handles the
  // failed query itself, so the event must not crash the test process (see guardPool).
  guardPool(pool, () => {});
  return {
    db,
    pool,
    events: await EventStore.open(pool),
    close: async () => {
      await pool.end();
      await db.drop();
    },
  };
}

export async function resetLedger(pool: pg.Pool): Promise<void> {
  await pool.query('TRUNCATE ledger.transfers, ledger.accounts, events.events');
  await pool.query("SELECT setval('ledger.timestamps', 0)");
}

/**
 * The ledger's invariants, checked from the stored rows alone:
 * - per ledger, total debits equal total credits (posted and pending);
 * - every account's balances equal the sums of its transfers;
 * - no flag constraint is violated;
 * - timestamps are unique, and every applied transfer stays within one ledger.
 */
export async function assertInvariants(pool: pg.Pool, options: { events?: boolean } = {}): Promise<void> {
  const unbalanced = await pool.query(`
    SELECT ledger, sum(debits_posted) AS dpo, sum(credits_posted) AS cpo,
           sum(debits_pending) AS dp, sum(credits_pending) AS cp
      FROM ledger.accounts GROUP BY ledger
    HAVING sum(debits_posted) <> sum(credits_posted) OR sum(debits_pending) <> sum(credits_pending)`);
  assert.deepEqual(unbalanced.rows, [], 'total debits must equal total credits in every ledger');

  const drift = await pool.query(`
    SELECT a.id, a.debits_posted, s.dpo, a.credits_posted, s.cpo, a.debits_pending, s.dp, a.credits_pending, s.cp
      FROM ledger.accounts a
      CROSS JOIN LATERAL (
        SELECT coalesce(sum(t.amount) FILTER (WHERE t.debit_account_id = a.id AND t.flags & 10 = 0), 0) AS dpo,
               coalesce(sum(t.amount) FILTER (WHERE t.credit_account_id = a.id AND t.flags & 10 = 0), 0) AS cpo,
               coalesce(sum(t.amount) FILTER (WHERE t.debit_account_id = a.id AND t.pending_status = 'pending'), 0) AS dp,
               coalesce(sum(t.amount) FILTER (WHERE t.credit_account_id = a.id AND t.pending_status = 'pending'), 0) AS cp
          FROM ledger.transfers t
         WHERE t.result = 'ok' AND (t.debit_account_id = a.id OR t.credit_account_id = a.id)) s
     WHERE a.debits_posted <> s.dpo OR a.credits_posted <> s.cpo
        OR a.debits_pending <> s.dp OR a.credits_pending <> s.cp`);
  assert.deepEqual(drift.rows, [], "every account's balances must equal the sum of its transfers");

  const flags = await pool.query(`
    SELECT id FROM ledger.accounts
     WHERE (flags & 2 <> 0 AND debits_pending + debits_posted > credits_posted)
        OR (flags & 4 <> 0 AND credits_pending + credits_posted > debits_posted)`);
  assert.deepEqual(flags.rows, [], 'no flag constraint may be violated');

  const stamps = await pool.query(`
    SELECT (SELECT count(*) FROM ledger.transfers) - (SELECT count(DISTINCT timestamp) FROM ledger.transfers) AS dup_transfers,
           (SELECT count(*) FROM ledger.transfers t JOIN ledger.accounts a ON a.timestamp = t.timestamp) AS shared`);
  assert.deepEqual(stamps.rows[0], { dup_transfers: '0', shared: '0' }, 'timestamps must be unique');

  const crossLedger = await pool.query(`
    SELECT t.id FROM ledger.transfers t
      JOIN ledger.accounts d ON d.id = t.debit_account_id
      JOIN ledger.accounts c ON c.id = t.credit_account_id
     WHERE t.result = 'ok' AND (d.ledger <> t.ledger OR c.ledger <> t.ledger)`);
  assert.deepEqual(crossLedger.rows, [], 'an applied transfer must stay within one ledger');

  if (options.events === true) await assertEventsMatchState(pool);
}

/**
 * The events describe the state exactly: one creation event per account and per stored
 * transfer, of the right type, and one expiry event per expired pending transfer. Nothing
 * more, nothing less, and each in the same transaction as its row (checked by count, since
 * a rolled-back batch leaves neither).
 */
async function assertEventsMatchState(pool: pg.Pool): Promise<void> {
  const missing = await pool.query(`
    SELECT t.id, t.result FROM ledger.transfers t
     WHERE NOT EXISTS (
       SELECT 1 FROM events.events e
        WHERE e.stream_type = 'ledger.transfer' AND e.stream_id = t.id::text AND e.version = 1
          AND e.type = CASE WHEN t.result <> 'ok' THEN 'ledger.TransferRejected'
                            WHEN t.flags & 4 <> 0 THEN 'ledger.PendingTransferPosted'
                            WHEN t.flags & 8 <> 0 THEN 'ledger.PendingTransferVoided'
                            WHEN t.flags & 2 <> 0 THEN 'ledger.TransferPending'
                            ELSE 'ledger.TransferPosted' END
          AND (e.data->>'amount')::numeric = t.amount)`);
  assert.deepEqual(missing.rows, [], 'every stored transfer has its event');
  const expired = await pool.query(`
    SELECT t.id FROM ledger.transfers t
     WHERE t.pending_status = 'expired' AND NOT EXISTS (
       SELECT 1 FROM events.events e WHERE e.stream_type = 'ledger.transfer' AND e.stream_id = t.id::text
          AND e.version = 2 AND e.type = 'ledger.PendingTransferExpired')`);
  assert.deepEqual(expired.rows, [], 'every expiry has its event');
  const counts = await pool.query<{ events: number; transfers: number; expired: number; accounts: number; opened: number }>(`
    SELECT (SELECT count(*) FROM events.events WHERE stream_type = 'ledger.transfer')::int AS events,
           (SELECT count(*) FROM ledger.transfers)::int AS transfers,
           (SELECT count(*) FROM ledger.transfers WHERE pending_status = 'expired')::int AS expired,
           (SELECT count(*) FROM ledger.accounts)::int AS accounts,
           (SELECT count(*) FROM events.events WHERE stream_type = 'ledger.account')::int AS opened`);
  const c = counts.rows[0];
  assert.ok(c !== undefined);
  assert.equal(c.events, c.transfers + c.expired, 'no transfer event without its row');
  assert.equal(c.opened, c.accounts, 'one AccountOpened per account');
}

/**
 * guardPool against a real database: a backend terminated under a checked-out client that
 * its holder never gave an 'error' listener is reported, not thrown at the process.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { createTestDatabase, terminateBackends, type TestDatabase } from '@ledgerline/testing';
import { guardPool } from '../src/index.ts';

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase('ll_pgpool');
});
after(async () => {
  await db.drop();
});

test('a terminated backend under a checked-out client without a listener is reported to onError', async () => {
  const errors: Error[] = [];
  const pool = guardPool(new pg.Pool({ connectionString: db.url, max: 2 }), (error) => errors.push(error));
  const client = await pool.connect();
  assert.equal((await client.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one, 1);
  assert.equal(await terminateBackends(db.name), 1);
  for (let waitedMs = 0; errors.length === 0; waitedMs += 10) {
    assert.ok(waitedMs < 5000, 'the termination was not reported');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  assert.equal((errors[0] as Error & { code?: string }).code, '57P01');
  await assert.rejects(client.query('SELECT 1'));
  client.release(true);
  // The pool replaces the dead client.
  assert.equal((await pool.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one, 1);
  await pool.end();
});

test('idle clients whose backends are terminated are reported and replaced', async () => {
  const errors: Error[] = [];
  const pool = guardPool(new pg.Pool({ connectionString: db.url, max: 2 }), (error) => errors.push(error));
  await pool.query('SELECT 1');
  assert.equal(await terminateBackends(db.name), 1);
  for (let waitedMs = 0; errors.length === 0; waitedMs += 10) {
    assert.ok(waitedMs < 5000, 'the termination was not reported');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  assert.equal((await pool.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one, 1);
  await pool.end();
});

/**
 * No CHECK constraint in Ledgerline's schema tests a regular expression with a bounded
 * repetition (`{0,62}`, `{1,255}`). PostgreSQL expands one into that many copies of its states
 * and builds the automaton again for every row: on the event store's stream type it cost 3.5 µs
 * an append (a sixth of the append), on the idempotency table's key about 75 µs a row. The same
 * rule as `[...]*` or `[...]+` and a length test costs well under 1 µs. Every package's
 * migrations run here on one fresh database; a new check written the old way fails this test.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { migrateAudit } from '@ledgerline/audit';
import { migrateEvents } from '@ledgerline/events';
import { migrateIdentity } from '@ledgerline/identity';
import { migrateLedger } from '@ledgerline/ledger';
import { migrateResilience } from '@ledgerline/resilience';
import { migrateRuntime } from '@ledgerline/service-runtime';
import { createTestDatabase, type TestDatabase } from '../src/index.ts';

let db: TestDatabase;

before(async () => {
  db = await createTestDatabase('ll_test_schema_checks');
  for (const migrate of [migrateLedger, migrateRuntime, migrateEvents, migrateAudit, migrateIdentity, migrateResilience]) await migrate(db.url);
});

after(async () => {
  await db.drop();
});

/** A regular expression match (`~`, `~*`, `!~`) whose pattern literal holds `{n}`, `{n,}` or `{n,m}`. */
const BOUNDED_REGEX = /~\*?\s*'[^']*\{\d+(,\d*)?\}[^']*'/;

test('the pattern finds a bounded repetition in a check and nothing in a plain one', () => {
  assert.match(`CHECK ((stream_type ~ '^[a-z][a-z0-9_.-]{0,62}$'::text))`, BOUNDED_REGEX);
  assert.match(`CHECK ((key ~ '^[ -~]{1,255}$'::text))`, BOUNDED_REGEX);
  assert.match(`CHECK ((code !~* '^x{3}$'::text))`, BOUNDED_REGEX);
  assert.doesNotMatch(`CHECK (((stream_type ~ '^[a-z][a-z0-9_.-]*$'::text) AND (length(stream_type) <= 63)))`, BOUNDED_REGEX);
  assert.doesNotMatch(`CHECK (((flags & (~ 255)) = 0))`, BOUNDED_REGEX);
});

test('no CHECK constraint in any package tests a regular expression with a bounded repetition', async () => {
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  try {
    const r = await client.query<{ constraint: string; definition: string }>(
      `SELECT c.conrelid::regclass::text || '.' || c.conname AS constraint, pg_get_constraintdef(c.oid) AS definition
         FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE c.contype = 'c' AND n.nspname NOT IN ('pg_catalog', 'information_schema')`,
    );
    // The schemas are all there: a migration that silently did nothing would pass vacuously.
    const schemas = new Set(r.rows.map((row) => row.constraint.split('.')[0]));
    for (const schema of ['ledger', 'runtime', 'events', 'audit', 'identity']) assert.ok(schemas.has(schema), `checks found in schema ${schema}`);
    assert.ok(r.rows.some((row) => row.definition.includes('~')), 'some checks test a regular expression');
    const bounded = r.rows.filter((row) => BOUNDED_REGEX.test(row.definition));
    assert.deepEqual(bounded, [], 'checks with a bounded repetition in a regular expression');
  } finally {
    await client.end();
  }
});

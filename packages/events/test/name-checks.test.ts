/**
 * Migration 1732290000000 rewrote the name checks without bounded repetition (`{0,62}`), which
 * PostgreSQL's regular expressions pay for on every row. Each new check must accept exactly the
 * strings the old one did: checked here against the old regular expression, evaluated by the
 * same server, at the length and alphabet boundaries and on random strings (fast-check). Rows
 * written under the old checks validate under the new ones.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { runner } from 'node-pg-migrate';
import pg from 'pg';
import { assertChecksKeepRules, createTestDatabase, propertySeed, type RewrittenCheck } from '@ledgerline/testing';
import { migrateEvents } from '../src/index.ts';

const RULES: RewrittenCheck[] = [
  {
    constraint: 'events_stream_type_check',
    oldPattern: '^[a-z][a-z0-9_.-]{0,62}$',
    minLength: 1,
    maxLength: 63,
    insert: (value) => ({
      text: `INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata) VALUES (0, $1, $2, 's-1', 1, 't', '{}', '{}')`,
      values: [randomUUID(), value],
    }),
  },
  {
    constraint: 'consumers_name_check',
    oldPattern: '^[a-z][a-z0-9_-]{0,62}$',
    minLength: 1,
    maxLength: 63,
    insert: (value) => ({ text: 'INSERT INTO events.consumers (name) VALUES ($1)', values: [value] }),
  },
  {
    constraint: 'projections_name_check',
    oldPattern: '^[a-z][a-z0-9_]{0,40}$',
    minLength: 1,
    maxLength: 41,
    insert: (value) => ({ text: 'INSERT INTO events.projections (name, generation) VALUES ($1, 1)', values: [value] }),
  },
  {
    constraint: 'stream_regions_region_check',
    oldPattern: '^[a-z][a-z0-9-]{0,31}$',
    minLength: 1,
    maxLength: 32,
    insert: (value) => ({ text: `INSERT INTO events.stream_regions (stream_type, stream_id, region) VALUES ('t', 's-1', $1)`, values: [value] }),
  },
];

test('each rewritten check accepts exactly what its old regular expression accepted', async () => {
  const seed = propertySeed('events name checks against the old rules');
  await assertChecksKeepRules('ll_test_name_checks', [migrateEvents], RULES, { seed, numRuns: 300 });
});

test('events appended under the old checks validate under the new ones', async () => {
  const old = await createTestDatabase('ll_test_name_checks_old');
  const c = new pg.Client({ connectionString: old.url });
  try {
    const dir = fileURLToPath(new URL('../migrations', import.meta.url));
    const options = { databaseUrl: old.url, dir, direction: 'up' as const, schema: 'events', createSchema: true, migrationsSchema: 'events', migrationsTable: 'migrations', checkOrder: true, log: () => {} };
    // The four migrations before 1732290000000.
    await runner({ ...options, count: 4 });
    await c.connect();
    const before = await c.query<{ d: string }>(`SELECT pg_get_constraintdef(oid) AS d FROM pg_constraint WHERE conname = 'events_stream_type_check'`);
    assert.match(before.rows[0]?.d ?? '', /\{0,62\}/, 'the old check is in place before the migration');
    await c.query(
      `INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata)
       SELECT 0, gen_random_uuid(), $1, 's-' || g, 1, 't', '{}', '{}' FROM generate_series(1, 100) g`,
      ['a'.repeat(63)],
    );
    await c.query(`INSERT INTO events.consumers (name) VALUES ($1)`, ['z'.repeat(63)]);
    await c.query(`INSERT INTO events.projections (name, generation) VALUES ($1, 1)`, ['p'.repeat(41)]);
    await c.query(`INSERT INTO events.stream_regions (stream_type, stream_id, region) VALUES ('t', 's-1', $1)`, ['r'.repeat(32)]);
    await migrateEvents(old.url);
    const after = await c.query<{ conname: string; convalidated: boolean; d: string }>(
      `SELECT conname, convalidated, pg_get_constraintdef(oid) AS d FROM pg_constraint
        WHERE conname IN ('events_stream_type_check', 'consumers_name_check', 'projections_name_check', 'stream_regions_region_check') ORDER BY conname`,
    );
    assert.equal(after.rows.length, 4);
    for (const row of after.rows) {
      assert.equal(row.convalidated, true, `${row.conname} is validated`);
      assert.doesNotMatch(row.d, /\{\d+,\d+\}/, `${row.conname} has no bounded repetition: ${row.d}`);
    }
    assert.equal((await c.query<{ n: number }>('SELECT count(*)::int AS n FROM events.events')).rows[0]?.n, 100);
  } finally {
    await c.end().catch(() => {});
    await old.drop();
  }
});

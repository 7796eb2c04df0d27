/**
 * sqlArrayLiteral (src/sql.ts): the literals it builds read back on a real server as the values
 * given, codes that look like keywords stay strings, and anything that would need escaping is
 * refused before it can reach a statement. sqlLiteral: any text, written into a statement as a
 * constant, reads back as itself, whichever way the server reads backslashes.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import pg from 'pg';
import { ADMIN_DATABASE_URL, propertySeed } from '@ledgerline/testing';
import { sqlArrayLiteral, sqlLiteral } from '../src/index.ts';

let client: pg.Client;

before(async () => {
  client = new pg.Client({ connectionString: ADMIN_DATABASE_URL });
  await client.connect();
});

after(async () => {
  await client.end();
});

test('integers, UUIDs and NULLs read back as given', async () => {
  const ids = ['0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b', null, 'ffffffff-ffff-ffff-ffff-ffffffffffff'];
  const big = ['9223372036854775807', '-9223372036854775808', '0', null];
  const r = await client.query<{ ids: string[]; big: string[]; ints: number[] }>(
    'SELECT $1::uuid[]::text[] AS ids, $2::bigint[]::text[] AS big, $3::int[] AS ints',
    [sqlArrayLiteral(ids), sqlArrayLiteral(big), sqlArrayLiteral([1, -2, null, 65535])],
  );
  assert.deepEqual(r.rows[0], { ids, big, ints: [1, -2, null, 65535] });
  assert.equal(sqlArrayLiteral([]), '{}');
});

test('quoted codes stay strings, even one spelled NULL, and a tuple id keeps its comma', async () => {
  const codes = ['NULL', 'USD', '', null, 'exceeds_credits', '(12,5)'];
  const r = await client.query<{ codes: Array<string | null> }>('SELECT $1::text[] AS codes', [sqlArrayLiteral(codes, true)]);
  assert.deepEqual(r.rows[0]?.codes, codes);
});

test('an element that would need escaping is refused, quoted or not', () => {
  for (const bad of ['1,2', 'NULL', '0193A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B', ' 1', '1.5', "1'; DROP TABLE x; --"]) {
    assert.throws(() => sqlArrayLiteral([bad]), /invariant: not an array element/, bad);
  }
  for (const bad of ['a"b', 'a\\b', 'a b', '{x}', 'é']) {
    assert.throws(() => sqlArrayLiteral([bad], true), /invariant: not an array element/, bad);
  }
  assert.throws(() => sqlArrayLiteral([1.5]), /invariant: not an array element/);
});

test('sqlLiteral: any text written in as a constant reads back as itself, with or without standard_conforming_strings', async () => {
  const awkward = ["'", "''", '\\', "\\'", "'; DROP TABLE x; --", 'E\'x\'', '$$', '$q$ $q$', '\\x00', '{"a":"b\\"c"}', 'é ✓ 𝄞', '\n\r\t', ''];
  const seed = propertySeed('sqlLiteral round trip');
  const texts = [...awkward, ...fc.sample(fc.string({ unit: 'binary', maxLength: 40 }).filter((x) => !x.includes('\0')), { seed, numRuns: 300 })];
  for (const conforming of ['on', 'off']) {
    await client.query(`SET standard_conforming_strings = ${conforming}`);
    // Sent with the simple protocol (no parameters): the constants are all the server sees.
    const results = (await client.query(texts.map((x) => `SELECT ${sqlLiteral(x)} AS v`).join(';\n'))) as unknown as pg.QueryResult<{ v: string }>[];
    // pg sends text as UTF-8: a lone surrogate goes as U+FFFD, whichever way it travels.
    const sent = (x: string): string => Buffer.from(x, 'utf8').toString('utf8');
    assert.deepEqual(results.map((r) => r.rows[0]?.v), texts.map(sent), `standard_conforming_strings = ${conforming}`);
  }
  await client.query('RESET standard_conforming_strings');
});

test('sqlLiteral refuses a NUL, which no constant can hold', () => {
  assert.throws(() => sqlLiteral('a\0b'), /NUL character/);
});

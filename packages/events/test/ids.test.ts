/**
 * newUuidV7: RFC 9562 version 7 ids from pooled randomness.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { validate, version } from 'uuid';
import { newUuidV7 } from '../src/index.ts';

test('ids are valid UUIDv7s, carry the time, never repeat, and come in millisecond order across refills of the pool', () => {
  const before = Date.now();
  // 4 KiB of pool makes 256 ids: 3000 span about a dozen refills.
  const ids = Array.from({ length: 3000 }, () => newUuidV7());
  const after = Date.now();
  assert.equal(new Set(ids).size, ids.length, 'no repeats');
  let previousMs = 0;
  for (const id of ids) {
    assert.ok(validate(id) && version(id) === 7, id);
    assert.match(id[19] ?? '', /[89ab]/, `RFC 9562 variant: ${id}`);
    const ms = parseInt(id.slice(0, 8) + id.slice(9, 13), 16);
    assert.ok(ms >= before && ms <= after, `${id} carries a time within the call (${ms})`);
    assert.ok(ms >= previousMs, 'ordered by millisecond');
    previousMs = ms;
  }
  // The random part differs between consecutive ids: each draws its own bytes from the pool.
  const tails = new Set(ids.map((id) => id.slice(24)));
  assert.equal(tails.size, ids.length);
});

/**
 * Migration 1767900000000 rewrote the idempotency table's client id and key checks without
 * bounded repetition (`{1,255}`): PostgreSQL's regular expressions paid about 75 µs a row for
 * it, twice per keyed request. The new checks must accept exactly the strings the old ones did,
 * at the boundaries and on random strings (fast-check), against the old regular expression
 * evaluated by the same server.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { assertChecksKeepRules, propertySeed, type RewrittenCheck } from '@ledgerline/testing';
import { migrateRuntime } from '../src/index.ts';

const row = (clientId: string, key: string): { text: string; values: unknown[] } => ({
  text: `INSERT INTO runtime.idempotency_keys (client_id, key, request_fingerprint, state, lock_token, created_at, locked_until, expires_at)
         VALUES ($1, $2, $3, 'in_progress', $4, now(), now(), now() + interval '1 day')`,
  values: [clientId, key, randomBytes(32), randomUUID()],
});

const RULES: RewrittenCheck[] = [
  { constraint: 'idempotency_keys_client_id_check', oldPattern: '^[ -~]{1,255}$', minLength: 1, maxLength: 255, insert: (value) => row(value, randomUUID()) },
  { constraint: 'idempotency_keys_key_check', oldPattern: '^[ -~]{1,255}$', minLength: 1, maxLength: 255, insert: (value) => row('payments', value) },
];

test('the client id and key checks accept exactly what the old regular expression accepted', async () => {
  const seed = propertySeed('idempotency key checks against the old rule');
  // 200 runs: the old rule costs about 75 µs an evaluation, and it is the reference.
  await assertChecksKeepRules('ll_test_idem_checks', [migrateRuntime], RULES, { seed, numRuns: 200 });
});

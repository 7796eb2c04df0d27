/**
 * Migration 1767900000000 rewrote the username and client id checks without bounded repetition
 * (`{3,64}`), which PostgreSQL's regular expressions pay for on every insert and on every update
 * of the row (each sign-in that counts a failure). The new checks must accept exactly the
 * strings the old ones did, at the boundaries and on random strings (fast-check), against the
 * old regular expression evaluated by the same server.
 */
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { assertChecksKeepRules, propertySeed, type RewrittenCheck } from '@ledgerline/testing';
import { migrateIdentity } from '../src/index.ts';

const RULES: RewrittenCheck[] = [
  {
    constraint: 'users_username_check',
    oldPattern: '^[a-z0-9._@-]{3,64}$',
    minLength: 3,
    maxLength: 64,
    insert: (value) => ({
      text: `INSERT INTO identity.users (id, username, password_hash, roles, created_at) VALUES ($1, $2, '$argon2id$x', '{}', now())`,
      values: [randomUUID(), value],
    }),
  },
  {
    constraint: 'clients_id_check',
    oldPattern: '^[a-z0-9._-]{3,64}$',
    minLength: 3,
    maxLength: 64,
    insert: (value) => ({
      text: `INSERT INTO identity.clients (id, secret_hash, roles, audiences, created_at) VALUES ($1, '$argon2id$x', '{}', '{ledger}', now())`,
      values: [value],
    }),
  },
];

test('the username and client id checks accept exactly what the old regular expressions accepted', async () => {
  const seed = propertySeed('identity name checks against the old rules');
  await assertChecksKeepRules('ll_test_identity_checks', [migrateIdentity], RULES, { seed, numRuns: 300 });
});

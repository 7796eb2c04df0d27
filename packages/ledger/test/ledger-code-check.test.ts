/**
 * Migration 1732300000000 rewrote the ledger code check without a bounded repetition (`{2,11}`).
 * The new check must accept exactly the codes the old one did, at the boundaries and on random
 * strings (fast-check), against the old regular expression evaluated by the same server.
 */
import { test } from 'node:test';
import { assertChecksKeepRules, propertySeed, type RewrittenCheck } from '@ledgerline/testing';
import { migrateLedger } from '../src/index.ts';

test('the ledger code check accepts exactly what the old regular expression accepted', async () => {
  const seed = propertySeed('ledger code check against the old rule');
  const rule: RewrittenCheck = {
    constraint: 'ledgers_code_check',
    oldPattern: '^[A-Z][A-Z0-9]{2,11}$',
    minLength: 3,
    maxLength: 12,
    validUnit: 'Q',
    // No shipped currency is spelled from Q, Z, digits and the other test characters alone.
    insert: (value) => ({ text: 'INSERT INTO ledger.ledgers (code, scale) VALUES ($1, 2)', values: [value] }),
  };
  await assertChecksKeepRules('ll_test_ledger_code', [migrateLedger], [rule], { seed, numRuns: 300 });
});

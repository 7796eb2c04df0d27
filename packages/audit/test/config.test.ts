/**
 * The audit trail's environment variables: the sequencer's defaults are the ones the code
 * measured and documents, and a bad value stops the service naming the variable.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError, loadConfig } from '@ledgerline/service-runtime';
import { Type } from 'typebox';
import { auditConfigSchema, BATCH_RECORDS_MAX_DEFAULT, INTERVAL_MS_DEFAULT, SEQUENCER_NICE_DEFAULT } from '../src/index.ts';

const schema = Type.Object({ ...auditConfigSchema.properties });

test('the sequencer settings default to the measured values, and a bad one is refused by name', () => {
  const config = loadConfig(schema, {});
  assert.deepEqual(
    [config.AUDIT_SEQUENCER_INTERVAL_MS, config.AUDIT_SEQUENCER_BATCH_MAX, config.AUDIT_SEQUENCER_NICE],
    [INTERVAL_MS_DEFAULT, BATCH_RECORDS_MAX_DEFAULT, SEQUENCER_NICE_DEFAULT],
  );
  assert.deepEqual([INTERVAL_MS_DEFAULT, BATCH_RECORDS_MAX_DEFAULT, SEQUENCER_NICE_DEFAULT], [1000, 20_000, 10]);
  assert.equal(loadConfig(schema, { AUDIT_SEQUENCER_NICE: '0', AUDIT_SEQUENCER_BATCH_MAX: '500' }).AUDIT_SEQUENCER_BATCH_MAX, 500);
  for (const [variable, value] of [['AUDIT_SEQUENCER_NICE', '20'], ['AUDIT_SEQUENCER_NICE', '-1'], ['AUDIT_SEQUENCER_BATCH_MAX', '50001'], ['AUDIT_SEQUENCER_BATCH_MAX', 'many']] as const) {
    assert.throws(
      () => loadConfig(schema, { [variable]: value }),
      (error: unknown) => error instanceof ConfigError && error.issues.some((i) => i.variable === variable),
      `${variable}=${value}`,
    );
  }
});

/**
 * The audit trail's environment variables: the sequencer's defaults are the ones the code
 * measured and documents, and a bad value stops the service naming the variable.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError, loadConfig } from '@ledgerline/service-runtime';
import { Type } from 'typebox';
import { generateKeyPairSync } from 'node:crypto';
import { auditConfigSchema, BATCH_RECORDS_MAX_DEFAULT, INTERVAL_MS_DEFAULT, parsePublicKey, previousPublicKeyPems, rateLimitedSummaryFromConfig, SEQUENCER_NICE_DEFAULT, SigningKeyError } from '../src/index.ts';

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

test('the summaries of rate-limited requests: the documented defaults, set from the environment, a bad value refused by name', () => {
  assert.deepEqual(rateLimitedSummaryFromConfig(loadConfig(schema, {})), { intervalMs: 10_000, keysMax: 1000, perClientMax: 10 });
  const set = loadConfig(schema, { AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS: '2500', AUDIT_RATE_LIMITED_SUMMARY_KEYS_MAX: '50', AUDIT_RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX: '3' });
  assert.deepEqual(rateLimitedSummaryFromConfig(set), { intervalMs: 2500, keysMax: 50, perClientMax: 3 });
  for (const [variable, value] of [
    ['AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS', '99'],
    ['AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS', '60001'],
    ['AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS', '1.5'],
    ['AUDIT_RATE_LIMITED_SUMMARY_KEYS_MAX', '0'],
    ['AUDIT_RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX', '10001'],
  ] as const) {
    assert.throws(
      () => loadConfig(schema, { [variable]: value }),
      (error: unknown) => error instanceof ConfigError && error.issues.some((i) => i.variable === variable),
      `${variable}=${value}`,
    );
  }
});

test('AUDIT_PREVIOUS_PUBLIC_KEYS: one or more SPKI PEM blocks, literal \\n accepted; anything else refused', () => {
  const pem = (): string => generateKeyPairSync('ed25519').publicKey.export({ type: 'spki', format: 'pem' }).toString();
  const [a, b] = [pem(), pem()];
  assert.deepEqual(previousPublicKeyPems(''), []);
  assert.deepEqual(previousPublicKeyPems(`${a}${b}`).map((k) => parsePublicKey(k).export({ type: 'spki', format: 'pem' }).toString()), [a, b]);
  // As an environment variable often carries it: one line, its breaks written as \n.
  assert.equal(previousPublicKeyPems(a.replaceAll('\n', '\\n')).length, 1);
  for (const bad of ['not a key', `${a}trailing text`, '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----']) {
    assert.throws(() => previousPublicKeyPems(bad), SigningKeyError, bad.slice(0, 30));
  }
});

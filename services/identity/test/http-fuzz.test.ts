/**
 * Property test (fast-check) of the identity service's token and revocation endpoints:
 * arbitrary forms (each grant's fields, missing, repeated, malformed or unknown; the
 * bootstrap credentials now and then, right or wrong) in form or JSON encoding, or no known
 * content type. The service must never answer 5xx, and every error must be problem+json with
 * its status and an OAuth2 `error` code (RFC 6749 §5.2), refusals of the request's shape
 * included.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import type pg from 'pg';
import { MemoryAuditSink } from '@ledgerline/audit';
import type { Service } from '@ledgerline/service-runtime';
import { assertFuzzAnswer, propertySeed, type TestDatabase } from '@ledgerline/testing';
import { buildIdentityService } from '../src/app.ts';
import { bootstrap } from '../src/bootstrap.ts';
import { CLIENT_SECRET, identityDatabase, ISSUER, PASSWORD } from './support.ts';

let db: TestDatabase;
let pool: pg.Pool;
let app: Service;

before(async () => {
  // Lockout high enough that wrong guesses never lock the bootstrap users out mid-run.
  const { identity, config, ...database } = await identityDatabase('ll_identity_fuzz', { lockout: { failuresMax: 1_000_000, lockMs: 1 } });
  ({ db, pool } = database);
  await bootstrap(identity, config, { info: () => {} }, new MemoryAuditSink());
  app = await buildIdentityService({ identity, pool, issuer: ISSUER, audit: new MemoryAuditSink(), logger: false });
});

after(async () => {
  await app.close();
  await pool.end();
  await db.drop();
});

const value = fc.oneof(
  fc.constantFrom('root', PASSWORD, 'payments', CLIENT_SECRET, 'ledger', 'identity', 'ledger:admin', '', ' ', '000000', '123456', 'x'.repeat(300), 'ro\u0000ot', '\uD800', 'é😀'),
  fc.string({ maxLength: 24 }),
);
const field = fc.constantFrom('grant_type', 'username', 'password', 'client_id', 'client_secret', 'audience', 'scope', 'refresh_token', 'totp', 'token', 'otp', 'extra');
const grant = fc.constantFrom('password', 'client_credentials', 'refresh_token', 'authorization_code', '', 'PASSWORD');

/** Anything: any grant, any fields, repeated or unknown. */
const wildForm = fc.tuple(grant, fc.array(fc.tuple(field, value), { maxLength: 6 })).map(([g, pairs]) => [['grant_type', g] as [string, string], ...pairs]);
/** A grant with its own fields, each there or not, with any values: reaches the handler and the credential checks. */
const GRANT_FIELDS: Record<string, string[]> = {
  password: ['username', 'password', 'audience', 'totp_code'],
  client_credentials: ['client_id', 'client_secret', 'audience'],
  refresh_token: ['refresh_token'],
};
const shapedForm = fc.constantFrom(...Object.keys(GRANT_FIELDS)).chain((g) =>
  fc.tuple(...(GRANT_FIELDS[g] as string[]).map((f) => fc.option(value.map((v) => [f, v] as [string, string]), { freq: 4 }))).map((pairs) => [
    ['grant_type', g] as [string, string],
    ...pairs.filter((p): p is [string, string] => p !== null),
  ]),
);
const revokeForm = fc.option(value, { freq: 5 }).map((token) => (token === null ? [] : [['token', token] as [string, string]]));
const formArb = fc.oneof(wildForm, shapedForm, revokeForm);

function encode(pairs: Array<[string, string]>, as: 'form' | 'json' | 'text'): { payload: string; contentType: string } {
  if (as === 'json') return { payload: JSON.stringify(Object.fromEntries(pairs)), contentType: 'application/json' };
  if (as === 'text') return { payload: pairs.map(([k, v]) => `${k}=${v}`).join('&'), contentType: 'application/xml' };
  return { payload: new URLSearchParams(pairs).toString(), contentType: 'application/x-www-form-urlencoded' };
}

test('property: no form makes the token or revocation endpoint answer 5xx; every error is problem+json', async () => {
  const seed = propertySeed('identity token endpoint fuzz');
  const statuses = new Map<number, number>();
  await fc.assert(
    fc.asyncProperty(fc.constantFrom('/oauth/token', '/oauth/revoke'), formArb, fc.constantFrom('form' as const, 'form' as const, 'json' as const, 'text' as const), async (url, pairs, as) => {
      const { payload, contentType } = encode(pairs, as);
      const res = await app.inject({ method: 'POST', url, headers: { 'content-type': contentType }, payload });
      assertFuzzAnswer(res, `${url} ${contentType} ${payload}`, statuses);
      if (res.statusCode >= 400) assert.equal(typeof res.json<{ error?: unknown }>().error, 'string', res.body);
    }),
    { seed, numRuns: 500 },
  );
  assert.ok((statuses.get(400) ?? 0) > 0 && (statuses.get(401) ?? 0) > 0 && (statuses.get(415) ?? 0) > 0, JSON.stringify([...statuses]));
  // Found while writing these tests: a NUL in a username or client id reached PostgreSQL, which
  // refuses it in text, and the endpoint answered 500.
  for (const pairs of [
    [['grant_type', 'password'], ['username', 'ro\u0000ot'], ['password', PASSWORD], ['audience', 'ledger']],
    [['grant_type', 'client_credentials'], ['client_id', 'pay\u0000ments'], ['client_secret', CLIENT_SECRET], ['audience', 'ledger']],
  ] as Array<Array<[string, string]>>) {
    const { payload, contentType } = encode(pairs, 'form');
    const res = await app.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': contentType }, payload });
    assert.deepEqual([res.statusCode, res.json<{ error?: string }>().error], [400, 'invalid_request'], res.body);
  }
  assert.ok([...statuses.keys()].some((status) => status < 300), JSON.stringify([...statuses]));
});

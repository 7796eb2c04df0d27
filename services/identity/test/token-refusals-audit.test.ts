/**
 * Token requests refused before the token endpoint's handler runs are in the audit trail too
 * (PCI DSS 10.2.1.2 "all invalid logical access attempts", 10.2.1.5): a body that fails the
 * schema or cannot be parsed (400), one over the body limit (413), one that is not a form or
 * JSON (415), an address over its token rate limit (429), a request shed under load (503) or
 * whose caller's deadline had passed (504). Each is a failure with a reason that says which
 * refusal it was, the origin (address, request id), and an actor named as the handler names
 * one (a known account, else a keyed digest, never the typed text); no password, secret,
 * assertion or code is ever recorded. The answers are the ones the client got before.
 *
 * The same for POST /oauth/revoke (RFC 7009): its refusals before the handler (400, 413, 415,
 * the default rate limit's 429, 503, 504) are recorded as `identity.revoke` failures naming
 * the token as the handler does, by its id before the dot (`refresh:<id>`, `refresh:malformed`),
 * never its secret.
 *
 * Last, a login refused for its second factor says so in the trail (totp_refused,
 * recovery_code_refused), while its answer stays the generic invalid_grant.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { InjectOptions } from 'fastify';
import { Redis } from 'ioredis';
import type pg from 'pg';
import { checkEntry, MemoryAuditSink, type AuditEntry } from '@ledgerline/audit';
import { ROLES } from '@ledgerline/authz';
import { totpCode, type ClientAuthentication, type Identity, type TokenResponse } from '@ledgerline/identity';
import { RedisTokenBucket, type Service } from '@ledgerline/service-runtime';
import { testRandom, type TestDatabase } from '@ledgerline/testing';
import { AUDIT_ACTIONS, buildIdentityService, TOKEN_ACTION, type IdentityServiceOptions } from '../src/app.ts';
import { bootstrap } from '../src/bootstrap.ts';
import { CLIENT_SECRET, identityDatabase, ISSUER, nameDigest, PASSWORD } from './support.ts';

/** What a user might type in the username field: a password, which the trail must never hold. */
const TYPED = 'Tr0ub4dor&3-staple';
const NOW = Date.UTC(2026, 10, 23, 10, 0);
/** The key of the trail's digests of typed names, so that a test can tell which name a digest stands for. */
const PSEUDONYM_KEY = new Uint8Array(32).fill(9);
let db: TestDatabase;
let pool: pg.Pool;
let identity: Identity;
let redis: Redis;
let app: Service;
/** A memory sink that refuses what the durable one refuses (a field too long, a NUL, a payload too big). */
class CheckedSink extends MemoryAuditSink {
  override record(entry: AuditEntry): void {
    checkEntry(entry);
    super.record(entry);
  }
}
const audit = new CheckedSink();
const apps: Service[] = [];

const random = testRandom('identity token refusal audit key prefix');
const runPrefix = `ll:test:idra:${process.pid}:${Math.floor(random() * 2 ** 32).toString(16)}:`;

before(async () => {
  const database = await identityDatabase('ll_identity_refusals', { clock: () => NOW, lockout: { failuresMax: 100, lockMs: 60_000 } });
  ({ db, pool, identity } = database);
  await bootstrap(identity, database.config, { info: () => {} }, new MemoryAuditSink());
  redis = new Redis('redis://127.0.0.1:6379', { maxRetriesPerRequest: 1 });
  app = await serve();
});

after(async () => {
  for (const service of apps) await service.close();
  const keys = await redis.keys(`${runPrefix}*`);
  if (keys.length > 0) await redis.del(...keys);
  redis.disconnect();
  await pool.end();
  await db.drop();
});

async function serve(options: Partial<IdentityServiceOptions> = {}): Promise<Service> {
  const service = await buildIdentityService({ identity, pool, issuer: ISSUER, audit, clock: () => NOW, logger: false, pseudonymKey: PSEUDONYM_KEY, ...options });
  apps.push(service);
  return service;
}

const form = (fields: Record<string, string>, extra: Partial<InjectOptions> = {}): InjectOptions => ({
  method: 'POST',
  url: '/oauth/token',
  ...extra,
  headers: { 'content-type': 'application/x-www-form-urlencoded', ...extra.headers },
  payload: new URLSearchParams(fields).toString(),
});

/** The records of `action` (token requests unless told) from index `from` on, waiting (up to 5 s) until there are `count`: some actors are looked up after the answer. */
async function records(from: number, count: number, action = TOKEN_ACTION): Promise<AuditEntry[]> {
  for (let waitedMs = 0; ; waitedMs += 10) {
    const found = audit.entries.slice(from).filter((e) => e.action === action);
    if (found.length >= count || waitedMs >= 5000) return found;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** The one record of `action` (a token request's unless told) of the request answered `r`, found by its request id. */
async function recordOf(from: number, r: Awaited<ReturnType<Service['inject']>>, action = TOKEN_ACTION): Promise<AuditEntry> {
  const requestId = String(r.headers['x-request-id']);
  for (let waitedMs = 0; ; waitedMs += 10) {
    const found = audit.entries.slice(from).filter((e) => e.action === action && e.origin.requestId === requestId);
    if (found.length > 0 || waitedMs >= 2000) {
      assert.equal(found.length, 1, `one ${action} record of ${r.statusCode} ${r.body}, found ${JSON.stringify(found)}`);
      return found[0] as AuditEntry;
    }
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const brief = (e: AuditEntry) => [e.actor.type, e.actor.id, e.outcome, e.reason ?? null];

/** No secret, and none of what was typed where a name should be, anywhere in these records. */
function assertNoSecret(entries: readonly AuditEntry[], extra: readonly string[] = []): void {
  const trail = JSON.stringify(entries);
  for (const text of [PASSWORD, CLIENT_SECRET, TYPED, TYPED.toLowerCase(), ...extra]) assert.equal(trail.includes(text), false, `the trail holds ${text}`);
}

/** A well-formed refresh token: a revocation's record names it by the id before the dot, never by its secret. */
const SESSION_ID = '00000000-0000-4000-8000-000000000000';
const REFRESH_SECRET = 'R'.repeat(43);
const REFRESH_TOKEN = `${SESSION_ID}.${REFRESH_SECRET}`;
/** A revocation (RFC 7009) as a form. */
const revocation = (fields: Record<string, string>, extra: Partial<InjectOptions> = {}): InjectOptions => form(fields, { url: '/oauth/revoke', ...extra });

describe('POST /oauth/token refused before its handler is audited', () => {
  test('a body that fails the schema: invalid_request (or unsupported_grant_type) with the problem, the actor named as the handler names one', async () => {
    const from = audit.entries.length;
    const answers = {
      // A password over 256 characters: the user is known.
      longPassword: await app.inject(form({ grant_type: 'password', username: 'ROOT', password: `${PASSWORD}${'x'.repeat(300)}`, audience: 'ledger' })),
      // A TOTP code that is not six digits, for a name no user has.
      badTotp: await app.inject(form({ grant_type: 'password', username: TYPED, password: PASSWORD, audience: 'ledger', totp_code: 'abc' })),
      // A parameter the endpoint does not know, from a known client.
      extra: await app.inject(form({ grant_type: 'client_credentials', client_id: 'payments', client_secret: CLIENT_SECRET, audience: 'ledger', client_secrett: CLIENT_SECRET })),
      // No grant type at all.
      noGrant: await app.inject(form({ username: 'root', password: PASSWORD })),
      // A grant type this server does not serve.
      unsupported: await app.inject(form({ grant_type: 'authorization_code', code: 'SplxlOBeZQQYbYS6WxSbIA', client_id: 'payments', client_secret: CLIENT_SECRET })),
      // JSON with a password that is not a string, and an assertion that is not one.
      json: await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'client_credentials', client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer', client_assertion: 7, audience: 'ledger' } }),
      // Text no column can hold, and more of it than any name: named by a digest, the audience not repeated.
      unstorable: await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'password', username: `${TYPED}\u0000${'\ud800'.repeat(100)}`, password: PASSWORD, audience: 'ledger\u0000' } }),
    };
    const errors = Object.fromEntries(Object.entries(answers).map(([name, r]) => [name, [r.statusCode, r.json<{ error: string }>().error]]));
    assert.deepEqual(errors, {
      longPassword: [400, 'invalid_request'],
      badTotp: [400, 'invalid_request'],
      extra: [400, 'invalid_request'],
      noGrant: [400, 'invalid_request'],
      unsupported: [400, 'unsupported_grant_type'],
      json: [400, 'invalid_request'],
      unstorable: [400, 'invalid_request'],
    });
    await records(from, 7);
    const longPassword = await recordOf(from, answers.longPassword);
    assert.deepEqual(brief(longPassword), ['user', 'root', 'failure', 'invalid_request']);
    assert.deepEqual(longPassword.resource, { type: 'token', id: 'password' });
    assert.equal(longPassword.recordClass, 'access');
    assert.deepEqual(longPassword.origin, { service: 'identity', ip: '127.0.0.1', requestId: String(answers.longPassword.headers['x-request-id']) });
    assert.deepEqual(longPassword.payload?.errors, [{ in: 'body', path: '/password', message: 'must not have more than 256 characters' }]);
    assert.equal(longPassword.payload?.audience, 'ledger');
    assert.equal(longPassword.payload?.status, 400);

    const badTotp = await recordOf(from, answers.badTotp);
    assert.equal(badTotp.reason, 'invalid_request');
    assert.match(badTotp.actor.id, /^unknown-user:[0-9a-f]{16}$/);
    assert.deepEqual((badTotp.payload?.errors as Array<{ path: string }>).map((e) => e.path), ['/totp_code']);
    // The same digest the handler gives the same name refused later.
    const counted = audit.entries.length;
    const wrong = await app.inject(form({ grant_type: 'password', username: TYPED, password: PASSWORD, audience: 'ledger' }));
    assert.equal(wrong.statusCode, 400, wrong.body);
    assert.equal((await recordOf(counted, wrong)).actor.id, badTotp.actor.id);

    assert.deepEqual(brief(await recordOf(from, answers.extra)), ['service', 'payments', 'failure', 'invalid_request']);
    assert.deepEqual((await recordOf(from, answers.noGrant)).resource, { type: 'token', id: 'unknown' });
    assert.deepEqual(brief(await recordOf(from, answers.noGrant)), ['user', 'root', 'failure', 'invalid_request']);
    const unsupported = await recordOf(from, answers.unsupported);
    assert.deepEqual(brief(unsupported), ['service', 'payments', 'failure', 'unsupported_grant_type']);
    assert.deepEqual(unsupported.resource, { type: 'token', id: 'unknown' });
    assert.deepEqual(brief(await recordOf(from, answers.json)), ['service', 'unknown-client', 'failure', 'invalid_request']);
    const unstorable = await recordOf(from, answers.unstorable);
    assert.match(unstorable.actor.id, /^unknown-user:[0-9a-f]{16}$/);
    assert.deepEqual([unstorable.payload?.audience, [...new Set((unstorable.payload?.errors as Array<{ path: string }>).map((e) => e.path))].sort()], [null, ['/audience', '/username']]);

    assertNoSecret(audit.entries.slice(from), ['SplxlOBeZQQYbYS6WxSbIA', 'client_secrett']);
  });

  test('a body the parser refuses (a repeated parameter, malformed JSON), one that is not a form or JSON (415), one over the limit (413)', async () => {
    const small = await serve({ bodyLimitBytes: 1024 });
    const from = audit.entries.length;
    const raw = (payload: string, contentType: string) => small.inject({ method: 'POST', url: '/oauth/token', headers: { 'content-type': contentType }, payload });
    const answers = {
      repeated: await raw(`grant_type=password&username=root&password=${encodeURIComponent(PASSWORD)}&password=${encodeURIComponent(CLIENT_SECRET)}&audience=ledger`, 'application/x-www-form-urlencoded'),
      malformed: await raw(`{"grant_type":"password","username":"root","password":"${PASSWORD}"`, 'application/json'),
      text: await raw(`grant_type=password&username=root&password=${PASSWORD}`, 'text/plain'),
      big: await raw(`grant_type=password&username=root&password=${encodeURIComponent(PASSWORD)}&scope=${'a'.repeat(2000)}`, 'application/x-www-form-urlencoded'),
    };
    assert.deepEqual(Object.values(answers).map((r) => [r.statusCode, r.json<{ error: string }>().error]), [[400, 'invalid_request'], [400, 'invalid_request'], [415, 'invalid_request'], [413, 'invalid_request']]);
    await records(from, 4);
    const repeated = await recordOf(from, answers.repeated);
    assert.deepEqual(brief(repeated), ['anonymous', 'anonymous', 'failure', 'invalid_request']);
    assert.deepEqual(repeated.payload?.errors, [{ in: 'body', path: '/password', message: 'must not be repeated' }]);
    assert.deepEqual(brief(await recordOf(from, answers.malformed)), ['anonymous', 'anonymous', 'failure', 'invalid_request']);
    assert.equal((await recordOf(from, answers.malformed)).payload?.problem, 'malformed-json');
    assert.deepEqual(brief(await recordOf(from, answers.text)), ['anonymous', 'anonymous', 'failure', 'unsupported_media_type']);
    const big = await recordOf(from, answers.big);
    assert.deepEqual(brief(big), ['anonymous', 'anonymous', 'failure', 'request_too_large']);
    assert.deepEqual([big.resource, big.origin.requestId, big.payload?.status], [{ type: 'token', id: 'unknown' }, String(answers.big.headers['x-request-id']), 413]);
    assertNoSecret(audit.entries.slice(from));
  });

  test('an address over its token rate limit: 429 recorded as rate_limited, naming the name tried by its digest, never looked up', async () => {
    const limited = await serve({
      resilience: { rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: `${runPrefix}limit:` }), defaultLimit: { ratePerSecond: 1000, burst: 2000 } } },
      tokenRateLimit: { ratePerSecond: 0.01, burst: 1 },
      // Refusals over the limit are recorded in summaries, one per actor, address, route,
      // resource and audience an interval: written every 100 ms here, not 10 s.
      rateLimitedSummary: { intervalMs: 100 },
    });
    const wrongSecret = { grant_type: 'client_credentials', client_id: 'payments', client_secret: 'not-the-secret', audience: 'ledger' };
    const first = await limited.inject(form(wrongSecret));
    assert.equal(first.statusCode, 401, first.body);
    const from = audit.entries.length;
    const refused = await limited.inject(form({ ...wrongSecret, client_secret: CLIENT_SECRET }));
    const unknownUser = await limited.inject(form({ grant_type: 'password', username: TYPED, password: PASSWORD, audience: 'ledger' }));
    const refresh = await limited.inject(form({ grant_type: 'refresh_token', refresh_token: `00000000-0000-4000-8000-000000000000.${'S'.repeat(43)}` }));
    for (const r of [refused, unknownUser, refresh]) {
      assert.equal(r.statusCode, 429, r.body);
      assert.equal(r.json<{ type: string }>().type, 'https://ledgerline.dev/problems/rate-limited');
      assert.equal(r.headers['cache-control'], undefined, 'the handler did not run');
    }
    await records(from, 3);
    const record = await recordOf(from, refused);
    // A 429 sheds work: the name is not looked up, but named by the digest a name no account has
    // gets, under a label that does not say whether one has it (until 2026-12-07: `payments`,
    // looked up after the answer, a query per refusal).
    assert.deepEqual(brief(record), ['service', `unchecked-client:${nameDigest(PSEUDONYM_KEY, 'client', 'payments')}`, 'failure', 'rate_limited']);
    assert.deepEqual(record.resource, { type: 'token', id: 'client_credentials' });
    assert.deepEqual(record.origin, { service: 'identity', ip: '127.0.0.1', requestId: String(refused.headers['x-request-id']) });
    assert.equal(record.payload?.status, 429);
    // (Until 2026-12-07 `unknown-user:<digest>`; the same digest.)
    assert.equal((await recordOf(from, unknownUser)).actor.id, `unchecked-user:${nameDigest(PSEUDONYM_KEY, 'user', TYPED)}`);
    assert.deepEqual(brief(await recordOf(from, refresh)), ['user', 'refresh:00000000-0000-4000-8000-000000000000', 'failure', 'rate_limited']);
    assertNoSecret(audit.entries.slice(from), ['S'.repeat(43)]);

    // A flood of refusals does not become a flood of queries: a 429 looks nothing up. (Until
    // 2026-12-07 each made a lookup, up to 64 waiting, and past them a user who exists was named
    // `unknown-user:<digest>`, the name of a username no user has.)
    const lookup = identity.knownAccount.bind(identity);
    let lookups = 0;
    identity.knownAccount = async (kind, name) => {
      lookups += 1;
      return lookup(kind, name);
    };
    const flooded = audit.entries.length;
    const floodStart = Date.now();
    try {
      for (let i = 0; i < 65; i += 1) assert.equal((await limited.inject(form({ grant_type: 'password', username: 'root', password: `guess-${i}`, audience: 'ledger' }))).statusCode, 429);
    } finally {
      delete (identity as Partial<Identity>).knownAccount;
    }
    const floodMs = Date.now() - floodStart;
    // One key (the name, the address, the audience): its summaries count all 65, one for each
    // 100 ms interval the flood spanned, and nothing else is recorded.
    let summaries: AuditEntry[] = [];
    for (let waitedMs = 0; waitedMs < 5000; waitedMs += 10) {
      summaries = audit.entries.slice(flooded);
      if (summaries.reduce((n, e) => n + (e.payload as { refused: number }).refused, 0) >= 65) break;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    assert.equal(lookups, 0, 'no 429 looked an account up');
    assert.deepEqual(new Set(summaries.map((e) => [e.action, e.actor.id, e.reason].join(' '))), new Set([`${TOKEN_ACTION} unchecked-user:${nameDigest(PSEUDONYM_KEY, 'user', 'root')} rate_limited`]));
    assert.equal(summaries.reduce((n, e) => n + (e.payload as { refused: number }).refused, 0), 65);
    assert.ok(summaries.length <= Math.ceil(floodMs / 100) + 1, `${summaries.length} summaries of one key over a flood of ${floodMs} ms`);
  });

  test('shed under load (503) and a deadline already passed (504): recorded with their reasons, a revocation\'s too', async () => {
    const shedding = await serve({ resilience: { loadShedding: { concurrencyMax: 1, queueMax: 0, targetQueueMs: 50, intervalMs: 60_000, queueTimeoutMs: { critical: 1000, high: 1000, normal: 1000, low: 1000 } } } });
    // A token request holds the only slot, in its handler.
    const clientCredentials = identity.clientCredentials.bind(identity);
    let release: () => void = () => {};
    const until = new Promise<void>((resolve) => { release = resolve; });
    let entered: () => void = () => {};
    const inHandler = new Promise<void>((resolve) => { entered = resolve; });
    identity.clientCredentials = async (auth: ClientAuthentication, audience: string): Promise<TokenResponse> => {
      entered();
      await until;
      return clientCredentials(auth, audience);
    };
    try {
      const holding = shedding.inject(form({ grant_type: 'client_credentials', client_id: 'payments', client_secret: CLIENT_SECRET, audience: 'ledger' }));
      await inHandler;
      const from = audit.entries.length;
      const shed = await shedding.inject(form({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger' }));
      const shedRevocation = await shedding.inject(revocation({ token: REFRESH_TOKEN }));
      for (const r of [shed, shedRevocation]) {
        assert.equal(r.statusCode, 503, r.body);
        assert.equal(r.json<{ type: string }>().type, 'https://ledgerline.dev/problems/overloaded');
      }
      release();
      assert.equal((await holding).statusCode, 200);
      const record = await recordOf(from, shed);
      // Shed before its body was read: nobody is named.
      assert.deepEqual(brief(record), ['anonymous', 'anonymous', 'failure', 'overloaded']);
      assert.deepEqual(record.resource, { type: 'token', id: 'unknown' });
      assert.equal(record.payload?.status, 503);
      const revocationRecord = await recordOf(from, shedRevocation, AUDIT_ACTIONS.revoke);
      assert.deepEqual([...brief(revocationRecord), revocationRecord.resource, revocationRecord.payload?.status], ['anonymous', 'anonymous', 'failure', 'overloaded', { type: 'session', id: 'unknown' }, 503]);
    } finally {
      release();
      delete (identity as Partial<Identity>).clientCredentials;
    }
    const from = audit.entries.length;
    const late = await app.inject(form({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger' }, { headers: { 'x-deadline-remaining-ms': '0' } }));
    const lateRevocation = await app.inject(revocation({ token: REFRESH_TOKEN }, { headers: { 'x-deadline-remaining-ms': '0' } }));
    assert.deepEqual([late.statusCode, lateRevocation.statusCode], [504, 504], late.body);
    assert.deepEqual(brief(await recordOf(from, late)), ['anonymous', 'anonymous', 'failure', 'deadline_exceeded']);
    assert.deepEqual(brief(await recordOf(from, lateRevocation, AUDIT_ACTIONS.revoke)), ['anonymous', 'anonymous', 'failure', 'deadline_exceeded']);
    assertNoSecret(audit.entries.slice(from), [REFRESH_SECRET]);
  });

  test('a request the handler answers is recorded once, by the handler', async () => {
    const from = audit.entries.length;
    const granted = await app.inject(form({ grant_type: 'client_credentials', client_id: 'payments', client_secret: CLIENT_SECRET, audience: 'ledger' }));
    const refused = await app.inject(form({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'not-the-secret', audience: 'ledger' }));
    const missing = await app.inject(form({ grant_type: 'refresh_token' }));
    assert.deepEqual([granted.statusCode, refused.statusCode, missing.statusCode], [200, 401, 400]);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual((await records(from, 3)).map(brief), [
      ['service', 'payments', 'success', null],
      ['service', 'payments', 'failure', 'invalid_client'],
      ['user', 'refresh:malformed', 'failure', 'invalid_request'],
    ]);
  });
});

describe('POST /oauth/revoke refused before its handler is audited', () => {
  test('a body the schema or the parser refuses, one that is not a form or JSON (415), one over the limit (413): named as the handler names a token, by its id', async () => {
    const small = await serve({ bodyLimitBytes: 1024 });
    const roomy = await serve();
    const from = audit.entries.length;
    const raw = (payload: string, contentType = 'application/x-www-form-urlencoded', service = small) => service.inject({ method: 'POST', url: '/oauth/revoke', headers: { 'content-type': contentType }, payload });
    const answers = {
      // Over 4096 characters (room for an access token): the id before the dot still names the
      // session, as the handler would.
      long: await raw(`token=${REFRESH_TOKEN}${'R'.repeat(4100)}`, undefined, roomy),
      // A parameter RFC 7009 does not have, whose name is what was typed (`token=…&Tr0ub4dor%263-staple`).
      extra: await raw(`token=${REFRESH_TOKEN}&${encodeURIComponent(TYPED)}`),
      // No token at all, and a token that is not text.
      missing: await raw(JSON.stringify({ token_type_hint: 'refresh_token' }), 'application/json'),
      notText: await raw(JSON.stringify({ token: 7 }), 'application/json'),
      // Refused by the parser: the body was never read.
      repeated: await raw(`token=${REFRESH_TOKEN}&token=${encodeURIComponent(TYPED)}`),
      malformed: await raw(`{"token":"${REFRESH_TOKEN}"`, 'application/json'),
      text: await raw(`token=${REFRESH_TOKEN}`, 'text/plain'),
      big: await raw(`token=${REFRESH_TOKEN}&token_type_hint=${'a'.repeat(2000)}`),
    };
    assert.deepEqual(
      Object.values(answers).map((r) => [r.statusCode, r.json<{ error: string }>().error]),
      [[400, 'invalid_request'], [400, 'invalid_request'], [400, 'invalid_request'], [400, 'invalid_request'], [400, 'invalid_request'], [400, 'invalid_request'], [415, 'invalid_request'], [413, 'invalid_request']],
    );
    await records(from, 8, AUDIT_ACTIONS.revoke);
    const long = await recordOf(from, answers.long, AUDIT_ACTIONS.revoke);
    assert.deepEqual(brief(long), ['user', `refresh:${SESSION_ID}`, 'failure', 'invalid_request']);
    assert.deepEqual([long.recordClass, long.resource], ['access', { type: 'session', id: 'unknown' }]);
    assert.deepEqual(long.origin, { service: 'identity', ip: '127.0.0.1', requestId: String(answers.long.headers['x-request-id']) });
    assert.deepEqual(long.payload, { status: 400, problem: 'validation-error', errors: [{ in: 'body', path: '/token', message: 'must not have more than 4096 characters' }] });
    const extra = await recordOf(from, answers.extra, AUDIT_ACTIONS.revoke);
    assert.deepEqual(brief(extra), ['user', `refresh:${SESSION_ID}`, 'failure', 'invalid_request']);
    assert.deepEqual((extra.payload?.errors as Array<{ path: string }>).map((e) => e.path), ['(another parameter)']);
    assert.deepEqual(brief(await recordOf(from, answers.missing, AUDIT_ACTIONS.revoke)), ['user', 'refresh:malformed', 'failure', 'invalid_request']);
    assert.deepEqual(brief(await recordOf(from, answers.notText, AUDIT_ACTIONS.revoke)), ['user', 'refresh:malformed', 'failure', 'invalid_request']);
    const repeated = await recordOf(from, answers.repeated, AUDIT_ACTIONS.revoke);
    assert.deepEqual(brief(repeated), ['anonymous', 'anonymous', 'failure', 'invalid_request']);
    assert.deepEqual(repeated.payload?.errors, [{ in: 'body', path: '/token', message: 'must not be repeated' }]);
    const malformed = await recordOf(from, answers.malformed, AUDIT_ACTIONS.revoke);
    assert.deepEqual([...brief(malformed), malformed.payload?.problem], ['anonymous', 'anonymous', 'failure', 'invalid_request', 'malformed-json']);
    assert.deepEqual(brief(await recordOf(from, answers.text, AUDIT_ACTIONS.revoke)), ['anonymous', 'anonymous', 'failure', 'unsupported_media_type']);
    const big = await recordOf(from, answers.big, AUDIT_ACTIONS.revoke);
    assert.deepEqual([...brief(big), big.resource, big.payload?.status], ['anonymous', 'anonymous', 'failure', 'request_too_large', { type: 'session', id: 'unknown' }, 413]);
    // Revocations only: none of them is recorded as a token request.
    assert.deepEqual(audit.entries.slice(from).filter((e) => e.action === TOKEN_ACTION), []);
    assertNoSecret(audit.entries.slice(from), [REFRESH_SECRET]);
  });

  test('an address over its rate limit: 429 recorded as rate_limited, naming the token by its id', async () => {
    const limited = await serve({ resilience: { rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: `${runPrefix}revoke:` }), defaultLimit: { ratePerSecond: 0.01, burst: 1 } } }, rateLimitedSummary: { intervalMs: 100 } });
    const first = await limited.inject(revocation({ token: REFRESH_TOKEN }));
    assert.equal(first.statusCode, 200, first.body);
    const from = audit.entries.length;
    const refused = await limited.inject(revocation({ token: REFRESH_TOKEN, token_type_hint: 'refresh_token' }));
    const typed = await limited.inject(revocation({ token: TYPED }));
    for (const r of [refused, typed]) {
      assert.equal(r.statusCode, 429, r.body);
      assert.equal(r.json<{ type: string }>().type, 'https://ledgerline.dev/problems/rate-limited');
    }
    await records(from, 2, AUDIT_ACTIONS.revoke);
    const record = await recordOf(from, refused, AUDIT_ACTIONS.revoke);
    assert.deepEqual(brief(record), ['user', `refresh:${SESSION_ID}`, 'failure', 'rate_limited']);
    // Its summary (one refusal under its key) says what a record of its own said, and how many.
    assert.deepEqual(record.resource, { type: 'session', id: 'unknown' });
    assert.deepEqual(
      { status: record.payload?.status, problem: record.payload?.problem, refused: record.payload?.refused, route: record.payload?.route },
      { status: 429, problem: 'rate-limited', refused: 1, route: '/oauth/revoke' },
    );
    assert.deepEqual(record.origin, { service: 'identity', ip: '127.0.0.1', requestId: String(refused.headers['x-request-id']) });
    assert.deepEqual(brief(await recordOf(from, typed, AUDIT_ACTIONS.revoke)), ['user', 'refresh:malformed', 'failure', 'rate_limited']);
    assertNoSecret(audit.entries.slice(from), [REFRESH_SECRET]);
  });

  test('a revocation the handler answers is recorded once, by the handler', async () => {
    const session = (await app.inject(form({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger' }))).json<{ refresh_token: string }>();
    const from = audit.entries.length;
    const revoked = await app.inject(revocation({ token: session.refresh_token }));
    const unknown = await app.inject(revocation({ token: REFRESH_TOKEN }));
    const malformed = await app.inject(revocation({ token: TYPED }));
    assert.deepEqual([revoked.statusCode, unknown.statusCode, malformed.statusCode], [200, 200, 200]);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual((await records(from, 3, AUDIT_ACTIONS.revoke)).map(brief), [
      ['user', `refresh:${session.refresh_token.split('.')[0]}`, 'success', null],
      ['user', `refresh:${SESSION_ID}`, 'failure', 'invalid_grant'],
      ['user', 'refresh:malformed', 'failure', 'invalid_grant'],
    ]);
    assertNoSecret(audit.entries.slice(from), [REFRESH_SECRET, String(session.refresh_token.split('.')[1])]);
  });
});

describe('a second factor refused', () => {
  // Which factor failed is known only inside Identity.authenticate (packages/identity), whose
  // refusal carries it as its auditReason; the answer is the same IdentityError's code.
  test('a wrong recovery code (or TOTP code) is recorded as such, answered as any refused login is', async () => {
    const username = 'sofia-2fa';
    const { id: userId } = await identity.createUser({ username, password: PASSWORD, roles: [ROLES.customer] });
    const { secret } = await identity.enrolTotp(userId, 'Ledgerline');
    const { recoveryCodes } = await identity.confirmTotp(userId, totpCode(secret, NOW), PASSWORD);
    const [recoveryCode] = recoveryCodes;
    assert.ok(recoveryCode !== undefined);
    const wrongCode = `${recoveryCode.slice(0, -1)}${recoveryCode.endsWith('a') ? 'b' : 'a'}`;
    const login = (extra: Record<string, string>, password = PASSWORD) => app.inject(form({ grant_type: 'password', username, password, audience: 'ledger', ...extra }));
    const from = audit.entries.length;
    const wrongRecovery = await login({ recovery_code: wrongCode });
    const wrongPassword = await login({ recovery_code: recoveryCode }, 'not the password at all');
    const wrongTotp = await login({ totp_code: totpCode(secret, NOW + 10 * 60_000) });
    const noFactor = await login({});
    // Answered alike: which factor failed is not the caller's to learn.
    for (const r of [wrongRecovery, wrongPassword, wrongTotp]) {
      assert.deepEqual([r.statusCode, r.json<{ error: string; detail: string }>().error, r.json<{ detail: string }>().detail], [400, 'invalid_grant', 'invalid username, password or code'], r.body);
    }
    assert.equal(noFactor.statusCode, 401, noFactor.body);
    assert.deepEqual((await records(from, 4)).map(brief), [
      ['user', username, 'failure', 'recovery_code_refused'],
      ['user', username, 'failure', 'invalid_grant'],
      ['user', username, 'failure', 'totp_refused'],
      ['user', username, 'failure', 'mfa_required'],
    ]);
    // The recovery code given with the wrong password was not spent: it still signs in.
    assert.equal((await login({ recovery_code: recoveryCode })).statusCode, 200);
    assertNoSecret(audit.entries.slice(from), [recoveryCode, wrongCode, secret]);
  });
});

/**
 * What recording the token endpoint's refusals may cost, and what the records say (review of
 * 2026-12-07):
 *
 * - a refusal that sheds work (429, 503, 504) never looks the account up: a flood of throttled
 *   requests naming a real user is no flood of queries, and its records name the user by the
 *   digest of the name under `unchecked-user:`, never as a username no user has;
 * - every lookup of a record's actor, the handler's and the early refusals' alike, shares one
 *   bound: at most half the database pool at once, and a bounded number waiting;
 * - a refusal is recorded whether or not its client stays to read it (a 429 in the summary of
 *   its actor, address and audience, as every rate-limited request is);
 * - the reasons recorded are the ones docs/security.md gives (a revocation's
 *   unsupported_grant_type, the runtime's missing-Host 400);
 * - `audience` is recorded as sent only when it is an audience the service issues tokens for,
 *   else by a keyed digest: a password typed in that field never reaches the trail.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import type { InjectOptions } from 'fastify';
import { Redis } from 'ioredis';
import { checkEntry, MemoryAuditSink, type AuditEntry } from '@ledgerline/audit';
import { IdentityError, type Identity } from '@ledgerline/identity';
import { RedisTokenBucket, type Service } from '@ledgerline/service-runtime';
import { testRandom } from '@ledgerline/testing';
import { AUDIT_ACTIONS, buildIdentityService, TOKEN_ACTION, type IdentityServiceOptions } from '../src/app.ts';
import { bootstrap } from '../src/bootstrap.ts';
import { identityDatabase, ISSUER, nameDigest, PASSWORD } from './support.ts';

const NOW = Date.UTC(2026, 10, 23, 10, 0);
/** What a user might type in a field that should hold a name: a password, which the trail must never hold. */
const TYPED = 'Tr0ub4dor&3-staple';
const PSEUDONYM_KEY = new Uint8Array(32).fill(5);
const ROOT_UNCHECKED = `unchecked-user:${nameDigest(PSEUDONYM_KEY, 'user', 'root')}`;

class CheckedSink extends MemoryAuditSink {
  override record(entry: AuditEntry): void {
    checkEntry(entry);
    super.record(entry);
  }
}
const audit = new CheckedSink();
let database: Awaited<ReturnType<typeof identityDatabase>>;
let redis: Redis;
const apps: Service[] = [];
const random = testRandom('identity refusal records key prefix');
const runPrefix = `ll:test:idrr:${process.pid}:${Math.floor(random() * 2 ** 32).toString(16)}:`;

/** Lookups of a record's actor: how many were made, how many run now and at most, and a gate that holds them while `held`. */
const lookups = { made: 0, running: 0, peak: 0, held: false, waiting: [] as Array<() => void> };
const releaseLookups = (): void => {
  for (const release of lookups.waiting.splice(0)) release();
};

before(async () => {
  database = await identityDatabase('ll_identity_refusal_records', { clock: () => NOW, lockout: { failuresMax: 100_000, lockMs: 60_000 } });
  await bootstrap(database.identity, database.config, { info: () => {} }, new MemoryAuditSink());
  const lookup = database.identity.knownAccount.bind(database.identity);
  database.identity.knownAccount = async (kind, name) => {
    lookups.made += 1;
    lookups.running += 1;
    lookups.peak = Math.max(lookups.peak, lookups.running);
    try {
      if (lookups.held) await new Promise<void>((resolve) => lookups.waiting.push(resolve));
      return await lookup(kind, name);
    } finally {
      lookups.running -= 1;
    }
  };
  redis = new Redis('redis://127.0.0.1:6379', { maxRetriesPerRequest: 1 });
});

after(async () => {
  lookups.held = false;
  releaseLookups();
  for (const app of apps) await app.close();
  const keys = await redis.keys(`${runPrefix}*`);
  if (keys.length > 0) await redis.del(...keys);
  redis.disconnect();
  await database.pool.end();
  await database.db.drop();
});

async function serve(options: Partial<IdentityServiceOptions> = {}): Promise<Service> {
  const app = await buildIdentityService({ identity: database.identity, pool: database.pool, issuer: ISSUER, audit, clock: () => NOW, logger: false, pseudonymKey: PSEUDONYM_KEY, ...options });
  apps.push(app);
  return app;
}

/** A service whose token endpoint allows each address one request (and every route 1000/s). */
async function throttled(name: string): Promise<Service> {
  return serve({
    resilience: { rateLimit: { bucket: new RedisTokenBucket({ redis, keyPrefix: `${runPrefix}${name}:` }), defaultLimit: { ratePerSecond: 1000, burst: 1000 } } },
    tokenRateLimit: { ratePerSecond: 0.001, burst: 1 },
    // Refusals over the limit are recorded in summaries: written every 100 ms here, not 10 s.
    rateLimitedSummary: { intervalMs: 100 },
  });
}

const token = (payload: Record<string, unknown>, extra: Partial<InjectOptions> = {}): InjectOptions => ({ method: 'POST', url: '/oauth/token', payload, ...extra });

/** The records of `action` (and `which`) from index `from` on, waiting (up to 5 s) until there are `count`. */
async function records(from: number, count: number, action = TOKEN_ACTION, which: (e: AuditEntry) => boolean = () => true): Promise<AuditEntry[]> {
  for (let waitedMs = 0; ; waitedMs += 10) {
    const found = audit.entries.slice(from).filter((e) => e.action === action && which(e));
    if (found.length >= count || waitedMs >= 5000) return found;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const settle = (ms = 50) => new Promise((resolve) => setTimeout(resolve, ms));

const refusedIn = (e: AuditEntry): number => (e.payload as { refused: number }).refused;

/** The summaries of rate-limited requests of `action` from index `from` on, waiting (up to 5 s) until they count `refused` requests. */
async function summarised(from: number, refused: number, action = TOKEN_ACTION): Promise<AuditEntry[]> {
  for (let waitedMs = 0; ; waitedMs += 10) {
    const found = audit.entries.slice(from).filter((e) => e.action === action && e.reason === 'rate_limited');
    if (found.reduce((n, e) => n + refusedIn(e), 0) >= refused || waitedMs >= 5000) return found;
    await settle(10);
  }
}

/** Sends `body` to `path` over a socket of its own, and hangs up at once (before any answer) when `hangUp`. */
function raw(app: Service, request: string, hangUp: boolean): Promise<string> {
  const { port } = app.server.address() as net.AddressInfo;
  return new Promise((resolve) => {
    let answer = '';
    const socket = net.connect(port, '127.0.0.1', () => {
      socket.write(request);
      if (hangUp) {
        socket.destroy();
        resolve('');
      }
    });
    socket.on('data', (chunk) => {
      answer += String(chunk);
      if (answer.includes('\r\n\r\n')) {
        socket.destroy();
        resolve(answer);
      }
    });
    socket.on('error', () => resolve(answer));
  });
}
const post = (path: string, body: string, host = true) =>
  `POST ${path} HTTP/1.1\r\n${host ? 'Host: identity.test\r\n' : ''}Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;

describe('refusals that shed work look nothing up', () => {
  test('a flood of throttled requests naming a real user makes no lookup and names the user unchecked-user:<digest>, never unknown-user', async () => {
    const app = await throttled('flood');
    const address = '198.51.100.7';
    const login = (password: unknown) => token({ grant_type: 'password', username: 'root', password, audience: 'ledger' }, { remoteAddress: address });
    assert.equal((await app.inject(login('the one allowed'))).statusCode, 400);
    await settle();
    const from = audit.entries.length;
    const made = lookups.made;
    const statuses = new Set<number>();
    const floodStart = Date.now();
    for (let wave = 0; wave < 6; wave += 1) {
      for (const r of await Promise.all(Array.from({ length: 50 }, (_, i) => app.inject(login(`guess-${wave}-${i}`))))) statuses.add(r.statusCode);
    }
    const floodMs = Date.now() - floodStart;
    assert.deepEqual([...statuses], [429]);
    // Recorded in summaries (one per actor, address, route, resource and audience an interval),
    // not one record each: 300 requests, one key, one summary for each 100 ms interval the flood
    // spanned (a loaded machine takes a few).
    const refused = await summarised(from, 300);
    await settle();
    assert.equal(lookups.made - made, 0, '300 throttled requests looked accounts up');
    assert.equal(refused.reduce((n, e) => n + refusedIn(e), 0), 300);
    assert.ok(refused.length <= Math.ceil(floodMs / 100) + 1, `${refused.length} summaries of one key over a flood of ${floodMs} ms`);
    assert.equal(audit.entries.length - from, refused.length, 'nothing but the summaries was recorded');
    assert.deepEqual(new Set(refused.map((e) => `${e.actor.type} ${e.actor.id} ${e.reason} ${e.origin.ip}`)), new Set([`user ${ROOT_UNCHECKED} rate_limited ${address}`]));
    // The label's digest is the one `unknown-user:` gives the same text: a name no user has,
    // throttled, is matched to its other records by the digest alone.
    const typed = await app.inject(token({ grant_type: 'password', username: TYPED, password: 'x', audience: 'ledger' }, { remoteAddress: address }));
    assert.equal(typed.statusCode, 429);
    const [throttledTyped] = (await summarised(from, 301)).filter((e) => e.actor.id !== ROOT_UNCHECKED);
    const counted = audit.entries.length;
    const unthrottled = await serve();
    assert.equal((await unthrottled.inject(token({ grant_type: 'password', username: TYPED, password: 'wrong password', audience: 'ledger' }))).statusCode, 400);
    const [refusedTyped] = await records(counted, 1);
    assert.equal(throttledTyped?.actor.id.replace(/^unchecked-/, 'unknown-'), refusedTyped?.actor.id);
    assert.match(String(refusedTyped?.actor.id), /^unknown-user:[0-9a-f]{16}$/);
    // A body the schema refuses is still looked up: the user who exists is named.
    const beforeSchema = audit.entries.length;
    const schema = await app.inject(token({ grant_type: 'password', username: 'ROOT', password: 7, audience: 'ledger' }, { remoteAddress: '198.51.100.8' }));
    assert.equal(schema.statusCode, 400);
    const [named] = await records(beforeSchema, 1);
    assert.deepEqual([named?.actor.id, named?.reason], ['root', 'invalid_request']);
    assert.equal(JSON.stringify(audit.entries.slice(from)).includes(TYPED), false);
  });

  test('a login the database could not serve (503) names the user unchecked-user:<digest>, not as a name no user has', async () => {
    const app = await serve();
    const from = audit.entries.length;
    database.identity.authenticate = () => Promise.reject(new IdentityError('temporarily_unavailable', 'the database did not answer in time'));
    try {
      const r = await app.inject(token({ grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger' }));
      assert.equal(r.statusCode, 503, r.body);
    } finally {
      delete (database.identity as Partial<Identity>).authenticate;
    }
    const [record] = await records(from, 1);
    assert.deepEqual([record?.actor.id, record?.reason], [ROOT_UNCHECKED, 'temporarily_unavailable']);
  });
});

describe('one bound on every lookup of a record\'s actor', () => {
  test('the handler\'s lookups and the early refusals\' together run at most half the pool at once; past the backlog, unchecked-user', async () => {
    const app = await serve();
    const from = audit.entries.length;
    lookups.held = true;
    lookups.peak = 0;
    try {
      // 30 refused by the handler (no password: refused before any lookup, looked up after the
      // answer) and 30 by the schema, all naming a user who exists: within the backlog (64).
      const answers = await Promise.all([
        ...Array.from({ length: 30 }, (_, i) => app.inject(token({ grant_type: 'password', username: 'root', audience: 'ledger' }, { remoteAddress: `10.1.0.${i}` }))),
        ...Array.from({ length: 30 }, (_, i) => app.inject(token({ grant_type: 'password', username: 'root', password: i, audience: 'ledger' }, { remoteAddress: `10.2.0.${i}` }))),
      ]);
      assert.deepEqual([...new Set(answers.map((r) => r.statusCode))], [400]);
      await settle();
      // The test's pool holds 4 connections.
      assert.equal(lookups.running, 2, 'lookups running at once');
      for (let i = 0; i < 200 && audit.entries.slice(from).length < 60; i += 1) {
        releaseLookups();
        await settle(5);
      }
      assert.ok(lookups.peak <= 2, `${lookups.peak} lookups ran at once`);
      const named = (await records(from, 60)).map((e) => e.actor.id);
      assert.deepEqual([named.length, new Set(named)], [60, new Set(['root'])], 'each looked up in its turn');

      // More than the backlog (64 records waiting): the rest are named at once, unchecked.
      const flooded = audit.entries.length;
      lookups.peak = 0;
      const flood = await Promise.all(Array.from({ length: 300 }, (_, i) => app.inject(token({ grant_type: 'password', username: 'root', password: i, audience: 'ledger' }, { remoteAddress: `10.3.${i >> 8}.${i & 255}` }))));
      assert.deepEqual([...new Set(flood.map((r) => r.statusCode))], [400]);
      await settle();
      assert.equal(audit.entries.slice(flooded).filter((e) => e.actor.id === ROOT_UNCHECKED).length, 300 - 64);
      for (let i = 0; i < 1000 && audit.entries.slice(flooded).length < 300; i += 1) {
        releaseLookups();
        await settle(2);
      }
      const all = (await records(flooded, 300)).map((e) => e.actor.id);
      assert.deepEqual([all.filter((id) => id === 'root').length, all.filter((id) => id === ROOT_UNCHECKED).length], [64, 236]);
      assert.ok(lookups.peak <= 2, `${lookups.peak} lookups ran at once`);
      assert.equal(all.some((id) => id.startsWith('unknown-user:')), false, 'a user who exists is never named as a name no user has');
    } finally {
      lookups.held = false;
      releaseLookups();
    }
  });
});

describe('a refusal is recorded whether or not its client stays', () => {
  test('throttled (429) requests whose client hangs up before the answer are each counted, in summaries', async () => {
    const app = await throttled('hangup');
    await app.listen({ port: 0, host: '127.0.0.1' });
    const body = JSON.stringify({ grant_type: 'password', username: 'root', password: 'wrong', audience: 'ledger' });
    assert.match(await raw(app, post('/oauth/token', body), false), /^HTTP\/1\.1 400/);
    await settle(200);
    const from = audit.entries.length;
    for (let i = 0; i < 20; i += 1) await raw(app, post('/oauth/token', body), true);
    const schema = JSON.stringify({ grant_type: 'password', username: 'root', password: 5, audience: 'ledger' });
    for (let i = 0; i < 20; i += 1) await raw(app, post('/oauth/token', schema), true);
    await settle(500);
    // Every request from the throttled address is a 429 (the rate limit acts before the schema),
    // counted in the summaries of its key: none is left out.
    const summaries = await summarised(from, 40);
    assert.equal(summaries.reduce((n, e) => n + refusedIn(e), 0), 40, 'every request from the throttled address is a 429, counted');
    assert.equal(audit.entries.length - from, summaries.length, 'nothing but the summaries was recorded');
  });
});

describe('the reasons recorded are the ones the documentation gives', () => {
  test('a revocation naming an unknown grant type is answered and recorded unsupported_grant_type, as docs/security.md says', async () => {
    const app = await serve();
    const from = audit.entries.length;
    const r = await app.inject({ method: 'POST', url: '/oauth/revoke', payload: { token: 'x', grant_type: 'foo' } });
    assert.deepEqual([r.statusCode, r.json<{ error: string }>().error], [400, 'unsupported_grant_type']);
    const [record] = await records(from, 1, AUDIT_ACTIONS.revoke);
    assert.equal(record?.reason, 'unsupported_grant_type');
    const doc = await readFile(new URL('../../../docs/security.md', import.meta.url), 'utf8');
    const row = doc.split('\n').find((line) => line.startsWith('| a revocation (`POST /oauth/revoke`)'));
    assert.match(String(row), /`unsupported_grant_type`/);
  });

  test('the runtime\'s 400 for a request without Host is recorded invalid_request, not validation_error', async () => {
    const app = await serve();
    await app.listen({ port: 0, host: '127.0.0.1' });
    const from = audit.entries.length;
    const answer = await raw(app, post('/oauth/token', JSON.stringify({ grant_type: 'password', username: 'root', password: 'x', audience: 'ledger' }), false), false);
    assert.match(answer, /^HTTP\/1\.1 400/);
    const [record] = await records(from, 1);
    assert.deepEqual([record?.reason, record?.payload?.problem, record?.payload?.status], ['invalid_request', 'validation-error', 400]);
    const revoked = audit.entries.length;
    assert.match(await raw(app, post('/oauth/revoke', JSON.stringify({ token: 'x' }), false), false), /^HTTP\/1\.1 400/);
    const [revocation] = await records(revoked, 1, AUDIT_ACTIONS.revoke);
    assert.equal(revocation?.reason, 'invalid_request');
  });
});

describe('audience is recorded only when it is an audience the service issues', () => {
  test('any other text is a keyed digest, the same in the handler\'s records and the early refusals\', never as typed', async () => {
    const app = await serve();
    const limited = await throttled('audience');
    const from = audit.entries.length;
    const answers = [
      // The handler: invalid_target, and a wrong password for a listed audience.
      await app.inject(token({ grant_type: 'password', username: 'root', password: PASSWORD, audience: TYPED })),
      await app.inject(token({ grant_type: 'password', username: 'root', password: 'wrong password', audience: 'ledger' })),
      // The schema.
      await app.inject(token({ grant_type: 'password', username: 'root', password: 7, audience: TYPED })),
      await app.inject(token({ grant_type: 'password', username: 'root', password: 7, audience: 'identity' })),
      // The rate limit (the first spends the address's one request).
      await limited.inject(token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'x', audience: TYPED })),
      await limited.inject(token({ grant_type: 'client_credentials', client_id: 'payments', client_secret: 'x', audience: TYPED })),
    ];
    assert.deepEqual(answers.map((r) => r.statusCode), [400, 400, 400, 400, 401, 429]);
    // The records of these six requests (a summary by its first refusal's request id): a record
    // another test's service writes late (a looked-up actor, a summary) is not one of them.
    const ids = new Set(answers.map((r) => String(r.headers['x-request-id'])));
    const audiences = (await records(from, 6, TOKEN_ACTION, (e) => ids.has(String(e.origin.requestId)))).map((e) => e.payload?.audience);
    assert.equal(audiences.length, 6);
    const digest = audiences.find((a) => String(a).startsWith('unlisted-audience:'));
    assert.match(String(digest), /^unlisted-audience:[0-9a-f]{16}$/);
    assert.deepEqual(audiences.map((a) => (a === digest ? 'digest' : a)).sort(), ['digest', 'digest', 'digest', 'digest', 'identity', 'ledger']);
    assert.equal(JSON.stringify(audit.entries.slice(from)).includes(TYPED), false, 'the trail holds what was typed as the audience');

    // The audiences given are the ones recorded as sent.
    const own = await serve({ audiences: ['ledger', 'reports'] });
    const counted = audit.entries.length;
    const sent = [
      await own.inject(token({ grant_type: 'password', username: 'root', password: 7, audience: 'reports' })),
      await own.inject(token({ grant_type: 'password', username: 'root', password: 7, audience: 'identity' })),
    ].map((r) => String(r.headers['x-request-id']));
    const given = (await records(counted, 2, TOKEN_ACTION, (e) => sent.includes(String(e.origin.requestId))))
      .sort((a, b) => sent.indexOf(String(a.origin.requestId)) - sent.indexOf(String(b.origin.requestId)))
      .map((e) => String(e.payload?.audience));
    assert.deepEqual([given[0], /^unlisted-audience:[0-9a-f]{16}$/.test(String(given[1]))], ['reports', true]);
  });
});

/**
 * The token endpoint when the audit trail is not keeping up: a grant the trail cannot record is
 * not handed out, and nothing is answered 500. With the sink saturated (nine tenths of its
 * buffer, as PostgresAuditSink reports it) a token request is refused 503 with Retry-After
 * before any work; with its buffer full (record throws AuditBufferFullError) the grant's record,
 * written before the grant commits, is refused and the grant rolls back: answered 503 the same
 * way, and a retry finds the refresh token unrotated. A revocation is done either way:
 * withholding it would leave a token live that its holder asked to end. A change to
 * credentials (a user created, two-factor enrolment, a key rotated) is refused the same way
 * while the trail is saturated; one whose record is refused after it was made is answered as
 * made, never 500, and every lost record is counted on /metrics.
 */
import assert from 'node:assert/strict';
import { after, before, beforeEach, test } from 'node:test';
import { AuditBufferFullError, MemoryAuditSink, type AuditEntry } from '@ledgerline/audit';
import { ROLES } from '@ledgerline/authz';
import type { Service } from '@ledgerline/service-runtime';
import { buildIdentityService, TOKEN_ACTION } from '../src/app.ts';
import { bootstrap } from '../src/bootstrap.ts';
import { identityDatabase, ISSUER, PASSWORD } from './support.ts';

const NOW = Date.UTC(2026, 10, 23, 10, 0);

/** A sink whose store is behind: `saturated` and a throwing `record` (for every entry, or those `refuses` picks) set by the test. */
class BehindSink extends MemoryAuditSink {
  saturated = false;
  full = false;
  refuses: ((entry: AuditEntry) => boolean) | null = null;
  override record(entry: AuditEntry): void {
    if (this.full || this.refuses?.(entry) === true) throw new AuditBufferFullError('audit buffer holds its bound; the audit store is not keeping up');
    super.record(entry);
  }
}

const audit = new BehindSink();
let database: Awaited<ReturnType<typeof identityDatabase>>;
let app: Service;
before(async () => {
  database = await identityDatabase('ll_identity_backpressure', { clock: () => NOW, lockout: { failuresMax: 1000, lockMs: 60_000 } });
  await bootstrap(database.identity, database.config, { info: () => {} }, new MemoryAuditSink());
  app = await buildIdentityService({
    identity: database.identity,
    pool: database.pool,
    issuer: ISSUER,
    audit,
    clock: () => NOW,
    logger: false,
    resilience: { metrics: { processMetrics: false } },
  });
});
after(async () => {
  await app.close();
  await database.pool.end();
  await database.db.drop();
});
beforeEach(() => {
  audit.saturated = false;
  audit.full = false;
  audit.refuses = null;
});

const login = () => app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'password', username: 'root', password: PASSWORD, audience: 'ledger' } });
const sessions = async (): Promise<number> => (await database.pool.query<{ n: number }>('SELECT count(*)::integer AS n FROM identity.refresh_tokens')).rows[0]?.n ?? 0;

test('saturated: a token request is refused 503 with Retry-After before any work, and queues nothing', async () => {
  audit.saturated = true;
  const [records, before] = [audit.entries.length, await sessions()];
  const res = await login();
  assert.equal(res.statusCode, 503, res.body);
  assert.equal(res.headers['retry-after'], '1');
  assert.equal(res.json<{ error: string }>().error, 'temporarily_unavailable');
  assert.equal(await sessions(), before, 'no session was begun');
  assert.equal(audit.entries.length, records, 'the refusal is logged, not queued behind the records the trail is behind on');
});

test('full: a grant the trail cannot record is answered 503, never 500, and never made: no session is begun', async () => {
  audit.full = true;
  const before = await sessions();
  const res = await login();
  assert.equal(await sessions(), before, 'the grant rolled back with its record');
  assert.equal(res.statusCode, 503, res.body);
  assert.equal(res.headers['retry-after'], '1');
  assert.equal(res.json<{ error: string; access_token?: string }>().access_token, undefined);
  // A refusal is still answered as it is: only its record is lost (and logged).
  const wrong = await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'password', username: 'root', password: 'not the password', audience: 'ledger' } });
  assert.equal(wrong.statusCode, 400, wrong.body);
  audit.full = false;
  const ok = await login();
  assert.equal(ok.statusCode, 200, ok.body);
  assert.ok(audit.entries.some((e) => e.action === TOKEN_ACTION && e.outcome === 'success'));
});

test('full: a revocation is done and answered 200, its record lost to the log', async () => {
  const granted = await login();
  assert.equal(granted.statusCode, 200, granted.body);
  const { refresh_token: refreshToken } = granted.json<{ refresh_token: string }>();
  audit.full = true;
  const revoked = await app.inject({ method: 'POST', url: '/oauth/revoke', payload: { token: refreshToken } });
  assert.equal(revoked.statusCode, 200, revoked.body);
  audit.full = false;
  const refreshed = await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: refreshToken } });
  assert.equal(refreshed.statusCode, 400, 'the revoked token no longer refreshes');
});

test('full: a refresh the trail cannot record rolls back, so the retry Retry-After invites succeeds with the same token', async () => {
  const granted = await login();
  assert.equal(granted.statusCode, 200, granted.body);
  const { refresh_token: refreshToken } = granted.json<{ refresh_token: string }>();
  const refresh = () => app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'refresh_token', refresh_token: refreshToken } });
  audit.full = true;
  const refused = await refresh();
  assert.equal(refused.statusCode, 503, refused.body);
  assert.equal(refused.headers['retry-after'], '1');
  audit.full = false;
  const retried = await refresh();
  assert.equal(retried.statusCode, 200, `the token was not spent by the refused refresh: ${retried.body}`);
  assert.ok(!audit.entries.some((e) => e.reason === 'refresh_token_reused'), 'no reuse was recorded');
});

test('a grant names the audience it accepted as sent: a client\'s registered audience, listed or not', async () => {
  await database.identity.createClient({ id: 'reports', secret: 'reports-secret-1', roles: [], audiences: ['reporting'] });
  const from = audit.entries.length;
  const res = await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'client_credentials', client_id: 'reports', client_secret: 'reports-secret-1', audience: 'reporting' } });
  assert.equal(res.statusCode, 200, res.body);
  const granted = audit.entries.slice(from).find((e) => e.action === TOKEN_ACTION && e.outcome === 'success');
  assert.deepEqual([granted?.actor, (granted?.payload as { audience?: string } | undefined)?.audience], [{ type: 'service', id: 'reports' }, 'reporting']);
});

/** Root's bearer header for the identity API itself (taken before the trail is made to fall behind). */
async function rootBearer(): Promise<{ authorization: string }> {
  const res = await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'password', username: 'root', password: PASSWORD, audience: 'identity' } });
  assert.equal(res.statusCode, 200, res.body);
  return { authorization: `Bearer ${res.json<{ access_token: string }>().access_token}` };
}
const usersNamed = async (username: string): Promise<number> =>
  (await database.pool.query<{ n: number }>('SELECT count(*)::integer AS n FROM identity.users WHERE username = $1', [username])).rows[0]?.n ?? -1;
async function unrecordedTotal(): Promise<number | undefined> {
  const text = (await app.inject({ method: 'GET', url: '/metrics' })).body;
  const line = text.split('\n').find((l) => l.startsWith('ledgerline_audit_requests_unrecorded_total '));
  return line === undefined ? undefined : Number(line.split(' ')[1]);
}
const newUser = (headers: { authorization: string }, username: string) =>
  app.inject({ method: 'POST', url: '/v1/users', headers, payload: { username, password: PASSWORD, roles: [ROLES.customer] } });

test('saturated: a change to credentials is refused 503 with Retry-After before any work, and no change is recorded', async () => {
  const headers = await rootBearer();
  const from = audit.entries.length;
  audit.saturated = true;
  const res = await newUser(headers, 'made-while-saturated');
  assert.equal(res.statusCode, 503, res.body);
  assert.equal(res.headers['retry-after'], '1');
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/);
  assert.equal(await usersNamed('made-while-saturated'), 0, 'no user was made');
  assert.deepEqual(audit.entries.slice(from).filter((e) => e.action === 'identity.user.create'), [], 'nothing was done, so no change is recorded');
  const rotated = await app.inject({ method: 'POST', url: '/v1/keys/rotate', headers });
  assert.equal(rotated.statusCode, 503, rotated.body);
});

test('full: a change whose record the trail refuses after it was made is answered as made, never 500, and the lost record is counted', async () => {
  const headers = await rootBearer();
  const before = (await unrecordedTotal()) ?? Number.NaN;
  assert.ok(Number.isFinite(before), '/metrics shows the counter');
  // The buffer fills between the authorization decision (recorded) and the change's record.
  audit.refuses = (e) => e.action === 'identity.user.create';
  const res = await newUser(headers, 'made-while-full');
  audit.refuses = null;
  assert.equal(res.statusCode, 201, res.body);
  assert.equal(await usersNamed('made-while-full'), 1, 'the user was made');
  assert.equal(await unrecordedTotal(), before + 1, 'its lost record is counted');
  // The same user again is refused as before (409), and recorded once the trail takes records again.
  const again = await newUser(headers, 'made-while-full');
  assert.equal(again.statusCode, 409, again.body);
  assert.ok(audit.entries.some((e) => e.action === 'identity.user.create' && e.outcome === 'failure' && e.reason === 'conflict'));
});

test('full: an allow the trail cannot record is refused 503 with Retry-After, never 500, and not run; a deny is answered as a deny; each lost decision is counted', async () => {
  const headers = await rootBearer();
  await database.identity.createUser({ username: 'cora-customer', password: PASSWORD, roles: [ROLES.customer] });
  const customer = await app.inject({ method: 'POST', url: '/oauth/token', payload: { grant_type: 'password', username: 'cora-customer', password: PASSWORD, audience: 'identity' } });
  assert.equal(customer.statusCode, 200, customer.body);
  const customerHeaders = { authorization: `Bearer ${customer.json<{ access_token: string }>().access_token}` };
  const decisionsLost = async (): Promise<number> => {
    const line = (await app.inject({ method: 'GET', url: '/metrics' })).body.split('\n').find((l) => l.startsWith('ledgerline_audit_decisions_unrecorded_total '));
    return Number(line?.split(' ')[1]);
  };
  const before = await decisionsLost();
  assert.ok(Number.isFinite(before), '/metrics shows the counter');
  audit.full = true;
  const allowed = await newUser(headers, 'decided-while-full');
  const forbidden = await newUser(customerHeaders, 'decided-by-a-customer');
  const anonymous = await app.inject({ method: 'POST', url: '/v1/keys/rotate' });
  audit.full = false;
  assert.equal(allowed.statusCode, 503, allowed.body);
  assert.equal(allowed.headers['retry-after'], '1');
  assert.match(allowed.json<{ type: string }>().type, /audit-unavailable$/);
  assert.equal(await usersNamed('decided-while-full'), 0, 'the handler did not run');
  // A deny grants nothing: it is answered as it would be, its lost record logged and counted.
  assert.equal(forbidden.statusCode, 403, forbidden.body);
  assert.equal(await usersNamed('decided-by-a-customer'), 0);
  assert.equal(anonymous.statusCode, 401, anonymous.body);
  assert.equal(anonymous.headers['retry-after'], undefined);
  assert.equal(await decisionsLost(), before + 3, 'the three lost decisions are counted');
});

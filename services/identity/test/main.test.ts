/**
 * The identity service as a process of its own, on a database no ledger shares: its audit
 * records (token requests) are sequenced into the Merkle log by its own sequencer, a signed
 * checkpoint covers them, the log verifies, and SIGTERM leaves nothing in the queue. Its
 * signing keys are stored encrypted under IDENTITY_KEY_ENCRYPTION_KEY, which production
 * requires.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { loadSigningKey, SEQUENCER_APPLICATION_NAME, verifyLog } from '@ledgerline/audit';
import { behindFaultProxy, createTestDatabase, cutRepeatedly, overLocalSocket, testRandom, type TestDatabase } from '@ledgerline/testing';
import { poll, startIdentityProcess, type StartedIdentity } from './support.ts';

const MAIN = fileURLToPath(new URL('../src/main.ts', import.meta.url));
const SECRET = 'identity-main-test-secret';
const startIdentity = (env: Record<string, string>): Promise<StartedIdentity> => startIdentityProcess({ IDENTITY_BOOTSTRAP_CLIENT_SECRET: SECRET, ...env });

let db: TestDatabase;
let pool: pg.Pool;
before(async () => {
  db = await createTestDatabase('ll_identity_main');
  pool = new pg.Pool({ connectionString: db.url, max: 2 });
});
after(async () => {
  await pool.end();
  await db.drop();
});

/** The bootstrap client's token request (client credentials), with `secret`. */
function clientToken(base: string, secret = SECRET): Promise<Response> {
  const form = { grant_type: 'client_credentials', client_id: 'payments', client_secret: secret, audience: 'ledger' };
  return fetch(`${base}/oauth/token`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams(form).toString() });
}

test('alone on its database, the identity service sequences its own audit records and signs checkpoints', async () => {
  const service = await startIdentity({
    DATABASE_URL: db.url,
    AUDIT_CHECKPOINT_INTERVAL_MS: '0',
    IDENTITY_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64url'),
  });
  let code: number | null | undefined;
  try {
    assert.equal((await clientToken(service.base)).status, 200);
    assert.equal((await clientToken(service.base, 'a wrong secret')).status, 401);

    const records = await poll('both token requests in the log', async () => {
      const r = await pool.query<{ seq: string; outcome: string; reason: string | null }>(
        `SELECT seq::text, outcome, reason FROM audit.records WHERE action = 'identity.token' ORDER BY seq`,
      );
      return r.rows.length >= 2 ? r.rows : null;
    });
    assert.deepEqual(records.map((r) => [r.outcome, r.reason]), [['success', null], ['failure', 'invalid_client']]);
    // Its sequencer thread is counted on /metrics, where a replaced one would show.
    const metrics = await (await fetch(`${service.base}/metrics`)).text();
    assert.match(metrics, /^ledgerline_audit_sequencer_restarts_total(\{[^}]*\})? 0$/m);
    const last = BigInt(records.at(-1)!.seq);
    await poll('a checkpoint over them', async () => {
      const r = await pool.query<{ n: string }>('SELECT coalesce(max(tree_size), 0)::text AS n FROM audit.checkpoints');
      return BigInt(r.rows[0]!.n) > last ? true : null;
    });
  } finally {
    code = await service.stop();
  }
  assert.equal(code, 0, 'a clean stop');
  const keys = await pool.query<{ clear: number; sealed: number }>(
    'SELECT count(*) FILTER (WHERE private_jwk IS NOT NULL)::int AS clear, count(*) FILTER (WHERE private_jwe IS NOT NULL)::int AS sealed FROM identity.signing_keys',
  );
  assert.deepEqual(keys.rows[0], { clear: 0, sealed: 1 }, 'the signing key is stored only encrypted');
  assert.equal((await pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue')).rows[0]!.n, 0, 'nothing left queued');
  const report = await verifyLog(pool, { publicKey: loadSigningKey(undefined, { production: false }).publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});

test('with AUDIT_SEQUENCER_ENABLED=false the identity service queues its records and leaves them to another process', async () => {
  const own = await createTestDatabase('ll_identity_noseq');
  const ownPool = new pg.Pool({ connectionString: own.url, max: 2 });
  try {
    const service = await startIdentity({ DATABASE_URL: own.url, AUDIT_SEQUENCER_ENABLED: 'false', AUDIT_SEQUENCER_INTERVAL_MS: '10' });
    try {
      assert.equal((await clientToken(service.base)).status, 200);
      await poll('the token request in the queue', async () => {
        const r = await ownPool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.queue');
        return (r.rows[0]?.n ?? 0) >= 1 ? true : null;
      });
      // A sequencer would integrate it within a round (10 ms apart); give it a hundred.
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const sequencers = await ownPool.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1', [SEQUENCER_APPLICATION_NAME]);
      assert.equal(sequencers.rows[0]?.n, 0, 'no sequencer connection');
      const integrated = await ownPool.query<{ n: number }>("SELECT count(*)::int AS n FROM audit.records WHERE action = 'identity.token'");
      assert.equal(integrated.rows[0]?.n, 0, 'nothing integrated');
    } finally {
      await service.stop();
    }
  } finally {
    await ownPool.end();
    await own.drop();
  }
});

test('with DATABASE_SESSION_URL the migrations and the sequencer run there and the requests on DATABASE_URL', async () => {
  // Given the service with two ways into one fresh database: DATABASE_URL over TCP, as a
  // transaction pooler would be, and DATABASE_SESSION_URL over the local socket, as a direct
  // connection would be,
  const own = await createTestDatabase('ll_identity_session');
  const ownPool = new pg.Pool({ connectionString: own.url, max: 2 });
  let code: number | null | undefined;
  try {
    const service = await startIdentity({
      DATABASE_URL: `${own.url}?application_name=ll-pooled`,
      DATABASE_SESSION_URL: overLocalSocket(own.url, 'll-session'),
      AUDIT_CHECKPOINT_INTERVAL_MS: '0',
    });
    try {
      // when a token request is answered and sequenced,
      assert.equal((await clientToken(service.base)).status, 200);
      await poll('the token request in the log', async () => {
        const r = await ownPool.query<{ n: number }>("SELECT count(*)::int AS n FROM audit.records WHERE action = 'identity.token'");
        return (r.rows[0]?.n ?? 0) >= 1 ? true : null;
      });
      // then the sequencer's connections came over the socket (DATABASE_SESSION_URL) under
      // their own name, and the requests' over TCP (DATABASE_URL).
      const connections = await ownPool.query<{ name: string; socket: boolean; n: number }>(
        `SELECT application_name AS name, client_addr IS NULL AS socket, count(*)::int AS n FROM pg_stat_activity
          WHERE datname = current_database() AND application_name IN ($1, 'll-pooled', 'll-session') GROUP BY 1, 2 ORDER BY 1, 2`,
        [SEQUENCER_APPLICATION_NAME],
      );
      const seen = connections.rows.map((r) => [r.name, r.socket]);
      assert.deepEqual(seen.filter(([name]) => name === SEQUENCER_APPLICATION_NAME), [[SEQUENCER_APPLICATION_NAME, true]], JSON.stringify(connections.rows));
      assert.deepEqual(seen.filter(([name]) => name === 'll-pooled'), [['ll-pooled', false]], JSON.stringify(connections.rows));
    } finally {
      code = await service.stop();
    }
  } finally {
    await ownPool.end();
    await own.drop();
  }
  assert.equal(code, 0, 'a clean stop');
});

test('its database connections cut under load: requests fail while they are, the process stays up and answers after', async () => {
  // Given the service with DATABASE_URL through a proxy that resets every connection every few
  // milliseconds (the sequencer and the migrations direct, on DATABASE_SESSION_URL),
  const own = await createTestDatabase('ll_identity_cut');
  const { proxy, url: proxied } = await behindFaultProxy(own.url);
  let code: number | null | undefined;
  try {
    const service = await startIdentity({ DATABASE_URL: proxied, DATABASE_SESSION_URL: own.url });
    try {
      // when token requests keep coming while the connections are cut,
      const cutter = cutRepeatedly(proxy, 10, 20, testRandom('identity connection cuts'));
      const statuses = new Map<number, number>();
      let cuts: number;
      try {
        // At least 150 rounds; then on until one token came through between cuts (a busy
        // machine makes each request longer, so more of them meet a cut: in a CI run under
        // load, all 600 of the first 150 rounds did), up to 600 rounds.
        for (let i = 0; i < 600 && (i < 150 || (statuses.get(200) ?? 0) === 0); i += 1) {
          const res = await Promise.all(Array.from({ length: 4 }, () => clientToken(service.base)));
          for (const r of res) statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
        }
      } finally {
        cuts = await cutter.stop();
      }
      // then every request got an answer (tokens, or a 5xx while its connection was cut), the
      // process lived through it, and with the connections left alone it issues tokens again.
      assert.ok(cuts > 0, 'connections were cut');
      assert.ok([...statuses.keys()].every((s) => s === 200 || s >= 500), JSON.stringify([...statuses]));
      assert.ok((statuses.get(200) ?? 0) > 0, JSON.stringify([...statuses]));
      await poll('a token after the cuts', async () => ((await clientToken(service.base)).status === 200 ? true : null));
    } finally {
      code = await service.stop();
    }
  } finally {
    await proxy.close();
    await own.drop();
  }
  assert.equal(code, 0, 'a clean stop, not a crash');
});

test('BODY_LIMIT_BYTES from the environment bounds every request body (64 KiB unless set)', async () => {
  // A database of its own: the first test's signing key is sealed under a key this one does not have.
  const own = await createTestDatabase('ll_identity_body_limit');
  try {
    const service = await startIdentity({ DATABASE_URL: own.url, BODY_LIMIT_BYTES: '2048', AUDIT_ENABLED: 'false' });
    try {
      const form = (scope: number) => new URLSearchParams({ grant_type: 'client_credentials', client_id: 'payments', client_secret: SECRET, audience: 'ledger', scope: 'a'.repeat(scope) }).toString();
      const over = await fetch(`${service.base}/oauth/token`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: form(3000) });
      assert.equal(over.status, 413);
      assert.match(String(over.headers.get('content-type')), /^application\/problem\+json/);
      assert.match(((await over.json()) as { detail: string }).detail, /limit of 2048 bytes/);
      assert.equal((await clientToken(service.base)).status, 200);
    } finally {
      await service.stop();
    }
  } finally {
    await own.drop();
  }
});

test('in production the service refuses to start without a key-encryption key, or with a malformed one, naming the variable', () => {
  for (const [value, message] of [
    ['', /IDENTITY_KEY_ENCRYPTION_KEY is required in production/],
    ['too-short', /IDENTITY_KEY_ENCRYPTION_KEY must be 32 bytes; got 6/],
  ] as const) {
    const r = spawnSync(process.execPath, [MAIN], {
      env: { ...process.env, NODE_ENV: 'production', DATABASE_URL: db.url, LOG_LEVEL: 'warn', IDENTITY_KEY_ENCRYPTION_KEY: value },
      encoding: 'utf8',
      timeout: 30_000,
    });
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, message);
  }
});

/**
 * `npm start` as a user runs it: tools/start.ts starts the identity and ledger services as
 * child processes on a fresh database. A token issued by the identity service is accepted by
 * the ledger (so the ledger found the identity service's JWKS), a request without one is 401,
 * and SIGTERM to the supervisor stops both services and exits 0.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { createTestDatabase, freePort, type TestDatabase } from '@ledgerline/testing';
import { exitCodeOf, stopGraceMs } from '../../../tools/supervise.ts';

const START = fileURLToPath(new URL('../../../tools/start.ts', import.meta.url));
const TAG = randomBytes(4).toString('hex');
const STREAM = `T_START_${TAG}`;
const CLIENT_SECRET = `start-test-secret-${TAG}`;

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase('ll_start');
});
after(async () => {
  const nats = await connect({ servers: process.env.NATS_URL ?? 'nats://127.0.0.1:4222' });
  const jsm = await jetstreamManager(nats);
  await jsm.streams.delete(STREAM).catch(() => false);
  await nats.close();
  await db.drop();
});

async function waitForStatus(url: string, status: number, child: ChildProcess): Promise<void> {
  for (let waitedMs = 0; ; waitedMs += 100) {
    assert.equal(child.exitCode, null, `the supervisor exited early with ${String(child.exitCode)}`);
    const answered = await fetch(url).then((r) => r.status, () => 0);
    if (answered === status) return;
    assert.ok(waitedMs < 60_000, `${url} did not answer ${status} within 60 s (last ${answered})`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

test('npm start: identity and ledger run together, tokens flow from one to the other, SIGTERM stops both', async () => {
  const [ledgerPort, identityPort] = [await freePort(), await freePort()];
  const ledger = `http://127.0.0.1:${ledgerPort}`;
  const identity = `http://127.0.0.1:${identityPort}`;
  const supervisor = spawn(process.execPath, [START], {
    env: {
      ...process.env,
      PORT: String(ledgerPort),
      IDENTITY_PORT: String(identityPort),
      DATABASE_URL: db.url,
      LOG_LEVEL: 'warn',
      EVENTS_STREAM: STREAM,
      EVENTS_SUBJECT_PREFIX: `tstart${TAG}.events`,
      IDENTITY_BOOTSTRAP_CLIENT_ID: 'payments',
      IDENTITY_BOOTSTRAP_CLIENT_SECRET: CLIENT_SECRET,
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const exited = new Promise<number | null>((resolve) => supervisor.once('exit', (code) => resolve(code)));
  try {
    await waitForStatus(`${identity}/.well-known/jwks.json`, 200, supervisor);
    await waitForStatus(`${ledger}/ready`, 200, supervisor);

    assert.equal((await fetch(`${ledger}/v1/ledgers`)).status, 401);
    const issued = await fetch(`${identity}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ grant_type: 'client_credentials', client_id: 'payments', client_secret: CLIENT_SECRET, audience: 'ledger' }).toString(),
    });
    assert.equal(issued.status, 200);
    const { access_token: accessToken } = (await issued.json()) as { access_token: string };
    const ledgers = await fetch(`${ledger}/v1/ledgers`, { headers: { authorization: `Bearer ${accessToken}` } });
    assert.equal(ledgers.status, 200);
    assert.ok(((await ledgers.json()) as { ledgers: Array<{ code: string }> }).ledgers.some((l) => l.code === 'USD'));
  } finally {
    supervisor.kill('SIGTERM');
  }
  assert.equal(await exited, 0, 'the supervisor exits 0 after a clean stop');
  for (const url of [`${ledger}/health`, `${identity}/.well-known/jwks.json`]) {
    assert.equal(await fetch(url).then((r) => r.status, () => 0), 0, `${url} no longer answers`);
  }
});

test('the supervisor waits out the services\' own shutdown limit, and reports how each child ended', () => {
  // Never shorter than the drain the services accept (SHUTDOWN_TIMEOUT_MS up to 120 s).
  assert.equal(stopGraceMs({}), 15_000);
  assert.equal(stopGraceMs({ SHUTDOWN_TIMEOUT_MS: '60000' }), 65_000);
  assert.equal(stopGraceMs({ SHUTDOWN_TIMEOUT_MS: '120000' }), 125_000);
  assert.equal(stopGraceMs({ SHUTDOWN_TIMEOUT_MS: 'soon' }), 125_000);
  assert.equal(exitCodeOf(0, null), 0);
  assert.equal(exitCodeOf(1, null), 1);
  assert.equal(exitCodeOf(null, 'SIGKILL'), 137);
  assert.equal(exitCodeOf(null, 'SIGTERM'), 143);
});

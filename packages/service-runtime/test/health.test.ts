import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import pg from 'pg';
import { baseConfigSchema, createService, loadConfig, postgresReadinessCheck } from '../src/index.ts';
import type { Problem, ReadinessCheck } from '../src/index.ts';

const config = loadConfig(baseConfigSchema, {});
const DATABASE_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

function serviceWith(readinessChecks: ReadinessCheck[]) {
  return createService({ config, openapi: { title: 'test', version: '0.0.0' }, readinessChecks, logger: false });
}

const ok: ReadinessCheck = { name: 'cache', check: () => Promise.resolve() };

describe('/health', () => {
  it('answers 200 without running dependency checks', async () => {
    let ran = false;
    const app = await serviceWith([
      {
        name: 'db',
        check: () => {
          ran = true;
          return Promise.resolve();
        },
      },
    ]);
    const response = await app.inject({ method: 'GET', url: '/health' });
    assert.equal(response.statusCode, 200);
    assert.deepEqual(response.json(), { status: 'ok' });
    assert.equal(ran, false);
    await app.close();
  });
});

describe('/ready', () => {
  it('answers 200 when every check passes', async () => {
    const app = await serviceWith([ok, { name: 'bus', check: () => Promise.resolve() }]);
    const response = await app.inject({ method: 'GET', url: '/ready' });
    assert.equal(response.statusCode, 200);
    assert.deepEqual(response.json(), { status: 'ready', checks: { cache: 'ok', bus: 'ok' } });
    await app.close();
  });

  it('answers 503 problem+json naming a check that throws and one that times out', async () => {
    const app = await serviceWith([
      ok,
      { name: 'db', check: () => Promise.reject(new Error('ECONNREFUSED 10.0.0.5:5432')) },
      // Honours the signal, as a well-behaved check should.
      {
        name: 'bus',
        timeoutMs: 50,
        check: (signal) => new Promise((_, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error))),
      },
      // Ignores the signal entirely: the deadline still holds.
      { name: 'fx', timeoutMs: 50, check: () => new Promise(() => {}) },
    ]);
    const response = await app.inject({ method: 'GET', url: '/ready' });
    assert.equal(response.statusCode, 503);
    assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
    const body = response.json<Problem & { checks: unknown }>();
    assert.equal(body.type, 'https://ledgerline.dev/problems/not-ready');
    assert.equal(body.status, 503);
    assert.equal(body.instance, '/ready');
    assert.deepEqual(body.checks, { cache: 'ok', db: 'failed', bus: 'timed_out', fx: 'timed_out' });
    assert.equal(body.detail, 'Readiness checks failing: db (failed), bus (timed_out), fx (timed_out).');
    assert.doesNotMatch(response.body, /10\.0\.0\.5/, 'causes stay in the log');
    await app.close();
  });

  it('rejects duplicate check names', async () => {
    await assert.rejects(serviceWith([ok, ok]), /names must be unique/);
  });
});

describe('postgresReadinessCheck', () => {
  const pools: pg.Pool[] = [];
  after(() => Promise.all(pools.map((pool) => pool.end())));

  it('is ready against a running PostgreSQL', async () => {
    const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 1 });
    pools.push(pool);
    const app = await serviceWith([postgresReadinessCheck(pool)]);
    const response = await app.inject({ method: 'GET', url: '/ready' });
    assert.equal(response.statusCode, 200, response.body);
    assert.deepEqual(response.json(), { status: 'ready', checks: { postgres: 'ok' } });
    await app.close();
  });

  it('is not ready when the server refuses connections', async () => {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    const pool = new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:1/test', max: 1 });
    pools.push(pool);
    const app = await serviceWith([postgresReadinessCheck(pool, { name: 'ledger-db' })]);
    const response = await app.inject({ method: 'GET', url: '/ready' });
    assert.equal(response.statusCode, 503);
    assert.deepEqual(response.json<{ checks: unknown }>().checks, { 'ledger-db': 'failed' });
    await app.close();
  });
});

describe('postgresReadinessCheck on a busy pool', () => {
  it('measures the database, not the queue for the request pool', async () => {
    const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 2 });
    const held = [await pool.connect(), await pool.connect()];
    const app = await serviceWith([postgresReadinessCheck(pool, { timeoutMs: 300 })]);
    try {
      // Every request connection is busy; requests would wait for one, the probe must not.
      const response = await app.inject({ method: 'GET', url: '/ready' });
      assert.equal(response.statusCode, 200, response.body);
      assert.deepEqual(response.json(), { status: 'ready', checks: { postgres: 'ok' } });
      assert.equal(pool.waitingCount, 0, 'the probe did not queue on the request pool');
    } finally {
      for (const client of held) client.release();
      await app.close();
      await pool.end();
    }
  });
});

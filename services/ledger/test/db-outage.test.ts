/**
 * A PostgreSQL that stops answering (a blackhole: connections accepted, nothing comes back)
 * must fail the ledger's requests promptly, and the service must recover by itself when it
 * heals. The pool is built as main.ts builds it (databasePoolConfig), with short limits so the
 * test runs in seconds; production keeps the defaults (2 s to connect, 35 s per query).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { EventStore, migrateEvents } from '@ledgerline/events';
import { LedgerEngine, migrateLedger, newId } from '@ledgerline/ledger';
import { databasePoolConfig, guardPool, migrateRuntime, ServiceMetrics, type Service } from '@ledgerline/service-runtime';
import { behindFaultProxy, createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import type { FaultProxy } from '@ledgerline/resilience/fault';
import { buildLedgerService } from '../src/app.ts';
import { registerLedgerMetrics } from '../src/metrics.ts';

const CONNECT_TIMEOUT_MS = 500;
const QUERY_TIMEOUT_MS = 1500;
/** Every request must be answered within this, however PostgreSQL behaves. */
const ANSWER_BOUND_MS = 8000;

let db: TestDatabase;
let proxy: FaultProxy;
let pool: pg.Pool;
let engine: LedgerEngine;
let app: Service;
let base: string;
let behindUrl: string;
const A = newId();
const B = newId();

before(async () => {
  db = await createTestDatabase('ll_db_outage');
  await migrateLedger(db.url);
  await migrateEvents(db.url);
  await migrateRuntime(db.url);
  const behind = await behindFaultProxy(db.url);
  proxy = behind.proxy;
  behindUrl = behind.url;
  pool = new pg.Pool(databasePoolConfig(
    { DATABASE_CONNECT_TIMEOUT_MS: CONNECT_TIMEOUT_MS, DATABASE_QUERY_TIMEOUT_MS: QUERY_TIMEOUT_MS },
    { connectionString: behind.url, max: 10 },
  ));
  guardPool(pool, () => {});
  engine = new LedgerEngine({ pool, events: await EventStore.open(pool) });
  app = await buildLedgerService({ engine, pool, logger: false, resilience: { metrics: { processMetrics: false } } });
  base = await app.listen({ port: 0, host: '127.0.0.1' });
  for (const id of [A, B]) {
    const r = await fetch(`${base}/v1/accounts`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id, ledger: 'USD', code: 10 }) });
    assert.equal(r.status, 201, await r.text());
  }
});

after(async () => {
  // Cutting the proxy's sockets fails anything still hung; each step is bounded so a failing
  // run ends instead of hanging.
  const bounded = (p: Promise<unknown>) => Promise.race([p.catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
  await bounded(proxy.close());
  await bounded(app.close());
  await bounded(engine.close());
  await bounded(pool.end());
  await bounded(db.drop());
});

const transfer = (): string => JSON.stringify({ id: newId(), debit_account_id: A, credit_account_id: B, amount: '1', ledger: 'USD', code: 1 });

interface Answer { label: string; status: number | 'none'; ms: number; retryAfter: string | null }

async function ask(label: string, path: string, init: RequestInit = {}): Promise<Answer> {
  const started = performance.now();
  try {
    const r = await fetch(`${base}${path}`, { ...init, signal: AbortSignal.timeout(ANSWER_BOUND_MS + 2000) });
    await r.arrayBuffer();
    return { label, status: r.status, ms: Math.round(performance.now() - started), retryAfter: r.headers.get('retry-after') };
  } catch {
    return { label, status: 'none', ms: Math.round(performance.now() - started), retryAfter: null };
  }
}

const post = (extra: Record<string, string> = {}): RequestInit => ({ method: 'POST', headers: { 'content-type': 'application/json', ...extra }, body: transfer() });

test('a blackholed PostgreSQL fails requests within a bound, and the service recovers when it heals', { timeout: 60_000 }, async () => {
  // Warm the pool: every connection idle and open, as in a busy service.
  await Promise.all(Array.from({ length: 10 }, () => pool.query('SELECT pg_sleep(0.1)')));
  proxy.set({ blackhole: true });
  const during = await Promise.all([
    ask('POST /v1/transfers', '/v1/transfers', post()),
    ask('POST /v1/transfers + Idempotency-Key', '/v1/transfers', post({ 'idempotency-key': 'k-during' })),
    ...Array.from({ length: 12 }, (_, i) => ask(`GET /v1/accounts/A #${i}`, `/v1/accounts/${A}`)),
    ask('GET /ready', '/ready'),
    ask('GET /metrics', '/metrics'),
  ]);
  for (const a of during) {
    assert.notEqual(a.status, 'none', `${a.label}: no answer within ${ANSWER_BOUND_MS} ms`);
    assert.ok(a.ms < ANSWER_BOUND_MS, `${a.label}: answered after ${a.ms} ms`);
    if (a.label === 'GET /metrics') assert.equal(a.status, 200, a.label);
    else assert.equal(a.status, 503, `${a.label}: ${a.status}`);
  }

  proxy.heal();
  // Recovery without a restart: hung connections were destroyed, new ones open.
  const deadline = Date.now() + 15_000;
  let last: Answer[] = [];
  while (Date.now() < deadline) {
    last = await Promise.all([
      ask('GET /ready', '/ready'),
      ask('GET /v1/accounts/A', `/v1/accounts/${A}`),
      ask('POST /v1/transfers', '/v1/transfers', post()),
    ]);
    if (last.every((a) => a.status === 200 || a.status === 201)) break;
    await new Promise((r) => setTimeout(r, 250));
  }
  assert.deepEqual(last.map((a) => [a.label, a.status]), [['GET /ready', 200], ['GET /v1/accounts/A', 200], ['POST /v1/transfers', 201]]);
});

test('a scrape answers while PostgreSQL hangs: the outbox lag is NaN, not a hung /metrics', { timeout: 30_000 }, async () => {
  // A pool with no client-side limits of its own, as the reviewer found it: only the gauge's
  // own bound stands between a hung database and a hung scrape.
  const plain = new pg.Pool({ connectionString: behindUrl, max: 2 });
  guardPool(plain, () => {});
  const metrics = new ServiceMetrics({ processMetrics: false });
  registerLedgerMetrics(metrics, engine, plain, { outboxLagTimeoutMs: 500 });
  try {
    assert.match(await metrics.registry.metrics(), /events_outbox_lag_seconds \d+(\.\d+)?(e[+-]?\d+)?\n/);
    proxy.set({ blackhole: true });
    for (let scrape = 0; scrape < 3; scrape++) {
      const started = performance.now();
      const text = await Promise.race([metrics.registry.metrics(), new Promise<string>((r) => setTimeout(() => { r('scrape hung'); }, 5000))]);
      assert.ok(performance.now() - started < 2000, `scrape ${scrape} took ${Math.round(performance.now() - started)} ms`);
      assert.match(text, /events_outbox_lag_seconds NaN\n/i, `scrape ${scrape}`);
      assert.match(text, /ledger_transfers_total \d+/);
    }
  } finally {
    proxy.heal();
    await Promise.race([plain.end(), new Promise((r) => setTimeout(r, 5000))]);
  }
});

/**
 * `observePool(pool, name)` names the pool, so a service with two pools (requests, and a
 * session pool for locks) observes both in one `pg_pool_connections` metric.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { ServiceMetrics } from '../src/index.ts';

const DATABASE_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

test('two pools observed under their names, each with its own figures', async () => {
  const requests = new pg.Pool({ connectionString: DATABASE_URL, max: 3 });
  const sessions = new pg.Pool({ connectionString: DATABASE_URL, max: 1 });
  try {
    await requests.query('SELECT 1');
    const metrics = new ServiceMetrics({ processMetrics: false });
    metrics.observePool(requests, 'requests');
    metrics.observePool(sessions, 'sessions');
    const text = await metrics.registry.metrics();
    assert.match(text, /ledgerline_pg_pool_connections\{pool="requests",state="max"\} 3/);
    assert.match(text, /ledgerline_pg_pool_connections\{pool="requests",state="total"\} 1/);
    assert.match(text, /ledgerline_pg_pool_connections\{pool="sessions",state="max"\} 1/);
    assert.match(text, /ledgerline_pg_pool_connections\{pool="sessions",state="total"\} 0/);
    assert.throws(() => { metrics.observePool(sessions, 'sessions'); }, /already observed/);
  } finally {
    await Promise.all([requests.end(), sessions.end()]);
  }
});

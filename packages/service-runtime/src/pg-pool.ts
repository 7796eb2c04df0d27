/**
 * PostgreSQL pools that survive their backends being terminated.
 *
 * `pg` emits 'error' on a client whose backend dies, and an 'error' event with no listener
 * crashes the process. pg-pool listens on idle clients only, and a checked-out client gets a
 * listener from whoever holds it, one microtask after `connect()` resolves. That leaves a gap:
 * when a backend is terminated just as it finishes starting up, ReadyForQuery and the FATAL
 * 57P01 arrive in one read, the error is emitted in the same tick as the hand-over, and nobody
 * is listening yet (seen under `pg_terminate_backend` in packages/ledger/test/concurrency.test.ts).
 * The pool's 'connect' event fires synchronously inside that hand-over, so a listener attached
 * there covers every client for its whole life. The failed query itself still rejects and is
 * handled by its caller; the listener only stops the event from taking the process down.
 */
import type pg from 'pg';
import type { BaseConfig } from './config.ts';

/** How long to wait for a new connection: long enough for a TLS handshake across a zone. */
export const DATABASE_CONNECT_TIMEOUT_MS_DEFAULT = 2000;
/**
 * The client-side limit on one query. Longer than the server's statement_timeout (the engine
 * sets 30 s), so the server cancels a slow statement first and this fires only when nothing
 * comes back at all: a blackholed server or a dead network path, which TCP alone would wait on
 * for many minutes. The pool then destroys the connection and opens a new one.
 */
export const DATABASE_QUERY_TIMEOUT_MS_DEFAULT = 35_000;
/** TCP keepalive probes start after this much idle time, so a dead idle connection is noticed. */
export const DATABASE_KEEPALIVE_INITIAL_DELAY_MS = 10_000;

/**
 * Pool settings that put a client-side time limit on every wait: for a connection, and for each
 * query. Without them, a PostgreSQL that stops answering (packets dropped, not refused) hangs
 * every checkout and query for good, and the pool stays full of hung connections after it heals.
 */
export function databasePoolConfig(
  config: Pick<BaseConfig, 'DATABASE_CONNECT_TIMEOUT_MS' | 'DATABASE_QUERY_TIMEOUT_MS'>,
  pool: { connectionString: string; max: number },
): pg.PoolConfig {
  return {
    connectionString: pool.connectionString,
    max: pool.max,
    // Its error ('timeout exceeded when trying to connect') is transient to the engine.
    connectionTimeoutMillis: config.DATABASE_CONNECT_TIMEOUT_MS,
    keepAlive: true,
    keepAliveInitialDelayMillis: DATABASE_KEEPALIVE_INITIAL_DELAY_MS,
    query_timeout: config.DATABASE_QUERY_TIMEOUT_MS,
  };
}

export function guardPool(pool: pg.Pool, onError: (error: Error) => void): pg.Pool {
  pool.on('error', onError);
  pool.on('connect', (client) => {
    client.on('error', onError);
  });
  return pool;
}

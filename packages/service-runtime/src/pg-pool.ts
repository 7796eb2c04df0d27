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

export function guardPool(pool: pg.Pool, onError: (error: Error) => void): pg.Pool {
  pool.on('error', onError);
  pool.on('connect', (client) => {
    client.on('error', onError);
  });
  return pool;
}

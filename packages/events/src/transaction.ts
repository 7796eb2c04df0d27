/**
 * One transaction on a pooled connection: commit when `fn` resolves, roll back when it throws.
 * A connection whose ROLLBACK fails is broken (its backend died mid-transaction), so it goes back
 * to the pool destroyed rather than handed out again.
 */
import type pg from 'pg';

export async function inTransaction<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let broken: Error | undefined;
  try {
    await client.query('BEGIN');
    const out = await fn(client);
    await commit(client);
    return out;
  } catch (error) {
    await client.query('ROLLBACK').catch((rollbackError: unknown) => {
      broken = rollbackError instanceof Error ? rollbackError : new Error(String(rollbackError));
    });
    throw error;
  } finally {
    client.release(broken);
  }
}

/**
 * The transaction ended in a rollback where the caller asked for COMMIT: a statement in it had
 * failed, and the code that ran it went on as if it had not.
 */
export class TransactionRolledBackError extends Error {
  constructor() {
    super('COMMIT rolled back: a statement of the transaction had failed, and the code that ran it carried on');
    this.name = 'TransactionRolledBackError';
  }
}

/**
 * COMMIT, and throw TransactionRolledBackError when the server rolled back instead. In a
 * transaction where a statement failed, PostgreSQL answers COMMIT with ROLLBACK, not with an
 * error: a callback that caught the statement's error (`.catch(() => {})`) would otherwise
 * have its work reported as committed while none of it was, and a consumer would ack events
 * whose effects and inbox rows were rolled back.
 */
export async function commit(client: Pick<pg.ClientBase, 'query'>): Promise<void> {
  const r = await client.query('COMMIT');
  if (r.command !== 'COMMIT') throw new TransactionRolledBackError();
}

/**
 * Whether a database error says nothing about the work that met it, so that the same work may
 * succeed later: the connection or the server failed (SQLSTATE class 08; 57P, an administrator
 * or a crash ending the session; 53300, too many connections; a socket reset or refused, or
 * node-postgres finding its connection gone), or the transaction lost a serialization race or
 * a deadlock (40001, 40P01), or a client-side limit ran out (no connection within
 * connectionTimeoutMillis; no answer within query_timeout, after which the pool destroys the
 * connection: a server that stopped answering). Such a failure must not count against the work itself: a
 * consumer does not dead-letter an event for it, and the ledger answers "unavailable, nothing
 * decided" rather than a rejection.
 */
export function transientDatabaseError(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === 'string') {
    if (code === '40001' || code === '40P01' || code === '53300') return true;
    if (code.startsWith('08') || code.startsWith('57P')) return true;
    if (code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'EPIPE' || code === 'ETIMEDOUT') return true;
  }
  const message = error instanceof Error ? error.message : '';
  return /Connection terminated|connection is closed|Client has encountered a connection error|timeout exceeded when trying to connect|Query read timeout/i.test(message);
}

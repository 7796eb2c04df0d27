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
 * A statement with a client-side deadline of its own: no answer within `timeoutMs`, and it
 * fails and its connection is not reused. node-postgres reads query_timeout from a query's
 * config as well as from the client's; @types/pg declares only the latter.
 */
export function withQueryTimeout(text: string, values: unknown[], timeoutMs: number): pg.QueryConfig {
  const config: pg.QueryConfig & { query_timeout: number } = { text, values, query_timeout: timeoutMs };
  return config;
}

/**
 * One statement within `timeoutMs`, the wait for a pooled connection included. query_timeout
 * alone starts counting once a connection is had, so a full pool, or one whose server stopped
 * answering, would hold the caller for as long as the pool's own limit, or for ever on a pool
 * without one. A connection that arrives after the deadline goes straight back unused: the
 * statement never starts late. One that started in time runs on in PostgreSQL after the
 * client stops waiting, and may commit; a caller that must not leave its effect behind undoes
 * it (the idempotency plugin withdraws a claim statement that failed).
 */
export async function queryWithin<R extends pg.QueryResultRow>(
  pool: pg.Pool,
  text: string,
  /** The parameters, or a function of the milliseconds left when the statement is sent (for a statement that bounds itself by them). */
  values: unknown[] | ((remainingMs: number) => unknown[]),
  timeoutMs: number,
): Promise<pg.QueryResult<R>> {
  const deadline = performance.now() + timeoutMs;
  const connecting = pool.connect();
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => {
      connecting.then((late) => { late.release(); }, () => {});
      reject(new Error(`no database connection within ${timeoutMs} ms`));
    }, timeoutMs);
  });
  let client: pg.PoolClient;
  try {
    client = await Promise.race([connecting, timedOut]);
  } finally {
    clearTimeout(timer);
  }
  try {
    const remainingMs = Math.max(1, Math.ceil(deadline - performance.now()));
    const result = await client.query<R>(withQueryTimeout(text, typeof values === 'function' ? values(remainingMs) : values, remainingMs));
    client.release();
    return result;
  } catch (error) {
    // As pool.query does: a connection whose statement failed (or hung) is not reused.
    client.release(error instanceof Error ? error : true);
    throw error;
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

/**
 * Whether the server could not do the work now, which says nothing about the work: a lock it
 * waited for past `lock_timeout` or asked for with NOWAIT (55P03), or the server short of
 * resources (class 53: disk, memory, connections). Nothing was decided; the same work may
 * succeed later. The consumer, the ledger engine and the service runtime read it alike.
 */
export function databaseCannotNow(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return code === '55P03' || (typeof code === 'string' && /^53[0-9A-Z]{3}$/.test(code));
}

/**
 * Whether PostgreSQL ended the session (an error at FATAL or PANIC severity): a database that
 * refuses connections, a role or password refused at connect, an idle-in-transaction timeout.
 */
export function databaseSessionEnded(error: unknown): boolean {
  const severity = (error as { severity?: unknown } | null)?.severity;
  return severity === 'FATAL' || severity === 'PANIC';
}

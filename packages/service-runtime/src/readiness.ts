/**
 * Readiness: can this instance serve traffic right now? Each check gets a deadline, so a
 * hung dependency makes the probe fail fast instead of hanging the prober.
 */
import type { FastifyBaseLogger } from 'fastify';
import type pg from 'pg';

export const READINESS_TIMEOUT_MS_DEFAULT = 1000;

export interface ReadinessCheck {
  /** Key in the /ready response; unique per service. */
  name: string;
  /** Resolves when the dependency is usable. `signal` aborts when the deadline passes. */
  check: (signal: AbortSignal) => Promise<void>;
  timeoutMs?: number;
}

export type CheckOutcome = 'ok' | 'failed' | 'timed_out';

export async function runReadinessChecks(
  checks: readonly ReadinessCheck[],
  log: FastifyBaseLogger,
): Promise<Record<string, CheckOutcome>> {
  const outcomes = await Promise.all(checks.map((check) => runCheck(check, log)));
  return Object.fromEntries(checks.map((check, i) => [check.name, outcomes[i] ?? 'failed']));
}

async function runCheck(check: ReadinessCheck, log: FastifyBaseLogger): Promise<CheckOutcome> {
  const timeoutMs = check.timeoutMs ?? READINESS_TIMEOUT_MS_DEFAULT;
  const controller = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<'timed_out'>((resolve) => {
    timer = setTimeout(() => {
      controller.abort(new Error(`readiness check timed out after ${timeoutMs} ms`));
      resolve('timed_out');
    }, timeoutMs);
  });
  try {
    const outcome = await Promise.race([
      check.check(controller.signal).then(() => 'ok' as const),
      deadline,
    ]);
    if (outcome === 'timed_out') log.warn({ check: check.name, timeoutMs }, 'readiness check timed out');
    return outcome;
  } catch (error) {
    // The cause goes to the log only: /ready is often reachable from outside the cluster.
    log.warn({ check: check.name, err: error }, 'readiness check failed');
    return 'failed';
  } finally {
    clearTimeout(timer);
  }
}

/** `SELECT 1` through the pool: proves a connection can be had and the server answers. */
export function postgresReadinessCheck(
  pool: pg.Pool,
  options: { name?: string; timeoutMs?: number } = {},
): ReadinessCheck {
  const timeoutMs = options.timeoutMs ?? READINESS_TIMEOUT_MS_DEFAULT;
  // query_timeout makes pg fail the query itself at the deadline, and pool.query then
  // discards that connection; without it a hung server would pin one pooled connection per
  // probe. pg honours the field at run time, though @types/pg's QueryConfig omits it.
  const query: pg.QueryConfig & { query_timeout: number } = { text: 'SELECT 1', query_timeout: timeoutMs };
  return {
    name: options.name ?? 'postgres',
    timeoutMs,
    check: async () => {
      await pool.query(query);
    },
  };
}

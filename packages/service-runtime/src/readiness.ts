/**
 * Readiness: can this instance serve traffic right now? Each check gets a deadline, so a
 * hung dependency makes the probe fail fast instead of hanging the prober.
 */
import type { FastifyBaseLogger } from 'fastify';
import pg from 'pg';
import { guardPool } from './pg-pool.ts';

export const READINESS_TIMEOUT_MS_DEFAULT = 1000;

export interface ReadinessCheck {
  /** Key in the /ready response; unique per service. */
  name: string;
  /** Resolves when the dependency is usable. `signal` aborts when the deadline passes. */
  check: (signal: AbortSignal) => Promise<void>;
  timeoutMs?: number;
  /** Frees what the check holds (a connection of its own); called when the service closes. */
  close?: () => Promise<void>;
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

/**
 * `SELECT 1` on a connection of the probe's own, opened with the settings of `pool` (same
 * server, user, TLS): proves that a connection can be had and the server answers. Not through
 * `pool` itself: when every request connection is busy, the probe would wait in the pool's
 * queue and time out, taking a loaded but healthy instance out of rotation, which only pushes
 * its load onto the others. The probe's pool holds one connection, opened on the first probe
 * and closed with the service; its connect and query limits are the check's deadline.
 */
export function postgresReadinessCheck(
  pool: pg.Pool,
  options: { name?: string; timeoutMs?: number } = {},
): ReadinessCheck {
  const timeoutMs = options.timeoutMs ?? READINESS_TIMEOUT_MS_DEFAULT;
  let probe: pg.Pool | undefined;
  return {
    name: options.name ?? 'postgres',
    timeoutMs,
    check: async () => {
      // The database may answer while this instance cannot use it: its pool has been ended.
      if (pool.ending || pool.ended) throw new Error('the request pool has been ended');
      probe ??= probePool(pool, timeoutMs);
      await probe.query('SELECT 1');
    },
    close: async () => {
      const closing = probe;
      probe = undefined;
      await closing?.end();
    },
  };
}

function probePool(pool: pg.Pool, timeoutMs: number): pg.Pool {
  const probe = new pg.Pool({
    ...pool.options,
    max: 1,
    // Both limits at the deadline: a probe never leaves a connection hung behind it. On
    // query_timeout the pool discards the connection, and the next probe opens a fresh one.
    connectionTimeoutMillis: timeoutMs,
    query_timeout: timeoutMs,
    keepAlive: true,
    // The probe's idle connection must not keep a process alive that is otherwise done.
    allowExitOnIdle: true,
  });
  // A connection whose backend dies emits 'error', which would crash the process; the next
  // probe reports the failure, so there is nothing more to do here.
  return guardPool(probe, () => {});
}

/**
 * What tools/start.ts decides about its children, apart from the processes themselves, so that
 * it can be tested: how long a stopping child may drain, and the exit code a child's end stands for.
 */
import { constants } from 'node:os';

/** baseConfigSchema's default and ceiling for SHUTDOWN_TIMEOUT_MS, which both services read. */
export const SHUTDOWN_TIMEOUT_MS_DEFAULT = 10_000;
export const SHUTDOWN_TIMEOUT_MS_MAX = 120_000;
/** Beyond the services' own shutdown limit: process exit, and the log flushed, after the drain. */
export const STOP_GRACE_MARGIN_MS = 5000;

/**
 * How long a child may take to stop after SIGTERM before it is killed: the shutdown time the
 * services were given, plus a margin, so that a drain they are allowed to take is never cut
 * short. A value the services would refuse stops them at start anyway; for one this cannot
 * read, it allows the longest drain a service accepts.
 */
export function stopGraceMs(env: NodeJS.ProcessEnv): number {
  const raw = env.SHUTDOWN_TIMEOUT_MS;
  const value = raw === undefined || raw.trim() === '' ? SHUTDOWN_TIMEOUT_MS_DEFAULT : Number(raw);
  const shutdownMs = Number.isInteger(value) && value >= 0 ? Math.min(value, SHUTDOWN_TIMEOUT_MS_MAX) : SHUTDOWN_TIMEOUT_MS_MAX;
  return shutdownMs + STOP_GRACE_MARGIN_MS;
}

/** A child's exit as an exit code: its own, or 128 + the signal's number (the shell's convention) when a signal ended it. */
export function exitCodeOf(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code;
  const number = signal === null ? undefined : constants.signals[signal];
  return number === undefined ? 1 : 128 + number;
}

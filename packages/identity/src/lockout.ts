/**
 * Lockout after repeated failures, as pure functions of the stored counters and an injected
 * clock. A login attempt on a locked user is refused before the password is checked, so an
 * attacker learns nothing during the lock, and the lock is not extended by attempts during it
 * (which would let anyone keep a victim locked out forever by a trickle of guesses).
 */
export interface LockoutPolicy {
  failuresMax: number;
  lockMs: number;
}

export const LOCKOUT_DEFAULT: LockoutPolicy = { failuresMax: 5, lockMs: 15 * 60_000 };

export interface LoginCounters {
  failedLogins: number;
  lockedUntil: Date | null;
}

export function isLocked(counters: LoginCounters, nowMs: number): boolean {
  return counters.lockedUntil !== null && counters.lockedUntil.getTime() > nowMs;
}

/** The counters after a failed attempt: the failure that reaches the limit starts the lock and resets the count. */
export function afterFailure(counters: LoginCounters, policy: LockoutPolicy, nowMs: number): LoginCounters {
  const failedLogins = counters.failedLogins + 1;
  if (failedLogins >= policy.failuresMax) return { failedLogins: 0, lockedUntil: new Date(nowMs + policy.lockMs) };
  return { failedLogins, lockedUntil: counters.lockedUntil };
}

export const AFTER_SUCCESS: LoginCounters = { failedLogins: 0, lockedUntil: null };

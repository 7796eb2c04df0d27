/**
 * Password hashing with argon2id (RFC 9106) at OWASP's minimum cost: 19 MiB, two passes, one
 * lane. The PHC string carries its own parameters, so raising them later only affects new hashes.
 */
import { hash, verify } from '@node-rs/argon2';

const ARGON2ID = 2;
const HASH_OPTIONS = { algorithm: ARGON2ID, memoryCost: 19_456, timeCost: 2, parallelism: 1 } as const;

/** Shorter is guessable; longer only feeds a denial of service through the hash. */
export const PASSWORD_CHARS_MIN = 12;
export const PASSWORD_CHARS_MAX = 256;

export class WeakPasswordError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'WeakPasswordError';
  }
}

export function checkPasswordStrength(password: string): void {
  if (password.length < PASSWORD_CHARS_MIN) throw new WeakPasswordError(`a password needs at least ${PASSWORD_CHARS_MIN} characters`);
  if (password.length > PASSWORD_CHARS_MAX) throw new WeakPasswordError(`a password has at most ${PASSWORD_CHARS_MAX} characters`);
}

export async function hashPassword(password: string): Promise<string> {
  checkPasswordStrength(password);
  return hash(password, HASH_OPTIONS);
}

/**
 * A hash of nothing anyone knows. Logins for unknown usernames verify against it, so they take
 * as long as logins for known ones and the timing does not reveal which usernames exist.
 */
let decoy: Promise<string> | undefined;

/** Whether `password` matches `phc`; with `phc` null (no such user), spends the same time and answers false. */
export async function verifyPassword(phc: string | null, password: string): Promise<boolean> {
  if (password.length > PASSWORD_CHARS_MAX) return false;
  decoy ??= hash('decoy password that matches nothing', HASH_OPTIONS);
  const ok = await verify(phc ?? (await decoy), password);
  return phc !== null && ok;
}

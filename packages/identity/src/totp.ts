/**
 * TOTP two-factor codes (RFC 6238) through `otpauth`, with the time injected and replay
 * refused: a code is accepted for at most one time step per user, ever, because the caller
 * stores the newest accepted step and passes it back.
 */
import { createHash, randomBytes } from 'node:crypto';
import { Secret, TOTP } from 'otpauth';

export interface TotpParams {
  algorithm: 'SHA1' | 'SHA256' | 'SHA512';
  digits: number;
  periodSeconds: number;
}

/** What authenticator apps implement everywhere (RFC 6238 defaults). */
export const TOTP_DEFAULT: TotpParams = { algorithm: 'SHA1', digits: 6, periodSeconds: 30 };

/** Steps accepted either side of now: one covers a code typed as it turned over, and clock drift up to 30 s. */
export const TOTP_WINDOW_STEPS = 1;

/** 160 bits, as RFC 4226 recommends for SHA-1, in base32 as apps expect it. */
export function newTotpSecret(): string {
  return new Secret({ size: 20 }).base32;
}

export function totpCode(secretBase32: string, nowMs: number, params: TotpParams = TOTP_DEFAULT): string {
  return TOTP.generate({ secret: Secret.fromBase32(secretBase32), algorithm: params.algorithm, digits: params.digits, period: params.periodSeconds, timestamp: nowMs });
}

/**
 * The time step `code` belongs to, if it is valid within the window at `nowMs` and newer than
 * `lastUsedStep`; otherwise null (wrong, stale, or replayed).
 */
export function verifyTotp(
  secretBase32: string,
  code: string,
  nowMs: number,
  lastUsedStep: bigint | null,
  params: TotpParams = TOTP_DEFAULT,
): bigint | null {
  if (code.length !== params.digits || !/^[0-9]+$/.test(code)) return null;
  const delta = TOTP.validate({
    token: code,
    secret: Secret.fromBase32(secretBase32),
    algorithm: params.algorithm,
    digits: params.digits,
    period: params.periodSeconds,
    timestamp: nowMs,
    window: TOTP_WINDOW_STEPS,
  });
  if (delta === null) return null;
  const step = BigInt(Math.floor(nowMs / 1000 / params.periodSeconds) + delta);
  return lastUsedStep !== null && step <= lastUsedStep ? null : step;
}

/** The provisioning URI an authenticator app scans from a QR code. */
export function totpUri(secretBase32: string, issuer: string, label: string): string {
  const { algorithm, digits, periodSeconds } = TOTP_DEFAULT;
  return new TOTP({ issuer, label, secret: Secret.fromBase32(secretBase32), algorithm, digits, period: periodSeconds }).toString();
}

/** How many recovery codes a user gets at enrolment, each good once. */
export const RECOVERY_CODES_COUNT = 10;

/** Codes of 80 random bits, shown once, as `xxxx-xxxx-xxxx-xxxx` in base32. */
export function newRecoveryCodes(): string[] {
  return Array.from({ length: RECOVERY_CODES_COUNT }, () => {
    const base32 = new Secret({ buffer: randomBytes(10).buffer }).base32.toLowerCase();
    return base32.match(/.{4}/g)?.join('-') ?? base32;
  });
}

/** Recovery codes are high-entropy, so SHA-256 suffices; normalising lets users type them loosely. */
export function recoveryCodeHash(code: string): Buffer {
  return createHash('sha256').update(code.toLowerCase().replace(/[^a-z2-7]/g, '')).digest();
}

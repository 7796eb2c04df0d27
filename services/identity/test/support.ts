/**
 * What the identity service's tests share: a database with the identity schema, an Identity over
 * it and the bootstrap's accounts; and the service as a process of its own, for the tests that
 * run `main.ts`.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { Identity, migrateIdentity, type IdentityOptions } from '@ledgerline/identity';
import { loadConfig } from '@ledgerline/service-runtime';
import { createTestDatabase, freePort, type TestDatabase } from '@ledgerline/testing';
import { identityConfigSchema, type IdentityConfig } from '../src/config.ts';

const MAIN = fileURLToPath(new URL('../src/main.ts', import.meta.url));

/** The issuer of the tokens in the tests. */
export const ISSUER = 'https://identity.test';
/** The password of the bootstrap's admin, `root`. */
export const PASSWORD = 'correct horse battery staple';
/** The secret of the bootstrap's service client, `payments`. */
export const CLIENT_SECRET = 'payments-secret-1';

export interface IdentityDatabase<I extends Identity> {
  db: TestDatabase;
  pool: pg.Pool;
  identity: I;
  /** The bootstrap's: the admin `root` (PASSWORD) and the client `payments` (CLIENT_SECRET), for the test to bootstrap as it means to. */
  config: IdentityConfig;
}

/**
 * A fresh database `name` with the identity schema, a pool of 4 on it, and an Identity of ISSUER
 * (users may ask for the audiences `ledger` and `identity`) with its signing key; `make` builds
 * the Identity (a subclass) from its options. The pool is the test's to end, the database its to drop.
 */
export async function identityDatabase<I extends Identity = Identity>(
  name: string,
  options: Pick<IdentityOptions, 'clock' | 'lockout'>,
  make: (options: IdentityOptions) => I = (identityOptions) => new Identity(identityOptions) as I,
): Promise<IdentityDatabase<I>> {
  const db = await createTestDatabase(name);
  await migrateIdentity(db.url);
  const pool = new pg.Pool({ connectionString: db.url, max: 4 });
  const identity = make({ pool, issuer: ISSUER, userAudiences: ['ledger', 'identity'], ...options });
  await identity.ensureSigningKey();
  const config = loadConfig(identityConfigSchema, {
    IDENTITY_BOOTSTRAP_ADMIN_USERNAME: 'root',
    IDENTITY_BOOTSTRAP_ADMIN_PASSWORD: PASSWORD,
    IDENTITY_BOOTSTRAP_CLIENT_ID: 'payments',
    IDENTITY_BOOTSTRAP_CLIENT_SECRET: CLIENT_SECRET,
  });
  return { db, pool, identity, config };
}

/**
 * The keyed digest the audit trail names a typed username or client id by, under the service's
 * `pseudonymKey` (`unknown-user:<digest>`, `unchecked-user:<digest>`; `-client` likewise): the
 * first 16 hex digits of HMAC-SHA256 over the kind and the lower-cased text.
 */
export function nameDigest(key: Uint8Array, kind: 'user' | 'client', typed: string): string {
  return createHmac('sha256', key).update(`unknown-${kind}\u0000${typed.toLowerCase()}`).digest('hex').slice(0, 16);
}

/** Polls `read` every 100 ms until it gives a value; fails after 30 s. */
export async function poll<T>(what: string, read: () => Promise<T | null>): Promise<T> {
  for (let waitedMs = 0; ; waitedMs += 100) {
    const value = await read();
    if (value !== null) return value;
    assert.ok(waitedMs < 30_000, `timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

export interface StartedIdentity {
  base: string;
  /** SIGTERM; resolves with the exit code. */
  stop: () => Promise<number | null>;
}

/**
 * The service as a process of its own, with the common variables (the bootstrap client
 * `payments`, the development signing key) under the test's own `env`; resolves once it
 * answers.
 */
export async function startIdentityProcess(env: Record<string, string>): Promise<StartedIdentity> {
  const port = await freePort();
  const child = spawn(process.execPath, [MAIN], {
    env: {
      ...process.env,
      PORT: String(port),
      LOG_LEVEL: 'warn',
      AUDIT_SIGNING_KEY: '',
      IDENTITY_BOOTSTRAP_CLIENT_ID: 'payments',
      ...env,
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const stop = (): Promise<number | null> => {
    child.kill('SIGTERM');
    return exited;
  };
  const base = `http://127.0.0.1:${port}`;
  try {
    // /health, which no gate (rate limit, shedding) counts: the process listens only once it is set up.
    await poll('the service to answer', () => fetch(`${base}/health`).then((r) => (r.status === 200 ? true : null), () => null));
  } catch (error) {
    await stop();
    throw error;
  }
  return { base, stop };
}

/** The identity service as a process of its own, for the tests that run `main.ts`. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { freePort } from '@ledgerline/testing';

const MAIN = fileURLToPath(new URL('../src/main.ts', import.meta.url));

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

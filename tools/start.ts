/**
 * `npm start`: the local system, one process per service. Starts the identity service and the
 * ledger service as child processes, points the ledger's token verification at the identity
 * service's JWKS, forwards SIGINT/SIGTERM to both (and stops them if its own parent goes away),
 * and exits when either one exits (stopping the other first), with that child's exit code, so a
 * supervisor above sees the failure. When it is signalled, it exits with the first non-zero
 * exit code of its children (0 when both stopped cleanly): a failed drain is not hidden.
 *
 * Ports: the ledger uses PORT (3000), the identity service IDENTITY_PORT (3001). Every other
 * variable reaches both services unchanged (see docs/security.md for the identity ones).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { exitCodeOf, stopGraceMs } from './supervise.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
/** After this, a child that has not stopped since SIGTERM is killed: its SHUTDOWN_TIMEOUT_MS plus a margin. */
const STOP_GRACE_MS = stopGraceMs(process.env);
/** How often the supervisor checks that its own parent (npm, a shell) is still there. */
const PARENT_CHECK_MS = 1000;

const identityPort = process.env.IDENTITY_PORT ?? '3001';
const issuer = process.env.IDENTITY_ISSUER ?? `http://127.0.0.1:${identityPort}`;

const services: Record<string, NodeJS.ProcessEnv> = {
  identity: { ...process.env, PORT: identityPort, IDENTITY_ISSUER: issuer },
  ledger: {
    ...process.env,
    AUTH_ISSUER: process.env.AUTH_ISSUER ?? issuer,
    AUTH_JWKS_URL: process.env.AUTH_JWKS_URL ?? `${issuer}/.well-known/jwks.json`,
  },
};

const children = new Map<string, ChildProcess>();
let stopping = false;

function stopAll(signal: NodeJS.Signals): void {
  for (const child of children.values()) if (child.exitCode === null && child.signalCode === null) child.kill(signal);
  setTimeout(() => {
    for (const child of children.values()) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }, STOP_GRACE_MS).unref();
}

for (const [name, env] of Object.entries(services)) {
  // process.execPath: the Node that runs this file (the pinned Node 24 under npm start). Each
  // child gets its own process group, so Ctrl-C reaches only this supervisor: the services
  // would take a second SIGINT (the forwarded one) as "exit now" and skip their drain.
  const child = spawn(process.execPath, [`services/${name}/src/main.ts`], { cwd: ROOT, env, stdio: 'inherit', detached: true });
  children.set(name, child);
  child.on('exit', (code, signal) => {
    children.delete(name);
    const exitCode = exitCodeOf(code, signal);
    if (!stopping) {
      stopping = true;
      process.stderr.write(`start: ${name} exited (${signal ?? `code ${code}`}); stopping the others\n`);
      process.exitCode = exitCode;
      stopAll('SIGTERM');
    } else if (exitCode !== 0 && (process.exitCode ?? 0) === 0) {
      // Stopping (signalled, or after the first exit): a child that failed its drain, or was
      // killed at the end of the grace period, decides the exit code unless one already did.
      process.stderr.write(`start: ${name} exited (${signal ?? `code ${code}`}) while stopping\n`);
      process.exitCode = exitCode;
    }
    if (children.size === 0) process.exit();
  });
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    stopping = true;
    stopAll(signal);
  });
}

// `kill <npm's pid>` ends npm without passing the signal on, which would leave this process and
// the services running as orphans: when the parent goes, stop as if signalled.
const parentPid = process.ppid;
setInterval(() => {
  if (process.ppid !== parentPid && !stopping) {
    stopping = true;
    process.stderr.write('start: parent process gone; stopping the services\n');
    stopAll('SIGTERM');
  }
}, PARENT_CHECK_MS).unref();

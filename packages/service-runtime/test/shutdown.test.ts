import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { describe, it } from 'node:test';

const FIXTURE = new URL('./fixtures/slow-service.ts', import.meta.url).pathname;
const TEST_TIMEOUT_MS = 20_000;

/** Runs the fixture service as a child process and follows its stdout line by line. */
function startFixture(env: Record<string, string> = {}) {
  const child = spawn(process.execPath, [FIXTURE], {
    env: { ...process.env, LOG_LEVEL: 'info', SHUTDOWN_TIMEOUT_MS: '5000', ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  const lines: string[] = [];
  const waiters: Array<{ pattern: RegExp; resolve: (match: RegExpMatchArray) => void }> = [];
  createInterface({ input: child.stdout }).on('line', (line) => {
    lines.push(line);
    for (const waiter of waiters) {
      const match = line.match(waiter.pattern);
      if (match) waiter.resolve(match);
    }
  });
  return {
    child,
    exited,
    lines,
    /** Resolves at the first line (from now on) that matches; rejects if the child exits first. */
    nextLine: (pattern: RegExp) =>
      Promise.race([
        new Promise<RegExpMatchArray>((resolve) => waiters.push({ pattern, resolve })),
        exited.then(([code]) => {
          throw new Error(`fixture exited (${code}) before printing ${pattern}:\n${lines.join('\n')}`);
        }),
      ]),
    markers: () => lines.filter((line) => line.startsWith('FIXTURE ') && !line.startsWith('FIXTURE listening')),
    shutdownLog: () =>
      lines
        .filter((line) => line.startsWith('{'))
        .map((line) => (JSON.parse(line) as { msg?: string }).msg ?? '')
        .filter((msg) => msg.startsWith('shutdown:')),
    /** Leaves nothing running, whatever the test did. */
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

describe('runService shutdown', { timeout: TEST_TIMEOUT_MS }, () => {
  it('drains an in-flight request on SIGTERM, runs onClose hooks in order, and exits 0', async () => {
    const fixture = startFixture();
    try {
      const [, address] = await fixture.nextLine(/^FIXTURE listening (\S+)$/);
      const started = fixture.nextLine(/^FIXTURE slow request started$/);
      const response = fetch(`${address}/slow`);
      await started;
      fixture.child.kill('SIGTERM');

      const reply = await response;
      assert.equal(reply.status, 200);
      assert.deepEqual(await reply.json(), { done: true });

      const [code, signal] = await fixture.exited;
      assert.equal(signal, null);
      assert.equal(code, 0, fixture.lines.join('\n'));
      assert.deepEqual(fixture.markers(), [
        'FIXTURE slow request started',
        'FIXTURE slow request finishing',
        'FIXTURE fastify onClose',
        'FIXTURE onClose drainLedger',
        'FIXTURE onClose endPool',
      ]);
      // The markers above prove the order; pino's asynchronous writer may interleave its own
      // lines differently under load, so the log is compared as a set.
      assert.deepEqual(fixture.shutdownLog().sort(), [
        'shutdown: close HTTP server: done',
        'shutdown: closing HTTP server, draining in-flight requests',
        'shutdown: complete',
        'shutdown: onClose hook drainLedger: done',
        'shutdown: onClose hook endPool: done',
      ]);
    } finally {
      await fixture.stop();
    }
  });

  it('runs the remaining hooks after one fails, then exits 1', async () => {
    const fixture = startFixture({ FIXTURE_FAILING_HOOK: 'drainLedger' });
    try {
      await fixture.nextLine(/^FIXTURE listening /);
      fixture.child.kill('SIGTERM');

      const [code] = await fixture.exited;
      assert.equal(code, 1, fixture.lines.join('\n'));
      assert.deepEqual(fixture.markers(), [
        'FIXTURE fastify onClose',
        'FIXTURE onClose drainLedger',
        'FIXTURE onClose endPool',
      ]);
      assert.deepEqual(fixture.shutdownLog().sort(), [
        'shutdown: close HTTP server: done',
        'shutdown: closing HTTP server, draining in-flight requests',
        'shutdown: onClose hook drainLedger: failed',
        'shutdown: onClose hook endPool: done',
        'shutdown: some steps failed',
      ]);
    } finally {
      await fixture.stop();
    }
  });
});

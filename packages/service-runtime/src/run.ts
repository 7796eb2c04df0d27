/**
 * `runService`: listen, then shut down in a fixed order on SIGTERM/SIGINT.
 */
import closeWithGrace from 'close-with-grace';
import type { FastifyInstance } from 'fastify';

export type OnCloseHook = () => void | Promise<void>;

export interface RunOptions {
  port: number;
  host: string;
  /** The whole shutdown must finish within this; past it the process exits 1. */
  shutdownTimeoutMs: number;
  /** Run in order after the HTTP server has closed, e.g. drain the ledger, then end the pool. */
  onClose?: readonly OnCloseHook[];
}

/**
 * Starts listening and resolves with the bound address. On a termination signal:
 * 1. stop accepting connections; open ones close once their in-flight response is sent, and
 *    a request that still arrives on one gets 503 without reaching a handler;
 * 2. wait for in-flight requests, then run the instance's Fastify onClose hooks (`app.close()`);
 * 3. run `onClose` hooks one at a time, in array order;
 * 4. exit 0, or 1 if a step failed or the whole took longer than `shutdownTimeoutMs`.
 * An uncaught exception or unhandled rejection takes the same path and exits 1.
 */
export async function runService(app: FastifyInstance, options: RunOptions): Promise<string> {
  const { port, host, shutdownTimeoutMs, onClose = [] } = options;
  const address = await app.listen({ port, host });
  // Installed after listen: before it there is nothing in flight to drain, and Node's default
  // (exit on signal) is the right behaviour.
  closeWithGrace({ delay: shutdownTimeoutMs, logger: app.log }, async ({ signal, err }) => {
    if (err !== undefined) app.log.fatal({ err }, 'shutdown: fatal error');
    app.log.info({ signal, shutdownTimeoutMs }, 'shutdown: closing HTTP server, draining in-flight requests');
    const failures: unknown[] = [];
    await step(app, 'close HTTP server', () => app.close(), failures);
    for (const [index, hook] of onClose.entries()) {
      await step(app, `onClose hook ${hook.name || index}`, hook, failures);
    }
    if (failures.length > 0) throw new AggregateError(failures, 'shutdown: some steps failed');
    app.log.info('shutdown: complete');
  });
  return address;
}

/** A failed step is logged and shutdown goes on: ending the pool is right even if draining failed. */
async function step(
  app: FastifyInstance,
  label: string,
  run: () => unknown,
  failures: unknown[],
): Promise<void> {
  try {
    await run();
    app.log.info(`shutdown: ${label}: done`);
  } catch (error) {
    app.log.error({ err: error }, `shutdown: ${label}: failed`);
    failures.push(error);
  }
}

import type { FastifyInstance } from 'fastify';

/**
 * Runs `flush` every `intervalMs` while `app` runs, on a timer that does not keep the process
 * alive, and once more when the app closes, so that what it has gathered since the last
 * interval is written too (the audit summaries of rate-limited requests and of throttled
 * authentication failures; the services close their audit sink after the app).
 */
export function flushEveryInterval(app: FastifyInstance, intervalMs: number, flush: () => void): void {
  const timer = setInterval(flush, intervalMs);
  timer.unref();
  app.addHook('onClose', (_instance, done) => {
    clearInterval(timer);
    try {
      flush();
    } finally {
      done();
    }
  });
}

/** Shared setup of the load-shedding slot tests (shed-*.test.ts). */
import { Type } from 'typebox';
import { baseConfigSchema, createService, loadConfig, type Service } from '../src/index.ts';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The response schema of the tests' routes. */
export const ok = { 200: Type.Object({ ok: Type.Boolean() }) };

/**
 * A service whose load shedder runs one request at a time and queues up to ten, each for up to
 * three seconds. No level escalation during a test: only the slot accounting is under test.
 */
export function oneSlotService(title: string): Promise<Service> {
  return createService({
    config: loadConfig(baseConfigSchema, {}),
    openapi: { title, version: '0' },
    logger: false,
    metrics: false,
    tracing: false,
    loadShedding: {
      concurrencyMax: 1,
      queueMax: 10,
      targetQueueMs: 60_000,
      intervalMs: 60_000,
      queueTimeoutMs: { critical: 3000, high: 3000, normal: 3000, low: 3000 },
    },
  });
}

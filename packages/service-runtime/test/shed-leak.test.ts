/**
 * A client that hangs up while its request waits for a load-shedding slot must not take the
 * slot with it. With one slot, a leak shows at once: every later request is shed.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { test } from 'node:test';
import { ok, oneSlotService, sleep } from './shed-support.ts';

test('a client that disconnects while queued gives its place back', { timeout: 20_000 }, async () => {
  let releaseSlow: () => void = () => {};
  const app = await oneSlotService('shed-leak');
  let fastRuns = 0;
  app.get('/slow', { schema: { response: ok } }, async () => {
    await new Promise<void>((r) => { releaseSlow = r; });
    return { ok: true };
  });
  app.get('/fast', { schema: { response: ok } }, () => {
    fastRuns += 1;
    return { ok: true };
  });
  const address = await app.listen({ port: 0, host: '127.0.0.1' });
  try {
    const port = Number(new URL(address).port);
    // A holds the only slot.
    const a = fetch(`${address}/slow`).then((r) => r.status);
    await sleep(100);
    // B queues behind A, then its client hangs up.
    const b = connect(port, '127.0.0.1');
    b.write('GET /fast HTTP/1.1\r\nHost: x\r\n\r\n');
    await sleep(200);
    b.destroy();
    await sleep(100);
    releaseSlow();
    assert.equal(await a, 200);
    await sleep(100);
    // Nothing runs now: C and D are admitted at once.
    for (const name of ['C', 'D']) {
      const started = performance.now();
      const r = await fetch(`${address}/fast`, { signal: AbortSignal.timeout(5000) });
      await r.arrayBuffer();
      assert.equal(r.status, 200, name);
      assert.ok(performance.now() - started < 1000, `${name} waited ${Math.round(performance.now() - started)} ms`);
    }
    // B's handler never ran: its client had gone.
    assert.equal(fastRuns, 2);
  } finally {
    releaseSlow();
    await app.close();
  }
});

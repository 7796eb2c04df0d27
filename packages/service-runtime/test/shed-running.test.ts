/**
 * A slot of the load shedder bounds the work running, not the clients waiting for it: a client
 * that hangs up while its handler runs must not give the slot back before the handler ends, or
 * every client that times out under overload lets one more request start on top of the work
 * already running.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { test } from 'node:test';
import { ok, oneSlotService, sleep } from './shed-support.ts';

test('a client that hangs up while its handler runs keeps the slot taken until the handler ends', { timeout: 20_000 }, async () => {
  const app = await oneSlotService('shed-running');
  let running = 0;
  let runningMax = 0;
  const gates: Array<() => void> = [];
  app.get('/work', { schema: { response: ok } }, async () => {
    running += 1;
    runningMax = Math.max(runningMax, running);
    try {
      await new Promise<void>((r) => { gates.push(r); });
      return { ok: true };
    } finally {
      running -= 1;
    }
  });
  app.get('/fail', { schema: { response: ok } }, async () => {
    running += 1;
    runningMax = Math.max(runningMax, running);
    try {
      await new Promise<void>((r) => { gates.push(r); });
      throw new Error('the work failed after its client left');
    } finally {
      running -= 1;
    }
  });
  // A handler that sends nothing once its client has gone: the end of the handler ends the work.
  app.get('/silent', { schema: { response: ok } }, async (request) => {
    running += 1;
    runningMax = Math.max(runningMax, running);
    try {
      await new Promise<void>((r) => { gates.push(r); });
      return request.raw.socket.destroyed ? undefined : { ok: true };
    } finally {
      running -= 1;
    }
  });
  const waitForGate = async (): Promise<void> => {
    const until = performance.now() + 5000;
    while (gates.length === 0) {
      if (performance.now() > until) throw new Error('no handler started within 5 s');
      await sleep(10);
    }
  };
  const address = await app.listen({ port: 0, host: '127.0.0.1' });
  const port = Number(new URL(address).port);
  try {
    for (const path of ['/work', '/fail', '/silent']) {
      runningMax = 0;
      // A takes the only slot, then its client hangs up while the handler still runs.
      const a = connect(port, '127.0.0.1');
      a.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`);
      await waitForGate();
      a.destroy();
      await sleep(100);
      // B must wait for A's handler: the slot is still in use.
      const b = fetch(`${address}/work`, { signal: AbortSignal.timeout(5000) });
      await sleep(200);
      assert.equal(gates.length, 1, `${path}: B started while A's handler was still running`);
      // A's handler ends; B is admitted and runs.
      gates.shift()?.();
      await waitForGate();
      gates.shift()?.();
      assert.equal((await b).status, 200);
      assert.equal(runningMax, 1, `${path}: at most one handler ran at a time`);
      // Every slot came back: a fresh request is admitted at once.
      await sleep(50);
      const c = fetch(`${address}/work`, { signal: AbortSignal.timeout(5000) });
      await waitForGate();
      gates.shift()?.();
      assert.equal((await c).status, 200);
    }
  } finally {
    for (const g of gates.splice(0)) g();
    await app.close();
  }
});

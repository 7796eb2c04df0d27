/**
 * A request that arrives on a busy keep-alive connection after shutdown began is refused like
 * every other refusal: 503 problem+json with Retry-After, and the connection closes.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { test } from 'node:test';
import { Type } from 'typebox';
import { baseConfigSchema, createService, loadConfig } from '../src/index.ts';

test('a request arriving while the service closes gets a 503 problem with Retry-After', { timeout: 20_000 }, async () => {
  const app = await createService({ config: loadConfig(baseConfigSchema, {}), openapi: { title: 'closing', version: '0' }, logger: false });
  let finishSlow: () => void = () => {};
  const slowStarted = Promise.withResolvers<true>();
  let fastRuns = 0;
  const ok = { 200: Type.Object({ ok: Type.Boolean() }) };
  app.get('/slow', { schema: { response: ok } }, async () => {
    slowStarted.resolve(true);
    await new Promise<void>((resolve) => { finishSlow = resolve; });
    return { ok: true };
  });
  app.get('/fast', { schema: { response: ok } }, () => {
    fastRuns += 1;
    return { ok: true };
  });
  const address = await app.listen({ port: 0, host: '127.0.0.1' });
  const socket = connect(Number(new URL(address).port), '127.0.0.1');
  let received = '';
  socket.setEncoding('utf8').on('data', (chunk: string) => { received += chunk; });
  const ended = new Promise<void>((resolve) => { socket.once('close', () => { resolve(); }); });
  let closed: Promise<void> | undefined;
  try {
    // A keep-alive connection in use: the slow request runs on another, so that the service
    // is still draining when this connection's next request completes.
    socket.write('GET /fast HTTP/1.1\r\nHost: x\r\n\r\n');
    for (let waited = 0; !received.includes('{"ok":true}'); waited += 10) {
      assert.ok(waited < 5000, 'no answer to the first request');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const slow = fetch(`${address}/slow`);
    await slowStarted.promise;
    // The next request has begun arriving, so the connection is not idle and closing does
    // not reap it; it completes once shutdown has begun.
    socket.write('GET /fast HTTP/1.1\r\n');
    await new Promise((resolve) => setTimeout(resolve, 50));
    closed = app.close();
    await new Promise((resolve) => setTimeout(resolve, 50));
    socket.write('Host: x\r\n\r\n');
    await Promise.race([ended, new Promise((resolve) => setTimeout(resolve, 5000))]);
    finishSlow();
    assert.equal((await slow).status, 200, 'the request in flight is drained');
    const second = received.slice(received.indexOf('HTTP/1.1', 1));
    assert.match(received, /^HTTP\/1\.1 200/);
    assert.match(second, /^HTTP\/1\.1 503/, received);
    assert.match(second, /\r\nretry-after: 1\r\n/i);
    assert.match(second, /\r\ncontent-type: application\/problem\+json/i);
    assert.match(second, /\r\nconnection: close\r\n/i);
    assert.match(second, /"type":"https:\/\/ledgerline\.dev\/problems\/shutting-down"/);
    assert.equal(fastRuns, 1, 'nothing runs after shutdown began');
  } finally {
    finishSlow();
    socket.destroy();
    await (closed ?? app.close());
  }
});

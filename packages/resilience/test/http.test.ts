/**
 * `httpCall` against a real HTTP server on loopback: the answer, the deadline sent downstream,
 * a 5xx as a dependency failure, and the body limit, whether or not the answer names its length.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { DEADLINE_HEADER, DependencyHttpError, DependencyPolicy, HTTP_BODY_BYTES_MAX, httpCall } from '../src/index.ts';

const MIB = 1024 * 1024;
let base = '';
let lastHeaders: IncomingHttpHeaders = {};
const server = createServer((request, response: ServerResponse) => {
  lastHeaders = request.headers;
  const url = request.url ?? '/';
  if (url === '/ok') {
    response.writeHead(200, { 'content-type': 'text/plain' }).end('pong');
  } else if (url === '/down') {
    response.writeHead(503).end('busy');
  } else if (url === '/declared-too-big') {
    response.writeHead(200, { 'content-length': String(HTTP_BODY_BYTES_MAX + 1) }).end(Buffer.alloc(HTTP_BODY_BYTES_MAX + 1, 0x61));
  } else {
    // No Content-Length: chunked. `/chunked-at-limit` sends exactly the limit, `/chunked-too-big` 4× it.
    response.writeHead(200, { 'content-type': 'text/plain' });
    const chunks = url === '/chunked-at-limit' ? HTTP_BODY_BYTES_MAX / MIB : (4 * HTTP_BODY_BYTES_MAX) / MIB;
    for (let i = 0; i < chunks; i += 1) response.write(Buffer.alloc(MIB, 0x61));
    response.end();
  }
});

before(async () => {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(() => {
  server.closeAllConnections();
  server.close();
});

const policy = (): DependencyPolicy =>
  new DependencyPolicy({ name: 'dep', attemptTimeoutMs: 10_000, callTimeoutMs: 10_000, retry: false, breaker: false, bulkhead: false });

describe('httpCall', () => {
  it('returns the answer and sends the remaining deadline downstream', async () => {
    const r = await httpCall(policy(), `${base}/ok`);
    assert.deepEqual([r.status, r.body], [200, 'pong']);
    const sent = Number(lastHeaders[DEADLINE_HEADER]);
    assert.ok(sent > 0 && sent <= 10_000, `deadline header ${String(lastHeaders[DEADLINE_HEADER])}`);
  });

  it('a 5xx is a dependency failure', async () => {
    await assert.rejects(httpCall(policy(), `${base}/down`), (e: unknown) => e instanceof DependencyHttpError && e.status === 503);
  });

  it('a body past HTTP_BODY_BYTES_MAX fails the call, whether its length is declared or not; one at the limit is read', async () => {
    await assert.rejects(httpCall(policy(), `${base}/declared-too-big`), /exceeds/);
    await assert.rejects(httpCall(policy(), `${base}/chunked-too-big`), new RegExp(`response body exceeds ${HTTP_BODY_BYTES_MAX} bytes`));
    assert.equal((await httpCall(policy(), `${base}/chunked-at-limit`)).body.length, HTTP_BODY_BYTES_MAX);
  });
});

/**
 * The fault doubles themselves: the HTTP server (in-process and as a child process) and the
 * TCP proxy in front of a real PostgreSQL and a TCP echo server. Each fault a test sets must
 * take effect at once and be seen by the caller as the real fault would be.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, connect, type AddressInfo, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import pg from 'pg';
import { isTransientError } from '../src/index.ts';
import { FaultProxy, FaultServer, mergeFaults, FAULTS_NONE, spawnFault } from '../src/fault/index.ts';

const DATABASE_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

async function get(url: string, init: RequestInit = {}): Promise<{ status: number; body: Record<string, unknown> }> {
  const response = await fetch(url, init);
  return { status: response.status, body: (await response.json()) as Record<string, unknown> };
}

describe('FaultServer (in-process)', () => {
  let server: FaultServer;
  before(async () => { server = await FaultServer.start({ seed: 42 }); });
  after(async () => { await server.close(); });

  it('answers 200 and echoes the propagated deadline and trace headers', async () => {
    const r = await get(`${server.url}/v1/thing?x=1`, { headers: { 'x-deadline-remaining-ms': '750', traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' } });
    assert.equal(r.status, 200);
    assert.equal(r.body.path, '/v1/thing?x=1');
    assert.equal(r.body.deadline_remaining_ms, '750');
    assert.equal(r.body.traceparent, '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01');
  });

  it('errorRate 1 answers every request with errorStatus; a seeded 0.5 gives a replayable mix', async () => {
    server.set({ errorRate: 1, errorStatus: 502 });
    assert.equal((await get(server.url)).status, 502);
    server.heal();
    const mix = async (): Promise<string> => {
      const s = await FaultServer.start({ seed: 7, settings: { errorRate: 0.5 } });
      try {
        const statuses: number[] = [];
        for (let i = 0; i < 40; i += 1) statuses.push((await fetch(s.url)).status);
        return statuses.map((x) => (x === 200 ? '.' : 'E')).join('');
      } finally {
        await s.close();
      }
    };
    const first = await mix();
    assert.equal(await mix(), first, 'the same seed gives the same outcomes');
    const errors = first.split('E').length - 1;
    assert.ok(errors > 8 && errors < 32, `about half failed: ${first}`);
  });

  it('latencyMs delays every answer', async () => {
    server.set({ latencyMs: 150 });
    const t0 = performance.now();
    assert.equal((await get(server.url)).status, 200);
    assert.ok(performance.now() - t0 >= 145, 'delayed by the latency');
    server.heal();
  });

  it('dropRate 1 resets the connection: the caller sees a transient network error', async () => {
    server.set({ dropRate: 1 });
    const error = await fetch(server.url).catch((e: unknown) => e);
    assert.ok(error instanceof TypeError, String(error));
    assert.equal(isTransientError(error), true, `cause: ${String((error as { cause?: unknown }).cause)}`);
    assert.ok(server.stats.drops >= 1);
    server.heal();
  });

  it('blackhole holds the request until the caller gives up', async () => {
    server.set({ blackhole: true });
    const error = await fetch(server.url, { signal: AbortSignal.timeout(100) }).catch((e: unknown) => e);
    assert.equal((error as Error).name, 'TimeoutError');
    server.heal();
    assert.equal((await get(server.url)).status, 200);
  });

  it('the control API sets, reports and validates; control requests are never faulted', async () => {
    server.set({ errorRate: 1 });
    const put = await get(`${server.url}/__fault`, { method: 'PUT', body: JSON.stringify({ heal: true, latencyMs: 5, resetStats: true }) });
    assert.equal(put.status, 200);
    assert.equal((put.body.settings as { latencyMs: number }).latencyMs, 5);
    assert.equal((put.body.settings as { errorRate: number }).errorRate, 0);
    const bad = await get(`${server.url}/__fault`, { method: 'PUT', body: JSON.stringify({ errorRate: 2 }) });
    assert.equal(bad.status, 400);
    assert.match(String(bad.body.error), /errorRate/);
    const unknown = await get(`${server.url}/__fault`, { method: 'PUT', body: JSON.stringify({ nope: 1 }) });
    assert.equal(unknown.status, 400);
    await fetch(server.url);
    const status = await get(`${server.url}/__fault`);
    assert.equal((status.body.stats as { requests: number }).requests, 1);
    server.heal();
  });

  it('mergeFaults rejects every out-of-range value', () => {
    for (const patch of [{ latencyMs: -1 }, { latencyJitterMs: 4e6 }, { dropRate: 1.1 }, { errorStatus: 200 }, { blackhole: 'yes' }]) {
      assert.throws(() => mergeFaults(FAULTS_NONE, patch as never), RangeError, JSON.stringify(patch));
    }
  });
});

describe('FaultProxy', () => {
  it('forwards PostgreSQL traffic, adds latency both ways, resets live connections, refuses new ones', async () => {
    const url = new URL(DATABASE_URL);
    const proxy = await FaultProxy.start({ target: { host: url.hostname, port: Number(url.port || 5432) }, seed: 3 });
    url.host = `127.0.0.1:${proxy.port}`;
    const client = new pg.Client({ connectionString: url.toString() });
    client.on('error', () => {});
    try {
      await client.connect();
      assert.equal((await client.query<{ n: number }>('SELECT 1 AS n')).rows[0]?.n, 1);
      proxy.set({ latencyMs: 60 });
      const t0 = performance.now();
      await client.query('SELECT 1');
      assert.ok(performance.now() - t0 >= 115, 'request and response each delayed');
      proxy.heal();
      assert.equal(proxy.dropConnections(), 1);
      await assert.rejects(client.query('SELECT 1'));
      proxy.set({ dropRate: 1 });
      const refused = new pg.Client({ connectionString: url.toString() });
      refused.on('error', () => {});
      await assert.rejects(refused.connect());
      assert.ok(proxy.stats.drops >= 2);
    } finally {
      await client.end().catch(() => {});
      await proxy.close();
    }
  });

  it('keeps byte order while the latency changes mid-stream, and blackholes on demand', async () => {
    const echo = createServer((s) => s.pipe(s));
    await new Promise<void>((resolve) => echo.listen(0, '127.0.0.1', () => { resolve(); }));
    const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: (echo.address() as AddressInfo).port } });
    const socket: Socket = connect(proxy.port, '127.0.0.1');
    try {
      await once(socket, 'connect');
      let received = '';
      socket.setEncoding('utf8');
      socket.on('data', (d: string) => { received += d; });
      const sent: string[] = [];
      for (let i = 0; i < 30; i += 1) {
        // 40 ms, then 0 ms: later chunks must still not overtake earlier ones.
        proxy.set({ latencyMs: i % 2 === 0 ? 40 : 0 });
        const line = `chunk-${i};`;
        sent.push(line);
        socket.write(line);
        await new Promise((r) => setTimeout(r, 2));
      }
      proxy.heal();
      const deadline = Date.now() + 5000;
      while (received.length < sent.join('').length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      assert.equal(received, sent.join(''));
      proxy.set({ blackhole: true });
      socket.write('lost');
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(received, sent.join(''), 'nothing forwarded while blackholed');
    } finally {
      socket.destroy();
      await proxy.close();
      await new Promise<void>((resolve) => echo.close(() => { resolve(); }));
    }
  });
  it('delivers what a side sent before it closed, then the close, as TCP does; a reset is still a reset', async () => {
    // A client that sends a statement, gives up waiting and closes still has the statement
    // reach the server: the server reads it before the end of the stream.
    const received: Array<{ data: string; ended: boolean }> = [];
    const sink = createServer({ allowHalfOpen: true }, (s) => {
      const entry = { data: '', ended: false };
      received.push(entry);
      s.setEncoding('utf8');
      s.on('data', (d: string) => { entry.data += d; });
      s.on('end', () => { entry.ended = true; s.end(); });
      s.on('error', () => {});
    });
    await new Promise<void>((resolve) => sink.listen(0, '127.0.0.1', () => { resolve(); }));
    const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: (sink.address() as AddressInfo).port } });
    try {
      proxy.set({ latencyMs: 150 });
      const graceful: Socket = connect(proxy.port, '127.0.0.1');
      await once(graceful, 'connect');
      graceful.end('statement;');
      await once(graceful, 'close');
      const deadline = Date.now() + 5000;
      while (received[0]?.ended !== true && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      assert.deepEqual(received[0], { data: 'statement;', ended: true }, 'the bytes, then the end');
      const waitOpen = Date.now() + 5000;
      while (proxy.stats.open > 0 && Date.now() < waitOpen) await new Promise((r) => setTimeout(r, 10));
      assert.equal(proxy.stats.open, 0, 'the pair is gone once both sides closed');

      const reset: Socket = connect(proxy.port, '127.0.0.1');
      reset.on('error', () => {});
      await once(reset, 'connect');
      while (received.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      reset.write('lost;');
      reset.resetAndDestroy();
      await new Promise((r) => setTimeout(r, 400));
      assert.equal(received[1]?.data, '', 'a reset drops what was still in flight');
    } finally {
      await proxy.close();
      await new Promise<void>((resolve) => sink.close(() => { resolve(); }));
    }
  });

  it('ends a pair whose other side never closes, closeLingerMs after the first side\'s close', async () => {
    const held: Socket[] = [];
    const sink = createServer({ allowHalfOpen: true }, (s) => {
      held.push(s);
      s.on('error', () => {});
      s.resume();
    });
    await new Promise<void>((resolve) => sink.listen(0, '127.0.0.1', () => { resolve(); }));
    const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: (sink.address() as AddressInfo).port }, closeLingerMs: 200 });
    try {
      const socket = connect(proxy.port, '127.0.0.1');
      await once(socket, 'connect');
      socket.resume();
      socket.end('x');
      await once(socket, 'close');
      assert.equal(proxy.stats.open, 1, 'held while the server may still answer');
      const deadline = Date.now() + 5000;
      while (proxy.stats.open > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.equal(proxy.stats.open, 0);
    } finally {
      await proxy.close();
      for (const s of held) s.destroy();
      await new Promise<void>((resolve) => sink.close(() => { resolve(); }));
    }
  });
});

describe('fault doubles as child processes', () => {
  it('server: settings over the control API take effect at once', async () => {
    const fault = await spawnFault('server', ['--seed', '9', '--error-rate', '1']);
    try {
      assert.equal((await fetch(fault.url!)).status, 503);
      await fault.set({ heal: true, latencyMs: 20 });
      const t0 = performance.now();
      assert.equal((await fetch(fault.url!)).status, 200);
      assert.ok(performance.now() - t0 >= 18);
      const status = await fault.status();
      assert.equal(status.settings.latencyMs, 20);
      assert.equal(status.stats.requests, 2);
    } finally {
      await fault.stop();
    }
  });

  it('proxy: forwards to a server and drops connections on command', async () => {
    const target = await FaultServer.start();
    const { port } = new URL(target.url);
    const fault = await spawnFault('proxy', ['--target', `127.0.0.1:${port}`]);
    try {
      assert.equal((await fetch(`http://127.0.0.1:${fault.port}/x`)).status, 200);
      // Cut the keep-alive connection the first request left open, and refuse new ones.
      await fault.set({ dropRate: 1, dropConnections: true });
      const error = await fetch(`http://127.0.0.1:${fault.port}/x`).catch((e: unknown) => e);
      assert.ok(isTransientError(error), String(error));
      const status = await fault.status();
      assert.ok((status.stats.drops ?? 0) >= 1);
    } finally {
      await fault.stop();
      await target.close();
    }
  });
});

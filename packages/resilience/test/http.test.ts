/**
 * `httpCall` against a real HTTP server on loopback: the answer, the deadline sent downstream,
 * a 5xx as a dependency failure, and the body limit, whether or not the answer names its length;
 * connections refused, reset or closed (by real sockets, no mocked fetch); a hanging dependency
 * under callers' deadlines; callers that have already gone.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type ServerResponse } from 'node:http';
import { createServer as createTcpServer, type AddressInfo, type Server as TcpServer, type Socket } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import {
  CircuitOpenError,
  Deadline,
  DEADLINE_HEADER,
  DeadlineExceededError,
  DependencyConnectionError,
  DependencyHttpError,
  DependencyPolicy,
  DependencyResponseTooLargeError,
  HTTP_BODY_BYTES_MAX,
  httpCall,
  isTransientError,
  type AttemptOutcome,
  type DependencyPolicyOptions,
} from '../src/index.ts';

const MIB = 1024 * 1024;
let base = '';
let lastHeaders: IncomingHttpHeaders = {};
/** Requests that reached the server, by path. */
const hits = new Map<string, number>();
const server = createServer((request, response: ServerResponse) => {
  lastHeaders = request.headers;
  const url = request.url ?? '/';
  hits.set(url, (hits.get(url) ?? 0) + 1);
  if (url === '/hang') {
    // Never answers; `after` closes the connection.
  } else if (url === '/count') {
    response.writeHead(200).end('counted');
  } else if (url === '/cut-mid-body') {
    // Headers and part of the body, then the connection is dropped.
    response.writeHead(200, { 'content-length': '1000' });
    response.write('partial', () => { response.socket?.destroy(); });
  } else if (url === '/ok') {
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

/** A port nothing listens on: it was bound, then closed, so connecting to it is refused. */
let refusedBase = '';
/** Accepts each connection and resets it (RST) at once. */
let resetBase = '';
/** Accepts each connection and closes it (FIN) before any answer. */
let closedBase = '';
const tcpServers: TcpServer[] = [];

async function listenTcp(onConnection: (socket: Socket) => void): Promise<string> {
  const tcp = createTcpServer(onConnection);
  tcpServers.push(tcp);
  tcp.listen(0, '127.0.0.1');
  await once(tcp, 'listening');
  return `http://127.0.0.1:${(tcp.address() as AddressInfo).port}`;
}

before(async () => {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const gone = createTcpServer();
  gone.listen(0, '127.0.0.1');
  await once(gone, 'listening');
  refusedBase = `http://127.0.0.1:${(gone.address() as AddressInfo).port}`;
  gone.close();
  await once(gone, 'close');
  resetBase = await listenTcp((socket) => { socket.resetAndDestroy(); });
  closedBase = await listenTcp((socket) => { socket.destroy(); });
});
after(() => {
  server.closeAllConnections();
  server.close();
  for (const tcp of tcpServers) tcp.close();
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
    // The dependency's fault, typed as such (the runtime answers it 503, not 500).
    const tooLarge = (e: unknown): boolean => e instanceof DependencyResponseTooLargeError && e.bytesMax === HTTP_BODY_BYTES_MAX;
    await assert.rejects(httpCall(policy(), `${base}/declared-too-big`), (e: unknown) => tooLarge(e) && /exceeds/.test(String(e)));
    await assert.rejects(httpCall(policy(), `${base}/chunked-too-big`), (e: unknown) => tooLarge(e) && new RegExp(`response body exceeds ${HTTP_BODY_BYTES_MAX} bytes`).test(String(e)));
    assert.equal((await httpCall(policy(), `${base}/chunked-at-limit`)).body.length, HTTP_BODY_BYTES_MAX);
  });
});

/** A policy on the system clock with a count-window breaker; its attempts' outcomes are recorded. */
function observed(overrides: Partial<DependencyPolicyOptions> = {}): { p: DependencyPolicy; attempts: AttemptOutcome[] } {
  const attempts: AttemptOutcome[] = [];
  const p = new DependencyPolicy({
    name: 'dep',
    attemptTimeoutMs: 2000,
    callTimeoutMs: 2000,
    retry: false,
    breaker: { window: { kind: 'count', calls: 4 }, minimumCalls: 4, failureRateThreshold: 0.5, slowCallRateThreshold: 1, slowCallDurationMs: Infinity, openWaitMs: 60_000, halfOpenPermittedCalls: 1 },
    bulkhead: false,
    observer: { attempt: (_d, outcome) => attempts.push(outcome) },
    ...overrides,
  });
  return { p, attempts };
}

describe('httpCall: a connection that fails', () => {
  it('fails as a DependencyConnectionError naming the dependency and the network code, with fetch\'s error as its cause', async () => {
    const cases: Array<[string, string, readonly string[]]> = [
      ['refused', `${refusedBase}/x`, ['ECONNREFUSED']],
      ['reset on connect', `${resetBase}/x`, ['ECONNRESET', 'UND_ERR_SOCKET']],
      ['closed before answering', `${closedBase}/x`, ['UND_ERR_SOCKET', 'ECONNRESET']],
      ['dropped in the middle of the body', `${base}/cut-mid-body`, ['UND_ERR_SOCKET', 'ECONNRESET']],
      // RFC 6761: .invalid never resolves. EAI_AGAIN where the resolver itself is unreachable.
      ['host not resolved', 'http://ledgerline-no-such-host.invalid/x', ['ENOTFOUND', 'EAI_AGAIN']],
    ];
    for (const [what, url, codes] of cases) {
      const error = await httpCall(policy(), url).catch((e: unknown) => e);
      assert.ok(error instanceof DependencyConnectionError, `${what}: ${String(error)}`);
      assert.equal(error.dependency, 'dep', what);
      assert.ok(codes.includes(error.code), `${what}: code ${error.code}`);
      assert.ok(error.cause instanceof TypeError, `${what}: fetch's own error is the cause`);
      assert.match(error.message, /^dep: connection failed/, what);
    }
  });

  it('counts against the breaker, is retried when idempotent and transient, and an open breaker then stops calling', async () => {
    const { p, attempts } = observed({ retry: { attemptsMax: 2, backoff: { baseMs: 1, capMs: 1, jitter: 'none' }, budget: { ratio: 1, retriesMin: 10, windowMs: 10_000 } } });
    const first = await httpCall(p, `${refusedBase}/x`).catch((e: unknown) => e);
    assert.ok(first instanceof DependencyConnectionError && isTransientError(first));
    assert.deepEqual(attempts, ['failure', 'failure'], 'a GET refused is tried again');
    await assert.rejects(httpCall(p, `${closedBase}/x`, { method: 'POST', body: '{}' }), DependencyConnectionError);
    assert.equal(attempts.length, 3, 'a POST is not retried');
    await assert.rejects(httpCall(p, `${closedBase}/x`, { method: 'POST', body: '{}' }), DependencyConnectionError);
    assert.equal(p.breaker?.state, 'open', '4 connection failures of 4 calls');
    await assert.rejects(httpCall(p, `${base}/count`), CircuitOpenError);
    assert.equal(hits.get('/count') ?? 0, 0, 'the open breaker did not call');
  });

  it('leaves errors that are not the network\'s as they are: a malformed header is a bug here, an abort the caller\'s', async () => {
    const bad = await httpCall(policy(), `${base}/ok`, { headers: { 'x-bad': 'a\nb' } }).catch((e: unknown) => e);
    assert.ok(bad instanceof TypeError && !(bad instanceof DependencyConnectionError), String(bad));
    const controller = new AbortController();
    const call = httpCall(policy(), `${base}/hang`, { signal: controller.signal });
    await delay(20);
    controller.abort(new Error('client left'));
    await assert.rejects(call, /client left/);
  });
});

describe('httpCall: callers\' deadlines and signals', () => {
  it('a hanging dependency opens the breaker when callers\' deadlines cut the calls short, the deadline given as a signal too', async () => {
    const kinds: Array<[string, () => { deadline?: Deadline; signal?: AbortSignal }]> = [
      ['deadline', () => ({ deadline: Deadline.after(40) })],
      ['deadline and its signal', () => { const deadline = Deadline.after(40); return { deadline, signal: deadline.signal }; }],
      ['AbortSignal.timeout', () => ({ signal: AbortSignal.timeout(40) })],
    ];
    for (const [what, make] of kinds) {
      const { p, attempts } = observed();
      for (let i = 0; i < 4; i += 1) {
        const error = await httpCall(p, `${base}/hang`, make()).catch((e: unknown) => e);
        assert.ok(error instanceof DeadlineExceededError && error.dependency === 'dep', `${what}: ${String(error)}`);
      }
      assert.deepEqual(attempts, ['timeout', 'timeout', 'timeout', 'timeout'], what);
      assert.equal(p.breaker?.state, 'open', `${what}: 4 timeouts of 4 calls open the breaker`);
      const before = hits.get('/hang') ?? 0;
      await assert.rejects(httpCall(p, `${base}/hang`, make()), CircuitOpenError, what);
      assert.equal(hits.get('/hang') ?? 0, before, `${what}: the open breaker did not call`);
    }
  });

  it('a fallback serves when the caller\'s deadline passes, whether given as a deadline or as its signal', async () => {
    for (const signalToo of [false, true]) {
      const deadline = Deadline.after(30);
      const r = await httpCall(policy(), `${base}/hang`, {
        deadline,
        ...(signalToo ? { signal: deadline.signal } : {}),
        fallback: (e) => ({ status: 200, headers: new Headers(), body: e instanceof DeadlineExceededError ? 'stale' : String(e), fallback: true }),
      });
      assert.deepEqual([r.body, r.fallback], ['stale', true], `signal too: ${signalToo}`);
    }
  });

  it('a caller that has already gone fails at once without calling, whether it left or its deadline passed', async () => {
    const left = new AbortController();
    left.abort(new Error('client left'));
    const { p, attempts } = observed();
    // A call that cannot be cancelled (as a query in flight): only not starting it spares the dependency.
    const uncancellable = (): Promise<Response> => fetch(`${base}/count`, { method: 'POST' });
    await assert.rejects(p.execute(uncancellable, { signal: left.signal }), /client left/);
    await assert.rejects(httpCall(p, `${base}/count`, { signal: left.signal }), /client left/);
    const expired = Deadline.after(5);
    const expiredSignal = expired.signal;
    await delay(30);
    const error = await p.execute(uncancellable, { signal: expiredSignal }).catch((e: unknown) => e);
    assert.ok(error instanceof DeadlineExceededError && error.dependency === 'dep', String(error));
    await assert.rejects(httpCall(p, `${base}/count`, { signal: expiredSignal }), DeadlineExceededError);
    assert.equal(hits.get('/count') ?? 0, 0, 'the dependency never saw them');
    assert.deepEqual(p.breaker?.snapshot().calls, 0, 'nothing counted against the dependency');
    assert.deepEqual(attempts, ['timeout', 'timeout'], 'the expired ones are reported as timeouts of no duration');
  });

  it('a caller that has already gone is not queued behind a full bulkhead', async () => {
    const { p } = observed({ breaker: false, bulkhead: { concurrencyMax: 1, queueMax: 4 } });
    const holder = new AbortController();
    const holding = httpCall(p, `${base}/hang`, { signal: holder.signal }).catch(() => {});
    await delay(20);
    const left = new AbortController();
    left.abort(new Error('client left'));
    const started = performance.now();
    await assert.rejects(httpCall(p, `${base}/count`, { signal: left.signal }), /client left/);
    assert.ok(performance.now() - started < 500, 'failed at once, not after the call timeout');
    assert.equal(p.bulkhead?.queued, 0);
    holder.abort(new Error('done'));
    await holding;
  });
});

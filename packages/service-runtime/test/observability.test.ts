/**
 * Metrics, tracing and deadlines in the runtime: /metrics exposes request counts and
 * latencies per route template and outcome, pool usage, breaker states and service gauges;
 * W3C trace context flows in over HTTP, through the handler to outbound headers and back out
 * of a plain headers map (the NATS path); every log line of a request carries its trace ids;
 * an inbound deadline bounds the request.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import net from 'node:net';
import { Writable } from 'node:stream';
import { context, trace } from '@opentelemetry/api';
import { InMemorySpanExporter } from '@opentelemetry/sdk-trace-node';
import pg from 'pg';
import { pino } from 'pino';
import { Type } from 'typebox';
import { DependencyPolicy, ManualClock } from '@ledgerline/resilience';
import {
  baseConfigSchema,
  createService,
  createTracing,
  currentTraceIds,
  extractTraceContext,
  injectTraceHeaders,
  loadConfig,
  markStale,
  ServiceMetrics,
  withSpan,
  type Service,
} from '../src/index.ts';

const config = loadConfig(baseConfigSchema, {});
const DATABASE_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const TRACEPARENT = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';

/** A pino logger whose lines land in an array, parsed. */
function capturingLogger() {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n')) if (line !== '') lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level: 'info' }, stream), lines };
}

describe('metrics at /metrics', () => {
  let app: Service;
  let pool: pg.Pool;
  const metrics = new ServiceMetrics({ processMetrics: false });
  let lag = 1.5;
  let transfers = 0;

  before(async () => {
    pool = new pg.Pool({ connectionString: DATABASE_URL, max: 3 });
    metrics.observePool(pool);
    metrics.registerGauge('outbox_lag_seconds', 'Age of the oldest unpublished event.', () => lag);
    metrics.registerCounterFromTotal('ledger_transfers_total', 'Transfers applied.', () => transfers);
    app = await createService({ config, openapi: { title: 'metrics-test', version: '0' }, logger: false, metrics });
    app.get('/v1/things/:id', { schema: { params: Type.Object({ id: Type.String() }), response: { 200: Type.Object({ id: Type.String() }) } } }, (request) => ({ id: request.params.id }));
    app.get('/v1/boom', { schema: { response: { 200: Type.Object({}) } } }, () => { throw new Error('boom'); });
  });
  after(async () => {
    await app.close();
    await pool.end();
  });

  it('counts requests per route template and outcome, with a latency histogram', async () => {
    assert.equal(app.metrics, metrics);
    for (const id of ['a', 'b', 'c']) assert.equal((await app.inject(`/v1/things/${id}`)).statusCode, 200);
    assert.equal((await app.inject('/v1/boom')).statusCode, 500);
    assert.equal((await app.inject('/no/such/path/1')).statusCode, 404);
    await pool.query('SELECT 1');
    transfers = 42;
    const response = await app.inject('/metrics');
    assert.equal(response.statusCode, 200);
    assert.match(String(response.headers['content-type']), /^text\/plain/);
    const text = response.body;
    assert.match(text, /ledgerline_http_requests_total\{method="GET",route="\/v1\/things\/:id",outcome="ok"\} 3/);
    assert.match(text, /ledgerline_http_requests_total\{method="GET",route="\/v1\/boom",outcome="server_error"\} 1/);
    assert.match(text, /ledgerline_http_requests_total\{method="GET",route="__unmatched",outcome="client_error"\} 1/);
    assert.doesNotMatch(text, /no\/such\/path/, 'raw URLs never become labels');
    assert.match(text, /ledgerline_http_request_duration_seconds_bucket\{le="0.1",method="GET",route="\/v1\/things\/:id",outcome="ok"\} 3/);
    assert.match(text, /ledgerline_pg_pool_connections\{pool="default",state="max"\} 3/);
    assert.match(text, /ledgerline_pg_pool_connections\{pool="default",state="total"\} 1/);
    assert.match(text, /ledgerline_outbox_lag_seconds 1.5/);
    assert.match(text, /ledgerline_ledger_transfers_total 42/);
    lag = 0.25;
    transfers = 50;
    const again = (await app.inject('/metrics')).body;
    assert.match(again, /ledgerline_outbox_lag_seconds 0.25/);
    assert.match(again, /ledgerline_ledger_transfers_total 50/);
  });

  it('is on by default, with process metrics, and can be turned off', async () => {
    const on = await createService({ config, openapi: { title: 'x', version: '0' }, logger: false });
    assert.match((await on.inject('/metrics')).body, /ledgerline_process_cpu_user_seconds_total/);
    await on.close();
    const off = await createService({ config, openapi: { title: 'x', version: '0' }, logger: false, metrics: false });
    assert.equal((await off.inject('/metrics')).statusCode, 404);
    await off.close();
  });
});

describe('breakers, dependencies and the degradation level', () => {
  it('shows breaker states and transitions in /metrics and the level in /ready and the logs', async () => {
    const clock = new ManualClock();
    const metrics = new ServiceMetrics({ processMetrics: false });
    const policy = new DependencyPolicy({
      name: 'fx',
      attemptTimeoutMs: 100,
      callTimeoutMs: 100,
      retry: false,
      bulkhead: false,
      breaker: { window: { kind: 'count', calls: 2 }, minimumCalls: 2, failureRateThreshold: 0.5, slowCallRateThreshold: 1, slowCallDurationMs: Infinity, openWaitMs: 1000, halfOpenPermittedCalls: 1 },
      clock,
      observer: metrics.policyObserver(),
    });
    const { logger, lines } = capturingLogger();
    const app = await createService({ config, openapi: { title: 'deg', version: '0' }, logger, metrics, dependencies: [policy] });
    try {
      let ready = (await app.inject('/ready')).json<{ degradation: { level: number; dependencies: Record<string, string> } }>();
      assert.deepEqual(ready.degradation, { level: 0, shedding: [], dependencies: { fx: 'closed' } });
      for (let i = 0; i < 2; i += 1) await assert.rejects(policy.execute(() => { throw new Error('down'); }));
      assert.equal(await policy.execute(() => 'x', { fallback: () => 'stale' }), 'stale');
      ready = (await app.inject('/ready')).json();
      assert.deepEqual(ready.degradation, { level: 1, shedding: [], dependencies: { fx: 'open' } });
      const text = (await app.inject('/metrics')).body;
      assert.match(text, /ledgerline_breaker_state\{dependency="fx",state="open"\} 1/);
      assert.match(text, /ledgerline_breaker_state\{dependency="fx",state="closed"\} 0/);
      assert.match(text, /ledgerline_breaker_transitions_total\{dependency="fx",from="closed",to="open"\} 1/);
      assert.match(text, /ledgerline_dependency_calls_total\{dependency="fx",outcome="fallback"\} 1/);
      assert.match(text, /ledgerline_dependency_calls_total\{dependency="fx",outcome="failure"\} 2/);
      assert.match(text, /ledgerline_degradation_level 1/);
      const logged = lines.find((l) => l.msg === 'degradation level 0 → 1');
      assert.ok(logged, 'the change is logged');
      assert.equal(logged.level, 40);
      clock.set(clock.now() + 1000);
      assert.equal(await policy.execute(() => 'up'), 'up');
      ready = (await app.inject('/ready')).json();
      assert.equal(ready.degradation.level, 0);
      assert.ok(lines.some((l) => l.msg === 'degradation level 1 → 0: back to normal'));
    } finally {
      await app.close();
    }
  });
});

describe('tracing', () => {
  const exporter = new InMemorySpanExporter();
  let app: Service;
  let seenOutbound: Record<string, string> = {};
  const { logger, lines } = capturingLogger();

  before(async () => {
    app = await createService({ config, openapi: { title: 'trace-test', version: '0' }, logger, tracing: { exporter, exportImmediately: true } });
    app.get('/v1/work', { schema: { response: { 200: Type.Object({ trace_id: Type.String() }) } } }, async (request) => {
      await new Promise((r) => setTimeout(r, 1));
      request.log.info('handler ran');
      seenOutbound = injectTraceHeaders({});
      return { trace_id: currentTraceIds()?.trace_id ?? '' };
    });
  });
  after(async () => { await app.close(); });

  it('continues the caller\'s trace, makes the handler\'s context active, and logs trace ids', async () => {
    const response = await app.inject({ url: '/v1/work', headers: { traceparent: TRACEPARENT } });
    assert.equal(response.statusCode, 200);
    assert.equal(response.json<{ trace_id: string }>().trace_id, '0af7651916cd43dd8448eb211c80319c');
    const [span] = exporter.getFinishedSpans();
    assert.ok(span);
    assert.equal(span.name, 'GET /v1/work');
    assert.equal(span.spanContext().traceId, '0af7651916cd43dd8448eb211c80319c');
    assert.equal(span.parentSpanContext?.spanId, 'b7ad6b7169203331');
    assert.equal(span.attributes['http.response.status_code'], 200);
    // Outbound headers made inside the handler name this server span as the parent.
    assert.equal(seenOutbound.traceparent, `00-0af7651916cd43dd8448eb211c80319c-${span.spanContext().spanId}-01`);
    const handlerLine = lines.find((l) => l.msg === 'handler ran');
    assert.equal(handlerLine?.trace_id, '0af7651916cd43dd8448eb211c80319c');
    assert.equal(handlerLine?.span_id, span.spanContext().spanId);
    const completed = lines.find((l) => l.msg === 'request completed');
    assert.equal(completed?.trace_id, '0af7651916cd43dd8448eb211c80319c', 'Fastify\'s own request log carries the trace too');
  });

  it('starts a new trace when the caller sends none (or a malformed one)', async () => {
    exporter.reset();
    for (const headers of [{}, { traceparent: 'garbage' }]) {
      const r = await app.inject({ url: '/v1/work', headers });
      assert.match(r.json<{ trace_id: string }>().trace_id, /^[0-9a-f]{32}$/);
    }
    const spans = exporter.getFinishedSpans();
    assert.equal(spans.length, 2);
    assert.ok(spans.every((s) => s.parentSpanContext === undefined));
  });

  it('a request no route matches is traced too, its log lines included', async () => {
    exporter.reset();
    lines.length = 0;
    const response = await app.inject({ url: '/v1/nothing-here', headers: { traceparent: TRACEPARENT } });
    assert.equal(response.statusCode, 404);
    const [span] = exporter.getFinishedSpans();
    assert.equal(span?.spanContext().traceId, '0af7651916cd43dd8448eb211c80319c');
    assert.equal(span?.attributes['http.response.status_code'], 404);
    const completed = lines.find((l) => l.msg === 'request completed');
    assert.equal(completed?.trace_id, '0af7651916cd43dd8448eb211c80319c');
    assert.equal(completed?.span_id, span?.spanContext().spanId);
  });

  it('round-trips trace context through a plain headers map (the NATS message path)', async () => {
    const tracing = createTracing({ serviceName: 'events' });
    const span = tracing.tracer.startSpan('publish');
    const headers = injectTraceHeaders({}, trace.setSpan(context.active(), span));
    assert.match(headers.traceparent ?? '', /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
    const received = extractTraceContext({ ...headers });
    assert.deepEqual(currentTraceIds(received), { trace_id: span.spanContext().traceId, span_id: span.spanContext().spanId });
    span.end();
    assert.deepEqual(injectTraceHeaders({}), {}, 'outside any span nothing is injected');
    assert.equal(currentTraceIds(extractTraceContext({})), undefined);
    await tracing.shutdown();
  });
});

describe('tracing without an exporter: spans carry the trace, nothing is recorded', () => {
  let app: Service;
  let seen: { outbound: string | undefined; recording: boolean | undefined; ids: ReturnType<typeof currentTraceIds> } | undefined;
  const { logger, lines } = capturingLogger();

  before(async () => {
    app = await createService({ config, openapi: { title: 'propagation-test', version: '0' }, logger, tracing: {} });
    app.get('/v1/work', { schema: { response: { 200: Type.Object({}) } } }, async (request) => {
      await new Promise((r) => setTimeout(r, 1));
      request.log.info('handler ran');
      seen = { outbound: injectTraceHeaders({}).traceparent, recording: trace.getActiveSpan()?.isRecording(), ids: currentTraceIds() };
      return {};
    });
  });
  after(async () => { await app.close(); });

  it("continues the caller's trace and flags with a span id of its own, in the handler, its logs and outbound calls", async () => {
    for (const flags of ['01', '00']) {
      lines.length = 0;
      const response = await app.inject({ url: '/v1/work', headers: { traceparent: `00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-${flags}` } });
      assert.equal(response.statusCode, 200);
      assert.equal(seen?.recording, false, 'nothing is recorded');
      assert.equal(seen?.ids?.trace_id, '0af7651916cd43dd8448eb211c80319c');
      assert.match(seen?.ids?.span_id ?? '', /^[0-9a-f]{16}$/);
      assert.notEqual(seen?.ids?.span_id, 'b7ad6b7169203331');
      assert.equal(seen?.outbound, `00-0af7651916cd43dd8448eb211c80319c-${seen?.ids?.span_id}-${flags}`);
      for (const msg of ['handler ran', 'request completed']) {
        const line = lines.find((l) => l.msg === msg);
        assert.deepEqual([line?.trace_id, line?.span_id], [seen?.ids?.trace_id, seen?.ids?.span_id], msg);
      }
    }
  });

  it('starts a sampled trace when the caller sends none; nested spans stay in it', async () => {
    const a = await app.inject({ url: '/v1/work' });
    assert.equal(a.statusCode, 200);
    const first = seen;
    await app.inject({ url: '/v1/work' });
    assert.match(first?.outbound ?? '', /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
    assert.notEqual(first?.ids?.trace_id, seen?.ids?.trace_id, 'each request without a parent starts its own trace');

    const tracing = createTracing({ serviceName: 'nested' });
    assert.equal(tracing.recording, false);
    const parent = extractTraceContext({ traceparent: TRACEPARENT });
    const inner = await context.with(parent, () => withSpan(tracing.tracer, 'inner', (span) => Promise.resolve({ span: span.spanContext(), active: currentTraceIds() })));
    assert.equal(inner.span.traceId, '0af7651916cd43dd8448eb211c80319c');
    assert.equal(inner.active?.span_id, inner.span.spanId, 'the new span is the active one inside');
    const explicit = tracing.tracer.startActiveSpan('explicit', {}, parent, (span) => span.spanContext());
    assert.equal(explicit.traceId, '0af7651916cd43dd8448eb211c80319c');
    assert.notEqual(explicit.spanId, inner.span.spanId);
    await tracing.shutdown();
  });
});

describe('inbound deadlines', () => {
  let app: Service;
  let remaining = -1;
  before(async () => {
    app = await createService({ config, openapi: { title: 'deadline-test', version: '0' }, logger: false, deadlineDefaultMs: 5000 });
    app.get('/v1/slow', { schema: { response: { 200: Type.Object({}) } } }, (request) => {
      remaining = request.deadline.remainingMs();
      return {};
    });
  });
  after(async () => { await app.close(); });

  it('reads the remaining budget from x-deadline-remaining-ms, else uses the default', async () => {
    assert.equal((await app.inject({ url: '/v1/slow', headers: { 'x-deadline-remaining-ms': '800' } })).statusCode, 200);
    assert.ok(remaining > 700 && remaining <= 800, `remaining ${remaining}`);
    await app.inject('/v1/slow');
    assert.ok(remaining > 4900 && remaining <= 5000, `remaining ${remaining}`);
  });

  it('answers 504 without running the handler when the deadline has already passed', async () => {
    remaining = -1;
    const r = await app.inject({ url: '/v1/slow', headers: { 'x-deadline-remaining-ms': '0' } });
    assert.equal(r.statusCode, 504);
    assert.equal(r.json<{ type: string }>().type, 'https://ledgerline.dev/problems/deadline-exceeded');
    assert.equal(remaining, -1, 'the handler did not run');
  });
});

describe('stale answers', () => {
  it('markStale sets x-stale, Age and Warning 110', async () => {
    const app = await createService({ config, openapi: { title: 'stale-test', version: '0' }, logger: false });
    app.get('/v1/rate', { schema: { response: { 200: Type.Object({ rate: Type.String() }) } } }, (_request, reply) => {
      markStale(reply, 12_345);
      return { rate: '1.08' };
    });
    const r = await app.inject('/v1/rate');
    assert.equal(r.headers['x-stale'], 'true');
    assert.equal(r.headers.age, '12');
    assert.equal(r.headers.warning, '110 - "Response is Stale"');
    await app.close();
  });
});

describe('request log lines', () => {
  it('log an error refused by the HTTP parser without its raw bytes (request line, query, Authorization)', async () => {
    const lines: string[] = [];
    const stream = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(chunk.toString());
        done();
      },
    });
    const app = await createService({ config, openapi: { title: 'log-test', version: '0' }, logger: pino({ level: 'debug' }, stream) });
    await app.listen({ port: 0, host: '127.0.0.1' });
    try {
      const { port } = app.server.address() as net.AddressInfo;
      await new Promise<void>((resolve) => {
        const socket = net.connect(port, '127.0.0.1', () =>
          socket.write('POST /oauth/token?password=Qu3rySecret HTTP/1.1\r\nHost: x\r\nAuthorization: Basic cGF5bWVudHM6UXUzcnlTZWNyZXQ=\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab'),
        );
        socket.on('data', () => {});
        socket.on('close', () => resolve());
        socket.on('error', () => resolve());
      });
    } finally {
      await app.close();
    }
    const refused = lines.map((l) => JSON.parse(l) as { msg?: string; err?: Record<string, unknown> }).find((l) => l.msg === 'client error refused by the HTTP parser');
    assert.ok(refused?.err !== undefined, 'the parser error is logged');
    assert.equal(refused.err.rawPacket, undefined);
    assert.equal(refused.err.code, 'HPE_UNEXPECTED_CONTENT_LENGTH');
    assert.ok(!lines.join('').includes('cGF5bWVudHM6UXUzcnlTZWNyZXQ') && !lines.join('').includes('Qu3rySecret'));
  });

  it('log a request\'s path, never its query string, which may carry a password or a token', async () => {
    const { logger, lines } = capturingLogger();
    const app = await createService({ config, openapi: { title: 'log-test', version: '0' }, logger });
    app.post('/oauth/token', { schema: { response: { 200: Type.Object({}) } } }, () => ({}));
    try {
      const res = await app.inject({ method: 'POST', url: '/oauth/token?grant_type=password&username=root&password=Qu3rySecret', payload: {} });
      assert.equal(res.statusCode, 200);
      await app.inject({ method: 'GET', url: '/v1/missing?token=T0kenSecret' });
      const text = JSON.stringify(lines);
      assert.ok(!text.includes('Qu3rySecret') && !text.includes('T0kenSecret'), text);
      const incoming = lines.filter((l) => l.msg === 'incoming request').map((l) => l.req as Record<string, unknown>);
      assert.deepEqual(incoming.map((r) => [r.method, r.url, r.query]), [['POST', '/oauth/token', 'withheld'], ['GET', '/v1/missing', 'withheld']]);
      assert.ok(incoming.every((r) => r.remoteAddress === '127.0.0.1'));
    } finally {
      await app.close();
    }
  });
});

/**
 * Wires metrics, tracing, deadlines, rate limiting, load shedding and the degradation level
 * into a service: `createService` calls `installResilience` once, before any route exists,
 * so every route (the runtime's and the service's) gets them.
 */
import type { FastifyRequest } from 'fastify';
import { context, SpanKind, SpanStatusCode, trace, type Context, type Span } from '@opentelemetry/api';
import { LoadShedder, type DependencyPolicy } from '@ledgerline/resilience';
import { DegradationTracker, type DegradationSnapshot } from './degradation.ts';
import { ServiceMetrics, UNMATCHED_ROUTE, type MetricsOptions, type RequestOutcome } from './metrics.ts';
import {
  applyDeadline,
  applyLoadShedding,
  applyRateLimit,
  DEADLINE_DEFAULT_MS,
  isOpsRoute,
  OPS_ROUTES,
  QUEUE_TIMEOUT_MS_DEFAULT,
  validateRateLimits,
  validateRouteGates,
  type LoadSheddingOptions,
  type RateLimitingOptions,
} from './priority.ts';
import { ProblemResponse } from './problem.ts';
import { requestSlot } from './request-slot.ts';
import { documentRoute } from './route-docs.ts';
import type { Service } from './service.ts';
import { createTracing, currentTraceIds, extractTraceContext, type Tracing, type TracingOptions } from './tracing.ts';

declare module 'fastify' {
  interface FastifyInstance {
    /** The service's metrics (undefined when disabled): register the service's own here. */
    metrics: ServiceMetrics | undefined;
    /** The current degradation level and its causes. */
    degradation: () => DegradationSnapshot;
  }
}

export interface ResilienceOptions {
  /** Prometheus metrics at GET /metrics. Default on; pass a `ServiceMetrics` to share one. */
  metrics?: ServiceMetrics | MetricsOptions | false;
  /** OpenTelemetry tracing. Default on (spans made and propagated; exported only with an exporter). */
  tracing?: Omit<TracingOptions, 'serviceName'> & { serviceName?: string } | false;
  /** Priority load shedding. Default off. */
  loadShedding?: LoadSheddingOptions | false;
  /** Per-client, per-route rate limiting in Redis. Default off. */
  rateLimit?: RateLimitingOptions | false;
  /** Outbound dependencies: their breakers count towards the degradation level and show in /ready. */
  dependencies?: readonly DependencyPolicy[];
  /** The deadline of requests that carry none; default 30 s. */
  deadlineDefaultMs?: number;
}

export interface InstalledResilience {
  metrics: ServiceMetrics | undefined;
  tracing: Tracing | undefined;
  shedder: LoadShedder | undefined;
  degradation: DegradationTracker;
}

interface RequestState {
  span: Span | undefined;
  ctx: Context | undefined;
  outcome: RequestOutcome | undefined;
}

/**
 * Where the child logger factory leaves the server span, on the raw request, for onRequest
 * (Fastify makes the request's logger before the request itself; see requestSlot for why not
 * a WeakMap).
 */
const REQUEST_SPAN = Symbol('ledgerline.observability.span');
type SpanHolder = { [REQUEST_SPAN]?: { span: Span; ctx: Context } };

export function installResilience(app: Service, serviceName: string, options: ResilienceOptions = {}): InstalledResilience {
  const metrics = options.metrics === false ? undefined : options.metrics instanceof ServiceMetrics ? options.metrics : new ServiceMetrics(options.metrics);
  const tracing = options.tracing === false ? undefined : createTracing({ serviceName, ...options.tracing });
  const deadlineDefaultMs = options.deadlineDefaultMs ?? DEADLINE_DEFAULT_MS;
  const rateLimit = options.rateLimit === false ? undefined : options.rateLimit;
  if (rateLimit !== undefined) validateRateLimits(rateLimit);
  const sheddingOptions = options.loadShedding === false ? undefined : options.loadShedding;
  const shedder = sheddingOptions === undefined ? undefined : new LoadShedder({
    ...sheddingOptions,
    queueTimeoutMs: sheddingOptions.queueTimeoutMs ?? QUEUE_TIMEOUT_MS_DEFAULT,
    // Called only once requests flow, after `degradation` below exists.
    onLevelChange: () => { degradation.refresh(); },
    onShed: (e) => { metrics?.shed.inc({ priority: e.priority, reason: e.reason }); },
  });
  const degradation = new DegradationTracker({
    shedder,
    dependencies: options.dependencies ?? [],
    log: app.log,
    onLevel: (level) => { metrics?.degradationLevel.set(level); },
  });
  metrics?.degradationLevel.set(0);
  for (const d of options.dependencies ?? []) {
    if (d.breaker !== undefined) {
      metrics?.setBreakerState(d.name, d.breaker.state);
      const m = metrics;
      if (m !== undefined) d.breaker.onStateChange((t) => { m.setBreakerState(t.name, t.to); m.breakerTransitions.inc({ dependency: t.name, from: t.from, to: t.to }); });
    }
  }

  app.decorate('metrics', metrics);
  app.decorate('degradation', () => degradation.refresh());
  app.decorateRequest('deadline', null as never);

  // The runtime's own answers, in the OpenAPI document of each route they can reach: 503 (an
  // instance shutting down, and load shedding), 504 (the caller's deadline passed before the
  // request could start), and 429 where rate limiting applies. A route's own schema wins.
  app.addHook('onRoute', (route) => {
    validateRouteGates(String(route.method), route.url, route.config);
    const responses: Record<number, object> = { 503: ProblemResponse, 504: ProblemResponse };
    if (rateLimit !== undefined && !OPS_ROUTES.has(route.url) && route.config?.rateLimit !== false) responses[429] = ProblemResponse;
    documentRoute(route, { responses });
    // A shed slot is held until the work ends, even when the client has left (priority.ts):
    // an async handler that settles without sending anything ends its work too.
    if (shedder !== undefined && !OPS_ROUTES.has(route.url)) {
      const handler = route.handler;
      route.handler = function shedSlotHandler(this: unknown, request, reply) {
        const result: unknown = handler.call(this as never, request, reply);
        if (result instanceof Promise) {
          const done = (): void => { shedWorkDone.get(request)?.(); };
          result.then(done, done);
        }
        return result;
      };
    }
  });

  const state = requestSlot<RequestState>(app, 'ledgerline.observability.state');
  // Called when an admitted request's work has ended (its reply is sent, or its handler settled).
  const shedWorkDone = requestSlot<() => void>(app, 'ledgerline.shed.workDone');
  // The server span of each request is started where Fastify makes the request's logger, so
  // that its ids are bound in that one child logger. Binding them afterwards took a second
  // child of the request's own logger, made per request: V8 then turns each request's logger
  // into a prototype, which cost about 15 µs of CPU a request (measured on a trivial route,
  // a fifth of it), far more than the span.
  if (tracing !== undefined) {
    app.setChildLoggerFactory(function childLogger(logger, bindings, opts, rawReq) {
      const parent = extractTraceContext(rawReq.headers);
      // Named and given its attributes in onRequest, once the route is known.
      const span = tracing.tracer.startSpan('HTTP', { kind: SpanKind.SERVER }, parent);
      const ctx = trace.setSpan(parent, span);
      (rawReq as SpanHolder)[REQUEST_SPAN] = { span, ctx };
      const ids = currentTraceIds(ctx);
      return logger.child(ids === undefined ? bindings : { ...bindings, ...ids }, opts);
    });
  }
  const markOutcome = (request: FastifyRequest, outcome: RequestOutcome): void => {
    const s = state.get(request);
    if (s !== undefined) s.outcome = outcome;
  };

  app.addHook('onRequest', async (request, reply) => {
    const s: RequestState = { span: undefined, ctx: undefined, outcome: undefined };
    state.set(request, s);
    // Every route's context is made after the factory above is set (createService sets the
    // 404 handler after this), so with tracing on each request arrives with its span started.
    const started = (request.raw as SpanHolder)[REQUEST_SPAN];
    if (started !== undefined) {
      const route = request.routeOptions.url ?? UNMATCHED_ROUTE;
      started.span.updateName(`${request.method} ${route}`);
      started.span.setAttributes({ 'http.request.method': request.method, 'http.route': route, 'url.path': request.url.split('?', 1)[0] ?? '' });
      s.span = started.span;
      s.ctx = started.ctx;
    }
    if (!applyDeadline(request, reply, deadlineDefaultMs)) return reply;
    if (isOpsRoute(request)) return;
    if (shedder !== undefined) {
      const admitted = await applyLoadShedding(request, reply, shedder, (workDone) => { shedWorkDone.set(request, workDone); });
      if (!admitted) {
        if (reply.statusCode === 503) markOutcome(request, 'shed');
        return reply;
      }
    }
    return;
  });

  if (rateLimit !== undefined) {
    // After every onRequest hook, authentication included, so that `clientId` may name the
    // authenticated principal: keyed on a header the caller chooses, a limit is only a
    // suggestion. The price is that a limited client's body is parsed (up to the body limit)
    // before its 429; the load shedder, which protects the process, still acts first.
    app.addHook('preValidation', async (request, reply) => {
      if (isOpsRoute(request)) return;
      const passed = await applyRateLimit(request, reply, rateLimit,
        (route) => { metrics?.rateLimited.inc({ route }); markOutcome(request, 'rate_limited'); },
        (error) => {
          metrics?.rateLimitErrors.inc();
          request.log.warn({ err: error }, 'rate limit: store unavailable; request let through');
        });
      if (!passed) return reply;
      return;
    });
  }

  if (shedder !== undefined) {
    // Every answer passes here, a handler's, an error's, a refusal's, even when its client has
    // gone (Fastify still sends what a handler returns): the request's work is over.
    app.addHook('onSend', (request, _reply, payload, done) => {
      shedWorkDone.get(request)?.();
      done(null, payload);
    });
  }

  if (tracing !== undefined) {
    // Run the handler inside the request's span, so outbound calls and child spans made in
    // it (and their `injectTraceHeaders`) see it as the active context.
    app.addHook('preHandler', (request, _reply, done) => {
      const ctx = state.get(request)?.ctx;
      if (ctx === undefined) done();
      else context.with(ctx, done);
    });
  }

  app.addHook('onResponse', (request, reply, done) => {
    const s = state.get(request);
    const status = reply.statusCode;
    const outcome: RequestOutcome = s?.outcome ?? (status >= 500 ? 'server_error' : status >= 400 ? 'client_error' : 'ok');
    const route = request.routeOptions.url ?? UNMATCHED_ROUTE;
    metrics?.observeRequest(request.method, route, outcome, reply.elapsedTime / 1000);
    if (s?.span !== undefined) {
      s.span.setAttribute('http.response.status_code', status);
      if (status >= 500) s.span.setStatus({ code: SpanStatusCode.ERROR });
      s.span.end();
      s.span = undefined;
    }
    done();
  });

  app.addHook('onRequestAbort', (request, done) => {
    const s = state.get(request);
    if (s?.span !== undefined) {
      s.span.setStatus({ code: SpanStatusCode.ERROR, message: 'client aborted' });
      s.span.end();
      s.span = undefined;
    }
    done();
  });

  if (metrics !== undefined) {
    app.get('/metrics', { schema: { hide: true } }, async (_request, reply) => {
      degradation.refresh();
      return reply.type(metrics.registry.contentType).send(await metrics.registry.metrics());
    });
  }
  if (tracing !== undefined) app.addHook('onClose', async () => { await tracing.shutdown(); });

  return { metrics, tracing, shedder, degradation };
}

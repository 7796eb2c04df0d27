/**
 * OpenTelemetry tracing with W3C trace context (`traceparent`, `tracestate`).
 *
 * Each service builds its own tracer provider and does not register it globally, so several
 * services in one process (tests) keep their spans apart. The one global thing installed is
 * the AsyncLocalStorage context manager, without which `context.active()` would not follow
 * a request through its awaits; it is installed once per process.
 *
 * Propagation is a plain function over a headers map, so the same two functions serve HTTP
 * (outbound `fetch` headers) and NATS (message headers copied to and from a map):
 *   injectTraceHeaders(headers)            // before sending: adds traceparent/tracestate
 *   context.with(extractTraceContext(h), () => handle(message))   // on receipt
 */
import { context, SpanStatusCode, trace, type Context, type Span, type Tracer } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { NodeTracerProvider, SimpleSpanProcessor, BatchSpanProcessor, type SpanExporter, type Sampler } from '@opentelemetry/sdk-trace-node';

const propagator = new W3CTraceContextPropagator();

/** The headers W3C trace context uses. */
export const TRACE_HEADERS = ['traceparent', 'tracestate'] as const;

export type HeaderMap = Record<string, string | string[] | undefined>;

const setter = {
  set(carrier: Record<string, string>, key: string, value: string): void {
    carrier[key] = value;
  },
};

const getter = {
  get(carrier: HeaderMap, key: string): string | string[] | undefined {
    return carrier[key] ?? carrier[key.toLowerCase()];
  },
  keys(carrier: HeaderMap): string[] {
    return Object.keys(carrier);
  },
};

/** Writes the trace context of `ctx` (default: the active one) into `headers`. Nothing when there is no span. */
export function injectTraceHeaders(headers: Record<string, string>, ctx: Context = context.active()): Record<string, string> {
  propagator.inject(ctx, headers, setter);
  return headers;
}

/** The context a set of incoming headers carries (the remote parent), on top of `ctx`. */
export function extractTraceContext(headers: HeaderMap, ctx: Context = context.active()): Context {
  return propagator.extract(ctx, headers, getter);
}

/** The active span's ids in the log field names we use, or undefined outside any span. */
export function currentTraceIds(ctx: Context = context.active()): { trace_id: string; span_id: string } | undefined {
  const spanContext = trace.getSpanContext(ctx);
  if (spanContext === undefined) return undefined;
  return { trace_id: spanContext.traceId, span_id: spanContext.spanId };
}

let contextManagerInstalled = false;

/** Installs the AsyncLocalStorage context manager, once per process. */
export function installContextManager(): void {
  if (contextManagerInstalled) return;
  // If something else (an APM agent) already installed one, setGlobalContextManager returns
  // false and keeps it: theirs propagates context just as well.
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  contextManagerInstalled = true;
}

export interface TracingOptions {
  serviceName: string;
  /**
   * Where finished spans go. Without one, spans are still made (ids reach the logs and the
   * downstream calls) but nothing is exported. No OTLP exporter is bundled yet.
   */
  exporter?: SpanExporter;
  /** Export each span as it ends (tests) rather than in batches (default in production). */
  exportImmediately?: boolean;
  sampler?: Sampler;
}

export interface Tracing {
  tracer: Tracer;
  provider: NodeTracerProvider;
  /** Flushes and stops exporting; call at shutdown. */
  shutdown(): Promise<void>;
}

export function createTracing(options: TracingOptions): Tracing {
  installContextManager();
  const { exporter } = options;
  const spanProcessors = exporter === undefined ? [] : [options.exportImmediately === true ? new SimpleSpanProcessor(exporter) : new BatchSpanProcessor(exporter)];
  const provider = new NodeTracerProvider({
    resource: resourceFromAttributes({ 'service.name': options.serviceName }),
    spanProcessors,
    ...(options.sampler === undefined ? {} : { sampler: options.sampler }),
  });
  return {
    tracer: provider.getTracer('@ledgerline/service-runtime'),
    provider,
    shutdown: () => provider.shutdown(),
  };
}

/** Runs `fn` inside a new span (child of the active one), ending it with the outcome. */
export async function withSpan<T>(tracer: Tracer, name: string, fn: (span: Span) => Promise<T>): Promise<T> {
  return tracer.startActiveSpan(name, async (span) => {
    try {
      return await fn(span);
    } catch (error) {
      span.recordException(error instanceof Error ? error : String(error));
      span.setStatus({ code: SpanStatusCode.ERROR, message: error instanceof Error ? error.message : String(error) });
      throw error;
    } finally {
      span.end();
    }
  });
}

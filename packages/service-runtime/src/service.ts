/**
 * `createService`: a Fastify instance with the conventions every Ledgerline HTTP service
 * shares: request ids, problem+json errors, strict validation, health and readiness, and an
 * OpenAPI document built from the route schemas.
 */
import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import swagger from '@fastify/swagger';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { LogController } from 'fastify';
import type {
  FastifyBaseLogger,
  FastifyInstance,
  RawReplyDefaultExpression,
  RawRequestDefaultExpression,
  RawServerDefault,
} from 'fastify';
import { pino } from 'pino';
import { Type } from 'typebox';
import type { BaseConfig } from './config.ts';
import { installJsonBodyParser } from './json-body.ts';
import { ProblemResponse } from './problem.ts';
import {
  createClientErrorHandler,
  errorHandler,
  notFoundHandler,
  PROBLEM_TYPES,
  REQUEST_ID_HEADER,
  sendProblem,
  validationProblem,
} from './problem-handlers.ts';
import { BEARER_SECURITY_SCHEME, BEARER_SECURITY_SCHEME_OBJECT, documentedSchema } from './route-docs.ts';
import { runReadinessChecks } from './readiness.ts';
import type { ReadinessCheck } from './readiness.ts';
import { validatorCompiler } from './validation.ts';
import { installResilience, type ResilienceOptions } from './observability.ts';

export type Service = FastifyInstance<
  RawServerDefault,
  RawRequestDefaultExpression,
  RawReplyDefaultExpression,
  FastifyBaseLogger,
  TypeBoxTypeProvider
>;

/** Metrics, tracing, deadlines, load shedding, rate limiting and dependencies: see observability.ts. */
export interface ServiceOptions extends ResilienceOptions {
  config: Pick<BaseConfig, 'LOG_LEVEL' | 'BODY_LIMIT_BYTES'>;
  openapi: { title: string; version: string; description?: string };
  readinessChecks?: readonly ReadinessCheck[];
  /** `false` disables logging (tests); a pino logger replaces the default one on stdout. */
  logger?: false | FastifyBaseLogger;
}

/** Ids we accept from callers: short and safe to put in logs and headers unescaped. */
const REQUEST_ID_PATTERN = /^[A-Za-z0-9._-]{1,128}$/;

/**
 * Time allowed to receive a whole request. Fastify's default is no limit, which lets a slow
 * client hold a connection forever when no proxy sits in front.
 */
const REQUEST_RECEIVE_TIMEOUT_MS = 30_000;
/** Retry-After on a request refused because the instance is shutting down: another will answer. */
const SHUTDOWN_RETRY_AFTER_SECONDS = 1;

const HealthSchema = Type.Object({ status: Type.Literal('ok') });
const DegradationSchema = Type.Object({
  level: Type.Integer({ minimum: 0, maximum: 3, description: '0 normal; 1 low shed or a dependency degraded; 2 low and normal shed; 3 only critical served' }),
  shedding: Type.Array(Type.String()),
  dependencies: Type.Record(Type.String(), Type.String()),
});
const ReadySchema = Type.Object({
  status: Type.Literal('ready'),
  checks: Type.Record(Type.String(), Type.Literal('ok')),
  degradation: Type.Optional(DegradationSchema),
});

/**
 * Async because @fastify/swagger must finish loading before any route is added, or those
 * routes are missing from the OpenAPI document. Add routes after awaiting this.
 */
/**
 * A request as the log shows it (`req` in Fastify's request lines): as Fastify logs it, but its
 * URL without the query string, of which only the presence is said. A query may carry what a
 * client should never have put in a URL (a password or a token sent to the token endpoint as
 * parameters) or personal data (an audit search's actor or subject), and a log is kept and
 * shipped where the audit trail's protections do not reach.
 */
export function requestLogValue(req: { method?: string; url?: string; host?: string; ip?: string; socket?: { remotePort?: number } | null }): Record<string, unknown> {
  const url = typeof req.url === 'string' ? req.url : '';
  const at = url.indexOf('?');
  return {
    method: req.method,
    url: at === -1 ? url : url.slice(0, at),
    ...(at === -1 ? {} : { query: 'withheld' }),
    host: req.host,
    remoteAddress: req.ip,
    remotePort: req.socket?.remotePort,
  };
}

/**
 * An error as the log shows it: pino's standard form, without what would carry a request's
 * bytes or its query string into the log: Node's HTTP parser errors keep the raw request in
 * `rawPacket` (its request line and headers, Authorization included), and some of Fastify's
 * messages quote the request's URL ("Reply was already sent ... in "/path?query"").
 */
export function errorLogValue(err: unknown): unknown {
  if (!(err instanceof Error)) return err;
  const value = pino.stdSerializers.err(err) as Record<string, unknown>;
  delete value.rawPacket;
  const noQuery = (text: unknown): unknown => (typeof text === 'string' ? text.replace(/"(\/[^"?\s]*)\?[^"\s]*"/g, '"$1"') : text);
  value.message = noQuery(value.message);
  value.stack = noQuery(value.stack);
  return value;
}

export async function createService(options: ServiceOptions): Promise<Service> {
  const { config, openapi, readinessChecks = [] } = options;
  assertUniqueNames(readinessChecks);

  const baseLogger =
    options.logger === false
      ? pino({ enabled: false })
      : (options.logger ?? pino({ level: config.LOG_LEVEL }));
  // Fastify's request loggers take their serializers from this one's, ahead of its own.
  const loggerInstance = baseLogger.child({}, { serializers: { req: requestLogValue, err: errorLogValue } });

  const app = Fastify({
    loggerInstance,
    bodyLimit: config.BODY_LIMIT_BYTES,
    requestTimeout: REQUEST_RECEIVE_TIMEOUT_MS,
    // The onRequest hook below answers requests that arrive while closing, as problem+json.
    return503OnClosing: false,
    // The header is read by genReqId, which validates it; Fastify would trust it as is.
    requestIdHeader: false,
    logController: new LogController({ requestIdLogLabel: 'request_id' }),
    genReqId: (req) => {
      const incoming = req.headers[REQUEST_ID_HEADER];
      return typeof incoming === 'string' && REQUEST_ID_PATTERN.test(incoming) ? incoming : randomUUID();
    },
    frameworkErrors: errorHandler,
    // What Node's HTTP parser refuses (headers too large, a malformed request line) is
    // problem+json too, not Fastify's own JSON.
    clientErrorHandler: createClientErrorHandler(loggerInstance),
    // Node answers an HTTP/1.1 request without Host with a bare 400 of its own, before any
    // handler; the hook below refuses it as problem+json instead.
    http: { requireHostHeader: false },
  }).withTypeProvider<TypeBoxTypeProvider>();

  // An Expect other than 100-continue: Node would answer a bare 417 with an empty body.
  app.server.on('checkExpectation', (_req: IncomingMessage, res: ServerResponse) => {
    const body = JSON.stringify({
      type: 'about:blank',
      title: 'Expectation Failed',
      status: 417,
      detail: 'The only expectation this service meets is Expect: 100-continue. Send the request without the Expect header.',
    });
    res.writeHead(417, { 'content-type': 'application/problem+json', 'content-length': Buffer.byteLength(body), connection: 'close' });
    res.end(body);
  });

  app.setValidatorCompiler(validatorCompiler);
  app.setErrorHandler(errorHandler);
  // UTF-8 only, and no member named twice in one object (json-body.ts).
  installJsonBodyParser(app);
  // Fastify parses text/plain bodies by default, so JSON sent as text/plain would fail
  // validation with a puzzling "body must be object". These APIs speak JSON (and a service adds
  // a form parser where a protocol needs one): anything else is 415.
  app.removeContentTypeParser('text/plain');

  app.addHook('onRequest', (request, reply, done) => {
    reply.header(REQUEST_ID_HEADER, request.id);
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused (Node's own check is off, above).
    if (request.raw.httpVersion === '1.1' && request.headers.host === undefined) {
      done(validationProblem('headers', '/host', 'is required in HTTP/1.1 (RFC 9112, section 3.2)'));
      return;
    }
    done();
  });

  // Requests in flight when shutdown began finish normally, but their keep-alive connections
  // must not outlive them: Node's server.close() waits for every open connection. Requests
  // that arrive on such a connection after shutdown began are refused before any other hook or
  // handler runs, so no work starts whose answer could be lost: a 503 problem with
  // Retry-After, like every other refusal, in place of Fastify's built-in plain-JSON 503
  // (return503OnClosing: false). The connection closes with it, so the retry reaches another
  // instance.
  let closing = false;
  app.addHook('preClose', (done) => {
    closing = true;
    done();
  });
  app.addHook('onRequest', (request, reply, done) => {
    if (!closing) {
      done();
      return;
    }
    reply.header('retry-after', String(SHUTDOWN_RETRY_AFTER_SECONDS));
    sendProblem(request, reply, {
      status: 503,
      type: PROBLEM_TYPES.shuttingDown,
      title: 'Shutting down',
      detail: 'This instance is shutting down and takes no new requests; nothing was done. Retry after the Retry-After delay.',
    });
  });
  app.addHook('onSend', (_request, reply, payload, done) => {
    if (closing) reply.header('connection', 'close');
    done(null, payload);
  });

  // A response schema both documents the route and stops fast-json-stringify from
  // serializing fields the schema does not name, so internals cannot leak by accident.
  app.addHook('onRoute', (route) => {
    if (route.schema?.hide !== true && route.schema?.response === undefined) {
      throw new Error(`${String(route.method)} ${route.url}: a response schema is required`);
    }
  });

  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: { title: openapi.title, version: openapi.version, description: openapi.description },
      // Declared for every service; the routes that need a token say so (route-docs.ts).
      components: { securitySchemes: { [BEARER_SECURITY_SCHEME]: BEARER_SECURITY_SCHEME_OBJECT } },
    },
    // Adds what plugins recorded for a route (route-docs.ts): Idempotency-Key, bearer security.
    transform: ({ schema, url, route }) => ({ schema: documentedSchema(route, schema), url }),
  });

  const resilience = installResilience(app, openapi.title, options);
  // After installResilience: Fastify gives a route the child logger factory set when the route
  // is made, and the tracing one must reach the 404 handler too (it starts the server span).
  app.setNotFoundHandler(notFoundHandler);

  app.get('/openapi.json', { schema: { hide: true } }, () => app.swagger());

  app.get(
    '/health',
    { schema: { summary: 'Liveness: the process serves HTTP', response: { 200: HealthSchema } } },
    () => ({ status: 'ok' as const }),
  );

  app.get(
    '/ready',
    {
      schema: {
        summary: 'Readiness: every dependency check passed',
        response: { 200: ReadySchema, 503: ProblemResponse },
      },
    },
    async (request, reply) => {
      const checks = await runReadinessChecks(readinessChecks, request.log);
      const failing = Object.entries(checks).filter(([, outcome]) => outcome !== 'ok');
      // Degraded is still ready: taking a shedding instance out of rotation would push its
      // load onto the others and spread the overload. Reported when there is something that
      // can degrade (load shedding or dependencies configured).
      const degradation = resilience.shedder !== undefined || (options.dependencies ?? []).length > 0 ? app.degradation() : undefined;
      if (failing.length === 0) return { status: 'ready' as const, checks: checks as Record<string, 'ok'>, ...(degradation === undefined ? {} : { degradation }) };
      return sendProblem(request, reply, {
        status: 503,
        type: PROBLEM_TYPES.notReady,
        title: 'Not ready',
        detail: `Readiness checks failing: ${failing.map(([name, outcome]) => `${name} (${outcome})`).join(', ')}.`,
        extensions: { checks, ...(degradation === undefined ? {} : { degradation }) },
      });
    },
  );

  // After the requests have drained: a probe's own connection goes with the service.
  app.addHook('onClose', async () => {
    await Promise.all(readinessChecks.map(async (check) => { await check.close?.(); }));
  });

  return app;
}

function assertUniqueNames(checks: readonly ReadinessCheck[]): void {
  const names = new Set(checks.map((check) => check.name));
  if (names.size !== checks.length) throw new Error('readiness check names must be unique');
}

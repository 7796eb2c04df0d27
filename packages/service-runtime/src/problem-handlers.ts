/**
 * Every error response, whatever its origin, leaves as problem+json through `sendProblem`.
 */
import type { Socket } from 'node:net';
import type { FastifyBaseLogger, FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { databaseCannotNow, databaseSessionEnded, transientDatabaseError } from '@ledgerline/events';
import { BulkheadFullError, CircuitOpenError, DeadlineExceededError, DependencyConnectionError, DependencyHttpError, DependencyResponseTooLargeError } from '@ledgerline/resilience';
import {
  HttpProblem,
  problem,
  PROBLEM_CONTENT_TYPE,
  problemType,
  statusTitle,
} from './problem.ts';
import type { ValidationIssue } from './problem.ts';

export const REQUEST_ID_HEADER = 'x-request-id';

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * Members to add to the problems the runtime itself answers for this route's client errors
     * (a body that fails its schema, malformed JSON, an unsupported media type), given the
     * problem and the request (its body as parsed, if it was): for example OAuth2's `error`
     * code, which a token endpoint's clients switch on (RFC 6749 §5.2). Problems a handler
     * throws carry their own members, and no extension replaces a standard member.
     */
    clientProblemExtensions?: (answer: ProblemAnswer, request: FastifyRequest) => Readonly<Record<string, unknown>>;
  }
}

export const PROBLEM_TYPES = {
  validationError: problemType('validation-error'),
  malformedJson: problemType('malformed-json'),
  notReady: problemType('not-ready'),
  databaseUnavailable: problemType('database-unavailable'),
  dependencyUnavailable: problemType('dependency-unavailable'),
  shuttingDown: problemType('shutting-down'),
} as const;

/**
 * The 400 a handler or hook throws for one invalid part of the request that the schema let
 * through (a header read by a plugin, a time JavaScript cannot hold, a document too deep to
 * compare): the same problem a schema failure is answered with, naming the part and the path.
 */
export function validationProblem(part: 'body' | 'headers' | 'querystring' | 'params', path: string, message: string): HttpProblem {
  return problem(400, {
    type: PROBLEM_TYPES.validationError,
    title: 'Validation failed',
    detail: `The request ${part} does not match the schema.`,
    errors: [{ in: part, path, message }],
  });
}

/** Seconds a client should wait before retrying after a 503 dependency-unavailable. */
export const DEPENDENCY_RETRY_AFTER_SECONDS = 1;

/** Seconds a client should wait before retrying after a 503 database-unavailable. */
export const DATABASE_RETRY_AFTER_SECONDS = 1;

export interface ProblemAnswer {
  status: number;
  type: string;
  title: string;
  detail: string;
  extensions?: Readonly<Record<string, unknown>>;
  /** Response headers that belong to the answer, e.g. Retry-After on a 503. */
  headers?: Readonly<Record<string, string>>;
  /**
   * The request may have taken effect (a dependency's call reached it and then failed or ran
   * past the deadline): the idempotency plugin stores this answer as the key's result, so a
   * retry with the same key gets it again instead of running the request a second time.
   */
  outcomeUnknown?: boolean;
}

/** Requests answered with an `outcomeUnknown` problem (sendProblem). */
const outcomeUnknownAnswers = new WeakSet<FastifyRequest>();

/** Whether `request` was answered with a problem that says it may have taken effect (`ProblemAnswer.outcomeUnknown`). */
export function answeredOutcomeUnknown(request: FastifyRequest): boolean {
  return outcomeUnknownAnswers.has(request);
}

/**
 * A request body refused before any handler ran, with the problem to answer: a content-type
 * parser passes it to `done` (invalid UTF-8, a duplicate member name, a repeated form
 * parameter). Unlike an `HttpProblem` a handler throws, it is a client error the runtime
 * answers itself, so a route's `clientProblemExtensions` apply to it.
 */
export class BodyRefusedError extends Error {
  readonly answer: ProblemAnswer;

  constructor(answer: ProblemAnswer) {
    super(answer.detail);
    if (!Number.isInteger(answer.status) || answer.status < 400 || answer.status > 499) {
      throw new RangeError(`a refused body is a client error (4xx), got ${answer.status}`);
    }
    this.name = 'BodyRefusedError';
    this.answer = answer;
  }
}

export function sendProblem(request: FastifyRequest, reply: FastifyReply, answer: ProblemAnswer): FastifyReply {
  const { status, type, title, detail, extensions, headers } = answer;
  if (answer.outcomeUnknown === true) outcomeUnknownAnswers.add(request);
  // Set here as well as in onRequest: framework errors (a bad URL) are answered before hooks run.
  reply.header(REQUEST_ID_HEADER, request.id);
  for (const [name, value] of Object.entries(headers ?? {})) reply.header(name, value);
  // No prototype, so that any member name is just a name (even `__proto__`).
  const members = Object.assign(Object.create(null) as Record<string, unknown>, { type, title, status, detail, instance: request.url, request_id: request.id });
  // Extensions add members; they never replace the standard ones.
  for (const [name, value] of Object.entries(extensions ?? {})) if (!Object.hasOwn(members, name)) members[name] = value;
  return reply.code(status).type(PROBLEM_CONTENT_TYPE).send(members);
}

function plainStatus(status: number, detail: string): ProblemAnswer {
  return { status, type: 'about:blank', title: statusTitle(status), detail };
}

/** Fastify's own client errors whose code we recognise, answered without exposing internals. */
const FRAMEWORK_PROBLEMS: Readonly<Record<string, (request: FastifyRequest) => ProblemAnswer>> = {
  FST_ERR_CTP_INVALID_JSON_BODY: () => ({
    status: 400,
    type: PROBLEM_TYPES.malformedJson,
    title: 'Malformed JSON',
    detail: 'The request body is not valid JSON.',
  }),
  FST_ERR_CTP_EMPTY_JSON_BODY: () => ({
    status: 400,
    type: PROBLEM_TYPES.malformedJson,
    title: 'Malformed JSON',
    detail: 'The request body is empty but its Content-Type is application/json.',
  }),
  FST_ERR_CTP_BODY_TOO_LARGE: (request) =>
    plainStatus(413, `The request body exceeds the limit of ${request.routeOptions.bodyLimit} bytes.`),
  FST_ERR_CTP_INVALID_MEDIA_TYPE: () =>
    plainStatus(415, 'This endpoint does not accept the request Content-Type; send application/json.'),
};

/** Fastify's error handler, and its `frameworkErrors` hook for requests that fail before routing. */
export function errorHandler(error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
  const answer = problemFor(error, request);
  // Before routing (a bad URL) there are no route options.
  const extend = error instanceof HttpProblem || answer.status >= 500 ? undefined : (request.routeOptions as Partial<typeof request.routeOptions> | undefined)?.config?.clientProblemExtensions;
  let extra: Readonly<Record<string, unknown>> = {};
  try {
    if (extend !== undefined) extra = extend(answer, request);
  } catch (extendError) {
    // The error handler must answer whatever a route's function does: the problem goes out without its members.
    request.log.error({ err: extendError }, 'clientProblemExtensions failed');
  }
  sendProblem(request, reply, { ...answer, extensions: { ...extra, ...answer.extensions } });
}

/** How far down a chain of `cause`s a database failure is looked for. */
const CAUSE_DEPTH_MAX = 4;

/**
 * Whether an error a handler let through is its database too busy to do the work now: a lock
 * it waited for past `lock_timeout` (55P03), a statement past `statement_timeout` or cancelled
 * by an administrator (57014), or the server short of resources (class 53: disk full, out of
 * memory, too many connections). The statement failed, so its transaction did nothing; the
 * client may retry. Until 2026-12-07 these were answered 500, as bugs.
 */
export function databaseBusy(error: unknown): boolean {
  return someCause(error, (e) => databaseCannotNow(e) || (e as { code?: unknown }).code === '57014');
}

/**
 * Whether an error a handler let through is its database failing rather than a bug: the same
 * test the ledger engine applies before it answers "unavailable, retry" (`transientDatabaseError`:
 * a connection refused, reset or lost, SQLSTATE class 08 or 57P, too many connections, a
 * serialization failure or deadlock), plus any error PostgreSQL raised at FATAL or PANIC
 * severity, which ends the session (a database that refuses connections, 55000, or is gone,
 * 3D000, raises FATAL at connect). Errors that carry an HTTP status (a client that aborted its
 * request has ECONNRESET too) are the HTTP layer's, not the database's.
 */
export function databaseUnreachable(error: unknown): boolean {
  return someCause(error, (e) => transientDatabaseError(e) || databaseSessionEnded(e));
}

/**
 * Whether `test` holds for the error or one of its `cause`s (CAUSE_DEPTH_MAX deep). An error
 * that carries an HTTP status, at any depth, is the HTTP layer's (a client that aborted its
 * request has ECONNRESET too), not the database's.
 */
function someCause(error: unknown, test: (e: object) => boolean): boolean {
  let e: unknown = error;
  for (let depth = 0; typeof e === 'object' && e !== null && depth < CAUSE_DEPTH_MAX; depth += 1) {
    if (typeof (e as { statusCode?: unknown }).statusCode === 'number') return false;
    if (test(e)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

function problemFor(error: FastifyError, request: FastifyRequest): ProblemAnswer {
  if (error instanceof HttpProblem) {
    if (error.status >= 500) request.log.warn({ err: error }, 'answered with a server problem');
    return error;
  }
  if (error instanceof BodyRefusedError) return error.answer;
  // Handlers can throw anything, so Fastify's fields are read without trusting the static type.
  const { validation, validationContext, code, statusCode, message }: Partial<FastifyError> =
    typeof error === 'object' && error !== null ? error : {};
  if (validation !== undefined) {
    const part = validationContext ?? 'request';
    const errors: ValidationIssue[] = validation.map((issue) => ({
      in: part,
      path: issue.instancePath,
      message: issue.message ?? 'is invalid',
    }));
    return {
      status: 400,
      type: PROBLEM_TYPES.validationError,
      title: 'Validation failed',
      detail: `The request ${part} does not match the schema.`,
      extensions: { errors },
    };
  }
  if (typeof code === 'string' && code.startsWith('FST_')) {
    const known = FRAMEWORK_PROBLEMS[code];
    if (known !== undefined) return known(request);
    // Fastify's other client errors (bad Content-Length, bad URL, ...) have fixed, safe messages.
    if (statusCode !== undefined && statusCode >= 400 && statusCode < 500 && message !== undefined) {
      return plainStatus(statusCode, message);
    }
  }
  // A dependency that failed, or that its policy did not call (breaker open, bulkhead full,
  // deadline passed), where the handler had no fallback: the neighbour's failure, not a bug
  // here, answered as a gateway would. The dependency's name stays in the log. Before the
  // database test: a refused HTTP connection carries ECONNREFUSED in its cause, as pg's does.
  const dependency = dependencyFailure(error);
  if (dependency !== null) {
    request.log.warn({ err: error }, 'dependency unavailable');
    return dependency;
  }
  // Every service's handlers reach PostgreSQL; one that is down, restarting or too busy to do the
  // work now is not a bug, and the client may retry, as the ledger's own 503 says. Logged,
  // without the details in the answer.
  const database = databaseUnreachable(error)
    ? { title: 'Database unavailable', detail: 'The service could not reach its database.' }
    : databaseBusy(error)
      ? { title: 'Database busy', detail: 'The database could not do this now (a lock or statement timeout, or it is short of resources); nothing was changed.' }
      : null;
  if (database !== null) {
    request.log.warn({ err: error }, database.title.toLowerCase());
    return {
      status: 503,
      type: PROBLEM_TYPES.databaseUnavailable,
      title: database.title,
      detail: `${database.detail} Retry after the Retry-After delay.`,
      headers: { 'retry-after': String(DATABASE_RETRY_AFTER_SECONDS) },
    };
  }
  // Anything else is our bug: log everything, tell the client nothing but how to report it.
  request.log.error({ err: error }, 'unhandled error');
  return plainStatus(500, 'An unexpected error occurred. Quote the request_id when reporting it.');
}

const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const;

/** 404 for unknown paths; 405 with an Allow header when the path exists under other methods. */
export function notFoundHandler(request: FastifyRequest, reply: FastifyReply): void {
  const path = request.url.split('?', 1)[0] ?? '/';
  const allowed = METHODS.filter(
    (method) => method !== request.method && request.server.findRoute({ method, url: path }) !== null,
  );
  if (allowed.length === 0) {
    sendProblem(request, reply, plainStatus(404, `No route matches ${request.method} ${path}.`));
    return;
  }
  reply.header('allow', allowed.join(', '));
  sendProblem(request, reply, plainStatus(405, `${request.method} is not allowed here; use ${allowed.join(', ')}.`));
}

/** How long a connection refused by Node's HTTP parser may stay half-closed before it is destroyed. */
const CLIENT_ERROR_LINGER_MS = 1000;

/** What Node's HTTP parser refused, in words a client can act on; by the parser's error code. */
const CLIENT_ERROR_DETAILS: Readonly<Record<string, string>> = {
  HPE_HEADER_OVERFLOW: 'The request line and headers exceed the server\'s limit.',
  HPE_INVALID_METHOD: 'The request line is malformed: the method is not a valid token.',
  HPE_INVALID_URL: 'The request line is malformed: the request target is not valid.',
  HPE_INVALID_VERSION: 'The request line is malformed: the HTTP version is not valid.',
  HPE_INVALID_CONSTANT: 'The request is not valid HTTP/1.1.',
  HPE_INVALID_HEADER_TOKEN: 'A header name or value contains a character HTTP does not allow.',
  HPE_INVALID_CONTENT_LENGTH: 'Content-Length is malformed.',
  HPE_UNEXPECTED_CONTENT_LENGTH: 'Content-Length is repeated, or sent with Transfer-Encoding.',
  HPE_INVALID_TRANSFER_ENCODING: 'Transfer-Encoding is not valid.',
  HPE_INVALID_CHUNK_SIZE: 'A chunk size of the chunked body is not valid.',
  HPE_CR_EXPECTED: 'A line of the request does not end with CRLF.',
  HPE_LF_EXPECTED: 'A line of the request does not end with CRLF.',
  ERR_HTTP_REQUEST_TIMEOUT: 'The request was not received in time.',
};

/**
 * Fastify's `clientErrorHandler`: requests Node's HTTP parser refuses (headers too large, a
 * malformed request line, a repeated Content-Length, a bad chunk size, a control character in
 * a header) never become requests, so no hook or error handler sees them; Fastify's default
 * answers them with its own JSON. This answers with problem+json like every other error, then
 * closes the connection: after a parse error the rest of the stream cannot be framed.
 */
export function createClientErrorHandler(log: FastifyBaseLogger): (error: Error & { code?: string }, socket: Socket) => void {
  return (error, socket) => {
    // A reset connection is gone: there is nobody to answer.
    if (error.code === 'ECONNRESET' || socket.destroyed) return;
    log.debug({ err: error }, 'client error refused by the HTTP parser');
    const status = error.code === 'HPE_HEADER_OVERFLOW' ? 431 : error.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
    // As Node itself does: raw bytes go out only when no response of this connection has begun,
    // or they would corrupt it. (`_httpMessage` is the socket's response in progress.)
    const inFlight = (socket as Socket & { _httpMessage?: { headersSent?: boolean } | null })._httpMessage;
    if (socket.writable && (inFlight === undefined || inFlight === null || inFlight.headersSent !== true)) {
      const title = statusTitle(status);
      const detail = CLIENT_ERROR_DETAILS[error.code ?? ''] ?? 'The request is not valid HTTP/1.1.';
      const body = JSON.stringify({ type: 'about:blank', title, status, detail });
      // end(), not write() then destroy(): the response is flushed and the connection half-closed,
      // so the client reads the answer rather than a reset.
      socket.end(`HTTP/1.1 ${status} ${title}\r\nContent-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
      // A client that never closes its side would keep the socket: a bound, as on everything.
      setTimeout(() => socket.destroy(), CLIENT_ERROR_LINGER_MS).unref();
      return;
    }
    socket.destroy();
  };
}

/** What an answer that may have taken effect tells the client (`ProblemAnswer.outcomeUnknown`). */
const OUTCOME_UNKNOWN_ADVICE =
  'The request may have taken effect. Do not send it again blindly: a retry with the same Idempotency-Key gets this answer again and does not run it a second time; find out whether it took effect first.';

/**
 * The answer for a `@ledgerline/resilience` policy's failure. When the call may have reached the
 * dependency and taken effect there, the answer says so and is `outcomeUnknown` (the
 * idempotency plugin stores it, so a retry with the same key never runs the request twice):
 * 504 when the deadline passed (during the call, or before it began: stored either way, since
 * what the request did before the call is not known here); 503 when the dependency failed after the
 * request reached it (it answered 500 or another 5xx that is not "did nothing", it answered
 * more than httpCall reads, the connection broke other than by being refused or not found).
 * 503 with Retry-After when the call cannot have done anything: not made (breaker open,
 * bulkhead full), the connection refused or the host not resolved, or the dependency answered
 * 502, 503, 504 or 429. Null for other errors.
 */
function dependencyFailure(error: unknown): ProblemAnswer | null {
  const retryLater = { 'retry-after': String(DEPENDENCY_RETRY_AFTER_SECONDS) };
  if (error instanceof DeadlineExceededError) {
    return {
      status: 504,
      type: PROBLEM_TYPES.dependencyUnavailable,
      title: 'Dependency timed out',
      detail: `A service this one depends on did not answer within the request's deadline. ${OUTCOME_UNKNOWN_ADVICE}`,
      outcomeUnknown: true,
    };
  }
  if (
    (error instanceof DependencyHttpError && !error.retryable) ||
    error instanceof DependencyResponseTooLargeError ||
    (error instanceof DependencyConnectionError && error.mayHaveArrived)
  ) {
    return {
      status: 503,
      type: PROBLEM_TYPES.dependencyUnavailable,
      title: 'Dependency unavailable',
      detail: `A service this one depends on failed after the request reached it. ${OUTCOME_UNKNOWN_ADVICE}`,
      outcomeUnknown: true,
    };
  }
  if (
    error instanceof CircuitOpenError || error instanceof BulkheadFullError || error instanceof DependencyHttpError ||
    error instanceof DependencyConnectionError
  ) {
    return {
      status: 503,
      type: PROBLEM_TYPES.dependencyUnavailable,
      title: 'Dependency unavailable',
      detail: 'A service this one depends on is unreachable, failing or overloaded. Retry after the Retry-After delay.',
      headers: retryLater,
    };
  }
  return null;
}

/**
 * Every error response, whatever its origin, leaves as problem+json through `sendProblem`.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import {
  HttpProblem,
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
} as const;

export interface ProblemAnswer {
  status: number;
  type: string;
  title: string;
  detail: string;
  extensions?: Readonly<Record<string, unknown>>;
}

export function sendProblem(request: FastifyRequest, reply: FastifyReply, answer: ProblemAnswer): FastifyReply {
  const { status, type, title, detail, extensions } = answer;
  // Set here as well as in onRequest: framework errors (a bad URL) are answered before hooks run.
  reply.header(REQUEST_ID_HEADER, request.id);
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

function problemFor(error: FastifyError, request: FastifyRequest): ProblemAnswer {
  if (error instanceof HttpProblem) {
    if (error.status >= 500) request.log.warn({ err: error }, 'answered with a server problem');
    return error;
  }
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

/**
 * RFC 9457 problem details: the one error shape every Ledgerline HTTP API returns.
 */
import { STATUS_CODES } from 'node:http';
import { Type } from 'typebox';
import type { Static } from 'typebox';

export const PROBLEM_CONTENT_TYPE = 'application/problem+json';
export const PROBLEM_TYPE_BASE_URI = 'https://ledgerline.dev/problems/';

/** The type URI for a problem kind, e.g. `problemType('insufficient-funds')`. */
export function problemType(slug: string): string {
  if (!/^[a-z0-9]+(-[a-z0-9]+)*$/.test(slug)) {
    throw new TypeError(`problem type slug must be kebab-case, got ${JSON.stringify(slug)}`);
  }
  return `${PROBLEM_TYPE_BASE_URI}${slug}`;
}

/** Fields the runtime owns; extensions may not shadow them. */
const RESERVED_FIELDS = new Set(['type', 'title', 'status', 'detail', 'instance', 'request_id']);

export interface ProblemInit {
  /** A URI naming the kind of problem. Omit it only when the status code says everything. */
  type?: string;
  title: string;
  /** Shown to the client: say what went wrong for this request, never internals. */
  detail: string;
  /** Extension members, serialized beside the standard ones. */
  [extension: string]: unknown;
}

/** An error a handler throws (or sends) to answer with a specific problem. */
export class HttpProblem extends Error {
  readonly status: number;
  readonly type: string;
  readonly title: string;
  readonly detail: string;
  readonly extensions: Readonly<Record<string, unknown>>;

  constructor(status: number, init: ProblemInit, options?: { cause?: unknown }) {
    super(init.detail, options);
    if (!Number.isInteger(status) || status < 400 || status > 599) {
      throw new RangeError(`problem status must be an integer in 400..599, got ${status}`);
    }
    const { type, title, detail, ...extensions } = init;
    for (const name of Object.keys(extensions)) {
      if (RESERVED_FIELDS.has(name)) throw new TypeError(`problem extension "${name}" is reserved`);
    }
    this.name = 'HttpProblem';
    this.status = status;
    this.type = type ?? 'about:blank';
    this.title = title;
    this.detail = detail;
    this.extensions = extensions;
  }
}

/** Builds an `HttpProblem`: `throw problem(409, { type: problemType('duplicate'), title, detail })`. */
export function problem(status: number, init: ProblemInit): HttpProblem {
  return new HttpProblem(status, init);
}

/** The standard title for a status code, as RFC 9457 asks for `about:blank` problems. */
export function statusTitle(status: number): string {
  return STATUS_CODES[status] ?? 'Error';
}

export const ValidationIssueSchema = Type.Object(
  {
    in: Type.String({ description: 'The request part: body, querystring, params or headers.' }),
    path: Type.String({ description: 'JSON Pointer to the offending value within that part.' }),
    message: Type.String(),
  },
  { additionalProperties: false },
);

export type ValidationIssue = Static<typeof ValidationIssueSchema>;

/** Reference this in route response schemas for every 4xx and 5xx a route can return. */
export const ProblemSchema = Type.Object(
  {
    type: Type.String({ format: 'uri' }),
    title: Type.String(),
    status: Type.Integer({ minimum: 400, maximum: 599 }),
    detail: Type.String(),
    instance: Type.String({ description: 'The request URL.' }),
    request_id: Type.String(),
    errors: Type.Optional(Type.Array(ValidationIssueSchema)),
  },
  // Problem types add their own members (RFC 9457 section 3.2); serialize them as given.
  { additionalProperties: true, description: 'RFC 9457 problem details' },
);

export type Problem = Static<typeof ProblemSchema>;

/**
 * A response entry for problems that also gets the media type right in OpenAPI:
 * `response: { 200: Thing, 404: ProblemResponse, 409: ProblemResponse }`.
 */
export const ProblemResponse = {
  description: 'Problem details (RFC 9457)',
  content: { [PROBLEM_CONTENT_TYPE]: { schema: ProblemSchema } },
};

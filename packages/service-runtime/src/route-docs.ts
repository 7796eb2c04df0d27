/**
 * OpenAPI for what a route's schema does not say: a header a plugin reads (Idempotency-Key),
 * the security a guard enforces (a bearer token). The plugin's onRoute hook records it with
 * `documentRoute`, and `createService`'s OpenAPI transform adds it to the operation. Only the
 * document changes: requests are still validated against the route's own schema, and the
 * plugin still answers for its header itself.
 */
import type { TSchema } from 'typebox';

/** The name of the bearer-token security scheme every service's OpenAPI document declares. */
export const BEARER_SECURITY_SCHEME = 'bearerAuth';

/** The security scheme itself (OpenAPI 3.1 `components.securitySchemes`). */
export const BEARER_SECURITY_SCHEME_OBJECT = {
  type: 'http',
  scheme: 'bearer',
  bearerFormat: 'JWT',
  description: 'An access token for this service\'s audience, sent as `Authorization: Bearer <token>`.',
} as const;

export interface DocumentedHeader {
  schema: TSchema;
  required: boolean;
}

export interface RouteDocumentation {
  /** Request headers, by lower-case name. */
  headers?: Readonly<Record<string, DocumentedHeader>>;
  /** The operation's security requirement, e.g. `[{ bearerAuth: [] }]`. */
  security?: ReadonlyArray<Readonly<Record<string, readonly string[]>>>;
  /** Responses the guard answers itself, by status (e.g. 401, 429), added where the route's schema has none. */
  responses?: Readonly<Record<number, object>>;
}

/** By the route options object Fastify hands to every onRoute hook, and @fastify/swagger keeps. */
const documented = new WeakMap<object, RouteDocumentation>();

/** Records OpenAPI additions for a route; call it from an onRoute hook with the hook's argument. */
export function documentRoute(route: object, documentation: RouteDocumentation): void {
  const known = documented.get(route);
  const headers = { ...known?.headers, ...documentation.headers };
  const responses = { ...known?.responses, ...documentation.responses };
  const security = documentation.security ?? known?.security;
  documented.set(route, { headers, responses, ...(security === undefined ? {} : { security }) });
}

interface HeadersSchema {
  type?: unknown;
  properties?: Readonly<Record<string, unknown>>;
  required?: readonly string[];
}

/** A route's schema as the OpenAPI document shows it: its own, plus what was recorded for it. */
export function documentedSchema<T extends object>(route: object, schema: T): T {
  const extra = documented.get(route);
  // A route without a schema has nothing for @fastify/swagger to document either.
  if (extra === undefined || (schema as T | undefined) === undefined) return schema;
  const out: Record<string, unknown> = { ...(schema as Record<string, unknown>) };
  const added = Object.entries(extra.headers ?? {});
  if (added.length > 0) {
    const own: HeadersSchema = (schema as { headers?: HeadersSchema }).headers ?? {};
    const required = [...(own.required ?? []), ...added.filter(([, header]) => header.required).map(([name]) => name)];
    out.headers = {
      ...own,
      type: 'object',
      properties: { ...own.properties, ...Object.fromEntries(added.map(([name, header]) => [name, header.schema])) },
      ...(required.length === 0 ? {} : { required }),
    };
  }
  if (extra.security !== undefined) out.security = extra.security;
  const responses = Object.entries(extra.responses ?? {});
  if (responses.length > 0) {
    const own = (schema as { response?: Record<string, unknown> }).response ?? {};
    out.response = { ...Object.fromEntries(responses.filter(([status]) => !(status in own))), ...own };
  }
  return out as T;
}

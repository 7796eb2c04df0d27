/**
 * The audit trail over HTTP, as two Fastify plugins a service turns on with one line each:
 *
 * - `auditHttp` records every request to the routes it is given, after the response is sent:
 *   commands accepted or rejected (with the reason from the problem body) and reads of
 *   sensitive data. It costs the request a `record()` call (a buffer push); the sink writes in
 *   batches. When the sink is saturated it answers 503 before the handler runs, so no command
 *   runs that could not be audited.
 * - `auditRoutes` serves search, checkpoints, proofs and the public key under /v1/audit.
 *   Every search, and every proof (it discloses the record), is itself audited.
 */
import type { KeyObject } from 'node:crypto';
import type { FastifyContextConfig, FastifyInstance, FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import { Type, type Static } from 'typebox';
import { problem, problemType, ProblemResponse, rateLimitRefusal, STORABLE_TEXT_PATTERN, validationProblem, type ServiceMetrics } from '@ledgerline/service-runtime';
import { keyIdOf, publicKeyPem } from './keys.ts';
import { storablePrefix, storableText } from '@ledgerline/events';
import { canonicalResourceId } from './record.ts';
import { writeRateLimitedSummaries, type RateLimitedSummarySettings } from './rate-limited.ts';
import type { AuditActor, AuditOrigin, AuditSink } from './sink.ts';
import { AuditUnrecordedError, SEARCH_LIMIT_MAX, type AuditRecordView, type AuditStore, type Requester } from './store.ts';
import { AuditBufferFullError } from './writer.ts';

/** How one route is audited. */
export interface AuditRoute {
  /** For example `ledger.transfer.create` or `ledger.account.read`. */
  action: string;
  /** `command` for changes, `access` for reads (retention classes). */
  recordClass: string;
  resourceType: string;
  /** The resource id; default: the `id` path parameter, else the body's `id`, else the request id (a batch). */
  resourceId?: (request: FastifyRequest) => string;
}

export interface AuditHttpOptions {
  /** `saturated`: refuse audited requests while it holds; `buffered`: entries not yet written (PostgresAuditSink has both). */
  sink: AuditSink & { readonly saturated?: boolean; readonly buffered?: number };
  /** The service name recorded as the origin. */
  service: string;
  /** Audited routes by `METHOD /route/pattern`, e.g. `POST /v1/transfers`. */
  routes: Readonly<Record<string, AuditRoute>>;
  /**
   * Who made the request: give one that names the verified principal when the service
   * authenticates (the ledger does). Default `defaultActor`: anonymous, with an `x-client-id`
   * header kept only as the caller's claim.
   */
  actorOf?: (request: FastifyRequest) => AuditActor;
  /**
   * The service's metrics (`app.metrics`): the plugin then exports on /metrics the requests it
   * refused because the sink was saturated (`audit_requests_refused_total`), those that ran and
   * whose record the sink could not take (`audit_requests_unrecorded_total`), and the entries
   * the sink holds unwritten (`audit_sink_buffered`, when the sink says). A rise in either
   * counter deserves an alert: the first is the service refusing work, the second records lost.
   */
  metrics?: Pick<ServiceMetrics, 'registerCounterFromTotal' | 'registerGauge'>;
  /**
   * Requests the runtime's rate limiter refused (429) are recorded in summaries each
   * `intervalMs` (default 10 s): per limiter bucket and route, one per actor, address and
   * resource up to `perClientMax` (10), then one catch-all; at most `keysMax` (1000) in all,
   * past which an overflow summary per record class counts the rest (rate-limited.ts). The
   * last summaries are written when the app closes.
   */
  rateLimitedSummary?: RateLimitedSummarySettings;
  /** The clock of the summaries' times, in ms (default `Date.now`). */
  clock?: () => number;
}

const SAFE_HEADER_VALUE = /^[\x21-\x7e][\x20-\x7e]{0,199}$/;
const TRACEPARENT = /^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$/;
const PROBLEM_TYPE_SLUG = /\/problems\/([a-z0-9-]+)$/;

function header(request: FastifyRequest, name: string): string | undefined {
  const v = request.headers[name];
  return typeof v === 'string' && SAFE_HEADER_VALUE.test(v) ? v : undefined;
}

/**
 * The actor of a request when the service names none: nobody authenticated, so `anonymous`.
 * An `x-client-id` header is recorded as what it is, the caller's claim (id `claimed:<header>`),
 * never as a service identity: any caller can send any value, and until 2026-12-07 such a
 * header was recorded as `{ type: 'service', id: <header> }`, a forged identity in the trail.
 */
export function defaultActor(request: FastifyRequest): AuditActor {
  const client = header(request, 'x-client-id');
  return client === undefined ? { type: 'anonymous', id: 'anonymous' } : { type: 'anonymous', id: `claimed:${client}` };
}

export function originOf(request: FastifyRequest, service: string): AuditOrigin {
  const traceId = TRACEPARENT.exec(header(request, 'traceparent') ?? '')?.[1];
  return { service, ip: request.ip, requestId: request.id, ...(traceId === undefined ? {} : { traceId }) };
}

/** The reason of a failed request: the problem's `result` code, else its type's slug, else its title. */
export function reasonOf(statusCode: number, body: unknown): string {
  if (typeof body === 'string' && body.startsWith('{')) {
    try {
      const p = JSON.parse(body) as { result?: unknown; type?: unknown; title?: unknown };
      if (typeof p.result === 'string') return p.result;
      const slug = typeof p.type === 'string' ? PROBLEM_TYPE_SLUG.exec(p.type)?.[1] : undefined;
      if (slug !== undefined) return slug;
      if (typeof p.title === 'string') return p.title.slice(0, 200);
    } catch {
      // Not JSON after all: fall through to the status.
    }
  }
  return `http ${statusCode}`;
}

function defaultResourceId(request: FastifyRequest): string {
  const params = request.params as Record<string, unknown> | undefined;
  const body = request.body as Record<string, unknown> | undefined;
  const id = params?.id ?? body?.id;
  if (typeof id !== 'string' || id.length === 0 || id.length > 200) return request.id;
  // A refused request's id can be anything its sender wrote, a lone surrogate or a NUL
  // included, which the trail cannot store (checkEntry refuses it, and the failure would go
  // unrecorded): such characters are recorded as U+FFFD.
  return canonicalResourceId(storableText(id) ? id : storablePrefix(id, 200));
}

/** The number of items of a batch body (its first array), so a batch record says how big it was. */
function itemsOf(body: unknown): number | undefined {
  if (body === null || typeof body !== 'object') return undefined;
  const list = Object.values(body as Record<string, unknown>).find(Array.isArray);
  return list?.length;
}

const auditReasons = new WeakMap<FastifyRequest, string>();
const recordedByEvents = new WeakSet<FastifyRequest>();

/**
 * Says that this request's effect is recorded, whole, by the events it appended in its own
 * transaction, and that those events are leaves of the audit trail (the sequencer tails the
 * event store): the events carry who (actor), from where (ip, request id, trace) and what,
 * with the outcome. A successful response to such a request adds no record of its own; a
 * failed one still does. Call it only when every effect of the request has its event.
 */
export function auditedByEvents(request: FastifyRequest): void {
  recordedByEvents.add(request);
}

const recordedInSummary = new WeakSet<FastifyRequest>();

/**
 * Says that this refused request is recorded in a summary of many, not on its own: the
 * authentication guard's throttle (`@ledgerline/authz`) answers 429 to an address over its
 * limit of authentication failures and records, per address and interval, how many it
 * refused. Its response adds no record of its own.
 */
export function auditedInSummary(request: FastifyRequest): void {
  recordedInSummary.add(request);
}

function installAuditHttp(app: FastifyInstance, options: AuditHttpOptions): void {
  const { sink, service, routes, metrics } = options;
  const actorOf = options.actorOf ?? defaultActor;
  let refused = 0;
  let unrecorded = 0;
  if (metrics !== undefined) {
    metrics.registerCounterFromTotal('audit_requests_refused_total', 'Audited requests refused (503 audit-unavailable) before they ran, because the audit sink was saturated.', () => refused);
    metrics.registerCounterFromTotal('audit_requests_unrecorded_total', 'Audited requests that ran and whose audit record the sink could not take (logged at error level).', () => unrecorded);
    if (typeof sink.buffered === 'number') {
      metrics.registerGauge('audit_sink_buffered', 'Audit entries this process holds, not yet written to the audit queue.', () => sink.buffered ?? 0);
    }
  }
  const clock = options.clock ?? Date.now;
  const summaries = writeRateLimitedSummaries(app, {
    sink,
    service,
    ...(options.rateLimitedSummary === undefined ? {} : { settings: options.rateLimitedSummary }),
    onLost: (n) => {
      unrecorded += n;
    },
  });
  // HEAD runs the GET route's handler (Fastify exposes a HEAD route for every GET) and tells
  // as much as the GET does (whether the account exists, how large its answer is): it is
  // audited as the GET is. Until 2026-12-07 it was not audited at all.
  const routeOf = (request: FastifyRequest): AuditRoute | undefined =>
    routes[`${request.method === 'HEAD' ? 'GET' : request.method} ${request.routeOptions.url ?? ''}`];

  app.addHook('onRequest', async (request, reply) => {
    if (sink.saturated !== true || routeOf(request) === undefined) return;
    refused += 1;
    throw auditUnavailable(reply, 'The audit trail is not keeping up, so this request was not run.');
  });

  app.addHook('onSend', async (request, reply, payload) => {
    if (reply.statusCode >= 400 && routeOf(request) !== undefined) auditReasons.set(request, reasonOf(reply.statusCode, payload));
    return payload;
  });

  app.addHook('onResponse', async (request, reply) => {
    const route = routeOf(request);
    if (route === undefined) return;
    const failed = reply.statusCode >= 400;
    if ((!failed && recordedByEvents.has(request)) || recordedInSummary.has(request)) return;
    const limited = reply.statusCode === 429 ? rateLimitRefusal(request) : undefined;
    if (limited !== undefined) {
      try {
        const { traceId } = originOf(request, service);
        summaries.add({
          recordClass: route.recordClass,
          action: route.action,
          actor: actorOf(request),
          ...(traceId === undefined ? {} : { traceId }),
          ip: request.ip,
          resource: { type: route.resourceType, id: (route.resourceId ?? defaultResourceId)(request) },
          method: request.method,
          route: request.routeOptions.url ?? request.url,
          requestId: request.id,
          limit: limited.limit,
          client: limited.client,
          at: clock(),
        });
      } catch (error) {
        unrecorded += 1;
        request.log.error({ err: error, audit: true }, 'audit: a rate-limited request could not be counted');
      }
      return;
    }
    const items = itemsOf(request.body);
    const reason = auditReasons.get(request);
    try {
      sink.record({
        recordClass: route.recordClass,
        actor: actorOf(request),
        action: route.action,
        outcome: failed ? 'failure' : 'success',
        ...(failed ? { reason: reason ?? `http ${reply.statusCode}` } : {}),
        origin: originOf(request, service),
        resource: { type: route.resourceType, id: (route.resourceId ?? defaultResourceId)(request) },
        payload: { method: request.method, route: request.routeOptions.url ?? request.url, status: reply.statusCode, ...(items === undefined ? {} : { items }) },
      });
    } catch (error) {
      // The response is already sent; the onRequest check keeps this rare. Say so loudly.
      unrecorded += 1;
      request.log.error({ err: error, audit: true }, 'audit: a request could not be recorded');
    }
  });
}

/** The plugin; it hooks the instance it is registered on (like fastify-plugin). */
export const auditHttp: FastifyPluginAsync<AuditHttpOptions> = (app, options) => {
  try {
    installAuditHttp(app, options);
    return Promise.resolve();
  } catch (error) {
    return Promise.reject(error);
  }
};
Object.assign(auditHttp, { [Symbol.for('skip-override')]: true, [Symbol.for('fastify.display-name')]: 'ledgerline-audit-http' });

// ------------------------------------------------------------------------------------------
// Search, checkpoints and proofs

const Base64 = Type.String({ pattern: '^[A-Za-z0-9+/]*={0,2}$' });
const CheckpointOut = Type.Object({
  origin: Type.String(),
  treeSize: Type.Integer(),
  rootHash: Base64,
  issuedAtMs: Type.Integer(),
  keyId: Type.String(),
  signature: Base64,
});
/** A signing-key transition (keys.ts `KeyTransition`), present when the log's key was rotated. */
const KeyTransitionOut = Type.Object({ origin: Type.String(), fromKeyId: Type.String(), toPublicKey: Base64, issuedAtMs: Type.Integer(), signature: Base64 });
const InclusionOut = Type.Object({
  kind: Type.Literal('inclusion'),
  checkpoint: CheckpointOut,
  keyTransitions: Type.Optional(Type.Array(KeyTransitionOut)),
  leafIndex: Type.Integer(),
  leafData: Base64,
  proof: Type.Array(Base64),
});
const ConsistencyOut = Type.Object({ kind: Type.Literal('consistency'), from: CheckpointOut, to: CheckpointOut, keyTransitions: Type.Optional(Type.Array(KeyTransitionOut)), proof: Type.Array(Base64) });
const Nullable = <T extends Parameters<typeof Type.Union>[0][number]>(t: T) => Type.Union([t, Type.Null()]);
const RecordOut = Type.Object({
  seq: Type.Integer(),
  id: Type.String(),
  occurred_at: Type.String({ format: 'date-time' }),
  record_class: Type.String(),
  actor: Type.Object({ type: Type.String(), id: Type.String() }),
  action: Type.String(),
  outcome: Type.String(),
  reason: Nullable(Type.String()),
  origin: Type.Object({ service: Type.String(), ip: Nullable(Type.String()), request_id: Nullable(Type.String()), trace_id: Nullable(Type.String()) }),
  resource: Type.Object({ type: Type.String(), id: Type.String() }),
  subject: Nullable(Type.String()),
  payload: Nullable(Type.Record(Type.String(), Type.Unknown())),
  payload_state: Type.String({ description: 'present, expired (retention removed it; its hash stays in the tree) or none' }),
  personal: Nullable(Type.Record(Type.String(), Type.Unknown())),
  personal_state: Type.String({ description: 'present, erased (the subject key was destroyed), expired or none' }),
});
/** A search term: text PostgreSQL can compare (a NUL would fail the query as a 500). */
const Text = Type.String({ minLength: 1, maxLength: 500, pattern: STORABLE_TEXT_PATTERN });
const SearchQuery = Type.Object(
  {
    actor: Type.Optional(Text),
    resource_type: Type.Optional(Text),
    resource_id: Type.Optional(Text),
    action: Type.Optional(Text),
    outcome: Type.Optional(Type.Enum(['success', 'failure'])),
    subject: Type.Optional(Text),
    record_class: Type.Optional(Text),
    from: Type.Optional(Type.String({ format: 'date-time', description: 'Inclusive.' })),
    to: Type.Optional(Type.String({ format: 'date-time', description: 'Exclusive.' })),
    // Optional for the client (the OpenAPI document says so); the default fills them in.
    limit: Type.Optional(Type.Integer({ minimum: 1, maximum: SEARCH_LIMIT_MAX, default: 100 })),
    order: Type.Optional(Type.Enum(['asc', 'desc'], { default: 'desc' })),
    after: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'The next_cursor of the previous page.' })),
  },
  { additionalProperties: false },
);
const ProofParams = Type.Object({ seq: Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER }) });
const ProofQuery = Type.Object({ tree_size: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER })) }, { additionalProperties: false });
const ConsistencyQuery = Type.Object(
  { from: Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER }), to: Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER }) },
  { additionalProperties: false },
);

export interface AuditRoutesOptions {
  store: AuditStore;
  publicKey: KeyObject;
  service: string;
  actorOf?: (request: FastifyRequest) => AuditActor;
  /** Merged into every route's config, e.g. `{ permission: 'audit:read' }` for the authorization plugin. */
  routeConfig?: FastifyContextConfig;
  /** Called before each handler: throw (a 403 problem) to refuse. */
  authorize?: (request: FastifyRequest) => void | Promise<void>;
}

function recordOut(r: AuditRecordView) {
  return {
    seq: r.seq,
    id: r.id,
    occurred_at: r.occurredAt.toISOString(),
    record_class: r.recordClass,
    actor: r.actor,
    action: r.action,
    outcome: r.outcome,
    reason: r.reason,
    origin: { service: r.origin.service, ip: r.origin.ip, request_id: r.origin.requestId, trace_id: r.origin.traceId },
    resource: r.resource,
    subject: r.subject,
    payload: r.payload,
    payload_state: r.payloadState,
    personal: r.personal,
    personal_state: r.personalState,
  };
}

const notFound = (detail: string) => problem(404, { type: problemType('not-found'), title: 'Not found', detail });

/**
 * A read whose own record cannot be written (AuditUnrecordedError, AuditBufferFullError) answers 503
 * audit-unavailable with Retry-After, its results withheld, not a 500.
 */
async function recordedRead<T>(reply: FastifyReply, read: () => Promise<T>): Promise<T> {
  try {
    return await read();
  } catch (error) {
    // The buffer full when the read's record was offered (AuditBufferFullError), or the record not
    // made durable (AuditUnrecordedError): until 2026-12-07 the first was a 500.
    if (!(error instanceof AuditUnrecordedError || error instanceof AuditBufferFullError)) throw error;
    throw auditUnavailable(reply, 'This read could not be recorded in the audit trail, so its results are withheld.');
  }
}

/** 503 audit-unavailable with Retry-After: the trail cannot take this request's record now. */
function auditUnavailable(reply: FastifyReply, why: string): Error {
  reply.header('retry-after', '1');
  return problem(503, { type: problemType('audit-unavailable'), title: 'Audit trail unavailable', detail: `${why} Retry after the Retry-After delay.` });
}

/**
 * A search bound as a Date. The schema's `date-time` admits what RFC 3339 and RFC 9557 allow
 * and JavaScript cannot hold (a leap second `23:59:60`, a `[UTC]` suffix): refused like any
 * other invalid query, not taken as an Invalid Date into the search.
 */
function searchTime(name: 'from' | 'to', text: string): Date {
  const time = new Date(text);
  if (Number.isNaN(time.getTime())) throw validationProblem('querystring', `/${name}`, 'must be a date-time JavaScript can represent (no leap second, no suffix)');
  return time;
}

function installAuditRoutes(app: FastifyInstance, options: AuditRoutesOptions): void {
  const { store, service } = options;
  const actorOf = options.actorOf ?? defaultActor;
  const config = { priority: 'low' as const, ...options.routeConfig };
  const tags = ['audit'];
  const guard = async (request: FastifyRequest): Promise<Requester> => {
    await options.authorize?.(request);
    return { actor: actorOf(request), origin: originOf(request, service) };
  };
  const problems = { 400: ProblemResponse, 401: ProblemResponse, 403: ProblemResponse, 404: ProblemResponse, 503: ProblemResponse };

  app.get<{ Querystring: Static<typeof SearchQuery> }>(
    '/v1/audit/records',
    {
      config,
      schema: {
        summary: 'Search the audit trail (every search is itself audited)',
        description: 'Filters combine with AND. Keyset pagination: pass next_cursor as after.',
        tags,
        querystring: SearchQuery,
        response: { 200: Type.Object({ records: Type.Array(RecordOut), next_cursor: Nullable(Type.Integer()) }), ...problems },
      },
    },
    async (request, reply) => {
      const by = await guard(request);
      const q = request.query;
      const from = q.from === undefined ? undefined : searchTime('from', q.from);
      const to = q.to === undefined ? undefined : searchTime('to', q.to);
      const page = await recordedRead(reply, () => store.search(
        {
          ...(q.actor === undefined ? {} : { actorId: q.actor }),
          ...(q.resource_type === undefined ? {} : { resourceType: q.resource_type }),
          ...(q.resource_id === undefined ? {} : { resourceId: q.resource_id }),
          ...(q.action === undefined ? {} : { action: q.action }),
          ...(q.outcome === undefined ? {} : { outcome: q.outcome }),
          ...(q.subject === undefined ? {} : { subject: q.subject }),
          ...(q.record_class === undefined ? {} : { recordClass: q.record_class }),
          ...(from === undefined ? {} : { from }),
          ...(to === undefined ? {} : { to }),
        },
        { limit: q.limit, order: q.order, ...(q.after === undefined ? {} : { after: q.after }) },
        by,
      ));
      return { records: page.records.map(recordOut), next_cursor: page.nextCursor };
    },
  );

  app.get(
    '/v1/audit/checkpoint',
    { config, schema: { summary: 'The latest signed checkpoint (tree head)', tags, response: { 200: CheckpointOut, ...problems } } },
    async (request) => {
      await guard(request);
      const cp = await store.latestCheckpoint();
      if (cp === null) throw notFound('No checkpoint has been signed yet.');
      return { origin: cp.origin, treeSize: cp.treeSize, rootHash: cp.rootHash.toString('base64'), issuedAtMs: cp.issuedAt.getTime(), keyId: cp.keyId, signature: cp.signature.toString('base64') };
    },
  );

  app.get<{ Params: Static<typeof ProofParams>; Querystring: Static<typeof ProofQuery> }>(
    '/v1/audit/records/:seq/proof',
    {
      config,
      schema: { summary: 'An inclusion proof bundle for one record, against the latest checkpoint or tree_size', tags, params: ProofParams, querystring: ProofQuery, response: { 200: InclusionOut, ...problems } },
    },
    async (request, reply) => {
      const by = await guard(request);
      const bundle = await recordedRead(reply, () => store.inclusionBundle(request.params.seq, request.query.tree_size, by));
      if (bundle === null) throw notFound(`No checkpoint${request.query.tree_size === undefined ? '' : ` of tree size ${request.query.tree_size}`} covers record ${request.params.seq}.`);
      return bundle;
    },
  );

  app.get<{ Querystring: Static<typeof ConsistencyQuery> }>(
    '/v1/audit/consistency',
    { config, schema: { summary: 'A consistency proof bundle between two checkpoints', tags, querystring: ConsistencyQuery, response: { 200: ConsistencyOut, ...problems } } },
    async (request) => {
      await guard(request);
      const bundle = await store.consistencyBundle(request.query.from, request.query.to);
      if (bundle === null) throw notFound(`There are no checkpoints of tree sizes ${request.query.from} and ${request.query.to}, in that order.`);
      return bundle;
    },
  );

  const keyOut = { public_key_pem: publicKeyPem(options.publicKey), key_id: keyIdOf(options.publicKey), algorithm: 'Ed25519' };
  app.get(
    '/v1/audit/public-key',
    {
      config,
      schema: { summary: 'The public key that verifies checkpoints', tags, response: { 200: Type.Object({ public_key_pem: Type.String(), key_id: Type.String(), algorithm: Type.String() }), ...problems } },
    },
    async (request: FastifyRequest) => {
      await guard(request);
      return keyOut;
    },
  );
}

export const auditRoutes: FastifyPluginAsync<AuditRoutesOptions> = (app, options) => {
  try {
    installAuditRoutes(app, options);
    return Promise.resolve();
  } catch (error) {
    return Promise.reject(error);
  }
};
Object.assign(auditRoutes, { [Symbol.for('skip-override')]: true, [Symbol.for('fastify.display-name')]: 'ledgerline-audit-routes' });

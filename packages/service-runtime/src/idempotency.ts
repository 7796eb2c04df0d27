/**
 * HTTP idempotency keys, Stripe-style: a POST carrying `Idempotency-Key` runs once; a retry with
 * the same key and the same request gets the first response replayed. Records live in
 * PostgreSQL (`runtime.idempotency_keys`, see ../migrations), so every instance of a service
 * sees the same keys.
 *
 * Status codes (they follow draft-ietf-httpapi-idempotency-key-header, "Error Scenarios"):
 * - 400 validation-error: the header is malformed, or missing where `required: true`.
 * - 422 idempotency-key-mismatch: the key was used for a different request (method, route,
 *   params, query or body). Not 409: 409 here means "wait and retry", and this is a client
 *   bug that no retry fixes. Keeping the two apart lets a client retry every 409 blindly.
 * - 409 idempotency-key-in-progress, with Retry-After: the first request with this key is
 *   still running. Retrying later gets its response.
 * - 503 idempotency-unavailable, with Retry-After: the key store could not be reached; nothing ran.
 */
import { createHash, randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import pg from 'pg';
import { Type } from 'typebox';
import { databaseSessionEnded, queryWithin, withQueryTimeout } from '@ledgerline/events';
import { Coalescer } from './coalescer.ts';
import { problem, problemType, type HttpProblem } from './problem.ts';
import { answeredOutcomeUnknown, validationProblem } from './problem-handlers.ts';
import { requestSlot } from './request-slot.ts';
import { documentRoute } from './route-docs.ts';

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * `true`: this route honours Idempotency-Key whatever its method; `false`: it never does.
     * Unset: the plugin's `methods` option decides (POST by default).
     */
    idempotent?: boolean;
  }
}

export const IDEMPOTENCY_KEY_HEADER = 'idempotency-key';
export const IDEMPOTENT_REPLAYED_HEADER = 'idempotent-replayed';
/** Read by the default `clientId`; not authenticated (see `IdempotencyOptions.clientId`). */
export const CLIENT_ID_HEADER = 'x-client-id';
export const ANONYMOUS_CLIENT_ID = 'anonymous';

export const IDEMPOTENCY_TTL_MS_DEFAULT = 24 * 60 * 60 * 1000;
export const IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT = 60_000;
export const IDEMPOTENCY_RESPONSE_BYTES_MAX_DEFAULT = 1024 * 1024;
/** The migration's CHECK on response_body; `responseBytesMax` may not exceed it. */
export const IDEMPOTENCY_RESPONSE_BYTES_LIMIT = 16 * 1024 * 1024;
export const IDEMPOTENCY_QUERY_TIMEOUT_MS_DEFAULT = 5000;
export const IDEMPOTENCY_PRUNE_BATCH_SIZE_MAX_DEFAULT = 1000;
export const IDEMPOTENCY_PRUNE_BATCHES_MAX_DEFAULT = 100;

export const IDEMPOTENCY_PROBLEM_TYPES = {
  inProgress: problemType('idempotency-key-in-progress'),
  mismatch: problemType('idempotency-key-mismatch'),
  unavailable: problemType('idempotency-unavailable'),
} as const;

/** Printable ASCII, 1..255 characters, as Stripe allows (UUIDs are the usual choice). */
const IDEMPOTENCY_KEY_PATTERN = /^[\x20-\x7E]{1,255}$/;

/** The header as the OpenAPI document describes it on every route that honours it. */
const IdempotencyKeyHeaderSchema = Type.String({
  minLength: 1,
  maxLength: 255,
  pattern: '^[\\x20-\\x7E]+$',
  description:
    'Makes a retry safe: the first response to a key is stored and replayed (with Idempotent-Replayed: true) to a retry of the same request; ' +
    'the same key with a different request is 422, and a retry while the first still runs is 409 with Retry-After. A UUID is a good key.',
});
/** What the default `clientId` accepts from the `x-client-id` header. */
const CLIENT_ID_PATTERN = /^[A-Za-z0-9._:@-]{1,128}$/;
/** What any `clientId` function may return: it is stored and must fit the column's CHECK. */
const CLIENT_ID_STORABLE = /^[\x20-\x7E]{1,255}$/;

/**
 * A client id as the key store holds it: as it is when it is 1..255 printable ASCII
 * characters; else, if it is a non-empty string (a principal longer than that, or with other
 * characters), `sha256:` and the hex digest of its UTF-8, one client still. Anything else is a
 * broken `clientId` function: an error (500), and no key is taken.
 */
function storedClientId(clientId: unknown): string {
  if (typeof clientId !== 'string' || clientId.length === 0) {
    throw new Error(`invariant: clientId returned ${JSON.stringify(clientId)}, not a non-empty string`);
  }
  return CLIENT_ID_STORABLE.test(clientId) ? clientId : `sha256:${createHash('sha256').update(clientId, 'utf8').digest('hex')}`;
}
/**
 * Headers replayed with a stored response. Everything else (cookies, caching, rate-limit and
 * trace headers) belonged to the first exchange only, or is regenerated per request.
 */
const REPLAYED_HEADERS = ['content-type', 'location'] as const;
/**
 * 4xx answers after which nothing ran, released like 5xx rather than stored: a malformed
 * request (400: a handler's own checks of what the schema cannot say, as the ledger's fields
 * required unless a pending transfer is posted or voided, refuse it before it does anything,
 * as the schema's refusals do before the key is claimed), and answers about the circumstances
 * rather than the request (refused credentials, a timeout, too early, too many requests). A
 * handler must answer 400 only before it has done anything. Until 2026-12-07 a handler's 400
 * was stored: the corrected request under the same key got 422 idempotency-key-mismatch,
 * where the same mistake caught by the schema left the key free (a review found it).
 */
const NOT_STORED_4XX: ReadonlySet<number> = new Set([400, 401, 403, 408, 425, 429]);
/** How long the withdrawal of a failed claim statement may take (WITHDRAW_CLAIMS_SQL). */
const WITHDRAW_CLAIMS_TIMEOUT_MS = 30_000;
/** A claim races at most a prune or an expiry between its two statements; more is a bug. */
const CLAIM_ATTEMPTS_MAX = 3;
/** The most keys one claim statement takes. */
const CLAIM_BATCH_ITEMS_MAX = 500;
/** The most responses one statement stores, and their bytes in all (one larger response goes alone). */
const COMPLETE_BATCH_ITEMS_MAX = 500;
const COMPLETE_BATCH_BYTES_MAX = 4 * 1024 * 1024;

/** The service's configuration variables for idempotency; spread into a service config schema. */
export const idempotencyConfigSchema = Type.Object({
  // Stripe keeps keys 24 hours; REQUIREMENTS §1 asks for at least that. 30 days bounds the table.
  IDEMPOTENCY_TTL_MS: Type.Integer({ minimum: 86_400_000, maximum: 30 * 86_400_000, default: IDEMPOTENCY_TTL_MS_DEFAULT }),
  IDEMPOTENCY_LOCK_TIMEOUT_MS: Type.Integer({ minimum: 1000, maximum: 3_600_000, default: IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT }),
  // 0 disables this instance's pruner (another instance, or a cron job, may prune instead).
  IDEMPOTENCY_PRUNE_INTERVAL_MS: Type.Integer({ minimum: 0, maximum: 86_400_000, default: 60_000 }),
});

export interface IdempotencyOptions {
  pool: pg.Pool;
  /** Methods whose routes honour the header unless a route sets `config.idempotent`. Default `['POST']`. */
  methods?: readonly string[];
  /** Refuse (400) requests to idempotent routes that carry no key. Default false: they run as usual, unrecorded. */
  required?: boolean;
  /** How long a completed key is kept (from completion). Default 24 h. */
  ttlMs?: number;
  /**
   * How long a request holds its key. A key still `in_progress` after this (its process
   * crashed, or the handler hangs) can be claimed by a retry, which runs the request again.
   * Default 60 s.
   */
  lockTimeoutMs?: number;
  /** Larger response bodies are not stored: the key is released and a warning logged. Default 1 MiB. */
  responseBytesMax?: number;
  /** Deadline for each query to the key store. Default 5 s. */
  queryTimeoutMs?: number;
  /**
   * Who owns a key: keys are unique per client. Default: the `x-client-id` header when it is
   * 1..128 characters of `[A-Za-z0-9._:@-]`, else 'anonymous'. That header is not
   * authenticated, so the default only keeps honest clients' keys apart: a caller that sends
   * another client's id (or none, for the anonymous keys) and the same key can have that
   * client's stored response replayed to it (for the same request), learn that the key is
   * taken (422 for another request, 409 while it runs), or take a key first and so refuse the
   * owner's request with it (422) until the key expires. A service with callers it does not
   * trust passes the authenticated principal here (the ledger does when auth is on). Any
   * non-empty string will do: one that is not 1..255 printable ASCII characters is stored as
   * its SHA-256.
   */
  clientId?: (request: FastifyRequest) => string;
  /**
   * A clock, in milliseconds since the epoch, for tests. By default every time the plugin
   * writes or compares (a claim's time, its lock's end, its expiry, the pruner's cut-off) is
   * PostgreSQL's `now()`, one clock for every instance: with each instance's own, one whose
   * clock ran ahead of another's by a lock's length took over a key the other was still
   * running (the handler ran twice), and a pruner ahead by an hour removed keys an hour early.
   */
  now?: () => number;
  /** Run `pruneIdempotencyKeys` this often; 0 (the default) runs no timer. Stopped on close. */
  pruneIntervalMs?: number;
  /** Retry-After on 409 in-progress and 503 answers. Default 1. */
  retryAfterSeconds?: number;
}

interface Claim {
  clientId: string;
  key: string;
  token: string;
  settled: boolean;
}

/** A key to claim, in a batch. */
interface ClaimItem {
  clientId: string;
  key: string;
  fingerprint: Buffer;
  token: string;
}

/** `fresh`: null when someone else holds the key; else whether the row is new (not taken over). `nowMs`: the batch's time. */
interface ClaimResult {
  nowMs: number;
  fresh: boolean | null;
}

/** A response to store, in a batch. */
interface CompleteItem {
  clientId: string;
  key: string;
  token: string;
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

/** Byte order for printable ASCII, as `COLLATE "C"` sorts: every statement locks keys in this order. */
function byClientAndKey(a: ClaimItem, b: ClaimItem): number {
  if (a.clientId !== b.clientId) return a.clientId < b.clientId ? -1 : 1;
  return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
}

type ClaimOutcome =
  | { kind: 'claimed'; token: string; reclaimed: boolean }
  | { kind: 'replay'; status: number; headers: Record<string, string>; body: Buffer }
  | { kind: 'in_progress' }
  | { kind: 'mismatch' };

interface KeyRow {
  request_fingerprint: Buffer;
  state: 'in_progress' | 'completed';
  response_status: number | null;
  response_headers: Record<string, string> | null;
  response_body: Buffer | null;
  expires_at: Date;
}

// One statement takes a batch of keys (see `Coalescer`): it inserts each, or takes over a row
// nobody can still be using (expired, or left in progress past its lock by a crashed process,
// for this same request). The rows come in the order the batch was sorted in, by client and
// key, so two batches running at once lock their rows in the same order and cannot deadlock.
// A key not returned is held by someone else: its row is then read on its own. A statement that
// would finish after the caller's deadline ($8: the milliseconds it had left when it sent the
// statement) fails after its last row (runtime.claim_in_time, evaluated once the aggregate has
// taken every row), so none of it commits: the caller has answered 503 "not run, retry" by then,
// and a key claimed late would answer that retry 409 until its lock ran out. So does one that
// took more than half the lock ($6): the lease counts from the transaction's start, before any
// wait, and a claim that waited longer than its lock (a 1 s lock, a 5 s query timeout) committed
// a lease already run out, which the next request with the key took over while the first ran.
// Before it takes any row it checks that its client has not withdrawn it ($9, the batch id;
// WITHDRAW_CLAIMS_SQL): the CTE is materialised and joined to every row, so it runs once, first.
// $5: the time, or NULL for the database's (IdempotencyOptions.now); $6 and $7: the lock and
// the expiry after it, in milliseconds.
const CLAIM_SQL = `
WITH fence AS MATERIALIZED (SELECT runtime.claim_not_withdrawn($9::uuid) AS ok),
t AS (SELECT coalesce($5::timestamptz, now()) AS at),
claimed AS (
INSERT INTO runtime.idempotency_keys AS k
       (client_id, key, request_fingerprint, state, lock_token, created_at, locked_until, expires_at)
SELECT u.client_id, u.key, u.fingerprint, 'in_progress', u.token, t.at,
       t.at + make_interval(secs => $6::double precision / 1000), t.at + make_interval(secs => $7::double precision / 1000)
  FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[]) WITH ORDINALITY AS u(client_id, key, fingerprint, token, n)
 CROSS JOIN t CROSS JOIN fence f
 WHERE f.ok
 ORDER BY u.n
ON CONFLICT (client_id, key) DO UPDATE
   SET request_fingerprint = EXCLUDED.request_fingerprint, state = 'in_progress', lock_token = EXCLUDED.lock_token,
       response_status = NULL, response_headers = NULL, response_body = NULL,
       created_at = EXCLUDED.created_at, locked_until = EXCLUDED.locked_until, expires_at = EXCLUDED.expires_at
 WHERE k.expires_at <= EXCLUDED.created_at
    OR (k.state = 'in_progress' AND k.locked_until <= EXCLUDED.created_at
        AND k.request_fingerprint = EXCLUDED.request_fingerprint)
RETURNING k.lock_token::text AS token, (xmax = 0) AS fresh)
SELECT coalesce(array_agg(token), '{}') AS tokens, coalesce(array_agg(fresh), '{}') AS fresh,
       (SELECT at FROM t) AS at, runtime.claim_in_time(least($8::double precision, $6::double precision / 2)) AS in_time
  FROM claimed`;

// The withdrawal of a claim statement that failed at its client (a timeout, a lost
// connection): its requests were answered 503 "not run", and PostgreSQL may still run the
// statement. It goes on after the client stops waiting, and one that reached the server late (a
// packet held up on its connection) starts only then, its deadline (claim_in_time) counted from
// then. runtime.withdraw_claims (migration 1768000000005) records the batch, which the
// statement refuses if it comes later (runtime.claim_not_withdrawn), and deletes whatever of its
// claims committed, waiting for it if it is running; only rows that still carry the batch's
// tokens. $1: the batch id the statement was sent with; $5: the time, or NULL for the
// database's; $6: how long the record is kept (ttlMs).
const WITHDRAW_CLAIMS_SQL = `
SELECT runtime.withdraw_claims($1::uuid, $2::text[], $3::text[], $4::uuid[], coalesce($5::timestamptz, now()),
                               coalesce($5::timestamptz, now()) + make_interval(secs => $6::double precision / 1000)) AS deleted`;

const SELECT_SQL = `
SELECT request_fingerprint, state, response_status, response_headers, response_body, expires_at
  FROM runtime.idempotency_keys WHERE client_id = $1 AND key = $2`;

// A batch of responses, one statement. lock_token: a request whose lease expired and was taken
// over must not overwrite the new holder's record (nor delete it). Tokens are unique, so no two
// items of a batch can match one row. The rows are locked first, in the claims' order (client,
// then key, byte-wise: what the claim statement's sort gives for printable ASCII), so a claim
// statement taking over one of these keys and this statement cannot wait on each other in a
// cycle.
const COMPLETE_SQL = `
WITH u AS (
  SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::smallint[], $5::text[], $6::bytea[]) AS u(client_id, key, token, status, headers, body)
), locked AS (
  SELECT k.client_id, k.key FROM runtime.idempotency_keys k JOIN u ON k.client_id = u.client_id AND k.key = u.key AND k.lock_token = u.token
   WHERE k.state = 'in_progress'
   ORDER BY k.client_id COLLATE "C", k.key COLLATE "C"
   FOR UPDATE OF k
)
UPDATE runtime.idempotency_keys k
   SET state = 'completed', response_status = u.status, response_headers = u.headers::jsonb, response_body = u.body,
       locked_until = coalesce($7::timestamptz, now()), expires_at = coalesce($7::timestamptz, now()) + make_interval(secs => $8::double precision / 1000)
  FROM locked l JOIN u ON u.client_id = l.client_id AND u.key = l.key
 WHERE k.client_id = l.client_id AND k.key = l.key AND k.lock_token = u.token AND k.state = 'in_progress'
RETURNING k.lock_token::text AS token`;

const RELEASE_SQL = `
DELETE FROM runtime.idempotency_keys
 WHERE client_id = $1 AND key = $2 AND lock_token = $3 AND state = 'in_progress'`;

// The records of withdrawn claim statements, once expired (they are kept as long as keys are).
// $1: the cut-off, or NULL for the database's clock; $2: the most one statement removes.
const PRUNE_WITHDRAWN_SQL = `
DELETE FROM runtime.idempotency_withdrawn_claims
 WHERE batch IN (SELECT batch FROM runtime.idempotency_withdrawn_claims WHERE expires_at <= coalesce($1::timestamptz, now()) LIMIT $2)`;

// SKIP LOCKED: pruners on several instances share the work instead of queueing on each other,
// and a row a request is taking over right now is left for the next round. $1: the cut-off, or
// NULL for the database's clock.
const PRUNE_SQL = `
WITH doomed AS (
  SELECT client_id, key FROM runtime.idempotency_keys
   WHERE expires_at <= coalesce($1::timestamptz, now()) AND (state = 'completed' OR locked_until <= coalesce($1::timestamptz, now()))
   LIMIT $2
   FOR UPDATE SKIP LOCKED)
DELETE FROM runtime.idempotency_keys k USING doomed d
 WHERE k.client_id = d.client_id AND k.key = d.key`;

/**
 * The plugin's statements, for tests that run them in orders no timing can force (a claim
 * statement that arrives after its withdrawal, with other requests' statements in between).
 * Not part of the package's API.
 */
export const IDEMPOTENCY_STATEMENTS_FOR_TESTS = {
  claim: CLAIM_SQL,
  withdraw: WITHDRAW_CLAIMS_SQL,
  complete: COMPLETE_SQL,
  release: RELEASE_SQL,
} as const;

function assertInteger(name: string, value: number, min: number, max: number): void {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`idempotency: ${name} must be an integer in ${min}..${max}, got ${value}`);
  }
}

function defaultClientId(request: FastifyRequest): string {
  const header = request.headers[CLIENT_ID_HEADER];
  return typeof header === 'string' && CLIENT_ID_PATTERN.test(header) ? header : ANONYMOUS_CLIENT_ID;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !Buffer.isBuffer(value);
}

/** The extra part of a raw body's fingerprint (`requestFingerprint`). */
const RAW_BODY = Buffer.from('raw', 'utf8');

/** JSON with every object's keys sorted, so `{"a":1,"b":2}` and `{"b":2,"a":1}` are one request. */
export function canonicalJson(value: unknown): string {
  const text = JSON.stringify(value, (_key, v: unknown) =>
    isPlainObject(v) ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) : v,
  ) as string | undefined;
  return text ?? '';
}

/**
 * sha-256 over method, route pattern, params, query and body: what makes two requests "the
 * same". Taken after validation, so defaults the schema fills in count as sent. Each part is
 * length-prefixed so no two different requests can run together into the same bytes. A body
 * the parser left as text or bytes (a JSON string, text/plain, a raw body) is hashed as it is,
 * and marked so by one more part: the JSON string `"{\"n\":1}"` and the object `{"n":1}` are
 * different requests, though the string's text is the object's canonical JSON.
 */
export function requestFingerprint(request: FastifyRequest): Buffer {
  const body: unknown = request.body;
  const raw = Buffer.isBuffer(body) || typeof body === 'string';
  const bodyBytes = Buffer.isBuffer(body)
    ? body
    : Buffer.from(typeof body === 'string' ? body : canonicalJson(body), 'utf8');
  const hash = createHash('sha256');
  const parts = [
    Buffer.from(request.method, 'utf8'),
    Buffer.from(request.routeOptions.url ?? '', 'utf8'),
    Buffer.from(canonicalJson(request.params), 'utf8'),
    Buffer.from(canonicalJson(request.query), 'utf8'),
    bodyBytes,
    ...(raw ? [RAW_BODY] : []),
  ];
  for (const part of parts) {
    hash.update(`${part.length}:`);
    hash.update(part);
  }
  return hash.digest();
}

function headerProblem(message: string): HttpProblem {
  return validationProblem('headers', `/${IDEMPOTENCY_KEY_HEADER}`, message);
}

function payloadBytes(payload: unknown): Buffer | undefined {
  if (payload === undefined || payload === null) return Buffer.alloc(0);
  if (typeof payload === 'string') return Buffer.from(payload, 'utf8');
  if (Buffer.isBuffer(payload)) return payload;
  return undefined; // a stream: its bytes are not ours to buffer
}

/**
 * The plugin. `await app.register(idempotency, { pool })` before adding routes; then every
 * POST route honours Idempotency-Key (see `IdempotencyOptions.methods` and route
 * `config: { idempotent }`). It adds hooks to the instance it is registered on, not to a
 * child context, like fastify-plugin's skip-override.
 */
export const idempotency: FastifyPluginAsync<IdempotencyOptions> = (app, options) => {
  // avvio lets a synchronous throw from a plugin escape as an uncaught exception; a rejection
  // fails `register` (and `ready`) as it should.
  try {
    install(app, options);
    return Promise.resolve();
  } catch (error) {
    return Promise.reject(error);
  }
};

// What fastify-plugin does: the hooks apply to the instance `register` was called on.
Object.assign(idempotency, {
  [Symbol.for('skip-override')]: true,
  [Symbol.for('fastify.display-name')]: 'ledgerline-idempotency',
});

function install(app: FastifyInstance, options: IdempotencyOptions): void {
  const { pool } = options;
  if (typeof pool?.query !== 'function') throw new TypeError('idempotency: options.pool must be a pg.Pool');
  const methods = new Set((options.methods ?? ['POST']).map((m) => m.toUpperCase()));
  const required = options.required ?? false;
  const ttlMs = options.ttlMs ?? IDEMPOTENCY_TTL_MS_DEFAULT;
  const lockTimeoutMs = options.lockTimeoutMs ?? IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT;
  const responseBytesMax = options.responseBytesMax ?? IDEMPOTENCY_RESPONSE_BYTES_MAX_DEFAULT;
  const queryTimeoutMs = options.queryTimeoutMs ?? IDEMPOTENCY_QUERY_TIMEOUT_MS_DEFAULT;
  const clientIdOf = options.clientId ?? defaultClientId;
  const clock = options.now;
  /** The time to write, or null for the database's own (`now()` in the statement). */
  const at = (): Date | null => (clock === undefined ? null : new Date(clock()));
  const pruneIntervalMs = options.pruneIntervalMs ?? 0;
  const retryAfterSeconds = options.retryAfterSeconds ?? 1;
  assertInteger('lockTimeoutMs', lockTimeoutMs, 1, 24 * 3_600_000);
  // An in-progress row expires at claim + ttl; it must not expire while its lock still holds.
  assertInteger('ttlMs', ttlMs, lockTimeoutMs + 1, 365 * 86_400_000);
  assertInteger('responseBytesMax', responseBytesMax, 0, IDEMPOTENCY_RESPONSE_BYTES_LIMIT);
  assertInteger('queryTimeoutMs', queryTimeoutMs, 1, 600_000);
  assertInteger('pruneIntervalMs', pruneIntervalMs, 0, 86_400_000);
  assertInteger('retryAfterSeconds', retryAfterSeconds, 0, 3600);

  const claims = requestSlot<Claim>(app, 'ledgerline.idempotency.claim');

  // The plugin reads the header itself, so no route schema names it: document it on every
  // route that honours it, by the same rule as enabledFor (route-docs.ts).
  app.addHook('onRoute', (route) => {
    const routeMethods = Array.isArray(route.method) ? route.method : [route.method];
    const honours = route.config?.idempotent ?? routeMethods.some((method) => methods.has(method));
    if (honours) documentRoute(route, { headers: { [IDEMPOTENCY_KEY_HEADER]: { schema: IdempotencyKeyHeaderSchema, required } } });
  });

  // Concurrent requests claim their keys, and store their responses, one statement per batch
  // (see Coalescer): a keyed request costs two statements of its own otherwise, each a round
  // trip and a commit. One batch of each kind at a time, so the plugin holds at most two of
  // the pool's connections (plus the rare read of a key someone else holds).
  const claimBatches = new Coalescer<ClaimItem, ClaimResult>({
    itemsMax: CLAIM_BATCH_ITEMS_MAX,
    inFlightMax: 1,
    // NUL cannot occur in either: both are printable ASCII.
    keyOf: (item) => `${item.clientId}\u0000${item.key}`,
    run: async (items) => {
      const sorted = [...items].sort(byClientAndKey);
      /** Names this statement, so that it can be withdrawn if it fails (WITHDRAW_CLAIMS_SQL). */
      const batch = randomUUID();
      let r: pg.QueryResult<{ tokens: string[]; fresh: boolean[]; at: Date }>;
      /** The statement went out: it had a connection (queryWithin asks for its values then). */
      let sent = false;
      try {
        r = await queryWithin<{ tokens: string[]; fresh: boolean[]; at: Date }>(
          pool,
          CLAIM_SQL,
          (remainingMs) => {
            sent = true;
            return [
              sorted.map((i) => i.clientId),
              sorted.map((i) => i.key),
              sorted.map((i) => i.fingerprint),
              sorted.map((i) => i.token),
              at(),
              lockTimeoutMs,
              ttlMs,
              remainingMs,
              batch,
            ];
          },
          queryTimeoutMs,
        );
      } catch (error) {
        // Never sent, or answered with an error: PostgreSQL ran none of it, or rolled it back.
        // Not an error that ended the session (a backend terminated): that may come after the
        // commit, before the answer.
        if (!sent || (error instanceof pg.DatabaseError && !databaseSessionEnded(error))) throw error;
        // Not awaited: the requests are answered 503 now. The statement may have committed
        // before the client stopped waiting (a slow answer), may still be running (it then
        // fails at its own deadline, runtime.claim_in_time), or may not have reached
        // PostgreSQL yet: the withdrawal covers all three.
        queryWithin(
          pool,
          WITHDRAW_CLAIMS_SQL,
          [batch, sorted.map((i) => i.clientId), sorted.map((i) => i.key), sorted.map((i) => i.token), at(), ttlMs],
          WITHDRAW_CLAIMS_TIMEOUT_MS,
        ).catch((withdrawError: unknown) => {
          app.log.warn({ err: withdrawError, keys: sorted.length }, 'idempotency: could not withdraw a failed claim statement; a retry may get 409 until its locks run out');
        });
        throw error;
      }
      const row = r.rows[0];
      if (row === undefined) throw new Error('invariant: the claim statement returned no row');
      const fresh = new Map(row.tokens.map((token, i) => [token, row.fresh[i] === true]));
      const nowMs = row.at.getTime();
      return items.map((i) => ({ nowMs, fresh: fresh.get(i.token) ?? null }));
    },
  });
  const completeBatches = new Coalescer<CompleteItem, boolean>({
    itemsMax: COMPLETE_BATCH_ITEMS_MAX,
    inFlightMax: 1,
    sizeOf: (item) => item.body.length,
    sizeMax: COMPLETE_BATCH_BYTES_MAX,
    run: async (items) => {
      const r = await queryWithin<{ token: string }>(
        pool,
        COMPLETE_SQL,
        [
          items.map((i) => i.clientId),
          items.map((i) => i.key),
          items.map((i) => i.token),
          items.map((i) => i.status),
          items.map((i) => JSON.stringify(i.headers)),
          items.map((i) => i.body),
          at(),
          ttlMs,
        ],
        queryTimeoutMs,
      );
      const stored = new Set(r.rows.map((row) => row.token));
      return items.map((i) => stored.has(i.token));
    },
  });

  async function claimKey(clientId: string, key: string, fingerprint: Buffer): Promise<ClaimOutcome> {
    for (let attempt = 1; attempt <= CLAIM_ATTEMPTS_MAX; attempt++) {
      const token = randomUUID();
      const claimed = await claimBatches.submit({ clientId, key, fingerprint, token });
      if (claimed.fresh !== null) return { kind: 'claimed', token, reclaimed: !claimed.fresh };

      const found = await queryWithin<KeyRow>(pool, SELECT_SQL, [clientId, key], queryTimeoutMs);
      const row = found.rows[0];
      // Pruned, or expired, between the two statements: claim again.
      if (row === undefined || row.expires_at.getTime() <= claimed.nowMs) continue;
      if (!row.request_fingerprint.equals(fingerprint)) return { kind: 'mismatch' };
      if (row.state === 'in_progress') return { kind: 'in_progress' };
      if (row.response_status === null || row.response_headers === null || row.response_body === null) {
        throw new Error(`invariant: completed idempotency key ${JSON.stringify(key)} has no stored response`);
      }
      return { kind: 'replay', status: row.response_status, headers: row.response_headers, body: row.response_body };
    }
    throw new Error(`invariant: idempotency key ${JSON.stringify(key)} not claimed in ${CLAIM_ATTEMPTS_MAX} attempts`);
  }

  function enabledFor(request: FastifyRequest): boolean {
    if (request.is404) return false;
    const flag = request.routeOptions.config.idempotent;
    return flag ?? methods.has(request.method);
  }

  app.addHook('preHandler', async (request: FastifyRequest, reply: FastifyReply) => {
    if (!enabledFor(request)) return;
    const key = request.headers[IDEMPOTENCY_KEY_HEADER];
    if (key === undefined) {
      if (required) throw headerProblem('is required on this route');
      return;
    }
    if (typeof key !== 'string' || !IDEMPOTENCY_KEY_PATTERN.test(key)) {
      throw headerProblem('must be 1 to 255 printable ASCII characters');
    }
    // Node joins a header sent twice into one value ("k1, k2"), which the pattern admits: a
    // retry that sent only k1 would then run again. Sent twice is malformed.
    if ((request.raw.headersDistinct?.[IDEMPOTENCY_KEY_HEADER]?.length ?? 1) > 1) throw headerProblem('must be sent once');
    const clientId = storedClientId(clientIdOf(request));
    let fingerprint: Buffer;
    try {
      fingerprint = requestFingerprint(request);
    } catch (error) {
      // JSON.stringify recurses: a document nested some thousands deep, which a schema that
      // admits any value lets through, overflows the stack. Not the server's fault.
      if (!(error instanceof RangeError)) throw error;
      throw validationProblem('body', '', 'is nested too deeply');
    }

    let outcome: ClaimOutcome;
    try {
      outcome = await claimKey(clientId, key, fingerprint);
    } catch (error) {
      request.log.warn({ err: error, idempotency_key: key }, 'idempotency: key store unavailable');
      reply.header('retry-after', String(retryAfterSeconds));
      throw problem(503, {
        type: IDEMPOTENCY_PROBLEM_TYPES.unavailable,
        title: 'Idempotency store unavailable',
        detail: 'The idempotency key could not be checked, so the request was not run. Retry with the same key.',
      });
    }

    switch (outcome.kind) {
      case 'claimed':
        if (outcome.reclaimed) {
          request.log.info({ idempotency_key: key, client_id: clientId }, 'idempotency: took over an expired or abandoned key');
        }
        claims.set(request, { clientId, key, token: outcome.token, settled: false });
        return;
      case 'replay':
        reply.code(outcome.status);
        for (const name of REPLAYED_HEADERS) {
          const value = outcome.headers[name];
          if (typeof value === 'string') reply.header(name, value);
        }
        reply.header(IDEMPOTENT_REPLAYED_HEADER, 'true');
        // An empty answer without a type (`reply.code(202).send()`) goes back as it came: sent
        // as a Buffer, it would gain application/octet-stream.
        if (outcome.body.length === 0 && outcome.headers['content-type'] === undefined) return reply.send();
        return reply.send(outcome.body);
      case 'in_progress':
        reply.header('retry-after', String(retryAfterSeconds));
        throw problem(409, {
          type: IDEMPOTENCY_PROBLEM_TYPES.inProgress,
          title: 'Request in progress',
          detail: 'A request with this Idempotency-Key is still being processed. Retry later with the same key to get its result.',
        });
      case 'mismatch':
        throw problem(422, {
          type: IDEMPOTENCY_PROBLEM_TYPES.mismatch,
          title: 'Idempotency-Key reused',
          detail:
            'This Idempotency-Key was already used for a different request (method, path or body). ' +
            'Use a new key for a new request.',
        });
    }
  });

  async function release(claim: Claim, request: FastifyRequest): Promise<void> {
    await queryWithin(pool, RELEASE_SQL, [claim.clientId, claim.key, claim.token], queryTimeoutMs);
    request.log.debug({ idempotency_key: claim.key }, 'idempotency: key released');
  }

  // Awaited before the response leaves: a client that has the response can count on its retry
  // being a replay, never a 409 or a second run. This hook must not throw: Fastify would turn
  // an error here into a 500 sent in place of the real (already effective) response.
  app.addHook('onSend', async (request: FastifyRequest, reply: FastifyReply, payload: unknown) => {
    const claim = claims.get(request);
    if (claim === undefined || claim.settled) return payload;
    claim.settled = true;
    const status = reply.statusCode;
    try {
      // A 5xx is stored only when it says the request may have taken effect (a dependency's
      // call reached it, then failed or ran past the deadline): freed, the retry its answer
      // invites would run the request, and the dependency's call, a second time.
      const final = status >= 500 ? answeredOutcomeUnknown(request) : status >= 200 && !NOT_STORED_4XX.has(status);
      if (!final) {
        // Not a final answer: free the key so the client can retry it.
        await release(claim, request);
        return payload;
      }
      const body = payloadBytes(payload);
      if (body === undefined || body.length > responseBytesMax) {
        request.log.warn(
          { idempotency_key: claim.key, response_bytes: body?.length ?? 'stream', response_bytes_max: responseBytesMax },
          'idempotency: response not storable; key released, a retry will run the request again',
        );
        await release(claim, request);
        return payload;
      }
      const headers: Record<string, string> = {};
      for (const name of REPLAYED_HEADERS) {
        const value = reply.getHeader(name);
        if (typeof value === 'string' || typeof value === 'number') headers[name] = String(value);
      }
      const stored = await completeBatches.submit({ clientId: claim.clientId, key: claim.key, token: claim.token, status, headers, body });
      if (!stored) {
        request.log.warn(
          { idempotency_key: claim.key, lock_timeout_ms: lockTimeoutMs },
          'idempotency: key was taken over after its lock timed out; this response is not stored',
        );
      }
    } catch (error) {
      request.log.error(
        { err: error, idempotency_key: claim.key },
        'idempotency: could not record the response; the key stays in progress until its lock times out',
      );
    }
    return payload;
  });

  // Safety net for a claimed request that never reached onSend (a hijacked reply). A handler
  // that never answers is bounded by lockTimeoutMs instead.
  app.addHook('onResponse', async (request: FastifyRequest) => {
    const claim = claims.get(request);
    if (claim === undefined || claim.settled) return;
    claim.settled = true;
    try {
      await release(claim, request);
    } catch (error) {
      request.log.error({ err: error, idempotency_key: claim.key }, 'idempotency: could not release the key');
    }
  });

  if (pruneIntervalMs > 0) {
    const pruner = startIdempotencyPruner(pool, {
      intervalMs: pruneIntervalMs,
      ...(clock === undefined ? {} : { now: clock }),
      queryTimeoutMs,
      onError: (error) => {
        app.log.warn({ err: error }, 'idempotency: pruning failed; retrying next interval');
      },
    });
    app.addHook('onClose', () => pruner.stop());
  }
}

export interface PruneOptions {
  /** Rows deleted per statement. Default 1000. */
  batchSizeMax?: number;
  /** Statements per call; what remains waits for the next call. Default 100. */
  batchesMax?: number;
  /** Deadline for each statement. Default 5 s. */
  queryTimeoutMs?: number;
}

/**
 * Deletes keys whose `expires_at` has passed by `now` (default: the database's clock), in-progress
 * ones only once their lock has also expired, in batches of `batchSizeMax`, at most
 * `batchesMax` batches. Returns the count. Then the expired records of withdrawn claim
 * statements (WITHDRAW_CLAIMS_SQL), in the same batches, which the count leaves out.
 */
export async function pruneIdempotencyKeys(
  pool: pg.Pool,
  now?: number | Date,
  options: PruneOptions = {},
): Promise<number> {
  const batchSizeMax = options.batchSizeMax ?? IDEMPOTENCY_PRUNE_BATCH_SIZE_MAX_DEFAULT;
  const batchesMax = options.batchesMax ?? IDEMPOTENCY_PRUNE_BATCHES_MAX_DEFAULT;
  const queryTimeoutMs = options.queryTimeoutMs ?? IDEMPOTENCY_QUERY_TIMEOUT_MS_DEFAULT;
  assertInteger('batchSizeMax', batchSizeMax, 1, 100_000);
  assertInteger('batchesMax', batchesMax, 1, 100_000);
  const at = now === undefined ? null : new Date(now);
  /** `sql` until a statement deletes less than a full batch, or `batchesMax` statements; how many it deleted. */
  const inBatches = async (sql: string): Promise<number> => {
    let deleted = 0;
    for (let batch = 0; batch < batchesMax; batch++) {
      const result = await pool.query(withQueryTimeout(sql, [at, batchSizeMax], queryTimeoutMs));
      const count = result.rowCount ?? 0;
      deleted += count;
      if (count < batchSizeMax) break;
    }
    return deleted;
  };
  const deleted = await inBatches(PRUNE_SQL);
  // One for each claim statement that failed at its client: few, but an outage can leave
  // thousands.
  await inBatches(PRUNE_WITHDRAWN_SQL);
  return deleted;
}

export interface PrunerOptions extends PruneOptions {
  intervalMs: number;
  /** Milliseconds since the epoch, for tests. Default: the database's clock. */
  now?: () => number;
  onError?: (error: unknown) => void;
}

export interface IdempotencyPruner {
  /** Stops the timer and waits for a prune in progress to finish. */
  stop(): Promise<void>;
}

/**
 * Prunes at once, then every `intervalMs`. A call that stopped at its bound (`batchesMax` full
 * batches) is followed at once by another, until one finds less: at thousands of keyed
 * requests a second the keys expire faster than one bounded call an interval deletes, and the
 * table would grow for ever. The timer is unref'd (it never keeps a process alive) and runs
 * never overlap: a tick that finds the previous prune still running is skipped.
 */
export function startIdempotencyPruner(pool: pg.Pool, options: PrunerOptions): IdempotencyPruner {
  const { intervalMs, now, onError = () => {} } = options;
  assertInteger('intervalMs', intervalMs, 1, 86_400_000);
  const bound = (options.batchSizeMax ?? IDEMPOTENCY_PRUNE_BATCH_SIZE_MAX_DEFAULT) * (options.batchesMax ?? IDEMPOTENCY_PRUNE_BATCHES_MAX_DEFAULT);
  let stopped = false;
  let running: Promise<void> | undefined;
  const prune = async (): Promise<void> => {
    try {
      while (!stopped && (await pruneIdempotencyKeys(pool, now?.(), options)) >= bound);
    } catch (error) {
      onError(error);
    }
  };
  const tick = (): void => {
    if (running !== undefined) return;
    running = prune().finally(() => {
      running = undefined;
    });
  };
  const timer = setInterval(tick, intervalMs);
  timer.unref();
  tick();
  return {
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await running;
    },
  };
}

/**
 * The ledger HTTP service: a thin composition of the ledger engine and the service runtime.
 * Handlers translate JSON to engine calls and results back; the money rules live in the engine.
 */
import type { KeyObject } from 'node:crypto';
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify';
import { auditedByEvents, auditHttp, auditRoutes, defaultActor, type AuditActor, type AuditRoute, type AuditSink, type AuditStore, type RateLimitedSummarySettings } from '@ledgerline/audit';
import type { EventMetadata } from '@ledgerline/events';
import type pg from 'pg';
import {
  AMOUNT_MAX,
  LedgerClosedError,
  LedgerOverloadedError,
  LedgerUnavailableError,
  type Account,
  type CreateTransferResult,
  type CreateTransferResultCode,
  type LedgerEngine,
  type NewAccount,
  type NewTransfer,
  type Transfer,
} from '@ledgerline/ledger';
import {
  createService,
  type HttpProblem,
  idempotency,
  type IdempotencyOptions,
  postgresReadinessCheck,
  problem,
  problemType,
  ProblemResponse,
  type Service,
  type ServiceOptions,
  type ValidationIssue,
  VALIDATION_ISSUES_MAX,
} from '@ledgerline/service-runtime';
import { PERMISSIONS } from '@ledgerline/authz';
import { createLedgerGuard, OPEN_GUARD, type LedgerAuthOptions, type LedgerGuard } from './auth.ts';
import { registerLedgerMetrics } from './metrics.ts';
import { LedgerCatalog } from './ledgers.ts';
import {
  AccountBatchBody,
  AccountBatchOut,
  AccountOut,
  AccountParams,
  BalanceOut,
  BalanceQuery,
  BATCH_ITEMS_MAX,
  LedgersOut,
  NewAccountBody,
  NewTransferBody,
  TransferBatchBody,
  TransferBatchOut,
  TransferOut,
  TransferPageOut,
  TransferResultOut,
  TransfersQuery,
} from './schemas.ts';

export interface LedgerServiceOptions {
  engine: LedgerEngine;
  pool: pg.Pool;
  logLevel?: string;
  bodyLimitBytes?: number;
  logger?: false | FastifyBaseLogger;
  /** Idempotency-Key handling (ttl, lock timeout, pruner, clock); every POST route honours the header. */
  idempotency?: Omit<IdempotencyOptions, 'pool'>;
  /** Metrics, tracing, load shedding, rate limiting, deadlines (see `resilienceFromConfig`). */
  resilience?: Pick<ServiceOptions, 'metrics' | 'tracing' | 'loadShedding' | 'rateLimit' | 'dependencies' | 'deadlineDefaultMs'>;
  /**
   * Bearer-token authentication and per-route authorization (see auth.ts). Absent, every
   * request is allowed: only tests and an explicit LEDGER_AUTH=disabled run that way.
   */
  auth?: LedgerAuthOptions;
  /**
   * The audit trail (see docs/audit.md): every command and every read of account or transfer
   * data is recorded through `sink` after the response; with `store`, /v1/audit/* serves
   * search, checkpoints and proofs. Ledger events are audited by the sequencer, not here.
   */
  audit?: {
    sink: AuditSink & { readonly saturated?: boolean; readonly buffered?: number };
    store?: { store: AuditStore; publicKey: KeyObject };
    /**
     * The trail's sequencer tails this engine's event store (the engine has one), so an event
     * is itself the audit record of the request that caused it: a request whose every account
     * or transfer was created (`ok`) is recorded by those events alone (auditedByEvents).
     */
    eventsAudited?: boolean;
    /** The summaries of rate-limited requests (`auditHttp`'s `rateLimitedSummary`; AUDIT_RATE_LIMITED_SUMMARY_* in main.ts). */
    rateLimitedSummary?: RateLimitedSummarySettings;
  };
}

/** What the HTTP layer audits. Commands are retained as `command`, reads of money data as `access`. */
const AUDITED_ROUTES: Record<string, AuditRoute> = {
  'POST /v1/accounts': { action: 'ledger.account.create', recordClass: 'command', resourceType: 'account' },
  'POST /v1/accounts/batch': { action: 'ledger.account.create_batch', recordClass: 'command', resourceType: 'account-batch' },
  'POST /v1/transfers': { action: 'ledger.transfer.create', recordClass: 'command', resourceType: 'transfer' },
  'POST /v1/transfers/batch': { action: 'ledger.transfer.create_batch', recordClass: 'command', resourceType: 'transfer-batch' },
  'GET /v1/accounts/:id': { action: 'ledger.account.read', recordClass: 'access', resourceType: 'account' },
  'GET /v1/accounts/:id/balance': { action: 'ledger.account.balance.read', recordClass: 'access', resourceType: 'account' },
  'GET /v1/accounts/:id/transfers': { action: 'ledger.account.transfers.read', recordClass: 'access', resourceType: 'account' },
  'GET /v1/transfers/:id': { action: 'ledger.transfer.read', recordClass: 'access', resourceType: 'transfer' },
};

const PROBLEMS = {
  validation: problemType('validation-error'),
  unknownLedger: problemType('unknown-ledger'),
  rejected: problemType('transfer-rejected'),
  accountRejected: problemType('account-rejected'),
  idConflict: problemType('id-conflict'),
  notFound: problemType('not-found'),
  unavailable: problemType('ledger-unavailable'),
  beforeAccount: problemType('before-account-created'),
} as const;

/**
 * The fields a transfer needs unless it posts or voids a pending transfer, which takes the
 * omitted ones from the pending transfer (NewTransferBody's description).
 */
const TRANSFER_FIELDS_REQUIRED = ['debit_account_id', 'credit_account_id', 'amount', 'ledger', 'code'] as const;

/** Header values we copy into event metadata: printable, bounded. */
const SAFE_HEADER_VALUE = /^[\x21-\x7e][\x20-\x7e]{0,511}$/;
const ANONYMOUS_ACTOR = 'anonymous';

/** Seconds a client should wait before retrying after a 503. */
const RETRY_AFTER_SECONDS = 1;

export async function buildLedgerService(options: LedgerServiceOptions): Promise<Service> {
  const { engine, pool } = options;
  const ledgers = await LedgerCatalog.load(() => engine.listLedgers());
  // Set once the service exists (the guard hooks into it); read only while serving requests.
  let guard: LedgerGuard = OPEN_GUARD;
  const rateLimit = options.resilience?.rateLimit;
  // Rate limiting runs after authentication, so with auth on the verified principal is the
  // client, whatever x-client-id says; without auth the runtime's default keys by the client
  // address (a caller-chosen header would limit nothing).
  const resilience = rateLimit === undefined || rateLimit === false || options.auth === undefined ? options.resilience : {
    ...options.resilience,
    rateLimit: { ...rateLimit, clientId: (request: FastifyRequest) => `p:${guard.clientId(request) ?? 'anonymous'}` },
  };

  const app = await createService({
    config: {
      LOG_LEVEL: (options.logLevel ?? 'info') as 'info',
      BODY_LIMIT_BYTES: options.bodyLimitBytes ?? 1_048_576,
    },
    openapi: {
      title: 'Ledgerline ledger',
      version: '0.1.0',
      description:
        'Double-entry accounts and transfers. Amounts are strings of digits in minor units; ' +
        'timestamps are nanoseconds since the Unix epoch, as strings. Errors are RFC 9457 problem+json.',
    },
    readinessChecks: [postgresReadinessCheck(pool)],
    ...(options.logger === undefined ? {} : { logger: options.logger }),
    ...resilience,
  });
  if (app.metrics !== undefined) registerLedgerMetrics(app.metrics, engine, pool, { log: app.log });
  // Authentication runs first (onRequest), so a request without a valid token never reaches
  // validation, idempotency or a handler; each handler then authorizes its resource.
  if (options.auth !== undefined) guard = createLedgerGuard(app, engine, options.auth);
  // Every POST honours Idempotency-Key (replayed responses, 409 while in progress, 422 on reuse
  // for a different request). Re-running a request whose key was abandoned by a crash is safe:
  // the engine's transfer and account ids are idempotency keys of their own.
  // With authentication, keys are scoped to the principal, so nobody can replay another's response.
  await app.register(idempotency, {
    ...options.idempotency,
    pool,
    ...(options.auth === undefined ? {} : { clientId: (request: FastifyRequest) => guard.clientId(request) ?? 'anonymous' }),
  });
  if (options.audit !== undefined) {
    const actorOf = (request: FastifyRequest): AuditActor => {
      if (options.auth === undefined) return defaultActor(request);
      const id = actorName(request);
      return id === ANONYMOUS_ACTOR ? { type: 'anonymous', id } : { type: id.startsWith('user:') ? 'user' : 'service', id };
    };
    await app.register(auditHttp, {
      sink: options.audit.sink,
      service: 'ledger',
      routes: AUDITED_ROUTES,
      actorOf,
      ...(app.metrics === undefined ? {} : { metrics: app.metrics }),
      ...(options.audit.rateLimitedSummary === undefined ? {} : { rateLimitedSummary: options.audit.rateLimitedSummary }),
    });
    const reader = options.audit.store;
    if (reader !== undefined) {
      await app.register(auditRoutes, {
        ...reader,
        service: 'ledger',
        actorOf,
        routeConfig: { permission: PERMISSIONS.auditRead },
        // Only the oversight roles hold audit:read; each read of the trail is a decision of its own.
        authorize: (request) => guard.allow(request, { type: 'audit', id: request.url.split('?')[0] ?? request.url }),
      });
    }
  }

  /**
   * Who acts, as both the events a request causes and its command records name it: with auth
   * on, the authenticated principal (`kind:id`), and anonymous for a request refused before
   * authentication, whatever its headers say. With auth off (tests, local benchmarks) nobody is
   * verified: the audit plugin's `defaultActor` names it, an x-client-id header that is printable
   * and at most 200 characters kept as the caller's claim, `claimed:<header>`, else anonymous.
   * Until 2026-12-07 the header stood in for the principal whenever there was none, so a
   * request refused 401 was recorded as the service it named.
   */
  function actorName(request: FastifyRequest): string {
    if (options.auth !== undefined) {
      try {
        return guard.clientId(request) ?? ANONYMOUS_ACTOR;
      } catch {
        return ANONYMOUS_ACTOR;
      }
    }
    return defaultActor(request).id;
  }

  /**
   * Who and why, carried into every event this request causes: the correlation id a caller
   * sent (or this request's id), the request as the cause, the actor (`actorName`), the
   * client's address and the W3C trace context.
   */
  function eventContext(request: FastifyRequest): EventMetadata {
    const header = (name: string): string | undefined => {
      const v = request.headers[name];
      return typeof v === 'string' && SAFE_HEADER_VALUE.test(v) ? v : undefined;
    };
    const traceparent = header('traceparent');
    const tracestate = header('tracestate');
    return {
      correlationId: header('x-correlation-id') ?? request.id,
      causationId: request.id,
      actor: actorName(request),
      ip: request.ip,
      ...(traceparent === undefined ? {} : { traceparent }),
      ...(tracestate === undefined ? {} : { tracestate }),
    };
  }

  /**
   * A create whose every result is `ok` appended one event per account or transfer in the
   * same transaction, each naming the actor, the request, its address and trace: with the
   * event tail in the trail, those events are the request's audit record. Anything else (a
   * replay, a rejection, a partial batch) is recorded by auditHttp as well.
   */
  const eventsAudited = options.audit?.eventsAudited === true;
  function whenAllCreated(request: FastifyRequest, results: readonly { result: string }[]): void {
    if (eventsAudited && results.length > 0 && results.every((r) => r.result === 'ok')) auditedByEvents(request);
  }

  /** Turns the engine's "nothing decided" errors into 503s the client can safely retry. */
  async function engineCall<T>(reply: FastifyReply, call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      if (error instanceof LedgerUnavailableError || error instanceof LedgerOverloadedError || error instanceof LedgerClosedError) {
        reply.header('retry-after', String(RETRY_AFTER_SECONDS));
        const outcomeUnknown = error instanceof LedgerUnavailableError && error.outcomeUnknown;
        throw problem(503, {
          type: PROBLEMS.unavailable,
          title: 'Ledger unavailable',
          detail: `${error.message}. Retrying with the same ids is safe: nothing is applied twice.`,
          outcome_unknown: outcomeUnknown,
        });
      }
      throw error;
    }
  }

  /** A 400 in the runtime's validation-error shape, for checks a schema cannot express. */
  function invalid(part: 'body' | 'querystring', path: string, message: string): HttpProblem {
    return invalidAll(part, [{ in: part, path, message }]);
  }

  function invalidAll(part: 'body' | 'querystring', errors: readonly ValidationIssue[]): HttpProblem {
    return problem(400, {
      type: PROBLEMS.validation,
      title: 'Validation failed',
      detail: `The request ${part} does not match the schema.`,
      errors: errors.slice(0, VALIDATION_ISSUES_MAX),
    });
  }

  /**
   * A 400 naming each field a transfer lacks (TRANSFER_FIELDS_REQUIRED), for every transfer of
   * a request at once. The schema cannot require them, since posting or voiding a pending
   * transfer may omit them; without this check the engine would reject such a transfer as
   * "debit account id must not be zero" (422), about a field the client never sent, and
   * record the rejection under its id.
   */
  function checkRequiredFields(bodies: readonly NewTransferBody[], pathOf: (index: number) => string): void {
    const errors: ValidationIssue[] = [];
    bodies.forEach((body, index) => {
      const f = body.flags ?? {};
      if (f.post_pending_transfer === true || f.void_pending_transfer === true) return;
      for (const field of TRANSFER_FIELDS_REQUIRED) {
        if (body[field] === undefined) errors.push({ in: 'body', path: `${pathOf(index)}/${field}`, message: 'is required' });
      }
    });
    if (errors.length > 0) throw invalidAll('body', errors);
  }

  /** A string of digits (already checked by the schema) as a bigint within PostgreSQL's bigint. */
  function int63(digits: string, part: 'body' | 'querystring', path: string): bigint {
    const value = BigInt(digits);
    if (value > AMOUNT_MAX) throw invalid(part, path, `must be at most ${AMOUNT_MAX}`);
    return value;
  }

  /** The engine takes at most `batchSizeMax` items per call, which may be below BATCH_ITEMS_MAX. */
  function checkBatchSize(count: number, path: string): void {
    if (count > engine.batchSizeMax) throw invalid('body', path, `must not have more than ${engine.batchSizeMax} items`);
  }

  /** Run before checkLedger: a ledger added since this instance loaded its list is looked up (LedgerCatalog). */
  async function knowLedgers(reply: FastifyReply, codes: Iterable<string | undefined>): Promise<void> {
    await engineCall(reply, () => ledgers.know(codes));
  }

  function checkLedger(code: string | undefined, path: string): void {
    if (code !== undefined && !ledgers.has(code)) {
      throw problem(422, {
        type: PROBLEMS.unknownLedger,
        title: 'Unknown ledger',
        detail: `There is no ledger for ${code}. Known ledgers: ${ledgers.codes().join(', ')}.`,
        errors: [{ in: 'body', path, message: 'is not a known ledger' }],
      });
    }
  }

  function toTransfer(body: NewTransferBody, path: string): NewTransfer {
    const amount = body.amount === undefined ? undefined : int63(body.amount, 'body', `${path}/amount`);
    checkLedger(body.ledger, `${path}/ledger`);
    const f = body.flags ?? {};
    return {
      id: body.id.toLowerCase(),
      ...(body.debit_account_id === undefined ? {} : { debitAccountId: body.debit_account_id.toLowerCase() }),
      ...(body.credit_account_id === undefined ? {} : { creditAccountId: body.credit_account_id.toLowerCase() }),
      ...(amount === undefined ? {} : { amount }),
      ...(body.pending_id === undefined ? {} : { pendingId: body.pending_id.toLowerCase() }),
      ...(body.ledger === undefined ? {} : { ledger: body.ledger }),
      ...(body.code === undefined ? {} : { code: body.code }),
      ...(body.timeout_seconds === undefined ? {} : { timeoutSeconds: body.timeout_seconds }),
      ...(body.metadata === undefined ? {} : { metadata: body.metadata }),
      flags: {
        linked: f.linked === true,
        pending: f.pending === true,
        postPendingTransfer: f.post_pending_transfer === true,
        voidPendingTransfer: f.void_pending_transfer === true,
        balancingDebit: f.balancing_debit === true,
        balancingCredit: f.balancing_credit === true,
        closingDebit: f.closing_debit === true,
        closingCredit: f.closing_credit === true,
      },
    };
  }

  function toAccount(body: NewAccountBody, path: string): NewAccount {
    checkLedger(body.ledger, `${path}/ledger`);
    return {
      id: body.id.toLowerCase(),
      ledger: body.ledger,
      code: body.code,
      flags: {
        debitsMustNotExceedCredits: body.flags?.debits_must_not_exceed_credits === true,
        creditsMustNotExceedDebits: body.flags?.credits_must_not_exceed_debits === true,
      },
      ...(body.metadata === undefined ? {} : { metadata: body.metadata }),
    };
  }

  /** An account as the API shows it, with its ledger's scale (looked up if this instance has not seen the ledger). */
  async function accountOut(reply: FastifyReply, a: Account) {
    const { scale } = await engineCall(reply, () => ledgers.require(a.ledger));
    return {
      id: a.id,
      ledger: a.ledger,
      scale,
      code: a.code,
      flags: {
        debits_must_not_exceed_credits: a.flags.debitsMustNotExceedCredits === true,
        credits_must_not_exceed_debits: a.flags.creditsMustNotExceedDebits === true,
        closed: a.flags.closed === true,
      },
      metadata: a.metadata,
      debits_pending: a.debitsPending.toString(),
      debits_posted: a.debitsPosted.toString(),
      credits_pending: a.creditsPending.toString(),
      credits_posted: a.creditsPosted.toString(),
      timestamp: a.timestamp.toString(),
    };
  }

  function transferOut(x: Transfer) {
    const f = x.flags;
    return {
      id: x.id,
      debit_account_id: x.debitAccountId,
      credit_account_id: x.creditAccountId,
      amount: x.amount.toString(),
      pending_id: x.pendingId,
      ledger: x.ledger,
      code: x.code,
      flags: {
        linked: f.linked === true,
        pending: f.pending === true,
        post_pending_transfer: f.postPendingTransfer === true,
        void_pending_transfer: f.voidPendingTransfer === true,
        balancing_debit: f.balancingDebit === true,
        balancing_credit: f.balancingCredit === true,
        closing_debit: f.closingDebit === true,
        closing_credit: f.closingCredit === true,
      },
      timeout_seconds: x.timeoutSeconds,
      metadata: x.metadata,
      timestamp: x.timestamp.toString(),
      result: x.result,
      pending_status: x.pendingStatus,
      expires_at: x.expiresAt?.toString() ?? null,
      resolved_at: x.resolvedAt?.toString() ?? null,
    };
  }

  function resultOut(r: CreateTransferResult) {
    return { id: r.id, result: r.result, timestamp: r.timestamp?.toString() ?? null, amount: r.amount?.toString() ?? null };
  }

  function notFound(what: string, id: string): HttpProblem {
    return problem(404, { type: PROBLEMS.notFound, title: `${what} not found`, detail: `No ${what.toLowerCase()} has id ${id}.` });
  }

  function transferRejection(code: CreateTransferResultCode, id: string): HttpProblem {
    if (code.startsWith('exists_with_different_')) {
      const field = code.slice('exists_with_different_'.length);
      return problem(409, {
        type: PROBLEMS.idConflict,
        title: 'Transfer id already used',
        detail: `Transfer ${id} already exists with a different ${field.replaceAll('_', ' ')}. An id identifies one transfer; use a new id for a new transfer.`,
        result: code,
      });
    }
    return problem(422, {
      type: PROBLEMS.rejected,
      title: 'Transfer rejected',
      detail: `Transfer ${id} was rejected: ${code.replaceAll('_', ' ')}.`,
      result: code,
    });
  }

  const problems = { 400: ProblemResponse, 401: ProblemResponse, 403: ProblemResponse, 409: ProblemResponse, 413: ProblemResponse, 415: ProblemResponse, 422: ProblemResponse, 503: ProblemResponse };

  app.get(
    '/v1/ledgers',
    { config: { priority: 'high', permission: PERMISSIONS.ledgerRead }, schema: { summary: 'The ledgers (currencies and assets) and their scales', tags: ['ledgers'], response: { 200: LedgersOut, 401: ProblemResponse, 403: ProblemResponse } } },
    async (request) => {
      guard.allow(request, { type: 'ledger', id: '*' });
      // Fresh when the database answers; the list this instance holds when it does not (the
      // ledgers rarely change, and the list needs no database to be served).
      await ledgers.reload().catch((error: unknown) => request.log.warn({ err: error }, 'ledgers: could not reload the list; serving the one held'));
      return { ledgers: ledgers.all() };
    },
  );

  app.post(
    '/v1/accounts',
    {
      config: { priority: 'high', permission: PERMISSIONS.accountCreate },
      schema: {
        summary: 'Create an account',
        description: 'Idempotent by id: repeating the same request returns 200 with the account; the same id with different fields is a 409.',
        tags: ['accounts'],
        body: NewAccountBody,
        response: { 200: AccountOut, 201: AccountOut, ...problems },
      },
    },
    async (request, reply) => {
      await knowLedgers(reply, [request.body.ledger]);
      const account = toAccount(request.body, '');
      guard.accounts(request, [account]);
      const [r] = await engineCall(reply, () => engine.createAccounts([account], eventContext(request)));
      const result = r?.result;
      whenAllCreated(request, r === undefined ? [] : [r]);
      if (result === 'ok' || result === 'exists') {
        const stored = await engineCall(reply, () => engine.getAccount(account.id));
        if (stored === null) throw new Error(`invariant: account ${account.id} reported ${result} but is missing`);
        return reply.code(result === 'ok' ? 201 : 200).send(await accountOut(reply, stored));
      }
      if (result?.startsWith('exists_with_different_') === true) {
        throw problem(409, {
          type: PROBLEMS.idConflict,
          title: 'Account id already used',
          detail: `Account ${account.id} already exists with a different ${result.slice(22).replaceAll('_', ' ')}.`,
          result,
        });
      }
      throw problem(422, { type: PROBLEMS.accountRejected, title: 'Account rejected', detail: `Account ${account.id} was rejected: ${String(result).replaceAll('_', ' ')}.`, result });
    },
  );

  app.post(
    '/v1/accounts/batch',
    {
      config: { priority: 'high', permission: PERMISSIONS.accountCreate },
      schema: {
        summary: `Create up to ${BATCH_ITEMS_MAX} accounts, with one result each`,
        tags: ['accounts'],
        body: AccountBatchBody,
        response: { 200: AccountBatchOut, ...problems },
      },
    },
    async (request, reply) => {
      checkBatchSize(request.body.accounts.length, '/accounts');
      await knowLedgers(reply, request.body.accounts.map((a) => a.ledger));
      const accounts = request.body.accounts.map((a, i) => toAccount(a, `/accounts/${i}`));
      guard.accounts(request, accounts);
      const results = await engineCall(reply, () => engine.createAccounts(accounts, eventContext(request)));
      whenAllCreated(request, results);
      return { results: results.map((r) => ({ id: r.id, result: r.result, timestamp: r.timestamp?.toString() ?? null })) };
    },
  );

  app.get(
    '/v1/accounts/:id',
    { config: { priority: 'high', permission: PERMISSIONS.accountRead }, schema: { summary: 'An account with its balances', tags: ['accounts'], params: AccountParams, response: { 200: AccountOut, 400: ProblemResponse, 401: ProblemResponse, 403: ProblemResponse, 404: ProblemResponse, 503: ProblemResponse } } },
    async (request, reply) => {
      const id = request.params.id.toLowerCase();
      await engineCall(reply, () => guard.account(request, id));
      const account = await engineCall(reply, () => engine.getAccount(id));
      if (account === null) throw notFound('Account', id);
      return accountOut(reply, account);
    },
  );

  app.get(
    '/v1/accounts/:id/balance',
    {
      config: { priority: 'high', permission: PERMISSIONS.accountRead },
      schema: {
        summary: "An account's balances as of a ledger timestamp",
        tags: ['accounts'],
        params: AccountParams,
        querystring: BalanceQuery,
        description: '422 (before-account-created) when `at` is before the account existed, with its creation timestamp.',
        response: { 200: BalanceOut, 400: ProblemResponse, 401: ProblemResponse, 403: ProblemResponse, 404: ProblemResponse, 422: ProblemResponse, 503: ProblemResponse },
      },
    },
    async (request, reply) => {
      const id = request.params.id.toLowerCase();
      await engineCall(reply, () => guard.account(request, id));
      const at = int63(request.query.at, 'querystring', '/at');
      let b = await engineCall(reply, () => engine.getAccountBalanceAt(id, at));
      if (b === null) {
        // The engine answers null both for no account and for `at` before the account existed;
        // the second is not "no account has this id", and a client can fix its request.
        const account = await engineCall(reply, () => engine.getAccount(id));
        if (account === null) throw notFound('Account', id);
        if (account.timestamp > at) {
          throw problem(422, {
            type: PROBLEMS.beforeAccount,
            title: 'Timestamp before the account',
            detail: `Account ${id} was created at ledger timestamp ${account.timestamp}, after at=${at}; ask for a timestamp at or after its creation.`,
            errors: [{ in: 'querystring', path: '/at', message: `must not be before the account's creation timestamp ${account.timestamp}` }],
            account_timestamp: account.timestamp.toString(),
          });
        }
        // The account was created between the two reads, at or before `at`: read again.
        b = await engineCall(reply, () => engine.getAccountBalanceAt(id, at));
        if (b === null) throw new Error(`invariant: account ${id} exists since ${account.timestamp} but has no balance at ${at}`);
      }
      return {
        account_id: b.accountId,
        timestamp: b.timestamp.toString(),
        debits_pending: b.debitsPending.toString(),
        debits_posted: b.debitsPosted.toString(),
        credits_pending: b.creditsPending.toString(),
        credits_posted: b.creditsPosted.toString(),
      };
    },
  );

  app.get(
    '/v1/accounts/:id/transfers',
    {
      config: { priority: 'normal', permission: PERMISSIONS.accountRead },
      schema: {
        summary: "An account's transfers, newest first by default, with keyset pagination",
        tags: ['accounts'],
        params: AccountParams,
        querystring: TransfersQuery,
        response: { 200: TransferPageOut, 400: ProblemResponse, 401: ProblemResponse, 403: ProblemResponse, 404: ProblemResponse, 503: ProblemResponse },
      },
    },
    async (request, reply) => {
      const id = request.params.id.toLowerCase();
      await engineCall(reply, () => guard.account(request, id));
      const { limit, order, after } = request.query;
      const afterTimestamp = after === undefined ? null : int63(after, 'querystring', '/after');
      const account = await engineCall(reply, () => engine.getAccount(id));
      if (account === null) throw notFound('Account', id);
      const page = await engineCall(reply, () =>
        engine.listAccountTransfers(id, { limit, order, after: afterTimestamp }),
      );
      return { transfers: page.transfers.map(transferOut), next_cursor: page.nextCursor?.toString() ?? null };
    },
  );

  app.post(
    '/v1/transfers',
    {
      config: { priority: 'critical', permission: PERMISSIONS.transferCreate },
      schema: {
        summary: 'Create one transfer',
        description:
          '201 when applied; 200 with result `exists` when the same transfer was applied before (a safe retry); ' +
          '409 when the id was used for a different transfer; 422 with the result code when the ledger rejects it. ' +
          'A rejection is final for that id.',
        tags: ['transfers'],
        body: NewTransferBody,
        response: { 200: TransferResultOut, 201: TransferResultOut, ...problems },
      },
    },
    async (request, reply) => {
      checkRequiredFields([request.body], () => '');
      await knowLedgers(reply, [request.body.ledger]);
      const transfer = toTransfer(request.body, '');
      await engineCall(reply, () => guard.newTransfers(request, [transfer]));
      const [r] = await engineCall(reply, () => engine.createTransfers([transfer], eventContext(request)));
      if (r === undefined) throw new Error('invariant: the engine returned no result');
      whenAllCreated(request, [r]);
      if (r.result === 'ok') return reply.code(201).send(resultOut(r));
      if (r.result === 'exists') return reply.code(200).send(resultOut(r));
      throw transferRejection(r.result, transfer.id);
    },
  );

  app.post(
    '/v1/transfers/batch',
    {
      config: { priority: 'critical', permission: PERMISSIONS.transferCreate },
      schema: {
        summary: `Create up to ${BATCH_ITEMS_MAX} transfers, in order, with one result each`,
        description: 'Transfers are applied in order; a linked chain (flags.linked) is applied all or nothing and must end within the batch.',
        tags: ['transfers'],
        body: TransferBatchBody,
        response: { 200: TransferBatchOut, ...problems },
      },
    },
    async (request, reply) => {
      checkBatchSize(request.body.transfers.length, '/transfers');
      checkRequiredFields(request.body.transfers, (i) => `/transfers/${i}`);
      await knowLedgers(reply, request.body.transfers.map((x) => x.ledger));
      const transfers = request.body.transfers.map((x, i) => toTransfer(x, `/transfers/${i}`));
      await engineCall(reply, () => guard.newTransfers(request, transfers));
      const results = await engineCall(reply, () => engine.createTransfers(transfers, eventContext(request)));
      whenAllCreated(request, results);
      return { results: results.map(resultOut) };
    },
  );

  app.get(
    '/v1/transfers/:id',
    { config: { priority: 'high', permission: PERMISSIONS.transferRead }, schema: { summary: 'A transfer, applied or rejected', tags: ['transfers'], params: AccountParams, response: { 200: TransferOut, 400: ProblemResponse, 401: ProblemResponse, 403: ProblemResponse, 404: ProblemResponse, 503: ProblemResponse } } },
    async (request, reply) => {
      const id = request.params.id.toLowerCase();
      await engineCall(reply, () => guard.transfer(request, id));
      const transfer = await engineCall(reply, () => engine.getTransfer(id));
      if (transfer === null) throw notFound('Transfer', id);
      return transferOut(transfer);
    },
  );

  return app;
}

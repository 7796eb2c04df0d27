import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect, createServer as createTcpServer, type AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import pg from 'pg';
import { pino } from 'pino';
import { Type } from 'typebox';
import { propertySeed } from '@ledgerline/testing';
import {
  baseConfigSchema,
  createService,
  findDuplicateMember,
  HttpProblem,
  loadConfig,
  problem,
  problemType,
  ProblemResponse,
} from '../src/index.ts';
import type { Service } from '../src/index.ts';
import { DependencyHttpError, DependencyPolicy, HTTP_BODY_BYTES_MAX, httpCall } from '@ledgerline/resilience';
import { createServer as createHttpServer } from 'node:http';

const config = loadConfig(baseConfigSchema, { BODY_LIMIT_BYTES: '2048' });
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Log lines, parsed, so tests can assert on what an operator would see. */
const logLines: Array<Record<string, unknown>> = [];
const logStream = new Writable({
  write(chunk: Buffer, _encoding, done) {
    logLines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
    done();
  },
});

let app: Service;
/** Bodies the /echo handler received: a refused body must never get there. */
let echoed = 0;
/** Nothing listens on port 1: connecting is refused at once. */
const refusedPool = new pg.Pool({ host: '127.0.0.1', port: 1, user: 'postgres', database: 'none', connectionTimeoutMillis: 500 });
/** The server is there, the database is not: PostgreSQL refuses the session with FATAL 3D000. */
const missingDatabasePool = new pg.Pool({ host: '127.0.0.1', port: 5432, user: 'postgres', database: 'll_no_such_database', max: 1 });
/** A real database whose locks and statements time out; `holder` keeps the lock they wait for. */
const busyPool = new pg.Pool({ host: '127.0.0.1', port: 5432, user: 'postgres', database: 'test', max: 2 });
const BUSY_LOCK = 7_150_301;
let holder: pg.PoolClient | null = null;
for (const pool of [refusedPool, missingDatabasePool, busyPool]) pool.on('error', () => {});
/** A dependency that accepts each connection and closes it before answering. */
const resetServer = createTcpServer((socket) => { socket.destroy(); });
/** A dependency whose answer is larger than httpCall reads. */
const hugeServer = createHttpServer((_request, response) => {
  response.writeHead(200, { 'content-length': String(HTTP_BODY_BYTES_MAX + 1) }).end(Buffer.alloc(HTTP_BODY_BYTES_MAX + 1, 0x61));
});

before(async () => {
  app = await createService({
    config,
    openapi: { title: 'test', version: '0.0.0' },
    logger: pino({ level: 'error' }, logStream),
  });
  app.post(
    '/transfers',
    {
      schema: {
        body: Type.Object(
          { amountMinor: Type.Integer({ minimum: 1 }), currency: Type.String({ pattern: '^[A-Z]{3}$' }) },
          { additionalProperties: false },
        ),
        querystring: Type.Object({ dryRun: Type.Boolean({ default: false }), limit: Type.Integer({ default: 10 }) }),
        response: { 201: Type.Object({ amountMinor: Type.Integer(), dryRun: Type.Boolean(), limit: Type.Integer() }), 400: ProblemResponse },
      },
    },
    (request, reply) => {
      reply.code(201);
      return { amountMinor: request.body.amountMinor, dryRun: request.query.dryRun, limit: request.query.limit };
    },
  );
  app.get(
    '/accounts/:id',
    { schema: { params: Type.Object({ id: Type.String() }), response: { 200: Type.Object({}), 409: ProblemResponse } } },
    (request) => {
      throw problem(409, {
        type: problemType('account-frozen'),
        title: 'Account frozen',
        detail: `Account ${request.params.id} is frozen.`,
        accountId: request.params.id,
      });
    },
  );
  // A route whose clients switch on an extra member (as OAuth2 clients switch on `error`).
  app.post(
    '/token',
    {
      config: { clientProblemExtensions: (answer) => ({ error: answer.status === 415 ? 'unsupported_media' : 'invalid_request', status: 999, errors: 'overridden?' }) },
      schema: { body: Type.Object({ grant: Type.String() }, { additionalProperties: false }), response: { 200: Type.Object({}), 409: ProblemResponse } },
    },
    (request) => {
      if (request.body.grant === 'taken') throw problem(409, { type: problemType('taken'), title: 'Taken', detail: 'Taken.', error: 'conflict' });
      return {};
    },
  );
  app.post(
    '/token-broken',
    {
      config: {
        clientProblemExtensions: () => {
          throw new Error('a bug in the route\'s function');
        },
      },
      schema: { body: Type.Object({ grant: Type.String() }), response: { 200: Type.Object({}) } },
    },
    () => ({}),
  );
  app.post('/echo', { schema: { body: Type.Unknown(), response: { 200: Type.Object({ body: Type.Unknown() }) } } }, (request) => {
    echoed += 1;
    return { body: request.body };
  });
  app.get(
    '/records/:seq',
    {
      schema: {
        params: Type.Object({ seq: Type.Integer({ minimum: 0 }) }),
        querystring: Type.Object({ rate: Type.Optional(Type.Number()), exact: Type.Optional(Type.Boolean()), order: Type.Optional(Type.Enum(['asc', 'desc', 1])) }),
        response: { 200: Type.Object({ seq: Type.Integer(), rate: Type.Optional(Type.Number()), exact: Type.Optional(Type.Boolean()), order: Type.Optional(Type.Union([Type.String(), Type.Integer()])) }) },
      },
    },
    (request) => ({ seq: request.params.seq, ...request.query }),
  );
  app.get('/db/refused', { schema: { response: { 200: Type.Object({}) } } }, async () => {
    await refusedPool.query('SELECT 1');
    return {};
  });
  holder = await busyPool.connect();
  await holder.query('SELECT pg_advisory_lock($1)', [BUSY_LOCK]);
  app.get('/db/lock-timeout', { schema: { response: { 200: Type.Object({}) } } }, async () => {
    const c = await busyPool.connect();
    try {
      await c.query("SET lock_timeout = '20ms'");
      await c.query('SELECT pg_advisory_lock($1)', [BUSY_LOCK]);
      return {};
    } finally {
      await c.query('RESET lock_timeout').catch(() => {});
      c.release();
    }
  });
  app.get('/db/statement-timeout', { schema: { response: { 200: Type.Object({}) } } }, async () => {
    const c = await busyPool.connect();
    try {
      await c.query("SET statement_timeout = '20ms'");
      await c.query('SELECT pg_sleep(1)');
      return {};
    } finally {
      await c.query('RESET statement_timeout').catch(() => {});
      c.release();
    }
  });
  app.get('/db/missing', { schema: { response: { 200: Type.Object({}) } } }, async () => {
    await missingDatabasePool.query('SELECT 1');
    return {};
  });
  // Dependencies behind @ledgerline/resilience policies, with no fallback in the handler: one
  // whose breaker is open, one slower than the deadline, one answering 503.
  const tripped = new DependencyPolicy({ name: 'fx-rates', attemptTimeoutMs: 1000, callTimeoutMs: 1000, retry: false, bulkhead: false, breaker: { window: { kind: 'count', calls: 1 }, minimumCalls: 1, failureRateThreshold: 0.5, slowCallRateThreshold: 1, slowCallDurationMs: Infinity, openWaitMs: 3_600_000, halfOpenPermittedCalls: 1 } });
  await tripped.execute(() => Promise.reject(new Error('down'))).catch(() => {});
  app.get('/dep/open', { schema: { response: { 200: Type.Object({}) } } }, async () => tripped.execute(() => Promise.resolve({})));
  const slow = new DependencyPolicy({ name: 'slow-ledger', attemptTimeoutMs: 20, callTimeoutMs: 20, retry: false, bulkhead: false, breaker: false });
  app.get('/dep/slow', { schema: { response: { 200: Type.Object({}) } } }, async () => slow.execute(({ signal }) => new Promise((resolve) => {
    const timer = setTimeout(() => resolve({}), 5000);
    signal.addEventListener('abort', () => clearTimeout(timer));
  })));
  const failing = new DependencyPolicy({ name: 'bank-gateway', attemptTimeoutMs: 1000, callTimeoutMs: 1000, retry: false, bulkhead: false, breaker: false });
  app.get('/dep/5xx', { schema: { response: { 200: Type.Object({}) } } }, async () => failing.execute(() => Promise.reject(new DependencyHttpError('bank-gateway', 503))));
  // Real sockets: a port bound then closed refuses; a server that resets each connection.
  const gone = createTcpServer().listen(0, '127.0.0.1');
  await once(gone, 'listening');
  const refusedPort = (gone.address() as AddressInfo).port;
  gone.close();
  await once(gone, 'close');
  resetServer.listen(0, '127.0.0.1');
  await once(resetServer, 'listening');
  const resetPort = (resetServer.address() as AddressInfo).port;
  hugeServer.listen(0, '127.0.0.1');
  await once(hugeServer, 'listening');
  const hugePort = (hugeServer.address() as AddressInfo).port;
  app.get('/dep/too-large', { schema: { response: { 200: Type.Object({}) } } }, async () => {
    await httpCall(failing, `http://127.0.0.1:${hugePort}/statement`);
    return {};
  });
  app.get('/dep/refused', { schema: { response: { 200: Type.Object({}) } } }, async () => {
    await httpCall(failing, `http://127.0.0.1:${refusedPort}/rates`);
    return {};
  });
  app.get('/dep/reset', { schema: { response: { 200: Type.Object({}) } } }, async () => {
    await httpCall(failing, `http://127.0.0.1:${resetPort}/rates`);
    return {};
  });
  app.get('/client-gone', { schema: { response: { 200: Type.Object({}) } } }, () => {
    // What Node raises when a client aborts mid-request: ECONNRESET, but with an HTTP status.
    throw Object.assign(new Error('aborted'), { code: 'ECONNRESET', statusCode: 400 });
  });
  app.get('/boom', { schema: { response: { 200: Type.Object({}) } } }, () => {
    throw new Error('connection string postgres://secret@db leaked');
  });
  app.get('/boom-not-an-error', { schema: { response: { 200: Type.Object({}) } } }, () => {
    // eslint-disable-next-line @typescript-eslint/only-throw-error -- the case under test
    throw 'a string, from code that should know better';
  });
});

after(async () => {
  await app.close();
  await refusedPool.end();
  await missingDatabasePool.end();
  holder?.release();
  await busyPool.end();
  resetServer.close();
  hugeServer.close();
});

function assertProblem(
  response: Awaited<ReturnType<Service['inject']>>,
  expected: { status: number; type: string; title: string; instance: string },
): Record<string, unknown> {
  assert.equal(response.statusCode, expected.status);
  assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
  const body = response.json<Record<string, unknown>>();
  assert.equal(body.type, expected.type);
  assert.equal(body.title, expected.title);
  assert.equal(body.status, expected.status);
  assert.equal(typeof body.detail, 'string');
  assert.equal(body.instance, expected.instance);
  assert.equal(body.request_id, response.headers['x-request-id']);
  return body;
}

describe('problem+json errors', () => {
  it('accepts a valid body and coerces the querystring, filling defaults', async () => {
    const ok = await app.inject({ method: 'POST', url: '/transfers?limit=5', payload: { amountMinor: 100, currency: 'EUR' } });
    assert.equal(ok.statusCode, 201);
    assert.deepEqual(ok.json(), { amountMinor: 100, dryRun: false, limit: 5 });
  });

  it('rejects a body that fails the schema, listing each failure, and never coerces bodies', async () => {
    const response = await app.inject({
      method: 'POST',
      url: '/transfers',
      payload: { amountMinor: '12', currency: 'eur', memo: 'x' },
    });
    const body = assertProblem(response, {
      status: 400,
      type: 'https://ledgerline.dev/problems/validation-error',
      title: 'Validation failed',
      instance: '/transfers',
    });
    assert.deepEqual(body.errors, [
      { in: 'body', path: '/memo', message: 'is not allowed' },
      { in: 'body', path: '/amountMinor', message: 'must be integer' },
      { in: 'body', path: '/currency', message: 'must match pattern "^[A-Z]{3}$"' },
    ]);
  });

  it('points a missing property at the property itself', async () => {
    const response = await app.inject({ method: 'POST', url: '/transfers', payload: { currency: 'EUR' } });
    const body = assertProblem(response, {
      status: 400,
      type: 'https://ledgerline.dev/problems/validation-error',
      title: 'Validation failed',
      instance: '/transfers',
    });
    assert.deepEqual(body.errors, [{ in: 'body', path: '/amountMinor', message: 'is required' }]);
  });

  it('reports querystring failures with their location', async () => {
    const response = await app.inject({
      method: 'POST',
      url: '/transfers?limit=ten',
      payload: { amountMinor: 1, currency: 'EUR' },
    });
    const body = assertProblem(response, {
      status: 400,
      type: 'https://ledgerline.dev/problems/validation-error',
      title: 'Validation failed',
      instance: '/transfers?limit=ten',
    });
    assert.deepEqual(body.errors, [{ in: 'querystring', path: '/limit', message: 'must be integer' }]);
  });

  it('answers malformed JSON with 400', async () => {
    const response = await app.inject({
      method: 'POST',
      url: '/transfers',
      headers: { 'content-type': 'application/json' },
      payload: '{"amountMinor": 1,',
    });
    assertProblem(response, {
      status: 400,
      type: 'https://ledgerline.dev/problems/malformed-json',
      title: 'Malformed JSON',
      instance: '/transfers',
    });
    const empty = await app.inject({
      method: 'POST',
      url: '/transfers',
      headers: { 'content-type': 'application/json' },
      payload: '',
    });
    assertProblem(empty, {
      status: 400,
      type: 'https://ledgerline.dev/problems/malformed-json',
      title: 'Malformed JSON',
      instance: '/transfers',
    });
  });

  it('answers a body over the limit with 413', async () => {
    const response = await app.inject({
      method: 'POST',
      url: '/transfers',
      payload: { amountMinor: 1, currency: 'EUR', pad: 'x'.repeat(4096) },
    });
    const body = assertProblem(response, {
      status: 413,
      type: 'about:blank',
      title: 'Payload Too Large',
      instance: '/transfers',
    });
    assert.equal(body.detail, 'The request body exceeds the limit of 2048 bytes.');
  });

  it('answers an unsupported media type with 415', async () => {
    const response = await app.inject({
      method: 'POST',
      url: '/transfers',
      headers: { 'content-type': 'application/xml' },
      payload: '<transfer/>',
    });
    assertProblem(response, {
      status: 415,
      type: 'about:blank',
      title: 'Unsupported Media Type',
      instance: '/transfers',
    });
  });

  it('answers an unknown route with 404', async () => {
    const response = await app.inject({ method: 'GET', url: '/nowhere?x=1' });
    assertProblem(response, { status: 404, type: 'about:blank', title: 'Not Found', instance: '/nowhere?x=1' });
  });

  it('answers a known path with the wrong method with 405 and an Allow header', async () => {
    const response = await app.inject({ method: 'DELETE', url: '/accounts/acc-1' });
    assertProblem(response, {
      status: 405,
      type: 'about:blank',
      title: 'Method Not Allowed',
      instance: '/accounts/acc-1',
    });
    assert.equal(response.headers.allow, 'GET, HEAD');
  });

  it('answers a malformed URL with 400', async () => {
    const response = await app.inject({ method: 'GET', url: '/accounts/%E0%A4%A' });
    assertProblem(response, { status: 400, type: 'about:blank', title: 'Bad Request', instance: '/accounts/%E0%A4%A' });
  });

  it('answers a thrown HttpProblem with its status, type and extensions', async () => {
    const response = await app.inject({ method: 'GET', url: '/accounts/acc-1' });
    const body = assertProblem(response, {
      status: 409,
      type: 'https://ledgerline.dev/problems/account-frozen',
      title: 'Account frozen',
      instance: '/accounts/acc-1',
    });
    assert.equal(body.detail, 'Account acc-1 is frozen.');
    assert.equal(body.accountId, 'acc-1');
  });

  it('answers an unexpected error with a generic 500 and logs it with the request id', async () => {
    logLines.length = 0;
    const response = await app.inject({ method: 'GET', url: '/boom', headers: { 'x-request-id': 'req-boom-1' } });
    const body = assertProblem(response, {
      status: 500,
      type: 'about:blank',
      title: 'Internal Server Error',
      instance: '/boom',
    });
    assert.equal(body.request_id, 'req-boom-1');
    assert.doesNotMatch(response.body, /secret/);
    const logged = logLines.find((line) => line.request_id === 'req-boom-1' && line.level === 50);
    assert.ok(logged, 'the error is logged at error level with the request id');
    assert.match((logged.err as { message: string }).message, /leaked/);
  });

  it('answers a thrown non-Error with a generic 500 too', async () => {
    const response = await app.inject({ method: 'GET', url: '/boom-not-an-error' });
    assertProblem(response, {
      status: 500,
      type: 'about:blank',
      title: 'Internal Server Error',
      instance: '/boom-not-an-error',
    });
    assert.doesNotMatch(response.body, /should know better/);
  });
});

describe('a route\'s clientProblemExtensions', () => {
  it('adds its members to the client errors the runtime answers, never over the problem\'s own, and leaves a handler\'s problems alone', async () => {
    const invalid = await app.inject({ method: 'POST', url: '/token', payload: { grant: 1 } });
    const body = assertProblem(invalid, { status: 400, type: 'https://ledgerline.dev/problems/validation-error', title: 'Validation failed', instance: '/token' });
    assert.equal(body.error, 'invalid_request');
    assert.ok(Array.isArray(body.errors), 'the validation issues stay');
    const malformed = await app.inject({ method: 'POST', url: '/token', headers: { 'content-type': 'application/json' }, payload: '{"grant":' });
    assert.equal(malformed.json<Record<string, unknown>>().error, 'invalid_request');
    const media = await app.inject({ method: 'POST', url: '/token', headers: { 'content-type': 'application/xml' }, payload: '<grant/>' });
    assert.deepEqual([media.statusCode, media.json<Record<string, unknown>>().error, media.json<Record<string, unknown>>().status], [415, 'unsupported_media', 415]);
    const handled = await app.inject({ method: 'POST', url: '/token', payload: { grant: 'taken' } });
    assert.equal(handled.json<Record<string, unknown>>().error, 'conflict');
    // A function that throws costs its members, not the answer.
    const broken = await app.inject({ method: 'POST', url: '/token-broken', payload: { grant: 1 } });
    assertProblem(broken, { status: 400, type: 'https://ledgerline.dev/problems/validation-error', title: 'Validation failed', instance: '/token-broken' });
    assert.ok(logLines.some((l) => l.msg === 'clientProblemExtensions failed'));
    // Other routes are untouched.
    const other = await app.inject({ method: 'POST', url: '/transfers', payload: { amountMinor: 0, currency: 'EUR' } });
    assert.equal(other.json<Record<string, unknown>>().error, undefined);
  });
});

describe('request ids', () => {
  it('echoes a sane incoming x-request-id', async () => {
    const id = 'gw.2f9c-01_A';
    const response = await app.inject({ method: 'GET', url: '/health', headers: { 'x-request-id': id } });
    assert.equal(response.headers['x-request-id'], id);
  });

  it('replaces a missing, oversized or unsafe x-request-id with a UUID', async () => {
    for (const incoming of [undefined, 'a'.repeat(129), 'has space', 'new\\nline', '']) {
      const headers = incoming === undefined ? {} : { 'x-request-id': incoming };
      const response = await app.inject({ method: 'GET', url: '/health', headers });
      assert.match(String(response.headers['x-request-id']), UUID, String(incoming));
    }
  });

  it('accepts the longest allowed id', async () => {
    const id = 'a'.repeat(128);
    const response = await app.inject({ method: 'GET', url: '/health', headers: { 'x-request-id': id } });
    assert.equal(response.headers['x-request-id'], id);
  });
});

describe('HttpProblem', () => {
  it('rejects statuses that are not errors and extensions that shadow standard members', () => {
    assert.throws(() => problem(200, { title: 'OK', detail: 'fine' }), RangeError);
    assert.throws(() => problem(400, { title: 'x', detail: 'y', status: 500 }), /"status" is reserved/);
    assert.throws(() => problemType('Not Kebab'), TypeError);
    const plain = new HttpProblem(503, { title: 'Service Unavailable', detail: 'try later' });
    assert.equal(plain.type, 'about:blank');
    assert.equal(plain.message, 'try later');
  });

  it('refuses routes without a response schema', async () => {
    const bare = await createService({ config, openapi: { title: 'bare', version: '0' }, logger: false });
    try {
      assert.throws(() => bare.get('/bare', () => ({})), /GET \/bare: a response schema is required/);
    } finally {
      await bare.close();
    }
  });
});

const MALFORMED_JSON = 'https://ledgerline.dev/problems/malformed-json';

function postJson(url: string, payload: string | Buffer) {
  return app.inject({ method: 'POST', url, headers: { 'content-type': 'application/json' }, payload });
}

describe('JSON bodies: UTF-8, one name per member, no prototype poisoning', () => {
  it('refuses a member named twice, naming it by its JSON Pointer, before any handler runs', async () => {
    const before = echoed;
    const cases: Array<[string, string]> = [
      ['{"amountMinor":1,"currency":"EUR","amountMinor":7}', '/amountMinor'],
      // The same name however it is spelled: an escape decodes to the same string.
      ['{"currency":"EUR","\\u0063urrency":"USD"}', '/currency'],
      ['{"list":[{"a":1},{"x/y":1,"b":2,"x/y":2}]}', '/list/1/x~1y'],
      ['{"m":{"~":{"k":"v","k":"w"}}}', '/m/~0/k'],
    ];
    for (const [payload, path] of cases) {
      const response = await postJson('/echo', payload);
      const body = assertProblem(response, { status: 400, type: MALFORMED_JSON, title: 'Malformed JSON', instance: '/echo' });
      assert.deepEqual(body.errors, [{ in: 'body', path, message: 'is a duplicate member name' }], payload);
      assert.match(String(body.detail), /more than once/);
    }
    assert.equal(echoed, before, 'no handler saw a refused body');
    // On a route with a schema too: the parser answers before validation.
    const transfer = await postJson('/transfers', '{"amountMinor":"abc","currency":"EUR","amountMinor":7}');
    assert.deepEqual(transfer.json<Record<string, unknown>>().errors, [{ in: 'body', path: '/amountMinor', message: 'is a duplicate member name' }]);
    // And a route's clientProblemExtensions apply, as to any client error the runtime answers.
    const token = await postJson('/token', '{"grant":"a","grant":"b"}');
    assert.deepEqual([token.statusCode, token.json<Record<string, unknown>>().error], [400, 'invalid_request']);
  });

  it('accepts the same name in different objects, and every other JSON value as before', async () => {
    const payload = { a: { id: 1 }, b: [{ id: 2 }, { id: 3, a: { id: 4 } }], id: 'top', text: 'é \u2028 \ud83d\ude00', n: null };
    const response = await postJson('/echo', JSON.stringify(payload));
    assert.equal(response.statusCode, 200, response.body);
    assert.deepEqual(response.json(), { body: payload });
    for (const scalar of ['1', '"x"', 'true', 'null', '[]', '{}', ' [1, [2, {"a": {}}]] ']) {
      assert.equal((await postJson('/echo', scalar)).statusCode, 200, scalar);
    }
  });

  it('refuses bytes that are not UTF-8 instead of storing U+FFFD', async () => {
    const before = echoed;
    const json = (bytes: number[]) => Buffer.concat([Buffer.from('{"note":"a'), Buffer.from(bytes), Buffer.from('b"}')]);
    // A stray byte, a truncated sequence, an overlong '/', an encoded surrogate, beyond U+10FFFF.
    for (const bytes of [[0xff], [0xc3], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80]]) {
      const response = await postJson('/echo', json(bytes));
      const body = assertProblem(response, { status: 400, type: MALFORMED_JSON, title: 'Malformed JSON', instance: '/echo' });
      assert.equal(body.detail, 'The request body is not valid UTF-8.', bytes.join(' '));
    }
    assert.equal(echoed, before);
    const valid = await postJson('/echo', json([0xc3, 0xa9, 0xf0, 0x9f, 0x98, 0x80]));
    assert.deepEqual(valid.json(), { body: { note: 'aé😀b' } });
    // A leading byte-order mark is ignored, as Fastify's own parser ignored it.
    assert.deepEqual((await postJson('/echo', Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('{"a":1}')]))).json(), { body: { a: 1 } });
  });

  it('still refuses __proto__ members and constructor.prototype, however they are spelled', async () => {
    for (const payload of ['{"__proto__":{"admin":true}}', '{"a":[{"\\u005f_proto__":{}}]}', '{"constructor":{"prototype":{"admin":true}}}']) {
      const response = await postJson('/echo', payload);
      assertProblem(response, { status: 400, type: MALFORMED_JSON, title: 'Malformed JSON', instance: '/echo' });
    }
  });

  it('answers text/plain, which is no longer parsed, with 415', async () => {
    const response = await app.inject({ method: 'POST', url: '/echo', headers: { 'content-type': 'text/plain' }, payload: '{"a":1}' });
    assertProblem(response, { status: 415, type: 'about:blank', title: 'Unsupported Media Type', instance: '/echo' });
  });
});

/** RFC 6901: one reference token. */
const token = (name: string) => `/${name.replaceAll('~', '~0').replaceAll('/', '~1')}`;
type Json = null | boolean | number | string | Json[] | { [name: string]: Json };
type Spelling = 'plain' | 'escaped';

/** A string literal: as JSON.stringify writes it, or with every code unit as \uXXXX. */
function stringLiteral(s: string, spelling: Spelling): string {
  if (spelling === 'plain') return JSON.stringify(s);
  let out = '"';
  for (let i = 0; i < s.length; i += 1) out += `\\u${s.charCodeAt(i).toString(16).padStart(4, '0')}`;
  return `${out}"`;
}

interface Injection {
  target: object;
  name: string;
  value: Json;
  /** 1 when the target already has the name, else 2. */
  copies: number;
  positions: readonly number[];
  spelling: Spelling;
}

/** JSON text for `value`, member names spelled as asked, with `injection`'s members added to its target. */
function serialize(value: Json, spelling: Spelling, injection?: Injection): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map((item) => serialize(item, spelling, injection)).join(', ')}]`;
  const members = Object.entries(value).map(([name, member]) => `${stringLiteral(name, spelling)}: ${serialize(member, spelling, injection)}`);
  if (injection?.target === value) {
    for (let copy = 0; copy < injection.copies; copy += 1) {
      const at = (injection.positions[copy] ?? 0) % (members.length + 1);
      members.splice(at, 0, `${stringLiteral(injection.name, injection.spelling)}:${serialize(injection.value, spelling)}`);
    }
  }
  return `{${members.join(', ')}}`;
}

/** Every object in `value` with its JSON Pointer. */
function objectsOf(value: Json, pointer = ''): Array<{ node: { [name: string]: Json }; pointer: string }> {
  if (value === null || typeof value !== 'object') return [];
  if (Array.isArray(value)) return value.flatMap((item, index) => objectsOf(item, `${pointer}/${index}`));
  return [{ node: value, pointer }, ...Object.entries(value).flatMap(([name, member]) => objectsOf(member, `${pointer}${token(name)}`))];
}

describe('findDuplicateMember (property tests)', () => {
  // Names with escapes, quotes, backslashes, line separators and lone surrogates as well as plain ones.
  const jsonValue = fc.oneof(fc.jsonValue({ maxDepth: 4, stringUnit: 'binary' }), fc.jsonValue({ maxDepth: 4, stringUnit: 'binary-ascii' })) as fc.Arbitrary<Json>;
  const name = fc.oneof(fc.string({ unit: 'binary', maxLength: 8 }), fc.constantFrom('', '"', '\\', '\\"', 'a\\u0062', '~1/', '__proto__', '\u2028', '\ud800'));

  it('never reports a duplicate in JSON without one, however it is spelled', () => {
    fc.assert(
      fc.property(jsonValue, fc.constantFrom<Spelling>('plain', 'escaped'), (value, spelling) => {
        for (const text of [JSON.stringify(value), JSON.stringify(value, null, 2), serialize(value, spelling)]) {
          assert.deepEqual(JSON.parse(text), JSON.parse(JSON.stringify(value)));
          assert.equal(findDuplicateMember(text), undefined, text);
        }
      }),
      { seed: propertySeed('findDuplicateMember: no false positives'), numRuns: 500 },
    );
  });

  it('always finds an injected duplicate, in the object it was put in', () => {
    fc.assert(
      fc.property(
        jsonValue,
        fc.nat(),
        fc.option(fc.nat(), { nil: undefined }),
        name,
        jsonValue,
        fc.tuple(fc.nat(), fc.nat()),
        fc.constantFrom<Spelling>('plain', 'escaped'),
        fc.constantFrom<Spelling>('plain', 'escaped'),
        (inner, which, existing, fresh, value, positions, spelling, injectedSpelling) => {
          // Wrapped, so that there is always an object to put the duplicate in.
          const root: Json = { v: inner };
          const objects = objectsOf(root);
          const { node, pointer } = objects[which % objects.length]!;
          const names = Object.keys(node);
          const duplicated = existing !== undefined && names.length > 0 ? names[existing % names.length]! : fresh;
          const copies = Object.hasOwn(node, duplicated) ? 1 : 2;
          const text = serialize(root, spelling, { target: node, name: duplicated, value, copies, positions, spelling: injectedSpelling });
          JSON.parse(text); // still JSON
          assert.deepEqual(findDuplicateMember(text), { objectPointer: pointer, name: duplicated, pointer: `${pointer}${token(duplicated)}` }, text);
        },
      ),
      { seed: propertySeed('findDuplicateMember: injected duplicates'), numRuns: 500 },
    );
  });
});

describe('text in the querystring and the path: only exact spellings are converted', () => {
  it('converts an integer, a number and a boolean spelled exactly', async () => {
    const ok = await app.inject({ method: 'GET', url: '/records/12?rate=-1.5e2&exact=false&order=1' });
    assert.equal(ok.statusCode, 200, ok.body);
    assert.deepEqual(ok.json(), { seq: 12, rate: -150, exact: false, order: 1 });
    assert.deepEqual((await app.inject({ method: 'GET', url: '/records/9007199254740991?order=asc' })).json(), { seq: 9007199254740991, order: 'asc' });
    const limit = await app.inject({ method: 'POST', url: '/transfers?limit=-3&dryRun=true', payload: { amountMinor: 1, currency: 'EUR' } });
    assert.deepEqual(limit.json(), { amountMinor: 1, dryRun: true, limit: -3 });
  });

  it('leaves any other text as text, so that validation refuses it and names the field', async () => {
    const cases: Array<[string, string, string, string]> = [
      ...['1.9', 'true', '0x10', '1e2', '%2B5', '', '%205', '01', '-0', '1_000', '9007199254740992', 'Infinity'].map(
        (limit): [string, string, string, string] => [`/transfers?limit=${limit}`, 'querystring', '/limit', 'must be integer'],
      ),
      ...['1', '0', 'TRUE', 'yes', ''].map((dryRun): [string, string, string, string] => [`/transfers?dryRun=${dryRun}`, 'querystring', '/dryRun', 'must be boolean']),
      ['/records/1.5', 'params', '/seq', 'must be integer'],
      ['/records/0x10', 'params', '/seq', 'must be integer'],
      ['/records/1?rate=0x10', 'querystring', '/rate', 'must be number'],
      ['/records/1?rate=%2B1', 'querystring', '/rate', 'must be number'],
      ['/records/1?rate=1e999', 'querystring', '/rate', 'must be number'],
      ['/records/1?rate=.5', 'querystring', '/rate', 'must be number'],
    ];
    for (const [url, part, path, message] of cases) {
      const response = url.startsWith('/transfers')
        ? await app.inject({ method: 'POST', url, payload: { amountMinor: 1, currency: 'EUR' } })
        : await app.inject({ method: 'GET', url });
      const body = assertProblem(response, { status: 400, type: 'https://ledgerline.dev/problems/validation-error', title: 'Validation failed', instance: url });
      const issues = body.errors as Array<{ in: string; path: string; message: string }>;
      assert.ok(issues.some((issue) => issue.in === part && issue.path === path && issue.message === message), `${url}: ${JSON.stringify(issues)}`);
    }
  });
});

describe('a database that cannot be reached', () => {
  it('is a 503 with Retry-After, not a 500, whether the connection is refused or the server ends the session', async () => {
    for (const url of ['/db/refused', '/db/missing']) {
      logLines.length = 0;
      const response = await app.inject({ method: 'GET', url });
      const body = assertProblem(response, { status: 503, type: 'https://ledgerline.dev/problems/database-unavailable', title: 'Database unavailable', instance: url });
      assert.equal(response.headers['retry-after'], '1', url);
      assert.doesNotMatch(String(body.detail), /ECONNREFUSED|ll_no_such_database/, 'no internals in the answer');
      assert.ok(!logLines.some((line) => line.msg === 'unhandled error'), 'not logged as a bug (it is a warning)');
    }
  });

  it('a lock or statement timeout is a 503 with Retry-After, database busy, not a 500', async () => {
    for (const url of ['/db/lock-timeout', '/db/statement-timeout']) {
      logLines.length = 0;
      const response = await app.inject({ method: 'GET', url });
      const body = assertProblem(response, { status: 503, type: 'https://ledgerline.dev/problems/database-unavailable', title: 'Database busy', instance: url });
      assert.equal(response.headers['retry-after'], '1', url);
      assert.doesNotMatch(String(body.detail), /advisory|pg_sleep|canceling/, 'no internals in the answer');
      assert.ok(!logLines.some((line) => line.msg === 'unhandled error'), `${url}: not logged as a bug`);
    }
  });

  it('leaves an error of the HTTP layer that carries ECONNRESET a 500', async () => {
    const response = await app.inject({ method: 'GET', url: '/client-gone' });
    assert.equal(response.statusCode, 500);
  });
});

describe('a dependency that fails, with no fallback', () => {
  it('is a 503 with Retry-After when it cannot have done anything (not called, answered 503, refused the connection); a 503 or, past the deadline, 504 saying the request may have taken effect when it was reached (the connection broke, the answer was too large); never a 500', async () => {
    const cases = [['/dep/open', 503, false], ['/dep/5xx', 503, false], ['/dep/refused', 503, false], ['/dep/reset', 503, true], ['/dep/too-large', 503, true], ['/dep/slow', 504, true]] as const;
    for (const [url, status, reached] of cases) {
      logLines.length = 0;
      const response = await app.inject({ method: 'GET', url });
      const body = assertProblem(response, { status, type: 'https://ledgerline.dev/problems/dependency-unavailable', title: status === 504 ? 'Dependency timed out' : 'Dependency unavailable', instance: url });
      assert.equal(response.headers['retry-after'], reached ? undefined : '1', url);
      if (reached) assert.match(String(body.detail), /may have taken effect/, url);
      else assert.match(String(body.detail), /Retry after the Retry-After delay/, url);
      assert.doesNotMatch(String(body.detail), /fx-rates|slow-ledger|bank-gateway|ECONNREFUSED|UND_ERR/, 'the dependency is named in the log, not in the answer');
      assert.ok(!logLines.some((line) => line.msg === 'unhandled error'), `${url}: not logged as a bug`);
    }
  });
});

/** Raw bytes to the server; the answer as text once the server closes the connection. */
function rawExchange(port: number, request: string): Promise<{ text: string; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ text: Buffer.concat(chunks).toString('latin1'), closed: false });
    }, 5000);
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', reject);
    socket.on('close', () => {
      clearTimeout(timer);
      resolve({ text: Buffer.concat(chunks).toString('latin1'), closed: true });
    });
    socket.write(request);
  });
}

describe("requests Node's HTTP parser refuses", () => {
  let port: number;
  before(async () => {
    await app.listen({ port: 0, host: '127.0.0.1' });
    const address = app.server.address();
    assert.ok(address !== null && typeof address === 'object');
    port = address.port;
  });

  it('answer problem+json and close the connection', async () => {
    const before = echoed;
    const cases: Array<[string, string, number]> = [
      ['headers over 16 KiB', `GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 431],
      ['a malformed request line', 'GARBAGE\r\n\r\n', 400],
      ['two Content-Lengths', 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}', 400],
      ['a bad chunk size', 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n', 400],
      ['a control character in a header', 'GET /health HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\x01b\r\n\r\n', 400],
    ];
    for (const [what, request, status] of cases) {
      const { text, closed } = await rawExchange(port, request);
      assert.ok(closed, `${what}: the server closed the connection`);
      const [head = '', body = ''] = text.split('\r\n\r\n');
      assert.match(head, new RegExp(`^HTTP/1\\.1 ${status} `), `${what}: ${text.slice(0, 200)}`);
      assert.match(head, /\r\ncontent-type: application\/problem\+json\r\n/i, what);
      assert.match(head, /\r\nconnection: close/i, what);
      const problemBody = JSON.parse(body) as Record<string, unknown>;
      assert.equal(problemBody.type, 'about:blank', what);
      assert.equal(problemBody.status, status, what);
      assert.equal(typeof problemBody.title, 'string', what);
      assert.ok(typeof problemBody.detail === 'string' && problemBody.detail.length > 0, what);
      assert.equal(Number(/\r\ncontent-length: (\d+)/i.exec(head)?.[1]), Buffer.byteLength(body), `${what}: the body is whole`);
    }
    assert.equal(echoed, before, 'nothing reached a handler');
  });

  it('an HTTP/1.1 request without Host, or with an Expect it cannot meet, is refused as problem+json, and no handler runs', async () => {
    const before = echoed;
    const noHost = await rawExchange(port, 'POST /echo HTTP/1.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}');
    const [noHostHead = '', noHostBody = ''] = noHost.text.split('\r\n\r\n');
    assert.match(noHostHead, /^HTTP\/1\.1 400 /, noHost.text.slice(0, 200));
    assert.match(noHostHead, /\r\ncontent-type: application\/problem\+json/i);
    assert.deepEqual((JSON.parse(noHostBody) as { errors: unknown }).errors, [{ in: 'headers', path: '/host', message: 'is required in HTTP/1.1 (RFC 9112, section 3.2)' }]);
    const expect = await rawExchange(port, 'POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}');
    const [expectHead = '', expectBody = ''] = expect.text.split('\r\n\r\n');
    assert.ok(expect.closed, 'the connection is closed');
    assert.match(expectHead, /^HTTP\/1\.1 417 /, expect.text.slice(0, 200));
    assert.match(expectHead, /\r\ncontent-type: application\/problem\+json/i);
    assert.equal((JSON.parse(expectBody) as { status: number }).status, 417);
    // HTTP/1.0 needs no Host; Expect: 100-continue is met.
    assert.match((await rawExchange(port, 'GET /health HTTP/1.0\r\n\r\n')).text, /^HTTP\/1\.1 200 /);
    assert.equal(echoed, before, 'nothing reached a handler');
  });
});

import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { pino } from 'pino';
import { Type } from 'typebox';
import {
  baseConfigSchema,
  createService,
  HttpProblem,
  loadConfig,
  problem,
  problemType,
  ProblemResponse,
} from '../src/index.ts';
import type { Service } from '../src/index.ts';

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
  app.get('/boom', { schema: { response: { 200: Type.Object({}) } } }, () => {
    throw new Error('connection string postgres://secret@db leaked');
  });
  app.get('/boom-not-an-error', { schema: { response: { 200: Type.Object({}) } } }, () => {
    // eslint-disable-next-line @typescript-eslint/only-throw-error -- the case under test
    throw 'a string, from code that should know better';
  });
});

after(() => app.close());

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

/**
 * The idempotency plugin against a real, freshly migrated PostgreSQL database: replay,
 * mismatch, in-progress conflicts (with real concurrent requests on a listening server),
 * crash recovery, lease takeover, per-client scoping, what is and is not stored, and pruning
 * with an injected clock.
 */
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { after, before, beforeEach, describe, test } from 'node:test';
import pg from 'pg';
import { Type } from 'typebox';
import { DependencyConnectionError, DependencyHttpError, DependencyPolicy, httpCall } from '@ledgerline/resilience';
import { behindFaultProxy, createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import {
  baseConfigSchema,
  canonicalJson,
  createService,
  IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT,
  IDEMPOTENCY_TTL_MS_DEFAULT,
  idempotency,
  loadConfig,
  migrateRuntime,
  problem,
  problemType,
  ProblemResponse,
  pruneIdempotencyKeys,
  startIdempotencyPruner,
  validationProblem,
  type IdempotencyOptions,
  type Service,
} from '../src/index.ts';
import { IDEMPOTENCY_STATEMENTS_FOR_TESTS as STATEMENTS } from '../src/idempotency.ts';

type Response = Awaited<ReturnType<Service['inject']>>;

const config = loadConfig(baseConfigSchema, {});
const START_MS = Date.UTC(2026, 0, 1);
const PROBLEMS = 'https://ledgerline.dev/problems/';

let db: TestDatabase;
let pool: pg.Pool;
let nowMs = START_MS;
const clock = (): number => nowMs;

before(async () => {
  db = await createTestDatabase('ll_runtime');
  await migrateRuntime(db.url);
  // Applying it again is a no-op, as every instance does at start.
  await migrateRuntime(db.url);
  pool = new pg.Pool({ connectionString: db.url, max: 8 });
});

after(async () => {
  await pool.end();
  await db.drop();
});

beforeEach(async () => {
  nowMs = START_MS;
  await pool.query('TRUNCATE runtime.idempotency_keys, runtime.idempotency_withdrawn_claims');
});

type Run = (query: pg.QueryConfig) => Promise<pg.QueryResult>;

/**
 * The real pool, with every statement passed through `intercept` on its way to PostgreSQL,
 * whether the plugin sends it through `pool.query` or through a client it checked out.
 */
function intercepted(intercept: (query: pg.QueryConfig, run: Run) => Promise<pg.QueryResult>): pg.Pool {
  return {
    query: (query: pg.QueryConfig) => intercept(query, (q) => pool.query(q)),
    connect: async () => {
      const client = await pool.connect();
      return {
        query: (query: pg.QueryConfig) => intercept(query, (q) => client.query(q)),
        release: (error?: Error | boolean) => { client.release(error); },
      };
    },
  } as unknown as pg.Pool;
}

/** A promise the test opens by hand, and a signal that the handler reached it. */
class Gate {
  readonly #entered = Promise.withResolvers<true>();
  readonly #opened = Promise.withResolvers<true>();
  readonly entered = this.#entered.promise;
  arrive(): Promise<true> {
    this.#entered.resolve(true);
    return this.#opened.promise;
  }
  open(): void {
    this.#opened.resolve(true);
  }
}

interface TestApp {
  app: Service;
  runs: Record<string, number>;
  gates: Gate[];
  /** Failures /flaky still has to produce before it succeeds. */
  failures: { left: number };
}

const Thing = Type.Object({ n: Type.Integer(), name: Type.String() });
const ThingBody = Type.Object({ name: Type.String(), amount: Type.Optional(Type.Integer()) }, { additionalProperties: false });
const problems = { 400: ProblemResponse, 409: ProblemResponse, 422: ProblemResponse, 429: ProblemResponse, 500: ProblemResponse, 503: ProblemResponse };

async function buildApp(options: Partial<IdempotencyOptions> = {}): Promise<TestApp> {
  const app = await createService({ config, openapi: { title: 'idempotency test', version: '0.0.0' }, logger: false });
  await app.register(idempotency, { pool, now: clock, ...options });
  const runs: Record<string, number> = {};
  const gates: Gate[] = [];
  const failures = { left: 1 };
  const ran = (name: string): number => (runs[name] = (runs[name] ?? 0) + 1);

  app.post('/v1/things', { schema: { body: ThingBody, response: { 201: Thing, ...problems } } }, (request, reply) => {
    const n = ran('things');
    // Only content-type and location may be replayed; the others belong to this exchange.
    reply.header('location', `/v1/things/${n}`).header('x-secret', 'first-only').header('set-cookie', 'session=abc');
    reply.code(201);
    return { n, name: request.body.name };
  });
  app.put(
    '/v1/things/:id',
    { config: { idempotent: true }, schema: { params: Type.Object({ id: Type.String() }), body: ThingBody, response: { 200: Thing, ...problems } } },
    (request) => ({ n: ran('put'), name: `${request.params.id}:${request.body.name}` }),
  );
  app.get('/v1/things', { schema: { response: { 200: Thing } } }, () => ({ n: ran('get'), name: 'list' }));
  app.post(
    '/v1/unrecorded',
    { config: { idempotent: false }, schema: { body: ThingBody, response: { 201: Thing } } },
    (request, reply) => {
      reply.code(201);
      return { n: ran('unrecorded'), name: request.body.name };
    },
  );
  app.post('/v1/reject', { schema: { body: ThingBody, response: problems } }, () => {
    ran('reject');
    throw problem(422, { type: problemType('thing-rejected'), title: 'Thing rejected', detail: 'Never.' });
  });
  app.post('/v1/flaky', { schema: { body: ThingBody, response: { 201: Thing, ...problems } } }, (request, reply) => {
    const n = ran('flaky');
    if (failures.left > 0) {
      failures.left--;
      throw new Error('boom');
    }
    reply.code(201);
    return { n, name: request.body.name };
  });
  app.post('/v1/unavailable', { schema: { body: ThingBody, response: problems } }, (_request, reply) => {
    ran('unavailable');
    reply.header('retry-after', '1');
    throw problem(503, { title: 'Unavailable', detail: 'Try again.' });
  });
  // A handler's own check of what the schema cannot say, before it does anything.
  app.post('/v1/checked', { schema: { body: ThingBody, response: { 201: Thing, ...problems } } }, (request, reply) => {
    if (request.body.amount === undefined) throw validationProblem('body', '/amount', 'is required here');
    reply.code(201);
    return { n: ran('checked'), name: request.body.name };
  });
  app.post('/v1/limited', { schema: { body: ThingBody, response: problems } }, () => {
    ran('limited');
    throw problem(429, { title: 'Too Many Requests', detail: 'Slow down.' });
  });
  app.post('/v1/slow', { schema: { body: ThingBody, response: { 201: Thing, ...problems } } }, async (request, reply) => {
    const n = ran('slow');
    const gate = gates.shift();
    assert.ok(gate !== undefined, 'the test must queue a gate for every slow request');
    await gate.arrive();
    reply.code(201);
    return { n, name: request.body.name };
  });
  app.post('/v1/big', { schema: { body: ThingBody, response: { 201: Thing } } }, (request, reply) => {
    reply.code(201);
    return { n: ran('big'), name: request.body.name.repeat(200) };
  });
  // Type.Unknown: these send raw bytes, which no serializer touches.
  app.post('/v1/bytes', { schema: { body: ThingBody, response: { 200: Type.Unknown() } } }, (request, reply) => {
    ran('bytes');
    reply.type('application/octet-stream');
    return reply.send(Buffer.from([0, 255, ran('bytes-n'), ...Buffer.from(request.body.name)]));
  });
  app.post('/v1/stream', { schema: { body: ThingBody, response: { 200: Type.Unknown() } } }, (request, reply) => {
    ran('stream');
    reply.type('text/plain');
    return reply.send(Readable.from([request.body.name, '-streamed']));
  });
  app.post('/v1/hijack', { schema: { body: ThingBody, response: { 201: Thing } } }, (_request, reply) => {
    ran('hijack');
    reply.hijack();
    reply.raw.writeHead(201, { 'content-type': 'application/json' });
    reply.raw.end('{"n":0,"name":"raw"}');
  });
  // Any JSON at all, a string or a deep document too (schemas that admit any value exist).
  app.post('/v1/anything', { schema: { body: Type.Unknown(), response: { 201: Type.Object({ n: Type.Integer(), kind: Type.String() }), ...problems } } }, (request, reply) => {
    reply.code(201);
    return { n: ran('anything'), kind: typeof request.body };
  });
  app.post('/v1/accepted', { schema: { body: ThingBody, response: { 202: Type.Unknown() } } }, (_request, reply) => {
    ran('accepted');
    return reply.code(202).send();
  });
  return { app, runs, gates, failures };
}

function post(app: Service, url: string, payload: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return app.inject({ method: 'POST', url, payload: payload as Record<string, unknown>, headers });
}

async function keyRow(key: string, clientId = 'anonymous'): Promise<{ state: string; response_status: number | null } | undefined> {
  const r = await pool.query<{ state: string; response_status: number | null }>(
    'SELECT state, response_status FROM runtime.idempotency_keys WHERE client_id = $1 AND key = $2',
    [clientId, key],
  );
  return r.rows[0];
}

async function keyCount(): Promise<number> {
  const r = await pool.query<{ n: number }>('SELECT count(*)::int AS n FROM runtime.idempotency_keys');
  return r.rows[0]!.n;
}

function assertProblem(response: Response, status: number, slug: string): void {
  assert.equal(response.statusCode, status, response.body);
  assert.match(String(response.headers['content-type']), /^application\/problem\+json/);
  const body = response.json<{ type: string; status: number; detail: string }>();
  assert.equal(body.type, `${PROBLEMS}${slug}`);
  assert.equal(body.status, status);
  assert.ok(body.detail.length > 0);
}

describe('replay', () => {
  test('the first request runs and is stored; a retry gets the same status, body and safe headers, marked replayed', async () => {
    const { app, runs } = await buildApp();
    const first = await post(app, '/v1/things', { name: 'a', amount: 5 }, { 'idempotency-key': 'k-1' });
    assert.equal(first.statusCode, 201, first.body);
    assert.equal(first.headers['idempotent-replayed'], undefined);
    assert.deepEqual(await keyRow('k-1'), { state: 'completed', response_status: 201 });

    // Same request with its keys in another order: canonically the same body.
    const retry = await app.inject({
      method: 'POST',
      url: '/v1/things',
      payload: '{"amount":5,"name":"a"}',
      headers: { 'idempotency-key': 'k-1', 'content-type': 'application/json' },
    });
    assert.equal(retry.statusCode, 201);
    assert.equal(retry.headers['idempotent-replayed'], 'true');
    assert.equal(retry.body, first.body);
    assert.equal(retry.headers['content-type'], first.headers['content-type']);
    assert.equal(retry.headers.location, '/v1/things/1');
    assert.equal(retry.headers['x-secret'], undefined);
    assert.equal(retry.headers['set-cookie'], undefined);
    assert.notEqual(retry.headers['x-request-id'], first.headers['x-request-id']);
    assert.equal(runs.things, 1);

    // A request without the key is not affected by it and runs each time, unrecorded.
    const plain = await post(app, '/v1/things', { name: 'a', amount: 5 });
    assert.equal(plain.statusCode, 201);
    assert.equal(runs.things, 2);
    assert.equal(await keyCount(), 1);
    await app.close();
  });

  test('a 4xx from the handler is final: stored and replayed, the handler does not run again', async () => {
    const { app, runs } = await buildApp();
    const first = await post(app, '/v1/reject', { name: 'a' }, { 'idempotency-key': 'k-422' });
    assertProblem(first, 422, 'thing-rejected');
    const retry = await post(app, '/v1/reject', { name: 'a' }, { 'idempotency-key': 'k-422' });
    assertProblem(retry, 422, 'thing-rejected');
    assert.equal(retry.headers['idempotent-replayed'], 'true');
    assert.equal(retry.body, first.body);
    assert.equal(runs.reject, 1);
    await app.close();
  });

  test('a request that fails validation is not recorded: the key is free for the corrected request', async () => {
    const { app, runs } = await buildApp();
    const bad = await post(app, '/v1/things', { name: 7 }, { 'idempotency-key': 'k-invalid' });
    assertProblem(bad, 400, 'validation-error');
    assert.equal(await keyCount(), 0);
    const good = await post(app, '/v1/things', { name: 'fixed' }, { 'idempotency-key': 'k-invalid' });
    assert.equal(good.statusCode, 201);
    assert.equal(runs.things, 1);
    await app.close();
  });
});

describe('same key, different request', () => {
  test('a different body, route or path parameter is 422 idempotency-key-mismatch and runs nothing', async () => {
    const { app, runs } = await buildApp();
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-m' })).statusCode, 201);

    assertProblem(await post(app, '/v1/things', { name: 'b' }, { 'idempotency-key': 'k-m' }), 422, 'idempotency-key-mismatch');
    assertProblem(await post(app, '/v1/things', { name: 'a', amount: 1 }, { 'idempotency-key': 'k-m' }), 422, 'idempotency-key-mismatch');
    assertProblem(await post(app, '/v1/reject', { name: 'a' }, { 'idempotency-key': 'k-m' }), 422, 'idempotency-key-mismatch');
    assert.equal(runs.things, 1);
    assert.equal(runs.reject, undefined);

    const put = (id: string) =>
      app.inject({ method: 'PUT', url: `/v1/things/${id}`, payload: { name: 'x' }, headers: { 'idempotency-key': 'k-put' } });
    assert.equal((await put('one')).statusCode, 200);
    assertProblem(await put('two'), 422, 'idempotency-key-mismatch');
    assert.equal(runs.put, 1);

    // The original still replays.
    const replay = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-m' });
    assert.equal(replay.statusCode, 201);
    assert.equal(replay.headers['idempotent-replayed'], 'true');
    await app.close();
  });
});

describe('bodies the schema leaves open', () => {
  test('a JSON string whose text is an object\'s canonical JSON is not that object: 422, and nothing runs', async () => {
    const { app, runs } = await buildApp();
    const json = { 'content-type': 'application/json' };
    const first = await app.inject({ method: 'POST', url: '/v1/anything', payload: '{"n":1}', headers: { ...json, 'idempotency-key': 'k-kind' } });
    assert.deepEqual([first.statusCode, first.json<{ kind: string }>().kind], [201, 'object']);
    assertProblem(await app.inject({ method: 'POST', url: '/v1/anything', payload: JSON.stringify('{"n":1}'), headers: { ...json, 'idempotency-key': 'k-kind' } }), 422, 'idempotency-key-mismatch');
    assert.equal(runs.anything, 1);
    await app.close();
  });

  test('a document nested too deeply to compare is a 400 problem on the body, and nothing runs or is kept', async () => {
    const { app, runs } = await buildApp();
    const deep = `${'['.repeat(20_000)}${']'.repeat(20_000)}`;
    const json = { 'content-type': 'application/json' };
    assert.equal((await app.inject({ method: 'POST', url: '/v1/anything', payload: deep, headers: json })).statusCode, 201, 'without a key it runs');
    const keyed = await app.inject({ method: 'POST', url: '/v1/anything', payload: deep, headers: { ...json, 'idempotency-key': 'k-deep' } });
    assertProblem(keyed, 400, 'validation-error');
    assert.deepEqual(keyed.json<{ errors: unknown }>().errors, [{ in: 'body', path: '', message: 'is nested too deeply' }]);
    assert.equal(runs.anything, 1);
    assert.equal(await keyRow('k-deep'), undefined);
    await app.close();
  });
});

describe('the header', () => {
  test('a malformed key is a 400 validation-error on the header, and nothing runs', async () => {
    const { app, runs } = await buildApp();
    for (const key of ['', 'x'.repeat(256), 'tab\there', 'caf\u00e9']) {
      const r = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': key });
      assertProblem(r, 400, 'validation-error');
      assert.deepEqual(r.json<{ errors: unknown }>().errors, [
        { in: 'headers', path: '/idempotency-key', message: 'must be 1 to 255 printable ASCII characters' },
      ]);
    }
    assert.equal(runs.things, undefined);
    assert.equal(await keyCount(), 0);
    // The bounds themselves are fine.
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'x'.repeat(255) })).statusCode, 201);
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': ' !~' })).statusCode, 201);
    await app.close();
  });

  test('a key sent twice is a 400 on a listening server, not the two joined into one key', async () => {
    const { app, runs } = await buildApp();
    const address = new URL(await app.listen({ port: 0, host: '127.0.0.1' }));
    try {
      const body = JSON.stringify({ name: 'twice' });
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = connect(Number(address.port), address.hostname, () => {
          socket.end(
            `POST /v1/things HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n` +
              `Idempotency-Key: dup-k1\r\nIdempotency-Key: dup-k2\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
          );
        });
        const chunks: Buffer[] = [];
        socket.on('data', (c: Buffer) => chunks.push(c));
        socket.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
        socket.on('error', reject);
      });
      assert.match(answer, /^HTTP\/1\.1 400 /);
      assert.match(answer, /content-type: application\/problem\+json/i);
      assert.match(answer, /"path":"\/idempotency-key","message":"must be sent once"/);
      assert.equal(runs.things, undefined);
      assert.equal(await keyCount(), 0);
    } finally {
      await app.close();
    }
  });

  test('required: true refuses a request without a key with 400', async () => {
    const { app, runs } = await buildApp({ required: true });
    const r = await post(app, '/v1/things', { name: 'a' });
    assertProblem(r, 400, 'validation-error');
    assert.deepEqual(r.json<{ errors: unknown }>().errors, [{ in: 'headers', path: '/idempotency-key', message: 'is required on this route' }]);
    assert.equal(runs.things, undefined);
    // Routes that are not idempotent are unaffected.
    assert.equal((await app.inject({ method: 'GET', url: '/v1/things' })).statusCode, 200);
    assert.equal((await post(app, '/v1/unrecorded', { name: 'a' })).statusCode, 201);
    await app.close();
  });

  test('GET, routes with config.idempotent false and unknown routes ignore the header; PUT with config.idempotent true honours it', async () => {
    const { app, runs } = await buildApp();
    const headers = { 'idempotency-key': 'k-ignored' };
    for (let i = 0; i < 2; i++) {
      assert.equal((await app.inject({ method: 'GET', url: '/v1/things', headers })).statusCode, 200);
      assert.equal((await post(app, '/v1/unrecorded', { name: 'a' }, headers)).statusCode, 201);
      assert.equal((await post(app, '/v1/nowhere', { name: 'a' }, headers)).statusCode, 404);
    }
    assert.equal(runs.get, 2);
    assert.equal(runs.unrecorded, 2);
    assert.equal(await keyCount(), 0);
    for (let i = 0; i < 2; i++) {
      const r = await app.inject({ method: 'PUT', url: '/v1/things/7', payload: { name: 'p' }, headers });
      assert.equal(r.statusCode, 200);
    }
    assert.equal(runs.put, 1);
    await app.close();
  });
});

describe('per-client scope', () => {
  test('the same key from two clients is two keys: both run; an unusable client id counts as anonymous', async () => {
    const { app, runs } = await buildApp();
    const a = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'shared', 'x-client-id': 'client-a' });
    const b = await post(app, '/v1/things', { name: 'b' }, { 'idempotency-key': 'shared', 'x-client-id': 'client-b' });
    assert.equal(a.statusCode, 201);
    assert.equal(b.statusCode, 201);
    assert.equal(b.headers['idempotent-replayed'], undefined);
    assert.equal(runs.things, 2);
    assert.deepEqual(await keyRow('shared', 'client-a'), { state: 'completed', response_status: 201 });
    assert.deepEqual(await keyRow('shared', 'client-b'), { state: 'completed', response_status: 201 });

    const replayA = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'shared', 'x-client-id': 'client-a' });
    assert.equal(replayA.headers['idempotent-replayed'], 'true');
    assert.equal(replayA.body, a.body);

    const odd = await post(app, '/v1/things', { name: 'c' }, { 'idempotency-key': 'shared', 'x-client-id': 'no spaces allowed' });
    assert.equal(odd.statusCode, 201);
    assert.deepEqual(await keyRow('shared', 'anonymous'), { state: 'completed', response_status: 201 });
    assert.equal(runs.things, 3);
    await app.close();
  });

  test('a custom clientId function scopes keys; one that returns garbage is a 500, not a stored key', async () => {
    const tenant = await buildApp({ clientId: (request) => `tenant:${String(request.headers['x-tenant'])}` });
    assert.equal((await post(tenant.app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k', 'x-tenant': 't1' })).statusCode, 201);
    assert.deepEqual(await keyRow('k', 'tenant:t1'), { state: 'completed', response_status: 201 });
    await tenant.app.close();

    const broken = await buildApp({ clientId: () => '' });
    assert.equal((await post(broken.app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k2' })).statusCode, 500);
    assert.equal(await keyCount(), 1);
    assert.equal(broken.runs.things, undefined);
    await broken.app.close();

    // One too long for the key store, or not ASCII: stored as its hash, still its own scope.
    const long = await buildApp({ clientId: (request) => `tenant:${'é'.repeat(300)}${String(request.headers['x-tenant'])}` });
    for (const t of ['t1', 't2']) assert.equal((await post(long.app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-long', 'x-tenant': t })).statusCode, 201, t);
    const replay = await post(long.app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-long', 'x-tenant': 't1' });
    assert.equal(replay.headers['idempotent-replayed'], 'true');
    assert.deepEqual(await keyRow('k-long', `sha256:${createHash('sha256').update(`tenant:${'é'.repeat(300)}t1`, 'utf8').digest('hex')}`), { state: 'completed', response_status: 201 });
    assert.equal(long.runs.things, 2);
    await long.app.close();
  });
});

describe('what is not stored', () => {
  test('a 5xx releases the key: the retry runs, succeeds and is then replayed', async () => {
    const { app, runs } = await buildApp();
    const failed = await post(app, '/v1/flaky', { name: 'a' }, { 'idempotency-key': 'k-5xx' });
    assert.equal(failed.statusCode, 500);
    assert.equal(await keyRow('k-5xx'), undefined);

    const retried = await post(app, '/v1/flaky', { name: 'a' }, { 'idempotency-key': 'k-5xx' });
    assert.equal(retried.statusCode, 201);
    assert.equal(retried.headers['idempotent-replayed'], undefined);
    const replay = await post(app, '/v1/flaky', { name: 'a' }, { 'idempotency-key': 'k-5xx' });
    assert.equal(replay.headers['idempotent-replayed'], 'true');
    assert.equal(replay.body, retried.body);
    assert.equal(runs.flaky, 2);
    await app.close();
  });

  test('a handler\'s 400 releases the key, as the schema\'s never takes it: the corrected request runs under it', async () => {
    const { app, runs } = await buildApp();
    const refused = await post(app, '/v1/checked', { name: 'a' }, { 'idempotency-key': 'k-400' });
    assertProblem(refused, 400, 'validation-error');
    assert.equal(await keyRow('k-400'), undefined);
    const corrected = await post(app, '/v1/checked', { name: 'a', amount: 5 }, { 'idempotency-key': 'k-400' });
    assert.equal(corrected.statusCode, 201, corrected.body);
    assert.equal(corrected.headers['idempotent-replayed'], undefined);
    const replay = await post(app, '/v1/checked', { name: 'a', amount: 5 }, { 'idempotency-key': 'k-400' });
    assert.equal(replay.headers['idempotent-replayed'], 'true');
    assert.equal(runs.checked, 1);
    await app.close();
  });

  test('503 and 429 are not final either: each retry runs', async () => {
    const { app, runs } = await buildApp();
    for (let i = 0; i < 2; i++) {
      const r = await post(app, '/v1/unavailable', { name: 'a' }, { 'idempotency-key': 'k-503' });
      assert.equal(r.statusCode, 503);
      assert.equal(r.headers['retry-after'], '1');
      assert.equal(r.headers['idempotent-replayed'], undefined);
      assert.equal((await post(app, '/v1/limited', { name: 'a' }, { 'idempotency-key': 'k-429' })).statusCode, 429);
    }
    assert.equal(runs.unavailable, 2);
    assert.equal(runs.limited, 2);
    assert.equal(await keyCount(), 0);
    await app.close();
  });

  test('a response over responseBytesMax is delivered but not stored; the key is released', async () => {
    const { app, runs } = await buildApp({ responseBytesMax: 256 });
    const first = await post(app, '/v1/big', { name: 'ab' }, { 'idempotency-key': 'k-big' });
    assert.equal(first.statusCode, 201);
    assert.ok(first.body.length > 256);
    assert.equal(await keyRow('k-big'), undefined);
    const second = await post(app, '/v1/big', { name: 'ab' }, { 'idempotency-key': 'k-big' });
    assert.equal(second.headers['idempotent-replayed'], undefined);
    assert.equal(runs.big, 2);
    await app.close();
  });

  test('a Buffer body is stored and replayed byte for byte; a streamed body is delivered but not stored', async () => {
    const { app, runs } = await buildApp();
    const first = await post(app, '/v1/bytes', { name: 'é' }, { 'idempotency-key': 'k-bytes' });
    assert.equal(first.statusCode, 200);
    const replay = await post(app, '/v1/bytes', { name: 'é' }, { 'idempotency-key': 'k-bytes' });
    assert.equal(replay.headers['idempotent-replayed'], 'true');
    assert.equal(replay.headers['content-type'], 'application/octet-stream');
    assert.deepEqual(replay.rawPayload, first.rawPayload);
    assert.deepEqual([...first.rawPayload], [0, 255, 1, 0xc3, 0xa9]);
    assert.equal(runs.bytes, 1);

    for (let i = 0; i < 2; i++) {
      const streamed = await post(app, '/v1/stream', { name: 's' }, { 'idempotency-key': 'k-stream' });
      assert.equal(streamed.statusCode, 200);
      assert.equal(streamed.body, 's-streamed');
      assert.equal(streamed.headers['idempotent-replayed'], undefined);
    }
    assert.equal(runs.stream, 2);
    assert.equal(await keyRow('k-stream'), undefined);
    await app.close();
  });

  test('an empty answer without a type replays empty and without a type', async () => {
    const { app, runs } = await buildApp();
    const first = await post(app, '/v1/accepted', { name: 'a' }, { 'idempotency-key': 'k-empty' });
    const replay = await post(app, '/v1/accepted', { name: 'a' }, { 'idempotency-key': 'k-empty' });
    assert.deepEqual([first.statusCode, first.headers['content-type'], first.body], [202, undefined, '']);
    assert.deepEqual([replay.statusCode, replay.headers['content-type'], replay.body, replay.headers['idempotent-replayed']], [202, undefined, '', 'true']);
    assert.equal(runs.accepted, 1);
    await app.close();
  });

  test('a hijacked reply never reaches onSend; onResponse releases its key', async () => {
    const { app, runs } = await buildApp();
    const r = await post(app, '/v1/hijack', { name: 'a' }, { 'idempotency-key': 'k-raw' });
    assert.equal(r.statusCode, 201);
    // onResponse runs after the response has gone, so the release lands a moment later.
    for (let waitedMs = 0; (await keyRow('k-raw')) !== undefined; waitedMs += 10) {
      assert.ok(waitedMs < 5000, 'the hijacked request kept its key');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    assert.equal(runs.hijack, 1);
    await app.close();
  });
});

describe('in progress', () => {
  test('concurrent duplicates on a listening server: one runs, the others get 409 with Retry-After; then the result replays', async () => {
    const { app, runs, gates } = await buildApp();
    const gate = new Gate();
    gates.push(gate);
    const address = await app.listen({ port: 0, host: '127.0.0.1' });
    const send = (body: unknown) =>
      fetch(`${address}/v1/slow`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': 'k-race' },
        body: JSON.stringify(body),
      });

    const DUPLICATES = 10;
    let settled = 0;
    const responses = Array.from({ length: DUPLICATES }, () =>
      send({ name: 'race' }).then(async (res) => {
        settled++;
        return { status: res.status, retryAfter: res.headers.get('retry-after'), body: await res.text() };
      }),
    );
    // Exactly one request got the key and waits at the gate; the rest must be answered first.
    await gate.entered;
    for (let waitedMs = 0; settled < DUPLICATES - 1; waitedMs += 10) {
      assert.ok(waitedMs < 10_000, `only ${settled} duplicates were answered while the first was in progress`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const mismatch = await send({ name: 'other' });
    assert.equal(mismatch.status, 422);
    assert.deepEqual(await keyRow('k-race'), { state: 'in_progress', response_status: null });

    gate.open();
    const all = await Promise.all(responses);
    const created = all.filter((r) => r.status === 201);
    const conflicts = all.filter((r) => r.status === 409);
    assert.equal(created.length, 1, JSON.stringify(all));
    assert.equal(conflicts.length, DUPLICATES - 1, JSON.stringify(all));
    for (const c of conflicts) {
      assert.equal(c.retryAfter, '1');
      assert.equal((JSON.parse(c.body) as { type: string }).type, `${PROBLEMS}idempotency-key-in-progress`);
    }
    assert.equal(runs.slow, 1);

    const replay = await send({ name: 'race' });
    assert.equal(replay.status, 201);
    assert.equal(replay.headers.get('idempotent-replayed'), 'true');
    assert.equal(await replay.text(), created[0]!.body);
    assert.equal(runs.slow, 1);
    await app.close();
  });

  test('a client that disconnects mid-request: the handler finishes, its response is stored, and the retry replays it', async () => {
    const { app, runs, gates } = await buildApp();
    const gate = new Gate();
    gates.push(gate);
    const address = await app.listen({ port: 0, host: '127.0.0.1' });
    const send = (signal?: AbortSignal) =>
      fetch(`${address}/v1/slow`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': 'k-abort' },
        body: JSON.stringify({ name: 'gone' }),
        ...(signal === undefined ? {} : { signal }),
      });
    const controller = new AbortController();
    const abandoned = send(controller.signal);
    await gate.entered;
    controller.abort();
    await assert.rejects(abandoned);
    gate.open();
    for (let waitedMs = 0; (await keyRow('k-abort'))?.state !== 'completed'; waitedMs += 10) {
      assert.ok(waitedMs < 5000, 'the abandoned request was not stored');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const retry = await send();
    assert.equal(retry.status, 201);
    assert.equal(retry.headers.get('idempotent-replayed'), 'true');
    assert.deepEqual(await retry.json(), { n: 1, name: 'gone' });
    assert.equal(runs.slow, 1);
    await app.close();
  });

  test('crash recovery: a key left in progress is 409 until its lock times out, then a retry takes it over and runs', async () => {
    const { app, runs } = await buildApp();
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-crash' })).statusCode, 201);
    // As a process that claimed the key and died before storing the response leaves it.
    await pool.query(
      `UPDATE runtime.idempotency_keys
          SET state = 'in_progress', response_status = NULL, response_headers = NULL, response_body = NULL,
              locked_until = $1
        WHERE key = 'k-crash'`,
      [new Date(nowMs + IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT)],
    );
    assertProblem(await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-crash' }), 409, 'idempotency-key-in-progress');
    nowMs += IDEMPOTENCY_LOCK_TIMEOUT_MS_DEFAULT - 1;
    assertProblem(await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-crash' }), 409, 'idempotency-key-in-progress');

    nowMs += 1;
    // A different request never takes over someone else's key, abandoned or not.
    assertProblem(await post(app, '/v1/things', { name: 'b' }, { 'idempotency-key': 'k-crash' }), 422, 'idempotency-key-mismatch');
    const recovered = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-crash' });
    assert.equal(recovered.statusCode, 201);
    assert.equal(recovered.headers['idempotent-replayed'], undefined);
    assert.equal(runs.things, 2);
    assert.deepEqual(await keyRow('k-crash'), { state: 'completed', response_status: 201 });
    const replay = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-crash' });
    assert.equal(replay.body, recovered.body);
    await app.close();
  });

  test('a request that outlives its lock loses the key: the taker-over stores its response, the late one does not overwrite it', async () => {
    const { app, runs, gates } = await buildApp({ lockTimeoutMs: 1000 });
    const slow = new Gate();
    const fast = new Gate();
    gates.push(slow, fast);
    const late = post(app, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-lease' });
    await slow.entered;
    nowMs += 1000;
    const takeover = post(app, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-lease' });
    await fast.entered;
    fast.open();
    const second = await takeover;
    assert.equal(second.statusCode, 201);
    assert.equal(second.json<{ n: number }>().n, 2);
    slow.open();
    const first = await late;
    assert.equal(first.statusCode, 201);
    assert.equal(first.json<{ n: number }>().n, 1);

    const replay = await post(app, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-lease' });
    assert.equal(replay.headers['idempotent-replayed'], 'true');
    assert.equal(replay.body, second.body);
    assert.equal(runs.slow, 2);
    await app.close();
  });
});

describe('batched statements', () => {
  /**
   * The pool, with every statement's text recorded: the store is real, only watched. The first
   * claim statement waits until `release` is called, so the claims made meanwhile queue behind it.
   */
  function watchedPool(): { pool: pg.Pool; statements: string[]; firstClaim: Gate } {
    const w = {
      pool: intercepted(async (query, run) => {
        w.statements.push(query.text);
        if (query.text.includes('INSERT INTO runtime.idempotency_keys') && claimsIn(w.statements) === 1) await w.firstClaim.arrive();
        return run(query);
      }),
      statements: [] as string[],
      firstClaim: new Gate(),
    };
    return w;
  }
  const claimsIn = (statements: string[]): number => statements.filter((t) => t.includes('INSERT INTO runtime.idempotency_keys')).length;
  const completionsIn = (statements: string[]): number => statements.filter((t) => t.includes("SET state = 'completed'")).length;

  test('requests that arrive while a claim runs share the next one, and each gets its own answer', async () => {
    const watched = watchedPool();
    const { app, runs, gates } = await buildApp({ pool: watched.pool });
    let arrived = 0;
    app.addHook('preValidation', (_request, _reply, done) => {
      arrived += 1;
      done();
    });
    const send = (path: string, key: string, body: unknown) => post(app, path, body, { 'idempotency-key': key });
    // Before the burst: one key completed, one held by a request still running.
    const gate = new Gate();
    gates.push(gate);
    const opener = send('/v1/things', 'k-done', { name: 'done' });
    await watched.firstClaim.entered;
    watched.firstClaim.open();
    const done = await opener;
    assert.equal(done.statusCode, 201);
    const busy = send('/v1/slow', 'k-busy', { name: 'busy' });
    await gate.entered;

    // The burst: fresh keys, among them keys an array literal must quote (they travel in one
    // text[] parameter), a replay, a mismatch and a key in progress.
    const odd = ['NULL', 'a"b', 'c\\d', '{x,y}', ' spaced out ', "it's"];
    const fresh = [...Array.from({ length: 24 }, (_, i) => `k-burst-${i}`), ...odd];
    watched.statements.length = 0;
    const held = new Gate();
    watched.firstClaim = held;
    arrived = 0;
    const lead = send('/v1/things', 'k-lead', { name: 'lead' });
    await held.entered;
    // The lead's claim is held: everything below queues behind it.
    // The keys nobody may claim come first, so an answer matched to the wrong item would show.
    const pending = Promise.all([
      send('/v1/things', 'k-done', { name: 'done' }),
      send('/v1/things', 'k-done', { name: 'changed' }),
      send('/v1/slow', 'k-busy', { name: 'busy' }),
      ...fresh.map((key) => send('/v1/things', key, { name: key })),
    ]);
    for (let waitedMs = 0; arrived < fresh.length + 3; waitedMs += 5) {
      assert.ok(waitedMs < 10_000, `only ${arrived} requests arrived`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    // From preValidation to the claim is a few microtasks and no I/O; give it two turns.
    for (let i = 0; i < 2; i++) await new Promise((resolve) => setImmediate(resolve));
    held.open();
    assert.equal((await lead).statusCode, 201);
    const burst = await pending;
    const [replay, mismatch, inProgress] = burst.slice(0, 3);
    const answers = burst.slice(3);
    for (const [i, a] of answers.entries()) {
      assert.equal(a.statusCode, 201, a.body);
      assert.equal(a.json<{ name: string }>().name, fresh[i]);
    }
    assert.equal(replay?.statusCode, 201);
    assert.equal(replay?.headers['idempotent-replayed'], 'true');
    assert.equal(replay?.body, done.body);
    assertProblem(mismatch!, 422, 'idempotency-key-mismatch');
    assertProblem(inProgress!, 409, 'idempotency-key-in-progress');
    assert.equal(runs.things, 2 + fresh.length, 'each fresh key ran once; the replay and the mismatch ran nothing');

    // The lead's claim; one for the 32 keys that queued behind it; one for the second request
    // with k-done, which may not share a statement with the first.
    assert.equal(claimsIn(watched.statements), 3);
    assert.ok(completionsIn(watched.statements) <= 3, `completion statements for 31 responses: ${completionsIn(watched.statements)}`);
    for (const key of fresh) assert.deepEqual(await keyRow(key), { state: 'completed', response_status: 201 }, key);

    gate.open();
    assert.equal((await busy).statusCode, 201);
    // Each odd key replays its own response.
    for (const key of odd) {
      const again = await send('/v1/things', key, { name: key });
      assert.equal(again.headers['idempotent-replayed'], 'true', key);
      assert.equal(again.json<{ name: string }>().name, key);
    }
    assert.equal(runs.things, 2 + fresh.length);
    await app.close();
  });

  test('duplicates that queue together are claimed in separate statements: one runs, the others are 409', async () => {
    const watched = watchedPool();
    const { app, runs, gates } = await buildApp({ pool: watched.pool });
    const gate = new Gate();
    gates.push(gate);
    const DUPLICATES = 6;
    let settled = 0;
    const all = Promise.all(
      Array.from({ length: DUPLICATES }, () =>
        post(app, '/v1/slow', { name: 'dup' }, { 'idempotency-key': 'k-dup' }).then((r) => {
          settled += 1;
          return r;
        }),
      ),
    );
    await watched.firstClaim.entered;
    // Let every duplicate queue behind the first claim before it goes on.
    for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
    watched.firstClaim.open();
    await gate.entered;
    for (let waitedMs = 0; settled < DUPLICATES - 1; waitedMs += 5) {
      assert.ok(waitedMs < 10_000, `only ${settled} duplicates were answered while the first was in progress`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    gate.open();
    const answers = await all;
    assert.deepEqual(answers.map((a) => a.statusCode).sort(), [201, ...Array<number>(DUPLICATES - 1).fill(409)]);
    assert.equal(runs.slow, 1);
    // A statement never holds one key twice (PostgreSQL would refuse it): one claim statement per duplicate.
    assert.equal(claimsIn(watched.statements), DUPLICATES);
    await app.close();
  });

  test('a claim statement that fails answers 503 to every request in it, and none of them runs', async () => {
    const failing = intercepted((query, run) => (query.text.includes('INSERT INTO runtime.idempotency_keys') ? Promise.reject(new Error('connection lost')) : run(query)));
    const { app, runs } = await buildApp({ pool: failing });
    const answers = await Promise.all(Array.from({ length: 8 }, (_, i) => post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': `k-fail-${i}` })));
    for (const a of answers) assertProblem(a, 503, 'idempotency-unavailable');
    assert.equal(runs.things, undefined);
    assert.equal(await keyCount(), 0);
    await app.close();
  });
});

describe('key store failures', () => {
  test('an unreachable store is a 503 with Retry-After, and the handler does not run', async () => {
    const dead = new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:1/nowhere', connectionTimeoutMillis: 1000 });
    const { app, runs } = await buildApp({ pool: dead });
    const r = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-dead' });
    assertProblem(r, 503, 'idempotency-unavailable');
    assert.equal(r.headers['retry-after'], '1');
    assert.equal(runs.things, undefined);
    await app.close();
    await dead.end();
  });

  test('the query timeout covers the wait for a connection: a pool that never hands one out is a 503 in time', async () => {
    // Every connection taken and no connectionTimeoutMillis: pool.query would wait for ever,
    // and query_timeout only starts once a connection is had.
    const full = new pg.Pool({ connectionString: db.url, max: 1 });
    const held = await full.connect();
    let heldReleased = false;
    const releaseHeld = (): void => {
      if (!heldReleased) held.release();
      heldReleased = true;
    };
    const { app, runs } = await buildApp({ pool: full, queryTimeoutMs: 300 });
    try {
      const started = performance.now();
      const r = await Promise.race([
        post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-full' }),
        new Promise<undefined>((resolve) => setTimeout(() => { resolve(undefined); }, 5000)),
      ]);
      assert.ok(r !== undefined, 'no answer within 5 s');
      assert.ok(performance.now() - started < 2000, `answered after ${Math.round(performance.now() - started)} ms`);
      assertProblem(r, 503, 'idempotency-unavailable');
      assert.equal(runs.things, undefined);
      // The connection that frees up later goes back unused: no key is claimed behind the 503.
      releaseHeld();
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(await keyCount(), 0);
      assert.equal(full.idleCount, 1);
    } finally {
      // A failing run still ends: the request stuck waiting for the pool gets its connection.
      releaseHeld();
      await app.close();
      await full.end();
    }
  });

  test('a failed store still delivers the response; the key stays in progress until its lock times out', async () => {
    const failingStore = intercepted((query, run) => (query.text.includes("SET state = 'completed'") ? Promise.reject(new Error('store failed')) : run(query)));
    const { app, runs } = await buildApp({ pool: failingStore });
    const first = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-store' });
    assert.equal(first.statusCode, 201);
    assert.deepEqual(await keyRow('k-store'), { state: 'in_progress', response_status: null });
    assertProblem(await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-store' }), 409, 'idempotency-key-in-progress');
    assert.equal(runs.things, 1);
    await app.close();
  });
});

describe('pruning', () => {
  test('keys are kept for ttlMs after completion, then pruned; the key can then be used again', async () => {
    const { app, runs } = await buildApp();
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-old' })).statusCode, 201);
    nowMs += IDEMPOTENCY_TTL_MS_DEFAULT - 1;
    assert.equal(await pruneIdempotencyKeys(pool, nowMs), 0);
    const replay = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-old' });
    assert.equal(replay.headers['idempotent-replayed'], 'true');

    nowMs += 1;
    assert.equal(await pruneIdempotencyKeys(pool, nowMs), 1);
    assert.equal(await keyCount(), 0);
    const again = await post(app, '/v1/things', { name: 'other' }, { 'idempotency-key': 'k-old' });
    assert.equal(again.statusCode, 201);
    assert.equal(again.headers['idempotent-replayed'], undefined);
    assert.equal(runs.things, 2);
    await app.close();
  });

  test('an expired key not yet pruned is treated as absent', async () => {
    const { app, runs } = await buildApp();
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-exp' })).statusCode, 201);
    nowMs += IDEMPOTENCY_TTL_MS_DEFAULT;
    const r = await post(app, '/v1/things', { name: 'b' }, { 'idempotency-key': 'k-exp' });
    assert.equal(r.statusCode, 201);
    assert.equal(runs.things, 2);
    await app.close();
  });

  test('deletes in bounded batches, and never a key whose lock is still held', async () => {
    const values = Array.from({ length: 5 }, (_, i) => `('c', 'k${i}', decode(repeat('00', 32), 'hex'), 'completed', gen_random_uuid(), 201, '{}', '', $1, $1, $2)`);
    await pool.query(
      `INSERT INTO runtime.idempotency_keys
         (client_id, key, request_fingerprint, state, lock_token, response_status, response_headers, response_body, created_at, locked_until, expires_at)
       VALUES ${values.join(', ')}`,
      [new Date(nowMs - 2000), new Date(nowMs - 1000)],
    );
    // In progress, its ttl gone but its lock live: a request still owns it.
    await pool.query(
      `INSERT INTO runtime.idempotency_keys (client_id, key, request_fingerprint, state, lock_token, created_at, locked_until, expires_at)
       VALUES ('c', 'held', decode(repeat('00', 32), 'hex'), 'in_progress', gen_random_uuid(), $1, $2, $3)`,
      [new Date(nowMs - 2000), new Date(nowMs + 1000), new Date(nowMs - 1000)],
    );
    assert.equal(await pruneIdempotencyKeys(pool, nowMs, { batchSizeMax: 2, batchesMax: 2 }), 4);
    assert.equal(await pruneIdempotencyKeys(pool, nowMs, { batchSizeMax: 2, batchesMax: 2 }), 1);
    assert.equal(await keyCount(), 1);
    assert.equal(await pruneIdempotencyKeys(pool, nowMs + 1000), 1);
    assert.equal(await keyCount(), 0);
    await assert.rejects(pruneIdempotencyKeys(pool, nowMs, { batchSizeMax: 0 }), RangeError);
  });

  test('the pruner timer prunes on its interval, reports errors, and stops', async () => {
    const { app } = await buildApp();
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-timer' })).statusCode, 201);
    await app.close();
    nowMs += IDEMPOTENCY_TTL_MS_DEFAULT;
    const pruner = startIdempotencyPruner(pool, { intervalMs: 5, now: clock });
    for (let waitedMs = 0; (await keyCount()) > 0; waitedMs += 10) {
      assert.ok(waitedMs < 5000, 'the pruner did not prune within 5 s');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await pruner.stop();

    const ended = new pg.Pool({ connectionString: db.url });
    await ended.end();
    const errors: unknown[] = [];
    const failing = startIdempotencyPruner(ended, { intervalMs: 5, onError: (error) => errors.push(error) });
    for (let waitedMs = 0; errors.length === 0; waitedMs += 10) {
      assert.ok(waitedMs < 5000, 'the pruner did not report its error');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await failing.stop();
  });

  test('a pruner that is behind prunes at once, and call after bounded call until it has caught up', async () => {
    const { app } = await buildApp();
    for (let i = 0; i < 7; i++) assert.equal((await post(app, '/v1/things', { name: `a${i}` }, { 'idempotency-key': `k-behind-${i}` })).statusCode, 201);
    await app.close();
    nowMs += IDEMPOTENCY_TTL_MS_DEFAULT;
    assert.equal(await keyCount(), 7);
    // Two keys a call, and the next interval a day away: only draining reaches all seven.
    const pruner = startIdempotencyPruner(pool, { intervalMs: 86_400_000, now: clock, batchSizeMax: 2, batchesMax: 1 });
    try {
      for (let waitedMs = 0; (await keyCount()) > 0; waitedMs += 10) {
        assert.ok(waitedMs < 5000, `${await keyCount()} keys left: the pruner stopped before it caught up`);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    } finally {
      await pruner.stop();
    }
  });

  test('the plugin runs the pruner when pruneIntervalMs is set and stops it on close', async () => {
    const { app } = await buildApp({ pruneIntervalMs: 5 });
    assert.equal((await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-plugin' })).statusCode, 201);
    nowMs += IDEMPOTENCY_TTL_MS_DEFAULT;
    for (let waitedMs = 0; (await keyCount()) > 0; waitedMs += 10) {
      assert.ok(waitedMs < 5000, 'the plugin pruner did not prune within 5 s');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await app.close();
  });
});

describe('options and helpers', () => {
  test('bad options are refused at registration', async () => {
    for (const bad of [{ ttlMs: 1000, lockTimeoutMs: 1000 }, { responseBytesMax: -1 }, { lockTimeoutMs: 0 }, { pruneIntervalMs: 1.5 }]) {
      const app = await createService({ config, openapi: { title: 't', version: '0' }, logger: false });
      await assert.rejects(async () => app.register(idempotency, { pool, ...bad }), RangeError);
      await app.close().catch(() => {});
    }
  });

  test('canonicalJson sorts object keys at every depth and keeps array order', () => {
    assert.equal(canonicalJson({ b: 1, a: { d: [2, { f: 1, e: 0 }], c: null } }), '{"a":{"c":null,"d":[2,{"e":0,"f":1}]},"b":1}');
    assert.equal(canonicalJson(undefined), '');
    assert.equal(canonicalJson('s'), '"s"');
  });
});

describe('a dependency that failed after the request reached it', () => {
  test('a 504 past the deadline is stored: the retry its answer invites is a replay, and the provider is charged once', async () => {
    // The payment provider takes each charge at once and answers after 300 ms; the request
    // allows 150. Freed like any 5xx, the key let the retry charge a second time.
    const charges: string[] = [];
    const provider = createServer((req, res) => {
      let body = '';
      req.on('data', (chunk: Buffer) => {
        body += chunk.toString();
      });
      req.on('end', () => {
        charges.push(body);
        setTimeout(() => res.writeHead(201, { 'content-type': 'application/json' }).end('{"ok":true}'), 300);
      });
    });
    await new Promise<void>((resolve) => provider.listen(0, '127.0.0.1', resolve));
    const url = `http://127.0.0.1:${(provider.address() as AddressInfo).port}/charges`;
    const psp = new DependencyPolicy({ name: 'psp', attemptTimeoutMs: 5000, callTimeoutMs: 5000, retry: false, breaker: false, bulkhead: false });
    const app = await createService({ config, openapi: { title: 'idempotency test', version: '0.0.0' }, logger: false });
    await app.register(idempotency, { pool, now: clock });
    app.post('/v1/payments', { schema: { body: ThingBody, response: { 201: Thing, 504: ProblemResponse } } }, async (request, reply) => {
      await httpCall(psp, url, { method: 'POST', body: JSON.stringify(request.body), deadline: request.deadline });
      reply.code(201);
      return { n: 1, name: request.body.name };
    });
    try {
      const send = (): Promise<Response> => post(app, '/v1/payments', { name: 'a' }, { 'idempotency-key': 'k-pay', 'x-deadline-remaining-ms': '150' });
      const first = await send();
      assertProblem(first, 504, 'dependency-unavailable');
      assert.match(first.json<{ detail: string }>().detail, /may have taken effect.*same Idempotency-Key gets this answer again/);
      assert.equal((await keyRow('k-pay'))?.response_status, 504);
      const retry = await send();
      assert.equal(retry.statusCode, 504);
      assert.equal(retry.headers['idempotent-replayed'], 'true');
      assert.equal(retry.body, first.body);
      await new Promise((resolve) => setTimeout(resolve, 400));
      assert.equal(charges.length, 1, 'one charge for one key');
    } finally {
      await app.close();
      await new Promise((resolve) => provider.close(resolve));
    }
  });

  test('a dependency that answered 500, or whose connection broke, is stored; one that refused the connection is not, and the retry runs', async () => {
    const app = await createService({ config, openapi: { title: 'idempotency test', version: '0.0.0' }, logger: false });
    await app.register(idempotency, { pool, now: clock });
    const runs: Record<string, number> = {};
    const failures: Record<string, () => Error> = {
      '500': () => new DependencyHttpError('psp', 500),
      reset: () => new DependencyConnectionError('psp', 'ECONNRESET', new Error('socket hang up')),
      refused: () => new DependencyConnectionError('psp', 'ECONNREFUSED', new Error('connect ECONNREFUSED')),
      '503': () => new DependencyHttpError('psp', 503),
    };
    app.post('/v1/pay/:how', { schema: { params: Type.Object({ how: Type.String() }), body: ThingBody, response: { 503: ProblemResponse } } }, (request) => {
      runs[request.params.how] = (runs[request.params.how] ?? 0) + 1;
      throw (failures[request.params.how] as () => Error)();
    });
    try {
      for (const how of Object.keys(failures)) {
        const first = await post(app, `/v1/pay/${how}`, { name: 'a' }, { 'idempotency-key': `k-${how}` });
        const retry = await post(app, `/v1/pay/${how}`, { name: 'a' }, { 'idempotency-key': `k-${how}` });
        assertProblem(first, 503, 'dependency-unavailable');
        const reached = how === '500' || how === 'reset';
        assert.equal(first.headers['retry-after'], reached ? undefined : '1', how);
        assert.equal(retry.headers['idempotent-replayed'], reached ? 'true' : undefined, how);
        assert.equal(runs[how], reached ? 1 : 2, `${how}: ${reached ? 'stored, the retry replayed' : 'released, the retry ran'}`);
      }
    } finally {
      await app.close();
    }
  });
});

/** A completed use of `key` that expired a day ago and was not pruned yet, which a claim takes over. */
async function expiredUseOf(key: string): Promise<void> {
  const old = new Date(Date.now() - 2 * 86_400_000);
  await pool.query(
    `INSERT INTO runtime.idempotency_keys (client_id, key, request_fingerprint, state, lock_token, response_status, response_headers, response_body, created_at, locked_until, expires_at)
     VALUES ('anonymous', $1, $2, 'completed', gen_random_uuid(), 201, '{}', '\\x', $3, $3, $4)`,
    [key, createHash('sha256').update('x').digest(), old, new Date(old.getTime() + 86_400_000)],
  );
}

describe('a claim statement that outlives the query timeout', () => {
  // Answered 503 "not run, retry with the same key", the statement ran on in PostgreSQL and
  // committed: the key stayed in progress under a token nobody held, and the retry was 409
  // until its lock ran out (60 s by default).
  const things = async (pool: pg.Pool): Promise<{ app: Service; runs: () => number }> => {
    const app = await createService({ config, openapi: { title: 'idempotency test', version: '0.0.0' }, logger: false });
    await app.register(idempotency, { pool, queryTimeoutMs: 300 });
    let runs = 0;
    app.post('/v1/things', { schema: { body: ThingBody, response: { 201: Thing, 503: ProblemResponse } } }, (request, reply) => {
      runs += 1;
      reply.code(201);
      return { n: runs, name: request.body.name };
    });
    return { app, runs: () => runs };
  };

  test('a batch that waited on a row lock past it commits nothing, neither the keys it inserted before the wait nor the takeover after', async () => {
    const { app, runs } = await things(pool);
    // Day-old uses of k-0 and k-b, which claims take over; something holds their rows for longer
    // than the query timeout (a pruner's batch, a slow disk).
    for (const key of ['k-0', 'k-b']) await expiredUseOf(key);
    const locker = await pool.connect();
    try {
      await locker.query('BEGIN');
      await locker.query("SELECT 1 FROM runtime.idempotency_keys WHERE key IN ('k-0', 'k-b') FOR UPDATE");
      // k-0's statement waits on the lock; k-a and k-b queue behind it and go together in the
      // next: k-a (new) is inserted, then the statement waits on k-b's row.
      const blocked = post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-0' });
      await new Promise((resolve) => setTimeout(resolve, 50));
      const answers = await Promise.all([blocked, post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-a' }), post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-b' })]);
      for (const answer of answers) assertProblem(answer, 503, 'idempotency-unavailable');
      // Held on a while after the answers: a statement's deadline is its client's, give or take
      // the time it took to reach PostgreSQL and start.
      await new Promise((resolve) => setTimeout(resolve, 100));
      await locker.query('COMMIT');
    } finally {
      locker.release();
    }
    // The statements go on once the lock is free: give them the time to.
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(await keyRow('k-a'), undefined, 'k-a, inserted before the wait, is not left claimed');
    assert.equal((await keyRow('k-b'))?.state, 'completed', 'the old use of k-b, not taken over late');
    for (const key of ['k-a', 'k-b']) {
      const retry = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': key });
      assert.equal(retry.statusCode, 201, `${key}: ${retry.body}`);
    }
    assert.equal(runs(), 2);
    await app.close();
  });

  test('a claim whose Parse waited on a table lock past it commits nothing either', async () => {
    // PostgreSQL sets statement_timestamp() again at Execute, after such a wait: counted from
    // it, the claim had its whole time again, took the old row over and committed, and the
    // retry the 503 invited was 409. It counts from the transaction's start, at Parse.
    const { app, runs } = await things(pool);
    await expiredUseOf('k-parse');
    const rowLocker = await pool.connect();
    const tableLocker = await pool.connect();
    try {
      // Something holds the row a while (a pruner's batch), and something holds the table in a
      // mode that queues writers (CREATE INDEX, or a migration's ALTER TABLE in the lock queue).
      await rowLocker.query('BEGIN');
      await rowLocker.query("SELECT 1 FROM runtime.idempotency_keys WHERE key = 'k-parse' FOR UPDATE");
      await tableLocker.query('BEGIN');
      await tableLocker.query('LOCK TABLE runtime.idempotency_keys IN SHARE MODE');
      assertProblem(await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-parse' }), 503, 'idempotency-unavailable');
      await new Promise((resolve) => setTimeout(resolve, 200));
      await tableLocker.query('COMMIT');
      await new Promise((resolve) => setTimeout(resolve, 100));
      await rowLocker.query('COMMIT');
    } finally {
      rowLocker.release();
      tableLocker.release();
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal((await keyRow('k-parse'))?.state, 'completed', 'the old use of the key, not taken over late');
    const retry = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-parse' });
    assert.equal(retry.statusCode, 201, retry.body);
    assert.equal(runs(), 1);
    await app.close();
  });

  /** A pool of two connections through a fault proxy, one of them open, for `run`; both closed after. */
  const behindProxy = async (run: (slow: pg.Pool, proxy: Awaited<ReturnType<typeof behindFaultProxy>>['proxy']) => Promise<void>): Promise<void> => {
    const { proxy, url } = await behindFaultProxy(db.url);
    const slow = new pg.Pool({ connectionString: url, max: 2 });
    try {
      await slow.query('SELECT 1');
      await run(slow, proxy);
    } finally {
      await slow.end();
      await proxy.close();
    }
  };

  test('a claim that committed while its answer was late is removed: the retry runs', async () => {
    await behindProxy(async (slow, proxy) => {
      const { app, runs } = await things(slow);
      // Each way: the statement lands after 250 ms and commits; its answer would come at 500.
      proxy.set({ latencyMs: 250 });
      assertProblem(await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-late' }), 503, 'idempotency-unavailable');
      // The removal goes the same slow way.
      await waitForValue(async () => (await keyRow('k-late')) === undefined, 5000);
      proxy.heal();
      const retry = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-late' });
      assert.equal(retry.statusCode, 201, retry.body);
      assert.equal(runs(), 1);
      await app.close();
    });
  });

  test('a claim that reaches PostgreSQL after its withdrawal takes nothing: the retry runs', async () => {
    // The client gives up at 300 ms and withdraws the statement over a new connection, which is
    // quick; the statement's own bytes are held up on theirs and reach the server at 2 s,
    // after the withdrawal, with the whole of their 300 ms still to run (their deadline counts
    // from their arrival). The removal by key and token that the withdrawal replaced found no
    // row then; the claim inserted its own and committed, and the retry was 409 until the lock
    // ran out.
    await behindProxy(async (slow, proxy) => {
      const { app, runs } = await things(slow);
      // The claim lands at 2 s; the withdrawal (a new connection, some 20 ms after the 503 even
      // on a loaded 2-core machine) gets there first, which the test checks.
      proxy.set({ latencyMs: 2000 });
      const answer = post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-later' });
      await new Promise((resolve) => setTimeout(resolve, 150));
      proxy.heal();
      assertProblem(await answer, 503, 'idempotency-unavailable');
      await waitForValue(async () => ((await pool.query('SELECT 1 FROM runtime.idempotency_withdrawn_claims')).rowCount ?? 0) > 0, 1500);
      assert.equal(proxy.stats.open, 2, 'the withdrawal was recorded while the claim was still on its way');
      // The claim's connection closes once the server has read everything sent on it, the
      // claim and then the client's Terminate: then the claim has run. The withdrawal's, the
      // second, stays open in the pool.
      await waitForValue(() => Promise.resolve(proxy.stats.connections >= 2 && proxy.stats.open <= 1), 5000);
      const row = await keyRow('k-later');
      const retry = await post(app, '/v1/things', { name: 'a' }, { 'idempotency-key': 'k-later' });
      assert.equal(retry.statusCode, 201, `${retry.body} (the key was ${JSON.stringify(row)})`);
      assert.equal(row, undefined, 'the late claim took nothing');
      assert.equal(runs(), 1);
      await app.close();
    });
  });
});

/** Polls `check` every 25 ms until it is true; fails after `timeoutMs`. */
async function waitForValue(check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  for (const until = Date.now() + timeoutMs; !(await check()); ) {
    assert.ok(Date.now() < until, `not within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

describe('instances whose clocks disagree', () => {
  // Each instance wrote its own clock into claims, locks and expiries: one ahead of another by a
  // lock's length took over a key the other was still running, and ran the handler twice; a
  // pruner ahead by a day removed keys a day early. They now read PostgreSQL's clock.
  test('an instance whose clock is hours ahead neither takes over a running key nor prunes it early', async (t) => {
    const gate = new Gate();
    let runs = 0;
    const instance = async (): Promise<Service> => {
      const app = await createService({ config, openapi: { title: 'idempotency test', version: '0.0.0' }, logger: false });
      await app.register(idempotency, { pool });
      app.post('/v1/slow', { schema: { body: ThingBody, response: { 201: Thing } } }, async (request, reply) => {
        runs += 1;
        if (runs === 1) await gate.arrive();
        reply.code(201);
        return { n: runs, name: request.body.name };
      });
      return app;
    };
    const [a, b] = [await instance(), await instance()];
    try {
      const first = post(a, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-skew' });
      await gate.entered;
      // From here on this process's clock (the other instance's, say) is two hours ahead.
      t.mock.timers.enable({ apis: ['Date'], now: Date.now() + 2 * 3_600_000 });
      const second = await post(b, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-skew' });
      assertProblem(second, 409, 'idempotency-key-in-progress');
      assert.equal(runs, 1, 'the running request was not taken over');
      gate.open();
      assert.equal((await first).statusCode, 201);
      // A day and a bit ahead: the key, completed a moment ago by the database's clock, stays.
      t.mock.timers.setTime(Date.now() + 25 * 3_600_000);
      assert.equal(await pruneIdempotencyKeys(pool), 0);
      assert.equal((await keyRow('k-skew'))?.state, 'completed');
      const replay = await post(b, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-skew' });
      assert.equal(replay.headers['idempotent-replayed'], 'true');
      assert.equal(runs, 1);
    } finally {
      gate.open();
      await a.close();
      await b.close();
    }
  });
});

describe('a claim that waited on a lock', () => {
  // The lease counts from the claim's transaction start, before any wait. A claim that waited
  // longer than its lock (a 1 s lock, the default 5 s query timeout) committed a lease already
  // run out: the next request with the key took it over while the first still ran.
  const instance = async (gate?: Gate): Promise<{ app: Service; runs: () => number }> => {
    const app = await createService({ config, openapi: { title: 'idempotency test', version: '0.0.0' }, logger: false });
    await app.register(idempotency, { pool, lockTimeoutMs: 1000 });
    let runs = 0;
    app.post('/v1/slow', { schema: { body: ThingBody, response: { 201: Thing, 409: ProblemResponse, 503: ProblemResponse } } }, async (request, reply) => {
      runs += 1;
      if (gate !== undefined) await gate.arrive();
      reply.code(201);
      return { n: runs, name: request.body.name };
    });
    return { app, runs: () => runs };
  };
  const holdingTheTable = async <T>(ms: number, during: () => Promise<T>): Promise<T> => {
    const locker = await pool.connect();
    try {
      await locker.query('BEGIN');
      await locker.query('LOCK TABLE runtime.idempotency_keys IN SHARE MODE');
      const result = during();
      await new Promise((resolve) => setTimeout(resolve, ms));
      await locker.query('COMMIT');
      return await result;
    } finally {
      locker.release();
    }
  };

  test('one that took more than half its lock commits nothing: 503 "not run", and the retry runs once', async () => {
    const { app, runs } = await instance();
    try {
      const first = await holdingTheTable(700, () => post(app, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-waited' }));
      assertProblem(first, 503, 'idempotency-unavailable');
      assert.equal(runs(), 0);
      assert.equal(await keyRow('k-waited'), undefined);
      // PostgreSQL answered with the error and rolled the statement back: nothing to withdraw.
      assert.equal((await pool.query('SELECT 1 FROM runtime.idempotency_withdrawn_claims')).rowCount, 0);
      assert.equal((await post(app, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-waited' })).statusCode, 201);
      assert.equal(runs(), 1);
    } finally {
      await app.close();
    }
  });

  test('one that took less keeps at least half its lock: a second request meanwhile is 409', async () => {
    const gate = new Gate();
    const a = await instance(gate);
    const b = await instance();
    let first: Promise<Response> | undefined;
    try {
      first = holdingTheTable(300, () => post(a.app, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-short' }));
      await gate.entered;
      assertProblem(await post(b.app, '/v1/slow', { name: 'a' }, { 'idempotency-key': 'k-short' }), 409, 'idempotency-key-in-progress');
      assert.equal(a.runs() + b.runs(), 1);
    } finally {
      gate.open();
      await first;
      await a.app.close();
      await b.app.close();
    }
  });
});

describe('a withdrawn claim statement, its statements run in a forced order', () => {
  // Each claim statement carries a batch id; a client that gives up on one withdraws that batch.
  // The fence is the batch, not the key's row: a first design that left a 'withdrawn' row on the
  // key as the fence was lifted by whatever the key went through meanwhile, and a late claim
  // then took the key (found by a review).
  const LOCK_MS = 60_000;
  const fingerprint = createHash('sha256').update('the request').digest();
  const claim = async (batch: string, token: string, key: string, at: Date | null = null): Promise<string[]> => {
    const r = await pool.query<{ tokens: string[] }>(STATEMENTS.claim, [['anonymous'], [key], [fingerprint], [token], at, LOCK_MS, IDEMPOTENCY_TTL_MS_DEFAULT, 5000, batch]);
    return r.rows[0]?.tokens ?? [];
  };
  const withdraw = async (db: pg.Pool | pg.PoolClient, batch: string, token: string, key: string): Promise<number> => {
    const r = await db.query<{ deleted: number }>(STATEMENTS.withdraw, [batch, ['anonymous'], [key], [token], null, IDEMPOTENCY_TTL_MS_DEFAULT]);
    return r.rows[0]?.deleted ?? -1;
  };
  const withdrawnRefusal = (error: unknown): boolean => error instanceof Error && (error as { code?: string }).code === '57014' && /withdrawn/.test(error.message);
  const tokenOf = async (key: string): Promise<string | undefined> =>
    (await pool.query<{ token: string }>("SELECT lock_token::text AS token FROM runtime.idempotency_keys WHERE client_id = 'anonymous' AND key = $1", [key])).rows[0]?.token;

  test('one that arrives after its withdrawal takes nothing, whatever the key went through meanwhile', async () => {
    // A retry took the key, then released it (its handler's answer was not final).
    const [a1, b2] = [randomUUID(), randomUUID()];
    const [t1, t2] = [randomUUID(), randomUUID()];
    assert.equal(await withdraw(pool, a1, t1, 'w-released'), 0);
    assert.deepEqual(await claim(b2, t2, 'w-released'), [t2]);
    assert.equal((await pool.query(STATEMENTS.release, ['anonymous', 'w-released', t2])).rowCount, 1);
    await assert.rejects(claim(a1, t1, 'w-released'), withdrawnRefusal);
    assert.equal(await keyRow('w-released'), undefined);
    const t3 = randomUUID();
    assert.deepEqual(await claim(randomUUID(), t3, 'w-released'), [t3], 'the next claim takes the key');

    // The retry's statement failed as well, and was withdrawn in turn; both arrive late.
    const [c1, c2] = [randomUUID(), randomUUID()];
    const [u1, u2] = [randomUUID(), randomUUID()];
    await withdraw(pool, c1, u1, 'w-twice');
    await withdraw(pool, c2, u2, 'w-twice');
    await assert.rejects(claim(c1, u1, 'w-twice'), withdrawnRefusal);
    await assert.rejects(claim(c2, u2, 'w-twice'), withdrawnRefusal);
    assert.equal(await keyRow('w-twice'), undefined);
  });

  test('one still running is waited for, and what it committed is removed', async () => {
    const [batch, token] = [randomUUID(), randomUUID()];
    const running = await pool.connect();
    try {
      await running.query('BEGIN');
      assert.deepEqual((await running.query<{ tokens: string[] }>(STATEMENTS.claim, [['anonymous'], ['w-running'], [fingerprint], [token], null, LOCK_MS, IDEMPOTENCY_TTL_MS_DEFAULT, 5000, batch])).rows[0]?.tokens, [token]);
      let withdrawn: number | undefined;
      const withdrawal = withdraw(pool, batch, token, 'w-running').then((n) => {
        withdrawn = n;
      });
      await new Promise((resolve) => setTimeout(resolve, 200));
      assert.equal(withdrawn, undefined, 'the withdrawal waits for the claim');
      await running.query('COMMIT');
      await withdrawal;
      assert.equal(withdrawn, 1);
    } finally {
      running.release();
    }
    assert.equal(await keyRow('w-running'), undefined);
  });

  test('a withdrawal removes only its own claims: another request past its lock still stores its response', async () => {
    // A claimed 61 s ago with a 60 s lock and is still running; B, a retry of the same request,
    // sent a claim that failed, and withdraws it. A's row is not B's to take.
    const [ta, tb] = [randomUUID(), randomUUID()];
    assert.deepEqual(await claim(randomUUID(), ta, 'w-other', new Date(Date.now() - 61_000)), [ta]);
    assert.equal(await withdraw(pool, randomUUID(), tb, 'w-other'), 0);
    assert.equal(await tokenOf('w-other'), ta);
    const stored = await pool.query(STATEMENTS.complete, [['anonymous'], ['w-other'], [ta], [201], ['{}'], [Buffer.from('ok')], null, IDEMPOTENCY_TTL_MS_DEFAULT]);
    assert.equal(stored.rowCount, 1, "A's response is stored");
  });

  test('the pruner removes withdrawals once they expire, in as many batches as it takes', async () => {
    const batches = Array.from({ length: 7 }, () => randomUUID());
    for (const batch of batches) await withdraw(pool, batch, randomUUID(), 'w-pruned');
    const count = async (): Promise<number> =>
      (await pool.query<{ n: number }>('SELECT count(*)::int AS n FROM runtime.idempotency_withdrawn_claims WHERE batch = ANY($1::uuid[])', [batches])).rows[0]?.n ?? -1;
    await pruneIdempotencyKeys(pool, Date.now() + IDEMPOTENCY_TTL_MS_DEFAULT - 60_000, { batchSizeMax: 2 });
    assert.equal(await count(), 7, 'kept for the keys\' lifetime');
    await pruneIdempotencyKeys(pool, Date.now() + IDEMPOTENCY_TTL_MS_DEFAULT + 60_000, { batchSizeMax: 2 });
    assert.equal(await count(), 0);
  });

  test('under another isolation level than READ COMMITTED both refuse to run: their snapshot would predate the batch\'s lock', async () => {
    for (const level of ['REPEATABLE READ', 'SERIALIZABLE']) {
      const c = await pool.connect();
      try {
        for (const run of [
          () => c.query(STATEMENTS.claim, [['anonymous'], ['w-isolation'], [fingerprint], [randomUUID()], null, LOCK_MS, IDEMPOTENCY_TTL_MS_DEFAULT, 5000, randomUUID()]),
          () => withdraw(c, randomUUID(), randomUUID(), 'w-isolation'),
        ]) {
          await c.query(`BEGIN ISOLATION LEVEL ${level}`);
          await assert.rejects(run(), (e: unknown) => (e as { code?: string }).code === '25000' && /READ COMMITTED only/.test(String(e)), level);
          await c.query('ROLLBACK');
        }
      } finally {
        c.release();
      }
    }
    assert.equal(await keyRow('w-isolation'), undefined);
  });
});

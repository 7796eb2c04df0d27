import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import pg from 'pg';
import { Type } from 'typebox';
import { baseConfigSchema, BEARER_SECURITY_SCHEME, createService, documentRoute, idempotency, loadConfig, ProblemResponse } from '../src/index.ts';

/** The parts of an OpenAPI 3.1 document these assertions read. */
interface OpenApiDocument {
  openapi: string;
  info: unknown;
  components?: { securitySchemes?: Record<string, unknown> };
  paths: Record<string, Record<string, Operation | undefined> | undefined>;
}
interface MediaType {
  schema: { required?: string[]; properties?: Record<string, unknown> };
}
interface Operation {
  summary?: string;
  security?: Array<Record<string, string[]>>;
  parameters?: Array<{ in: string; name: string; required?: boolean; schema?: { maxLength?: number } }>;
  requestBody?: { content: Record<string, MediaType | undefined> };
  responses: Record<string, { content?: Record<string, MediaType | undefined> } | undefined>;
}

describe('/openapi.json', () => {
  it('documents routes registered on the service, from their schemas', async () => {
    const app = await createService({
      config: loadConfig(baseConfigSchema, {}),
      openapi: { title: 'Ledger API', version: '1.2.3', description: 'Accounts and transfers' },
      logger: false,
    });
    app.post(
      '/accounts/:accountId/holds',
      {
        schema: {
          summary: 'Place a hold',
          params: Type.Object({ accountId: Type.String({ format: 'uuid' }) }),
          querystring: Type.Object({ dryRun: Type.Optional(Type.Boolean()) }),
          body: Type.Object({ amountMinor: Type.Integer({ minimum: 1 }) }, { additionalProperties: false }),
          response: { 201: Type.Object({ holdId: Type.String() }), 409: ProblemResponse },
        },
      },
      async (_request, reply) => reply.code(201).send({ holdId: 'h-1' }),
    );

    const response = await app.inject({ method: 'GET', url: '/openapi.json' });
    assert.equal(response.statusCode, 200);
    const doc = response.json<OpenApiDocument>();
    assert.equal(doc.openapi, '3.1.0');
    assert.deepEqual(doc.info, { title: 'Ledger API', version: '1.2.3', description: 'Accounts and transfers' });

    const operation = doc.paths['/accounts/{accountId}/holds']?.post;
    assert.ok(operation);
    assert.equal(operation.summary, 'Place a hold');
    assert.deepEqual(
      (operation.parameters ?? []).map((p) => `${p.in}:${p.name}`).sort(),
      ['path:accountId', 'query:dryRun'],
    );
    assert.deepEqual(operation.requestBody?.content['application/json']?.schema.required, ['amountMinor']);
    // The route's own two, and the runtime's: 503 (shutting down, shedding) and 504 (deadline passed).
    assert.deepEqual(Object.keys(operation.responses).sort(), ['201', '409', '503', '504']);
    const conflict = operation.responses['409']?.content?.['application/problem+json'];
    assert.ok(conflict?.schema.properties?.request_id);

    assert.ok(doc.paths['/health']?.get, 'the runtime routes are documented too');
    assert.ok(doc.paths['/ready']?.get?.responses['503']?.content?.['application/problem+json']);
    assert.equal(doc.paths['/openapi.json'], undefined, 'the document does not describe itself');
    await app.close();
  });

  it('documents the bearer scheme, a guard\'s security and a plugin\'s header, which no route schema names', async () => {
    const app = await createService({ config: loadConfig(baseConfigSchema, {}), openapi: { title: 't', version: '1' }, logger: false });
    // A pool that is never asked anything: documenting the header needs none of the plugin's queries.
    const pool = new pg.Pool({ host: '127.0.0.1', port: 1 });
    try {
      await app.register(idempotency, { pool });
      // What a guard (the authz package's installHttpAuth) does for the routes it protects.
      app.addHook('onRoute', (route) => {
        if (route.url.startsWith('/v1/')) documentRoute(route, { security: [{ [BEARER_SECURITY_SCHEME]: [] }] });
      });
      const Ok = { 200: Type.Object({}) };
      app.post('/v1/payments', { schema: { headers: Type.Object({ 'x-tenant': Type.String() }), body: Type.Object({}), response: Ok } }, () => ({}));
      app.post('/v1/search', { config: { idempotent: false }, schema: { body: Type.Object({}), response: Ok } }, () => ({}));
      app.get('/public', { schema: { response: Ok } }, () => ({}));

      const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json<OpenApiDocument>();
      assert.deepEqual(doc.components?.securitySchemes?.[BEARER_SECURITY_SCHEME], {
        type: 'http',
        scheme: 'bearer',
        bearerFormat: 'JWT',
        description: 'An access token for this service\'s audience, sent as `Authorization: Bearer <token>`.',
      });
      const payments = doc.paths['/v1/payments']?.post;
      assert.deepEqual(payments?.security, [{ [BEARER_SECURITY_SCHEME]: [] }]);
      const headers = (payments?.parameters ?? []).filter((p) => p.in === 'header');
      assert.deepEqual(headers.map((p) => [p.name, p.required]), [['x-tenant', true], ['idempotency-key', false]]);
      assert.equal(headers[1]?.schema?.maxLength, 255);
      assert.deepEqual(doc.paths['/v1/search']?.post?.parameters, undefined, 'a route that opts out does not list the header');
      assert.equal(doc.paths['/public']?.get?.security, undefined);
      // Only the document changes: the route validates against its own schema, as before.
      const missing = await app.inject({ method: 'POST', url: '/v1/payments', payload: {} });
      assert.deepEqual(missing.json<{ errors: unknown }>().errors, [{ in: 'headers', path: '/x-tenant', message: 'is required' }]);
    } finally {
      await app.close();
      await pool.end();
    }
  });
});

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Type } from 'typebox';
import { baseConfigSchema, createService, loadConfig, ProblemResponse } from '../src/index.ts';

/** The parts of an OpenAPI 3.1 document these assertions read. */
interface OpenApiDocument {
  openapi: string;
  info: unknown;
  paths: Record<string, Record<string, Operation | undefined> | undefined>;
}
interface MediaType {
  schema: { required?: string[]; properties?: Record<string, unknown> };
}
interface Operation {
  summary?: string;
  parameters?: Array<{ in: string; name: string }>;
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
    assert.deepEqual(Object.keys(operation.responses).sort(), ['201', '409']);
    const conflict = operation.responses['409']?.content?.['application/problem+json'];
    assert.ok(conflict?.schema.properties?.request_id);

    assert.ok(doc.paths['/health']?.get, 'the runtime routes are documented too');
    assert.ok(doc.paths['/ready']?.get?.responses['503']?.content?.['application/problem+json']);
    assert.equal(doc.paths['/openapi.json'], undefined, 'the document does not describe itself');
    await app.close();
  });
});

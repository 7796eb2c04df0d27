/**
 * The HTTP plugin's resource id: a UUID in lower case, any other id as the request named it
 * (canonicalResourceId), so that a hold or a search on the id finds the record. And its actor
 * when the service names none: anonymous, an x-client-id kept only as a claim.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Type } from 'typebox';
import { createService } from '@ledgerline/service-runtime';
import { auditHttp, checkEntry, MemoryAuditSink } from '../src/index.ts';

test('the HTTP plugin records a UUID path id in lower case and keeps the case of any other id', async () => {
  const app = await createService({ config: { LOG_LEVEL: 'fatal', BODY_LIMIT_BYTES: 1024 }, openapi: { title: 't', version: '1' }, logger: false });
  const sink = new MemoryAuditSink();
  await app.register(auditHttp, { sink, service: 'test', routes: { 'GET /v1/things/:id': { action: 'test.read', recordClass: 'access', resourceType: 'thing' } } });
  app.get('/v1/things/:id', { schema: { response: { 200: Type.Object({ ok: Type.Boolean() }) } } }, () => ({ ok: true }));
  try {
    for (const id of ['0F3A9C2E-7B1D-4E8A-9C3F-5D6E7F8A9B0C', 'ACC-Case', 'acc-case']) {
      assert.equal((await app.inject({ method: 'GET', url: `/v1/things/${id}` })).statusCode, 200);
    }
    assert.deepEqual(
      sink.entries.map((e) => e.resource.id),
      ['0f3a9c2e-7b1d-4e8a-9c3f-5d6e7f8a9b0c', 'ACC-Case', 'acc-case'],
    );
  } finally {
    await app.close();
  }
});

test('HEAD on an audited read route is recorded as the GET is: it tells whether the resource exists', async () => {
  const app = await createService({ config: { LOG_LEVEL: 'fatal', BODY_LIMIT_BYTES: 1024 }, openapi: { title: 't', version: '1' }, logger: false });
  const sink = new MemoryAuditSink();
  await app.register(auditHttp, { sink, service: 'test', routes: { 'GET /v1/things/:id': { action: 'test.read', recordClass: 'access', resourceType: 'thing' } } });
  app.get('/v1/things/:id', { schema: { response: { 200: Type.Object({ ok: Type.Boolean() }) } } }, () => ({ ok: true }));
  try {
    assert.equal((await app.inject({ method: 'GET', url: '/v1/things/t-1' })).statusCode, 200);
    const head = await app.inject({ method: 'HEAD', url: '/v1/things/t-2' });
    assert.equal(head.statusCode, 200);
    assert.deepEqual(
      sink.entries.map((e) => [e.action, e.resource.id, (e.payload as { method: string }).method]),
      [['test.read', 't-1', 'GET'], ['test.read', 't-2', 'HEAD']],
    );
  } finally {
    await app.close();
  }
});

test('without an actorOf, a request is anonymous: an x-client-id is recorded as the caller\'s claim, not as a service', async () => {
  const app = await createService({ config: { LOG_LEVEL: 'fatal', BODY_LIMIT_BYTES: 1024 }, openapi: { title: 't', version: '1' }, logger: false });
  const sink = new MemoryAuditSink();
  await app.register(auditHttp, { sink, service: 'test', routes: { 'GET /v1/things/:id': { action: 'test.read', recordClass: 'access', resourceType: 'thing' } } });
  app.get('/v1/things/:id', { schema: { response: { 200: Type.Object({ ok: Type.Boolean() }) } } }, () => ({ ok: true }));
  try {
    assert.equal((await app.inject({ method: 'GET', url: '/v1/things/t-1', headers: { 'x-client-id': 'svc-payments' } })).statusCode, 200);
    assert.equal((await app.inject({ method: 'GET', url: '/v1/things/t-2' })).statusCode, 200);
    // A header that is not printable text is not repeated at all.
    assert.equal((await app.inject({ method: 'GET', url: '/v1/things/t-3', headers: { 'x-client-id': ' leading-space' } })).statusCode, 200);
    assert.deepEqual(
      sink.entries.map((e) => [e.resource.id, e.actor]),
      [
        ['t-1', { type: 'anonymous', id: 'claimed:svc-payments' }],
        ['t-2', { type: 'anonymous', id: 'anonymous' }],
        ['t-3', { type: 'anonymous', id: 'anonymous' }],
      ],
    );
    for (const e of sink.entries) checkEntry(e);
  } finally {
    await app.close();
  }
});

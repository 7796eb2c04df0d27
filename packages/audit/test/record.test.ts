/**
 * The leaf encoding (canonical JSON, and the hand-written leaf encoder that must equal it),
 * the checkpoint signing keys, and the reasons recorded for failed requests.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { propertySeed } from '@ledgerline/testing';
import { generateKeyPairSync } from 'node:crypto';
import {
  canonicalJson,
  canonicalResourceId,
  checkpointSignatureValid,
  keyIdOf,
  leafData,
  loadSigningKey,
  parsePublicKey,
  publicKeyPem,
  reasonOf,
  resourceIdForms,
  signCheckpoint,
  SigningKeyError,
  type AuditRecordFields,
} from '../src/index.ts';

/** The same value with every object's keys inserted in reverse order. */
const reversed = (v: unknown): unknown =>
  Array.isArray(v) ? v.map(reversed) : v !== null && typeof v === 'object' ? Object.fromEntries(Object.entries(v).reverse().map(([k, x]) => [k, reversed(x)])) : v;

test('property: canonical JSON is JSON of the same value, independent of key order', () => {
  const seed = propertySeed('audit canonical json');
  fc.assert(
    fc.property(fc.jsonValue(), (v) => {
      const text = canonicalJson(v);
      assert.deepEqual(JSON.parse(text), JSON.parse(JSON.stringify(v)));
      assert.equal(canonicalJson(reversed(v)), text);
    }),
    { seed, numRuns: 500 },
  );
  // Keys sorted by code unit, integer-like ones included (JSON.stringify would put "0" first).
  assert.equal(canonicalJson({ b: 1, '': 0, '0': false, a: { z: 1, y: 2 } }), '{"":0,"0":false,"a":{"y":2,"z":1},"b":1}');
  assert.equal(canonicalJson({ b: undefined, a: [undefined, Number.NaN], d: new Date(0), c: () => 1 }), '{"a":[null,null],"d":"1970-01-01T00:00:00.000Z"}');
  assert.throws(() => canonicalJson(10n), TypeError);
  assert.throws(() => canonicalJson(undefined), TypeError);
});

test('property: the leaf encoder is the canonical JSON of the record fields', () => {
  const seed = propertySeed('audit leaf encoding');
  const text = fc.string({ unit: 'binary', maxLength: 20 });
  const nullable = fc.option(text, { nil: null });
  const hash = fc.option(fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b)), { nil: null });
  fc.assert(
    fc.property(
      fc.record({
        seq: fc.nat(), id: text, ms: fc.integer({ min: 0, max: 4_102_444_800_000 }), recordClass: text, actorType: text, actorId: text, action: text,
        outcome: fc.constantFrom('success' as const, 'failure' as const), reason: nullable, originService: text, originIp: nullable, originRequestId: nullable,
        originTraceId: nullable, resourceType: text, resourceId: text, subject: nullable, payloadHash: hash, personalHash: hash,
      }),
      ({ ms, ...rest }) => {
        const r: AuditRecordFields = { ...rest, occurredAt: new Date(ms) };
        const expected = canonicalJson({
          v: 1, seq: r.seq, id: r.id, time: r.occurredAt.toISOString(), class: r.recordClass, actor: { type: r.actorType, id: r.actorId }, action: r.action,
          outcome: r.outcome, reason: r.reason, origin: { service: r.originService, ip: r.originIp, requestId: r.originRequestId, traceId: r.originTraceId },
          resource: { type: r.resourceType, id: r.resourceId }, subject: r.subject, payloadHash: r.payloadHash?.toString('hex') ?? null, personalHash: r.personalHash?.toString('hex') ?? null,
        });
        assert.equal(leafData(r).toString('utf8'), expected);
      },
    ),
    { seed, numRuns: 60 },
  );
});

test('signing keys: a PKCS#8 PEM (with escaped newlines) signs verifiable checkpoints; anything else is refused', () => {
  const { privateKey } = generateKeyPairSync('ed25519');
  const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  const signer = loadSigningKey(pem.replaceAll('\n', '\\n'), { production: true });
  assert.equal(signer.development, false);
  assert.equal(signer.keyId, keyIdOf(parsePublicKey(publicKeyPem(signer.publicKey))));
  const cp = signCheckpoint(signer, { origin: 'o', treeSize: 3, rootHash: Buffer.alloc(32, 1), issuedAt: new Date(0) });
  assert.equal(checkpointSignatureValid(signer.publicKey, cp), true);
  assert.equal(checkpointSignatureValid(loadSigningKey('', { production: false }).publicKey, cp), false);
  assert.equal(checkpointSignatureValid(signer.publicKey, { ...cp, treeSize: 4 }), false);
  assert.throws(() => signCheckpoint(signer, { ...cp, origin: 'two\nlines' }), RangeError);
  const rsa = generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  assert.throws(() => loadSigningKey(rsa, { production: true }), /must be an Ed25519 private key/);
  assert.throws(() => loadSigningKey('garbage', { production: false }), SigningKeyError);
  assert.throws(() => loadSigningKey(undefined, { production: true }), /required in production/);
  assert.throws(() => parsePublicKey(generateKeyPairSync('rsa', { modulusLength: 1024 }).publicKey.export({ type: 'spki', format: 'pem' }).toString()), /must be Ed25519/);
});

test('resource ids: a UUID in lower case, any other id as it came; a search matches both spellings', () => {
  const u = '0F3A9C2E-7b1d-4E8A-9C3F-5D6E7F8A9B0C';
  assert.equal(canonicalResourceId(u), u.toLowerCase());
  assert.equal(canonicalResourceId('ACC-1'), 'ACC-1');
  // Only the whole shape: a UUID inside a longer id, or hex of the wrong lengths, keeps its case.
  assert.equal(canonicalResourceId(`${u}-X`), `${u}-X`);
  assert.equal(canonicalResourceId('0F3A9C2E7B1D4E8A9C3F5D6E7F8A9B0C'), '0F3A9C2E7B1D4E8A9C3F5D6E7F8A9B0C');
  assert.deepEqual(resourceIdForms(u), [u, u.toLowerCase()]);
  assert.deepEqual(resourceIdForms(u.toLowerCase()), [u.toLowerCase()]);
  assert.deepEqual(resourceIdForms('ACC-1'), ['ACC-1']);
});

test('the reason of a failed request: result code, else problem type, else title, else the status', () => {
  assert.equal(reasonOf(422, JSON.stringify({ type: 'https://ledgerline.dev/problems/transfer-rejected', result: 'exceeds_credits' })), 'exceeds_credits');
  assert.equal(reasonOf(403, JSON.stringify({ type: 'https://ledgerline.dev/problems/forbidden', title: 'Forbidden' })), 'forbidden');
  assert.equal(reasonOf(500, JSON.stringify({ type: 'about:blank', title: 'Internal Server Error' })), 'Internal Server Error');
  assert.equal(reasonOf(502, '{not json'), 'http 502');
  assert.equal(reasonOf(504, Buffer.from('x')), 'http 504');
});

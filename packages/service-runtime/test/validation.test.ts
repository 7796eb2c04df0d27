/**
 * The validator compiler (src/validation.ts): defaults are filled only where a schema declares
 * one, and a schema without any leaves the value as sent.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Type, type TSchema } from 'typebox';
import { declaresDefault, validatorCompiler } from '../src/validation.ts';

type Validate = (input: unknown) => { value?: unknown; error?: unknown };

function compile(schema: TSchema, httpPart: string): Validate {
  return validatorCompiler({ schema, httpPart, method: 'POST', url: '/x' }) as Validate;
}

test('declaresDefault finds a default at any depth, in arrays and unions too', () => {
  assert.equal(declaresDefault(Type.Object({ a: Type.String(), b: Type.Array(Type.Integer()) })), false);
  assert.equal(declaresDefault(Type.Object({ a: Type.Object({ b: Type.Integer({ default: 5 }) }) })), true);
  assert.equal(declaresDefault(Type.Array(Type.Object({ c: Type.Boolean({ default: false }) }))), true);
  assert.equal(declaresDefault(Type.Union([Type.String(), Type.Object({ d: Type.String({ default: 'x' }) })])), true);
});

test('defaults are filled where declared, converted in the querystring, and a schema without one passes the body as sent', () => {
  const query = compile(Type.Object({ limit: Type.Integer({ default: 50 }), order: Type.Optional(Type.String()) }), 'querystring');
  assert.deepEqual(query({}).value, { limit: 50 });
  assert.deepEqual(query({ limit: '7' }).value, { limit: 7 });
  const body = compile(Type.Object({ amount: Type.String(), flags: Type.Optional(Type.Object({ pending: Type.Boolean() })) }, { additionalProperties: false }), 'body');
  const sent = { amount: '12' };
  assert.equal(body(sent).value, sent, 'the body object itself, not a copy');
  assert.ok(body({ amount: 12 }).error !== undefined, 'a number where a string belongs is refused, not converted');
  assert.ok(body({ amount: '1', extra: true }).error !== undefined, 'an extra property is refused, not dropped');
});

test('a value outside an enum is one issue that names the choices', () => {
  const query = compile(Type.Object({ order: Type.Enum(['asc', 'desc'], { default: 'desc' }) }), 'querystring');
  assert.deepEqual(query({}).value, { order: 'desc' });
  const issues = query({ order: 'ASC' }).error as Array<{ instancePath: string; message: string }>;
  assert.deepEqual(issues.map((i) => [i.instancePath, i.message]), [['/order', 'must be one of "asc", "desc"']]);
});

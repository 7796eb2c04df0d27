/**
 * The validator compiler (src/validation.ts): defaults are filled only where a schema declares
 * one, and a schema without any leaves the value as sent.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Type, type TSchema } from 'typebox';
import { declaresDefault, textConverter, validatorCompiler } from '../src/validation.ts';

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

test('text converts only where it spells exactly one value of the type; anything else stays text', () => {
  const convert = textConverter(Type.Object({
    n: Type.Integer(),
    x: Type.Number(),
    b: Type.Boolean(),
    s: Type.String(),
    ids: Type.Array(Type.Integer()),
    either: Type.Union([Type.Integer(), Type.Literal('all')]),
    size: Type.Enum([10, 20]),
  }));
  assert.deepEqual(
    convert({ n: '-12', x: '2.5e-3', b: 'true', s: '7', ids: ['1', '2'], either: '3', size: '20' }),
    { n: -12, x: 0.0025, b: true, s: '7', ids: [1, 2], either: 3, size: 20 },
  );
  const loose = { n: '1.9', x: '0x10', b: '1', s: 'x', ids: ['1e2', '+5'], either: 'none', size: '10.0' };
  assert.deepEqual(convert(loose), loose, 'refused readings are left as sent, for validation to name');
  assert.deepEqual(convert({ ids: '4', either: 'all' }), { ids: [4], either: 'all' }, 'a lone value is one item');
  const sent = { s: 'x' };
  assert.equal(convert(sent), sent, 'nothing to convert: the same object');
  assert.equal(textConverter(Type.Object({ id: Type.String() }))(sent), sent);
  // The whole validator: the querystring's text, refused with the schema's own message.
  const query = compile(Type.Object({ limit: Type.Integer({ minimum: 1 }) }), 'querystring');
  for (const limit of ['1.9', 'true', '0x10', '1e2', '+5', ' 5', '', '9007199254740993']) {
    const issues = query({ limit }).error as Array<{ instancePath: string; message: string }>;
    assert.deepEqual(issues.map((i) => [i.instancePath, i.message]), [['/limit', 'must be integer']], limit);
  }
});

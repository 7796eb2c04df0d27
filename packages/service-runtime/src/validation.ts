/**
 * Request validation with TypeBox's own compiler instead of Fastify's default Ajv.
 *
 * Ajv's `coerceTypes` is one switch for every part of the request; we need two behaviours:
 * - body: JSON already carries types, so it is validated exactly as sent. `"12"` is not an
 *   amount, and a string where a number belongs is the client's bug to hear about.
 * - querystring, params, headers: they arrive as strings, so text that spells exactly a value
 *   of the schema's type is converted first (`?limit=10` satisfies `Type.Integer()`), and any
 *   other text is left as it is, to fail validation (see `textConverter`).
 * Defaults are filled in every part. Nothing is ever removed: a property that the schema
 * forbids (`additionalProperties: false`) is rejected, not silently dropped.
 *
 * Schemas must be self-contained: `$ref`s to schemas added with `app.addSchema` are not resolved.
 */
import type { FastifySchemaCompiler, FastifySchemaValidationError } from 'fastify';
import type { TSchema } from 'typebox';
import { Compile } from 'typebox/compile';
import type { TLocalizedValidationError } from 'typebox/error';
import { Value } from 'typebox/value';

/**
 * A `pattern` for text PostgreSQL can take: no NUL character (text refuses it) and no unpaired
 * surrogate (jsonb refuses it, and UTF-8 cannot carry it). Without it, such a string in a
 * request reaches the database and fails there as a 500. The pattern has no `u` flag, so it
 * sees UTF-16 code units: anything but NUL or a surrogate, or a high surrogate followed by a
 * low one.
 */
export const STORABLE_TEXT_PATTERN = '^(?:[^\\u0000\\uD800-\\uDFFF]|[\\uD800-\\uDBFF][\\uDC00-\\uDFFF])*$';

/** Clients get at most this many issues per response; the first ones are enough to fix a request. */
export const VALIDATION_ISSUES_MAX = 20;

export const validatorCompiler: FastifySchemaCompiler<TSchema> = ({ schema, httpPart }) => {
  const validator = Compile(schema);
  const convert = httpPart === 'body' ? unchanged : textConverter(schema);
  // Value.Default walks the schema on every call (about 3 % of the ledger service's CPU per
  // request, for a transfer body that declares no default): only where there is one to fill.
  const fillsDefaults = declaresDefault(schema);
  return (input: unknown) => {
    const converted = convert(input);
    const value = fillsDefaults ? Value.Default(schema, converted) : converted;
    if (validator.Check(value)) return { value };
    return { error: toIssues(validator.Errors(value)) };
  };
};

type Convert = (value: unknown) => unknown;
const unchanged: Convert = (value) => value;

/** Text that spells an integer: no sign but `-`, no leading zero, no point, exponent, space or radix prefix. */
const INTEGER_TEXT = /^(?:0|-?[1-9][0-9]*)$/;
/** Text that spells a number: JSON's number grammar (RFC 8259 §6), so no `+`, hex, `Infinity` or space. */
const NUMBER_TEXT = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$/;

function integerFromText(text: string): number | undefined {
  if (!INTEGER_TEXT.test(text)) return undefined;
  const value = Number(text);
  // Beyond 2^53 a JavaScript number is not the integer that was sent.
  return Number.isSafeInteger(value) ? value : undefined;
}

function numberFromText(text: string): number | undefined {
  if (!NUMBER_TEXT.test(text)) return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : undefined;
}

function booleanFromText(text: string): boolean | undefined {
  return text === 'true' ? true : text === 'false' ? false : undefined;
}

const fromText = (read: (text: string) => unknown): Convert => (value) => {
  if (typeof value !== 'string') return value;
  return read(value) ?? value;
};

/**
 * How text from a querystring, path or headers becomes the schema's types, built once per
 * schema. Text that spells exactly one value is converted: an integer (`-12`, within ±2^53),
 * a number (JSON's grammar), a boolean (`true`, `false`); an enum or a union takes the first
 * such reading it allows. Anything else stays text, and validation refuses it ("must be
 * integer"). TypeBox's Value.Convert is lenient by design (`1.9` → 1, `0x10` → 16, `1e2` →
 * 100, `true` → 1, `''` → 0, `+5` → 5): for a limit or a record number that is a guess at what
 * the client meant, and `/records/1.5/proof` must not answer with record 1. Objects convert
 * their named properties (not `patternProperties`); an array takes a lone value as one item.
 */
export function textConverter(schema: unknown): Convert {
  if (typeof schema !== 'object' || schema === null) return unchanged;
  const s = schema as { type?: unknown; anyOf?: unknown; enum?: unknown; properties?: unknown; items?: unknown };
  if (Array.isArray(s.anyOf)) return unionConverter(s.anyOf as unknown[]);
  if (Array.isArray(s.enum)) return enumConverter(s.enum as unknown[]);
  switch (s.type) {
    case 'integer':
      return fromText(integerFromText);
    case 'number':
      return fromText(numberFromText);
    case 'boolean':
      return fromText(booleanFromText);
    case 'object':
      return objectConverter(s.properties);
    case 'array':
      return arrayConverter(s.items);
    default:
      return unchanged;
  }
}

function objectConverter(properties: unknown): Convert {
  if (typeof properties !== 'object' || properties === null) return unchanged;
  const converters = Object.entries(properties)
    .map(([name, schema]) => [name, textConverter(schema)] as const)
    .filter(([, convert]) => convert !== unchanged);
  if (converters.length === 0) return unchanged;
  return (value) => {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return value;
    const input = value as Record<string, unknown>;
    let output = input;
    for (const [name, convert] of converters) {
      if (!Object.hasOwn(input, name)) continue;
      const converted = convert(input[name]);
      if (converted === input[name]) continue;
      // A copy, made once: the caller's object stays as it was parsed.
      if (output === input) output = { ...input };
      output[name] = converted;
    }
    return output;
  };
}

function arrayConverter(items: unknown): Convert {
  const convert = textConverter(items);
  return (value) => {
    if (typeof value === 'string') return [convert(value)];
    if (!Array.isArray(value) || convert === unchanged) return value;
    return value.map(convert);
  };
}

/** An enum names its values but not their type: a number is read only in its own spelling (`10`, not `10.0` or `1e1`). */
function enumConverter(allowed: readonly unknown[]): Convert {
  return (value) => {
    if (typeof value !== 'string' || allowed.includes(value)) return value;
    const number = numberFromText(value);
    if (number !== undefined && String(number) === value && allowed.includes(number)) return number;
    const boolean = booleanFromText(value);
    if (boolean !== undefined && allowed.includes(boolean)) return boolean;
    return value;
  };
}

function unionConverter(members: readonly unknown[]): Convert {
  const options = members.map((member) => ({ convert: textConverter(member), check: Compile(member as TSchema) }));
  return (value) => {
    if (options.some((option) => option.check.Check(value))) return value;
    for (const option of options) {
      const converted = option.convert(value);
      if (converted !== value && option.check.Check(converted)) return converted;
    }
    return value;
  };
}

/**
 * Whether a `default` keyword appears anywhere in the schema. A property that happens to be
 * named `default` also counts, which only means defaults are filled for nothing.
 */
export function declaresDefault(schema: unknown): boolean {
  if (Array.isArray(schema)) return schema.some(declaresDefault);
  if (typeof schema !== 'object' || schema === null) return false;
  return Object.entries(schema).some(([key, value]) => key === 'default' || declaresDefault(value));
}

/** One issue per offending value, each pointing at that value (not at its parent object). */
function toIssues(errors: readonly TLocalizedValidationError[]): FastifySchemaValidationError[] {
  const issues: FastifySchemaValidationError[] = [];
  const add = (error: TLocalizedValidationError, instancePath: string, message: string): void => {
    const { keyword, schemaPath, params } = error;
    issues.push({ keyword, schemaPath, params, instancePath, message });
  };
  for (const error of errors) {
    if (issues.length >= VALIDATION_ISSUES_MAX) break;
    switch (error.keyword) {
      case 'required':
        for (const name of error.params.requiredProperties) {
          add(error, `${error.instancePath}/${pointerToken(name)}`, 'is required');
        }
        break;
      case 'additionalProperties':
        for (const name of error.params.additionalProperties) {
          add(error, `${error.instancePath}/${pointerToken(name)}`, 'is not allowed');
        }
        break;
      case 'boolean':
        // `additionalProperties: false` also reports each extra property as "schema is false";
        // the case above already names them.
        if (error.schemaPath.endsWith('/additionalProperties')) break;
        add(error, error.instancePath, error.message);
        break;
      case 'enum':
        // Name the choices: "must be equal to one of the allowed values" leaves the client guessing.
        add(error, error.instancePath, `must be one of ${(error.params.allowedValues as readonly unknown[]).map((v) => JSON.stringify(v)).join(', ')}`);
        break;
      default:
        add(error, error.instancePath, error.message);
    }
  }
  return issues.slice(0, VALIDATION_ISSUES_MAX);
}

/** RFC 6901 escaping of one property name. */
function pointerToken(name: string): string {
  return name.replaceAll('~', '~0').replaceAll('/', '~1');
}

/**
 * Request validation with TypeBox's own compiler instead of Fastify's default Ajv.
 *
 * Ajv's `coerceTypes` is one switch for every part of the request; we need two behaviours:
 * - body: JSON already carries types, so it is validated exactly as sent. `"12"` is not an
 *   amount, and a string where a number belongs is the client's bug to hear about.
 * - querystring, params, headers: they arrive as strings, so they are converted to the
 *   schema's types first (`?limit=10` satisfies `Type.Integer()`).
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
  const converts = httpPart !== 'body';
  // Value.Default walks the schema on every call (about 3 % of the ledger service's CPU per
  // request, for a transfer body that declares no default): only where there is one to fill.
  const fillsDefaults = declaresDefault(schema);
  return (input: unknown) => {
    const converted = converts ? Value.Convert(schema, input) : input;
    const value = fillsDefaults ? Value.Default(schema, converted) : converted;
    if (validator.Check(value)) return { value };
    return { error: toIssues(validator.Errors(value)) };
  };
};

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

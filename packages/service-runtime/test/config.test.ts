import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Type } from 'typebox';
import { baseConfigSchema, ConfigError, loadConfig, sessionDatabaseUrl } from '../src/index.ts';

function configError(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof ConfigError, `expected ConfigError, got ${String(error)}`);
    return error;
  }
  assert.fail('expected a ConfigError');
}

describe('loadConfig', () => {
  it('gives safe local defaults when nothing is set', () => {
    assert.deepEqual(loadConfig(baseConfigSchema, {}), {
      PORT: 3000,
      HOST: '127.0.0.1',
      LOG_LEVEL: 'info',
      DATABASE_URL: 'postgres://postgres@127.0.0.1:5432/test',
      DATABASE_POOL_MAX: 10,
      DATABASE_CONNECT_TIMEOUT_MS: 2000,
      DATABASE_QUERY_TIMEOUT_MS: 35_000,
      DATABASE_SESSION_URL: '',
      SHUTDOWN_TIMEOUT_MS: 10_000,
      BODY_LIMIT_BYTES: 1_048_576,
    });
  });

  it('gives DATABASE_SESSION_URL for session-bound work when it is set, and DATABASE_URL when it is not', () => {
    const pooled = 'postgres://app@pgbouncer:6432/ledger';
    assert.equal(sessionDatabaseUrl(loadConfig(baseConfigSchema, { DATABASE_URL: pooled })), pooled);
    const direct = 'postgres://app@db:5432/ledger';
    assert.equal(sessionDatabaseUrl(loadConfig(baseConfigSchema, { DATABASE_URL: pooled, DATABASE_SESSION_URL: direct })), direct);
    assert.throws(() => loadConfig(baseConfigSchema, { DATABASE_SESSION_URL: 'mysql://db/ledger' }), /DATABASE_SESSION_URL/);
  });

  it('coerces strings to the schema types, ignores unknown variables and freezes the result', () => {
    const config = loadConfig(baseConfigSchema, {
      PORT: '8080',
      LOG_LEVEL: 'debug',
      DATABASE_URL: 'postgresql://app@db:5432/ledger',
      UNRELATED: 'x',
    });
    assert.equal(config.PORT, 8080);
    assert.equal(config.LOG_LEVEL, 'debug');
    assert.equal(config.DATABASE_URL, 'postgresql://app@db:5432/ledger');
    assert.equal('UNRELATED' in config, false);
    assert.ok(Object.isFrozen(config));
  });

  it('treats an empty variable as unset', () => {
    assert.equal(loadConfig(baseConfigSchema, { PORT: '' }).PORT, 3000);
  });

  it('names the bad variable and why', () => {
    const error = configError(() => loadConfig(baseConfigSchema, { PORT: 'abc' }));
    assert.equal(error.message, 'Invalid configuration: PORT must be integer (got "abc")');
    assert.deepEqual(error.issues, [{ variable: 'PORT', message: 'must be integer (got "abc")' }]);
  });

  it('enforces each limit of the base schema', () => {
    const cases: Array<[string, string, RegExp]> = [
      ['PORT', '70000', /^PORT must be <= 65535/],
      ['PORT', '0', /^PORT must be >= 1/],
      ['LOG_LEVEL', 'loud', /^LOG_LEVEL must be equal to one of the allowed values \["fatal",.*"trace"\]/],
      ['DATABASE_URL', 'mysql://db/x', /^DATABASE_URL must match pattern/],
      ['DATABASE_POOL_MAX', '101', /^DATABASE_POOL_MAX must be <= 100/],
      ['SHUTDOWN_TIMEOUT_MS', '1.5', /^SHUTDOWN_TIMEOUT_MS must be integer/],
      ['BODY_LIMIT_BYTES', '-1', /^BODY_LIMIT_BYTES must be >= 1024/],
    ];
    for (const [variable, value, expected] of cases) {
      const error = configError(() => loadConfig(baseConfigSchema, { [variable]: value }));
      assert.equal(error.issues.length, 1, `${variable}=${value}`);
      const [issue] = error.issues;
      assert.match(`${issue?.variable} ${issue?.message}`, expected);
    }
  });

  it('reports every bad variable at once', () => {
    const error = configError(() =>
      loadConfig(baseConfigSchema, { PORT: 'abc', LOG_LEVEL: 'loud', DATABASE_POOL_MAX: '0' }),
    );
    assert.deepEqual(
      error.issues.map((issue) => issue.variable).sort(),
      ['DATABASE_POOL_MAX', 'LOG_LEVEL', 'PORT'],
    );
    assert.match(error.message, /^Invalid configuration: .*PORT must be integer.*; .*/);
  });

  it('keeps secrets out of the message', () => {
    const error = configError(() =>
      loadConfig(baseConfigSchema, { DATABASE_URL: 'mysql://app:hunter2@db/ledger' }),
    );
    assert.match(error.message, /\(got "mysql:\/\/app:\*\*\*@db\/ledger"\)/);
    assert.doesNotMatch(error.message, /hunter2/);

    const schema = Type.Object({ SIGNING_KEY: Type.String({ minLength: 32 }) });
    const keyError = configError(() => loadConfig(schema, { SIGNING_KEY: 'short-secret' }));
    assert.equal(keyError.message, 'Invalid configuration: SIGNING_KEY must NOT have fewer than 32 characters (got <redacted>)');
  });

  it('lets services extend the base schema, and requires variables that have no default', () => {
    const schema = Type.Object({
      ...baseConfigSchema.properties,
      LEDGER_BATCH_SIZE_MAX: Type.Integer({ minimum: 1, maximum: 8190 }),
    });
    assert.equal(loadConfig(schema, { LEDGER_BATCH_SIZE_MAX: '512' }).LEDGER_BATCH_SIZE_MAX, 512);
    const error = configError(() => loadConfig(schema, {}));
    assert.equal(error.message, 'Invalid configuration: LEDGER_BATCH_SIZE_MAX is required');
  });
});

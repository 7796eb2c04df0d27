/**
 * Configuration from environment variables, validated once at start-up against a TypeBox
 * schema. A service that starts has a complete, typed, frozen configuration; one that does
 * not gets a single error naming every bad variable.
 */
import envSchema from 'env-schema';
import { Type } from 'typebox';
import type { Static, TObject } from 'typebox';
import { DATABASE_CONNECT_TIMEOUT_MS_DEFAULT, DATABASE_QUERY_TIMEOUT_MS_DEFAULT } from './pg-pool.ts';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const;

/** The variables every service has. Services extend it: `Type.Object({ ...baseConfigSchema.properties, ... })`. */
export const baseConfigSchema = Type.Object({
  PORT: Type.Integer({ minimum: 1, maximum: 65_535, default: 3000 }),
  HOST: Type.String({ minLength: 1, default: '127.0.0.1' }),
  LOG_LEVEL: Type.Enum(LOG_LEVELS, { default: 'info' }),
  DATABASE_URL: Type.String({
    pattern: '^postgres(ql)?://',
    default: 'postgres://postgres@127.0.0.1:5432/test',
  }),
  DATABASE_POOL_MAX: Type.Integer({ minimum: 1, maximum: 100, default: 10 }),
  // Client-side limits on waiting for a connection and for a query (databasePoolConfig): a
  // server that stops answering must fail requests, not hang them. The query limit should stay
  // above the engine's 30 s statement_timeout, so the server cancels slow statements first.
  DATABASE_CONNECT_TIMEOUT_MS: Type.Integer({ minimum: 100, maximum: 60_000, default: DATABASE_CONNECT_TIMEOUT_MS_DEFAULT }),
  DATABASE_QUERY_TIMEOUT_MS: Type.Integer({ minimum: 1000, maximum: 600_000, default: DATABASE_QUERY_TIMEOUT_MS_DEFAULT }),
  // A direct or session-pooled connection for what keeps state in its session (the migrations'
  // lock, the relay's partition locks, the audit sequencer's named statement). Empty:
  // DATABASE_URL, which may then go through a pooler that pools transactions (README, "Behind a
  // connection pooler"). `sessionDatabaseUrl` picks the one to use.
  DATABASE_SESSION_URL: Type.String({ pattern: '^(postgres(ql)?://.*)?$', default: '' }),
  // Kubernetes sends SIGKILL 30 s after SIGTERM by default; stay well inside that.
  SHUTDOWN_TIMEOUT_MS: Type.Integer({ minimum: 100, maximum: 120_000, default: 10_000 }),
  BODY_LIMIT_BYTES: Type.Integer({ minimum: 1024, maximum: 64 * 1024 * 1024, default: 1_048_576 }),
});

export type BaseConfig = Static<typeof baseConfigSchema>;

/** The URL for session-bound work: DATABASE_SESSION_URL when it is set, else DATABASE_URL. */
export function sessionDatabaseUrl(config: Pick<BaseConfig, 'DATABASE_URL' | 'DATABASE_SESSION_URL'>): string {
  return config.DATABASE_SESSION_URL === '' ? config.DATABASE_URL : config.DATABASE_SESSION_URL;
}

export interface ConfigIssue {
  variable: string;
  message: string;
}

export class ConfigError extends Error {
  readonly issues: readonly ConfigIssue[];

  constructor(issues: readonly ConfigIssue[]) {
    super(`Invalid configuration: ${issues.map((i) => `${i.variable} ${i.message}`).join('; ')}`);
    this.name = 'ConfigError';
    this.issues = issues;
  }
}

/**
 * Validates `env` against `schema`, fills defaults and coerces strings to the schema's types.
 * Variables the schema does not name are ignored. An empty variable counts as unset, so
 * `PORT=` in a compose file means "use the default", not "port 0".
 */
export function loadConfig<T extends TObject>(
  schema: T,
  env: NodeJS.ProcessEnv = process.env,
): Readonly<Static<T>> {
  const data: Record<string, string> = {};
  for (const name of Object.keys(schema.properties)) {
    const value = env[name];
    if (value !== undefined && value !== '') data[name] = value;
  }
  try {
    // env-schema sets additionalProperties on the schema it is given, so give it a copy.
    const config = envSchema<Static<T>>({ schema: { ...schema }, data, env: false });
    return Object.freeze(config);
  } catch (error) {
    throw new ConfigError(describeIssues(error, data));
  }
}

interface AjvIssue {
  instancePath: string;
  keyword: string;
  message?: string;
  params: Record<string, unknown>;
}

function describeIssues(error: unknown, data: Record<string, string>): ConfigIssue[] {
  const ajvIssues = (error as { errors?: AjvIssue[] }).errors;
  if (!Array.isArray(ajvIssues)) throw error;
  return ajvIssues.map((issue) => {
    if (issue.keyword === 'required') {
      return { variable: String(issue.params.missingProperty), message: 'is required' };
    }
    const variable = issue.instancePath.slice(1);
    const allowed = issue.keyword === 'enum' ? ` ${JSON.stringify(issue.params.allowedValues)}` : '';
    return {
      variable,
      message: `${issue.message ?? 'is invalid'}${allowed} (got ${shown(variable, data[variable])})`,
    };
  });
}

const SECRET_NAME = /SECRET|PASSWORD|TOKEN|KEY/i;
const SHOWN_CHARS_MAX = 80;

/** The offending value as it may appear in logs: secrets withheld, URL passwords masked, length capped. */
function shown(variable: string, value: string | undefined): string {
  if (value === undefined) return 'nothing';
  if (SECRET_NAME.test(variable)) return '<redacted>';
  const masked = value.replace(/^([a-z][a-z0-9+.-]*:\/\/[^:/@]*:)[^@]*@/i, '$1***@');
  const capped =
    masked.length > SHOWN_CHARS_MAX ? `${masked.slice(0, SHOWN_CHARS_MAX)}...` : masked;
  return JSON.stringify(capped);
}

/**
 * What every Ledgerline command line shares (events, audit, projections): strict parsing,
 * injectable I/O for tests, usage errors (exit 2), and the checked number and date options.
 */
import { parseArgs, type ParseArgsOptionsConfig } from 'node:util';

export interface CliIo {
  env?: Record<string, string | undefined>;
  stdout?: (text: string) => void;
  stderr?: (text: string) => void;
}

/** A bad command line: the CLI prints the message and its usage, and exits 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

/** The environment and line writers of `io`, defaulting to this process's. */
export function cliStreams(io: CliIo): { env: Record<string, string | undefined>; out: (text: string) => void; err: (text: string) => void } {
  return {
    env: io.env ?? process.env,
    out: io.stdout ?? ((t: string): void => void process.stdout.write(`${t}\n`)),
    err: io.stderr ?? ((t: string): void => void process.stderr.write(`${t}\n`)),
  };
}

/** `--name N`: a safe integer of at least `min`, or undefined when absent. */
export function intOption(name: string, value: string | undefined, min = 0): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`--${name} must be an integer >= ${min}, got ${value}`);
  return n;
}

/**
 * The earliest time PostgreSQL's timestamptz holds (4714-11-24 00:00 UTC BC, year -4713 as ISO
 * 8601 counts). Its latest (294276 AD) lies beyond every JavaScript date.
 */
const POSTGRES_TIMESTAMP_MIN_MS = Date.UTC(-4713, 10, 24);

/**
 * `--name ISO`: a valid date-time that PostgreSQL can hold, or undefined when absent. (A date
 * before 4713 BC parsed, and the command then died on the database's "timestamp out of range".)
 */
export function dateOption(name: string, value: string | undefined): Date | undefined {
  if (value === undefined) return undefined;
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) throw new UsageError(`--${name} must be a date-time (ISO 8601), got ${value}`);
  if (d.getTime() < POSTGRES_TIMESTAMP_MIN_MS) {
    throw new UsageError(`--${name} must be a date-time from 4713 BC on (PostgreSQL holds none earlier), got ${value}`);
  }
  return d;
}

/** The names of the NATS client's errors that report the broker's state or answer, not a bug. */
const NATS_FAILURES = new Set([
  'ConnectionError',
  'ClosedConnectionError',
  'DrainingConnectionError',
  'TimeoutError',
  'NoRespondersError',
  'RequestError',
  'ProtocolError',
  'AuthorizationError',
  'UserAuthenticationExpiredError',
  'PermissionViolationError',
  'JetStreamNotEnabled',
  'JetStreamApiError',
  'StreamNotFoundError',
  'ConsumerNotFoundError',
]);

/**
 * What a command prints for an error that ended it, after "failed: ". A failure of what it
 * talks to (PostgreSQL's error, a refused or lost connection, the broker's answer) is its
 * message alone: the operator has the cause, and a stack trace would only bury it. Anything
 * else is a bug, and its stack goes with it.
 */
export function describeFailure(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const e = error as Error & { code?: unknown; severity?: unknown; syscall?: unknown; detail?: unknown };
  // PostgreSQL's error response: a SQLSTATE and a severity.
  const fromPostgres = typeof e.code === 'string' && /^[0-9A-Z]{5}$/.test(e.code) && typeof e.severity === 'string';
  // A system call that failed: a refused connection, a name that does not resolve.
  const fromSystem = typeof e.code === 'string' && typeof e.syscall === 'string';
  if (fromPostgres) return `${e.message}${typeof e.detail === 'string' ? ` (${e.detail})` : ''} [SQLSTATE ${e.code as string}]`;
  // A system error's message names its call and code already ("connect ECONNREFUSED ..."); a plain "Error: " adds nothing.
  if (fromSystem) return e.name === 'Error' ? e.message : `${e.name}: ${e.message}`;
  if (NATS_FAILURES.has(e.name)) return `${e.name}: ${e.message}`;
  // A connection that ended while the driver waited on it (pg says so in plain errors).
  if (e.name === 'Error' && /^Connection terminated|^connect ETIMEDOUT|timeout exceeded when trying to connect/i.test(e.message)) return e.message;
  return e.stack ?? `${e.name}: ${e.message}`;
}

/** The options and positionals of a command line, as `parseArgs` gives them for `options`. */
export type ParsedCommandLine<O extends ParseArgsOptionsConfig> = ReturnType<typeof parseArgs<{ args: string[]; options: O; allowPositionals: true; strict: true }>>;

/**
 * Parses a command line strictly, with positionals (the command's words). A line it refuses
 * (an unknown option, a missing value) is written to `err` with the usage: the caller then
 * exits 2 on null.
 */
export function parseCommandLine<const O extends ParseArgsOptionsConfig>(argv: readonly string[], options: O, usage: string, err: (text: string) => void): ParsedCommandLine<O> | null {
  try {
    return parseArgs({ args: [...argv], options, allowPositionals: true, strict: true });
  } catch (error) {
    err(`${error instanceof Error ? error.message : String(error)}\n${usage}`);
    return null;
  }
}

/**
 * The database an operator command uses: DATABASE_SESSION_URL when it is set (a direct or
 * session-pooled connection, README "Behind a connection pooler"), else DATABASE_URL. A
 * command may keep state in its session (reconciliation's temporary table), and none is on a
 * hot path, so the direct connection is the one to take.
 */
export function operatorDatabaseUrl(env: Record<string, string | undefined>): string | undefined {
  const session = env.DATABASE_SESSION_URL;
  return session !== undefined && session !== '' ? session : env.DATABASE_URL;
}

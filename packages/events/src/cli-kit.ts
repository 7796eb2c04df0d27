/**
 * What every Ledgerline command line shares (events, audit, projections): injectable I/O for
 * tests, usage errors (exit 2), and the checked number and date options.
 */

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

/** `--name ISO`: a valid date-time, or undefined when absent. */
export function dateOption(name: string, value: string | undefined): Date | undefined {
  if (value === undefined) return undefined;
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) throw new UsageError(`--${name} must be a date-time (ISO 8601), got ${value}`);
  return d;
}

/**
 * What the benchmarks share: argument parsing, a seeded PRNG, Ctrl-C handling that still
 * cleans up, admin SQL, and the pgbench TPC-B reference phase (REQUIREMENTS §7: a reference
 * run beside the measurement, in the same benchmark run).
 */
import { spawn } from 'node:child_process';
import pg from 'pg';
import { ADMIN_DATABASE_URL, createTestDatabase } from '../packages/testing/src/index.ts';

export type Log = (message: string) => void;

/** Progress goes to stderr with the benchmark's name; stdout is kept for the JSON summary. */
export function benchLog(name: string): Log {
  return (message: string): void => {
    process.stderr.write(`[${name}] ${message}\n`);
  };
}

/** A numeric `--name` option: the fallback when absent, a RangeError when below `min`. */
export function intArg(name: string, value: string | undefined, fallback: number, min: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < min) throw new RangeError(`--${name} must be a number >= ${min}`);
  return n;
}

/** The seed from `--seed`, or a fresh one (printed by the caller so the run can be replayed). */
export function seedArg(value: string | undefined): number {
  return value !== undefined ? Number(value) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
}

/** TPC-B's rule is scale >= clients (one branch row per client, else pgbench measures row-lock
 * contention on `branches`). Init at scale 64 takes well under a minute here. */
export function defaultPgbenchScale(clients: number): number {
  return Math.max(clients, 10);
}

/** mulberry32: a small, fast, seeded PRNG; returns floats in [0, 1). */
export function prng(s: number): () => number {
  let a = s >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Aborted on the first SIGINT/SIGTERM (see `abortOnSignals`): stop the load, keep cleaning up. */
export const abort = new AbortController();

/** Ctrl-C: stop the load, kill child processes, and still drop the databases. A second one exits. */
export function abortOnSignals(log: Log): void {
  let signals = 0;
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      signals += 1;
      if (signals > 1) process.exit(130);
      log(`${sig}: stopping and cleaning up (again to exit at once)`);
      abort.abort(new Error(`interrupted by ${sig}`));
    });
  }
}

/** Sleeps, or returns early when the run is aborted. */
export const sleep = (ms: number): Promise<void> =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    abort.signal.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });

export function checkAborted(): void {
  if (abort.signal.aborted) throw abort.signal.reason;
}

/** One statement on the admin database (CHECKPOINT and the like). */
export async function admin(sql: string): Promise<void> {
  const c = new pg.Client({ connectionString: ADMIN_DATABASE_URL });
  await c.connect();
  try {
    await c.query(sql);
  } finally {
    await c.end();
  }
}

/** Runs a command to completion (killed on abort); resolves with its stdout and stderr. */
export function run(cmd: string, argv: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { signal: abort.signal, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${argv.join(' ')} exited with ${code}:\n${out.slice(-2000)}`));
    });
  });
}

// ------------------------------------------------------------------------------------------
// The reference: pgbench TPC-B

function pgbenchConnArgs(dbName: string): string[] {
  const u = new URL(ADMIN_DATABASE_URL);
  return ['-h', u.hostname, '-p', u.port || '5432', '-U', decodeURIComponent(u.username || 'postgres'), dbName];
}

export interface PgbenchFigures {
  tps: number;
  latencyMsAvg: number | null;
  scale: number;
  initSeconds: number;
}

export interface PgbenchOptions {
  clients: number;
  seconds: number;
  scale: number;
  log: Log;
  /** Called just before and just after the measured run (not the init), with the database's name. */
  onRun?: (moment: 'start' | 'end', database: string) => void;
}

/**
 * pgbench's builtin tpcb-like script on a fresh database of its own: `pgbench -i -s <scale>`,
 * CHECKPOINT, then `pgbench -c <clients> -j 2 -T <seconds> -M prepared`. The database is
 * dropped at the end, also on error or abort.
 */
export async function runPgbenchTpcb(options: PgbenchOptions): Promise<PgbenchFigures> {
  const { clients, seconds, scale, log, onRun } = options;
  const db = await createTestDatabase('ll_pgbench');
  try {
    const t0 = performance.now();
    log(`pgbench: init scale ${scale} in ${db.name}`);
    await run('pgbench', ['-i', '-q', '-s', String(scale), ...pgbenchConnArgs(db.name)]);
    const initSeconds = (performance.now() - t0) / 1000;
    log(`pgbench: init took ${initSeconds.toFixed(1)} s`);
    await admin('CHECKPOINT');
    checkAborted();
    log(`pgbench: tpcb-like, ${clients} clients, -j 2, ${seconds} s, prepared`);
    onRun?.('start', db.name);
    const out = await run('pgbench', [
      '-c', String(clients), '-j', '2', '-T', String(seconds), '-M', 'prepared', '-n', ...pgbenchConnArgs(db.name),
    ]);
    onRun?.('end', db.name);
    // PostgreSQL 15: "tps = 1234.567890 (without initial connection time)"; 13 and older say
    // "excluding connections establishing".
    const m = /tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)/.exec(out);
    if (m === null) throw new Error(`pgbench: could not find tps in output:\n${out}`);
    const lat = /latency average = ([\d.]+) ms/.exec(out);
    return { tps: Number(m[1]), latencyMsAvg: lat === null ? null : Number(lat[1]), scale, initSeconds };
  } finally {
    await db.drop();
  }
}

// ------------------------------------------------------------------------------------------

/** Ends the process once `main` settles: exit code 1 on failure, and never hang the caller. */
export function exitWhenDone(main: Promise<void>, log: Log): void {
  main.then(
    () => {
      // Nothing should hold the loop open; if something does, do not hang the caller.
      setTimeout(() => process.exit(), 2000).unref();
    },
    (error: unknown) => {
      log(`failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
      process.exitCode = 1;
      setTimeout(() => process.exit(), 2000).unref();
    },
  );
}

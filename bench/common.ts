/**
 * What the benchmarks share: argument parsing, a seeded PRNG, Ctrl-C handling that still
 * cleans up, admin SQL, and the pgbench TPC-B reference phase (REQUIREMENTS §7: a reference
 * run beside the measurement, in the same benchmark run).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import type { Histogram } from 'node:perf_hooks';
import type { ParseArgsConfig } from 'node:util';
import pg from 'pg';
import { seededRandom } from '@ledgerline/resilience';
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

// ------------------------------------------------------------------------------------------
// The ledger load: what bench:ledger and bench:http share

/** Chosen by measurement on the project's 2-core machine (see bench/README.md). */
export const LOAD_DEFAULTS = {
  seconds: 20,
  warmup: 2,
  clients: 384,
  accounts: 10_000,
  batchSizeMax: 2000,
  batchesInFlightMax: 3,
  lingerMs: 0,
} as const;

/** The `parseArgs` options of the load, the engine and the reference run. */
export const LOAD_OPTIONS = {
  seconds: { type: 'string' },
  warmup: { type: 'string' },
  clients: { type: 'string' },
  accounts: { type: 'string' },
  seed: { type: 'string' },
  'batch-size-max': { type: 'string' },
  'batches-in-flight': { type: 'string' },
  'linger-ms': { type: 'string' },
  pool: { type: 'string' },
  'pgbench-scale': { type: 'string' },
  'pgbench-clients': { type: 'string' },
  'no-pgbench': { type: 'boolean', default: false },
} as const satisfies ParseArgsConfig['options'];

export interface LoadSettings {
  seconds: number;
  warmupSeconds: number;
  clients: number;
  accountCount: number;
  batchSizeMax: number;
  batchesInFlightMax: number;
  lingerMs: number;
  /** Connections per engine: one per batch in flight, plus two for reads and the expiry sweep. */
  poolSize: number;
  /** `--pgbench-scale`; null: `defaultPgbenchScale` of the clients pgbench runs with. */
  pgbenchScale: number | null;
  /** `--pgbench-clients`; null: the load's clients, capped by `pgbenchClientsFor`. */
  pgbenchClients: number | null;
  runPgbench: boolean;
  seed: number;
}

/** LOAD_OPTIONS as `parseArgs` returns them. */
export interface LoadArgs {
  seconds?: string;
  warmup?: string;
  clients?: string;
  accounts?: string;
  seed?: string;
  'batch-size-max'?: string;
  'batches-in-flight'?: string;
  'linger-ms'?: string;
  pool?: string;
  'pgbench-scale'?: string;
  'pgbench-clients'?: string;
  'no-pgbench'?: boolean;
}

/** Reads LOAD_OPTIONS from parsed arguments; a RangeError names the first bad one. */
export function loadSettings(args: LoadArgs, defaults: Partial<Record<keyof typeof LOAD_DEFAULTS, number>> = {}): LoadSettings {
  const d = { ...LOAD_DEFAULTS, ...defaults };
  const count = (name: string, value: string | undefined, fallback: number, min: number): number =>
    Math.floor(intArg(name, value, fallback, min));
  const batchesInFlightMax = count('batches-in-flight', args['batches-in-flight'], d.batchesInFlightMax, 1);
  return {
    seconds: intArg('seconds', args.seconds, d.seconds, 1),
    warmupSeconds: intArg('warmup', args.warmup, d.warmup, 0),
    clients: count('clients', args.clients, d.clients, 1),
    accountCount: count('accounts', args.accounts, d.accounts, 2),
    batchSizeMax: count('batch-size-max', args['batch-size-max'], d.batchSizeMax, 1),
    batchesInFlightMax,
    lingerMs: count('linger-ms', args['linger-ms'], d.lingerMs, 0),
    poolSize: count('pool', args.pool, batchesInFlightMax + 2, 1),
    pgbenchScale: args['pgbench-scale'] === undefined ? null : count('pgbench-scale', args['pgbench-scale'], 1, 1),
    pgbenchClients: args['pgbench-clients'] === undefined ? null : count('pgbench-clients', args['pgbench-clients'], 1, 1),
    runPgbench: args['no-pgbench'] !== true,
    seed: seedArg(args.seed),
  };
}

/**
 * One random transfer's accounts and amount: two distinct accounts and 1..1000 minor units,
 * drawn in this order from the seeded PRNG, so that a seed replays the same load in either
 * benchmark.
 */
export function randomTransferParts(random: () => number, accountIds: readonly string[]): { debit: string; credit: string; amount: number } {
  const pick = (): string => accountIds[Math.floor(random() * accountIds.length)] as string;
  const debit = pick();
  let credit = pick();
  while (credit === debit) credit = pick();
  return { debit, credit, amount: 1 + Math.floor(random() * 1000) };
}

/** As `pgbench -i` does for its tables: planner statistics, then a checkpoint, so that the
 * ledger phase and the reference start from the same state. */
export async function settleAccounts(db: Pick<pg.ClientBase, 'query'>): Promise<void> {
  await db.query('VACUUM ANALYZE ledger.accounts');
  await admin('CHECKPOINT');
}

/** Nanoseconds (a histogram's unit) to milliseconds with two decimals. */
export const nsToMs = (ns: number): number => Math.round(ns / 1e4) / 100;

/** A latency histogram's figures, in milliseconds. */
export interface LatencyFigures {
  p50: number;
  p99: number;
  p999: number;
  p9999: number;
  max: number;
  mean: number;
}

/** The figures of a histogram of latencies in nanoseconds. */
export function latencyFigures(histogram: Histogram): LatencyFigures {
  return {
    p50: nsToMs(histogram.percentile(50)),
    p99: nsToMs(histogram.percentile(99)),
    p999: nsToMs(histogram.percentile(99.9)),
    p9999: nsToMs(histogram.percentile(99.99)),
    max: nsToMs(histogram.max),
    mean: nsToMs(histogram.mean),
  };
}

/** The latency fields of a summary. */
export function latencySummary(f: LatencyFigures): Record<string, number> {
  return {
    latency_ms_p50: f.p50,
    latency_ms_p99: f.p99,
    latency_ms_p999: f.p999,
    latency_ms_p9999: f.p9999,
    latency_ms_max: f.max,
    latency_ms_mean: f.mean,
  };
}

/**
 * The ledger's tables after a load: the accounts' totals and the transfer rows, amounts as text
 * (the sums are numeric). `balanced`: debits posted = credits posted = the amount of the `ok`
 * transfers, and nothing pending (the loads only post). Each benchmark compares the rows with
 * what it was told was applied.
 */
export interface LedgerTotals {
  debitsPosted: string;
  creditsPosted: string;
  pendingZero: boolean;
  transferRows: number;
  distinctIds: number;
  okRows: number;
  okSum: string;
  balanced: boolean;
}

export async function ledgerTotals(db: Pick<pg.ClientBase, 'query'>): Promise<LedgerTotals> {
  const r = await db.query<{ dpo: string; cpo: string; dp: string; cp: string; rows: string; ids: string; ok_rows: string; ok_sum: string }>(
    `SELECT (SELECT coalesce(sum(debits_posted), 0)::text FROM ledger.accounts) AS dpo,
            (SELECT coalesce(sum(credits_posted), 0)::text FROM ledger.accounts) AS cpo,
            (SELECT coalesce(sum(debits_pending), 0)::text FROM ledger.accounts) AS dp,
            (SELECT coalesce(sum(credits_pending), 0)::text FROM ledger.accounts) AS cp,
            (SELECT count(*)::text FROM ledger.transfers) AS rows,
            (SELECT count(DISTINCT id)::text FROM ledger.transfers) AS ids,
            (SELECT count(*)::text FROM ledger.transfers WHERE result = 'ok') AS ok_rows,
            (SELECT coalesce(sum(amount), 0)::text FROM ledger.transfers WHERE result = 'ok') AS ok_sum`,
  );
  const row = r.rows[0];
  if (row === undefined) throw new Error('invariant query returned no row');
  const pendingZero = row.dp === '0' && row.cp === '0';
  return {
    debitsPosted: row.dpo,
    creditsPosted: row.cpo,
    pendingZero,
    transferRows: Number(row.rows),
    distinctIds: Number(row.ids),
    okRows: Number(row.ok_rows),
    okSum: row.ok_sum,
    balanced: row.dpo === row.cpo && row.dpo === row.ok_sum && pendingZero,
  };
}

/** Logs the seed and the machine's state at the start; returns the 1-minute load average. */
export function logStart(log: Log, seed: number): number {
  log(`seed ${seed} (replay with --seed ${seed}); cpus ${cpus().length}; loadavg ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  return loadavg()[0] ?? 0;
}

export const loadAverage1m = (): number => Math.round((loadavg()[0] ?? 0) * 100) / 100;

/** The reference run's fields of a summary, beside the measured rate. */
export function pgbenchSummary(tpcb: PgbenchFigures | null, transfersPerS: number): Record<string, number | null> {
  return {
    pgbench_tpcb_tps: tpcb === null ? null : Math.round(tpcb.tps),
    ratio_vs_tpcb: tpcb === null ? null : Math.round((transfersPerS / tpcb.tps) * 100) / 100,
    pgbench_latency_ms_avg: tpcb?.latencyMsAvg ?? null,
    pgbench_scale: tpcb?.scale ?? null,
    pgbench_init_s: tpcb === null ? null : Math.round(tpcb.initSeconds * 10) / 10,
  };
}

/**
 * The clients pgbench runs with: the load's own count, or `override`, but at most what the
 * server has free now (max_connections less its superuser reserve, the sessions open and a
 * margin). pgbench needs one connection per client; the engine multiplexes any number of
 * clients over a few, which is the point of it. Logs when it caps.
 */
export async function pgbenchClientsFor(clients: number, override: number | null, log: Log): Promise<number> {
  if (override !== null) return override;
  const c = new pg.Client({ connectionString: ADMIN_DATABASE_URL });
  await c.connect();
  let usable: number;
  try {
    const r = await c.query<{ n: number }>(
      `SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
              - (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'client backend') - 8 AS n`,
    );
    usable = Math.max(1, r.rows[0]?.n ?? 1);
  } finally {
    await c.end();
  }
  if (usable >= clients) return clients;
  log(`pgbench: ${clients} clients exceed the server's usable connections; running ${usable} (--pgbench-clients overrides)`);
  return usable;
}

/** TPC-B's rule is scale >= clients (one branch row per client, else pgbench measures row-lock
 * contention on `branches`). Init at scale 64 takes well under a minute here. */
export function defaultPgbenchScale(clients: number): number {
  return Math.max(clients, 10);
}

/** The seeded PRNG of the loads (mulberry32, the resilience package's); returns floats in [0, 1). */
export const prng: (seed: number) => () => number = seededRandom;

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
  // `?host=/dir` names a Unix socket directory (libpq's form, which node-postgres reads too).
  const host = u.searchParams.get('host') ?? u.hostname;
  return ['-h', host, '-p', u.port || '5432', '-U', decodeURIComponent(u.username || 'postgres'), dbName];
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

// ------------------------------------------------------------------------------------------
// CPU accounting from /proc (Linux): clock ticks, 100 a second here.

const CLOCK_TICKS_PER_S = 100;

/** A process's CPU so far (utime + stime), in ms; 0 when it is gone or not ours to read. */
/** The q-quantile of ascending `sorted`, linear between the nearest ranks; 0 for none. */
export function quantile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return 0;
  const at = (sorted.length - 1) * q;
  const lo = sorted[Math.floor(at)] as number;
  const hi = sorted[Math.ceil(at)] as number;
  return lo + (hi - lo) * (at - Math.floor(at));
}

export function procCpuMs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // utime and stime: fields 14 and 15 of stat, 11 and 12 after the state field.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS_PER_S;
  } catch {
    return 0;
  }
}

/** The whole machine's CPU so far, every user's, in ms: busy (not idle or iowait) and total. */
export function machineCpuMs(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0] ?? '';
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const total = v.reduce((a, b) => a + b, 0);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  return { busy: ((total - idle) * 1000) / CLOCK_TICKS_PER_S, total: (total * 1000) / CLOCK_TICKS_PER_S };
}

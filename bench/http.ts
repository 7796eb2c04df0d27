/**
 * HTTP throughput benchmark of the ledger service (REQUIREMENTS §7), with pgbench's TPC-B beside
 * it in the same run.
 *
 *   npm run bench:http -- [--seconds 20] [--clients 128] [--batch-clients 8] [--batch 100]
 *                         [--accounts 10000] [--seed N] [--warmup 2] [--timeout 10]
 *                         [--batch-size-max N] [--batches-in-flight N] [--linger-ms N] [--pool N]
 *                         [--pgbench-clients N] [--pgbench-scale N] [--no-pgbench] [--no-batch]
 *                         [--instances 1] [--no-relay] [--service-cpu-prof DIR] [--idempotency-keys]
 *                         [--database-via HOST:PORT]
 *
 * A fresh database; the ledger service as a child process (`services/ledger/src/main.ts`, which
 * migrates it) with the engine settings bench:ledger uses (`--instances` > 1 starts several,
 * and autocannon spreads the connections over them), its event relay publishing to a JetStream
 * stream of this run's own (deleted at the end); N accounts through
 * POST /v1/accounts/batch. Then, with autocannon in this process:
 *   1. single: C connections, each POST /v1/transfers with one fresh transfer (UUIDv7 id,
 *      distinct random accounts) per request;
 *   2. batched: fewer connections, each POST /v1/transfers/batch with B transfers per request;
 *   3. pgbench's builtin tpcb-like script on a separate fresh database, C clients (or
 *      `--pgbench-clients`: pgbench cannot exceed max_connections), after the service has stopped.
 * Each load phase has an uncounted warm-up. Requests still in flight when a phase stops (and any
 * 5xx) are re-sent afterwards with the same ids, which is safe by design; then the database is
 * checked: debits = credits = the amounts acknowledged, one row per acknowledged id.
 * The service is stopped (SIGTERM, then SIGKILL) and the databases are dropped at the end, also on
 * error or Ctrl-C.
 *
 * Progress goes to stderr; the last line on stdout is one JSON object with the figures.
 */
import { spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { createHistogram, type RecordableHistogram } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import autocannon, { type AutocannonContext, type AutocannonRequest, type AutocannonResult } from 'autocannon';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import pg from 'pg';
import { newId } from '../packages/ledger/src/index.ts';
import { createTestDatabase, freePort } from '../packages/testing/src/index.ts';
import {
  abort,
  abortOnSignals,
  admin,
  benchLog,
  checkAborted,
  defaultPgbenchScale,
  exitWhenDone,
  intArg,
  latencyFigures,
  latencySummary,
  ledgerTotals,
  loadAverage1m,
  loadSettings,
  LOAD_OPTIONS,
  logStart,
  pgbenchClientsFor,
  pgbenchSummary,
  prng,
  randomTransferParts,
  runPgbenchTpcb,
  settleAccounts,
  sleep,
  type LatencyFigures,
  type PgbenchFigures,
} from './common.ts';

// The load and engine settings (LOAD_OPTIONS) are bench:ledger's, chosen by measurement there.
const DEFAULTS = {
  batchClients: 8,
  batch: 100,
  timeout: 10,
  instances: 1,
};
/** The service's limit on items per batch request (services/ledger/src/schemas.ts). */
const BATCH_ITEMS_MAX = 1000;

const { values: args } = parseArgs({
  options: {
    ...LOAD_OPTIONS,
    'batch-clients': { type: 'string' },
    batch: { type: 'string' },
    timeout: { type: 'string' },
    'no-batch': { type: 'boolean', default: false },
    instances: { type: 'string' },
    'no-relay': { type: 'boolean', default: false },
    'service-cpu-prof': { type: 'string' },
    // Every request carries an Idempotency-Key (a fresh UUID; a re-send repeats it), as a
    // client that retries safely sends it: the service then stores and completes a key per request.
    'idempotency-keys': { type: 'boolean', default: false },
    // HOST:PORT of a connection pooler in front of this PostgreSQL (PgBouncer in transaction
    // mode, say) that serves every database by its name: the service's DATABASE_URL goes through
    // it, its DATABASE_SESSION_URL (migrations, relay, sequencer) stays direct.
    'database-via': { type: 'string' },
  },
  strict: true,
});

// Each HTTP request costs the service far more CPU than the engine call it makes, so fewer
// connections reach the same rate: at 128 the p99 stays under 100 ms (bench/README.md).
const settings = loadSettings(args, { clients: 128 });
const { seconds, warmupSeconds, clients, accountCount, batchSizeMax, batchesInFlightMax, lingerMs, poolSize, runPgbench, seed } = settings;
const pgbenchScaleArg = settings.pgbenchScale;
const batchClients = Math.floor(intArg('batch-clients', args['batch-clients'], DEFAULTS.batchClients, 1));
const timeoutSeconds = intArg('timeout', args.timeout, DEFAULTS.timeout, 1);
const batchRequestSize = Math.floor(intArg('batch', args.batch, DEFAULTS.batch, 1));
if (batchRequestSize > Math.min(BATCH_ITEMS_MAX, batchSizeMax)) {
  throw new RangeError(`--batch must be at most ${Math.min(BATCH_ITEMS_MAX, batchSizeMax)} (the service's batch limit)`);
}
const instances = Math.floor(intArg('instances', args.instances, DEFAULTS.instances, 1));
const runBatched = !args['no-batch'];
const serviceCpuProfDir = args['service-cpu-prof'];
const relayEnabled = !args['no-relay'];
const NATS_URL = process.env.NATS_URL ?? 'nats://127.0.0.1:4222';
// This run's own JetStream stream, so that its events neither mix with nor linger in anyone else's.
const RUN_TAG = randomBytes(4).toString('hex');
const EVENTS_STREAM = `LL_BENCH_${RUN_TAG}`;
const EVENTS_SUBJECT_PREFIX = `llbench${RUN_TAG}.events`;

const log = benchLog('bench:http');
abortOnSignals(log);

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const JSON_HEADERS = { 'content-type': 'application/json' };
const keyed = args['idempotency-keys'];
const databaseVia = args['database-via'];
if (databaseVia !== undefined && !/^[A-Za-z0-9.-]+:\d{1,5}$/.test(databaseVia)) throw new RangeError('--database-via must be HOST:PORT');

/** The service's DATABASE_URL: the database itself, or the same database through --database-via. */
function pooledUrl(databaseUrl: string): string {
  if (databaseVia === undefined) return databaseUrl;
  const url = new URL(databaseUrl);
  url.host = databaseVia;
  return url.toString();
}
/** A fresh object each time: autocannon adds content-length to the headers object it is given. */
const headersFor = (sent: { key: string | null }): Record<string, string> =>
  sent.key === null ? { ...JSON_HEADERS } : { ...JSON_HEADERS, 'idempotency-key': sent.key };

// ------------------------------------------------------------------------------------------
// The service, as a child process

interface ServiceProcess {
  url: string;
  pid: number;
  stop(): Promise<void>;
}

async function startService(databaseUrl: string): Promise<ServiceProcess> {
  const port = await freePort();
  const nodeArgs = serviceCpuProfDir === undefined ? [] : ['--cpu-prof', `--cpu-prof-dir=${serviceCpuProfDir}`];
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PORT: String(port),
    HOST: '127.0.0.1',
    DATABASE_URL: pooledUrl(databaseUrl),
    ...(databaseVia === undefined ? {} : { DATABASE_SESSION_URL: databaseUrl }),
    LOG_LEVEL: 'warn',
    // The ledger's own throughput, as before bearer tokens: the bench mints none (bench:authz
    // measures the authorization check).
    LEDGER_AUTH: 'disabled',
    DATABASE_POOL_MAX: String(poolSize),
    LEDGER_BATCH_SIZE_MAX: String(batchSizeMax),
    LEDGER_BATCHES_IN_FLIGHT_MAX: String(batchesInFlightMax),
    LEDGER_BATCH_LINGER_MS: String(lingerMs),
    NATS_URL,
    EVENTS_RELAY_ENABLED: String(relayEnabled),
    EVENTS_STREAM,
    EVENTS_SUBJECT_PREFIX,
  };
  // Its own process group: Ctrl-C reaches only this process, which then stops the service in order.
  const child = spawn(process.execPath, [...nodeArgs, 'services/ledger/src/main.ts'], {
    cwd: REPO_ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  const pid = child.pid;
  if (pid === undefined) throw new Error('could not start the ledger service');
  const killOnExit = (): void => {
    child.kill('SIGKILL');
  };
  process.on('exit', killOnExit);
  let tail = '';
  const forward = (d: Buffer): void => {
    const text = d.toString();
    tail = (tail + text).slice(-4000);
    for (const line of text.split('\n')) if (line !== '') process.stderr.write(`[ledger ${pid}] ${line}\n`);
  };
  child.stdout.on('data', forward);
  child.stderr.on('data', forward);
  let exited = false;
  let stopping = false;
  const exit = new Promise<void>((resolve) => {
    child.on('exit', (code, signal) => {
      exited = true;
      process.off('exit', killOnExit);
      if (!stopping) {
        log(`the ledger service exited on its own (code ${code}, signal ${signal})`);
        abort.abort(new Error(`the ledger service exited (code ${code}, signal ${signal}):\n${tail}`));
      }
      resolve();
    });
  });
  const url = `http://127.0.0.1:${port}`;
  const stop = async (): Promise<void> => {
    stopping = true;
    if (exited) return;
    child.kill('SIGTERM');
    // The service's own shutdown timeout is 10 s; after 15 s it is hung.
    const timer = new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 15_000).unref());
    const done = await Promise.race([exit.then(() => true), timer]);
    if (!done) {
      log('the ledger service did not stop within 15 s of SIGTERM: SIGKILL');
      child.kill('SIGKILL');
      await exit;
    }
  };

  // Ready when GET /ready says the database is reachable (migrations ran before listening).
  const deadline = performance.now() + 60_000;
  for (;;) {
    if (abort.signal.aborted) {
      await stop();
      throw abort.signal.reason;
    }
    if (performance.now() > deadline) {
      await stop();
      throw new Error(`the ledger service was not ready within 60 s:\n${tail}`);
    }
    try {
      const r = await fetch(`${url}/ready`);
      await r.arrayBuffer();
      if (r.ok) break;
    } catch {
      // not listening yet
    }
    await sleep(100);
  }
  return { url, pid, stop };
}

// ------------------------------------------------------------------------------------------
// CPU accounting from /proc: who used the 2 cores during a phase

/** Linux reports process and system CPU time in USER_HZ ticks, 100 per second. */
const USER_HZ = 100;

interface CpuSnapshot {
  at: number;
  /** System-wide ticks: user, nice and system time; interrupt handling; stolen by the hypervisor; idle. */
  busy: number;
  irq: number;
  steal: number;
  idle: number;
  byPid: Map<number, { comm: string; ticks: number; title: string; kernel: boolean; started: string }>;
}

function cpuSnapshot(): CpuSnapshot | null {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0] ?? '';
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    const idle = (f[3] ?? 0) + (f[4] ?? 0);
    const busy = (f[0] ?? 0) + (f[1] ?? 0) + (f[2] ?? 0);
    const irq = (f[5] ?? 0) + (f[6] ?? 0);
    const steal = f[7] ?? 0;
    const byPid = new Map<number, { comm: string; ticks: number; title: string; kernel: boolean; started: string }>();
    for (const name of readdirSync('/proc')) {
      if (!/^\d+$/.test(name)) continue;
      try {
        const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
        const open = stat.indexOf('(');
        const close = stat.lastIndexOf(')');
        const rest = stat.slice(close + 2).split(' ');
        const comm = stat.slice(open + 1, close);
        // PostgreSQL's process title names a backend's database ("postgres: 15/main: user db ...").
        const title = comm === 'postgres' ? readFileSync(`/proc/${name}/cmdline`, 'utf8') : '';
        // Fields 14 and 15 (utime, stime) are 11 and 12 after the state field; the parent (4) is 1.
        // Kernel threads (writeback, softirq, ...) are kthreadd's (pid 2) children.
        const kernel = name === '2' || rest[1] === '2';
        // Field 22, when it started (in ticks since boot): a process's identity across samples.
        // Not its name: a kernel worker renames itself after each job ("kworker/0:1-events",
        // then "-mm_percpu_wq"), and taking it for a new process counted its whole life.
        byPid.set(Number(name), { comm, ticks: Number(rest[11]) + Number(rest[12]), title, kernel, started: rest[19] ?? '' });
      } catch {
        // the process ended meanwhile
      }
    }
    return { at: performance.now(), busy, irq, steal, idle, byPid };
  } catch {
    return null; // not Linux
  }
}

type CpuSplit = Record<string, number>;

/** More CPU than this (in cores) used by other work during a phase earns a warning. */
const OTHER_CORES_WARN = 0.1;

/** PostgreSQL's own processes, its backends for `database` and autovacuum on it, as opposed to
 * backends and autovacuum workers for other databases (other work on the machine). */
function isOurPostgres(title: string, database: string): boolean {
  const m = /^postgres: [^:]+: (.*)$/s.exec(title.replaceAll('\0', ' ').trim());
  if (m === null) return true;
  const what = m[1] ?? '';
  if (what.startsWith('autovacuum worker')) return what.split(' ')[2] === database;
  if (/^(checkpointer|background writer|walwriter|wal writer|autovacuum|logical replication|stats|archiver|startup|walsender|walreceiver)/.test(what)) return true;
  return what.split(' ')[1] === database;
}

/**
 * CPU use over a window, read from /proc at the start, every second and at the end, so that a
 * process that starts and ends within the window (an autovacuum worker, a test run nearby)
 * counts too, up to its last sample.
 */
class CpuWindow {
  readonly #first: CpuSnapshot | null;
  #last: CpuSnapshot | null;
  /** Per process: its ticks when the window opened (0 if it started later) and when last seen. */
  readonly #procs = new Map<number, { comm: string; title: string; kernel: boolean; started: string; from: number; to: number }>();
  readonly #timer: NodeJS.Timeout;

  constructor() {
    this.#first = cpuSnapshot();
    this.#last = this.#first;
    for (const [pid, { ticks, ...identity }] of this.#first?.byPid ?? []) this.#procs.set(pid, { ...identity, from: ticks, to: ticks });
    // Unreferenced: an aborted phase that never stops its window must not keep the process alive.
    this.#timer = setInterval(() => {
      this.#sample();
    }, 1000).unref();
  }

  #sample(): void {
    const s = cpuSnapshot();
    if (s === null) return;
    this.#last = s;
    for (const [pid, p] of s.byPid) {
      const known = this.#procs.get(pid);
      if (known !== undefined && known.started === p.started) {
        known.to = p.ticks;
        known.comm = p.comm;
        if (p.title !== '') known.title = p.title;
      } else {
        const { ticks, ...identity } = p;
        this.#procs.set(pid, { ...identity, from: 0, to: ticks });
      }
    }
  }

  /**
   * Cores used per role: the service, this process (autocannon), PostgreSQL (see isOurPostgres),
   * nats-server, pgbench, kernel threads (writeback of what PostgreSQL writes, softirq work),
   * other work (the rest of the busy time), interrupt handling charged to no process (loopback
   * TCP is partly softirq time), time stolen by the hypervisor, and idle. They add up to the
   * core count.
   */
  stop(servicePids: ReadonlySet<number>, database: string): CpuSplit | null {
    clearInterval(this.#timer);
    this.#sample();
    const a = this.#first;
    const b = this.#last;
    if (a === null || b === null) return null;
    const wall = (b.at - a.at) / 1000;
    if (wall <= 0) return null;
    const roles: Record<string, number> = { service: 0, load_generator: 0, postgres: 0, nats: 0, pgbench: 0, pooler: 0, kernel: 0 };
    const others = new Map<string, number>();
    for (const [pid, p] of this.#procs) {
      const delta = p.to - p.from;
      const role = servicePids.has(pid)
        ? 'service'
        : pid === process.pid
          ? 'load_generator'
          : p.comm === 'postgres' && isOurPostgres(p.title, database)
            ? 'postgres'
            : p.comm === 'nats-server'
              ? 'nats'
              : p.comm === 'pgbench'
                ? 'pgbench'
                : p.comm === 'pgbouncer' && databaseVia !== undefined
                  ? 'pooler'
                  : p.kernel
                  ? 'kernel'
                  : null;
      if (role !== null) roles[role] = (roles[role] ?? 0) + delta;
      else if (delta > 0) {
        const name = p.comm === 'postgres' ? 'postgres (other databases)' : p.comm;
        others.set(name, (others.get(name) ?? 0) + delta);
      }
    }
    const busy = b.busy - a.busy;
    const named = Object.values(roles).reduce((x, y) => x + y, 0);
    const cores = (ticks: number): number => Math.round((ticks / USER_HZ / wall) * 100) / 100;
    const split: CpuSplit = {};
    for (const [role, ticks] of Object.entries(roles)) if ((role !== 'pgbench' && role !== 'pooler') || ticks > 0) split[role] = cores(ticks);
    // Process times are counted in whole ticks, so this difference is approximate.
    split.other = cores(Math.max(0, busy - named));
    split.irq = cores(b.irq - a.irq);
    split.steal = cores(b.steal - a.steal);
    split.idle = cores(b.idle - a.idle);
    if ((split.other ?? 0) > OTHER_CORES_WARN) {
      const top = [...others].sort((x, y) => y[1] - x[1]).slice(0, 3);
      log(
        `  WARNING: other work used ${split.other} cores during this phase (${top.map(([comm, ticks]) => `${comm} ${cores(ticks).toFixed(2)}`).join(', ')}, ` +
          'and processes shorter than a second): these figures understate what the machine can do',
      );
    }
    return split;
  }
}

const formatSplit = (s: CpuSplit | null): string =>
  s === null ? 'n/a' : Object.entries(s).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ');

// ------------------------------------------------------------------------------------------
// What was sent and what the service acknowledged: every transfer is accounted for

/** One request's worth of transfers, kept until the service has answered it. */
interface Sent {
  path: string;
  body: string;
  /** The Idempotency-Key header it carries (`--idempotency-keys`), the same on a re-send. */
  key: string | null;
  amounts: number[];
  batch: boolean;
}

const ledger = {
  /** Transfers the service reported `ok` (or `exists`, for a re-sent one that had applied). */
  okTransfers: 0,
  okAmount: 0,
  /** Transfers given a final result other than ok. */
  rejected: 0,
  resultKinds: {} as Record<string, number>,
  statusCounts: {} as Record<string, number>,
  non2xx: 0,
  /** 409s to a keyed re-send whose first request was still running: expected, and re-sent again. */
  inProgress409: 0,
  /** Sent and not yet answered with a decision: in flight, timed out, or answered 5xx. */
  outstanding: new Set<Sent>(),
};

function countKind(kind: string): void {
  ledger.resultKinds[kind] = (ledger.resultKinds[kind] ?? 0) + 1;
}

/**
 * Records the service's answer to `sent`; returns the transfers it applied. A 5xx decided
 * nothing (or the outcome is unknown), so the request stays outstanding to be re-sent.
 */
function settle(sent: Sent, status: number, body: string): number {
  ledger.statusCounts[status] = (ledger.statusCounts[status] ?? 0) + 1;
  // The key's first request is still running (a re-send while it was in flight): undecided yet,
  // and not a failure: the idempotency plugin answers so by design.
  if (status === 409 && sent.key !== null) {
    ledger.inProgress409 += 1;
    return 0;
  }
  if (status < 200 || status > 299) ledger.non2xx += 1;
  if (status >= 500) return 0;
  ledger.outstanding.delete(sent);
  if (status >= 300) {
    // A decided rejection of the whole request (4xx): nothing applied.
    ledger.rejected += sent.amounts.length;
    countKind(`http_${status}`);
    if (ledger.rejected <= 5) log(`rejected: ${status} ${body.slice(0, 300)}`);
    return 0;
  }
  if (!sent.batch) {
    // 201: applied now; 200: `exists`, applied by an earlier send of the same request.
    countKind(status === 201 ? 'ok' : 'exists');
    ledger.okTransfers += 1;
    ledger.okAmount += sent.amounts[0] ?? 0;
    return 1;
  }
  const results = (JSON.parse(body) as { results: { result: string }[] }).results;
  let ok = 0;
  for (const [i, r] of results.entries()) {
    countKind(r.result);
    if (r.result === 'ok' || r.result === 'exists') {
      ok += 1;
      ledger.okAmount += sent.amounts[i] ?? 0;
    } else {
      ledger.rejected += 1;
    }
  }
  ledger.okTransfers += ok;
  return ok;
}

// ------------------------------------------------------------------------------------------
// Load phases

interface LoadFigures extends LatencyFigures {
  requests: number;
  responses2xx: number;
  transfers: number;
  measuredSeconds: number;
  requestsPerS: number;
  transfersPerS: number;
  errors: number;
  timeouts: number;
  inFlightAtStop: number;
  cpu: CpuSplit | null;
  /** Ledger timestamps bounding the measured window, for the batch-size query. */
  window: { from: string; to: string };
}

interface LoadOptions {
  name: string;
  serviceUrls: string[];
  servicePids: ReadonlySet<number>;
  database: string;
  connections: number;
  path: string;
  next: () => Sent;
  maxTimestamp: () => Promise<string>;
}


function runLoad(options: LoadOptions): Promise<LoadFigures> {
  const { name, connections } = options;
  const histogram: RecordableHistogram = createHistogram({ lowest: 1, highest: 120e9, figures: 3 });
  let measuring = false;
  let requests = 0;
  let responses2xx = 0;
  let transfers = 0;
  let tStart = 0;
  let tEnd = 0;
  let cpuWindow: CpuWindow | null = null;
  let cpu: CpuSplit | null = null;
  let fromTimestamp: Promise<string> = Promise.resolve('0');
  let toTimestamp: Promise<string> = Promise.resolve('0');

  const request: AutocannonRequest = {
    method: 'POST',
    path: options.path,
    headers: JSON_HEADERS,
    setupRequest: (req: AutocannonRequest, context: AutocannonContext) => {
      const sent = options.next();
      ledger.outstanding.add(sent);
      context.sent = sent;
      req.body = sent.body;
      if (sent.key !== null) req.headers = headersFor(sent);
      return req;
    },
    // Called with the connection's context before its next request is built (pipelining 1),
    // so `context.sent` is the request this response answers.
    onResponse: (status: number, body: string, context: AutocannonContext) => {
      const sent = context.sent as Sent | undefined;
      if (sent === undefined) return;
      context.sent = undefined;
      const applied = settle(sent, status, body);
      if (measuring) {
        requests += 1;
        if (status >= 200 && status <= 299) responses2xx += 1;
        transfers += applied;
      }
    },
  };

  return new Promise<LoadFigures>((resolve, reject) => {
    const instance = autocannon(
      {
        url: options.serviceUrls.length === 1 ? (options.serviceUrls[0] as string) : options.serviceUrls,
        connections,
        // Stopped by the timer below; the duration is only a backstop.
        duration: warmupSeconds + seconds + 30,
        timeout: timeoutSeconds,
        requests: [request],
      },
      (error, result: AutocannonResult) => {
        clearTimeout(startTimer);
        clearTimeout(stopTimer);
        clearInterval(progress);
        abort.signal.removeEventListener('abort', onAbort);
        if (error !== null) {
          reject(error);
          return;
        }
        const measuredSeconds = Math.max((tEnd - tStart) / 1000, 1e-9);
        Promise.all([fromTimestamp, toTimestamp]).then(
          ([from, to]) => {
            resolve({
              requests,
              responses2xx,
              transfers,
              measuredSeconds,
              requestsPerS: Math.round(requests / measuredSeconds),
              transfersPerS: Math.round(transfers / measuredSeconds),
              ...latencyFigures(histogram),
              errors: result.errors,
              timeouts: result.timeouts,
              inFlightAtStop: ledger.outstanding.size,
              cpu,
              window: { from, to },
            });
          },
          reject,
        );
      },
    );
    // Latency of every 2xx answer in the measured window (autocannon's own histogram rounds to ms).
    instance.on('response', (_client: unknown, status: number, _bytes: number, responseTimeMs: number) => {
      if (measuring && status >= 200 && status <= 299) {
        histogram.record(Math.min(Math.max(Math.round(responseTimeMs * 1e6), 1), 120e9));
      }
    });
    const onAbort = (): void => {
      measuring = false;
      if (tEnd === 0) tEnd = performance.now();
      instance.stop();
    };
    abort.signal.addEventListener('abort', onAbort, { once: true });
    let lastTransfers = 0;
    const progress = setInterval(() => {
      if (!measuring) return;
      log(`  ${name} ${((performance.now() - tStart) / 1000).toFixed(0)} s: ${transfers - lastTransfers} transfers/s`);
      lastTransfers = transfers;
    }, 1000);
    const startTimer = setTimeout(() => {
      fromTimestamp = options.maxTimestamp();
      cpuWindow = new CpuWindow();
      tStart = performance.now();
      measuring = true;
    }, warmupSeconds * 1000);
    const stopTimer = setTimeout(() => {
      measuring = false;
      tEnd = performance.now();
      cpu = cpuWindow?.stop(options.servicePids, options.database) ?? null;
      toTimestamp = options.maxTimestamp();
      instance.stop();
    }, (warmupSeconds + seconds) * 1000);
  });
}

/** Re-sends what had no decided answer (in flight at a phase's end, timed out, or 5xx) with the
 * same ids, until each is decided: an id is applied at most once, so this is always safe. */
async function resolveOutstanding(serviceUrl: string): Promise<number> {
  const pending = ledger.outstanding.size;
  for (let attempt = 1; attempt <= 10 && ledger.outstanding.size > 0; attempt++) {
    for (const sent of [...ledger.outstanding]) {
      checkAborted();
      try {
        const r = await fetch(`${serviceUrl}${sent.path}`, { method: 'POST', headers: headersFor(sent), body: sent.body });
        settle(sent, r.status, await r.text());
      } catch (error) {
        log(`re-send failed (attempt ${attempt}): ${String(error)}`);
      }
    }
    if (ledger.outstanding.size > 0) await sleep(500 * attempt);
  }
  if (pending > 0) log(`re-sent ${pending} requests that had no decided answer; ${ledger.outstanding.size} still undecided`);
  return pending;
}

// ------------------------------------------------------------------------------------------

interface HttpRun {
  single: LoadFigures;
  batched: LoadFigures | null;
  resolved: number;
  batchSizeMean: number | null;
  batchSizeMeanBatched: number | null;
  invariantsOk: boolean;
  invariants: Record<string, unknown>;
  /** Domain events the engine appended (one per account and applied transfer), and how many of
   * them the relay had published when the load ended. */
  eventRows: number | null;
  eventsPublished: number | null;
}

async function runHttp(databaseUrl: string, database: string): Promise<HttpRun> {
  const services: ServiceProcess[] = [];
  const db = new pg.Client({ connectionString: databaseUrl });
  try {
    // One at a time: the first one migrates the database.
    for (let i = 0; i < instances; i++) {
      const service = await startService(databaseUrl);
      services.push(service);
      log(`ledger service pid ${service.pid} at ${service.url}`);
    }
    const serviceUrls = services.map((s) => s.url);
    const servicePids = new Set(services.map((s) => s.pid));
    const serviceUrl = serviceUrls[0] as string;
    await db.connect();
    checkAborted();

    // Accounts, 1000 per request; no flags, so balances may go either way and no transfer fails.
    const accountIds: string[] = [];
    const tAccounts = performance.now();
    for (let i = 0; i < accountCount; i += BATCH_ITEMS_MAX) {
      checkAborted();
      const ids = Array.from({ length: Math.min(BATCH_ITEMS_MAX, accountCount - i) }, () => newId());
      const body = JSON.stringify({ accounts: ids.map((id) => ({ id, ledger: 'USD', code: 1 })) });
      const r = await fetch(`${serviceUrl}/v1/accounts/batch`, { method: 'POST', headers: JSON_HEADERS, body });
      const text = await r.text();
      if (r.status !== 200) throw new Error(`POST /v1/accounts/batch: ${r.status} ${text.slice(0, 500)}`);
      for (const result of (JSON.parse(text) as { results: { id: string; result: string }[] }).results) {
        if (result.result !== 'ok') throw new Error(`createAccounts: ${result.id}: ${result.result}`);
        accountIds.push(result.id);
      }
    }
    log(`created ${accountIds.length} accounts in ${((performance.now() - tAccounts) / 1000).toFixed(1)} s`);
    await settleAccounts(db);
    checkAborted();

    const random = prng(seed);
    const transferJson = (): [string, number] => {
      const { debit, credit, amount } = randomTransferParts(random, accountIds);
      return [
        `{"id":"${newId()}","debit_account_id":"${debit}","credit_account_id":"${credit}","amount":"${amount}","ledger":"USD","code":1}`,
        amount,
      ];
    };
    const nextSingle = (): Sent => {
      const [body, amount] = transferJson();
      return { path: '/v1/transfers', body, key: keyed ? randomUUID() : null, amounts: [amount], batch: false };
    };
    const nextBatch = (): Sent => {
      const parts: string[] = [];
      const amounts: number[] = [];
      for (let i = 0; i < batchRequestSize; i++) {
        const [json, amount] = transferJson();
        parts.push(json);
        amounts.push(amount);
      }
      return { path: '/v1/transfers/batch', body: `{"transfers":[${parts.join(',')}]}`, key: keyed ? randomUUID() : null, amounts, batch: true };
    };
    const maxTimestamp = async (): Promise<string> => {
      const r = await db.query<{ ts: string }>('SELECT coalesce(max(timestamp), 0)::text AS ts FROM ledger.transfers');
      return r.rows[0]?.ts ?? '0';
    };

    log(
      `single: ${clients} connections to ${instances} instance${instances > 1 ? 's' : ''}, POST /v1/transfers, ${accountIds.length} accounts, seed ${seed}; ` +
        `warm-up ${warmupSeconds} s, measure ${seconds} s`,
    );
    const single = await runLoad({ name: 'single', serviceUrls, servicePids, database, connections: clients, path: '/v1/transfers', next: nextSingle, maxTimestamp });
    checkAborted();
    const resentSingle = await resolveOutstanding(serviceUrl);
    checkAborted();
    log(
      `single: ${single.transfersPerS} transfers/s, ${single.requestsPerS} requests/s, p50 ${single.p50} ms, p99 ${single.p99} ms, ` +
        `p99.9 ${single.p999} ms; in flight at stop ${single.inFlightAtStop}; cpu cores: ${formatSplit(single.cpu)}`,
    );

    let batched: LoadFigures | null = null;
    let resentBatched = 0;
    if (runBatched) {
      // Untimed, as before the single phase (settleAccounts) and before pgbench's run: a
      // checkpoint, so the batched phase does not inherit the single phase's WAL and meet a
      // WAL-triggered checkpoint (two fell in one batched phase, with their full-page writes).
      await admin('CHECKPOINT');
      checkAborted();
      log(`batched: ${batchClients} connections, POST /v1/transfers/batch with ${batchRequestSize} transfers; warm-up ${warmupSeconds} s, measure ${seconds} s`);
      batched = await runLoad({ name: 'batched', serviceUrls, servicePids, database, connections: batchClients, path: '/v1/transfers/batch', next: nextBatch, maxTimestamp });
      checkAborted();
      resentBatched = await resolveOutstanding(serviceUrl);
      checkAborted();
      log(
        `batched: ${batched.transfersPerS} transfers/s, ${batched.requestsPerS} requests/s, p50 ${batched.p50} ms, p99 ${batched.p99} ms, ` +
          `p99.9 ${batched.p999} ms; cpu cores: ${formatSplit(batched.cpu)}`,
      );
    }

    const resolved = resentSingle + resentBatched;

    // The engine's batches, seen from the database: rows one transaction inserted share an xmin.
    const batchMean = async (w: { from: string; to: string }): Promise<number | null> => {
      const r = await db.query<{ n: string; tx: string }>(
        'SELECT count(*)::text AS n, count(DISTINCT xmin::text)::text AS tx FROM ledger.transfers WHERE timestamp > $1 AND timestamp <= $2',
        [w.from, w.to],
      );
      const n = Number(r.rows[0]?.n ?? 0);
      const tx = Number(r.rows[0]?.tx ?? 0);
      return tx === 0 ? null : Math.round((n / tx) * 10) / 10;
    };
    const batchSizeMean = await batchMean(single.window);
    const batchSizeMeanBatched = batched === null ? null : await batchMean(batched.window);

    const eventCounts = async (): Promise<{ eventRows: number | null; eventsPublished: number | null }> => {
      const has = await db.query<{ ok: boolean }>("SELECT to_regclass('events.relay_checkpoints') IS NOT NULL AS ok");
      if (has.rows[0]?.ok !== true) return { eventRows: null, eventsPublished: null };
      const e = await db.query<{ events: string; published: string }>(
        `SELECT (SELECT count(*)::text FROM events.events) AS events,
                (SELECT coalesce(sum(published), 0)::text FROM events.relay_checkpoints) AS published`,
      );
      return { eventRows: Number(e.rows[0]?.events ?? 0), eventsPublished: Number(e.rows[0]?.published ?? 0) };
    };

    // Invariants: double entry balances, and every acknowledged transfer is exactly one row.
    const totals = await ledgerTotals(db);
    const invariants = {
      debits_posted_total: totals.debitsPosted,
      credits_posted_total: totals.creditsPosted,
      pending_totals_zero: totals.pendingZero,
      transfer_rows: totals.transferRows,
      distinct_ids: totals.distinctIds,
      ok_rows: totals.okRows,
      ok_acknowledged: ledger.okTransfers,
      ok_amount_sum: totals.okSum,
      ok_amount_acknowledged: String(ledger.okAmount),
      rejected: ledger.rejected,
      undecided: ledger.outstanding.size,
    };
    const invariantsOk =
      totals.balanced &&
      totals.okSum === String(ledger.okAmount) &&
      totals.transferRows === totals.distinctIds &&
      totals.okRows === ledger.okTransfers &&
      ledger.outstanding.size === 0;
    return { single, batched, resolved, batchSizeMean, batchSizeMeanBatched, invariantsOk, invariants, ...(await eventCounts()) };
  } finally {
    await db.end().catch(() => {});
    await Promise.all(services.map((s) => s.stop()));
    if (services.length > 0) log(`ledger service${services.length > 1 ? 's' : ''} stopped`);
  }
}

// ------------------------------------------------------------------------------------------

/** Deletes this run's JetStream stream; returns how many messages (batches of events) it held. */
async function dropEventStream(): Promise<number | null> {
  try {
    const nats = await connect({ servers: NATS_URL, timeout: 5000 });
    try {
      const jsm = await jetstreamManager(nats);
      const messages = await jsm.streams.info(EVENTS_STREAM).then(
        (info) => info.state.messages,
        () => null,
      );
      if (messages !== null) await jsm.streams.delete(EVENTS_STREAM);
      return messages;
    } finally {
      await nats.close();
    }
  } catch (error) {
    log(`could not delete the JetStream stream ${EVENTS_STREAM} at ${NATS_URL}: ${String(error)}`);
    return null;
  }
}

async function main(): Promise<void> {
  const loadStart = logStart(log, seed);
  const db = await createTestDatabase('ll_bench');
  log(`database ${db.name}`);
  let http: HttpRun;
  let streamMessages: number | null = null;
  try {
    http = await runHttp(db.url, db.name);
  } finally {
    await db.drop();
    if (relayEnabled) streamMessages = await dropEventStream();
  }
  if (relayEnabled) {
    log(
      `events: ${http.eventRows} appended, ${http.eventsPublished} published by the relay when the load ended; ` +
        `${EVENTS_STREAM} held ${streamMessages} messages (deleted)`,
    );
  }
  log(`invariants ${http.invariantsOk ? 'ok' : 'BROKEN'}: ${JSON.stringify(http.invariants)}`);
  const loadMid = loadAverage1m();
  let tpcb: PgbenchFigures | null = null;
  let pgbenchClients = settings.pgbenchClients ?? clients;
  let pgbenchCpu: CpuSplit | null = null;
  if (runPgbench) {
    checkAborted();
    pgbenchClients = await pgbenchClientsFor(clients, settings.pgbenchClients, log);
    const scale = pgbenchScaleArg ?? defaultPgbenchScale(pgbenchClients);
    // The second snapshot is taken just before pgbench ends: its backends exit with it, and the
    // CPU time of a process that is gone can no longer be read.
    let cpuTimer: NodeJS.Timeout | undefined;
    tpcb = await runPgbenchTpcb({
      clients: pgbenchClients,
      seconds,
      scale,
      log,
      onRun: (moment, database) => {
        if (moment === 'start') {
          const window = new CpuWindow();
          cpuTimer = setTimeout(() => {
            pgbenchCpu = window.stop(new Set(), database);
          }, Math.max(seconds * 1000 - 500, 500));
        }
      },
    }).finally(() => {
      clearTimeout(cpuTimer);
    });
    log(`pgbench: ${tpcb.tps.toFixed(0)} tps (latency avg ${tpcb.latencyMsAvg} ms); cpu cores: ${formatSplit(pgbenchCpu)}`);
  }
  const { single, batched } = http;
  const errors = single.errors + (batched?.errors ?? 0);
  const summary = {
    transfers_per_s: single.transfersPerS,
    requests_per_s: single.requestsPerS,
    ...latencySummary(single),
    ...pgbenchSummary(tpcb, single.transfersPerS),
    pgbench_clients: tpcb === null ? null : pgbenchClients,
    clients,
    instances,
    idempotency_keys: keyed,
    accounts: accountCount,
    seconds,
    warmup_seconds: warmupSeconds,
    transfers: single.transfers,
    // Engine batch size, seen from the database (transfer rows per inserting transaction).
    batch_size_mean: http.batchSizeMean,
    batched_transfers_per_s: batched?.transfersPerS ?? null,
    batched_requests_per_s: batched?.requestsPerS ?? null,
    batched_latency_ms_p50: batched?.p50 ?? null,
    batched_latency_ms_p99: batched?.p99 ?? null,
    batched_latency_ms_p999: batched?.p999 ?? null,
    batched_ratio_vs_tpcb: tpcb === null || batched === null ? null : Math.round((batched.transfersPerS / tpcb.tps) * 100) / 100,
    batch_request_size: batchRequestSize,
    batch_clients: batchClients,
    batched_batch_size_mean: http.batchSizeMeanBatched,
    errors,
    timeouts: single.timeouts + (batched?.timeouts ?? 0),
    non_2xx: ledger.non2xx,
    in_progress_409: ledger.inProgress409,
    status_counts: ledger.statusCounts,
    result_kinds: ledger.resultKinds,
    in_flight_at_stop: single.inFlightAtStop + (batched?.inFlightAtStop ?? 0),
    resent_after_run: http.resolved,
    invariants_ok: http.invariantsOk,
    invariants: http.invariants,
    cpu_cores_single: single.cpu,
    cpu_cores_batched: batched?.cpu ?? null,
    cpu_cores_pgbench: pgbenchCpu,
    events_relay: relayEnabled,
    events_appended: http.eventRows,
    events_published: http.eventsPublished,
    events_stream_messages: streamMessages,
    batch_size_max: batchSizeMax,
    batches_in_flight_max: batchesInFlightMax,
    batch_linger_ms: lingerMs,
    pool_size: poolSize,
    database_via: databaseVia ?? null,
    seed,
    cpu_count: cpus().length,
    loadavg_1m_start: Math.round(loadStart * 100) / 100,
    loadavg_1m_after_http: loadMid,
    loadavg_1m_end: loadAverage1m(),
    node: process.version,
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  if (!http.invariantsOk || errors > 0 || ledger.non2xx > 0) process.exitCode = 1;
}

exitWhenDone(main(), log);

/**
 * Event bus throughput benchmark (REQUIREMENTS §7: events flow through the bus at 50,000 or
 * more per second), end to end: appended through the event store, relayed over JetStream by
 * the outbox relay, consumed with inbox deduplication. pgbench's TPC-B runs beside it.
 *
 *   npm run bench:events -- [--events 400000] [--writers 8] [--events-per-tx 200] [--streams-per-tx 20]
 *                           [--streams-per-writer 500] [--events-per-message 500] [--read-batch 5000]
 *                           [--prefetch 16] [--single-events 10000] [--pool N] [--rate 0] [--staged]
 *                           [--handler batch|per-event] [--consumer-concurrency 4] [--max-ack-pending N]
 *                           [--pgbench-seconds 10] [--no-pgbench] [--no-reconcile] [--writers-inline]
 *
 * Each phase has a fresh database (`ll_bench_events_*`, migrated) and JetStream streams of its
 * own (`BENCH_EVENTS_<tag>`, subjects `bench<tag>.events.p<partition>`); both are removed at
 * the end, also on error or Ctrl-C. In a phase, one relay and one consumer run while
 * `--writers` concurrent writers (in a worker thread of their own, bench/events-writers.ts,
 * unless `--writers-inline`) append `--events` events in total: each writer transaction
 * appends `--events-per-tx` events with `store.appendMany` (`--streams-per-tx` streams of the
 * writer's own, the same number of events each, versions assigned by the writer), payload a
 * transfer-posted event of about 200 bytes. The consumer (`EventConsumer`) inserts one effect
 * row per event into `bench_effects`, in its inbox transaction: `--handler batch` (default) with
 * `handleBatch` and one set-based statement per message, `--handler per-event` with `handler`
 * and one statement per event.
 *
 * 1. batched: the relay's batching (`--events-per-message`, default the relay's 500).
 * 2. single: `--single-events` events, one event per broker message (eventsPerMessageMax 1),
 *    for comparison (0 skips it).
 * 3. pgbench TPC-B on a fresh database, `--writers` clients, `--pgbench-seconds`.
 *
 * `--rate N` paces the writers to N events/s (for latency at a sustainable rate); `--staged`
 * runs append, relay and consumer one after the other, to measure each stage alone;
 * `--consumer-concurrency N` is the consumer's `partitionConcurrency` (partitions handled at
 * once), `--max-ack-pending` its `maxAckPending`. The JSON also splits the CPU time per 1000
 * events by process (this process, PostgreSQL backends, nats-server, the whole machine).
 *
 * Figures: `events_per_s` = events / (first append start → last event's consumer commit);
 * `append_events_per_s` = events / append phase (the same run, with the relay and consumer
 * running beside it); `publish_to_consume_ms_*` = from the broker's stored timestamp of the
 * message that first carried an event (the relay's publish, acked by the broker) to the
 * consumer's commit of that event (wall clock in the consumer's `afterCommit`; both clocks are
 * this host's); `append_to_consume_ms_*` = from the event's `recorded_at` (its transaction's
 * start) to the same commit. `duplicates_applied` = effect rows minus distinct events with
 * effects; `events_missing` = events without an effect. After each phase `reconcile` checks
 * the phase's range (not timed).
 *
 * Progress goes to stderr; the last line on stdout is one JSON object with the figures.
 */
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { createHistogram, type RecordableHistogram } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import pg from 'pg';
import {
  ensureEventStream,
  EventConsumer,
  EventStore,
  migrateEvents,
  OutboxRelay,
  reconcile,
  scanEventStream,
  sqlArrayLiteral,
  type StoredEvent,
} from '../packages/events/src/index.ts';
import { APPENDED, runWriters, runWritersInThread, STOP, writerCounters, type WriterShape } from './events-writers.ts';
import { createTestDatabase } from '../packages/testing/src/index.ts';
import {
  abort,
  abortOnSignals,
  benchLog,
  checkAborted,
  defaultPgbenchScale,
  exitWhenDone,
  intArg,
  machineCpuMs,
  procCpuMs,
  runPgbenchTpcb,
  sleep,
  type PgbenchFigures,
} from './common.ts';

const { values: args } = parseArgs({
  options: {
    events: { type: 'string' },
    writers: { type: 'string' },
    'events-per-tx': { type: 'string' },
    'streams-per-tx': { type: 'string' },
    'streams-per-writer': { type: 'string' },
    'events-per-message': { type: 'string' },
    'read-batch': { type: 'string' },
    prefetch: { type: 'string' },
    'consumer-concurrency': { type: 'string' },
    'max-ack-pending': { type: 'string' },
    'single-events': { type: 'string' },
    handler: { type: 'string' },
    rate: { type: 'string' },
    staged: { type: 'boolean', default: false },
    pool: { type: 'string' },
    'pgbench-seconds': { type: 'string' },
    'no-pgbench': { type: 'boolean', default: false },
    'no-reconcile': { type: 'boolean', default: false },
    'writers-inline': { type: 'boolean', default: false },
  },
  strict: true,
});

const int = (name: string, value: string | undefined, fallback: number, min: number): number => Math.floor(intArg(name, value, fallback, min));
const totalEvents = int('events', args.events, 400_000, 1);
const writers = int('writers', args.writers, 8, 1);
const eventsPerTx = int('events-per-tx', args['events-per-tx'], 200, 1);
const streamsPerTx = Math.min(int('streams-per-tx', args['streams-per-tx'], 20, 1), eventsPerTx);
const streamsPerWriter = Math.max(int('streams-per-writer', args['streams-per-writer'], 500, 1), streamsPerTx);
const eventsPerMessage = int('events-per-message', args['events-per-message'], 500, 1);
const readBatch = int('read-batch', args['read-batch'], 5000, 1);
const prefetch = int('prefetch', args.prefetch, 16, 1);
const consumerConcurrency = int('consumer-concurrency', args['consumer-concurrency'], 4, 1);
const maxAckPending = args['max-ack-pending'] === undefined ? undefined : int('max-ack-pending', args['max-ack-pending'], 64, 1);
const singleEvents = int('single-events', args['single-events'], 10_000, 0);
const poolSize = int('pool', args.pool, writers, 2);
const pgbenchSeconds = int('pgbench-seconds', args['pgbench-seconds'], 10, 1);
const NATS_URL = process.env.NATS_URL ?? 'nats://127.0.0.1:4222';
const handlerArg = args.handler ?? 'batch';
if (handlerArg !== 'per-event' && handlerArg !== 'batch') throw new RangeError('--handler must be per-event or batch');
const handlerKind: 'per-event' | 'batch' = handlerArg;
/** Appended events per second across all writers; 0 appends as fast as the writers can. */
const ratePerS = int('rate', args.rate, 0, 0);
const staged = args.staged;
/** The writers on this thread's event loop, beside the relay and the consumer, not in a worker thread. */
const writersInline = args['writers-inline'];

const log = benchLog('bench:events');
abortOnSignals(log);

/** No progress for this long means the pipeline is stuck: fail rather than hang. */
const STALL_MS_MAX = 60_000;

interface PhaseConfig {
  label: string;
  events: number;
  eventsPerMessage: number;
  handler: 'per-event' | 'batch';
  /** Append everything, then relay everything, then consume everything: each stage alone. */
  staged: boolean;
  ratePerS: number;
}

interface PhaseFigures {
  label: string;
  events: number;
  seconds: number;
  eventsPerS: number;
  appendSeconds: number;
  appendEventsPerS: number;
  messages: number;
  eventsPerMessageMean: number;
  publishToConsumeMs: Percentiles;
  appendToConsumeMs: Percentiles;
  duplicatesApplied: number;
  eventsMissing: number;
  duplicatesSkipped: number;
  redeliveries: number;
  reconcileOk: boolean | null;
  reconcileSeconds: number | null;
  loadavg1mEnd: number;
  /** Staged mode: each stage's rate on its own. */
  stages: { appendEventsPerS: number; publishEventsPerS: number; consumeEventsPerS: number } | null;
  /** CPU ms per 1000 events: the whole phase, and in staged mode each stage. */
  cpu: { total: CpuSplit; append?: CpuSplit; publish?: CpuSplit; consume?: CpuSplit };
}

interface Percentiles {
  p50: number;
  p99: number;
  p999: number;
  max: number;
}

function percentiles(h: RecordableHistogram): Percentiles {
  // Recorded in microseconds; reported in milliseconds.
  const ms = (us: number): number => Math.round(us / 10) / 100;
  return { p50: ms(h.percentile(50)), p99: ms(h.percentile(99)), p999: ms(h.percentile(99.9)), max: ms(h.max) };
}

const round = (x: number, digits = 0): number => Math.round(x * 10 ** digits) / 10 ** digits;

// ------------------------------------------------------------------------------------------
// CPU accounting: where the CPU time of a phase goes. /proc/<pid>/stat utime + stime (clock
// ticks, 100 per second on Linux here) for PostgreSQL's backends of the phase's database, its
// WAL writer, checkpointer and background writer (shared with anything else on the server),
// and nats-server (likewise shared); process.cpuUsage() for this process (writers, relay and
// consumer all run here); /proc/stat for the whole machine (other users included).

function natsServerPids(): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/comm`, 'utf8').trim() === 'nats-server') pids.push(Number(entry));
    } catch {
      // raced with its exit
    }
  }
  return pids;
}

/** Each role's connections carry its name, so its backends' CPU can be told apart. */
const ROLES = ['append', 'relay', 'consume'] as const;
type Role = (typeof ROLES)[number];
const appName = (role: Role): string => `bench-events-${role}`;

interface CpuSnapshot {
  nodeMs: number;
  backends: Map<number, { ms: number; role: Role | null }>;
  pgAuxMs: number;
  natsMs: number;
  machine: { busy: number; total: number };
}

async function cpuSnapshot(pool: pg.Pool, natsPids: number[]): Promise<CpuSnapshot> {
  const r = await pool.query<{ pid: number; mine: boolean; application_name: string }>(
    `SELECT pid, datname = current_database() AS mine, application_name FROM pg_stat_activity
      WHERE datname = current_database() OR backend_type IN ('walwriter', 'checkpointer', 'background writer')`,
  );
  const u = process.cpuUsage();
  return {
    nodeMs: (u.user + u.system) / 1000,
    backends: new Map(r.rows.filter((x) => x.mine).map((x) => [x.pid, { ms: procCpuMs(x.pid), role: ROLES.find((role) => appName(role) === x.application_name) ?? null }])),
    pgAuxMs: r.rows.filter((x) => !x.mine).reduce((n, x) => n + procCpuMs(x.pid), 0),
    natsMs: natsPids.reduce((n, pid) => n + procCpuMs(pid), 0),
    machine: machineCpuMs(),
  };
}

interface CpuSplit {
  /** CPU milliseconds per 1000 events, by component. */
  node: number;
  pgBackends: number;
  /** The backends' share by the connection's role (the rest: the bench's own queries). */
  pgByRole: Record<Role, number>;
  pgAux: number;
  nats: number;
  /** The whole machine's busy CPU (every user) per 1000 events, and its utilisation. */
  machine: number;
  machineUtilisation: number;
}

function cpuSplit(a: CpuSnapshot, b: CpuSnapshot, events: number): CpuSplit {
  let backends = 0;
  const byRole: Record<Role, number> = { append: 0, relay: 0, consume: 0 };
  for (const [pid, { ms, role }] of b.backends) {
    const used = ms - (a.backends.get(pid)?.ms ?? 0);
    backends += used;
    if (role !== null) byRole[role] += used;
  }
  const per1k = (ms: number): number => round((ms * 1000) / events, 1);
  return {
    node: per1k(b.nodeMs - a.nodeMs),
    pgBackends: per1k(backends),
    pgByRole: { append: per1k(byRole.append), relay: per1k(byRole.relay), consume: per1k(byRole.consume) },
    pgAux: per1k(b.pgAuxMs - a.pgAuxMs),
    nats: per1k(b.natsMs - a.natsMs),
    machine: per1k(b.machine.busy - a.machine.busy),
    machineUtilisation: round((b.machine.busy - a.machine.busy) / Math.max(1, b.machine.total - a.machine.total), 2),
  };
}

// ------------------------------------------------------------------------------------------

/** Waits for a condition, failing when `progress()` has not moved for STALL_MS_MAX. */
async function waitUntil(what: string, done: () => boolean, progress: () => number): Promise<void> {
  let last = progress();
  let lastAt = performance.now();
  while (!done()) {
    checkAborted();
    await sleep(5);
    const now = progress();
    if (now > last) {
      last = now;
      lastAt = performance.now();
    } else if (performance.now() - lastAt > STALL_MS_MAX) {
      throw new Error(`${what}: no progress for ${STALL_MS_MAX} ms (at ${now})`);
    }
  }
}

async function runPhase(nats: NatsConnection, config: PhaseConfig): Promise<PhaseFigures> {
  const tag = randomBytes(4).toString('hex');
  const streamName = `BENCH_EVENTS_${tag}`;
  const subjectPrefix = `bench${tag}.events`;
  const db = await createTestDatabase('ll_bench_events');
  const jsm = await jetstreamManager(nats);
  let pool: pg.Pool | null = null;
  let relayPool: pg.Pool | null = null;
  let consumerPool: pg.Pool | null = null;
  let relay: OutboxRelay | null = null;
  let consumer: EventConsumer | null = null;
  // The writers stop at the end of the phase, also when it fails, or on Ctrl-C.
  const counters = writerCounters();
  const stopWriters = (): void => {
    Atomics.store(counters, STOP, 1);
  };
  abort.signal.addEventListener('abort', stopWriters, { once: true });
  let writersClosed: Promise<void> | null = null;
  log(`[${config.label}] database ${db.name}, stream ${streamName}`);
  try {
    await migrateEvents(db.url);
    // Backends live for the whole phase, so their CPU time can be read at the end.
    // A pool for each role, as separate services would have: the writers' (which also runs
    // the bench's own queries), the relay's (its lock session and its reads) and the
    // consumer's (one transaction per partition lane).
    const rolePool = (role: Role, max: number): pg.Pool => {
      const p = new pg.Pool({ connectionString: db.url, max, idleTimeoutMillis: 0, application_name: appName(role) });
      p.on('error', (e) => log(`${role} pool error: ${e.message}`));
      return p;
    };
    pool = rolePool('append', poolSize);
    relayPool = rolePool('relay', 3);
    consumerPool = rolePool('consume', consumerConcurrency + 2);
    await pool.query('CREATE TABLE bench_effects (event_id uuid NOT NULL, amount_minor bigint NOT NULL)');
    const store = await EventStore.open(pool);
    await ensureEventStream(nats, streamName, subjectPrefix);

    // The consumer's first commit of each event, for the latency figures. Inside the timed run
    // only a mark per event position (positions are dense in a fresh database) and each batch's
    // new ids with its time; the map by id is built after the phase. (A map update per event
    // here took about 2 % of the machine's samples, the bench's own cost inside its figure.)
    let seen = new Uint8Array(config.events + 1024);
    const commits: { at: number; ids: string[] }[] = [];
    let committed = 0;
    // In an object: assigned from the consumer's callback.
    const marks: { consumedAt: number | null } = { consumedAt: null };
    const onCommit = (events: StoredEvent[]): void => {
      const ids: string[] = [];
      for (const e of events) {
        const p = Number(e.position);
        if (p >= seen.length) {
          const grown = new Uint8Array(Math.max(p + 1, seen.length * 2));
          grown.set(seen);
          seen = grown;
        }
        if (seen[p] === 1) continue;
        seen[p] = 1;
        ids.push(e.id);
      }
      committed += ids.length;
      commits.push({ at: Date.now(), ids });
      if (marks.consumedAt === null && committed >= config.events) marks.consumedAt = performance.now();
    };
    const activePool = pool;
    consumer = new EventConsumer({
      pool: consumerPool,
      nats,
      name: 'bench',
      streamName,
      filterSubject: `${subjectPrefix}.>`,
      prefetchMessages: prefetch,
      partitionConcurrency: consumerConcurrency,
      ...(maxAckPending === undefined ? {} : { maxAckPending }),
      onError: (e) => log(`consumer: ${String(e)}`),
      afterCommit: onCommit,
      ...(config.handler === 'per-event'
        ? {
            handler: async (e: StoredEvent, tx: pg.PoolClient) => {
              await tx.query('INSERT INTO bench_effects (event_id, amount_minor) VALUES ($1, $2)', [e.id, e.data.amount]);
            },
          }
        : {
            // Ids and amounts as array literals (sqlArrayLiteral), as the ledger and the audit
            // trail send theirs: pg's quoting of every element of an array parameter costs more.
            handleBatch: async (events: StoredEvent[], tx: pg.PoolClient) => {
              await tx.query('INSERT INTO bench_effects (event_id, amount_minor) SELECT * FROM unnest($1::uuid[], $2::bigint[])', [
                sqlArrayLiteral(events.map((e) => e.id)),
                sqlArrayLiteral(events.map((e) => String(e.data.amount))),
              ]);
            },
          }),
    });
    relay = new OutboxRelay({
      pool: relayPool,
      store,
      nats,
      streamName,
      subjectPrefix,
      eventsPerMessageMax: config.eventsPerMessage,
      readBatchMax: readBatch,
      onError: (e) => log(`relay: ${String(e)}`),
    });
    const activeConsumer = consumer;
    const activeRelay = relay;
    if (!config.staged) {
      await activeConsumer.start();
      activeRelay.start();
    }

    // The writers: the application appending the events (bench/events-writers.ts), in a worker
    // thread of their own unless --writers-inline; `appended` counts what they committed.
    const writerShape: WriterShape = {
      dbUrl: db.url,
      applicationName: appName('append'),
      writers,
      poolSize,
      events: config.events,
      eventsPerTx,
      streamsPerTx,
      streamsPerWriter,
      ratePerS: config.ratePerS,
    };
    const appendedSoFar = (): number => Atomics.load(counters, APPENDED);
    let t0 = performance.now();

    const wallStart = new Date();
    const natsPids = natsServerPids();
    const cpuStart = await cpuSnapshot(activePool, natsPids);
    t0 = performance.now();
    let appendEnd: number | null = null;
    let publishEnd: number | null = null;
    let cpuAppendEnd: CpuSnapshot | null = null;
    let cpuPublishEnd: CpuSnapshot | null = null;
    const appending = writersInline ? runWriters(writerShape, counters) : runWritersInThread(writerShape, counters);
    writersClosed = appending.closed;
    const writing = appending.written.then(async () => {
      appendEnd = performance.now();
      if (config.staged) cpuAppendEnd = await cpuSnapshot(activePool, natsPids);
    });
    let lastProgress = { at: t0, consumed: 0, appended: 0, published: 0 };
    const tick = setInterval(() => {
      const now = performance.now();
      const published = relay?.stats().published ?? 0;
      const appended = appendedSoFar();
      const consumed = committed;
      const dt = (now - lastProgress.at) / 1000;
      log(
        `[${config.label}] ${((now - t0) / 1000).toFixed(0)} s: appended ${appended} (+${round((appended - lastProgress.appended) / dt)}/s), ` +
          `published ${published} (+${round((published - lastProgress.published) / dt)}/s), consumed ${consumed} (+${round((consumed - lastProgress.consumed) / dt)}/s)`,
      );
      lastProgress = { at: now, consumed, appended, published };
    }, 1000);
    try {
      await writing;
      if (config.staged) {
        // Relay alone, then the consumer alone.
        activeRelay.start();
        await waitUntil('published', () => activeRelay.stats().published >= config.events, () => activeRelay.stats().published);
        publishEnd = performance.now();
        cpuPublishEnd = await cpuSnapshot(activePool, natsPids);
        await activeRelay.stop();
        await activeConsumer.start();
      }
      await waitUntil(`[${config.label}] consumed`, () => marks.consumedAt !== null, () => committed);
    } finally {
      clearInterval(tick);
    }
    const tEnd = marks.consumedAt ?? performance.now();
    const cpuEnd = await cpuSnapshot(activePool, natsPids);
    const cpu: PhaseFigures['cpu'] = { total: cpuSplit(cpuStart, cpuEnd, config.events) };
    if (cpuAppendEnd !== null && cpuPublishEnd !== null) {
      cpu.append = cpuSplit(cpuStart, cpuAppendEnd, config.events);
      cpu.publish = cpuSplit(cpuAppendEnd, cpuPublishEnd, config.events);
      cpu.consume = cpuSplit(cpuPublishEnd, cpuEnd, config.events);
    }
    const appendSeconds = ((appendEnd ?? tEnd) - t0) / 1000;
    const seconds = (tEnd - t0) / 1000;
    const relayStats = activeRelay.stats();
    await activeRelay.stop();
    relay = null;
    // Let the last acks reach the broker before stopping the consumer.
    await sleep(200);
    const consumerStats = activeConsumer.stats();
    await activeConsumer.stop();
    consumer = null;
    log(`[${config.label}] ${config.events} events in ${seconds.toFixed(2)} s (appended in ${appendSeconds.toFixed(2)} s); checking`);

    // Exactly once, from the effects themselves.
    const counts = await activePool.query<{ rows: string; distinct_events: string; events: string }>(
      `SELECT (SELECT count(*) FROM bench_effects)::text AS rows,
              (SELECT count(DISTINCT event_id) FROM bench_effects)::text AS distinct_events,
              (SELECT count(*) FROM events.events)::text AS events`,
    );
    const row = counts.rows[0];
    if (row === undefined) throw new Error('count query returned no row');
    const duplicatesApplied = Number(row.rows) - Number(row.distinct_events);
    const eventsMissing = Number(row.events) - Number(row.distinct_events);

    const committedAtMs = new Map<string, number>();
    for (const c of commits) for (const id of c.ids) committedAtMs.set(id, c.at);
    // Latency: the broker's timestamp of the first message that carried each event.
    const publish = createHistogram({ lowest: 1, highest: 3_600_000_000, figures: 3 });
    const append = createHistogram({ lowest: 1, highest: 3_600_000_000, figures: 3 });
    const firstSeenMs = new Map<string, number>();
    await scanEventStream({ nats, streamName, subjectPrefix, startTime: new Date(wallStart.getTime() - 60_000) }, (m) => {
      for (const e of m.events ?? []) {
        if (firstSeenMs.has(e.id)) continue;
        firstSeenMs.set(e.id, m.timestampMs);
        const committed = committedAtMs.get(e.id);
        if (committed === undefined) continue;
        publish.record(Math.max(1, Math.round((committed - m.timestampMs) * 1000)));
        append.record(Math.max(1, Math.round((committed - e.recordedAt.getTime()) * 1000)));
      }
      return undefined;
    });

    let reconcileOk: boolean | null = null;
    let reconcileSeconds: number | null = null;
    if (!args['no-reconcile']) {
      const r0 = performance.now();
      const report = await reconcile({
        pool: activePool,
        nats,
        streamName,
        subjectPrefix,
        from: new Date(wallStart.getTime() - 1000),
        to: new Date(Date.now() + 1000),
        onProgress: (m) => log(`[${config.label}] reconcile: ${m}`),
        effectCounts: async () => {
          const r = await activePool.query<{ event_id: string; n: number }>(
            'SELECT event_id::text, count(*)::int AS n FROM bench_effects GROUP BY event_id HAVING count(*) > 1',
          );
          // Only the counts above one matter for duplicates; the rest are one by the check above.
          return new Map(r.rows.map((x) => [x.event_id, x.n]));
        },
      });
      reconcileSeconds = round((performance.now() - r0) / 1000, 2);
      reconcileOk = report.ok;
      log(
        `[${config.label}] reconcile: ${report.ok ? 'ok' : 'GAPS'} (${report.events} events, ${report.broker.messages} messages, ` +
          `${report.broker.republished} republished) in ${reconcileSeconds} s`,
      );
      if (!report.ok) log(JSON.stringify(report.issueCounts));
    }

    return {
      label: config.label,
      events: config.events,
      seconds: round(seconds, 2),
      eventsPerS: round(config.events / seconds),
      appendSeconds: round(appendSeconds, 2),
      appendEventsPerS: round(config.events / appendSeconds),
      messages: relayStats.messages,
      eventsPerMessageMean: relayStats.messages === 0 ? 0 : round(relayStats.published / relayStats.messages, 1),
      publishToConsumeMs: percentiles(publish),
      appendToConsumeMs: percentiles(append),
      duplicatesApplied,
      eventsMissing,
      duplicatesSkipped: consumerStats.duplicatesSkipped,
      redeliveries: consumerStats.redeliveries,
      reconcileOk,
      reconcileSeconds,
      loadavg1mEnd: round(loadavg()[0] ?? 0, 2),
      cpu,
      stages:
        !config.staged || appendEnd === null || publishEnd === null
          ? null
          : {
              appendEventsPerS: round(config.events / ((appendEnd - t0) / 1000)),
              publishEventsPerS: round(config.events / ((publishEnd - appendEnd) / 1000)),
              consumeEventsPerS: round(config.events / ((tEnd - publishEnd) / 1000)),
            },
    };
  } finally {
    stopWriters();
    abort.signal.removeEventListener('abort', stopWriters);
    await writersClosed;
    await relay?.stop().catch(() => {});
    await consumer?.stop().catch(() => {});
    await pool?.end().catch(() => {});
    await relayPool?.end().catch(() => {});
    await consumerPool?.end().catch(() => {});
    await jsm.streams.delete(streamName).catch(() => false);
    await db.drop();
  }
}

async function main(): Promise<void> {
  const loadStart = round(loadavg()[0] ?? 0, 2);
  log(`cpus ${cpus().length}; loadavg ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  log(
    `shape: ${writers} writers, ${eventsPerTx} events per transaction over ${streamsPerTx} streams ` +
      `(${streamsPerWriter} streams per writer), ${totalEvents} events; ${eventsPerMessage} events per message max, ` +
      `relay read batch ${readBatch}, consumer prefetch ${prefetch}, pool ${poolSize}`,
  );
  const nats = await connect({ servers: NATS_URL, name: 'bench-events', maxReconnectAttempts: -1, reconnectTimeWait: 200 });
  let batched: PhaseFigures;
  let single: PhaseFigures | null = null;
  try {
    batched = await runPhase(nats, { label: 'batched', events: totalEvents, eventsPerMessage, handler: handlerKind, staged, ratePerS });
    log(`batched: ${JSON.stringify(batched)}`);
    if (singleEvents > 0) {
      checkAborted();
      single = await runPhase(nats, { label: 'single', events: singleEvents, eventsPerMessage: 1, handler: handlerKind, staged, ratePerS: 0 });
      log(`single: ${JSON.stringify(single)}`);
    }
  } finally {
    await nats.close();
  }
  let tpcb: PgbenchFigures | null = null;
  if (!args['no-pgbench']) {
    checkAborted();
    tpcb = await runPgbenchTpcb({ clients: writers, seconds: pgbenchSeconds, scale: defaultPgbenchScale(writers), log });
    log(`pgbench: ${tpcb.tps.toFixed(0)} tps (latency avg ${tpcb.latencyMsAvg} ms)`);
  }
  const summary = {
    events_per_s: batched.eventsPerS,
    append_events_per_s: batched.appendEventsPerS,
    publish_to_consume_ms_p50: batched.publishToConsumeMs.p50,
    publish_to_consume_ms_p99: batched.publishToConsumeMs.p99,
    publish_to_consume_ms_p999: batched.publishToConsumeMs.p999,
    publish_to_consume_ms_max: batched.publishToConsumeMs.max,
    publish_time_source: 'broker stored timestamp of the first message carrying the event -> consumer commit',
    append_to_consume_ms_p50: batched.appendToConsumeMs.p50,
    append_to_consume_ms_p99: batched.appendToConsumeMs.p99,
    duplicates_applied: batched.duplicatesApplied,
    events_missing: batched.eventsMissing,
    events: batched.events,
    seconds: batched.seconds,
    append_seconds: batched.appendSeconds,
    messages: batched.messages,
    events_per_message_mean: batched.eventsPerMessageMean,
    duplicates_skipped: batched.duplicatesSkipped,
    redeliveries: batched.redeliveries,
    reconcile_ok: batched.reconcileOk,
    reconcile_s: batched.reconcileSeconds,
    stages: batched.stages,
    cpu_ms_per_1k_events: batched.cpu,
    handler: handlerKind,
    mode: staged ? 'staged' : 'pipelined',
    append_rate_limit_per_s: ratePerS === 0 ? null : ratePerS,
    single_event_messages:
      single === null
        ? null
        : {
            events_per_s: single.eventsPerS,
            append_events_per_s: single.appendEventsPerS,
            publish_to_consume_ms_p99: single.publishToConsumeMs.p99,
            duplicates_applied: single.duplicatesApplied,
            events_missing: single.eventsMissing,
            events: single.events,
            seconds: single.seconds,
            messages: single.messages,
            reconcile_ok: single.reconcileOk,
          },
    writers,
    events_per_tx: eventsPerTx,
    streams_per_tx: streamsPerTx,
    events_per_message_max: eventsPerMessage,
    relay_read_batch: readBatch,
    consumer_prefetch: prefetch,
    consumer_concurrency: consumerConcurrency,
    consumer_max_ack_pending: maxAckPending ?? prefetch * 4,
    pool_size: poolSize,
    pgbench_tpcb_tps: tpcb === null ? null : Math.round(tpcb.tps),
    pgbench_clients: tpcb === null ? null : writers,
    cpu_count: cpus().length,
    loadavg_1m_start: loadStart,
    loadavg_1m_after_batched: batched.loadavg1mEnd,
    loadavg_1m_end: round(loadavg()[0] ?? 0, 2),
    node: process.version,
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  const bad = (p: PhaseFigures | null): boolean => p !== null && (p.duplicatesApplied !== 0 || p.eventsMissing !== 0 || p.reconcileOk === false);
  if (bad(batched) || bad(single)) process.exitCode = 1;
}

exitWhenDone(main(), log);

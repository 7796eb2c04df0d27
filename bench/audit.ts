/**
 * Audit trail benchmark (issue 4), with pgbench's TPC-B beside it in the same run.
 *
 *   npm run bench:audit -- [--records 50000] [--proofs 1000] [--seconds 6] [--rounds 12]
 *                          [--clients 64] [--accounts 10000] [--seed N] [--no-pgbench] [--command-records unrecorded|all]
 *                          [--sequencer-interval-ms 1000] [--sequencer-batch 20000] [--sequencer-nice 10]
 *                          [--lead-in 3] [--aa] [--switch paused|running]
 *
 * Phase 1, the log: `records` entries through the batched sink, integrated by the sequencer
 * (records_per_s, from the first record() to the last one in the tree), then full
 * verification (verify_records_per_s), then `proofs` inclusion proofs of random records,
 * each generated from storage and verified (proof_ms_p99).
 * Phase 2, the cost to the ledger: bench:ledger's workload (C clients, each in a closed loop
 * of engine.createTransfers([one]) with its domain event) in segments that alternate auditing
 * off and on (off-on, on-off, off-on, ...: a steady drift cancels), `rounds` of each, `seconds` each. "On" is what the service runs: the sequencer
 * in a worker thread tailing the event store (each event a leaf where it is), and a command
 * record through the sink for each call the events do not record whole: any call whose
 * transfer was not `ok` (services/ledger's auditedByEvents). `--command-records all` adds a
 * command record for every call (`unrecorded`, the default, only for calls no event records), as the service did before its events recorded applied
 * commands: the cost of that design, measured beside. Between segments, untimed, the clients
 * wait (`--switch paused`), the sequencer drains the previous segment's backlog, and the
 * database is vacuumed and checkpointed (settleSegment): each segment starts with nothing left
 * to integrate, so an "on" segment integrates its own events, not the "off" segment's nor
 * those of the change-over (`--switch running`, the shape before 2026-12-07, keeps the
 * clients writing through it). Each segment then runs `lead-in` seconds untimed before its
 * timed window, so that the window holds the sequencer's steady state: without it, an "on"
 * window opened on an idle sequencer and closed with its last second or more of events not yet
 * integrated, work the untimed catch-up after it did uncounted (until 2026-12-07, 13:00 UTC).
 * Each segment reports the events not yet integrated at the window's start and end
 * (`backlogAtStart`, `backlogAtEnd`: the sequencer's lag). Each segment reports the load average at its
 * start and end, the machine's CPU per transfer, and in "on" segments the sequencer's own CPU
 * per event (its thread, and its PostgreSQL backends by application_name). `--aa` runs the
 * "on" segments without auditing: the cost it prints is the noise of the measurement.
 * Phase 3: pgbench TPC-B, same client count, `seconds` long.
 *
 * Progress goes to stderr; the last line on stdout is one JSON object.
 */
import { loadavg } from 'node:os';
import { createHistogram, type RecordableHistogram } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { AuditSequencer, AuditStore, loadSigningKey, migrateAudit, PostgresAuditSink, BATCH_RECORDS_MAX_DEFAULT, INTERVAL_MS_DEFAULT, SEQUENCER_APPLICATION_NAME, SEQUENCER_NICE_DEFAULT, startSequencerWorker, type SequencerWorker, verifyBundle, verifyLog, type AuditEntry } from '../packages/audit/src/index.ts';
import { EventStore, migrateEvents } from '../packages/events/src/index.ts';
import { LedgerEngine, migrateLedger, newId } from '../packages/ledger/src/index.ts';
import { createTestDatabase, type TestDatabase } from '../packages/testing/src/index.ts';
import { abort, abortOnSignals, admin, machineCpuMs, procCpuMs, benchLog, checkAborted, defaultPgbenchScale, exitWhenDone, intArg, prng, quantile, runPgbenchTpcb, seedArg, sleep } from './common.ts';

const { values: args } = parseArgs({
  options: {
    records: { type: 'string' },
    proofs: { type: 'string' },
    seconds: { type: 'string' },
    rounds: { type: 'string' },
    clients: { type: 'string' },
    accounts: { type: 'string' },
    seed: { type: 'string' },
    'no-pgbench': { type: 'boolean', default: false },
    // How segments change over: `paused` (default) holds the clients while the sequencer
    // catches up and the database settles, so that each segment starts with nothing left to
    // integrate; `running` keeps them writing through the change-over (the shape before
    // 2026-12-07), which leaves the events written meanwhile to the next "on" segment.
    switch: { type: 'string', default: 'paused' },
    // `all`: a command record for every call, applied or not (the design before applied
    // commands were recorded by their events), to measure it beside.
    'command-records': { type: 'string', default: 'unrecorded' },
    // The sequencer worker's pause between rounds that found no backlog (the service's AUDIT_SEQUENCER_INTERVAL_MS).
    'sequencer-interval-ms': { type: 'string' },
    // At most this many records a round (the service's AUDIT_SEQUENCER_BATCH_MAX); a full round is followed at once by the next.
    'sequencer-batch': { type: 'string' },
    // The sequencer thread's nice value (the service's AUDIT_SEQUENCER_NICE); 0: the process's priority.
    'sequencer-nice': { type: 'string' },
    // Seconds of each segment run before its timed window, untimed (see runLedgerCost).
    'lead-in': { type: 'string' },
    // A/A calibration: "on" segments run without auditing, so the reported cost is the noise
    // of the measurement itself on this machine today.
    aa: { type: 'boolean', default: false },
  },
  strict: true,
});
const recordCount = Math.floor(intArg('records', args.records, 50_000, 1));
const proofCount = Math.floor(intArg('proofs', args.proofs, 1000, 1));
const seconds = intArg('seconds', args.seconds, 6, 1);
// Twelve: on a shared 2-core machine one round's cost ranged over ±15 points (2026-12-05), so
// four rounds could print 0.7 % or 5.2 % for a cost that twelve put at 6.8 % (median 7.9).
const rounds = Math.floor(intArg('rounds', args.rounds, 12, 1));
const clients = Math.floor(intArg('clients', args.clients, 64, 1));
const accountCount = Math.floor(intArg('accounts', args.accounts, 10_000, 2));
const seed = seedArg(args.seed);
const commandRecords = args['command-records'];
const sequencerIntervalMs = Math.floor(intArg('sequencer-interval-ms', args['sequencer-interval-ms'], INTERVAL_MS_DEFAULT, 1));
const sequencerBatch = Math.floor(intArg('sequencer-batch', args['sequencer-batch'], BATCH_RECORDS_MAX_DEFAULT, 1));
const sequencerNice = Math.floor(intArg('sequencer-nice', args['sequencer-nice'], SEQUENCER_NICE_DEFAULT, 0));
const leadInSeconds = intArg('lead-in', args['lead-in'], 3, 0);
const calibrate = args.aa;
const switchMode = args.switch;
if (switchMode !== 'paused' && switchMode !== 'running') throw new RangeError('--switch must be paused or running');
if (commandRecords !== 'unrecorded' && commandRecords !== 'all') throw new RangeError('--command-records must be unrecorded or all');
const log = benchLog('bench:audit');
abortOnSignals(log);

const load1m = (): number => Math.round((loadavg()[0] ?? 0) * 100) / 100;
const nsToMs = (ns: number): number => Math.round(ns / 1e4) / 100;
const signer = loadSigningKey(process.env.AUDIT_SIGNING_KEY, { production: false });

function commandEntry(id: string, i: number): AuditEntry {
  return {
    recordClass: 'command',
    actor: { type: 'service', id: `bench-client-${i % 64}` },
    action: 'ledger.transfer.create',
    outcome: 'success',
    origin: { service: 'ledger', ip: '127.0.0.1', requestId: id },
    resource: { type: 'transfer', id },
    payload: { method: 'POST', route: '/v1/transfers', status: 201 },
  };
}

async function migrated(prefix: string): Promise<TestDatabase> {
  const db = await createTestDatabase(prefix);
  await migrateLedger(db.url);
  await migrateEvents(db.url);
  await migrateAudit(db.url);
  return db;
}

/**
 * Between segments, untimed: vacuum the tables the ledger writes and take a checkpoint. With
 * PostgreSQL's default max_wal_size this workload fills the WAL in about 30 s, and the
 * checkpoint that follows (20 s of writes, then a full-page image for each page's first change
 * after it) took one segment of a four-segment run from 11,000 to 9,000 transfers/s, whichever
 * mode it fell in. Settled, every segment starts from the same state, as pgbench's run does
 * after `pgbench -i`.
 */
async function settleSegment(pool: pg.Pool): Promise<void> {
  await pool.query('VACUUM (ANALYZE) ledger.accounts, ledger.transfers, events.events');
  await admin('CHECKPOINT');
}

/** The sequencer worker's CPU so far in ms: its thread, and its PostgreSQL backends (by application_name). */
async function sequencerCpu(pool: pg.Pool, worker: SequencerWorker | null): Promise<{ workerMs: number; pgMs: number }> {
  if (worker === null) return { workerMs: 0, pgMs: 0 };
  const u = await worker.cpuUsage();
  const r = await pool.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1', [SEQUENCER_APPLICATION_NAME]);
  return { workerMs: (u.user + u.system) / 1000, pgMs: r.rows.reduce((sum, row) => sum + procCpuMs(row.pid), 0) };
}

/** Event leaves integrated so far (the sum of the tiles' counts). */
async function eventCount(pool: pg.Pool): Promise<number> {
  const r = await pool.query<{ n: number }>('SELECT coalesce(sum(leaf_count), 0)::integer AS n FROM audit.event_leaves');
  return r.rows[0]?.n ?? 0;
}

/** Events past the sequencer's cursor: appended, not yet integrated. */
async function eventsBehind(pool: pg.Pool): Promise<number> {
  const r = await pool.query<{ n: number }>(
    `SELECT count(*)::integer AS n FROM events.events e, audit.sequencer_state s
      WHERE (e.transaction_id, e.position) > (s.event_transaction_id, s.event_position)`,
  );
  return r.rows[0]?.n ?? 0;
}

/** Rounds `drain` runs before it gives up (about two minutes of idle rounds): a long transaction elsewhere in the cluster holds the event tail back. */
const DRAIN_ROUNDS_MAX = 24_000;

/**
 * Sequencer rounds until every queued entry and every event there was when it began is
 * integrated (nothing skipped). The ledger's clients keep running between segments, so the
 * target is fixed at the start: waiting for the tail to be empty would wait for a moment with
 * no commit in flight, which under 64 clients may not come for minutes.
 */
async function drain(sequencer: AuditSequencer, pool: pg.Pool): Promise<void> {
  // The last event in the global order, and the last queued entry, as it begins.
  const target = await pool.query<{ tx: string; position: string; queued: string }>(
    `SELECT coalesce(e.transaction_id, '0')::text AS tx, coalesce(e.position, 0)::text AS position, coalesce((SELECT max(id) FROM audit.queue), 0)::text AS queued
       FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT transaction_id, position FROM events.events ORDER BY transaction_id DESC, position DESC LIMIT 1) e ON true`,
  );
  const { tx, position, queued } = target.rows[0] ?? { tx: '0', position: '0', queued: '0' };
  for (let round = 0; ; round += 1) {
    if (round > DRAIN_ROUNDS_MAX) {
      // What held it back: the first event past the cursor, the read horizon, and the oldest transactions in the cluster.
      const why = await pool.query<{ why: string }>(
        `SELECT json_build_object(
           'cursor', (SELECT event_transaction_id::text || '/' || event_position FROM audit.sequencer_state),
           'horizon', pg_snapshot_xmin(pg_current_snapshot())::text,
           'next', (SELECT e.transaction_id::text || '/' || e.position FROM events.events e, audit.sequencer_state s
                     WHERE (e.transaction_id, e.position) > (s.event_transaction_id, s.event_position) ORDER BY e.transaction_id, e.position LIMIT 1),
           'oldest', (SELECT json_agg(a) FROM (SELECT datname, application_name, state, backend_xid::text, backend_xmin::text, xact_start, left(query, 100) AS query
                                                 FROM pg_stat_activity WHERE backend_xid IS NOT NULL OR backend_xmin IS NOT NULL ORDER BY xact_start LIMIT 5) a))::text AS why`,
      );
      throw new Error(`the audit tail did not catch up: is a long transaction running elsewhere in the cluster? ${why.rows[0]?.why ?? ''}`);
    }
    checkAborted();
    const { records } = await sequencer.round();
    const r = await pool.query<{ behind: boolean }>(
      `SELECT EXISTS (SELECT 1 FROM audit.queue WHERE id <= $3::bigint)
              OR (SELECT (s.event_transaction_id, s.event_position) < ($1::text::xid8, $2::bigint) FROM audit.sequencer_state s) AS behind`,
      [tx, position, queued],
    );
    if (r.rows[0]?.behind === false) {
      // A checkpoint over all of it, as a sequencer signs at close: a drain that ended between
      // two signed checkpoints left the next sequencer to fold every leaf since the last one
      // into its tree at start (checkedFrontier), up to a whole segment's, inside the segment.
      await sequencer.round({ forceCheckpoint: true });
      return;
    }
    if (records === 0) await sleep(5);
  }
}

// ------------------------------------------------------------------------------------------
// Phase 1: append and integrate, verify, prove

interface LogFigures {
  recordsPerS: number;
  verifyRecordsPerS: number;
  proofMsP50: number;
  proofMsP99: number;
  verifyOk: boolean;
}

async function runLog(): Promise<LogFigures> {
  const db = await migrated('ll_bench_audit');
  const pool = new pg.Pool({ connectionString: db.url, max: 4 });
  pool.on('error', (e) => log(`pool error: ${e.message}`));
  try {
    const sink = new PostgresAuditSink({ pool, bufferEntriesMax: recordCount + 1 });
    const sequencer = new AuditSequencer({ pool, signer, origin: 'bench/audit' });
    const store = new AuditStore({ pool, sink, service: 'bench' });
    log(`log: ${recordCount} records through the sink and the sequencer`);
    const t0 = performance.now();
    for (let i = 0; i < recordCount; i += 1) sink.record(commandEntry(newId(), i));
    sequencer.start();
    await sink.flush();
    await sequencer.close();
    await drain(sequencer, pool);
    const appendS = (performance.now() - t0) / 1000;
    const recordsPerS = Math.round(recordCount / appendS);
    log(`log: ${recordsPerS} records/s appended and integrated (${appendS.toFixed(1)} s)`);

    const t1 = performance.now();
    const report = await verifyLog(pool, { publicKey: signer.publicKey });
    const verifyS = (performance.now() - t1) / 1000;
    const verifyRecordsPerS = Math.round(report.records / verifyS);
    log(`verify: ${report.ok ? 'OK' : 'FAILED'}, ${report.records} records, ${report.checkpoints} checkpoints, ${verifyRecordsPerS} records/s`);

    const random = prng(seed);
    const h: RecordableHistogram = createHistogram();
    const treeSize = (await store.latestCheckpoint())?.treeSize ?? 0;
    for (let i = 0; i < proofCount; i += 1) {
      checkAborted();
      const seq = Math.floor(random() * treeSize);
      const t = performance.now();
      const bundle = await store.inclusionBundle(seq);
      if (bundle === null) throw new Error(`no proof for record ${seq}`);
      verifyBundle(bundle, signer.publicKey);
      h.record(Math.max(1, Math.round((performance.now() - t) * 1e6)));
    }
    log(`proofs: ${proofCount}, p50 ${nsToMs(h.percentile(50))} ms, p99 ${nsToMs(h.percentile(99))} ms (generate from storage + verify)`);
    await sink.close();
    return { recordsPerS, verifyRecordsPerS, proofMsP50: nsToMs(h.percentile(50)), proofMsP99: nsToMs(h.percentile(99)), verifyOk: report.ok };
  } finally {
    await pool.end();
    await db.drop();
  }
}

// ------------------------------------------------------------------------------------------
// Phase 2: the ledger workload with auditing off and on

interface Segment {
  mode: 'off' | 'on';
  transfersPerS: number;
  p99Ms: number;
  /** The machine's busy CPU (every process) per transfer, and its utilisation. */
  machineCpuUsPerTransfer: number;
  machineUtilisation: number;
  /** This process's CPU in cores (the engine, its clients and the sequencer thread when on). */
  processCores: number;
  /** On: the sequencer's CPU per event integrated, its worker thread and its PostgreSQL backends. */
  sequencerWorkerCpuUsPerEvent: number | null;
  sequencerPgCpuUsPerEvent: number | null;
  /** On: the sequencer's CPU (thread and backends) per transfer applied in the segment. */
  sequencerCpuUsPerTransfer: number | null;
  /**
   * Events not yet integrated when the timed window began and when it ended (on: the
   * sequencer's lag; alike at both ends when it integrated as many events as the window wrote).
   */
  backlogAtStart: number;
  backlogAtEnd: number;
  load1mStart: number;
  load1mEnd: number;
}

async function runLedgerCost(): Promise<{ segments: Segment[]; off: { tps: number; p99: number }; on: { tps: number; p99: number }; verifyOk: boolean; auditedEvents: number }> {
  const db = await migrated('ll_bench_audit_ledger');
  // The engine's pool as in bench:ledger; the audit trail has its own, as a separate budget.
  const pool = new pg.Pool({ connectionString: db.url, max: 5 });
  const auditPool = new pg.Pool({ connectionString: db.url, max: 2 });
  pool.on('error', (e) => log(`pool error: ${e.message}`));
  auditPool.on('error', (e) => log(`audit pool error: ${e.message}`));
  const events = await EventStore.open(pool);
  const engine = new LedgerEngine({ pool, batchSizeMax: 2000, batchesInFlightMax: 3, events });
  const sink = new PostgresAuditSink({ pool: auditPool });
  const sequencer = new AuditSequencer({ pool: auditPool, signer, origin: 'bench/ledger', tailEvents: true });
  let stop = false;
  // The change-over gate (`--switch paused`): closed, the clients wait before their next call.
  let gate: { opened: Promise<void>; open: () => void } | null = null;
  let inFlight = 0;
  const holdClients = async (): Promise<void> => {
    if (switchMode !== 'paused' || gate !== null) return;
    let open = (): void => {};
    const opened = new Promise<void>((resolve) => {
      open = resolve;
    });
    gate = { opened, open };
    while (inFlight > 0) await sleep(1);
  };
  const releaseClients = (): void => {
    const g = gate;
    gate = null;
    g?.open();
  };
  try {
    const ids: string[] = [];
    for (let i = 0; i < accountCount; i += 1000) {
      const chunk = Array.from({ length: Math.min(1000, accountCount - i) }, () => ({ id: newId(), ledger: 'USD', code: 1 }));
      await engine.createAccounts(chunk);
      ids.push(...chunk.map((a) => a.id));
    }
    await drain(sequencer, auditPool);
    const random = prng(seed ^ 0x5eed);
    let auditing = false;
    let histogram: RecordableHistogram | null = null;
    let ok = 0;
    let errors = 0;
    let calls = 0;
    const oneClient = async (client: number): Promise<void> => {
      while (!stop && !abort.signal.aborted) {
        if (gate !== null) {
          await gate.opened;
          continue;
        }
        const debit = ids[Math.floor(random() * ids.length)] as string;
        let credit = ids[Math.floor(random() * ids.length)] as string;
        if (credit === debit) credit = ids[(ids.indexOf(debit) + 1) % ids.length] as string;
        const id = newId();
        const t0 = performance.now();
        inFlight += 1;
        try {
          // The metadata the service gives every event (its audit record: who, from where, which request).
          const context = { correlationId: id, causationId: id, actor: `bench-client-${client}`, ip: '127.0.0.1' };
          const [r] = await engine.createTransfers([{ id, debitAccountId: debit, creditAccountId: credit, amount: BigInt(1 + Math.floor(random() * 1000)), ledger: 'USD', code: 1 }], context);
          if (auditing && (commandRecords === 'all' || r?.result !== 'ok')) sink.record(commandEntry(id, (calls += 1)));
          if (r?.result === 'ok') {
            ok += 1;
            histogram?.record(Math.max(1, Math.round((performance.now() - t0) * 1e6)));
          } else errors += 1;
        } catch (error) {
          errors += 1;
          if (errors <= 5) log(`createTransfers threw: ${String(error)}`);
          await sleep(10);
        } finally {
          inFlight -= 1;
        }
      }
    };
    const running = Array.from({ length: clients }, (_, client) => oneClient(client));
    // As long as a segment: the rate still climbs for several seconds after the start (the
    // first "off" segment after a 2 s warm-up ran about 10 % below the rest, a bias in the
    // audit's favour).
    log(`ledger: ${clients} clients, ${ids.length} accounts, warm-up ${seconds} s`);
    await sleep(seconds * 1000);
    const segments: Segment[] = [];
    const all = { off: createHistogram(), on: createHistogram() };
    const totals = { off: { ok: 0, s: 0 }, on: { ok: 0, s: 0 } };
    for (let round = 0; round < rounds; round += 1) {
      // ABBA: off-on, then on-off. The ledger's rate drifts as its tables grow (the second
      // "off" of off-on-off-on measured 25-30% below the first): in a fixed order that drift
      // is charged to whichever mode runs later; reversed every other round, a steady drift
      // cancels out of the means.
      for (const mode of round % 2 === 0 ? (['off', 'on'] as const) : (['on', 'off'] as const)) {
        checkAborted();
        // Untimed: catch up on the previous segment's events, settle, then switch. Paused
        // (the default), the clients wait meanwhile, so the catch-up is complete and no
        // segment inherits events written during the change-over.
        await holdClients();
        await drain(sequencer, auditPool);
        await settleSegment(pool);
        auditing = mode === 'on' && !calibrate;
        const worker = auditing
          ? await startSequencerWorker({
              databaseUrl: db.url,
              signingKeyPem: process.env.AUDIT_SIGNING_KEY ?? '',
              production: false,
              origin: 'bench/ledger',
              tailEvents: true,
              intervalMs: sequencerIntervalMs,
              batchRecordsMax: sequencerBatch,
              nice: sequencerNice,
            })
          : null;
        const h = createHistogram();
        // The lead-in, untimed: the clients run (and, on, the sequencer integrates behind them)
        // until both are in their steady state, so that the timed window holds as much of the
        // sequencer's work as of the ledger's. Without it, an "on" window opened on an idle
        // sequencer and closed with the events of its last second or more not yet integrated:
        // that work fell to the untimed catch-up after it, uncounted.
        releaseClients();
        if (leadInSeconds > 0) await sleep(leadInSeconds * 1000);
        // The queries first, then the window's clocks back to back: the clients run meanwhile.
        const load1mStart = load1m();
        const backlogAtStart = await eventsBehind(auditPool);
        const events0 = await eventCount(auditPool);
        const cpu0 = await sequencerCpu(auditPool, worker);
        const machine0 = machineCpuMs();
        const process0 = process.cpuUsage();
        histogram = h;
        const okStart = ok;
        const t0 = performance.now();
        await sleep(seconds * 1000);
        histogram = null;
        const s = (performance.now() - t0) / 1000;
        const n = ok - okStart;
        const machine1 = machineCpuMs();
        const process1 = process.cpuUsage(process0);
        const cpu1 = await sequencerCpu(auditPool, worker);
        const integrated = (await eventCount(auditPool)) - events0;
        const backlogAtEnd = await eventsBehind(auditPool);
        await holdClients();
        auditing = false;
        await worker?.close();
        await sink.flush();
        all[mode].add(h);
        totals[mode].ok += n;
        totals[mode].s += s;
        const perEvent = (ms: number): number | null => (worker === null || integrated === 0 ? null : Math.round((ms * 10_000) / integrated) / 10);
        const seg: Segment = {
          mode,
          transfersPerS: Math.round(n / s),
          p99Ms: nsToMs(h.percentile(99)),
          machineCpuUsPerTransfer: Math.round(((machine1.busy - machine0.busy) * 10_000) / Math.max(1, n)) / 10,
          machineUtilisation: Math.round(((machine1.busy - machine0.busy) / Math.max(1, machine1.total - machine0.total)) * 100) / 100,
          processCores: Math.round((process1.user + process1.system) / 1e4 / s) / 100,
          sequencerWorkerCpuUsPerEvent: perEvent(cpu1.workerMs - cpu0.workerMs),
          sequencerPgCpuUsPerEvent: perEvent(cpu1.pgMs - cpu0.pgMs),
          sequencerCpuUsPerTransfer: worker === null ? null : Math.round(((cpu1.workerMs - cpu0.workerMs + cpu1.pgMs - cpu0.pgMs) * 10_000) / Math.max(1, n)) / 10,
          backlogAtStart,
          backlogAtEnd,
          load1mStart,
          load1mEnd: load1m(),
        };
        segments.push(seg);
        log(
          `  round ${round + 1} audit ${mode}: ${seg.transfersPerS} transfers/s, p99 ${seg.p99Ms} ms, machine ${seg.machineCpuUsPerTransfer} µs/transfer (${seg.machineUtilisation} busy), this process ${seg.processCores} cores` +
            (worker === null ? '' : `, sequencer ${seg.sequencerWorkerCpuUsPerEvent} µs/event in its thread + ${seg.sequencerPgCpuUsPerEvent} in PostgreSQL (${integrated} events)`) +
            `, ${backlogAtStart} events behind at the start, ${backlogAtEnd} at the end` +
            `, load ${seg.load1mStart} → ${seg.load1mEnd}`,
        );
      }
    }
    stop = true;
    releaseClients();
    await Promise.all(running);
    await engine.close();
    await sink.close();
    await drain(sequencer, auditPool);
    const report = await verifyLog(auditPool, { publicKey: signer.publicKey });
    // Each event once: as many leaves as events, and as many distinct positions.
    const audited = await auditPool.query<{ n: number; positions: number }>('SELECT count(*)::int AS n, count(DISTINCT p)::int AS positions FROM audit.event_leaves t, unnest(t.positions) p');
    const eventsStored = await auditPool.query<{ n: number }>('SELECT count(*)::int AS n FROM events.events');
    log(`verify after the ledger run: ${report.ok ? 'OK' : `FAILED (${JSON.stringify(report.firstDifference)})`}; ${audited.rows[0]?.n} event leaves (${audited.rows[0]?.positions} positions) for ${eventsStored.rows[0]?.n} events; ${errors} errors`);
    if (audited.rows[0]?.n !== eventsStored.rows[0]?.n || audited.rows[0]?.positions !== eventsStored.rows[0]?.n) throw new Error('not every event was audited exactly once');
    return {
      segments,
      off: { tps: Math.round(totals.off.ok / totals.off.s), p99: nsToMs(all.off.percentile(99)) },
      on: { tps: Math.round(totals.on.ok / totals.on.s), p99: nsToMs(all.on.percentile(99)) },
      verifyOk: report.ok,
      auditedEvents: audited.rows[0]?.n ?? 0,
    };
  } finally {
    stop = true;
    releaseClients();
    await Promise.race([engine.close(), sleep(10_000)]);
    await pool.end().catch(() => {});
    await auditPool.end().catch(() => {});
    await db.drop();
  }
}

/**
 * The sequencer's CPU per transfer (mean of the "on" segments) as a share of the machine's CPU
 * per transfer without it (mean of the "off" segments), in %: the throughput cost on a machine
 * with no idle time, and far steadier than the rates, which the machine's other work moves.
 */
function sequencerCpuSharePct(segments: readonly Segment[]): number | null {
  const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
  const sequencer = segments.flatMap((x) => (x.sequencerCpuUsPerTransfer === null ? [] : [x.sequencerCpuUsPerTransfer]));
  const machineOff = segments.filter((x) => x.mode === 'off').map((x) => x.machineCpuUsPerTransfer);
  if (sequencer.length === 0 || machineOff.length === 0) return null;
  return Math.round((mean(sequencer) / mean(machineOff)) * 1000) / 10;
}

/** Per round, the throughput cost of its "on" segment against its "off" one, in %. */
function costByRound(segments: readonly Segment[]): number[] {
  const costs: number[] = [];
  for (let i = 0; i + 1 < segments.length; i += 2) {
    const pair = [segments[i], segments[i + 1]];
    const off = pair.find((x) => x?.mode === 'off')?.transfersPerS ?? 0;
    const on = pair.find((x) => x?.mode === 'on')?.transfersPerS ?? 0;
    costs.push(off === 0 ? 0 : Math.round(((off - on) / off) * 1000) / 10);
  }
  return costs;
}

async function main(): Promise<void> {
  log(`seed ${seed}, load ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  const loadStart = load1m();
  const figures = await runLog();
  const ledger = await runLedgerCost();
  const tpcb = args['no-pgbench'] ? null : await runPgbenchTpcb({ clients, seconds, scale: defaultPgbenchScale(clients), log });
  const byRound = costByRound(ledger.segments);
  const byRoundSorted = [...byRound].sort((a, b) => a - b);
  const roundQuantile = (q: number): number => Math.round(quantile(byRoundSorted, q) * 10) / 10;
  const cost = ledger.off.tps === 0 ? null : Math.round(((ledger.off.tps - ledger.on.tps) / ledger.off.tps) * 1000) / 10;
  const summary = {
    bench: 'audit',
    seed,
    command_records: commandRecords,
    sequencer_interval_ms: sequencerIntervalMs,
    sequencer_batch: sequencerBatch,
    sequencer_nice: sequencerNice,
    // True: an A/A run, "on" segments without auditing; the cost printed is the measurement's noise.
    aa_calibration: calibrate,
    records: recordCount,
    records_per_s: figures.recordsPerS,
    verify_records_per_s: figures.verifyRecordsPerS,
    proof_ms_p50: figures.proofMsP50,
    proof_ms_p99: figures.proofMsP99,
    ledger_tps_audit_off: ledger.off.tps,
    ledger_tps_audit_on: ledger.on.tps,
    ledger_throughput_cost_pct: cost,
    ledger_p99_ms_audit_off: ledger.off.p99,
    ledger_p99_ms_audit_on: ledger.on.p99,
    added_latency_ms_p99: Math.round((ledger.on.p99 - ledger.off.p99) * 100) / 100,
    // Each round's own pair (off against on), to show the spread behind the mean.
    cost_pct_by_round: byRound,
    cost_pct_round_median: roundQuantile(0.5),
    cost_pct_round_quartiles: [roundQuantile(0.25), roundQuantile(0.75)],
    sequencer_cpu_share_pct: sequencerCpuSharePct(ledger.segments),
    segments: ledger.segments,
    verify_ok: figures.verifyOk && ledger.verifyOk,
    pgbench_tpcb_tps: tpcb === null ? null : Math.round(tpcb.tps),
    clients,
    segment_seconds: seconds,
    lead_in_seconds: leadInSeconds,
    rounds,
    load1m_start: loadStart,
    load1m_end: load1m(),
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

exitWhenDone(main(), log);

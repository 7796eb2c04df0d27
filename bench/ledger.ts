/**
 * Ledger throughput benchmark (REQUIREMENTS §7), with pgbench's TPC-B beside it in the same run.
 *
 *   npm run bench:ledger -- [--seconds 20] [--clients 384] [--accounts 10000] [--seed N]
 *                           [--batch-size-max N] [--batches-in-flight N] [--linger-ms N]
 *                           [--pool N] [--warmup 2] [--pgbench-clients N] [--pgbench-scale N]
 *                           [--no-pgbench] [--no-events] [--hot-share 0..1]
 *                           [--no-reference] [--reference-connections N] [--reference-batch 500]
 *
 * Phase 1: a fresh database, migrated; N accounts on ledger USD without balance constraints
 * (so random transfers never fail); C concurrent clients, each in a closed loop calling
 * `engine.createTransfers([oneTransfer])`. Durable commits, the server's default settings.
 * Phase 2: pgbench's builtin tpcb-like script on a separate fresh database, same client count
 * and duration; pgbench needs a connection per client, so where the server has fewer free it
 * runs with as many as it has (`pgbench_clients` in the output; `--pgbench-clients` sets it).
 * Between them, unless `--no-reference`: the hand-written references (./ledger-reference.ts),
 * the same money movement on the same tables: as a transaction of set-based statements
 * (`statements`) in batches of 500 and again in batches of the engine's mean size from phase 1,
 * and as one statement a batch of 500 (`set`); each on a fresh database with the same accounts
 * count and duration, as many connections as the engine has batches in flight.
 * Every database is dropped at the end, also on error or Ctrl-C.
 *
 * Progress goes to stderr; the last line on stdout is one JSON object with the figures.
 */
import { cpus } from 'node:os';
import { createHistogram } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { EventStore, migrateEvents } from '../packages/events/src/index.ts';
import { LedgerEngine, migrateLedger, newId, type NewTransfer } from '../packages/ledger/src/index.ts';
import { createTestDatabase, type TestDatabase } from '../packages/testing/src/index.ts';
import { runHandWrittenReference, type ReferenceFigures, type ReferenceShape } from './ledger-reference.ts';
import {
  abort,
  abortOnSignals,
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

const { values: args } = parseArgs({
  options: {
    ...LOAD_OPTIONS,
    // The service appends a domain event per transfer in the batch transaction; so does the
    // bench unless told otherwise, so that it measures what runs in production.
    'no-events': { type: 'boolean', default: false },
    // The share of transfers (0..1) whose debit is one hot account, as with a fee or settlement
    // account: every such transfer contends for that account's row lock.
    'hot-share': { type: 'string' },
    'no-reference': { type: 'boolean', default: false },
    'reference-connections': { type: 'string' },
    'reference-batch': { type: 'string' },
  },
  strict: true,
});

const settings = loadSettings(args);
const { seconds, warmupSeconds, clients, accountCount, batchSizeMax, batchesInFlightMax, lingerMs, poolSize, runPgbench, seed } = settings;
const withEvents = !args['no-events'];
const hotShare = args['hot-share'] === undefined ? 0 : Number(args['hot-share']);
if (!(hotShare >= 0 && hotShare <= 1)) throw new RangeError(`--hot-share must be a number from 0 to 1, got ${String(args['hot-share'])}`);
const runReference = !args['no-reference'];
const referenceConnections = Math.floor(intArg('reference-connections', args['reference-connections'], batchesInFlightMax, 1));
const referenceBatch = Math.floor(intArg('reference-batch', args['reference-batch'], 500, 1));

const log = benchLog('bench:ledger');

abortOnSignals(log);

// ------------------------------------------------------------------------------------------
// Phase 1: the ledger

interface LedgerFigures extends LatencyFigures {
  transfersPerS: number;
  transfers: number;
  measuredSeconds: number;
  batchSizeMean: number;
  batchesPerS: number;
  errors: number;
  errorKinds: Record<string, number>;
  okTotal: number;
  invariantsOk: boolean;
  invariants: Record<string, unknown>;
}

async function runLedger(db: TestDatabase): Promise<LedgerFigures> {
  await migrateLedger(db.url);
  await migrateEvents(db.url);
  const pool = new pg.Pool({ connectionString: db.url, max: poolSize });
  pool.on('error', (e) => log(`pool error: ${e.message}`));
  const events = withEvents ? await EventStore.open(pool) : undefined;
  const engine = new LedgerEngine({ pool, batchSizeMax, batchesInFlightMax, batchLingerMs: lingerMs, ...(events === undefined ? {} : { events }) });
  let engineClosed = false;
  try {
    // Accounts, in chunks; no flags, so balances may go either way and no transfer fails.
    const accountIds: string[] = [];
    const chunk = Math.min(batchSizeMax, 1000);
    const tAccounts = performance.now();
    for (let i = 0; i < accountCount; i += chunk) {
      checkAborted();
      const batch = Array.from({ length: Math.min(chunk, accountCount - i) }, () => ({ id: newId(), ledger: 'USD', code: 1 }));
      const results = await engine.createAccounts(batch);
      for (const r of results) {
        if (r.result !== 'ok') throw new Error(`createAccounts: ${r.id}: ${r.result}`);
        accountIds.push(r.id);
      }
    }
    log(`created ${accountIds.length} accounts in ${((performance.now() - tAccounts) / 1000).toFixed(1)} s`);
    await settleAccounts(pool);
    checkAborted();

    const random = prng(seed);
    const histogram = createHistogram({ lowest: 1, highest: 120e9, figures: 3 });
    const errorKinds: Record<string, number> = {};
    let errors = 0;
    let okTotal = 0;
    let okWindow = 0;
    let measuring = false;
    let stop = false;

    const oneClient = async (): Promise<void> => {
      while (!stop && !abort.signal.aborted) {
        const parts = randomTransferParts(random, accountIds);
        // The hot account is the first; a transfer from it goes to any other.
        const hot = hotShare > 0 && random() < hotShare;
        const debit = hot ? (accountIds[0] as string) : parts.debit;
        const credit = hot && parts.credit === debit ? parts.debit : parts.credit;
        const { amount } = parts;
        const transfer: NewTransfer = {
          id: newId(),
          debitAccountId: debit,
          creditAccountId: credit,
          amount: BigInt(amount),
          ledger: 'USD',
          code: 1,
        };
        const t0 = performance.now();
        try {
          const [result] = await engine.createTransfers([transfer]);
          const ns = Math.round((performance.now() - t0) * 1e6);
          if (result?.result === 'ok') {
            okTotal += 1;
            if (measuring) {
              okWindow += 1;
              histogram.record(Math.min(Math.max(ns, 1), 120e9));
            }
          } else {
            errors += 1;
            const kind = result?.result ?? 'missing_result';
            errorKinds[kind] = (errorKinds[kind] ?? 0) + 1;
          }
        } catch (error) {
          errors += 1;
          const kind = error instanceof Error ? error.name : 'throw';
          errorKinds[kind] = (errorKinds[kind] ?? 0) + 1;
          if (errors <= 5) log(`createTransfers threw: ${String(error)}`);
          await sleep(10);
        }
      }
    };

    log(
      `load: ${clients} clients, ${accountIds.length} accounts, seed ${seed}, batchSizeMax ${batchSizeMax}, ` +
        `batchesInFlightMax ${batchesInFlightMax}, linger ${lingerMs} ms, pool ${poolSize}; ` +
        `warm-up ${warmupSeconds} s, measure ${seconds} s`,
    );
    const running = Array.from({ length: clients }, () => oneClient());
    await sleep(warmupSeconds * 1000);
    const statsStart = engine.stats();
    const tStart = performance.now();
    measuring = true;
    let lastOk = 0;
    const progress = setInterval(() => {
      log(`  ${((performance.now() - tStart) / 1000).toFixed(0)} s: ${okWindow - lastOk} transfers/s, queued ${engine.stats().queuedTransfers}`);
      lastOk = okWindow;
    }, 1000);
    await sleep(seconds * 1000);
    measuring = false;
    const measuredSeconds = (performance.now() - tStart) / 1000;
    const statsEnd = engine.stats();
    const transfers = okWindow;
    clearInterval(progress);
    stop = true;
    await Promise.all(running);
    await engine.close();
    engineClosed = true;

    const dBatches = statsEnd.batches - statsStart.batches;
    const dTransfers = statsEnd.transfers - statsStart.transfers;

    // Invariants: double entry balances, and every ok result is exactly one row.
    const totals = await ledgerTotals(pool);
    const invariants = {
      debits_posted_total: totals.debitsPosted,
      credits_posted_total: totals.creditsPosted,
      pending_totals_zero: totals.pendingZero,
      transfer_rows: totals.transferRows,
      ok_results: okTotal,
      ok_amount_sum: totals.okSum,
    };
    const invariantsOk = totals.balanced && totals.transferRows === okTotal && totals.okRows === okTotal;
    await pool.end();

    return {
      transfersPerS: Math.round(transfers / measuredSeconds),
      transfers,
      measuredSeconds,
      ...latencyFigures(histogram),
      batchSizeMean: dBatches === 0 ? 0 : Math.round((dTransfers / dBatches) * 10) / 10,
      batchesPerS: Math.round(dBatches / measuredSeconds),
      errors,
      errorKinds,
      okTotal,
      invariantsOk,
      invariants,
    };
  } finally {
    if (!engineClosed) {
      await Promise.race([engine.close(), new Promise((resolve) => setTimeout(resolve, 10_000))]);
      await pool.end().catch(() => {});
    }
  }
}

// ------------------------------------------------------------------------------------------
// Phase 2: pgbench TPC-B (runPgbenchTpcb in ./common.ts)

async function main(): Promise<void> {
  const loadStart = logStart(log, seed);
  const db = await createTestDatabase('ll_bench');
  log(`database ${db.name}`);
  let ledger: LedgerFigures;
  try {
    ledger = await runLedger(db);
  } finally {
    await db.drop();
  }
  log(
    `ledger: ${ledger.transfersPerS} transfers/s, p50 ${ledger.p50} ms, p99 ${ledger.p99} ms, p99.9 ${ledger.p999} ms, ` +
      `batch mean ${ledger.batchSizeMean}, errors ${ledger.errors}, invariants ${ledger.invariantsOk ? 'ok' : 'BROKEN'}`,
  );
  const loadMid = loadAverage1m();
  // The reference (statements, 500 a batch), the same at the engine's own mean batch
  // size from the run above (per transfer, like for like), and the leanest form (set, 500).
  const referenceRuns: Array<{ key: string; shape: ReferenceShape; batchSize: number }> = runReference
    ? [
        { key: 'statements', shape: 'statements', batchSize: referenceBatch },
        { key: 'statements_engine_batch', shape: 'statements', batchSize: Math.max(1, Math.round(ledger.batchSizeMean)) },
        { key: 'set', shape: 'set', batchSize: referenceBatch },
      ]
    : [];
  const references = new Map<string, ReferenceFigures & { batchSize: number }>();
  for (const run of referenceRuns) {
    checkAborted();
    const refDb = await createTestDatabase('ll_bench_ref');
    log(`reference (${run.shape}, ${run.batchSize} a batch) database ${refDb.name}`);
    let figures: ReferenceFigures;
    try {
      figures = await runHandWrittenReference({
        db: refDb,
        shape: run.shape,
        accounts: accountCount,
        connections: referenceConnections,
        batchSize: run.batchSize,
        seconds,
        warmupSeconds,
        seed,
        log,
      });
    } finally {
      await refDb.drop();
    }
    references.set(run.key, { ...figures, batchSize: run.batchSize });
    log(
      `reference (${run.shape}, ${run.batchSize} a batch): ${figures.transfersPerS} transfers/s, batch p50 ${figures.batchMsP50} ms, ` +
        `p99 ${figures.batchMsP99} ms, invariants ${figures.invariantsOk ? 'ok' : 'BROKEN'}`,
    );
  }
  const referenceSummary: Record<string, number | boolean | null> = {};
  for (const { key } of referenceRuns) {
    const r = references.get(key);
    if (r === undefined) continue;
    Object.assign(referenceSummary, {
      [`reference_${key}_transfers_per_s`]: r.transfersPerS,
      [`ratio_vs_reference_${key}`]: r.transfersPerS === 0 ? null : Math.round((ledger.transfersPerS / r.transfersPerS) * 100) / 100,
      [`reference_${key}_batch_size`]: r.batchSize,
      [`reference_${key}_batch_ms_p50`]: r.batchMsP50,
      [`reference_${key}_batch_ms_p99`]: r.batchMsP99,
      [`reference_${key}_invariants_ok`]: r.invariantsOk,
    });
  }
  let tpcb: PgbenchFigures | null = null;
  let pgbenchClients: number | null = null;
  if (runPgbench) {
    checkAborted();
    pgbenchClients = await pgbenchClientsFor(clients, settings.pgbenchClients, log);
    const scale = settings.pgbenchScale ?? defaultPgbenchScale(pgbenchClients);
    tpcb = await runPgbenchTpcb({ clients: pgbenchClients, seconds, scale, log });
    log(`pgbench: ${tpcb.tps.toFixed(0)} tps (latency avg ${tpcb.latencyMsAvg} ms)`);
  }
  const summary = {
    transfers_per_s: ledger.transfersPerS,
    ...latencySummary(ledger),
    ...pgbenchSummary(tpcb, ledger.transfersPerS),
    pgbench_clients: pgbenchClients,
    ...referenceSummary,
    reference_connections: runReference ? referenceConnections : null,
    clients,
    accounts: accountCount,
    seconds,
    warmup_seconds: warmupSeconds,
    transfers: ledger.transfers,
    errors: ledger.errors,
    error_kinds: ledger.errorKinds,
    invariants_ok: ledger.invariantsOk,
    invariants: ledger.invariants,
    batch_size_mean: ledger.batchSizeMean,
    batches_per_s: ledger.batchesPerS,
    batch_size_max: batchSizeMax,
    batches_in_flight_max: batchesInFlightMax,
    events_appended: withEvents,
    hot_share: hotShare,
    batch_linger_ms: lingerMs,
    pool_size: poolSize,
    seed,
    cpu_count: cpus().length,
    loadavg_1m_start: Math.round(loadStart * 100) / 100,
    loadavg_1m_after_ledger: loadMid,
    loadavg_1m_end: loadAverage1m(),
    node: process.version,
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  if (!ledger.invariantsOk || ledger.errors > 0 || [...references.values()].some((r) => !r.invariantsOk)) process.exitCode = 1;
}

exitWhenDone(main(), log);

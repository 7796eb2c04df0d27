/**
 * Replay benchmark (REQUIREMENTS §4: replay at least 5× faster than the events were written).
 *
 *   npm run bench:replay -- [--events 1000000] [--accounts 10000] [--writers 4] [--events-per-tx 500]
 *                           [--batch 10000] [--workers 2] [--seed N]
 *
 * 1. Setup (not timed): a fresh database (`ll_bench_replay_*`), events schema migrated,
 *    `--accounts` `ledger.AccountOpened` events.
 * 2. Write phase: `--writers` concurrent writers append `--events` ledger transfer events with
 *    `EventStore.appendMany`, `--events-per-tx` per transaction, shaped exactly like the
 *    ledger's (packages/ledger/src/events.ts): 70% TransferPosted, 15% TransferPending, 10%
 *    PendingTransferPosted (half of them partial), 5% PendingTransferVoided, between random
 *    accounts of a seeded PRNG. `write_events_per_s` = events / the phase's wall time.
 * 3. Replay phase: a blue/green rebuild of the `ledger_balances` projection from the first
 *    event: the projection's set-based fold inside PostgreSQL (`replaySql`) up to the read
 *    horizon, with its checkpoint, in one transaction; then any later events through the
 *    in-memory path (keyset pages of `--batch` events decoded by `--workers` worker threads,
 *    0: in this thread); then the swap. `replay_events_per_s` = events
 *    replayed / replay time; `rebuild_seconds` = the whole rebuild including the swap.
 * 4. Check: the projection's totals equal the generator's (posted and pending, both sides).
 *
 * The database is dropped at the end, also on error or Ctrl-C. Progress goes to stderr; the
 * last stdout line is one JSON object. Load averages are sampled around each phase.
 */
import { randomUUID } from 'node:crypto';
import { cpus, loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { EventStore, migrateEvents, type StreamEvent } from '../packages/events/src/index.ts';
import { ensureProjection, ledgerBalancesProjection, rebuild } from '../packages/eventsourcing/src/index.ts';
import { createTestDatabase } from '../packages/testing/src/index.ts';
import { abortOnSignals, benchLog, checkAborted, exitWhenDone, intArg, prng, seedArg } from './common.ts';

const { values: args } = parseArgs({
  options: {
    events: { type: 'string' },
    accounts: { type: 'string' },
    writers: { type: 'string' },
    'events-per-tx': { type: 'string' },
    batch: { type: 'string' },
    workers: { type: 'string' },
    seed: { type: 'string' },
  },
  strict: true,
});

const int = (name: string, value: string | undefined, fallback: number, min: number): number => Math.floor(intArg(name, value, fallback, min));
const totalEvents = int('events', args.events, 1_000_000, 1);
const accountCount = int('accounts', args.accounts, 10_000, 2);
const writers = int('writers', args.writers, 4, 1);
const eventsPerTx = Math.min(int('events-per-tx', args['events-per-tx'], 500, 1), 10_000);
const batchSize = int('batch', args.batch, 10_000, 1);
const replayWorkers = int('workers', args.workers, 2, 0);
const seed = seedArg(args.seed);

const log = benchLog('bench:replay');
abortOnSignals(log);

/** Open reservations a writer keeps at most; beyond it, it posts or voids instead of reserving. */
const OPEN_PENDING_MAX = 2000;

interface Totals {
  posted: bigint;
  pending: bigint;
}

interface Pending {
  id: string;
  dr: string;
  cr: string;
  amount: bigint;
}

function transferData(id: string, dr: string, cr: string, amount: bigint, flags: Record<string, boolean>, pendingId: string | null, ts: bigint): Record<string, unknown> {
  return {
    id,
    debitAccountId: dr,
    creditAccountId: cr,
    amount: amount.toString(),
    pendingId,
    ledger: 'USD',
    code: 1,
    flags,
    timeoutSeconds: 0,
    metadata: {},
    timestamp: ts.toString(),
    result: 'ok',
    expiresAt: null,
  };
}

/** One writer's event generator: seeded, and consistent (posts and voids only of its own open reservations). */
function generator(writer: number, accounts: readonly string[], totals: Totals): () => StreamEvent {
  const rand = prng(seed + writer * 7919);
  const open: Pending[] = [];
  let ts = BigInt(writer) << 40n;
  const pick = (): string => accounts[Math.floor(rand() * accounts.length)] as string;
  return () => {
    ts += 1n;
    const id = randomUUID();
    const r = rand();
    const ev = (type: string, data: Record<string, unknown>): StreamEvent => ({ streamType: 'ledger.transfer', streamId: id, version: 1, event: { id: randomUUID(), type, data } });
    if (open.length > 0 && (r < 0.15 || open.length >= OPEN_PENDING_MAX)) {
      const p = open.splice(Math.floor(rand() * open.length), 1)[0] as Pending;
      totals.pending -= p.amount;
      if (r < 0.05) return ev('ledger.PendingTransferVoided', transferData(id, p.dr, p.cr, p.amount, { voidPendingTransfer: true }, p.id, ts));
      const amount = rand() < 0.5 ? p.amount : 1n + BigInt(Math.floor(rand() * Number(p.amount)));
      totals.posted += amount;
      return ev('ledger.PendingTransferPosted', transferData(id, p.dr, p.cr, amount, { postPendingTransfer: true }, p.id, ts));
    }
    const dr = pick();
    let cr = pick();
    while (cr === dr) cr = pick();
    const amount = 1n + BigInt(Math.floor(rand() * 1000));
    if (r < 0.3) {
      open.push({ id, dr, cr, amount });
      totals.pending += amount;
      return ev('ledger.TransferPending', transferData(id, dr, cr, amount, { pending: true }, null, ts));
    }
    totals.posted += amount;
    return ev('ledger.TransferPosted', transferData(id, dr, cr, amount, {}, null, ts));
  };
}

function load(): string {
  return loadavg().map((x) => x.toFixed(2)).join(' ');
}

async function main(): Promise<void> {
  log(`seed ${seed}; ${totalEvents} events, ${accountCount} accounts, ${writers} writers × ${eventsPerTx} events/tx, replay batch ${batchSize} × ${replayWorkers} workers`);
  const db = await createTestDatabase('ll_bench_replay');
  const pool = new pg.Pool({ connectionString: db.url, max: writers + 2 });
  pool.on('error', () => {});
  try {
    await migrateEvents(db.url);
    const store = await EventStore.open(pool);
    await ensureProjection(pool, ledgerBalancesProjection);
    const accounts = Array.from({ length: accountCount }, () => randomUUID());
    for (let i = 0; i < accounts.length; i += 5000) {
      const chunk = accounts.slice(i, i + 5000);
      await pool.query('BEGIN');
      await store.appendMany(pool, chunk.map((id, k): StreamEvent => ({
        streamType: 'ledger.account',
        streamId: id,
        version: 1,
        event: { type: 'ledger.AccountOpened', data: { id, ledger: 'USD', code: 1, flags: {}, metadata: {}, timestamp: String(i + k + 1) } },
      })));
      await pool.query('COMMIT');
    }
    await pool.query('VACUUM ANALYZE events.events');

    const loadWriteStart = load();
    log(`write phase (load ${loadWriteStart})`);
    const totals: Totals = { posted: 0n, pending: 0n };
    let remaining = totalEvents;
    const writeStarted = performance.now();
    await Promise.all(
      Array.from({ length: writers }, async (_, w) => {
        const next = generator(w, accounts, totals);
        while (remaining > 0) {
          checkAborted();
          const n = Math.min(eventsPerTx, remaining);
          remaining -= n;
          const entries = Array.from({ length: n }, next);
          const c = await pool.connect();
          try {
            await c.query('BEGIN');
            await store.appendMany(c, entries);
            await c.query('COMMIT');
          } catch (error) {
            await c.query('ROLLBACK').catch(() => {});
            throw error;
          } finally {
            c.release();
          }
        }
      }),
    );
    const writeSeconds = (performance.now() - writeStarted) / 1000;
    const loadWriteEnd = load();
    const writeEventsPerS = totalEvents / writeSeconds;
    log(`wrote ${totalEvents} events in ${writeSeconds.toFixed(1)} s: ${Math.round(writeEventsPerS)} events/s (load ${loadWriteEnd})`);
    await pool.query('VACUUM ANALYZE events.events');

    const loadReplayStart = load();
    log(`replay phase: blue/green rebuild of ledger_balances (load ${loadReplayStart})`);
    let replayed = 0;
    const report = await rebuild(pool, store, ledgerBalancesProjection, {
      mode: 'blue-green',
      batchSize,
      ...(replayWorkers > 0 ? { workers: { count: replayWorkers, databaseUrl: db.url } } : {}),
      onBatch: (r) => {
        replayed += r.applied;
        if (replayed % (batchSize * 20) < r.applied) log(`  replayed ${replayed}`);
      },
    });
    const loadReplayEnd = load();
    log(`replayed ${report.events} events in ${report.seconds.toFixed(1)} s: ${Math.round(report.eventsPerSecond)} events/s; rebuild ${report.rebuildSeconds.toFixed(1)} s (load ${loadReplayEnd})`);

    const sums = await pool.query<{ dpo: string; cpo: string; dp: string; cp: string; n: number }>(
      `SELECT sum(debits_posted)::text AS dpo, sum(credits_posted)::text AS cpo, sum(debits_pending)::text AS dp,
              sum(credits_pending)::text AS cp, count(*)::int AS n FROM projections.ledger_balances`,
    );
    const s = sums.rows[0];
    const verified = s !== undefined && s.n === accountCount && BigInt(s.dpo) === totals.posted && BigInt(s.cpo) === totals.posted &&
      BigInt(s.dp) === totals.pending && BigInt(s.cp) === totals.pending;
    log(`check: posted ${s?.dpo}/${s?.cpo} (expected ${totals.posted}), pending ${s?.dp}/${s?.cp} (expected ${totals.pending}): ${verified ? 'ok' : 'MISMATCH'}`);
    if (!verified) process.exitCode = 1;
    const replayEventsPerS = report.eventsPerSecond;
    process.stdout.write(`${JSON.stringify({
      events: report.events,
      transfer_events_written: totalEvents,
      replay_events_per_s: Math.round(replayEventsPerS),
      write_events_per_s: Math.round(writeEventsPerS),
      replay_speedup: Number((replayEventsPerS / writeEventsPerS).toFixed(2)),
      rebuild_seconds: Number(report.rebuildSeconds.toFixed(2)),
      replay_seconds: Number(report.seconds.toFixed(2)),
      write_seconds: Number(writeSeconds.toFixed(2)),
      replay_batch: batchSize,
      replay_workers: replayWorkers,
      writers,
      events_per_tx: eventsPerTx,
      accounts: accountCount,
      verified,
      seed,
      cpu_count: cpus().length,
      loadavg_write_start: loadWriteStart,
      loadavg_write_end: loadWriteEnd,
      loadavg_replay_start: loadReplayStart,
      loadavg_replay_end: loadReplayEnd,
    })}\n`);
  } finally {
    await pool.end();
    await db.drop();
  }
}

exitWhenDone(main(), log);

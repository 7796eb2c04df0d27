/**
 * Audit search over event leaves at scale (issue 4: search for compliance reviews), with the
 * reference beside it in the same run: the same searches with the tiles' summaries cleared,
 * as tiles integrated before summaries existed are read.
 *
 *   npm run bench:audit-search -- [--events 300000] [--actors 500] [--tile 20000] [--page 50] [--seed N]
 *
 * A fresh database (dropped at the end, also on error or Ctrl-C). `events` ledger-like events
 * (one per stream, 1,000 per transaction) whose actors cycle through `actors` users, except one
 * event by `user:rare`; one in 997 is a rejection (outcome failure). The sequencer integrates
 * them in tiles of up to `tile` events (the service's AUDIT_SEQUENCER_BATCH_MAX), timed with
 * its PostgreSQL CPU per event. Then the first page (`page` results, oldest first) of five
 * searches, each timed: an actor in no event, the rare actor, a busy actor,
 * `outcome=failure`, and an action every event has; then the summaries are cleared (as a
 * superuser, triggers off) and the same searches timed again. Before that, full verification
 * of the log (`verifyLog`: every leaf recomputed, every tile's stretch of the global order held
 * to its positions, every checkpoint) is timed once: `verify_events_per_s`.
 *
 * Progress goes to stderr; the last line on stdout is one JSON object.
 */
import { randomUUID } from 'node:crypto';
import { loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { AuditSequencer, loadSigningKey, migrateAudit, verifyLog } from '../packages/audit/src/index.ts';
import { searchEventLeaves, type EventLeafFilter } from '../packages/audit/src/event-leaves.ts';
import { EventStore, migrateEvents, type StreamEvent } from '../packages/events/src/index.ts';
import { createTestDatabase } from '../packages/testing/src/index.ts';
import { abortOnSignals, benchLog, checkAborted, exitWhenDone, intArg, procCpuMs } from './common.ts';

const { values: args } = parseArgs({
  options: {
    events: { type: 'string' },
    actors: { type: 'string' },
    tile: { type: 'string' },
    page: { type: 'string' },
  },
  strict: true,
});
const events = Math.floor(intArg('events', args.events, 300_000, 1000));
const actors = Math.floor(intArg('actors', args.actors, 500, 1));
const tile = Math.floor(intArg('tile', args.tile, 20_000, 1));
const pageSize = Math.floor(intArg('page', args.page, 50, 1));
const PER_TRANSACTION = 1000;

const log = benchLog('bench:audit-search');
abortOnSignals(log);

const SEARCHES: Record<string, EventLeafFilter> = {
  absent_actor: { actorId: 'user:absent' },
  rare_actor: { actorId: 'user:rare' },
  busy_actor: { actorId: 'user:7' },
  failures: { outcome: 'failure' },
  // Every event matches: a page fills from the first leaves it reads.
  every_transfer: { action: 'ledger.TransferPosted' },
};

async function main(): Promise<void> {
  const loadStart = loadavg()[0] ?? 0;
  const db = await createTestDatabase('ll_bench_audit_search');
  const pool = new pg.Pool({ connectionString: db.url, max: 4 });
  try {
    await migrateEvents(db.url);
    await migrateAudit(db.url);
    const store = await EventStore.open(pool);
    log(`appending ${events} events from ${actors} actors`);
    const rare = Math.floor(events / 2);
    for (let done = 0; done < events; done += PER_TRANSACTION) {
      checkAborted();
      const entries: StreamEvent[] = [];
      for (let k = done; k < Math.min(events, done + PER_TRANSACTION); k += 1) {
        entries.push({
          streamType: 'ledger.transfer',
          streamId: randomUUID(),
          version: 1,
          event: {
            type: 'ledger.TransferPosted',
            data: { id: randomUUID(), amount: String(k + 1), result: k % 997 === 0 ? 'exceeds_credits' : 'ok', debitAccountId: randomUUID(), creditAccountId: randomUUID(), ledger: 'USD', code: 1 },
            metadata: { actor: k === rare ? 'user:rare' : `user:${k % actors}`, causationId: randomUUID(), ip: '10.0.0.1' },
          },
        });
      }
      await store.appendMany(pool, entries);
    }

    const signer = loadSigningKey(undefined, { production: false });
    const sequencer = new AuditSequencer({ pool, signer, origin: 'bench', tailEvents: true, batchRecordsMax: tile, checkpointIntervalMs: 0 });
    const backends = async (): Promise<number[]> =>
      (await pool.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE datname = current_database()')).rows.map((r) => r.pid);
    const pgCpu = async (): Promise<number> => (await backends()).reduce((ms, pid) => ms + procCpuMs(pid), 0);
    log('integrating');
    const cpu0 = await pgCpu();
    const t0 = performance.now();
    for (;;) {
      checkAborted();
      if ((await sequencer.round()).records === 0) break;
    }
    const integrateS = (performance.now() - t0) / 1000;
    const integratePgMs = (await pgCpu()) - cpu0;
    const tiles = (await pool.query<{ n: number }>('SELECT count(*)::integer AS n FROM audit.event_leaves')).rows[0]?.n ?? 0;

    log('verifying');
    await pool.query('VACUUM ANALYZE');
    const v0 = performance.now();
    const verified = await verifyLog(pool, { publicKey: signer.publicKey });
    const verifyS = (performance.now() - v0) / 1000;
    if (!verified.ok || verified.records !== events) throw new Error(`verification failed: ${JSON.stringify(verified.issues.slice(0, 3))}`);

    const timeSearches = async (): Promise<Record<string, { ms: number; found: number }>> => {
      const out: Record<string, { ms: number; found: number }> = {};
      for (const [name, filter] of Object.entries(SEARCHES)) {
        const start = performance.now();
        const found = await searchEventLeaves(pool, filter, { desc: false, after: null, limit: pageSize });
        out[name] = { ms: Math.round((performance.now() - start) * 10) / 10, found: found.length };
      }
      return out;
    };
    log('searching, with the tiles\' summaries');
    const summarised = await timeSearches();
    const c = await pool.connect();
    try {
      await c.query('BEGIN');
      await c.query('SET LOCAL session_replication_role = replica');
      await c.query('UPDATE audit.event_leaves SET actors = NULL, failures = NULL');
      await c.query('COMMIT');
    } finally {
      c.release();
    }
    log('searching, the summaries cleared');
    const unsummarised = await timeSearches();
    const figures = {
      events,
      actors,
      tiles,
      page: pageSize,
      integrate_events_per_s: Math.round(events / integrateS),
      integrate_pg_us_per_event: Math.round((integratePgMs * 1000 * 100) / events) / 100,
      verify_events_per_s: Math.round(events / verifyS),
      search_ms: Object.fromEntries(Object.entries(summarised).map(([k, v]) => [k, v.ms])),
      search_found: Object.fromEntries(Object.entries(summarised).map(([k, v]) => [k, v.found])),
      reference_without_summaries_ms: Object.fromEntries(Object.entries(unsummarised).map(([k, v]) => [k, v.ms])),
      reference_found: Object.fromEntries(Object.entries(unsummarised).map(([k, v]) => [k, v.found])),
      loadavg_1m_start: loadStart,
      loadavg_1m_end: loadavg()[0] ?? 0,
    };
    if (JSON.stringify(figures.search_found) !== JSON.stringify(figures.reference_found)) {
      throw new Error(`the searches found different counts with and without summaries: ${JSON.stringify(figures.search_found)} vs ${JSON.stringify(figures.reference_found)}`);
    }
    process.stdout.write(`${JSON.stringify(figures)}\n`);
  } finally {
    await pool.end();
    await db.drop();
  }
}

exitWhenDone(main(), log);

/**
 * Operator commands for projections, the ledger audit, time travel and exports.
 *
 *   npm run projections -- status [--json]
 *   npm run projections -- run [--batch N]
 *   npm run projections -- replay [--from-position N] [--to-position N] [--batch N] [--workers N] [--keep] [--json]
 *   npm run projections -- rebuild [--in-place] [--batch N] [--workers N] [--json]
 *   npm run projections -- reconcile-ledger [--page-size N] [--differences-max N] [--json]
 *   npm run projections -- balance-at --account ID (--position N | --time ISO) [--json]
 *   npm run projections -- export --to REGION --out FILE [--from-position N] [--to-position N]
 *   npm run projections -- drop-generation --generation N
 *
 * The projection is `ledger_balances` (--projection names it; it is the only one built in).
 * DATABASE_SESSION_URL, else DATABASE_URL (or --database-url) is the database. `export` reads
 * the residency policy from EVENTS_RESIDENCY_POLICY (JSON: data region → allowed locations,
 * e.g. {"eu":["eu-west-1"]}) and where this store runs from EVENTS_REGION. Exit codes: 0 done, 1 differences found
 * (reconcile-ledger), the export refused or the projection not set up (status), 2 a usage error or a failure.
 *
 * Only the commands that build a projection (run, replay, rebuild) migrate the events schema
 * and create the projection. The others (status, reconcile-ledger, balance-at, export, and
 * drop-generation, which only removes) set nothing up: pointed at a database without the
 * schemas they need, they say so and fail, rather than set one up and report it healthy.
 *
 * The store this CLI opens for run, replay, rebuild and the audits has no residency policy:
 * it reads every event wherever its stream's data must stay. Run it only where all of the
 * store's data may be read (export alone takes EVENTS_RESIDENCY_POLICY).
 */
import pg from 'pg';
import {
  cliStreams,
  dateOption,
  describeFailure,
  EventStore,
  intOption,
  migrateEvents,
  operatorDatabaseUrl,
  parseCommandLine,
  parseResidencyPolicy,
  ResidencyConfigError,
  ResidencyViolationError,
  UsageError,
  type Checkpoint,
  type CliIo as BaseCliIo,
} from '@ledgerline/events';
import { exportEvents } from './export.ts';
import { ledgerBalanceAt, ledgerBalancesProjection } from './ledger-balances.ts';
import { checkpointLess, createGeneration, dropGeneration, ensureProjection, projectionLag, rebuild, rebuildFailureNote, replayInto, type Projection } from './projection.ts';
import { formatLedgerReconcileReport, reconcileLedger } from './reconcile-ledger.ts';
import { ProjectionRunner } from './runner.ts';

export interface CliIo extends BaseCliIo {
  /** Resolves when `run` should stop (default: SIGINT or SIGTERM). */
  stopSignal?: Promise<void>;
}

const USAGE = `usage: projections <command> [options]
  status [--json]
  run [--batch N]                                   the live runner, until SIGINT/SIGTERM
  replay [--from-position N] [--to-position N] [--batch N] [--workers N] [--keep] [--json]
  rebuild [--in-place] [--batch N] [--workers N] [--json]   blue/green unless --in-place
  reconcile-ledger [--page-size N] [--differences-max N] [--json]
  balance-at --account ID (--position N | --time ISO) [--json]
  export --to REGION --out FILE [--from-position N] [--to-position N]
  drop-generation --generation N                    drops an inactive generation and its tables
options: --projection NAME (default ledger_balances), --database-url URL (default DATABASE_SESSION_URL, else DATABASE_URL)
export: EVENTS_RESIDENCY_POLICY (JSON, data region -> allowed locations), EVENTS_REGION`;

const PROJECTIONS: ReadonlyMap<string, Projection> = new Map([[ledgerBalancesProjection.name, ledgerBalancesProjection]]);

const OPTIONS = {
  projection: { type: 'string', default: ledgerBalancesProjection.name },
  batch: { type: 'string' },
  workers: { type: 'string' },
  'from-position': { type: 'string' },
  'to-position': { type: 'string' },
  'page-size': { type: 'string' },
  'differences-max': { type: 'string' },
  account: { type: 'string' },
  position: { type: 'string' },
  generation: { type: 'string' },
  time: { type: 'string' },
  to: { type: 'string' },
  out: { type: 'string' },
  keep: { type: 'boolean', default: false },
  'in-place': { type: 'boolean', default: false },
  json: { type: 'boolean', default: false },
  'database-url': { type: 'string' },
  help: { type: 'boolean', default: false },
} as const;

const COMMANDS = ['status', 'run', 'replay', 'rebuild', 'reconcile-ledger', 'balance-at', 'export', 'drop-generation'];
/** The commands that build projections: only these may migrate a database and create the projection. */
const WRITING = new Set(['run', 'replay', 'rebuild']);

/** What each other command reads; a database without these is not the one meant. */
const NEEDS: Readonly<Record<string, readonly string[]>> = {
  'drop-generation': ['events.settings', 'events.projections'],
  status: ['events.settings', 'events.events', 'events.projections'],
  'reconcile-ledger': ['events.settings', 'events.events', 'ledger.accounts'],
  'balance-at': ['events.settings', 'events.events'],
  export: ['events.settings', 'events.events'],
};

/** The tables of `names` this database lacks. */
async function missingTables(pool: pg.Pool, names: readonly string[]): Promise<string[]> {
  const r = await pool.query<{ name: string }>('SELECT n AS name FROM unnest($1::text[]) n WHERE to_regclass(n) IS NULL', [names]);
  return r.rows.map((x) => x.name);
}

/** How an operator drops a generation left behind. */
const dropHint = (name: string, generation: number): string => `projections drop-generation --projection ${name} --generation ${generation}`;

function stopOnSignals(): Promise<void> {
  return new Promise((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
}

const json = (value: unknown): string => JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));

/** Runs one command; returns the exit code. */
export async function runCli(argv: readonly string[], io: CliIo = {}): Promise<number> {
  const { env, out, err } = cliStreams(io);
  const parsed = parseCommandLine(argv, OPTIONS, USAGE, err);
  if (parsed === null) return 2;
  const { values: a, positionals } = parsed;
  const command = positionals.join(' ');
  if (a.help || !COMMANDS.includes(command)) {
    (a.help ? out : err)(USAGE);
    return a.help ? 0 : 2;
  }
  const databaseUrl = a['database-url'] ?? operatorDatabaseUrl(env);
  if (databaseUrl === undefined) {
    err(`DATABASE_URL (or --database-url) is required\n${USAGE}`);
    return 2;
  }
  const projection = PROJECTIONS.get(a.projection);
  if (projection === undefined) {
    err(`unknown projection ${a.projection}; known: ${[...PROJECTIONS.keys()].join(', ')}`);
    return 2;
  }
  const pool = new pg.Pool({ connectionString: databaseUrl, max: 3 });
  pool.on('error', () => {});
  try {
    const batchSize = intOption('batch', a.batch, 1) ?? 10_000;
    // Worker threads that decode replay pages (0: decode in this thread).
    const workerCount = intOption('workers', a.workers, 0) ?? 0;
    const workers = workerCount > 0 ? { workers: { count: workerCount, databaseUrl } } : {};
    if (WRITING.has(command)) {
      await migrateEvents(databaseUrl);
    } else {
      const missing = await missingTables(pool, NEEDS[command] ?? []);
      if (missing.length > 0) {
        const what = `this database has no ${missing.join(', ')}: not set up for event sourcing (or not the database meant); nothing was changed`;
        if (command === 'status') {
          out(a.json ? json({ name: projection.name, setUp: false, missing }) : `${projection.name}: not set up (${what})`);
          return 1;
        }
        err(`${command}: ${what}`);
        return 2;
      }
    }
    const store = await EventStore.open(pool);
    const at = async (name: string, value: string | undefined): Promise<Checkpoint | undefined> => {
      const position = intOption(name, value, 1);
      if (position === undefined) return undefined;
      // Retention moves events into the archive with their place in the global order: a
      // position found there is as good as a hot one (the archive has no index on position
      // alone, so it is read only when the hot table has no such event).
      const cp = await store.checkpointAt(pool, BigInt(position));
      if (cp === null) throw new UsageError(`--${name} ${position}: no event at that position`);
      return cp;
    };
    /** The range --from-position .. --to-position, refused when it runs backwards. */
    const range = async (): Promise<{ from: Checkpoint | undefined; until: Checkpoint | undefined }> => {
      const from = await at('from-position', a['from-position']);
      const until = await at('to-position', a['to-position']);
      if (from !== undefined && until !== undefined && checkpointLess(until, from)) {
        throw new UsageError(`--from-position ${a['from-position']} is after --to-position ${a['to-position']} in the global order: the range is empty`);
      }
      return { from, until };
    };
    if (command === 'reconcile-ledger') {
      const report = await reconcileLedger(pool, {
        pageSize: intOption('page-size', a['page-size'], 1),
        differencesMax: intOption('differences-max', a['differences-max'], 0),
      });
      out(a.json ? json(report) : formatLedgerReconcileReport(report));
      return report.ok ? 0 : 1;
    }
    if (command === 'balance-at') {
      if (a.account === undefined) throw new UsageError('balance-at needs --account');
      if ((a.position === undefined) === (a.time === undefined)) throw new UsageError('balance-at needs exactly one of --position and --time');
      let asOf: { checkpoint: Checkpoint } | { time: Date };
      const time = dateOption('time', a.time);
      if (time !== undefined) {
        asOf = { time };
      } else {
        asOf = { checkpoint: (await at('position', a.position)) as Checkpoint };
      }
      const balance = await ledgerBalanceAt(pool, a.account, asOf);
      out(a.json ? json(balance) : balance === null ? `account ${a.account} did not exist then` :
        `account ${balance.id} (${balance.ledger}): debits posted ${balance.debitsPosted} pending ${balance.debitsPending}, ` +
        `credits posted ${balance.creditsPosted} pending ${balance.creditsPending}, flags ${balance.flags}`);
      return 0;
    }
    if (command === 'export') {
      if (a.to === undefined || a.out === undefined) throw new UsageError('export needs --to REGION and --out FILE');
      const policyText = env.EVENTS_RESIDENCY_POLICY;
      if (policyText === undefined || policyText === '') throw new UsageError('EVENTS_RESIDENCY_POLICY is required for export');
      const policy = parseResidencyPolicy(policyText);
      const location = env.EVENTS_REGION;
      if (location === undefined || location === '') throw new UsageError('EVENTS_REGION is required for export');
      const localStore = await EventStore.open(pool, { residency: { policy, location } });
      const { from, until } = await range();
      try {
        const report = await exportEvents(pool, localStore, {
          policy,
          targetLocation: a.to,
          out: a.out,
          ...(from === undefined ? {} : { after: { transactionId: from.transactionId, position: from.position - 1n } }),
          ...(until === undefined ? {} : { until }),
        });
        out(json(report));
        return 0;
      } catch (error) {
        if (!(error instanceof ResidencyViolationError)) throw error;
        err(error.message);
        return 1;
      }
    }
    if (command === 'status') {
      // Read only: a projection nobody created is reported as such, not created here.
      const lag = await projectionLag(pool, projection.name);
      out(a.json ? json(lag ?? { name: projection.name, setUp: false }) : lag === null ? `${projection.name}: not set up` :
        `${projection.name}: generation ${lag.generation}, ${lag.eventsApplied} events applied, ` +
        `checkpoint ${lag.checkpoint.transactionId}/${lag.checkpoint.position}, ${lag.eventsBehind} behind, lag ${lag.seconds.toFixed(3)} s`);
      return lag === null ? 1 : 0;
    }
    if (command === 'drop-generation') {
      const generation = intOption('generation', a.generation, 1);
      if (generation === undefined) throw new UsageError('drop-generation needs --generation N');
      const exists = await pool.query<{ active: boolean }>('SELECT active FROM events.projections WHERE name = $1 AND generation = $2', [projection.name, generation]);
      if (exists.rows.length === 0) {
        err(`${projection.name} has no generation ${generation}`);
        return 2;
      }
      if (exists.rows[0]?.active === true) {
        // dropGeneration refuses it too (in its transaction, should it become active meanwhile).
        err(`generation ${generation} of ${projection.name} is active (readers use it): only an inactive generation is dropped; nothing was changed`);
        return 2;
      }
      await dropGeneration(pool, projection, generation);
      out(`dropped generation ${generation} of ${projection.name}`);
      return 0;
    }
    await ensureProjection(pool, projection);
    if (command === 'run') {
      const runner = new ProjectionRunner({ pool, store, projection, batchSize, onError: (e) => err(`[projections] ${String(e)}`) });
      runner.start();
      await (io.stopSignal ?? stopOnSignals());
      await runner.stop();
      const stats = runner.stats();
      out(json(stats));
      // Stopped while its batches fail (until 2026-12-07 this exited 0 even when every batch had
      // failed; a review found it): a supervisor must see that the projection was not moving.
      if (stats.failing) {
        err(`[projections] stopped while failing: the last batch did not commit (${stats.errors} failed in all); the projection is behind`);
        return 1;
      }
      return 0;
    }
    if (command === 'replay') {
      const { from, until } = await range();
      // Just before `from`: no event lies between (t, p - 1) and (t, p) in the global order.
      const start = from === undefined ? undefined : { transactionId: from.transactionId, position: from.position - 1n };
      const generation = await createGeneration(pool, projection, start);
      let report: Awaited<ReturnType<typeof replayInto>>;
      try {
        report = await replayInto(pool, store, projection, generation, { batchSize, ...workers, ...(until === undefined ? {} : { until }) });
      } catch (error) {
        // A failed replay's generation is half filled and nothing reads it: drop it (even
        // with --keep), and say what became of it, so no table is left behind unnoticed.
        err(await dropFailed(pool, projection, generation));
        throw error;
      }
      if (!a.keep) await dropGeneration(pool, projection, generation);
      out(a.json ? json({ ...report, kept: a.keep }) :
        `replayed ${report.events} events into ${projection.name} generation ${generation} in ${report.seconds.toFixed(2)} s: ` +
        `${Math.round(report.eventsPerSecond)} events/s${a.keep ? ' (kept, inactive)' : ' (dropped)'}`);
      return 0;
    }
    // rebuild (which drops its own generation when a blue/green rebuild fails)
    const report = await rebuild(pool, store, projection, { mode: a['in-place'] ? 'in-place' : 'blue-green', batchSize, ...workers });
    out(a.json ? json(report) :
      `rebuilt ${projection.name} (${report.mode}) as generation ${report.generation}: ${report.events} events in ` +
      `${report.rebuildSeconds.toFixed(2)} s, ${Math.round(report.eventsPerSecond)} events/s`);
    return 0;
  } catch (error) {
    const note = rebuildFailureNote(error);
    if (note !== undefined) err(note);
    if (error instanceof UsageError || error instanceof ResidencyConfigError) err(`${error.message}\n${USAGE}`);
    else err(`failed: ${describeFailure(error)}`);
    return 2;
  } finally {
    await pool.end().catch(() => {});
  }
}

/** Drops the generation of a failed replay; returns what to tell the operator. */
async function dropFailed(pool: pg.Pool, p: Projection, generation: number): Promise<string> {
  try {
    await dropGeneration(pool, p, generation);
    return `replay failed: its generation ${generation} of ${p.name} was dropped`;
  } catch (dropError) {
    return `replay failed and its generation ${generation} of ${p.name} was KEPT (dropping it failed: ${String(dropError)}); ` +
      `drop it with: ${dropHint(p.name, generation)}`;
  }
}

if (import.meta.main) {
  process.exitCode = await runCli(process.argv.slice(2));
}

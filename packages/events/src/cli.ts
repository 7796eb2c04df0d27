/**
 * Operator commands for the event bus.
 *
 *   node packages/events/src/cli.ts reconcile [--from ISO] [--to ISO] [--consumer NAME]... [--json]
 *                                             [--page-size N] [--issues-max N] [--start-margin-ms N]
 *   node packages/events/src/cli.ts dlq list [--consumer NAME]... [--pending] [--limit N] [--json]
 *   node packages/events/src/cli.ts dlq replay --consumer NAME [--event ID]... [--limit N] [--json]
 *   node packages/events/src/cli.ts dlq undecodable [--consumer NAME]... [--limit N] [--json]
 *   node packages/events/src/cli.ts inbox prune --consumer NAME [--before ISO] [--page-size N] [--limit N] [--json]
 *
 * Connections come from DATABASE_SESSION_URL (else DATABASE_URL), NATS_URL, EVENTS_STREAM and
 * EVENTS_SUBJECT_PREFIX (the ledger service's variables and defaults), or from --database-url,
 * --nats-url, --stream and --subject-prefix. Reconciliation keeps a temporary table in its
 * session, so it needs a direct or session-pooled connection, never one through a pooler that
 * pools transactions: that is what DATABASE_SESSION_URL is. `dlq replay` applies the relay's
 * residency settings (EVENTS_RESIDENCY_POLICY, EVENTS_BROKER_LOCATION) as the relay does: an
 * event they keep from the broker is withheld. Exit codes: 0 clean, 1 gaps found
 * (reconcile) or an event not replayed (dlq replay) or a prune stopped at an event the consumer
 * owes (inbox prune), 2 a usage error or a failure. A usage
 * error (an option's value the command cannot use: a date PostgreSQL cannot hold, a stream the
 * broker does not have) prints its message and the usage; a failure of the database or the
 * broker its message; only a bug a stack trace.
 */
import { jetstreamManager } from '@nats-io/jetstream';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import pg from 'pg';
import { listDeadLetters, listUndecodableMessages, replayDeadLetters, type ReplayOutcome } from './dlq.ts';
import { assertEventsSchema, formatReconcileReport, reconcile, ReconcileSessionError } from './reconcile.ts';
import type { RelayResidency } from './relay.ts';
import { relayResidencyFromEnv, ResidencyConfigError } from './residency-config.ts';
import { pruneInbox, type PruneInboxReport } from './inbox-prune.ts';
import type { Checkpoint } from './store.ts';
import { EventStore } from './store.ts';
import { cliStreams, dateOption, describeFailure, intOption, operatorDatabaseUrl, parseCommandLine, UsageError, type CliIo } from './cli-kit.ts';

export type { CliIo } from './cli-kit.ts';

const USAGE = `usage:
  events reconcile [--from ISO] [--to ISO] [--consumer NAME]... [--json] [--page-size N] [--issues-max N] [--start-margin-ms N]
  events dlq list [--consumer NAME]... [--pending] [--limit N] [--json]
  events dlq replay --consumer NAME [--event ID]... [--limit N] [--json]
  events dlq undecodable [--consumer NAME]... [--limit N] [--json]
  events inbox prune --consumer NAME [--before ISO] [--page-size N] [--limit N] [--json]
connections: DATABASE_SESSION_URL (else DATABASE_URL), NATS_URL, EVENTS_STREAM, EVENTS_SUBJECT_PREFIX
  (or --database-url, --nats-url, --stream, --subject-prefix); dlq replay: the relay's
  EVENTS_RESIDENCY_POLICY and EVENTS_BROKER_LOCATION (an event they keep from the broker is withheld)
reconcile defaults to the last 24 hours; inbox prune to events recorded before 7 days ago
  (--limit: at most N events passed); exit 0 clean, 1 gaps, 2 usage or failure`;

const OPTIONS = {
  from: { type: 'string' },
  to: { type: 'string' },
  before: { type: 'string' },
  consumer: { type: 'string', multiple: true },
  event: { type: 'string', multiple: true },
  json: { type: 'boolean', default: false },
  pending: { type: 'boolean', default: false },
  limit: { type: 'string' },
  'page-size': { type: 'string' },
  'issues-max': { type: 'string' },
  'start-margin-ms': { type: 'string' },
  'database-url': { type: 'string' },
  'nats-url': { type: 'string' },
  stream: { type: 'string' },
  'subject-prefix': { type: 'string' },
  help: { type: 'boolean', default: false },
} as const;

/** A subject prefix: dot-separated tokens, none empty, with no space or wildcard. */
const SUBJECT_PREFIX = /^[^\s.*>]+(?:\.[^\s.*>]+)*$/;

/**
 * Refuses, as a usage error, a stream the broker at `natsUrl` does not have or could not have
 * (a name with a space, a dot, a wildcard): each command that names the stream would otherwise
 * end on the NATS client's error, with a stack trace.
 */
async function checkStream(nats: NatsConnection, natsUrl: string, streamName: string): Promise<void> {
  try {
    await (await jetstreamManager(nats)).streams.info(streamName);
  } catch (error) {
    const name = (error as Error).name;
    if (name === 'InvalidNameError') throw new UsageError(`--stream (or EVENTS_STREAM): not a stream name: ${(error as Error).message}`);
    if (name === 'StreamNotFoundError') {
      throw new UsageError(`--stream (or EVENTS_STREAM): the broker at ${natsUrl} has no stream ${streamName}`);
    }
    throw error;
  }
}

/** How old an event must be, by default, for `inbox prune` to pass it. */
const INBOX_PRUNE_AGE_DEFAULT_MS = 7 * 24 * 3600_000;

function formatPruneReport(r: PruneInboxReport): string {
  const at = (c: Checkpoint | null): string => (c === null ? 'none' : `(${c.transactionId}, ${c.position})`);
  const lines = [
    `inbox of ${r.consumer}: horizon ${at(r.from)} -> ${at(r.through)}; ${r.eventsPassed} events passed, ` +
      `${r.inboxRowsRemoved} inbox rows removed, ${r.opened - r.withheld} dead-lettered and ${r.withheld} withheld by the relay left open`,
  ];
  const stop = r.stop;
  if (stop.reason === 'unhandled') {
    const e = stop.event;
    const when = e.recordedAt === null ? 'deleted by retention' : `recorded ${e.recordedAt.toISOString()}${e.deleted ? ', deleted by retention' : ''}`;
    lines.push(
      `  stopped at event ${e.eventId} (position ${e.position}, ${when}): ` +
        'the consumer has neither handled nor dead-lettered it (behind, or it skipped it: see `events reconcile`)',
    );
  } else if (stop.reason === 'snapshots') {
    lines.push(
      `  stopped: ${stop.backends} session(s) kept a snapshot older than the new horizon past the wait; ` +
        'the last page\'s rows stay until the next prune removes them',
    );
  } else {
    const why = { before: `reached the events recorded from ${r.before} on`, read_horizon: 'reached the read horizon', max_events: 'reached --limit' };
    lines.push(`  stopped: ${why[stop.reason]}`);
  }
  return lines.join('\n');
}

/** Runs one command; returns the exit code. */
export async function runCli(argv: readonly string[], io: CliIo = {}): Promise<number> {
  const { env, out, err } = cliStreams(io);
  const parsed = parseCommandLine(argv, OPTIONS, USAGE, err);
  if (parsed === null) return 2;
  const { values: a, positionals } = parsed;
  const command = positionals.join(' ');
  if (a.help || !['reconcile', 'dlq list', 'dlq replay', 'dlq undecodable', 'inbox prune'].includes(command)) {
    (a.help ? out : err)(USAGE);
    return a.help ? 0 : 2;
  }
  const databaseUrl = a['database-url'] ?? operatorDatabaseUrl(env);
  const natsUrl = a['nats-url'] ?? env.NATS_URL ?? 'nats://127.0.0.1:4222';
  const streamName = a.stream ?? env.EVENTS_STREAM ?? 'LEDGERLINE_EVENTS';
  const subjectPrefix = a['subject-prefix'] ?? env.EVENTS_SUBJECT_PREFIX ?? 'ledgerline.events';
  if (databaseUrl === undefined) {
    err(`DATABASE_URL (or --database-url) is required\n${USAGE}`);
    return 2;
  }
  if (!SUBJECT_PREFIX.test(subjectPrefix)) {
    err(`--subject-prefix (or EVENTS_SUBJECT_PREFIX) must be dot-separated tokens without spaces or wildcards, got ${JSON.stringify(subjectPrefix)}\n${USAGE}`);
    return 2;
  }
  let pool: pg.Pool | null = null;
  let nats: NatsConnection | null = null;
  try {
    pool = new pg.Pool({ connectionString: databaseUrl, max: 3 });
    pool.on('error', () => {});
    await assertEventsSchema(pool).catch((error: unknown) => {
      // The query answered: the database named is not the event store's.
      if (error instanceof Error && /has no events schema/.test(error.message)) {
        throw new UsageError(`${error.message}: DATABASE_SESSION_URL, DATABASE_URL or --database-url names another database`);
      }
      throw error;
    });
    if (command === 'dlq list') {
      // Every --consumer named (each one's dead letters), or every consumer's.
      const rows = await listDeadLetters(pool, {
        consumer: a.consumer,
        pendingOnly: a.pending,
        limit: intOption('limit', a.limit),
      });
      if (a.json) {
        out(JSON.stringify(rows.map((r) => ({ ...r, position: r.position.toString() }))));
      } else {
        out(`${rows.length} dead letter(s)`);
        for (const r of rows) {
          const at = r.streamType === null ? '(not in the store)' : `${r.streamType}/${r.streamId} v${r.version} ${r.type}`;
          const state = r.replayedAt === null ? 'PENDING' : `replayed ${r.replayedAt.toISOString()}`;
          out(`  [${r.consumer}] ${r.eventId} pos ${r.position} ${at}: ${r.attempts} attempts, dead ${r.deadAt.toISOString()}, ${state}: ${r.error}`);
        }
      }
      return 0;
    }
    if (command === 'dlq undecodable') {
      const rows = await listUndecodableMessages(pool, { consumer: a.consumer, limit: intOption('limit', a.limit) });
      if (a.json) {
        out(JSON.stringify(rows.map((r) => ({ ...r, streamSequence: r.streamSequence.toString(), head: r.head.toString('base64') }))));
      } else {
        out(`${rows.length} undecodable message(s)`);
        for (const r of rows) {
          // What it starts with, as text where it is printable, for a first look.
          const start = r.head.subarray(0, 60).toString('latin1').replace(/[^\x20-\x7e]/g, '.');
          out(`  [${r.consumer}] seq ${r.streamSequence} on ${r.subject}, ${r.size} bytes, dead ${r.deadAt.toISOString()}: ${r.error}; starts "${start}"`);
        }
      }
      return 0;
    }
    const consumer = a.consumer?.[0];
    if ((command === 'dlq replay' || command === 'inbox prune') && (consumer === undefined || (a.consumer?.length ?? 0) > 1)) {
      throw new UsageError(`${command} needs exactly one --consumer`);
    }
    if (command === 'inbox prune' && consumer !== undefined) {
      // The database alone: the horizon stands on the inbox and the store, not on the broker.
      const before = dateOption('before', a.before) ?? new Date(Date.now() - INBOX_PRUNE_AGE_DEFAULT_MS);
      const report = await pruneInbox({
        pool,
        consumer,
        before,
        pageSize: intOption('page-size', a['page-size']),
        maxEvents: intOption('limit', a.limit),
        onProgress: (m) => err(`[inbox prune] ${m}`),
      });
      if (a.json) out(JSON.stringify(report, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)));
      else out(formatPruneReport(report));
      // 1: a gap to look at, or rows left for the next run.
      return report.stop.reason === 'unhandled' || report.stop.reason === 'snapshots' ? 1 : 0;
    }
    // A replay publishes to the broker as the relay does, so under the relay's residency settings
    // (EVENTS_RESIDENCY_POLICY, EVENTS_BROKER_LOCATION): one it would withhold now is withheld.
    let residency: RelayResidency | null = null;
    if (command === 'dlq replay') {
      try {
        residency = relayResidencyFromEnv(env);
      } catch (error) {
        if (error instanceof ResidencyConfigError) throw new UsageError(error.message);
        throw error;
      }
    }
    // The dates before any connection: a usage error need not wait for the broker.
    const to = dateOption('to', a.to) ?? new Date();
    const from = dateOption('from', a.from) ?? new Date(to.getTime() - 24 * 3600_000);
    if (command === 'reconcile' && !(from.getTime() < to.getTime())) throw new UsageError('--from must be before --to');
    nats = await connect({ servers: natsUrl, name: 'ledgerline-events-cli', timeout: 5000 });
    await checkStream(nats, natsUrl, streamName);
    if (command === 'dlq replay' && consumer !== undefined) {
      const store = await EventStore.open(pool);
      const outcomes = await replayDeadLetters({
        pool,
        nats,
        store,
        streamName,
        subjectPrefix,
        consumer,
        eventIds: a.event,
        limit: intOption('limit', a.limit),
        // The relay's policy: an event it would withhold from the broker now is not replayed to it.
        ...(residency === null ? {} : { residency }),
      });
      if (a.json) out(JSON.stringify(outcomes));
      else {
        out(`${outcomes.length} dead letter(s) of ${consumer}`);
        for (const o of outcomes) out(`  ${o.eventId}: ${o.status}${o.msgId === null ? '' : ` (${o.msgId}, seq ${o.seq})`}${o.reason === undefined ? '' : `: ${o.reason}`}`);
      }
      const bad: ReplayOutcome['status'][] = ['event_missing', 'not_dead_lettered', 'withheld'];
      return outcomes.some((o) => bad.includes(o.status)) ? 1 : 0;
    }
    // reconcile
    const pageSize = intOption('page-size', a['page-size']);
    const issuesMax = intOption('issues-max', a['issues-max']);
    const marginMs = intOption('start-margin-ms', a['start-margin-ms']);
    const report = await reconcile({
      pool,
      nats,
      streamName,
      subjectPrefix,
      from,
      to,
      consumers: a.consumer,
      pageSize,
      issuesMax,
      brokerStartMarginMs: marginMs,
      onProgress: (m) => err(`[reconcile] ${m}`),
    });
    out(a.json ? JSON.stringify(report) : formatReconcileReport(report));
    return report.ok ? 0 : 1;
  } catch (error) {
    if (error instanceof UsageError || error instanceof RangeError) err(`${error.message}\n${USAGE}`);
    else if (error instanceof ReconcileSessionError) err(`failed: ${error.message}`);
    else err(`failed: ${describeFailure(error)}`);
    return 2;
  } finally {
    await nats?.close().catch(() => {});
    await pool?.end().catch(() => {});
  }
}

if (import.meta.main) {
  process.exitCode = await runCli(process.argv.slice(2));
}

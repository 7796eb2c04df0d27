/**
 * Reconciliation (REQUIREMENTS §1): for the events recorded in a time range [from, to), prove
 * that each one was published to the broker and then consumed exactly once by every
 * registered consumer, and say precisely what differs where that fails.
 *
 * The proof has three sources, read in an order that makes the live system safe to check:
 *
 * 1. The relay checkpoints, as a snapshot taken first. An event at or before its partition's
 *    checkpoint was acked by the broker before the snapshot (the relay checkpoints only after
 *    the ack), so it must be in the stream up to the last sequence read next.
 * 2. The broker itself: an ordered consumer from `from - brokerStartMarginMs` to the stream's
 *    last sequence at the start of the scan (a bound: the scan never tails a live stream). It
 *    decodes each batch message and counts how often each event of the range was seen. A copy
 *    seen more than once is `republished` (a relay that crashed between publish and
 *    checkpoint, a re-cut batch, a dead-letter replay): reported as a count, not an error,
 *    because every consumer's inbox drops it. The scan ends early once it is
 *    `publishLagMaxMs` past the range's end and every checkpointed event of the range has
 *    been seen. The seen counts go to a temporary table, so memory stays bounded however
 *    large the range is.
 * 3. PostgreSQL: the events of the range, paged by position, joined with the seen counts, and
 *    per consumer with the inbox and the dead letters (set-based, one statement per page).
 *    The events are those of events.events and events.archived_events together: retention
 *    archives a stream once the relay has passed it, whether or not the consumers have. An
 *    event in both tables is a copy made by hand (`stored_twice`), reconciled once.
 *    The JetStream consumers' ack floors, read after the scan and before the pages, tell a
 *    consumer that is merely behind (`pending`) from one that acked an event without an
 *    inbox row (`skipped`).
 *
 * Events the relay withheld under the residency policy (events.relay_withheld) are expected
 * nowhere: they are counted (`relay.withheld`), not reported as unpublished, and the early stop
 * does not wait for them. One that is on the broker or reached a consumer (an inbox row or a
 * dead letter) left for a location the policy forbids: a `residency_breach`.
 *
 * The inbox primary key (consumer, event id) makes a second inbox row impossible, so a double
 * effect can only be seen in the effects themselves: callers whose consumers' effects are
 * countable pass `effectCounts`, and a count above one is a `duplicate_effect`. Inbox rows
 * that name an unknown event, or the wrong position for a known one, are reported too.
 *
 * Limits: each consumer is assumed to receive every event (its filter subject is not recorded
 * in events.consumers); pass `consumers` to check a subset.
 */
import { jetstream, jetstreamManager } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import type pg from 'pg';
import type { StoredEvent } from './store.ts';
import { decodeBatch, MalformedBatchError } from './wire.ts';

type Queryable = Pick<pg.ClientBase, 'query'>;

/** Side effects per event id for one consumer; null when its effects are not countable. */
export type EffectCounter = (
  consumer: string,
  range: { from: Date; to: Date },
) => Promise<ReadonlyMap<string, number> | null> | ReadonlyMap<string, number> | null;

export interface ReconcileOptions {
  /**
   * Direct or session-pooled connections: the counts of what the broker holds go to a
   * temporary table of one session, which a pooler that pools transactions would swap away
   * between statements (ReconcileSessionError).
   */
  pool: pg.Pool;
  nats: NatsConnection;
  /** The JetStream stream the relay publishes to, and its subject prefix. */
  streamName: string;
  subjectPrefix: string;
  /**
   * The range, by recorded time: from inclusive, to exclusive. A `to` the database's clock has
   * not reached is brought back to that clock (`ReconcileReport.range.requestedTo`): until then
   * a transaction that begins can still record events inside the range.
   */
  from: Date;
  to: Date;
  /** The consumers to hold to account; every registered consumer by default. */
  consumers?: readonly string[];
  effectCounts?: EffectCounter;
  /** Events read from PostgreSQL per page. */
  pageSize?: number;
  /** The broker scan starts this long before `from` (clock skew between PostgreSQL and NATS). */
  brokerStartMarginMs?: number;
  /** How far past `to` the scan looks before it may stop early. */
  publishLagMaxMs?: number;
  /** Messages per broker fetch (see BrokerScanOptions), and how long a fetch may wait for the next one. */
  fetchMessagesMax?: number;
  scanIdleTimeoutMs?: number;
  /**
   * How long the run first waits for transactions that began before `to` to end (see
   * `settleTransactionsBefore`); any still open then make the report incomplete.
   */
  settleTimeoutMs?: number;
  /** Issues kept in the report; the counts are always complete. */
  issuesMax?: number;
  /** Republished events listed in the report; the count is always complete. */
  republishedSampleMax?: number;
  onProgress?: (message: string) => void;
}

export type ReconcileIssueKind =
  /** Appended, not on the broker, beyond the relay's checkpoint: the relay has not published it. */
  | 'unpublished'
  /** The relay checkpointed it (so the broker acked it) but the broker scan did not find it. */
  | 'missing_from_broker'
  /** Published, but the consumer has no inbox row and no dead letter for it. */
  | 'not_consumed'
  /** The consumer gave up on it after its retries (events.dead_letters) and has not handled it since. */
  | 'dead_lettered'
  /** The consumer's side effect for it was applied more than once. */
  | 'duplicate_effect'
  /** An inbox row names an event the store does not have. */
  | 'inbox_unknown_event'
  /** An inbox row names a known event with a different position. */
  | 'inbox_position_mismatch'
  /**
   * The event is both in events.events and in events.archived_events (a row copied by hand:
   * retention moves a stream in one statement). Reconciled once, from the hot table.
   */
  | 'stored_twice'
  /**
   * The relay withheld it (residency: its data may not be where the broker is), yet it is on
   * the broker (consumer null) or a consumer received it (that consumer).
   */
  | 'residency_breach';

export const ISSUE_KINDS: readonly ReconcileIssueKind[] = [
  'unpublished',
  'missing_from_broker',
  'not_consumed',
  'dead_lettered',
  'duplicate_effect',
  'inbox_unknown_event',
  'inbox_position_mismatch',
  'stored_twice',
  'residency_breach',
];

export interface ReconcileIssue {
  kind: ReconcileIssueKind;
  eventId: string;
  /** Null for event-level issues (publication). */
  consumer: string | null;
  streamType: string | null;
  streamId: string | null;
  version: number | null;
  /** Global position (bigint as a string). */
  position: string | null;
  partition: number | null;
  recordedAt: string | null;
  detail: string;
  /** Effects counted (duplicate_effect, not_consumed), delivery attempts (dead_lettered), copies on the broker (residency_breach). */
  count?: number;
}

export interface ConsumerReconciliation {
  name: string;
  /**
   * Events of the range the consumer handled: with an inbox row, or at or before its inbox
   * horizon (`pruneInbox`: its row pruned; counted apart in `consumedBeforeInboxHorizon`).
   */
  consumed: number;
  consumedBeforeInboxHorizon: number;
  /** not_consumed issues, split into pending (beyond the ack floor) and the rest. */
  notConsumed: number;
  pending: number;
  deadLettered: number;
  duplicateEffects: number;
  /** Whether `effectCounts` gave counts for this consumer. */
  effectsCounted: boolean;
  /** The durable JetStream consumer, or null if the broker has none of that name. */
  durable: { ackFloorSeq: number; deliveredSeq: number; numPending: number; numAckPending: number } | null;
}

export interface ReconcileReport {
  /** No issue, a complete broker scan, and no transaction open that could still add events to the range. */
  ok: boolean;
  /**
   * Transactions of this database that began before the range's end and were still open when
   * the run gave up waiting for them (`settleTimeoutMs`). An event's recorded time is its
   * transaction's start, so such a transaction may still commit events into the range after
   * the run counted it: the report cannot vouch for the range, and `ok` is false. Run it again
   * once they have ended.
   */
  openTransactions: number;
  /**
   * What was reconciled. `to` is the range's end as asked, or the database's clock when the run
   * began if that was earlier (an event's recorded time is its transaction's start, so a range
   * that has not ended can still gain events): then `requestedTo` is the end asked for, else null.
   */
  range: { from: string; to: string; requestedTo: string | null };
  startedAt: string;
  finishedAt: string;
  /** Events recorded in the range. */
  events: number;
  positions: { first: string; last: string } | null;
  broker: {
    stream: string;
    scannedFrom: string;
    /** The stream's first message time: events older than it may have aged out. */
    streamFirstTs: string | null;
    firstSeq: number | null;
    lastSeqAtStart: number;
    lastSeqScanned: number | null;
    messages: number;
    malformedMessages: number;
    complete: boolean;
    stoppedBecause: 'end_of_stream' | 'past_range_end' | 'idle_timeout' | 'empty';
    /** Events of the range seen on the broker at least once. */
    eventsSeen: number;
    /** Events of the range seen more than once, and the copies beyond the first. */
    republished: number;
    republishedCopies: number;
    republishedSample: Array<{ eventId: string; copies: number }>;
  };
  relay: {
    checkpoints: Array<{ partition: number; transactionId: string; position: string }>;
    /** Events of the range beyond their partition's checkpoint (at the snapshot). */
    beyondCheckpoint: number;
    /** Seen on the broker though beyond the checkpoint: published, not yet checkpointed. */
    publishedAheadOfCheckpoint: number;
    /** Not seen by the scan, beyond the checkpoint, yet delivered to a consumer: published after the scan. */
    publishedAfterScan: number;
    /** Withheld by the relay under the residency policy (events.relay_withheld): expected on neither the broker nor any inbox. */
    withheld: number;
  };
  consumers: ConsumerReconciliation[];
  issueCounts: Record<ReconcileIssueKind, number>;
  issues: ReconcileIssue[];
  /** Issues counted but not listed (beyond `issuesMax`). */
  issuesOmitted: number;
}

interface Cp {
  transactionId: bigint;
  position: bigint;
}

const DEFAULTS = {
  pageSize: 5000,
  brokerStartMarginMs: 5 * 60_000,
  publishLagMaxMs: 60_000,
  fetchMessagesMax: 32,
  scanIdleTimeoutMs: 5000,
  settleTimeoutMs: 10_000,
  issuesMax: 1000,
  republishedSampleMax: 100,
};

/** Seen counts buffered in memory before they go to the temporary table. */
const SEEN_FLUSH_ENTRIES = 20_000;
/** The loose filter on the wire's recorded time; the exact range is applied in SQL. */
const WIRE_RANGE_SLACK_MS = 1000;

export interface BrokerScanOptions {
  nats: NatsConnection;
  streamName: string;
  subjectPrefix: string;
  startTime: Date;
  /** Stop at this stream sequence; the stream's last sequence when the scan starts by default. */
  endSeq?: number;
  /**
   * Messages per fetch. Batch messages are up to the relay's messageBytesMax (512 KiB), and a
   * pull of a thousand at once overran the connection here (the server's per-client pending
   * limit is 64 MiB): the fetch stalled. A byte limit instead ends each fetch with a
   * "message size exceeds maxbytes" error. Default 32.
   */
  fetchMessagesMax?: number;
  idleTimeoutMs?: number;
}

export interface ScannedMessage {
  seq: number;
  /** When the broker stored the message, in epoch milliseconds (its clock). */
  timestampMs: number;
  subject: string;
  /** Null when the message is not a batch of events. */
  events: StoredEvent[] | null;
}

export interface BrokerScanResult {
  streamFirstTs: string | null;
  firstSeq: number | null;
  endSeq: number;
  lastSeqScanned: number | null;
  messages: number;
  malformed: number;
  stoppedBecause: 'end_of_stream' | 'past_range_end' | 'idle_timeout' | 'empty';
}

/**
 * Reads the event stream from `startTime` to `endSeq` with an ordered (ephemeral, unacked)
 * consumer, decoding each batch. `onMessage` returning true stops the scan early.
 */
export async function scanEventStream(
  options: BrokerScanOptions,
  onMessage: (message: ScannedMessage) => boolean | undefined | Promise<boolean | undefined>,
): Promise<BrokerScanResult> {
  const { nats, streamName, subjectPrefix, startTime } = options;
  const idleTimeoutMs = options.idleTimeoutMs ?? DEFAULTS.scanIdleTimeoutMs;
  const fetchMessagesMax = options.fetchMessagesMax ?? DEFAULTS.fetchMessagesMax;
  const jsm = await jetstreamManager(nats);
  const info = await jsm.streams.info(streamName);
  const endSeq = options.endSeq ?? info.state.last_seq;
  const result: BrokerScanResult = {
    streamFirstTs: info.state.messages > 0 ? info.state.first_ts : null,
    firstSeq: null,
    endSeq,
    lastSeqScanned: null,
    messages: 0,
    malformed: 0,
    stoppedBecause: 'empty',
  };
  if (info.state.messages === 0 || endSeq < info.state.first_seq) return result;
  const consumer = await jetstream(nats).consumers.get(streamName, {
    // A single subject string: filter_subjects (plural) needs nats-server 2.10.
    filter_subjects: `${subjectPrefix}.>`,
    opt_start_time: startTime.toISOString(),
  });
  try {
    if ((await consumer.info()).num_pending === 0) return result;
    scan: for (;;) {
      const iter = await consumer.fetch({ max_messages: fetchMessagesMax, expires: idleTimeoutMs });
      let got = 0;
      for await (const m of iter) {
        got += 1;
        result.messages += 1;
        result.firstSeq ??= m.seq;
        result.lastSeqScanned = m.seq;
        let events: StoredEvent[] | null;
        try {
          events = decodeBatch(m.data);
        } catch (error) {
          if (!(error instanceof MalformedBatchError)) throw error;
          events = null;
          result.malformed += 1;
        }
        const stop = await onMessage({ seq: m.seq, timestampMs: Math.floor(m.info.timestampNanos / 1_000_000), subject: m.subject, events });
        if (stop === true) {
          result.stoppedBecause = 'past_range_end';
          break scan;
        }
        // `pending` is what the stream held beyond this message when it was delivered.
        if (m.seq >= endSeq || m.info.pending === 0) {
          result.stoppedBecause = 'end_of_stream';
          break scan;
        }
      }
      if (got === 0) {
        result.stoppedBecause = 'idle_timeout';
        break;
      }
    }
  } finally {
    await consumer.delete().catch(() => false);
  }
  return result;
}

function compareCp(a: Cp, b: Cp): number {
  if (a.transactionId !== b.transactionId) return a.transactionId < b.transactionId ? -1 : 1;
  if (a.position !== b.position) return a.position < b.position ? -1 : 1;
  return 0;
}

function emptyCounts(): Record<ReconcileIssueKind, number> {
  return Object.fromEntries(ISSUE_KINDS.map((k) => [k, 0])) as Record<ReconcileIssueKind, number>;
}

interface PageRow {
  position: string;
  transaction_id: string;
  partition: number;
  event_id: string;
  stream_type: string;
  stream_id: string;
  version: number;
  recorded_at: Date;
  copies: number;
  first_seq: string | null;
  in_range: boolean;
  /** True for a row of events.archived_events. */
  archived: boolean;
  /** For an archived row: the position of the same event in events.events, if it is there too (a copy). */
  hot_position: string | null;
  /** From events.relay_withheld; null unless the relay withheld the event. */
  withheld_reason: string | null;
  withheld_at: Date | null;
}

interface GapRow {
  consumer: string;
  event_id: string;
  attempts: number | null;
  error: string | null;
  dead_at: Date | null;
  replayed_at: Date | null;
  /** No inbox row, but at or before the consumer's inbox horizon and not open: handled, its row pruned. */
  by_horizon: boolean;
}

/** The SQLSTATE of a missing table, and the temporary table reconciliation keeps in its session. */
const UNDEFINED_TABLE = '42P01';
const SEEN_TABLE = 'll_reconcile_seen';
const STRAY_TABLE = 'll_reconcile_stray';

/**
 * Reconciliation's temporary table vanished between two of its statements: the connection is
 * not one session (a pooler that pools transactions, such as PgBouncer in transaction mode,
 * sits in between). Nothing was concluded; run it on a direct or session-pooled connection.
 */
export class ReconcileSessionError extends Error {
  override readonly name = 'ReconcileSessionError';
  constructor(cause: unknown) {
    super(
      'reconciliation lost its temporary table between statements: its connection goes through a pooler that pools ' +
        'transactions; give it a direct or session-pooled one (DATABASE_SESSION_URL, or --database-url)',
      { cause },
    );
  }
}

/**
 * Waits until every transaction of this database's client sessions (other than the one this
 * asks on) that began before `to` has ended, and every prepared transaction seen at the start
 * has been resolved (its start time is unknown, so each one counts). Returns how many were
 * still open after `timeoutMs`.
 *
 * A transaction counts whether or not it has a transaction id yet: one that has only read so
 * far takes an id at its first write, and the events it appends then are recorded at its
 * start, inside the range (until 2026-12-07 only those with an id were waited for, and a range
 * reported OK could gain events afterwards). So an idle-in-transaction session that began
 * before `to` holds the range open, and a caller that reconciles while it holds a transaction
 * of its own on another connection waits for itself. Background processes (autovacuum,
 * replication) append no events and do not count. New transactions do not count: they begin
 * after `to` when `to` is in the past; a range that ends in the future can always gain events
 * (`reconcile` brings such an end back to the database's clock first).
 */
export async function settleTransactionsBefore(pool: Queryable, to: Date, timeoutMs: number): Promise<number> {
  const startedAt = new Date();
  const open = (): Promise<pg.QueryResult<{ n: number }>> =>
    pool.query<{ n: number }>(
      `SELECT ((SELECT count(*) FROM pg_stat_activity a
                 WHERE a.datname = current_database() AND a.backend_type = 'client backend'
                   AND a.pid <> pg_backend_pid() AND a.xact_start < $1)
             + (SELECT count(*) FROM pg_prepared_xacts p WHERE p.database = current_database() AND p.prepared < $2))::int AS n`,
      [to, startedAt],
    );
  const deadline = Date.now() + timeoutMs;
  for (let waitMs = 5; ; waitMs = Math.min(waitMs * 2, 250)) {
    const n = (await open()).rows[0]?.n ?? 0;
    if (n === 0 || Date.now() >= deadline) return n;
    await new Promise((resolve) => setTimeout(resolve, Math.min(waitMs, Math.max(1, deadline - Date.now()))));
  }
}

export async function reconcile(options: ReconcileOptions): Promise<ReconcileReport> {
  // Field by field: an option passed as undefined takes the default.
  const o = {
    ...options,
    pageSize: options.pageSize ?? DEFAULTS.pageSize,
    brokerStartMarginMs: options.brokerStartMarginMs ?? DEFAULTS.brokerStartMarginMs,
    publishLagMaxMs: options.publishLagMaxMs ?? DEFAULTS.publishLagMaxMs,
    fetchMessagesMax: options.fetchMessagesMax ?? DEFAULTS.fetchMessagesMax,
    scanIdleTimeoutMs: options.scanIdleTimeoutMs ?? DEFAULTS.scanIdleTimeoutMs,
    settleTimeoutMs: options.settleTimeoutMs ?? DEFAULTS.settleTimeoutMs,
    issuesMax: options.issuesMax ?? DEFAULTS.issuesMax,
    republishedSampleMax: options.republishedSampleMax ?? DEFAULTS.republishedSampleMax,
  };
  const { pool, nats, streamName, subjectPrefix, from } = o;
  if (!(from.getTime() < o.to.getTime())) throw new RangeError('reconcile needs from < to');
  // The range ends no later than the database's clock now. A transaction that begins after this
  // records its events at its start, past that clock; one that began before it is waited for
  // below. Later than that, a transaction could begin after the wait and still record events
  // in the range, which would then be reported clean unchecked. Floored to the millisecond a
  // Date holds, so the end is never past the clock.
  const clock = await pool.query<{ ms: string }>('SELECT floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint::text AS ms');
  const databaseNow = new Date(Number(clock.rows[0]?.ms));
  const to = o.to.getTime() > databaseNow.getTime() ? databaseNow : o.to;
  if (!(from.getTime() < to.getTime())) {
    throw new RangeError(`reconcile: the range starts at ${from.toISOString()}, which the database's clock (${databaseNow.toISOString()}) has not passed: no part of it has ended`);
  }
  if (!Number.isInteger(o.pageSize) || o.pageSize < 1 || o.pageSize > 100_000) throw new RangeError('pageSize must be 1..100000');
  const progress = o.onProgress ?? ((): void => {});
  const startedAt = new Date();

  // Before anything is counted: every transaction that could still commit events into the range.
  const openTransactions = await settleTransactionsBefore(pool, to, o.settleTimeoutMs);
  const registered = (await pool.query<{ name: string }>('SELECT name FROM events.consumers ORDER BY name')).rows.map((r) => r.name);
  // Each consumer once: one named twice would have each of its issues counted twice.
  const consumers = o.consumers === undefined ? registered : [...new Set(o.consumers)];
  for (const c of consumers) if (!registered.includes(c)) throw new RangeError(`consumer ${c} is not registered in events.consumers`);

  const issueCounts = emptyCounts();
  const issues: ReconcileIssue[] = [];
  const listIssue = (issue: ReconcileIssue): void => {
    if (issues.length < o.issuesMax) issues.push(issue);
  };
  const addIssue = (issue: ReconcileIssue): void => {
    issueCounts[issue.kind] += 1;
    listIssue(issue);
  };

  // 1. The relay checkpoints, before anything on the broker.
  const cpRows = await pool.query<{ partition: number; transaction_id: string; position: string }>(
    'SELECT partition, transaction_id::text, position::text FROM events.relay_checkpoints ORDER BY partition',
  );
  const checkpoints = new Map<number, Cp>(
    cpRows.rows.map((r) => [r.partition, { transactionId: BigInt(r.transaction_id), position: BigInt(r.position) }]),
  );
  const isCheckpointed = (partition: number, at: Cp): boolean => {
    const cp = checkpoints.get(partition);
    return cp !== undefined && compareCp(at, cp) <= 0;
  };

  // The hot table and the archive: retention moves a stream into events.archived_events once
  // the relay has passed it, whether or not the consumers have. One statement, one snapshot,
  // so a stream being archived meanwhile is counted in exactly one of them. The archive has no
  // index on recorded_at: its part is one pass over it (the pages and probes below go by
  // position, its key). An archived copy of a hot event is counted twice here; the pages
  // count it once (`events`) and report it (stored_twice).
  const range = await pool.query<{ lo: string | null; hi: string | null; n: string }>(
    `SELECT min(r.lo)::text AS lo, max(r.hi)::text AS hi, sum(r.n)::text AS n
       FROM (SELECT min(position) AS lo, max(position) AS hi, count(*) AS n
               FROM events.events WHERE recorded_at >= $1 AND recorded_at < $2
             UNION ALL
             SELECT min(position), max(position), count(*)
               FROM events.archived_events WHERE recorded_at >= $1 AND recorded_at < $2) r`,
    [from, to],
  );
  const lo = range.rows[0]?.lo ?? null;
  const hi = range.rows[0]?.hi ?? null;
  const eventsInRange = Number(range.rows[0]?.n ?? 0);
  progress(`${eventsInRange} events recorded in [${from.toISOString()}, ${to.toISOString()})`);

  // A session of our own for the temporary table of seen counts.
  const session = await pool.connect();
  let sessionBroken = false;
  try {
    await session.query(
      `CREATE TEMP TABLE ll_reconcile_seen (event_id uuid PRIMARY KEY, copies integer NOT NULL, first_seq bigint NOT NULL)`,
    );
    const buffer = new Map<string, { copies: number; firstSeq: number }>();
    const flush = async (): Promise<void> => {
      if (buffer.size === 0) return;
      const ids = [...buffer.keys()];
      const values = [...buffer.values()];
      buffer.clear();
      await session.query(
        `INSERT INTO ll_reconcile_seen AS s (event_id, copies, first_seq)
         SELECT * FROM unnest($1::uuid[], $2::int[], $3::bigint[])
         ON CONFLICT (event_id) DO UPDATE
            SET copies = s.copies + EXCLUDED.copies, first_seq = least(s.first_seq, EXCLUDED.first_seq)`,
        [ids, values.map((v) => v.copies), values.map((v) => v.firstSeq)],
      );
    };
    const cpPartitions = [...checkpoints.keys()];
    const cpArgs = [
      cpPartitions,
      cpPartitions.map((p) => checkpoints.get(p)?.transactionId.toString() ?? '0'),
      cpPartitions.map((p) => checkpoints.get(p)?.position.toString() ?? '0'),
    ];
    /** True when every event of the range that the relay had checkpointed has been seen. */
    const allCheckpointedSeen = async (): Promise<boolean> => {
      await flush();
      // Archived events too (retention archives only what the relay has checkpointed), by
      // position within the range's bounds: the archive's key, not a pass over all of it.
      const r = await session.query<{ missing: boolean }>(
        `SELECT EXISTS (
           SELECT 1 FROM (SELECT x.partition, x.transaction_id, x.position, x.event_id FROM events.events x
                           WHERE x.recorded_at >= $1 AND x.recorded_at < $2
                          UNION ALL
                          SELECT a.partition, a.transaction_id, a.position, a.event_id FROM events.archived_events a
                           WHERE a.position >= $6::bigint AND a.position <= $7::bigint
                             AND a.recorded_at >= $1 AND a.recorded_at < $2) e
             JOIN unnest($3::smallint[], $4::text[], $5::bigint[]) AS cp(partition, transaction_id, position)
               ON cp.partition = e.partition
            WHERE (e.transaction_id, e.position) <= (cp.transaction_id::xid8, cp.position)
              AND NOT EXISTS (SELECT 1 FROM ll_reconcile_seen s WHERE s.event_id = e.event_id)
              AND NOT EXISTS (SELECT 1 FROM events.relay_withheld w WHERE w.event_id = e.event_id)) AS missing`,
        [from, to, ...cpArgs, lo, hi],
      );
      return r.rows[0]?.missing === false;
    };

    // 2. The broker.
    const fromMs = from.getTime() - WIRE_RANGE_SLACK_MS;
    const toMs = to.getTime() + WIRE_RANGE_SLACK_MS;
    const cutoffMs = to.getTime() + o.publishLagMaxMs;
    let cutoffChecked = false;
    // Not before 1970: the broker holds nothing older, and its API refuses a date before year 1
    // (an operator's --from may reach back to PostgreSQL's 4713 BC).
    const scannedFrom = new Date(Math.max(0, from.getTime() - o.brokerStartMarginMs));
    const scan = await scanEventStream(
      {
        nats,
        streamName,
        subjectPrefix,
        startTime: scannedFrom,
        fetchMessagesMax: o.fetchMessagesMax,
        idleTimeoutMs: o.scanIdleTimeoutMs,
      },
      async (m) => {
        for (const e of m.events ?? []) {
          const t = e.recordedAt.getTime();
          if (!(t >= fromMs && t < toMs)) continue;
          const seen = buffer.get(e.id);
          if (seen === undefined) buffer.set(e.id, { copies: 1, firstSeq: m.seq });
          else seen.copies += 1;
        }
        if (buffer.size >= SEEN_FLUSH_ENTRIES) await flush();
        if (!cutoffChecked && m.timestampMs >= cutoffMs) {
          cutoffChecked = true;
          if (await allCheckpointedSeen()) return true;
          progress('past the range end, but checkpointed events are still unseen: scanning on to the end of the stream');
        }
        return undefined;
      },
    );
    await flush();
    // Statistics for the joins below: without them the planner guesses the table is tiny.
    await session.query('ANALYZE ll_reconcile_seen');
    const scanComplete = scan.stoppedBecause !== 'idle_timeout';
    progress(`broker: ${scan.messages} messages scanned (${scan.stoppedBecause})`);

    // The consumers' positions on the broker, after the scan and before the inbox is read.
    const jsm = await jetstreamManager(nats);
    const durables = new Map<string, ConsumerReconciliation['durable']>();
    for (const c of consumers) {
      try {
        const ci = await jsm.consumers.info(streamName, c);
        durables.set(c, {
          ackFloorSeq: ci.ack_floor.stream_seq,
          deliveredSeq: ci.delivered.stream_seq,
          numPending: ci.num_pending,
          numAckPending: ci.num_ack_pending,
        });
      } catch (error) {
        if (!/consumer not found/i.test(String(error))) throw error;
        durables.set(c, null);
      }
    }

    const effects = new Map<string, ReadonlyMap<string, number>>();
    if (o.effectCounts !== undefined) {
      for (const c of consumers) {
        const counts = await o.effectCounts(c, { from, to });
        if (counts !== null) effects.set(c, counts);
      }
    }
    const perConsumer = new Map<string, ConsumerReconciliation>(
      consumers.map((name) => [
        name,
        {
          name,
          consumed: 0,
          consumedBeforeInboxHorizon: 0,
          notConsumed: 0,
          pending: 0,
          deadLettered: 0,
          duplicateEffects: 0,
          effectsCounted: effects.has(name),
          durable: durables.get(name) ?? null,
        },
      ]),
    );

    // 3. PostgreSQL, page by page.
    let eventsSeen = 0;
    let republished = 0;
    let republishedCopies = 0;
    const republishedSample: Array<{ eventId: string; copies: number }> = [];
    let beyondCheckpoint = 0;
    let publishedAheadOfCheckpoint = 0;
    let publishedAfterScan = 0;
    let withheld = 0;
    let paged = 0;
    if (lo !== null && hi !== null) {
      const last = BigInt(hi);
      let after = BigInt(lo) - 1n;
      while (after < last) {
        const upper = after + BigInt(o.pageSize) < last ? after + BigInt(o.pageSize) : last;
        const page = await session.query<PageRow>(
          // A window of positions, not a LIMIT, and per-row probes (LATERAL ... LIMIT 1): each
          // page costs at most pageSize rows whatever the planner's statistics say (fresh
          // appends often have none). The range test is a column, because a few positions in
          // [lo, hi] can lie outside the time range (recorded_at is the transaction's start).
          // The hot table and the archive (both keyed by position) in one statement, so an event
          // being archived meanwhile is read from exactly one; an archived row also in the hot
          // table (by event id: the key everything below goes by) is a copy, one probe per
          // archived row, after the union (as EventStore.readAll checks).
          `SELECT e.position::text, e.transaction_id::text, e.partition, e.event_id::text, e.stream_type, e.stream_id,
                  e.version, e.recorded_at, coalesce(s.copies, 0) AS copies, s.first_seq::text,
                  (e.recorded_at >= $3 AND e.recorded_at < $4) AS in_range, w.reason AS withheld_reason, w.withheld_at,
                  e.archived,
                  CASE WHEN e.archived THEN (SELECT h.position::text FROM events.events h WHERE h.event_id = e.event_id LIMIT 1) END AS hot_position
             FROM (SELECT x.position, x.transaction_id, x.partition, x.event_id, x.stream_type, x.stream_id, x.version, x.recorded_at,
                          false AS archived
                     FROM events.events x WHERE x.position > $1 AND x.position <= $2
                   UNION ALL
                   SELECT a.position, a.transaction_id, a.partition, a.event_id, a.stream_type, a.stream_id, a.version, a.recorded_at,
                          true
                     FROM events.archived_events a WHERE a.position > $1 AND a.position <= $2) e
             LEFT JOIN LATERAL (SELECT x.copies, x.first_seq FROM ll_reconcile_seen x WHERE x.event_id = e.event_id LIMIT 1) s ON true
             LEFT JOIN LATERAL (SELECT y.reason, y.withheld_at FROM events.relay_withheld y WHERE y.event_id = e.event_id LIMIT 1) w ON true
            ORDER BY e.position`,
          [after.toString(), upper.toString(), from, to],
        );
        after = upper;
        const rows: PageRow[] = [];
        for (const r of page.rows) {
          if (!r.in_range) continue;
          if (r.hot_position === null) {
            rows.push(r);
            continue;
          }
          // In both tables: reconciled once, from the hot row (in this page or another).
          addIssue({
            kind: 'stored_twice',
            eventId: r.event_id,
            consumer: null,
            streamType: r.stream_type,
            streamId: r.stream_id,
            version: r.version,
            position: r.position,
            partition: r.partition,
            recordedAt: r.recorded_at.toISOString(),
            detail:
              `the event is both in events.events (position ${r.hot_position}) and in events.archived_events (position ${r.position}): ` +
              'a copy, since retention moves a stream in one statement; reconciled once, from events.events',
          });
        }
        paged += rows.length;
        if (rows.length === 0) continue;
        const gaps =
          consumers.length === 0
            ? []
            : (
                await session.query<GapRow>(
                  // LATERAL ... LIMIT 1: one primary-key probe per (event, consumer). A plain
                  // NOT EXISTS lets the planner hash the whole inbox for every page. An event
                  // with no inbox row at or before the consumer's inbox horizon, and not open,
                  // was handled and its row pruned (events.inbox_handled says the same).
                  `SELECT c.name AS consumer, x.event_id::text, d.attempts, d.error, d.dead_at, d.replayed_at,
                          (z.consumer IS NOT NULL AND (x.transaction_id, x.position) <= (z.transaction_id, z.position)
                           AND NOT EXISTS (SELECT 1 FROM events.inbox_open o WHERE o.consumer = c.name AND o.event_id = x.event_id)) AS by_horizon
                     FROM unnest($1::uuid[], $3::text[]::xid8[], $4::bigint[]) AS x(event_id, transaction_id, position)
                    CROSS JOIN unnest($2::text[]) AS c(name)
                     LEFT JOIN events.inbox_horizons z ON z.consumer = c.name
                     LEFT JOIN LATERAL (SELECT true AS handled FROM events.inbox i
                                         WHERE i.consumer = c.name AND i.event_id = x.event_id LIMIT 1) h ON true
                     LEFT JOIN LATERAL (SELECT dl.attempts, dl.error, dl.dead_at, dl.replayed_at FROM events.dead_letters dl
                                         WHERE dl.consumer = c.name AND dl.event_id = x.event_id LIMIT 1) d ON true
                    WHERE h.handled IS NULL`,
                  [rows.map((r) => r.event_id), consumers, rows.map((r) => r.transaction_id), rows.map((r) => r.position)],
                )
              ).rows;
        const gapsByEvent = new Map<string, GapRow[]>();
        for (const g of gaps) {
          const list = gapsByEvent.get(g.event_id);
          if (list === undefined) gapsByEvent.set(g.event_id, [g]);
          else list.push(g);
        }
        for (const r of rows) {
          const at: Cp = { transactionId: BigInt(r.transaction_id), position: BigInt(r.position) };
          const where = {
            eventId: r.event_id,
            streamType: r.stream_type,
            streamId: r.stream_id,
            version: r.version,
            position: r.position,
            partition: r.partition,
            recordedAt: r.recorded_at.toISOString(),
          };
          const checkpointed = isCheckpointed(r.partition, at);
          const eventGaps = gapsByEvent.get(r.event_id) ?? [];
          if (!checkpointed) beyondCheckpoint += 1;
          // Delivered to some consumer: handled (an inbox row, or its row pruned) or given up on
          // (a dead letter).
          const owed = eventGaps.filter((g) => !g.by_horizon);
          const delivered = owed.length < consumers.length || owed.some((g) => g.dead_at !== null);
          if (r.withheld_at !== null) {
            withheld += 1;
            const why = `the relay withheld it at ${r.withheld_at.toISOString()} (${r.withheld_reason})`;
            if (r.copies > 0) {
              eventsSeen += 1;
              addIssue({ ...where, kind: 'residency_breach', consumer: null, count: r.copies, detail: `${why}, yet the broker has it (stream sequence ${r.first_seq})` });
            }
            const missing = new Map(eventGaps.map((g) => [g.consumer, g]));
            for (const c of consumers) {
              const gap = missing.get(c);
              if (gap !== undefined && gap.dead_at === null) continue;
              addIssue({
                ...where,
                kind: 'residency_breach',
                consumer: c,
                detail: `${why}, yet the consumer received it (${gap === undefined ? 'an inbox row' : 'a dead letter'})`,
              });
            }
            // Not expected on the broker nor in any inbox: the consumers are not held to it.
            continue;
          }
          if (r.copies > 0) {
            eventsSeen += 1;
            if (!checkpointed) publishedAheadOfCheckpoint += 1;
            if (r.copies > 1) {
              republished += 1;
              republishedCopies += r.copies - 1;
              if (republishedSample.length < o.republishedSampleMax) republishedSample.push({ eventId: r.event_id, copies: r.copies });
            }
          } else if (checkpointed) {
            const aged = scan.streamFirstTs !== null && new Date(scan.streamFirstTs).getTime() > r.recorded_at.getTime();
            addIssue({
              ...where,
              kind: 'missing_from_broker',
              consumer: null,
              detail:
                `the relay checkpoint of partition ${r.partition} covers it, but the broker scan did not find it` +
                (aged ? ` (the stream's oldest message is from ${scan.streamFirstTs}: it may have aged out)` : '') +
                (scanComplete ? '' : ' (the scan stopped early: idle timeout)'),
            });
          } else if (delivered) {
            publishedAfterScan += 1;
          } else {
            addIssue({
              ...where,
              kind: 'unpublished',
              consumer: null,
              detail: `not on the broker and beyond the relay checkpoint of partition ${r.partition}: the relay has not published it`,
            });
            // Nothing to consume yet: the consumers are not held to an event never published.
            continue;
          }
          const firstSeq = r.first_seq === null ? null : Number(r.first_seq);
          const missing = new Set<string>();
          for (const g of eventGaps) {
            const stats = perConsumer.get(g.consumer) as ConsumerReconciliation;
            if (g.by_horizon) {
              stats.consumedBeforeInboxHorizon += 1;
              continue;
            }
            missing.add(g.consumer);
            const applied = effects.get(g.consumer)?.get(r.event_id) ?? 0;
            if (g.dead_at !== null) {
              stats.deadLettered += 1;
              addIssue({
                ...where,
                kind: 'dead_lettered',
                consumer: g.consumer,
                count: g.attempts ?? 0,
                detail:
                  `dead-lettered at ${g.dead_at.toISOString()} after ${g.attempts} attempts: ${g.error}` +
                  (g.replayed_at === null ? '' : `; replayed at ${g.replayed_at.toISOString()}, not handled since`),
              });
              continue;
            }
            stats.notConsumed += 1;
            const durable = stats.durable;
            let why: string;
            if (firstSeq === null) why = 'not delivered: the broker scan did not find it';
            else if (durable === null) why = `no durable consumer ${g.consumer} on stream ${streamName}`;
            else if (firstSeq > durable.ackFloorSeq) {
              stats.pending += 1;
              why = `pending: at stream sequence ${firstSeq}, beyond the consumer's ack floor ${durable.ackFloorSeq} (it has not got there yet)`;
            } else {
              why = `skipped: the consumer acked stream sequence ${firstSeq} (ack floor ${durable.ackFloorSeq}) without an inbox row`;
            }
            if (applied > 0) why += `; its effect was applied ${applied} time(s) without an inbox row`;
            addIssue({ ...where, kind: 'not_consumed', consumer: g.consumer, detail: why, ...(applied > 0 ? { count: applied } : {}) });
          }
          for (const c of consumers) {
            const stats = perConsumer.get(c) as ConsumerReconciliation;
            if (!missing.has(c)) stats.consumed += 1;
            const applied = effects.get(c)?.get(r.event_id) ?? 0;
            if (applied > 1) {
              stats.duplicateEffects += 1;
              addIssue({ ...where, kind: 'duplicate_effect', consumer: c, count: applied, detail: `its effect was applied ${applied} times` });
            }
          }
        }
        progress(`checked ${paged}/${eventsInRange} events`);
      }
    }

    // Inbox rows handled since the range began that name an unknown event or a wrong position.
    if (consumers.length > 0) {
      // Every one is counted; the first (by handling time) are listed, as far as issuesMax
      // allows. They go to a temporary table of the session, counted there.
      await session.query(
        `CREATE TEMP TABLE ${STRAY_TABLE} (consumer text NOT NULL, event_id uuid NOT NULL, position bigint NOT NULL,
                                          handled_at timestamptz NOT NULL, event_position bigint)`,
      );
      // One pass over the inbox (it has no index on handled_at), and per row one probe of the hot
      // table by event id and, when that misses, one of the archive by position (its key): an
      // event whose stream retention archived is still the store's; then one of the events
      // retention deleted (events.deleted_events, by position): the store had it, lawfully
      // gone since. A row that matches none is stray.
      await session.query(
        `INSERT INTO ${STRAY_TABLE} (consumer, event_id, position, handled_at, event_position)
         SELECT i.consumer, i.event_id, i.position, i.handled_at, h.position
           FROM events.inbox i
           LEFT JOIN LATERAL (SELECT x.position FROM events.events x WHERE x.event_id = i.event_id LIMIT 1) h ON true
          WHERE i.consumer = ANY($1::text[]) AND i.handled_at >= $2 AND h.position IS DISTINCT FROM i.position
            AND NOT EXISTS (SELECT 1 FROM events.archived_events a WHERE a.position = i.position AND a.event_id = i.event_id)
            AND NOT EXISTS (SELECT 1 FROM events.deleted_events d WHERE d.position = i.position AND d.event_id = i.event_id)`,
        [consumers, from],
      );
      const unplaced = await session.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${STRAY_TABLE} WHERE event_position IS NULL`);
      if ((unplaced.rows[0]?.n ?? 0) > 0) {
        // Not in the hot table: the archive may have the event at another position. The archive
        // has no index on event_id, so this is one pass over it, joined by hash with the stray
        // rows (whose count ANALYZE gives the planner), and only when there are such rows.
        await session.query(`ANALYZE ${STRAY_TABLE}`);
        await session.query(
          `UPDATE ${STRAY_TABLE} s SET event_position = a.position
             FROM events.archived_events a WHERE s.event_position IS NULL AND a.event_id = s.event_id`,
        );
      }
      const stray = await session.query<{
        unknown: number;
        mismatched: number;
        consumer: string | null;
        event_id: string | null;
        position: string | null;
        handled_at: Date | null;
        event_position: string | null;
      }>(
        `SELECT c.unknown, c.mismatched, l.consumer, l.event_id::text, l.position::text, l.handled_at, l.event_position::text
           FROM (SELECT (count(*) FILTER (WHERE event_position IS NULL))::int AS unknown,
                        (count(*) FILTER (WHERE event_position IS NOT NULL))::int AS mismatched
                   FROM ${STRAY_TABLE}) c
           LEFT JOIN LATERAL (SELECT * FROM ${STRAY_TABLE} ORDER BY handled_at, consumer, event_id LIMIT $1) l ON true`,
        [Math.max(0, o.issuesMax - issues.length)],
      );
      issueCounts.inbox_unknown_event += stray.rows[0]?.unknown ?? 0;
      issueCounts.inbox_position_mismatch += stray.rows[0]?.mismatched ?? 0;
      for (const s of stray.rows) {
        if (s.consumer === null || s.event_id === null || s.position === null || s.handled_at === null) continue;
        const known = s.event_position !== null;
        listIssue({
          kind: known ? 'inbox_position_mismatch' : 'inbox_unknown_event',
          eventId: s.event_id,
          consumer: s.consumer,
          streamType: null,
          streamId: null,
          version: null,
          position: s.position,
          partition: null,
          recordedAt: null,
          detail: known
            ? `the inbox row (handled ${s.handled_at.toISOString()}) says position ${s.position}, the store says ${s.event_position}`
            : `the inbox row (handled ${s.handled_at.toISOString()}, position ${s.position}) names an event the store does not have`,
        });
      }
    }

    const issueTotal = ISSUE_KINDS.reduce((n, k) => n + issueCounts[k], 0);
    return {
      ok: issueTotal === 0 && scanComplete && openTransactions === 0,
      openTransactions,
      range: { from: from.toISOString(), to: to.toISOString(), requestedTo: to === o.to ? null : o.to.toISOString() },
      startedAt: startedAt.toISOString(),
      finishedAt: new Date().toISOString(),
      // Counted as paged: a transaction that committed since the first count may have added to the range.
      events: paged,
      positions: lo === null || hi === null ? null : { first: lo, last: hi },
      broker: {
        stream: streamName,
        scannedFrom: scannedFrom.toISOString(),
        streamFirstTs: scan.streamFirstTs,
        firstSeq: scan.firstSeq,
        lastSeqAtStart: scan.endSeq,
        lastSeqScanned: scan.lastSeqScanned,
        messages: scan.messages,
        malformedMessages: scan.malformed,
        complete: scanComplete,
        stoppedBecause: scan.stoppedBecause,
        eventsSeen,
        republished,
        republishedCopies,
        republishedSample,
      },
      relay: {
        checkpoints: cpRows.rows.map((r) => ({ partition: r.partition, transactionId: r.transaction_id, position: r.position })),
        beyondCheckpoint,
        publishedAheadOfCheckpoint,
        publishedAfterScan,
        withheld,
      },
      consumers: [...perConsumer.values()],
      issueCounts,
      issues,
      issuesOmitted: issueTotal - issues.length,
    };
  } catch (error) {
    sessionBroken = true;
    // The table this function made is gone: its statements did not all reach one session.
    const message = (error as Error).message;
    if ((error as { code?: unknown }).code === UNDEFINED_TABLE && (message.includes(SEEN_TABLE) || message.includes(STRAY_TABLE))) {
      throw new ReconcileSessionError(error);
    }
    throw error;
  } finally {
    if (!sessionBroken) await session.query(`DROP TABLE IF EXISTS ${SEEN_TABLE}, ${STRAY_TABLE}`).catch(() => (sessionBroken = true));
    // A session that failed mid-way may still hold the temporary table: do not give it back.
    session.release(sessionBroken ? true : undefined);
  }
}

/** A readable summary of a report, for operators. */
export function formatReconcileReport(report: ReconcileReport): string {
  const lines: string[] = [];
  const b = report.broker;
  const unsettled = report.openTransactions > 0;
  const issueTotal = ISSUE_KINDS.reduce((n, k) => n + report.issueCounts[k], 0);
  lines.push(
    `Reconciliation of [${report.range.from}, ${report.range.to}): ` +
      (report.ok ? 'OK' : issueTotal === 0 && report.broker.complete && unsettled ? 'INCOMPLETE' : 'GAPS FOUND'),
  );
  if (report.range.requestedTo !== null) {
    lines.push(`  the range asked for ends at ${report.range.requestedTo}, which the database's clock had not reached: it is reconciled up to that clock`);
  }
  if (unsettled) {
    lines.push(
      `  ${report.openTransactions} transactions that began before the range's end were still open after the wait: ` +
        'they may still commit events into the range; run again once they have ended',
    );
  }
  lines.push(
    `  events recorded: ${report.events}` +
      (report.positions === null ? '' : ` (positions ${report.positions.first}..${report.positions.last})`),
  );
  lines.push(
    `  broker ${b.stream}: ${b.messages} messages scanned from ${b.scannedFrom} up to seq ${b.lastSeqScanned ?? '-'} ` +
      `of ${b.lastSeqAtStart} (${b.stoppedBecause}${b.complete ? '' : ', INCOMPLETE'}); ${b.eventsSeen} events of the range seen; ` +
      `${b.republished} republished (${b.republishedCopies} extra copies, dropped by the inboxes)` +
      (b.malformedMessages > 0 ? `; ${b.malformedMessages} malformed messages` : ''),
  );
  lines.push(
    `  relay: ${report.relay.beyondCheckpoint} events beyond the checkpoints, ${report.relay.publishedAheadOfCheckpoint} published ahead ` +
      `of them, ${report.relay.publishedAfterScan} published after the scan, ${report.relay.withheld} withheld (residency)`,
  );
  for (const c of report.consumers) {
    const d = c.durable === null ? 'no durable on the broker' : `ack floor ${c.durable.ackFloorSeq}, ${c.durable.numPending} pending`;
    lines.push(
      `  consumer ${c.name}: ${c.consumed} consumed` +
        (c.consumedBeforeInboxHorizon > 0 ? ` (${c.consumedBeforeInboxHorizon} of them with their inbox rows pruned)` : '') +
        `, ${c.notConsumed} not consumed (${c.pending} pending), ` +
        `${c.deadLettered} dead-lettered, ${c.effectsCounted ? `${c.duplicateEffects} duplicate effects` : 'effects not counted'}; ${d}`,
    );
  }
  const counted = ISSUE_KINDS.filter((k) => report.issueCounts[k] > 0);
  if (counted.length > 0) lines.push(`  issues: ${counted.map((k) => `${k} ${report.issueCounts[k]}`).join(', ')}`);
  for (const i of report.issues) {
    const at = i.streamType === null ? '' : ` ${i.streamType}/${i.streamId} v${i.version}`;
    const pos = i.position === null ? '' : ` pos ${i.position}`;
    const part = i.partition === null ? '' : ` p${i.partition}`;
    lines.push(`  - ${i.kind}${i.consumer === null ? '' : ` [${i.consumer}]`} event ${i.eventId}${at}${pos}${part}: ${i.detail}`);
  }
  if (report.issuesOmitted > 0) lines.push(`  … and ${report.issuesOmitted} more issues (raise --issues-max)`);
  return lines.join('\n');
}

/** Checks that `db` has the events schema, for tools that open a database by URL. */
export async function assertEventsSchema(db: Queryable): Promise<void> {
  const r = await db.query<{ ok: boolean }>("SELECT to_regclass('events.events') IS NOT NULL AS ok");
  if (r.rows[0]?.ok !== true) throw new Error('the database has no events schema (run migrateEvents)');
}

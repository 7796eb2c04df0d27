/**
 * The ledger's SQL. Every statement that touches many rows is set-based: one statement for
 * the whole batch, with arrays unnested on the server.
 */
import type pg from 'pg';
import { sqlArrayLiteral, sqlLiteral } from '@ledgerline/events';
import type { AccountRow, TransferRow } from './rows.ts';
import type { CreateTransferResultCode, Metadata, PendingStatus } from './types.ts';
import { isId } from './validate.ts';

const ACCOUNT_COLUMNS = `id::text, ledger, code, flags, metadata,
  debits_pending::text, debits_posted::text, credits_pending::text, credits_posted::text, timestamp::text`;

/** An account row to lock (alias `a`), with its ctid for the write of the same transaction. */
const LOCKED_ACCOUNT_COLUMNS = `a.ctid::text, a.id::text, a.ledger, a.code, a.flags, a.metadata, a.debits_pending::text,
  a.debits_posted::text, a.credits_pending::text, a.credits_posted::text, a.timestamp::text`;

const TRANSFER_COLUMNS = `id::text, debit_account_id::text, credit_account_id::text, amount::text,
  amount_requested::text, pending_id::text, ledger, code, flags, timeout_seconds, metadata,
  timestamp::text, result, pending_status, expires_at::text, resolved_at::text`;

interface AccountRecord {
  id: string;
  ledger: string;
  code: number;
  flags: number;
  metadata: Metadata;
  debits_pending: string;
  debits_posted: string;
  credits_pending: string;
  credits_posted: string;
  timestamp: string;
}

interface TransferRecord {
  id: string;
  debit_account_id: string | null;
  credit_account_id: string | null;
  amount: string;
  amount_requested: string | null;
  pending_id: string | null;
  ledger: string | null;
  code: number | null;
  flags: number;
  timeout_seconds: number;
  metadata: Metadata;
  timestamp: string;
  result: CreateTransferResultCode;
  pending_status: PendingStatus | null;
  expires_at: string | null;
  resolved_at: string | null;
}

const big = (v: string): bigint => BigInt(v);
const bigOrNull = (v: string | null): bigint | null => (v === null ? null : BigInt(v));
const str = (v: bigint | null): string | null => (v === null ? null : v.toString());

function toAccountRow(r: AccountRecord): AccountRow {
  return {
    id: r.id,
    ledger: r.ledger,
    code: r.code,
    flags: r.flags,
    metadata: r.metadata,
    debitsPending: big(r.debits_pending),
    debitsPosted: big(r.debits_posted),
    creditsPending: big(r.credits_pending),
    creditsPosted: big(r.credits_posted),
    timestamp: big(r.timestamp),
  };
}

function toTransferRow(r: TransferRecord): TransferRow {
  return {
    id: r.id,
    debitAccountId: r.debit_account_id,
    creditAccountId: r.credit_account_id,
    amount: big(r.amount),
    amountRequested: bigOrNull(r.amount_requested),
    pendingId: r.pending_id,
    ledger: r.ledger,
    code: r.code,
    flags: r.flags,
    timeoutSeconds: r.timeout_seconds,
    metadata: r.metadata,
    timestamp: big(r.timestamp),
    result: r.result,
    pendingStatus: r.pending_status,
    expiresAt: bigOrNull(r.expires_at),
    resolvedAt: bigOrNull(r.resolved_at),
  };
}

type Queryable = Pick<pg.ClientBase, 'query'>;

export async function selectTransfers(db: Queryable, ids: string[]): Promise<TransferRow[]> {
  if (ids.length === 0) return [];
  const r = await db.query<TransferRecord>(
    `SELECT ${TRANSFER_COLUMNS} FROM ledger.transfers WHERE id = ANY($1::uuid[])`,
    [ids],
  );
  return r.rows.map(toTransferRow);
}

/**
 * Locks accounts in ascending id order. Every writer locks this way, in one statement, so two
 * batches can wait on each other but never deadlock.
 */
export async function lockAccounts(db: Queryable, ids: string[]): Promise<AccountRow[]> {
  if (ids.length === 0) return [];
  // ORDER BY the uuid column itself (index order), not its text rendering. The row's ctid is
  // stable while we hold its lock, and lets the write find the row without an index probe.
  const r = await db.query<AccountRecord & { ctid: string }>(
    `SELECT ${LOCKED_ACCOUNT_COLUMNS} FROM ledger.accounts a WHERE a.id = ANY($1::uuid[]) ORDER BY a.id FOR UPDATE`,
    [ids],
  );
  return r.rows.map((x) => ({ ...toAccountRow(x), ctid: x.ctid }));
}

export async function selectAccounts(db: Queryable, ids: string[]): Promise<AccountRow[]> {
  if (ids.length === 0) return [];
  const r = await db.query<AccountRecord>(
    `SELECT ${ACCOUNT_COLUMNS} FROM ledger.accounts WHERE id = ANY($1::uuid[])`,
    [ids],
  );
  return r.rows.map(toAccountRow);
}

/**
 * Reserves `count` consecutive timestamps, at or after `nowNs`, after every timestamp reserved
 * before, and returns the first (`ledger.reserve_timestamps`, migration 1732290000000). The
 * reservation is atomic and holds nothing afterwards. A writer reserves only once it holds the
 * lock of every account it will write, so each account's timestamps increase in the order its
 * changes commit.
 */
export async function reserveTimestamps(db: Queryable, count: number, nowNs: bigint): Promise<bigint> {
  const r = await db.query<{ first: string }>('SELECT ledger.reserve_timestamps($1, $2)::text AS first', [count, nowNs.toString()]);
  const first = r.rows[0]?.first;
  if (first === undefined) throw new Error('invariant: reserve_timestamps returned no row');
  return BigInt(first);
}

/**
 * Every write transaction bounds its own waits, in the same round trip as BEGIN. A process
 * that stalls while holding account locks is cut off after 5 s (the batch is retried
 * elsewhere); a lock wait or a statement that runs far past normal fails as transient.
 */
export function beginWrite(lockTimeoutMs: number = LOCK_TIMEOUT_MS_DEFAULT): string {
  if (!(Number.isSafeInteger(lockTimeoutMs) && lockTimeoutMs >= 1 && lockTimeoutMs < STATEMENT_TIMEOUT_MS)) {
    throw new RangeError(`lockTimeoutMs must be an integer from 1 to ${STATEMENT_TIMEOUT_MS - 1}, not ${lockTimeoutMs}`);
  }
  return (
    `BEGIN; SET LOCAL idle_in_transaction_session_timeout = '5s'; SET LOCAL lock_timeout = '${lockTimeoutMs}ms'; SET LOCAL statement_timeout = '${STATEMENT_TIMEOUT_MS}ms'; ` +
    // The rows a batch writes were just locked, so they are in memory: fetching one by its ctid
    // costs nothing like the default random_page_cost of 4 (a disk seek). With the default the
    // planner reads a small accounts table end to end (a seq scan over 10,000 rows) instead.
    'SET LOCAL random_page_cost = 1.1'
  );
}

/** How long a write waits for a row lock before it fails as transient (`beginWrite`). */
export const LOCK_TIMEOUT_MS_DEFAULT = 10_000;
/** How long any statement of a write may run (`beginWrite`); a lock wait must be shorter. */
export const STATEMENT_TIMEOUT_MS = 30_000;

export const BEGIN_WRITE = beginWrite();

/**
 * A uuid[] literal for the simple query protocol. Only canonical UUIDs pass (the engine
 * validated them already), so nothing in it can need quoting; anything else is a bug here.
 */
function uuidArrayLiteral(ids: readonly string[]): string {
  for (const id of ids) {
    if (!isId(id)) throw new Error(`invariant: not a canonical UUID: ${JSON.stringify(id)}`);
  }
  return `'{${ids.join(',')}}'::uuid[]`;
}

export interface OpenBatchInput {
  /** Accounts the transfers name (existing or not). */
  accountIds: string[];
  /** Pending transfers the batch posts or voids: their accounts are locked too. */
  pendingIds: string[];
  /** Every transfer id the batch must know about: its own ids and the pending ids. */
  transferIds: string[];
  /** Timestamps to reserve, one per transfer. */
  count: number;
  nowNs: bigint;
  /** The BEGIN with its timeouts (`beginWrite(lockTimeoutMs)`, made once by the caller); BEGIN_WRITE unless given. */
  begin?: string;
}

export interface OpenedBatch {
  /** The existing accounts among `accountIds` and the pending transfers' accounts, locked. */
  accounts: AccountRow[];
  firstTimestamp: bigint;
  /** The existing transfers among `transferIds`, read after the account locks were granted. */
  transfers: TransferRow[];
}

/**
 * Opens a write batch in one round trip: BEGIN with its timeouts, lock the accounts (ascending
 * id, as `lockAccounts`), reserve the timestamps (as `reserveTimestamps`), read the transfers.
 * The statements travel as one simple-protocol query, so the values are inlined as literals:
 * canonical UUIDs and integers only. Each statement takes its own snapshot (READ COMMITTED),
 * so the transfer read sees every batch that committed before our locks were granted.
 *
 * The idempotency check stays exact without a global lock. A transfer committed by another
 * batch after our read either touches an account we hold, so it cannot commit before we do,
 * or it has the same id as one of ours and no account in common: then one of the two inserts
 * meets the other's row in the primary key, waits for it, and fails with a unique violation,
 * and that batch retries and finds the row.
 *
 * The pending transfers' accounts are found in the locking statement itself; one that
 * commits after that statement began is caught by the caller, which compares the pending rows
 * read last against the accounts locked.
 */
export async function openBatch(db: Queryable, input: OpenBatchInput): Promise<OpenedBatch> {
  if (!Number.isSafeInteger(input.count) || input.count < 1) throw new RangeError('openBatch: count must be a positive integer');
  const named = uuidArrayLiteral([...new Set(input.accountIds)].sort());
  // ARRAY(subquery) is evaluated once, so the lock stays an index scan over the ids.
  const accountIds =
    input.pendingIds.length === 0
      ? named
      : `${named} || ARRAY(SELECT unnest(ARRAY[t.debit_account_id, t.credit_account_id]) FROM ledger.transfers t
                           WHERE t.id = ANY(${uuidArrayLiteral(input.pendingIds)}))`;
  const text = `${input.begin ?? BEGIN_WRITE};
    SELECT ${LOCKED_ACCOUNT_COLUMNS} FROM ledger.accounts a WHERE a.id = ANY(${accountIds}) ORDER BY a.id FOR UPDATE;
    SELECT ledger.reserve_timestamps(${input.count}, ${input.nowNs.toString()})::text AS first;
    SELECT ${TRANSFER_COLUMNS} FROM ledger.transfers WHERE id = ANY(${uuidArrayLiteral(input.transferIds)})`;
  // A multi-statement simple query resolves with one result per statement.
  const results = (await db.query(text)) as unknown as pg.QueryResult[];
  const [locked, clock, read] = results.slice(-3) as [
    pg.QueryResult<AccountRecord & { ctid: string }>,
    pg.QueryResult<{ first: string }>,
    pg.QueryResult<TransferRecord>,
  ];
  const first = clock.rows[0]?.first;
  if (first === undefined) throw new Error('invariant: reserve_timestamps returned no row');
  return {
    accounts: locked.rows.map((x) => ({ ...toAccountRow(x), ctid: x.ctid })),
    firstTimestamp: BigInt(first),
    transfers: read.rows.map(toTransferRow),
  };
}

/**
 * Which of these accounts, and of the accounts of these pending transfers, another transaction
 * holds locked right now: a probe that never waits (FOR UPDATE SKIP LOCKED skips a locked row
 * where a lock would wait), in a transaction of its own that it rolls back, so it keeps
 * nothing. Run after a batch's lock wait ran out, to tell the calls that lock holds up from
 * the rest. Also returns the pending transfers' accounts, by pending id.
 */
export async function accountsLockedElsewhere(
  client: pg.PoolClient,
  accountIds: readonly string[],
  pendingIds: readonly string[],
): Promise<{ locked: Set<string>; pendingAccounts: Map<string, string[]> }> {
  await client.query("BEGIN; SET LOCAL statement_timeout = '5s'");
  try {
    const pendingAccounts = new Map<string, string[]>();
    if (pendingIds.length > 0) {
      const r = await client.query<{ id: string; debit: string | null; credit: string | null }>(
        'SELECT id::text, debit_account_id::text AS debit, credit_account_id::text AS credit FROM ledger.transfers WHERE id = ANY($1::uuid[])',
        [pendingIds],
      );
      for (const row of r.rows) pendingAccounts.set(row.id, [row.debit, row.credit].filter((id): id is string => id !== null));
    }
    const ids = [...new Set([...accountIds, ...[...pendingAccounts.values()].flat()])].sort();
    const free = await client.query<{ id: string }>('SELECT id::text FROM ledger.accounts WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE SKIP LOCKED', [ids]);
    const existing = await client.query<{ id: string }>('SELECT id::text FROM ledger.accounts WHERE id = ANY($1::uuid[])', [ids]);
    const taken = new Set(free.rows.map((r) => r.id));
    return { locked: new Set(existing.rows.map((r) => r.id).filter((id) => !taken.has(id))), pendingAccounts };
  } finally {
    await client.query('ROLLBACK');
  }
}

export interface WriteSet {
  accounts: AccountRow[];
  inserts: TransferRow[];
  resolvedPending: TransferRow[];
}

/**
 * The batch write: account balances by the ctid their lock returned (one TID lookup each; see
 * BEGIN_WRITE for why the planner takes it) and the new transfers, then a check of both row
 * counts against $24 and $25 that raises on a mismatch (ledger.assert_rows), so that the
 * statement fails, and its transaction with it, unless every row landed.
 */
const WRITE_BATCH_SQL = `WITH acc AS (
       UPDATE ledger.accounts AS a
          SET debits_pending = u.dp, debits_posted = u.dpo,
              credits_pending = u.cp, credits_posted = u.cpo, flags = u.flags
         FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::int[], $23::tid[])
              AS u(id, dp, dpo, cp, cpo, flags, ctid)
        WHERE a.ctid = u.ctid AND a.id = u.id
        RETURNING 1
     ), ins AS (
       INSERT INTO ledger.transfers (id, debit_account_id, credit_account_id, amount,
              amount_requested, pending_id, ledger, code, flags, timeout_seconds, metadata,
              timestamp, result, pending_status, expires_at, resolved_at)
       SELECT u.id, u.dr, u.cr, u.amount, u.requested, u.pending_id, u.ledger, u.code, u.flags,
              u.timeout, u.metadata, u.ts, u.result, u.status, u.expires_at, u.resolved_at
         FROM ROWS FROM (unnest($7::uuid[], $8::uuid[], $9::uuid[], $10::bigint[], $11::bigint[],
                                $12::uuid[], $13::text[], $14::int[], $15::int[], $16::int[],
                                $18::bigint[], $19::text[], $20::text[], $21::bigint[], $22::bigint[]),
                         jsonb_array_elements($17::jsonb))
              AS u(id, dr, cr, amount, requested, pending_id, ledger, code, flags, timeout, ts, result, status,
                   expires_at, resolved_at, metadata)
       RETURNING 1
     )
     SELECT ledger.assert_rows('accounts', (SELECT count(*) FROM acc), $24::bigint)
          + ledger.assert_rows('transfers', (SELECT count(*) FROM ins), $25::bigint) AS mismatches`;

/**
 * WRITE_BATCH_SQL cut at its placeholders: text, a placeholder's number, text, and so on. The
 * batch's constants are written in where the numbers are (`writeBatchStatements`).
 */
const WRITE_BATCH_PARTS = WRITE_BATCH_SQL.split(/\$(\d+)/);

/**
 * The statements that write a decided batch, as text for one simple-protocol query: the
 * caller sends them with its other statements of the same round trip (the engine: with the
 * events' append and COMMIT). Each statement checks its own row counts and raises when they
 * differ from the batch's, before anything after it runs.
 *
 * The values are written into the statements as constants, so the statements carry
 * everything they need and leave nothing behind in the session: any connection runs them,
 * including one a transaction-pooling proxy (PgBouncer in transaction mode) hands out for
 * this transaction only. (The write was a statement each connection PREPAREd once and then
 * EXECUTEd, which such a proxy breaks: the next transaction may meet a server session that
 * never prepared it, or one that already has. Planning it in each batch instead measured the
 * same: bench:ledger 22,541-26,172 transfers/s against 23,102-26,076, alternated.) The pending
 * transfers a batch resolves are updated by a second statement, only when there are any.
 */
export function writeBatchStatements(w: WriteSet): string[] {
  const a = w.accounts;
  const t = w.inserts;
  const p = w.resolvedPending;
  const values = [
      sqlArrayLiteral(a.map((x) => x.id)),
      sqlArrayLiteral(a.map((x) => x.debitsPending.toString())),
      sqlArrayLiteral(a.map((x) => x.debitsPosted.toString())),
      sqlArrayLiteral(a.map((x) => x.creditsPending.toString())),
      sqlArrayLiteral(a.map((x) => x.creditsPosted.toString())),
      sqlArrayLiteral(a.map((x) => x.flags)),
      sqlArrayLiteral(t.map((x) => x.id)),
      sqlArrayLiteral(t.map((x) => x.debitAccountId)),
      sqlArrayLiteral(t.map((x) => x.creditAccountId)),
      sqlArrayLiteral(t.map((x) => x.amount.toString())),
      sqlArrayLiteral(t.map((x) => str(x.amountRequested))),
      sqlArrayLiteral(t.map((x) => x.pendingId)),
      sqlArrayLiteral(t.map((x) => x.ledger), true),
      sqlArrayLiteral(t.map((x) => x.code)),
      sqlArrayLiteral(t.map((x) => x.flags)),
      sqlArrayLiteral(t.map((x) => x.timeoutSeconds)),
      JSON.stringify(t.map((x) => x.metadata)),
      sqlArrayLiteral(t.map((x) => x.timestamp.toString())),
      sqlArrayLiteral(t.map((x) => x.result), true),
      sqlArrayLiteral(t.map((x) => x.pendingStatus), true),
      sqlArrayLiteral(t.map((x) => str(x.expiresAt))),
      sqlArrayLiteral(t.map((x) => str(x.resolvedAt))),
      sqlArrayLiteral(a.map((x) => x.ctid ?? null), true),
  ];
  const constants = [...values.map(sqlLiteral), String(a.length), String(t.length)];
  const write = WRITE_BATCH_PARTS.map((part, i) => {
    if (i % 2 === 0) return part;
    const constant = constants[Number(part) - 1];
    if (constant === undefined) throw new Error(`invariant: the batch write has no value for $${part}`);
    return constant;
  });
  const statements = [write.join('')];
  if (p.length > 0) {
    statements.push(`WITH resolved AS (
       UPDATE ledger.transfers AS t
          SET pending_status = u.status, resolved_at = u.resolved_at
         FROM unnest(${sqlLiteral(sqlArrayLiteral(p.map((x) => x.id)))}::uuid[],
                     ${sqlLiteral(sqlArrayLiteral(p.map((x) => x.pendingStatus), true))}::text[],
                     ${sqlLiteral(sqlArrayLiteral(p.map((x) => str(x.resolvedAt))))}::bigint[]) AS u(id, status, resolved_at)
        WHERE t.id = u.id AND t.pending_status = 'pending'
       RETURNING 1)
     SELECT ledger.assert_rows('resolved pending transfers', (SELECT count(*) FROM resolved), ${p.length}) AS mismatches`);
  }
  return statements;
}

export async function selectDuePending(db: Queryable, nowNs: bigint, limit: number): Promise<TransferRow[]> {
  const r = await db.query<TransferRecord>(
    `SELECT ${TRANSFER_COLUMNS} FROM ledger.transfers t
      WHERE t.pending_status = 'pending' AND t.expires_at IS NOT NULL AND t.expires_at <= $1::bigint
      ORDER BY t.expires_at LIMIT $2`,
    [nowNs.toString(), limit],
  );
  return r.rows.map(toTransferRow);
}

export interface InsertedAccount {
  id: string;
  timestamp: bigint;
}

export async function insertAccounts(
  db: Queryable,
  rows: Array<{ id: string; ledger: string; code: number; flags: number; metadata: Metadata; timestamp: bigint }>,
): Promise<Set<string>> {
  if (rows.length === 0) return new Set();
  const r = await db.query<{ id: string }>(
    `INSERT INTO ledger.accounts (id, ledger, code, flags, metadata, timestamp)
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::jsonb[], $6::bigint[])
     ON CONFLICT (id) DO NOTHING
     RETURNING id::text`,
    [
      rows.map((x) => x.id),
      rows.map((x) => x.ledger),
      rows.map((x) => x.code),
      rows.map((x) => x.flags),
      rows.map((x) => JSON.stringify(x.metadata)),
      rows.map((x) => x.timestamp.toString()),
    ],
  );
  return new Set(r.rows.map((x) => x.id));
}

export async function selectLedgerCodes(db: Queryable, codes: string[]): Promise<Set<string>> {
  if (codes.length === 0) return new Set();
  const r = await db.query<{ code: string }>('SELECT code FROM ledger.ledgers WHERE code = ANY($1::text[])', [codes]);
  return new Set(r.rows.map((x) => x.code));
}

export async function selectAccountTransfers(
  db: Queryable,
  accountId: string,
  opts: { limit: number; order: 'asc' | 'desc'; after: bigint | null },
): Promise<TransferRow[]> {
  const desc = opts.order === 'desc';
  const cmp = desc ? '<' : '>';
  const dir = desc ? 'DESC' : 'ASC';
  const after = opts.after === null ? null : opts.after.toString();
  // Each side walks its own index in timestamp order; the union merges two short lists.
  const r = await db.query<TransferRecord>(
    // Each ORDER BY names the bigint column (t.timestamp or the ts sort key), never the
    // text rendering that shares its name in the output.
    `SELECT ${TRANSFER_COLUMNS} FROM (
       (SELECT t.*, t.timestamp AS ts FROM ledger.transfers t
         WHERE t.debit_account_id = $1 AND t.result = 'ok' AND ($2::bigint IS NULL OR t.timestamp ${cmp} $2::bigint)
         ORDER BY t.timestamp ${dir} LIMIT $3)
       UNION ALL
       (SELECT t.*, t.timestamp AS ts FROM ledger.transfers t
         WHERE t.credit_account_id = $1 AND t.result = 'ok' AND ($2::bigint IS NULL OR t.timestamp ${cmp} $2::bigint)
         ORDER BY t.timestamp ${dir} LIMIT $3)
     ) AS page
     ORDER BY ts ${dir} LIMIT $3`,
    [accountId, after, opts.limit],
  );
  return r.rows.map(toTransferRow);
}

export async function selectBalanceAt(
  db: Queryable,
  accountId: string,
  atNs: bigint,
): Promise<{ debitsPending: bigint; debitsPosted: bigint; creditsPending: bigint; creditsPosted: bigint }> {
  // Posted: every posting transfer (plain or post_pending) up to the timestamp. Pending:
  // every pending transfer made by then and not yet posted, voided or expired by then.
  const r = await db.query<{ dp: string; dpo: string; cp: string; cpo: string }>(
    `SELECT
       coalesce(sum(amount) FILTER (WHERE debit_account_id = $1 AND flags & 2 <> 0
                                    AND (resolved_at IS NULL OR resolved_at > $2)), 0)::text AS dp,
       coalesce(sum(amount) FILTER (WHERE debit_account_id = $1 AND flags & 10 = 0), 0)::text AS dpo,
       coalesce(sum(amount) FILTER (WHERE credit_account_id = $1 AND flags & 2 <> 0
                                    AND (resolved_at IS NULL OR resolved_at > $2)), 0)::text AS cp,
       coalesce(sum(amount) FILTER (WHERE credit_account_id = $1 AND flags & 10 = 0), 0)::text AS cpo
     FROM ledger.transfers
     WHERE (debit_account_id = $1 OR credit_account_id = $1) AND result = 'ok' AND timestamp <= $2`,
    [accountId, atNs.toString()],
  );
  const row = r.rows[0] as { dp: string; dpo: string; cp: string; cpo: string };
  return { debitsPending: big(row.dp), debitsPosted: big(row.dpo), creditsPending: big(row.cp), creditsPosted: big(row.cpo) };
}

/**
 * The ledger's balances as a projection of its events (packages/ledger/src/events.ts).
 *
 * `applyLedgerEvent` is the one fold, pure and in memory: the asynchronous projection applies
 * it to the accounts and reservations a batch touches, the audit (`reconcileLedger`) to every
 * event in one snapshot, and time travel (`ledgerBalanceAt`) to one account's events up to a
 * past point. What the events must carry, and do:
 * - AccountOpened: ledger, code, flags;
 * - TransferPosted (plain and balancing): the amount actually moved;
 * - TransferPending: the amount reserved, its accounts and the closing flags;
 * - PendingTransferPosted: pendingId and the amount posted (the reservation is released in
 *   full, whatever was posted); PendingTransferVoided and PendingTransferExpired: the
 *   reservation's id (a void or expiry of a closing transfer reopens the account);
 * - TransferRejected: nothing moved.
 */
import type pg from 'pg';
import { AccountFlag, ACCOUNT_STREAM, LedgerEventType, TransferFlag, TRANSFER_STREAM } from '@ledgerline/ledger';
import { StreamCorruptError, type AsOf, type StoredEvent } from '@ledgerline/events';
import { ALL_EVENTS, COPIED } from './global-order.ts';
import { mergeLedgerPage, type LedgerPageSummary } from './ledger-replay.ts';
import { RANGE_SETTLE_WAIT_MS_DEFAULT, settledAsOfTime, settledThrough } from './settled.ts';
import type { Projection, TableNames } from './projection.ts';

type Queryable = Pick<pg.ClientBase, 'query'>;

export interface AccountBalances {
  id: string;
  ledger: string;
  code: number;
  /** Account flag bit mask, as in ledger.accounts (closed = 32). */
  flags: number;
  debitsPending: bigint;
  debitsPosted: bigint;
  creditsPending: bigint;
  creditsPosted: bigint;
}

export interface Reservation {
  id: string;
  debitAccountId: string;
  creditAccountId: string;
  amount: bigint;
  /** Transfer flag bit mask of the pending transfer (for its closing flags). */
  flags: number;
}

export interface LedgerFoldState {
  accounts: Map<string, AccountBalances>;
  pending: Map<string, Reservation>;
}

export const emptyLedgerState = (): LedgerFoldState => ({ accounts: new Map(), pending: new Map() });

/** The events contradict themselves (or lack a field): the books cannot be rebuilt from them. */
export class LedgerReplayError extends Error {
  override readonly name = 'LedgerReplayError';
}

const AMOUNT_MAX = 9_223_372_036_854_775_807n;

type EventLike = Pick<StoredEvent, 'type' | 'data'> & { position?: bigint };

function where(e: EventLike): string {
  return `${e.type}${e.position === undefined ? '' : ` at position ${e.position}`}`;
}

function str(e: EventLike, key: string): string {
  const v = e.data[key];
  if (typeof v !== 'string' || v === '') throw new LedgerReplayError(`${where(e)}: ${key} missing`);
  return v;
}

function amount(e: EventLike): bigint {
  const v = str(e, 'amount');
  if (!/^[0-9]{1,19}$/.test(v) || BigInt(v) > AMOUNT_MAX) throw new LedgerReplayError(`${where(e)}: amount ${v} is not minor units`);
  return BigInt(v);
}

/** Flags arrive as an object (whole events) or as its JSON text (lean reads). */
function mask(table: Readonly<Record<string, number>>, value: unknown): number {
  let m = 0;
  const flags: unknown = typeof value === 'string' ? JSON.parse(value) : value;
  if (flags === null || typeof flags !== 'object') return m;
  for (const [name, bit] of Object.entries(table)) if ((flags as Record<string, unknown>)[name] === true) m |= bit;
  return m;
}

function account(state: LedgerFoldState, e: EventLike, key: 'debitAccountId' | 'creditAccountId'): AccountBalances {
  const id = str(e, key);
  const a = state.accounts.get(id);
  if (a === undefined) throw new LedgerReplayError(`${where(e)}: account ${id} was never opened`);
  return a;
}

function add(e: EventLike, a: AccountBalances, field: 'debitsPending' | 'debitsPosted' | 'creditsPending' | 'creditsPosted', delta: bigint): void {
  const next = a[field] + delta;
  if (next < 0n || next > AMOUNT_MAX) throw new LedgerReplayError(`${where(e)}: ${field} of ${a.id} would become ${next}`);
  a[field] = next;
}

function setClosed(a: AccountBalances, closed: boolean): void {
  a.flags = closed ? a.flags | AccountFlag.closed : a.flags & ~AccountFlag.closed;
}

/** Releases a reservation (post, void or expiry): its full amount leaves both pending balances. */
function release(state: LedgerFoldState, e: EventLike, pendingId: string, reopen: boolean): Reservation {
  const p = state.pending.get(pendingId);
  if (p === undefined) throw new LedgerReplayError(`${where(e)}: pending transfer ${pendingId} is not pending`);
  state.pending.delete(pendingId);
  const dr = state.accounts.get(p.debitAccountId);
  const cr = state.accounts.get(p.creditAccountId);
  if (dr === undefined || cr === undefined) throw new LedgerReplayError(`${where(e)}: accounts of ${pendingId} missing`);
  add(e, dr, 'debitsPending', -p.amount);
  add(e, cr, 'creditsPending', -p.amount);
  if (reopen && (p.flags & TransferFlag.closingDebit) !== 0) setClosed(dr, false);
  if (reopen && (p.flags & TransferFlag.closingCredit) !== 0) setClosed(cr, false);
  return p;
}

/** Folds one ledger event into the state, in place. Other events are ignored. */
export function applyLedgerEvent(state: LedgerFoldState, e: EventLike): void {
  switch (e.type) {
    case LedgerEventType.accountOpened: {
      const id = str(e, 'id');
      if (state.accounts.has(id)) throw new LedgerReplayError(`${where(e)}: account ${id} opened twice`);
      // A number in whole events, its text in lean reads.
      const code = typeof e.data.code === 'string' ? Number(e.data.code) : e.data.code;
      if (typeof code !== 'number' || !Number.isInteger(code)) throw new LedgerReplayError(`${where(e)}: code missing`);
      state.accounts.set(id, {
        id,
        ledger: str(e, 'ledger'),
        code,
        flags: mask(AccountFlag, e.data.flags),
        debitsPending: 0n,
        debitsPosted: 0n,
        creditsPending: 0n,
        creditsPosted: 0n,
      });
      return;
    }
    case LedgerEventType.transferPosted: {
      const n = amount(e);
      add(e, account(state, e, 'debitAccountId'), 'debitsPosted', n);
      add(e, account(state, e, 'creditAccountId'), 'creditsPosted', n);
      return;
    }
    case LedgerEventType.transferPending: {
      const n = amount(e);
      const flags = mask(TransferFlag, e.data.flags);
      const dr = account(state, e, 'debitAccountId');
      const cr = account(state, e, 'creditAccountId');
      add(e, dr, 'debitsPending', n);
      add(e, cr, 'creditsPending', n);
      if ((flags & TransferFlag.closingDebit) !== 0) setClosed(dr, true);
      if ((flags & TransferFlag.closingCredit) !== 0) setClosed(cr, true);
      const id = str(e, 'id');
      state.pending.set(id, { id, debitAccountId: dr.id, creditAccountId: cr.id, amount: n, flags });
      return;
    }
    case LedgerEventType.pendingTransferPosted: {
      const p = release(state, e, str(e, 'pendingId'), false);
      const n = amount(e);
      if (n > p.amount) throw new LedgerReplayError(`${where(e)}: posts ${n}, more than the ${p.amount} reserved`);
      add(e, account(state, e, 'debitAccountId'), 'debitsPosted', n);
      add(e, account(state, e, 'creditAccountId'), 'creditsPosted', n);
      return;
    }
    case LedgerEventType.pendingTransferVoided:
      release(state, e, str(e, 'pendingId'), true);
      return;
    case LedgerEventType.pendingTransferExpired:
      release(state, e, str(e, 'id'), true);
      return;
    default:
      return; // rejections, and every other stream's events, move nothing
  }
}

export const LEDGER_STREAM_TYPES: readonly string[] = [ACCOUNT_STREAM, TRANSFER_STREAM];

// ---------------------------------------------------------------------------------------------
// The projection: one row per account, one per open reservation.

interface BalanceRow {
  account_id: string;
  ledger: string;
  code: number;
  flags: number;
  debits_pending: string;
  debits_posted: string;
  credits_pending: string;
  credits_posted: string;
}

function fromRow(r: BalanceRow): AccountBalances {
  return {
    id: r.account_id,
    ledger: r.ledger,
    code: r.code,
    flags: r.flags,
    debitsPending: BigInt(r.debits_pending),
    debitsPosted: BigInt(r.debits_posted),
    creditsPending: BigInt(r.credits_pending),
    creditsPosted: BigInt(r.credits_posted),
  };
}

const BALANCE_COLUMNS = `account_id::text, ledger, code, flags, debits_pending::text, debits_posted::text,
  credits_pending::text, credits_posted::text`;

function touched(events: readonly StoredEvent[]): { accounts: string[]; pending: string[] } {
  const accounts = new Set<string>();
  const pending = new Set<string>();
  for (const e of events) {
    if (e.streamType !== ACCOUNT_STREAM && e.streamType !== TRANSFER_STREAM) continue;
    const d = e.data;
    if (typeof d.debitAccountId === 'string') accounts.add(d.debitAccountId);
    if (typeof d.creditAccountId === 'string') accounts.add(d.creditAccountId);
    if (e.type === LedgerEventType.accountOpened && typeof d.id === 'string') accounts.add(d.id);
    if (typeof d.pendingId === 'string') pending.add(d.pendingId);
    if (e.type === LedgerEventType.pendingTransferExpired && typeof d.id === 'string') pending.add(d.id);
  }
  return { accounts: [...accounts], pending: [...pending] };
}

/** The read model of every account's balances, rebuilt from the ledger's events. */
export const ledgerBalancesProjection: Projection = {
  name: 'ledger_balances',
  schema: 'projections',
  tables: ['ledger_balances', 'ledger_reservations'],
  fields: ['id', 'debitAccountId', 'creditAccountId', 'amount', 'pendingId', 'ledger', 'code', 'flags'],
  replaySql: replayLedgerSql,

  async create(db, t) {
    await db.query(`CREATE TABLE ${t.ledger_balances} (
      account_id uuid PRIMARY KEY, ledger text NOT NULL, code integer NOT NULL, flags integer NOT NULL,
      debits_pending bigint NOT NULL, debits_posted bigint NOT NULL, credits_pending bigint NOT NULL, credits_posted bigint NOT NULL)`);
    await db.query(`CREATE TABLE ${t.ledger_reservations} (
      transfer_id uuid PRIMARY KEY, debit_account_id uuid NOT NULL, credit_account_id uuid NOT NULL,
      amount bigint NOT NULL, flags integer NOT NULL)`);
  },

  /**
   * Three reads and three writes per batch, whatever its size: load the accounts and
   * reservations the batch touches, fold in memory, write back what changed.
   */
  async apply(db, t: TableNames, events) {
    const ids = touched(events);
    if (ids.accounts.length === 0) return;
    const state = emptyLedgerState();
    const a = await db.query<BalanceRow>(`SELECT ${BALANCE_COLUMNS} FROM ${t.ledger_balances} WHERE account_id = ANY($1::uuid[])`, [ids.accounts]);
    for (const r of a.rows) state.accounts.set(r.account_id, fromRow(r));
    const persisted = ids.pending.length === 0 ? new Set<string>() : await loadReservations(db, t, state, ids.pending);
    for (const e of events) applyLedgerEvent(state, e);
    await writeAccounts(db, t, [...state.accounts.values()]);
    await writeReservations(db, t, state, persisted);
  },

  /**
   * Replays keep every account and open reservation of the generation in memory (bounded by
   * REPLAY_ACCOUNTS_MAX) and write only the accounts that changed, at each flush.
   */
  async replay(db, t) {
    const state = emptyLedgerState();
    const n = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${t.ledger_balances}`);
    if ((n.rows[0]?.n ?? 0) > REPLAY_ACCOUNTS_MAX) {
      throw new RangeError(`more than ${REPLAY_ACCOUNTS_MAX} accounts: replay batch by batch (a projection without replay)`);
    }
    const a = await db.query<BalanceRow>(`SELECT ${BALANCE_COLUMNS} FROM ${t.ledger_balances}`);
    for (const r of a.rows) state.accounts.set(r.account_id, fromRow(r));
    let persisted = await loadReservations(db, t, state, null);
    const dirty = new Set<string>();
    return {
      fold(events) {
        for (const e of events) {
          applyLedgerEvent(state, e);
          const d = e.data;
          if (typeof d.debitAccountId === 'string') dirty.add(d.debitAccountId);
          if (typeof d.creditAccountId === 'string') dirty.add(d.creditAccountId);
          if (e.type === LedgerEventType.accountOpened && typeof d.id === 'string') dirty.add(d.id);
        }
        if (state.accounts.size > REPLAY_ACCOUNTS_MAX) throw new RangeError(`more than ${REPLAY_ACCOUNTS_MAX} accounts in memory`);
      },
      async flush(c, tables) {
        const rows: AccountBalances[] = [];
        for (const id of dirty) {
          const row = state.accounts.get(id);
          if (row !== undefined) rows.push(row);
        }
        await writeAccounts(c, tables, rows);
        await writeReservations(c, tables, state, persisted);
        persisted = new Set(state.pending.keys());
        dirty.clear();
      },
      parallel: {
        workerModule: new URL('./ledger-replay-worker.ts', import.meta.url),
        merge(summary) {
          const page = summary as LedgerPageSummary;
          mergeLedgerPage(state, page, dirty);
          if (state.accounts.size > REPLAY_ACCOUNTS_MAX) throw new RangeError(`more than ${REPLAY_ACCOUNTS_MAX} accounts in memory`);
          return page.events;
        },
      },
    };
  },
};

/** SQL for a flag mask from a JSON flags object, as `mask` computes it in memory. */
function sqlMask(table: Readonly<Record<string, number>>, json: string): string {
  return `(${Object.entries(table).map(([name, bit]) => `CASE WHEN ${json}->>'${name}' = 'true' THEN ${bit} ELSE 0 END`).join(' | ')})`;
}

/**
 * GROUPING(opened, debit, credit, reservation) of each grouping set in `replayLedgerSql`: a set
 * leaves the other three keys out, and each left-out key sets its bit.
 */
const SET_OPENED = 0b0111;
const SET_DEBIT = 0b1011;
const SET_CREDIT = 0b1101;
const SET_RESERVATION = 0b1110;

/**
 * The same fold as `applyLedgerEvent`, set-based, for a rebuild from zero. One scan of the
 * events up to `until`, hot and archived (`ALL_EVENTS`; the caller, `replayInto`, has
 * refused an archive holding a copy of a hot event), extracts each field once and aggregates four ways at once (grouping
 * sets): opened accounts; posted amounts by debit account and by credit account; and, per
 * reservation, the pending transfer and the posts, voids and expiries that released it. Every
 * later step reads that aggregate (a few rows per account and per reservation), never the
 * events again. Open reservations are those nothing released; posted balances are sums; an
 * account is closed while a closing reservation on it is open or was posted.
 *
 * It checks what an aggregate can show: money moved on an account no event opened, an account
 * opened twice, a release of a reservation that never existed or was already released, a post
 * above the amount reserved. It trusts the order the ledger wrote (a release recorded before
 * its reservation would pass); the audit, reconcileLedger, uses the checking fold.
 */
async function replayLedgerSql(db: Queryable, t: TableNames, until: { transactionId: bigint; position: bigint }): Promise<void> {
  const T = LedgerEventType;
  // The hash tables hold a few rows per account and per reservation; give them room so the
  // planner hashes instead of sorting a million rows of text. A budget, not an allocation: a
  // larger history spills to disk and stays correct. JIT compiled this wide query for longer
  // than it then ran (2.7 s of 10 s, measured), so it is off. The planner cannot estimate the
  // size of an aggregate over grouping sets (it guessed 100 accounts for 10,000) and joined
  // them in nested loops: 1.6 billion comparisons for the orphan check. Hash joins only.
  await db.query(`SET LOCAL work_mem = '1GB'; SET LOCAL jit = off; SET LOCAL enable_nestloop = off`);
  const posts = `e.type IN ($4, $5)`;
  const r = await db.query<{ balances: number; orphan: string | null; twice: string | null; unknown: string | null; released: string | null; over: string | null }>(
    `WITH agg AS MATERIALIZED (
       SELECT GROUPING(x.opened, x.dr, x.cr, x.res) AS g, coalesce(x.opened, x.dr, x.cr, x.res) AS k,
              sum(x.amt) AS amt, count(x.reserved) AS reserved_n, count(*) AS n, bool_or(x.reopens) AS reopened,
              max(x.a) AS a, max(x.b) AS b, max(x.reserved) AS reserved, max(x.i) AS i, max(x.f) AS f
         FROM ${ALL_EVENTS} e CROSS JOIN LATERAL (
           SELECT CASE WHEN e.type = $8 THEN e.data->>'id' END COLLATE "C" AS opened,
                  CASE WHEN ${posts} THEN e.data->>'debitAccountId' END COLLATE "C" AS dr,
                  CASE WHEN ${posts} THEN e.data->>'creditAccountId' END COLLATE "C" AS cr,
                  CASE WHEN ${posts} THEN (e.data->>'amount')::bigint END AS amt,
                  CASE e.type WHEN $6 THEN e.data->>'id' WHEN $5 THEN e.data->>'pendingId'
                              WHEN $7 THEN e.data->>'pendingId' WHEN $9 THEN e.data->>'id' END COLLATE "C" AS res,
                  CASE WHEN e.type = $6 THEN (e.data->>'amount')::bigint END AS reserved,
                  CASE WHEN e.type IN ($7, $9) THEN true END AS reopens,
                  CASE e.type WHEN $6 THEN e.data->>'debitAccountId' WHEN $8 THEN e.data->>'ledger' END COLLATE "C" AS a,
                  CASE WHEN e.type = $6 THEN e.data->>'creditAccountId' END COLLATE "C" AS b,
                  CASE WHEN e.type = $8 THEN (e.data->>'code')::int END AS i,
                  CASE e.type WHEN $6 THEN ${sqlMask(TransferFlag, "e.data->'flags'")}
                              WHEN $8 THEN ${sqlMask(AccountFlag, "e.data->'flags'")} END AS f) x
        WHERE e.stream_type = ANY($3::text[]) AND (e.transaction_id, e.position) <= ($1::text::xid8, $2::bigint)
        GROUP BY GROUPING SETS ((x.opened), (x.dr), (x.cr), (x.res))
     ),
     opened AS (SELECT k AS id, a AS ledger, i AS code, f AS flags, n FROM agg WHERE g = ${SET_OPENED} AND k IS NOT NULL),
     debits AS (SELECT k AS id, amt FROM agg WHERE g = ${SET_DEBIT} AND k IS NOT NULL),
     credits AS (SELECT k AS id, amt FROM agg WHERE g = ${SET_CREDIT} AND k IS NOT NULL),
     -- n counts the reservation and its releases: 1 is still open, 2 released once.
     reservations AS (SELECT k AS id, a AS dr, b AS cr, reserved AS amount, f AS flags, amt AS posted, reserved_n, n, coalesce(reopened, false) AS reopened
                        FROM agg WHERE g = ${SET_RESERVATION} AND k IS NOT NULL),
     open AS (SELECT * FROM reservations WHERE reserved_n = 1 AND n = 1),
     reserved AS (
       INSERT INTO ${t.ledger_reservations} (transfer_id, debit_account_id, credit_account_id, amount, flags)
       SELECT id::uuid, dr::uuid, cr::uuid, amount, flags FROM open RETURNING 1),
     pending AS (
       SELECT v.id, sum(v.d) AS dp, sum(v.c) AS cp FROM open o
        CROSS JOIN LATERAL (VALUES (o.dr, o.amount, 0::bigint), (o.cr, 0::bigint, o.amount)) v(id, d, c) GROUP BY v.id),
     closed AS (
       SELECT DISTINCT v.id FROM reservations r
        CROSS JOIN LATERAL (VALUES (CASE WHEN r.flags & ${TransferFlag.closingDebit} <> 0 THEN r.dr END),
                                   (CASE WHEN r.flags & ${TransferFlag.closingCredit} <> 0 THEN r.cr END)) v(id)
        WHERE r.reserved_n = 1 AND NOT r.reopened AND v.id IS NOT NULL),
     balances AS (
       INSERT INTO ${t.ledger_balances} (account_id, ledger, code, flags, debits_pending, debits_posted, credits_pending, credits_posted)
       SELECT o.id::uuid, o.ledger, o.code, o.flags | CASE WHEN c.id IS NULL THEN 0 ELSE ${AccountFlag.closed} END,
              coalesce(pe.dp, 0), coalesce(dr.amt, 0), coalesce(pe.cp, 0), coalesce(cr.amt, 0)
         FROM opened o LEFT JOIN debits dr ON dr.id = o.id LEFT JOIN credits cr ON cr.id = o.id
         LEFT JOIN pending pe ON pe.id = o.id LEFT JOIN closed c ON c.id = o.id
        WHERE o.n = 1
       RETURNING 1)
     SELECT (SELECT count(*) FROM balances)::int AS balances,
            (SELECT u.id FROM (SELECT id FROM debits UNION ALL SELECT id FROM credits
                               UNION ALL SELECT dr FROM reservations WHERE reserved_n = 1
                               UNION ALL SELECT cr FROM reservations WHERE reserved_n = 1) u
              WHERE NOT EXISTS (SELECT 1 FROM opened o WHERE o.id = u.id) LIMIT 1) AS orphan,
            (SELECT id FROM opened WHERE n > 1 LIMIT 1) AS twice,
            (SELECT id FROM reservations WHERE reserved_n = 0 LIMIT 1) AS unknown,
            (SELECT id FROM reservations WHERE reserved_n = 1 AND n > 2 LIMIT 1) AS released,
            (SELECT id FROM reservations WHERE posted > amount LIMIT 1) AS over`,
    [until.transactionId.toString(), until.position.toString(), LEDGER_STREAM_TYPES, T.transferPosted, T.pendingTransferPosted, T.transferPending, T.pendingTransferVoided, T.accountOpened, T.pendingTransferExpired],
  );
  const row = r.rows[0];
  if (row === undefined) throw new Error('invariant: the replay statement returned no row');
  // Any of these rolls the caller's transaction back: nothing half-built is kept.
  if (row.orphan !== null) throw new LedgerReplayError(`a transfer moved money on account ${row.orphan}, which was never opened`);
  if (row.twice !== null) throw new LedgerReplayError(`account ${row.twice} opened twice`);
  if (row.unknown !== null) throw new LedgerReplayError(`pending transfer ${row.unknown} is released but was never pending`);
  if (row.released !== null) throw new LedgerReplayError(`pending transfer ${row.released} is released more than once`);
  if (row.over !== null) throw new LedgerReplayError(`pending transfer ${row.over} is posted above the amount reserved`);
}

/** Most accounts a replay holds in memory (about 200 bytes each). */
export const REPLAY_ACCOUNTS_MAX = 5_000_000;
/** Rows per write statement: bounds its parameter arrays. */
const WRITE_ROWS_MAX = 20_000;

/** Loads reservations (these ids, or all when null) into the state; returns the ids found. */
async function loadReservations(db: Queryable, t: TableNames, state: LedgerFoldState, ids: string[] | null): Promise<Set<string>> {
  const p = await db.query<{ id: string; dr: string; cr: string; amount: string; flags: number }>(
    `SELECT transfer_id::text AS id, debit_account_id::text AS dr, credit_account_id::text AS cr, amount::text, flags
       FROM ${t.ledger_reservations} WHERE $1::uuid[] IS NULL OR transfer_id = ANY($1::uuid[])`,
    [ids],
  );
  const found = new Set<string>();
  for (const r of p.rows) {
    found.add(r.id);
    state.pending.set(r.id, { id: r.id, debitAccountId: r.dr, creditAccountId: r.cr, amount: BigInt(r.amount), flags: r.flags });
  }
  return found;
}

async function writeAccounts(db: Queryable, t: TableNames, all: readonly AccountBalances[]): Promise<void> {
  for (let i = 0; i < all.length; i += WRITE_ROWS_MAX) {
    const rows = all.slice(i, i + WRITE_ROWS_MAX);
    await db.query(
      `INSERT INTO ${t.ledger_balances} (account_id, ledger, code, flags, debits_pending, debits_posted, credits_pending, credits_posted)
       SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
       ON CONFLICT (account_id) DO UPDATE SET flags = EXCLUDED.flags,
         debits_pending = EXCLUDED.debits_pending, debits_posted = EXCLUDED.debits_posted,
         credits_pending = EXCLUDED.credits_pending, credits_posted = EXCLUDED.credits_posted`,
      [
        rows.map((r) => r.id),
        rows.map((r) => r.ledger),
        rows.map((r) => r.code),
        rows.map((r) => r.flags),
        rows.map((r) => r.debitsPending.toString()),
        rows.map((r) => r.debitsPosted.toString()),
        rows.map((r) => r.creditsPending.toString()),
        rows.map((r) => r.creditsPosted.toString()),
      ],
    );
  }
}

/** Deletes the persisted reservations that were released and inserts the new ones. */
async function writeReservations(db: Queryable, t: TableNames, state: LedgerFoldState, persisted: ReadonlySet<string>): Promise<void> {
  const released = [...persisted].filter((id) => !state.pending.has(id));
  for (let i = 0; i < released.length; i += WRITE_ROWS_MAX) {
    await db.query(`DELETE FROM ${t.ledger_reservations} WHERE transfer_id = ANY($1::uuid[])`, [released.slice(i, i + WRITE_ROWS_MAX)]);
  }
  const reserved = [...state.pending.values()].filter((p) => !persisted.has(p.id));
  for (let i = 0; i < reserved.length; i += WRITE_ROWS_MAX) {
    const rows = reserved.slice(i, i + WRITE_ROWS_MAX);
    await db.query(
      `INSERT INTO ${t.ledger_reservations} (transfer_id, debit_account_id, credit_account_id, amount, flags)
       SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::int[])`,
      [rows.map((p) => p.id), rows.map((p) => p.debitAccountId), rows.map((p) => p.creditAccountId), rows.map((p) => p.amount.toString()), rows.map((p) => p.flags)],
    );
  }
}

/** Every account's balances as the read model holds them (through the active generation's view). */
export async function readProjectedBalances(db: Queryable): Promise<Map<string, AccountBalances>> {
  const r = await db.query<BalanceRow>(`SELECT ${BALANCE_COLUMNS} FROM projections.ledger_balances ORDER BY account_id`);
  return new Map(r.rows.map((x) => [x.account_id, fromRow(x)]));
}

// ---------------------------------------------------------------------------------------------
// Time travel

/**
 * An account's balances as of a past checkpoint or time, folded from its own events (and the
 * reservations they reference), hot and archived. Null when the account did not exist then.
 * The events are found by the account ids inside them, which no index covers: this scans the
 * ledger's events, a cost an audit pays and the money path never does. An archived copy of a
 * hot event is refused (`StreamCorruptError`), not folded twice.
 */
export async function ledgerBalanceAt(db: Queryable, accountId: string, asOf: AsOf, options: { settleWaitMs?: number } = {}): Promise<AccountBalances | null> {
  const cp = 'checkpoint' in asOf ? asOf.checkpoint : null;
  // The answer must be the one the history gives for good: first wait until no transaction that
  // could still add an event before the checkpoint (or recorded by the time) is open
  // (settled.ts); a time not yet past is answered as of the database's clock. Until 2026-12-07
  // the query ran at once, and a transaction in flight left its event out of one answer and in
  // the next.
  if (cp !== null) await settledThrough(db, cp, options.settleWaitMs);
  let time: Date | null = null;
  if ('time' in asOf) {
    // One deadline for both waits.
    const deadline = Date.now() + (options.settleWaitMs ?? RANGE_SETTLE_WAIT_MS_DEFAULT);
    time = await settledAsOfTime(db, asOf.time, options.settleWaitMs);
    // The cut below is the first ledger event recorded after the time in the global order. A
    // transaction that began after the time but took an older id than the cut's would, when it
    // commits, put its event before the cut and move it earlier (the final review moved it: 10,
    // then 0). Every transaction that began by the time has ended (above), so waiting until
    // none older than the cut is open makes the cut final; with no cut yet, until none older
    // than the last ledger event is: a later one then sorts after everything read.
    const cutOrHead = await db.query<{ t: string; p: string }>(
      `SELECT t, p FROM (
         (SELECT 0 AS k, c.transaction_id::text AS t, c.position::text AS p FROM ${ALL_EVENTS} c
           WHERE c.stream_type = ANY($1::text[]) AND c.recorded_at > $2::timestamptz
           ORDER BY c.transaction_id, c.position LIMIT 1)
         UNION ALL
         (SELECT 1, h.transaction_id::text, h.position::text FROM ${ALL_EVENTS} h
           WHERE h.stream_type = ANY($1::text[])
           ORDER BY h.transaction_id DESC, h.position DESC LIMIT 1)) x
       ORDER BY k LIMIT 1`,
      [LEDGER_STREAM_TYPES, time],
    );
    const bound = cutOrHead.rows[0];
    if (bound !== undefined) {
      await settledThrough(db, { transactionId: BigInt(bound.t), position: BigInt(bound.p) }, Math.max(1, deadline - Date.now()));
    }
  }
  const r = await db.query<{ type: string; data: Record<string, unknown>; position: string; stream_type: string; stream_id: string; version: number; copied: boolean }>(
    `WITH cut AS (
       SELECT c.transaction_id, c.position FROM ${ALL_EVENTS} c
        WHERE $5::timestamptz IS NOT NULL AND c.stream_type = ANY($2::text[]) AND c.recorded_at > $5::timestamptz
        ORDER BY c.transaction_id, c.position LIMIT 1)
     SELECT e.type, e.data, e.position::text, e.stream_type, e.stream_id, e.version, ${COPIED('e')} AS copied FROM ${ALL_EVENTS} e
      WHERE e.stream_type = ANY($2::text[])
        AND (e.stream_id = $1 OR e.data->>'debitAccountId' = $1 OR e.data->>'creditAccountId' = $1)
        AND ($3::text IS NULL OR (e.transaction_id, e.position) <= ($3::text::xid8, $4::bigint))
        AND (NOT EXISTS (SELECT 1 FROM cut) OR (e.transaction_id, e.position) < (SELECT cut.transaction_id, cut.position FROM cut))
      ORDER BY e.transaction_id, e.position`,
    [accountId, LEDGER_STREAM_TYPES, cp?.transactionId.toString() ?? null, cp?.position.toString() ?? null, time],
  );
  const state = emptyLedgerState();
  for (const row of r.rows) {
    if (row.copied) throw new StreamCorruptError(row.stream_type, row.stream_id, row.version);
    const e = { type: row.type, data: row.data, position: BigInt(row.position) };
    // The other side of each transfer is not this account: give it a throwaway row to fold into.
    for (const key of ['debitAccountId', 'creditAccountId'] as const) {
      const other = row.data[key];
      if (typeof other === 'string' && other !== accountId && !state.accounts.has(other)) {
        state.accounts.set(other, { id: other, ledger: '', code: 0, flags: 0, debitsPending: 0n, debitsPosted: 0n, creditsPending: 0n, creditsPosted: 0n });
      }
    }
    applyLedgerEvent(state, e);
  }
  return state.accounts.get(accountId) ?? null;
}

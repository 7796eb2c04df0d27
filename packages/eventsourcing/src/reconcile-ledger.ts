/**
 * The auditor's check: rebuild every account's balances from the ledger's events and compare
 * them with the live `ledger.accounts`, inside ONE repeatable-read snapshot. The ledger writes
 * its events in the same transaction as the balances, so in one snapshot the two must agree
 * exactly, even while the ledger keeps taking transfers; any difference is a real one.
 */
import type pg from 'pg';
import { StreamCorruptError } from '@ledgerline/events';
import { ALL_EVENTS, COPIED } from './global-order.ts';
import { applyLedgerEvent, emptyLedgerState, LEDGER_STREAM_TYPES, type AccountBalances } from './ledger-balances.ts';

export type BalanceField = 'ledger' | 'code' | 'flags' | 'debitsPending' | 'debitsPosted' | 'creditsPending' | 'creditsPosted';

export type BalanceDifference =
  | { accountId: string; kind: 'missing_from_events' }
  | { accountId: string; kind: 'missing_from_live' }
  | { accountId: string; kind: 'field'; field: BalanceField; live: string; rebuilt: string; difference: string | null };

export interface LedgerReconcileReport {
  ok: boolean;
  events: number;
  liveAccounts: number;
  rebuiltAccounts: number;
  /** Differences found, all of them counted, the first `differencesMax` listed. */
  differencesTotal: number;
  differences: BalanceDifference[];
  seconds: number;
  eventsPerSecond: number;
}

export interface LedgerReconcileOptions {
  /** Events read per round trip (keyset pages over the global order). */
  pageSize?: number;
  differencesMax?: number;
}

const FIELDS: readonly BalanceField[] = ['ledger', 'code', 'flags', 'debitsPending', 'debitsPosted', 'creditsPending', 'creditsPosted'];

/** Every difference between one live account and its rebuilt twin, field by field. */
export function compareAccount(live: AccountBalances, rebuilt: AccountBalances): BalanceDifference[] {
  const out: BalanceDifference[] = [];
  for (const field of FIELDS) {
    const l = live[field];
    const r = rebuilt[field];
    if (l === r) continue;
    const difference = typeof l === 'bigint' && typeof r === 'bigint' ? (l - r).toString() : null;
    out.push({ accountId: live.id, kind: 'field', field, live: String(l), rebuilt: String(r), difference });
  }
  return out;
}

export async function reconcileLedger(pool: pg.Pool, options: LedgerReconcileOptions = {}): Promise<LedgerReconcileReport> {
  const pageSize = options.pageSize ?? 20_000;
  const differencesMax = options.differencesMax ?? 100;
  const started = performance.now();
  const c = await pool.connect();
  try {
    await c.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    const state = emptyLedgerState();
    let events = 0;
    let after = { t: '0', p: '0' };
    for (;;) {
      // In one snapshot every visible event is committed, so no horizon is needed here. The
      // events of streams that retention archived are read with the hot ones, in their place
      // in the global order (global-order.ts); an archived copy of a hot event is refused.
      const r = await c.query<{ type: string; data: Record<string, unknown>; t: string; p: string; stream_type: string; stream_id: string; version: number; copied: boolean }>(
        `SELECT e.type, e.data, e.transaction_id::text AS t, e.position::text AS p, e.stream_type, e.stream_id, e.version, ${COPIED('e')} AS copied
           FROM ${ALL_EVENTS} e
          WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2::bigint) AND e.stream_type = ANY($3::text[])
          ORDER BY e.transaction_id, e.position LIMIT $4`,
        [after.t, after.p, LEDGER_STREAM_TYPES, pageSize],
      );
      for (const row of r.rows) {
        if (row.copied) throw new StreamCorruptError(row.stream_type, row.stream_id, row.version);
        applyLedgerEvent(state, { type: row.type, data: row.data, position: BigInt(row.p) });
      }
      events += r.rows.length;
      const last = r.rows.at(-1);
      if (last === undefined || r.rows.length < pageSize) break;
      after = { t: last.t, p: last.p };
    }
    const live = await c.query<{
      id: string; ledger: string; code: number; flags: number; dp: string; dpo: string; cp: string; cpo: string;
    }>(
      `SELECT id::text, ledger, code, flags, debits_pending::text AS dp, debits_posted::text AS dpo,
              credits_pending::text AS cp, credits_posted::text AS cpo FROM ledger.accounts ORDER BY id`,
    );
    await c.query('COMMIT');
    const differences: BalanceDifference[] = [];
    let differencesTotal = 0;
    const note = (d: BalanceDifference): void => {
      differencesTotal += 1;
      if (differences.length < differencesMax) differences.push(d);
    };
    const seen = new Set<string>();
    for (const row of live.rows) {
      seen.add(row.id);
      const rebuilt = state.accounts.get(row.id);
      if (rebuilt === undefined) {
        note({ accountId: row.id, kind: 'missing_from_events' });
        continue;
      }
      const liveAccount: AccountBalances = {
        id: row.id, ledger: row.ledger, code: row.code, flags: row.flags,
        debitsPending: BigInt(row.dp), debitsPosted: BigInt(row.dpo), creditsPending: BigInt(row.cp), creditsPosted: BigInt(row.cpo),
      };
      for (const d of compareAccount(liveAccount, rebuilt)) note(d);
    }
    for (const id of [...state.accounts.keys()].sort()) if (!seen.has(id)) note({ accountId: id, kind: 'missing_from_live' });
    const seconds = (performance.now() - started) / 1000;
    return {
      ok: differencesTotal === 0,
      events,
      liveAccounts: live.rows.length,
      rebuiltAccounts: state.accounts.size,
      differencesTotal,
      differences,
      seconds,
      eventsPerSecond: seconds > 0 ? events / seconds : 0,
    };
  } catch (error) {
    await c.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    c.release();
  }
}

export function formatLedgerReconcileReport(r: LedgerReconcileReport): string {
  const lines = [
    `${r.ok ? 'OK' : 'DIFFERENCES'}: ${r.events} events replayed (${Math.round(r.eventsPerSecond)} events/s), ` +
      `${r.liveAccounts} live accounts, ${r.rebuiltAccounts} rebuilt, ${r.differencesTotal} difference(s)`,
  ];
  for (const d of r.differences) {
    if (d.kind === 'field') {
      const by = d.difference === null ? '' : ` (live − rebuilt = ${d.difference})`;
      lines.push(`  account ${d.accountId}: ${d.field} live ${d.live}, rebuilt ${d.rebuilt}${by}`);
    } else {
      lines.push(`  account ${d.accountId}: ${d.kind === 'missing_from_events' ? 'in ledger.accounts but never opened by an event' : 'opened by an event but not in ledger.accounts'}`);
    }
  }
  if (r.differencesTotal > r.differences.length) lines.push(`  … and ${r.differencesTotal - r.differences.length} more`);
  return lines.join('\n');
}

/**
 * Exporting events to another region, within the residency policy. The export is all or
 * nothing: it writes NDJSON to `<out>.partial` and renames it only when every event passed
 * the policy, so a refused export leaves no file behind.
 */
import { createWriteStream } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { once } from 'node:events';
import type pg from 'pg';
import {
  assertResidency,
  CHECKPOINT_START,
  checkpointOf,
  type Checkpoint,
  type EventStore,
  type ResidencyPolicy,
  type StoredEvent,
} from '@ledgerline/events';
import { checkpointLess } from './projection.ts';
import { settledThrough } from './settled.ts';

export interface ExportOptions {
  policy: ResidencyPolicy;
  /** The region the export is going to. */
  targetLocation: string;
  /** The file to write (NDJSON, one event per line). */
  out: string;
  after?: Checkpoint;
  /**
   * Last event to include (inclusive); default: everything readable now. The export first waits
   * (at most `settleWaitMs`) until every event up to it is readable (`settledThrough`), so that
   * it never ends short of it; RangeNotSettledError when it cannot.
   */
  until?: Checkpoint;
  pageSize?: number;
  settleWaitMs?: number;
}

export interface ExportReport {
  events: number;
  file: string;
  last: Checkpoint | null;
}

/**
 * The events of a page that the export may send, judged by their streams' region tags: the tags
 * and whether each event is still in the store (hot or archived) are read in one statement,
 * after the events were. A stream that retention deleted meanwhile (its events and its tag go
 * in one transaction) is gone from both, and its events are left out, as deleted data; until
 * 2026-12-07 the tags were read alone, and such a stream was judged untagged and its events,
 * already read, were exported wherever the export went (a review forced it). (One REPEATABLE
 * READ snapshot for both, tried first, made the read horizon the cluster's oldest transaction,
 * and an export ended short while any database of the server had one open.) Throws the first
 * refusal.
 */
async function allowedForExport(db: pg.Pool, policy: ResidencyPolicy, events: readonly StoredEvent[], location: string): Promise<StoredEvent[]> {
  if (events.length === 0) return [];
  const r = await db.query<{ present: boolean; region: string | null }>(
    `SELECT (EXISTS (SELECT 1 FROM events.events h WHERE h.position = u.position)
             OR EXISTS (SELECT 1 FROM events.archived_events a WHERE a.position = u.position)) AS present, r.region
       FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY AS u(position, stream_type, stream_id, n)
       LEFT JOIN events.stream_regions r ON r.stream_type = u.stream_type AND r.stream_id = u.stream_id
      ORDER BY u.n`,
    [events.map((e) => e.position.toString()), events.map((e) => e.streamType), events.map((e) => e.streamId)],
  );
  if (r.rows.length !== events.length) throw new Error(`invariant: ${events.length} events but ${r.rows.length} residency rows`);
  const allowed: StoredEvent[] = [];
  events.forEach((e, i) => {
    const row = r.rows[i] as { present: boolean; region: string | null };
    if (!row.present) return;
    assertResidency(policy, { streamType: e.streamType, streamId: e.streamId, region: row.region }, 'export', location);
    allowed.push(e);
  });
  return allowed;
}

export async function exportEvents(pool: pg.Pool, store: EventStore, options: ExportOptions): Promise<ExportReport> {
  const pageSize = options.pageSize ?? 10_000;
  if (options.until !== undefined) await settledThrough(pool, options.until, options.settleWaitMs);
  const partial = `${options.out}.partial`;
  const file = createWriteStream(partial, { flags: 'w' });
  let events = 0;
  let last: Checkpoint | null = null;
  let after = options.after ?? CHECKPOINT_START;
  try {
    for (;;) {
      const { until } = options;
      const read = await store.readAll(pool, { after, limit: pageSize });
      const inRange = until === undefined ? read : read.filter((e) => !checkpointLess(until, e));
      const page = await allowedForExport(pool, options.policy, inRange, options.targetLocation);
      for (const e of page) {
        const line = JSON.stringify({ ...e, position: e.position.toString(), transactionId: e.transactionId.toString() });
        if (!file.write(`${line}\n`)) await once(file, 'drain');
      }
      events += page.length;
      // The read goes on from the page as read (events deleted meanwhile included).
      const tail = inRange.at(-1);
      if (tail !== undefined) after = checkpointOf(tail);
      const sent = page.at(-1);
      if (sent !== undefined) last = checkpointOf(sent);
      if (inRange.length < pageSize) break;
    }
    file.end();
    await once(file, 'close');
    await rename(partial, options.out);
    return { events, file: options.out, last };
  } catch (error) {
    file.destroy();
    await rm(partial, { force: true });
    throw error;
  }
}

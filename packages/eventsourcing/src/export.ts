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
  CHECKPOINT_START,
  checkpointOf,
  presentEventsAllowed,
  type Checkpoint,
  type EventStore,
  type ResidencyPolicy,
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
      // The events still in the store (a stream retention deleted since the read is left out, as
      // deleted data, never judged untagged), each allowed at the target; else the first refusal.
      const page = await presentEventsAllowed(pool, options.policy, inRange, 'export', options.targetLocation);
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

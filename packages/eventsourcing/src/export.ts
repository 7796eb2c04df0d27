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
  partitionByResidency,
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

/**
 * `read` in one read-only REPEATABLE READ transaction: a page's events and their streams'
 * region tags are read in one snapshot. Read in two, a stream that retention deleted in
 * between (its events and its tag go in one transaction) was judged untagged, and its events,
 * already read, went out wherever the export went (until 2026-12-07; a review forced it).
 */
async function inOneSnapshot<T>(pool: pg.Pool, read: (c: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let failed = false;
  try {
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    const result = await read(client);
    await client.query('COMMIT');
    return result;
  } catch (error) {
    failed = true;
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release(failed ? true : undefined);
  }
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
      const page = await inOneSnapshot(pool, async (c) => {
        const read = await store.readAll(c, { after, limit: pageSize });
        const inRange = until === undefined ? read : read.filter((e) => !checkpointLess(until, e));
        const { withheld } = await partitionByResidency(c, options.policy, inRange, options.targetLocation, 'export');
        const refused = withheld[0];
        if (refused !== undefined) throw refused.error;
        return inRange;
      });
      for (const e of page) {
        const line = JSON.stringify({ ...e, position: e.position.toString(), transactionId: e.transactionId.toString() });
        if (!file.write(`${line}\n`)) await once(file, 'drain');
      }
      events += page.length;
      const tail = page.at(-1);
      if (tail !== undefined) last = after = checkpointOf(tail);
      if (page.length < pageSize) break;
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

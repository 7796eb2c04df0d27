/**
 * bench:events' writers: the application whose transactions append the events. They run in
 * the bench's own thread, or (the default) in a worker thread of their own, as the service
 * that appends is a process of its own beside the relay and the consumer in a real system:
 * then their work and the consumer's are not queued behind each other on one event loop.
 *
 * Each writer owns `streamsPerWriter` streams and assigns their versions itself, so writers
 * never conflict; each transaction appends `eventsPerTx` events with `store.appendMany` (one
 * statement), spread over `streamsPerTx` streams, the same number of events each.
 */
import { randomUUID } from 'node:crypto';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import pg from 'pg';
import { EventStore, inTransaction, type StreamEvent } from '../packages/events/src/index.ts';
import { sleep } from './common.ts';

export interface WriterShape {
  dbUrl: string;
  /** application_name of the writers' connections (the bench splits PostgreSQL CPU by it). */
  applicationName: string;
  writers: number;
  poolSize: number;
  events: number;
  eventsPerTx: number;
  streamsPerTx: number;
  streamsPerWriter: number;
  /** Appended events per second across all writers; 0: as fast as they go. */
  ratePerS: number;
}

/** Shared counters: [events appended, 1 once the writers should stop]. */
export type WriterCounters = Int32Array;
export const APPENDED = 0;
export const STOP = 1;

export function writerCounters(): WriterCounters {
  return new Int32Array(new SharedArrayBuffer(2 * Int32Array.BYTES_PER_ELEMENT));
}

/**
 * Runs the writers to the end (or until `counters[STOP]` is set), on a pool of their own;
 * `written` settles when they are done. The pool's connections stay open until `counters[STOP]`
 * is set (`closed`), so that the bench can still read their backends' CPU time.
 */
export function runWriters(shape: WriterShape, counters: WriterCounters): { written: Promise<void>; closed: Promise<void> } {
  const pool = new pg.Pool({ connectionString: shape.dbUrl, max: shape.poolSize, idleTimeoutMillis: 0, application_name: shape.applicationName });
  pool.on('error', () => {
    // An idle client's error; the next query on it fails and the writer reports that.
  });
  const written = (async () => {
    const store = await EventStore.open(pool);
    const perStream = Math.max(1, Math.floor(shape.eventsPerTx / shape.streamsPerTx));
    const t0 = performance.now();
    let claimed = 0;
    const writer = async (w: number): Promise<void> => {
      const versions = new Array<number>(shape.streamsPerWriter).fill(0);
      let next = 0;
      for (;;) {
        if (Atomics.load(counters, STOP) !== 0) return;
        const n = Math.min(shape.eventsPerTx, shape.events - claimed);
        if (n <= 0) return;
        if (shape.ratePerS > 0) {
          // Paced: no more than the rate allows so far.
          const aheadMs = ((claimed + n) / shape.ratePerS) * 1000 - (performance.now() - t0);
          if (aheadMs > 0) {
            await sleep(aheadMs);
            continue;
          }
        }
        claimed += n;
        const entries: StreamEvent[] = [];
        for (let i = 0; i < n; i += 1) {
          if (i % perStream === 0) next = (next + 1) % shape.streamsPerWriter;
          versions[next] = (versions[next] ?? 0) + 1;
          entries.push({
            streamType: 'account',
            streamId: `w${w}-a${next}`,
            version: versions[next] ?? 1,
            event: {
              type: 'TransferPosted',
              data: {
                transferId: randomUUID(),
                debitAccountId: `w${w}-a${next}`,
                creditAccountId: `w${w}-a${(next + 1) % shape.streamsPerWriter}`,
                amount: String(1 + ((i * 7919) % 100_000)),
                ledger: 'USD',
                code: 1,
              },
              metadata: { correlationId: randomUUID(), actor: 'svc:bench' },
            },
          });
        }
        await inTransaction(pool, (c) => store.appendMany(c, entries));
        Atomics.add(counters, APPENDED, n);
      }
    };
    await Promise.all(Array.from({ length: shape.writers }, (_, w) => writer(w)));
  })();
  const closed = written
    .catch(() => {})
    .then(async () => {
      while (Atomics.load(counters, STOP) === 0) await sleep(20);
      await pool.end().catch(() => {});
    });
  return { written, closed };
}

interface WriterJob {
  kind: 'bench-events-writers';
  shape: WriterShape;
  counters: WriterCounters;
}

/** `runWriters` in a worker thread: `written` as there, `closed` when the thread has exited. */
export function runWritersInThread(shape: WriterShape, counters: WriterCounters): { written: Promise<void>; closed: Promise<void> } {
  const job: WriterJob = { kind: 'bench-events-writers', shape, counters };
  const worker = new Worker(new URL(import.meta.url), { workerData: job });
  let settled = false;
  const written = new Promise<void>((resolve, reject) => {
    worker.on('message', (m: { ok: true } | { ok: false; error: string }) => {
      settled = true;
      if (m.ok) resolve();
      else reject(new Error(`writer thread: ${m.error}`));
    });
    worker.on('error', (e: unknown) => {
      settled = true;
      reject(e instanceof Error ? e : new Error(String(e)));
    });
    worker.on('exit', (code) => {
      if (!settled) reject(new Error(`writer thread exited with code ${code} before it finished`));
    });
  });
  const closed = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
  return { written, closed };
}

if (!isMainThread && (workerData as Partial<WriterJob> | null)?.kind === 'bench-events-writers') {
  const job = workerData as WriterJob;
  runWriters(job.shape, job.counters).written.then(
    () => parentPort?.postMessage({ ok: true }),
    (error: unknown) => parentPort?.postMessage({ ok: false, error: error instanceof Error ? (error.stack ?? error.message) : String(error) }),
  );
}

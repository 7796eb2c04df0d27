/**
 * A replay worker thread (see ledger-replay.ts): reads the pages the main thread assigns,
 * with its own connection, and answers each with its summary.
 *
 * workerData: { databaseUrl, fields }. Messages in: { index, after, until, limit } (checkpoints
 * as strings, `until` inclusive). Messages out: { index, summary } or { index, error }.
 */
import { parentPort, workerData } from 'node:worker_threads';
import pg from 'pg';
import { EventStore } from '@ledgerline/events';
import { summarizeLedgerPage } from './ledger-replay.ts';

interface Task {
  index: number;
  after: { t: string; p: string };
  until: { t: string; p: string };
  limit: number;
}

const { databaseUrl, fields } = workerData as { databaseUrl: string; fields: string[] };
const pool = new pg.Pool({ connectionString: databaseUrl, max: 1 });
pool.on('error', () => {});
const store = await EventStore.open(pool);
const port = parentPort;
if (port === null) throw new Error('ledger-replay-worker must run as a worker thread');

// The main thread terminates this worker when the replay ends.
port.on('message', (task: Task) => {
  const after = { transactionId: BigInt(task.after.t), position: BigInt(task.after.p) };
  const until = { transactionId: BigInt(task.until.t), position: BigInt(task.until.p) };
  store.readAll(pool, { after, limit: task.limit, fields }).then(
    (events) => {
      const page = events.filter((e) => e.transactionId < until.transactionId || (e.transactionId === until.transactionId && e.position <= until.position));
      port.postMessage({ index: task.index, summary: summarizeLedgerPage(page) });
    },
    (error: unknown) => port.postMessage({ index: task.index, error: error instanceof Error ? error.message : String(error) }),
  );
});
port.postMessage({ ready: true });

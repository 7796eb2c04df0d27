/**
 * The hand-written references of bench:ledger: the same money movement as the engine's, written
 * by hand on the same tables, measured in the same run.
 *
 * Issue 2 sets the engine's bar with one: "a hand-written batch of 500 transfers, with two
 * balance updates, a transfer insert and an event insert per transfer, measured about 15,000
 * transfers/s. The engine has to be at least that lean." A figure measured on another day
 * says little on a machine whose speed moves by 2× between sessions, so the benchmark
 * measures the reference beside the engine, in two shapes:
 *
 * - `statements`: the batch as one would first write it. One transaction per batch of 500:
 *   the batch's timestamps reserved (`ledger.reserve_timestamps`, as the engine does), then
 *   the two balance updates (debits, then credits, each account's amounts added up first),
 *   the transfers' insert and their `ledger.TransferPosted` events' insert (the engine's
 *   document, built in JavaScript), each one set-based statement with its values as
 *   parameters, each its own round trip: seven a batch with BEGIN and COMMIT.
 * - `set`: the leanest form we know how to write. One statement a batch, in its own
 *   transaction: it reserves the timestamps, adds each account's debits and credits in one
 *   UPDATE (every account row once), and inserts the transfers and their events (the document
 *   built in SQL with the engine's keys). One round trip a batch.
 *
 * The tables are the migrated ones, with every index, check and default the engine pays for.
 * What both leave out, so that they bound the engine from above rather than copy it: no
 * decision (no balances read, no limits checked, no idempotency lookup of the ids, no result
 * per transfer), no row locks taken before the write, and each connection moves money between
 * accounts of its own, so its batches never wait for another's locks. The engine does all of
 * that, and takes its transfers one at a time from many clients.
 */
import { createHistogram } from 'node:perf_hooks';
import pg from 'pg';
import { migrateEvents } from '../packages/events/src/index.ts';
import { migrateLedger, newId } from '../packages/ledger/src/index.ts';
import type { TestDatabase } from '../packages/testing/src/index.ts';
import { checkAborted, nsToMs, prng, randomTransferParts, settleAccounts, sleep, type Log } from './common.ts';

export type ReferenceShape = 'statements' | 'set';

export interface ReferenceOptions {
  db: TestDatabase;
  shape: ReferenceShape;
  accounts: number;
  connections: number;
  batchSize: number;
  seconds: number;
  warmupSeconds: number;
  seed: number;
  log: Log;
}

export interface ReferenceFigures {
  transfersPerS: number;
  transfers: number;
  batchMsP50: number;
  batchMsP99: number;
  /** Debits equal credits equal the transfers' sum, and every transfer has its event. */
  invariantsOk: boolean;
}

/** One batch of random transfers between a connection's own accounts. */
interface Batch {
  ids: string[];
  debits: string[];
  credits: string[];
  amounts: number[];
  partitions: number[];
  eventIds: string[];
}

// The `set` shape's one statement: the batch's timestamps, the balances, the transfers, the events. `input` is
// read by three data-modifying CTEs, so PostgreSQL computes it once (and reserves once).
const BATCH_SQL = `
WITH input AS MATERIALIZED (
  SELECT u.id, u.debit, u.credit, u.amount, u.partition, u.event_id, ts.first + u.n - 1 AS timestamp
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::smallint[], $6::uuid[])
           WITH ORDINALITY AS u(id, debit, credit, amount, partition, event_id, n),
         ledger.reserve_timestamps(cardinality($1::uuid[]), $7::bigint) AS ts(first)
), balances AS (
  UPDATE ledger.accounts a
     SET debits_posted = a.debits_posted + x.debits, credits_posted = a.credits_posted + x.credits
    FROM (SELECT id, sum(debits)::bigint AS debits, sum(credits)::bigint AS credits
            FROM (SELECT debit AS id, amount AS debits, 0 AS credits FROM input
                  UNION ALL
                  SELECT credit, 0, amount FROM input) s
           GROUP BY id) x
   WHERE a.id = x.id
  RETURNING 1
), transfers AS (
  INSERT INTO ledger.transfers (id, debit_account_id, credit_account_id, amount, ledger, code, flags, timestamp, result)
  SELECT id, debit, credit, amount, 'USD', 1, 0, timestamp, 'ok' FROM input
  RETURNING 1
), appended AS (
  INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata)
  SELECT partition, event_id, 'ledger.transfer', id::text, 1, 'ledger.TransferPosted',
         jsonb_build_object('id', id, 'debitAccountId', debit, 'creditAccountId', credit,
                            'amount', amount::text, 'pendingId', null, 'ledger', 'USD', 'code', 1,
                            'flags', '{}'::jsonb, 'timeoutSeconds', 0, 'metadata', '{}'::jsonb,
                            'timestamp', timestamp::text, 'result', 'ok', 'expiresAt', null),
         '{}'::jsonb
    FROM input
  RETURNING 1
)
SELECT (SELECT count(*) FROM balances)::int AS accounts, (SELECT count(*) FROM transfers)::int AS transfers,
       (SELECT count(*) FROM appended)::int AS events`;

/** The wall clock in nanoseconds, as the engine's default clock reads it (to the millisecond). */
const nowNs = (): string => (BigInt(Date.now()) * 1_000_000n).toString();

/** Creates `accounts` accounts on USD directly (one statement per thousand), returns their ids. */
async function createAccounts(client: pg.Client, count: number): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < count; i += 1000) {
    checkAborted();
    const chunk = Array.from({ length: Math.min(1000, count - i) }, () => newId());
    await client.query(
      `INSERT INTO ledger.accounts (id, ledger, code, flags, timestamp)
       SELECT u.id, 'USD', 1, 0, ts.first + u.n - 1
         FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n),
              ledger.reserve_timestamps(cardinality($1::uuid[]), $2::bigint) AS ts(first)`,
      [chunk, nowNs()],
    );
    ids.push(...chunk);
  }
  return ids;
}

function randomBatch(random: () => number, ids: readonly string[], n: number): Batch {
  const batch: Batch = { ids: [], debits: [], credits: [], amounts: [], partitions: [], eventIds: [] };
  for (let i = 0; i < n; i += 1) {
    const { debit, credit, amount } = randomTransferParts(random, ids);
    batch.ids.push(newId());
    batch.debits.push(debit);
    batch.credits.push(credit);
    batch.amounts.push(amount);
    batch.partitions.push(i % 4);
    batch.eventIds.push(newId());
  }
  return batch;
}

async function writeSet(client: pg.Client, b: Batch): Promise<void> {
  const r = await client.query<{ accounts: number; transfers: number; events: number }>(BATCH_SQL, [
    b.ids,
    b.debits,
    b.credits,
    b.amounts,
    b.partitions,
    b.eventIds,
    nowNs(),
  ]);
  const row = r.rows[0];
  if (row?.transfers !== b.ids.length || row.events !== b.ids.length) {
    throw new Error(`reference batch wrote ${JSON.stringify(row)} for ${b.ids.length} transfers`);
  }
}

/** The `statements` shape: one transaction of set-based statements, each its own round trip. */
async function writeStatements(client: pg.Client, b: Batch): Promise<void> {
  const n = b.ids.length;
  await client.query('BEGIN');
  try {
    const r = await client.query<{ first: string }>('SELECT ledger.reserve_timestamps($1, $2)::text AS first', [n, nowNs()]);
    const first = BigInt(r.rows[0]?.first ?? Number.NaN);
    const timestamps = b.ids.map((_, i) => (first + BigInt(i)).toString());
    // An account named twice in the batch is one row of the join: add its amounts up first.
    const balance = (column: 'debits_posted' | 'credits_posted'): string =>
      `UPDATE ledger.accounts a SET ${column} = a.${column} + d.amount
         FROM (SELECT id, sum(amount)::bigint AS amount FROM unnest($1::uuid[], $2::bigint[]) AS u(id, amount) GROUP BY id) d
        WHERE a.id = d.id`;
    await client.query(balance('debits_posted'), [b.debits, b.amounts]);
    await client.query(balance('credits_posted'), [b.credits, b.amounts]);
    await client.query(
      `INSERT INTO ledger.transfers (id, debit_account_id, credit_account_id, amount, ledger, code, flags, timestamp, result)
       SELECT id, debit, credit, amount, 'USD', 1, 0, ts, 'ok'
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::bigint[]) AS u(id, debit, credit, amount, ts)`,
      [b.ids, b.debits, b.credits, b.amounts, timestamps],
    );
    const data = b.ids.map((id, i) => ({
      id,
      debitAccountId: b.debits[i],
      creditAccountId: b.credits[i],
      amount: String(b.amounts[i]),
      pendingId: null,
      ledger: 'USD',
      code: 1,
      flags: {},
      timeoutSeconds: 0,
      metadata: {},
      timestamp: timestamps[i],
      result: 'ok',
      expiresAt: null,
    }));
    await client.query(
      `INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata)
       SELECT u.partition, u.event_id, 'ledger.transfer', u.id::text, 1, 'ledger.TransferPosted', u.data, '{}'
         FROM ROWS FROM (unnest($1::smallint[], $2::uuid[], $3::uuid[]), jsonb_array_elements($4::jsonb)) AS u(partition, event_id, id, data)`,
      [b.partitions, b.eventIds, b.ids, JSON.stringify(data)],
    );
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  }
}

export async function runHandWrittenReference(o: ReferenceOptions): Promise<ReferenceFigures> {
  await migrateLedger(o.db.url);
  await migrateEvents(o.db.url);
  const setup = new pg.Client({ connectionString: o.db.url });
  await setup.connect();
  const clients: pg.Client[] = [];
  try {
    const accountIds = await createAccounts(setup, o.accounts);
    await settleAccounts(setup);
    // Each connection's own accounts: its batches never wait on another's row locks.
    const own = Array.from({ length: o.connections }, (_, c) => accountIds.filter((_, i) => i % o.connections === c));
    if (own.some((ids) => ids.length < 2)) throw new RangeError(`the reference needs at least 2 accounts per connection (${o.accounts} for ${o.connections})`);
    for (let c = 0; c < o.connections; c += 1) {
      const client = new pg.Client({ connectionString: o.db.url });
      client.on('error', (e) => o.log(`reference connection error: ${e.message}`));
      await client.connect();
      clients.push(client);
    }
    o.log(`reference (${o.shape}): ${o.connections} connections × batches of ${o.batchSize}, ${accountIds.length} accounts`);

    const histogram = createHistogram({ lowest: 1, highest: 120e9, figures: 3 });
    let measuring = false;
    let stop = false;
    let transfers = 0;
    const oneConnection = async (client: pg.Client, ids: readonly string[], random: () => number): Promise<void> => {
      while (!stop) {
        checkAborted();
        const batch = randomBatch(random, ids, o.batchSize);
        const t0 = performance.now();
        await (o.shape === 'set' ? writeSet(client, batch) : writeStatements(client, batch));
        if (measuring) {
          transfers += o.batchSize;
          histogram.record(Math.max(1, Math.round((performance.now() - t0) * 1e6)));
        }
      }
    };
    const running = clients.map((client, c) => oneConnection(client, own[c] as string[], prng(o.seed + 1 + c)));
    // A connection that fails ends the run: stop the others and report the first error.
    const failed: Promise<Error | null> = Promise.all(running).then(
      () => null,
      (error: unknown) => {
        stop = true;
        return error instanceof Error ? error : new Error(String(error));
      },
    );
    await Promise.race([sleep(o.warmupSeconds * 1000), failed]);
    measuring = true;
    const tStart = performance.now();
    await Promise.race([sleep(o.seconds * 1000), failed]);
    measuring = false;
    const measuredSeconds = (performance.now() - tStart) / 1000;
    const measured = transfers;
    stop = true;
    const error = await failed;
    if (error !== null) throw error;

    const check = await setup.query<{ ok: boolean }>(
      `SELECT (SELECT sum(debits_posted) FROM ledger.accounts) = (SELECT sum(credits_posted) FROM ledger.accounts)
          AND (SELECT sum(credits_posted) FROM ledger.accounts) = (SELECT sum(amount) FROM ledger.transfers)
          AND (SELECT count(*) FROM ledger.transfers) = (SELECT count(*) FROM events.events) AS ok`,
    );
    return {
      transfersPerS: Math.round(measured / measuredSeconds),
      transfers: measured,
      batchMsP50: nsToMs(histogram.percentile(50)),
      batchMsP99: nsToMs(histogram.percentile(99)),
      invariantsOk: check.rows[0]?.ok === true,
    };
  } finally {
    await Promise.all(clients.map((c) => c.end().catch(() => {})));
    await setup.end().catch(() => {});
  }
}

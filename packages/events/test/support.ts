/** Test setup for the events package: a fresh database and a JetStream stream of its own. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import { createTestDatabase, type TestDatabase } from '@ledgerline/testing';
import { ensureDeadLetterStream, ensureEventStream, EventConsumer, EventStore, inTransaction, migrateEvents, type StoredEvent } from '../src/index.ts';
import { runCli } from '../src/cli.ts';

export const NATS_URL = process.env.NATS_URL ?? 'nats://127.0.0.1:4222';

export interface EventsTestEnv {
  db: TestDatabase;
  pool: pg.Pool;
  store: EventStore;
  nats: NatsConnection;
  streamName: string;
  subjectPrefix: string;
  dlqStreamName: string;
  dlqSubjectPrefix: string;
  close(): Promise<void>;
}

export async function eventsTestEnv(natsUrl = NATS_URL): Promise<EventsTestEnv> {
  const db = await createTestDatabase('ll_events');
  await migrateEvents(db.url);
  const pool = new pg.Pool({ connectionString: db.url, max: 8 });
  pool.on('error', () => {});
  const store = await EventStore.open(pool);
  const nats = await connect({ servers: natsUrl, maxReconnectAttempts: -1, reconnectTimeWait: 100 });
  const tag = randomBytes(4).toString('hex');
  const env: EventsTestEnv = {
    db,
    pool,
    store,
    nats,
    streamName: `T_EVENTS_${tag}`,
    subjectPrefix: `t${tag}.events`,
    dlqStreamName: `T_DLQ_${tag}`,
    dlqSubjectPrefix: `t${tag}.dlq`,
    close: async () => {
      const jsm = await jetstreamManager(nats);
      await jsm.streams.delete(env.streamName).catch(() => false);
      await jsm.streams.delete(env.dlqStreamName).catch(() => false);
      await nats.close();
      await pool.end();
      await db.drop();
    },
  };
  await ensureEventStream(nats, env.streamName, env.subjectPrefix);
  await ensureDeadLetterStream(nats, env.dlqStreamName, env.dlqSubjectPrefix);
  return env;
}

/** Runs `fn` in a transaction of its own: commit on success, roll back on error. */
export { inTransaction as inTx } from '@ledgerline/events';

/** `eventsTestEnv` with an empty `effects` table: a row per event a consumer's handler applied (see `effectCounts`). */
export async function eventsTestEnvWithEffects(natsUrl = NATS_URL): Promise<EventsTestEnv> {
  const env = await eventsTestEnv(natsUrl);
  await env.pool.query('CREATE TABLE effects (event_id uuid NOT NULL, consumer text NOT NULL)');
  return env;
}

/** `inTx` and `effectCounts` on a suite's pool, which the suite makes later (in its `before`). */
export interface PoolHelpers {
  inTx: <T>(fn: (c: pg.PoolClient) => Promise<T>) => Promise<T>;
  effectCounts: (consumer: string) => Promise<Map<string, number>>;
}

export function poolHelpers(pool: () => pg.Pool): PoolHelpers {
  return {
    inTx: <T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> => inTransaction(pool(), fn),
    effectCounts: (consumer: string): Promise<Map<string, number>> => effectCounts(pool(), consumer),
  };
}

/**
 * Registers the suite's `before` and `after`: an `eventsTestEnvWithEffects`, handed to `use` once
 * made (the suite keeps it), and closed after the suite. The helpers returned work on its pool.
 */
export function suiteWithEffects(use: (env: EventsTestEnv) => void): PoolHelpers {
  let env: EventsTestEnv | undefined;
  before(async () => {
    env = await eventsTestEnvWithEffects();
    use(env);
  });
  after(async () => {
    await env?.close();
  });
  return poolHelpers(() => {
    assert.ok(env, 'the suite environment is made in before()');
    return env.pool;
  });
}

export interface CliRun {
  code: number;
  out: string;
  err: string;
}

/** Runs the events CLI on `env`'s database and streams, capturing what it prints. */
export async function runCliOn(env: EventsTestEnv, args: readonly string[]): Promise<CliRun> {
  let out = '';
  let err = '';
  const code = await runCli(args, {
    env: { DATABASE_URL: env.db.url, NATS_URL, EVENTS_STREAM: env.streamName, EVENTS_SUBJECT_PREFIX: env.subjectPrefix },
    stdout: (t) => (out += `${t}\n`),
    stderr: (t) => (err += `${t}\n`),
  });
  return { code, out, err };
}

/** Polls `check` until it holds; fails after `timeoutMs`. Returns the milliseconds it took. */
export async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = 20_000): Promise<number> {
  const started = Date.now();
  while (!(await check())) {
    assert.ok(Date.now() - started < timeoutMs, `timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
  return Date.now() - started;
}

/** How many effect rows each event left for a consumer (tests keep effects without a unique key). */
export async function effectCounts(pool: pg.Pool, consumer: string): Promise<Map<string, number>> {
  const r = await pool.query<{ id: string; n: number }>(
    'SELECT event_id::text AS id, count(*)::int AS n FROM effects WHERE consumer = $1 GROUP BY event_id',
    [consumer],
  );
  return new Map(r.rows.map((x) => [x.id, x.n]));
}

/**
 * A consumer of `env`'s stream that records an effect row per event it handles, and whose handler
 * refuses the events `refuses` picks (a poisoned event, until the cause is fixed): two deliveries,
 * 20 ms apart, then a dead letter.
 */
export function effectsConsumer(env: EventsTestEnv, name: string, refuses: (e: StoredEvent) => boolean = () => false): EventConsumer {
  return new EventConsumer({
    pool: env.pool, nats: env.nats, name, streamName: env.streamName, filterSubject: `${env.subjectPrefix}.>`,
    dlqSubjectPrefix: env.dlqSubjectPrefix, maxDeliver: 2, backoffMs: [20],
    handler: async (e: StoredEvent, tx: pg.PoolClient) => {
      if (refuses(e)) throw new Error(`${name}: poisoned event`);
      await tx.query('INSERT INTO effects (event_id, consumer) VALUES ($1, $2)', [e.id, name]);
    },
  });
}

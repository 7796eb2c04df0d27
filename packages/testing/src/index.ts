/**
 * Test support: every test gets a database of its own, created from nothing and dropped at
 * the end, so tests never depend on leftovers, on each other, or on their order.
 */
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import pg from 'pg';

export const ADMIN_DATABASE_URL =
  process.env.TEST_ADMIN_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';

export interface TestDatabase {
  name: string;
  url: string;
  /** Drops the database, terminating any connection still open to it. */
  drop(): Promise<void>;
}

function withDatabase(url: string, name: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${name}`;
  return parsed.toString();
}

async function admin<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: ADMIN_DATABASE_URL });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

export async function createTestDatabase(prefix = 'll_test'): Promise<TestDatabase> {
  const name = `${prefix}_${randomBytes(6).toString('hex')}`;
  await admin((c) => c.query(`CREATE DATABASE ${name}`));
  return {
    name,
    url: withDatabase(ADMIN_DATABASE_URL, name),
    drop: () =>
      admin(async (c) => {
        await waitForDisconnects(c, name);
        await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      }),
  };
}

/** How long `drop()` lets a database's clients finish disconnecting before it forces them. */
const DISCONNECT_GRACE_MS = 2000;

/**
 * `pg.Pool#end()` resolves once it has asked its clients to end, not once their backends are
 * gone. A forced drop in that gap terminates a backend whose client is still listening, and the
 * client raises "terminating connection due to administrator command" as an uncaught error.
 * So wait until the database has no backends (or the grace runs out: a test that leaks a
 * connection, or a killed process's backend, is then terminated by the forced drop).
 */
async function waitForDisconnects(client: pg.Client, name: string): Promise<void> {
  const deadline = Date.now() + DISCONNECT_GRACE_MS;
  for (;;) {
    const r = await client.query('SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1', [name]);
    if ((r.rows[0] as { n: number }).n === 0 || Date.now() >= deadline) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Terminates every backend connected to a database (a real fault, not a mock). */
export async function terminateBackends(databaseName: string): Promise<number> {
  return admin(async (c) => {
    const r = await c.query(
      'SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()',
      [databaseName],
    );
    return (r.rows[0] as { n: number }).n;
  });
}

/** A deterministic clock for tests: nanoseconds since the epoch, advanced by hand. */
export class ManualClock {
  #nowNs: bigint;
  constructor(startNs = 1_767_225_600_000_000_000n) {
    this.#nowNs = startNs;
  }
  readonly now = (): bigint => this.#nowNs;
  advanceSeconds(seconds: number): void {
    this.#nowNs += BigInt(seconds) * 1_000_000_000n;
  }
}

/** The fast-check seed for this run: FC_SEED replays a failure; otherwise a fresh one, printed. */
export function propertySeed(label: string): number {
  const fromEnv = process.env.FC_SEED;
  const seed = fromEnv !== undefined ? Number(fromEnv) : Math.floor(Math.random() * 2 ** 31);
  console.log(`[fast-check] ${label}: seed=${seed} (replay with FC_SEED=${seed})`);
  return seed;
}

/** A TCP port on 127.0.0.1 that was free a moment ago, for a child process to listen on. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => {
        if (address === null || typeof address === 'string') reject(new Error('freePort: the server has no TCP address'));
        else resolve(address.port);
      });
    });
  });
}

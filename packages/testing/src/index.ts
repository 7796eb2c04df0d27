/**
 * Test support: every test gets a database of its own, created from nothing and dropped at
 * the end, so tests never depend on leftovers, on each other, or on their order.
 */
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import pg from 'pg';
import { FaultProxy } from '@ledgerline/resilience/fault';
import { seededRandom, type Random } from '@ledgerline/resilience';

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

/** The directory of PostgreSQL's local socket (Debian's, unless TEST_PG_SOCKET_DIR says otherwise). */
export const PG_SOCKET_DIR = process.env.TEST_PG_SOCKET_DIR ?? '/var/run/postgresql';

/**
 * The same database and user (and password) as `url`, over PostgreSQL's local socket instead
 * of TCP, with `application_name` set: a second way into one database that pg_stat_activity
 * tells apart (client_addr is null), as a direct connection beside a pooler's would be.
 */
export function overLocalSocket(url: string, applicationName: string): string {
  const parsed = new URL(url);
  const socket = new URLSearchParams({ host: PG_SOCKET_DIR, application_name: applicationName });
  const user = parsed.username === '' ? '' : `${parsed.username}${parsed.password === '' ? '' : `:${parsed.password}`}@`;
  return `postgresql://${user}${parsed.pathname}?${socket.toString()}`;
}

/**
 * A fault-injection TCP proxy in front of the server of `url`, and `url` through it: give the
 * second to the code under test, then cut, delay or blackhole its connections with the first.
 */
export async function behindFaultProxy(url: string): Promise<{ proxy: FaultProxy; url: string }> {
  const target = new URL(url);
  const proxy = await FaultProxy.start({ target: { host: target.hostname, port: Number(target.port || 5432) } });
  const proxied = new URL(url);
  proxied.host = `${proxy.host}:${proxy.port}`;
  return { proxy, url: proxied.toString() };
}

/**
 * Resets every connection through `proxy` again and again, `minMs` to `minMs + spreadMs` apart
 * (drawn from `random`: give it a `testRandom`, whose seed is printed), until `stop()`, which
 * resolves to how many connections it cut (stopping twice is harmless).
 */
export function cutRepeatedly(proxy: FaultProxy, minMs: number, spreadMs: number, random: Random): { stop(): Promise<number> } {
  let cutting = true;
  const cutter = (async () => {
    let cuts = 0;
    while (cutting) {
      await new Promise((resolve) => setTimeout(resolve, minMs + random() * spreadMs));
      cuts += proxy.dropConnections();
    }
    return cuts;
  })();
  return {
    stop: () => {
      cutting = false;
      return cutter;
    },
  };
}

/** `fn` on a connection of its own to `url`, closed afterwards however `fn` ends. */
export async function withClient<T>(url: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

function admin<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  return withClient(ADMIN_DATABASE_URL, fn);
}

export async function createTestDatabase(prefix = 'll_test'): Promise<TestDatabase> {
  const name = `${prefix}_${randomBytes(6).toString('hex')}`;
  // Before the database exists: an admin URL that cannot name it must not leave it behind.
  const url = withDatabase(ADMIN_DATABASE_URL, name);
  await admin((c) => c.query(`CREATE DATABASE ${name}`));
  return {
    name,
    url,
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

/** The seed `variable` names, to replay a run; otherwise a fresh one. Printed either way. */
function printedSeed(variable: string, tag: string, label: string): number {
  const fromEnv = process.env[variable];
  const seed = fromEnv !== undefined ? Number(fromEnv) : Math.floor(Math.random() * 2 ** 31);
  console.log(`[${tag}] ${label}: seed=${seed} (replay with ${variable}=${seed})`);
  return seed;
}

/**
 * A seeded source of randomness for a test's timing and choices (fault intervals, say):
 * TEST_SEED replays a run; otherwise a fresh seed, printed with the label.
 */
export function testRandom(label: string): Random {
  return seededRandom(printedSeed('TEST_SEED', 'random', label));
}

/** The fast-check seed for this run: FC_SEED replays a failure; otherwise a fresh one, printed. */
export function propertySeed(label: string): number {
  return printedSeed('FC_SEED', 'fast-check', label);
}

/**
 * A fuzzed request's answer as every service promises it: never a 5xx, and an error is
 * problem+json (RFC 9457) whose `status` is the answer's, with a `type` and a `title`. Counts
 * the status in `statuses`, so a test can show that its inputs reached both sides.
 */
export function assertFuzzAnswer(res: { statusCode: number; headers: Record<string, unknown>; body: string }, label: string, statuses: Map<number, number>): void {
  statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
  assert.ok(res.statusCode < 500, `${label} → ${res.statusCode} ${res.body}`);
  if (res.statusCode < 400) return;
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/, `${label} → ${res.statusCode} ${res.body}`);
  const problem = JSON.parse(res.body) as { status?: unknown; type?: unknown; title?: unknown };
  assert.equal(problem.status, res.statusCode, `${label}: ${res.body}`);
  assert.equal(typeof problem.type, 'string', `${label}: ${res.body}`);
  assert.equal(typeof problem.title, 'string', `${label}: ${res.body}`);
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

/**
 * Whether a row passes the CHECK constraint named `constraint`: runs `insert` in a savepoint of
 * the client's open transaction and rolls it back either way, so nothing is kept. A violation of
 * that constraint is `false`; any other error (another constraint, a typo in the statement) is
 * thrown, so a test cannot pass on a row refused for the wrong reason.
 */
export async function passesCheck(client: pg.ClientBase, constraint: string, insert: { text: string; values: unknown[] }): Promise<boolean> {
  await client.query('SAVEPOINT passes_check');
  try {
    await client.query(insert.text, insert.values);
    return true;
  } catch (error) {
    const e = error as { code?: string; constraint?: string };
    if (e.code === '23514' && e.constraint === constraint) return false;
    throw error;
  } finally {
    await client.query('ROLLBACK TO SAVEPOINT passes_check');
  }
}

/** A CHECK constraint rewritten from a regular expression, and the rule it replaced. */
export interface RewrittenCheck {
  constraint: string;
  /** The old check's regular expression, evaluated by the same server as the reference. */
  oldPattern: string;
  /** The shortest and longest strings the old rule accepts. */
  minLength: number;
  maxLength: number;
  /** A character the rule accepts anywhere, to build names of any length: `a` unless given. */
  validUnit?: string;
  /** A row that differs from a valid one only in the checked value. */
  insert(value: string): { text: string; values: unknown[] };
}

/**
 * Characters the name rules treat specially, and some every one refuses: upper case, space,
 * `~`, DEL and another control, line breaks, non-ASCII and an astral character. (No NUL:
 * PostgreSQL refuses it in text before any check runs.)
 */
const CHECK_UNITS = ['a', 'b', 'z', '0', '9', '_', '.', '-', '@', 'A', 'Z', ' ', '/', '~', '\x7f', '\x1f', 'é', '\n', '\u2028', '\t', '😀'];

/**
 * Holds rewritten CHECK constraints to the rules they replaced (see `assertCheckKeepsRule`), on
 * a database of their own: created, brought up by `migrations`, and dropped at the end.
 */
export async function assertChecksKeepRules(
  prefix: string,
  migrations: ReadonlyArray<(databaseUrl: string) => Promise<void>>,
  rules: readonly RewrittenCheck[],
  options: { seed: number; numRuns: number },
): Promise<void> {
  const db = await createTestDatabase(prefix);
  const client = new pg.Client({ connectionString: db.url });
  try {
    for (const migrate of migrations) await migrate(db.url);
    await client.connect();
    // One transaction: each row is tried in a savepoint and rolled back.
    await client.query('BEGIN');
    for (const rule of rules) await assertCheckKeepsRule(client, rule, options);
    await client.query('ROLLBACK');
  } finally {
    await client.end().catch(() => {});
    await db.drop();
  }
}

/**
 * Holds a rewritten CHECK constraint to the rule it replaced: for strings at and around both
 * length bounds, each character of CHECK_UNITS in each place, and `numRuns` random strings
 * (fast-check, `seed`), the table's verdict (an insert, rolled back) must equal the old regular
 * expression's. Runs inside the client's open transaction.
 */
async function assertCheckKeepsRule(client: pg.ClientBase, rule: RewrittenCheck, options: { seed: number; numRuns: number }): Promise<void> {
  const oldAccepts = async (value: string): Promise<boolean> =>
    (await client.query<{ ok: boolean }>('SELECT $1::text ~ $2::text AS ok', [value, rule.oldPattern])).rows[0]?.ok === true;
  const agrees = async (value: string): Promise<boolean> => {
    const now = await passesCheck(client, rule.constraint, rule.insert(value));
    assert.equal(now, await oldAccepts(value), `${rule.constraint}: ${JSON.stringify(value)}`);
    return now;
  };
  const v = rule.validUnit ?? 'a';
  const likely = [v, v === v.toLowerCase() ? 'z' : 'Z', '0', '9', '-', '_', '.'];
  const cases: string[] = [];
  for (const n of [0, 1, 2, rule.minLength - 1, rule.minLength, rule.maxLength - 1, rule.maxLength, rule.maxLength + 1, rule.maxLength + 2]) {
    if (n < 0) continue;
    for (const fill of likely) cases.push(`${v}${fill.repeat(Math.max(0, n - 1))}`.slice(0, n));
  }
  for (const unit of [...CHECK_UNITS, ...likely]) cases.push(unit, `${v}${unit}`, `${unit}${v.repeat(rule.minLength)}`, `${v.repeat(rule.minLength)}${unit}${v}`, `${v.repeat(rule.maxLength - 1)}${unit}`);
  for (const value of cases) await agrees(value);
  // The bounds themselves: the old rule's shortest and longest names pass, one shorter or longer does not.
  assert.equal(await agrees(v.repeat(rule.minLength)), true, `${rule.constraint}: the shortest name`);
  assert.equal(await agrees(v.repeat(rule.maxLength)), true, `${rule.constraint}: the longest name`);
  assert.equal(await agrees(v.repeat(rule.maxLength + 1)), false, `${rule.constraint}: one character too long`);
  if (rule.minLength > 0) assert.equal(await agrees(v.repeat(rule.minLength - 1)), false, `${rule.constraint}: one character too short`);
  await fc.assert(
    fc.asyncProperty(
      fc.oneof(
        fc.string({ unit: fc.constantFrom(...CHECK_UNITS), maxLength: rule.maxLength + 3 }),
        // Mostly characters the rules accept, so strings near either bound are common.
        fc.string({ unit: fc.constantFrom(...likely), minLength: Math.max(0, rule.minLength - 2), maxLength: rule.minLength + 2 }),
        fc.string({ unit: fc.constantFrom(...likely), minLength: rule.maxLength - 3, maxLength: rule.maxLength + 3 }),
      ),
      async (value) => {
        await agrees(value);
      },
    ),
    { seed: options.seed, numRuns: options.numRuns },
  );
}

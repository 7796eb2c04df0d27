/**
 * The deployment docs/audit.md ("Roles") describes, run for real: a deploy job migrates the
 * audit schema as an owner role, the ledger service logs in as a role that is only a member of
 * the writer role (AUDIT_MIGRATIONS=check), and its sequencer as a login of its own, a member of
 * the sequencer's role. The service works and its trail verifies, and the service's login can
 * neither change nor delete the log's records, tiles, tree or checkpoints, nor switch off the
 * triggers that guard them, nor give itself the right to; nor delete queued entries, move the
 * sequencer's cursor, append at the log's end, or release a hold without a record: the database
 * refuses every attempt.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { AUDIT_SEQUENCER_ROLE, AUDIT_WRITER_ROLE, AuditLoginPrivilegedError, auditMigrationNames, AuditSchemaCheckError, checkAuditMigrations, prepareAuditSchema } from '@ledgerline/audit';
import { logAlteringPowerSql } from '../../../packages/audit/src/migrate.ts';
import { runCli } from '../../../packages/audit/src/cli.ts';
import { newId } from '@ledgerline/ledger';
import { migrateEvents } from '@ledgerline/events';
import { ADMIN_DATABASE_URL, createTestDatabase, freePort, withClient, type TestDatabase } from '@ledgerline/testing';

const MAIN = fileURLToPath(new URL('../src/main.ts', import.meta.url));
const TAG = randomBytes(4).toString('hex');
const OWNER = `ll_audit_owner_${TAG}`;
const LOGIN = `ll_ledger_login_${TAG}`;
const SEQUENCER = `ll_audit_seq_${TAG}`;
/** A role that may only read, which the owner may set itself to. */
const READER = `ll_audit_reader_${TAG}`;
/**
 * How long a test waits for the sequencer to integrate what it wrote: the service's worker
 * thread (at a lower priority) must start, take the events once they are below the read
 * horizon, and sign. Under the parallel suite on two cores, beside the chaos tests' processes,
 * 20 s was once too short. As long as the audit tests' own settle (packages/audit/test/support.ts).
 */
const SEQUENCER_WAIT_MS = 60_000;

let db: TestDatabase;
let ownerUrl: string;
let loginUrl: string;
let sequencerUrl: string;
const children: ChildProcess[] = [];

function as(role: string): string {
  const url = new URL(db.url);
  url.username = role;
  url.password = '';
  return url.toString();
}

/** `fn` on a connection of its own to `url`, by default the cluster's superuser's (outside the test database). */
function connected<T>(fn: (c: pg.Client) => Promise<T>, url = ADMIN_DATABASE_URL): Promise<T> {
  return withClient(url, fn);
}

before(async () => {
  db = await createTestDatabase('ll_audit_roles');
  ownerUrl = as(OWNER);
  loginUrl = as(LOGIN);
  sequencerUrl = as(SEQUENCER);
  // What a DBA does once (docs/audit.md): the writer and sequencer roles, an owner that is not
  // a superuser and cannot create roles, the service's login, a member of the writer role only,
  // and the sequencer's login, a member of the sequencer's role only.
  await connected(async (c) => {
    for (const role of [AUDIT_WRITER_ROLE, AUDIT_SEQUENCER_ROLE]) {
      await c.query(`DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '${role}') THEN CREATE ROLE ${role} NOLOGIN; END IF;
      EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$`);
    }
    await c.query(`CREATE ROLE ${OWNER} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB`);
    await c.query(`CREATE ROLE ${LOGIN} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB IN ROLE ${AUDIT_WRITER_ROLE}`);
    await c.query(`CREATE ROLE ${SEQUENCER} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB IN ROLE ${AUDIT_SEQUENCER_ROLE}`);
    await c.query(`CREATE ROLE ${READER} NOLOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB`);
    await c.query(`GRANT ${READER} TO ${OWNER}`);
    // Each creates its own schemas: the owner `audit`, the login the ledger's, the runtime's and the event store's.
    await c.query(`GRANT CREATE ON DATABASE ${db.name} TO ${OWNER}, ${LOGIN}`);
  });
});

after(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  try {
    await db?.drop();
  } finally {
    // The database held everything the two roles owned or were granted; its drop took that along.
    await connected(async (c) => {
      await c.query(`DROP ROLE IF EXISTS ${LOGIN}`);
      await c.query(`DROP ROLE IF EXISTS ${SEQUENCER}`);
      await c.query(`DROP ROLE IF EXISTS ${OWNER}`);
      await c.query(`DROP ROLE IF EXISTS ${READER}`);
    });
  }
});

interface Started {
  child: ChildProcess;
  port: number;
  stderr: () => string;
  /** The service's log (pino writes to stdout). */
  log: () => string;
  exited: Promise<number | null>;
}

function startService(port: number, env: Record<string, string> = {}): Started {
  let stderr = '';
  const child = spawn(process.execPath, [MAIN], {
    env: {
      ...process.env,
      PORT: String(port),
      DATABASE_URL: loginUrl,
      DATABASE_SESSION_URL: '',
      AUDIT_MIGRATIONS: 'check',
      AUDIT_SEQUENCER_DATABASE_URL: sequencerUrl,
      LEDGER_AUTH: 'disabled',
      EVENTS_RELAY_ENABLED: 'false',
      AUDIT_SEQUENCER_INTERVAL_MS: '50',
      AUDIT_CHECKPOINT_INTERVAL_MS: '50',
      LOG_LEVEL: 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let log = '';
  child.stdout?.on('data', (d: Buffer) => {
    log += d.toString();
  });
  child.stderr?.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, port, stderr: () => stderr, log: () => log, exited };
}

async function ready(s: Started): Promise<void> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    assert.equal(s.child.exitCode, null, `the service exited during start: ${s.stderr()}`);
    try {
      if ((await fetch(`http://127.0.0.1:${s.port}/ready`)).status === 200) return;
    } catch {
      // not listening yet
    }
    assert.ok(Date.now() < deadline, 'the service did not become ready within 20 s');
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function post(port: number, path: string, body: unknown): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  await res.arrayBuffer();
  return res.status;
}

/** The SQLSTATE a statement fails with, run as `role`; null if it succeeded (then rolled back). */
async function refusal(url: string, sql: string): Promise<string | null> {
  return withClient(url, async (c) => {
    try {
      await c.query('BEGIN');
      await c.query(sql);
      return null;
    } catch (error) {
      return String((error as { code?: unknown }).code);
    } finally {
      await c.query('ROLLBACK').catch(() => {});
    }
  });
}

describe('the audit schema owned by a deploy role, the service on a writer login', () => {
  test('before the owner migrated the schema, the service refuses to start and says what to run', async () => {
    await connected((c) => c.query('DROP SCHEMA IF EXISTS audit CASCADE'), db.url);
    const s = startService(await freePort());
    const code = await s.exited;
    assert.equal(code, 2, s.stderr());
    assert.match(s.stderr(), /no audit schema; run `npm run audit -- migrate` as its owner/);
  });

  test('migrated by the owner, the service runs, audits, and its login cannot alter the log', async () => {
    const lines: string[] = [];
    const exit = await runCli(['migrate', '--database-url', ownerUrl], { stdout: (l) => lines.push(l), stderr: (l) => lines.push(l), env: {} });
    assert.equal(exit, 0, lines.join('\n'));
    const owners = await connected(
      (c) => c.query<{ owner: string; n: string }>(`SELECT tableowner AS owner, count(*)::text AS n FROM pg_tables WHERE schemaname = 'audit' GROUP BY tableowner`),
      db.url,
    );
    assert.deepEqual(owners.rows.map((r) => r.owner), [OWNER], 'every audit table belongs to the owner');

    const s = startService(await freePort());
    await ready(s);
    const [a, b] = [newId(), newId()];
    assert.equal(await post(s.port, '/v1/accounts', { id: a, ledger: 'USD', code: 1 }), 201);
    assert.equal(await post(s.port, '/v1/accounts', { id: b, ledger: 'USD', code: 1 }), 201);
    assert.equal(await post(s.port, '/v1/transfers', { id: newId(), debit_account_id: a, credit_account_id: b, amount: '125', ledger: 'USD', code: 1 }), 201);

    // The sequencer, on the login, integrates the three events and signs a checkpoint over them.
    const login = new pg.Client({ connectionString: loginUrl });
    await login.connect();
    try {
      const deadline = Date.now() + SEQUENCER_WAIT_MS;
      for (;;) {
        const r = await login.query<{ leaves: string; size: string }>(
          `SELECT (SELECT coalesce(sum(leaf_count), 0) FROM audit.event_leaves)::text AS leaves,
                  (SELECT coalesce(max(tree_size), 0) FROM audit.checkpoints)::text AS size`,
        );
        const row = r.rows[0];
        if (row !== undefined && Number(row.leaves) >= 3 && Number(row.size) >= Number(row.leaves)) break;
        assert.ok(Date.now() < deadline, `the sequencer did not integrate the events: ${JSON.stringify(row)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      const owned = await login.query<{ n: string }>(`SELECT count(*)::text AS n FROM pg_tables WHERE schemaname = 'audit' AND tableowner = current_user`);
      assert.equal(owned.rows[0]?.n, '0', 'the login owns no audit table');
    } finally {
      await login.end();
    }

    // What the owner could do, the login may not: 42501, insufficient privilege, every time.
    const attempts = [
      'UPDATE audit.event_leaves SET integrated_at = integrated_at',
      'DELETE FROM audit.checkpoints',
      'DELETE FROM audit.tree_nodes',
      'TRUNCATE audit.records',
      'ALTER TABLE audit.event_leaves DISABLE TRIGGER ALL',
      'DROP TRIGGER event_leaves_append_only ON audit.event_leaves',
      'ALTER TABLE audit.checkpoints OWNER TO CURRENT_USER',
      'DROP TABLE audit.checkpoints',
      `CREATE OR REPLACE FUNCTION audit.reject_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$`,
      `SET ROLE ${OWNER}`,
      // The sequencer's part (migration 1769300000000): none of it is the service's.
      'DELETE FROM audit.queue',
      'SELECT count(*) FROM audit.queue',
      "UPDATE audit.sequencer_state SET event_position = event_position + 1000",
      'INSERT INTO audit.event_leaves SELECT * FROM audit.event_leaves LIMIT 1',
      'INSERT INTO audit.tree_nodes SELECT * FROM audit.tree_nodes LIMIT 1',
      'INSERT INTO audit.checkpoints SELECT * FROM audit.checkpoints LIMIT 1',
      "INSERT INTO audit.subject_keys (subject, key) VALUES ('s-1', sha256('k'::bytea))",
      "UPDATE audit.legal_holds SET released_at = now(), released_by = 'x'",
      `SET ROLE ${AUDIT_SEQUENCER_ROLE}`,
    ];
    for (const sql of attempts) assert.equal(await refusal(loginUrl, sql), '42501', `as the login: ${sql}`);
    // Nor may the sequencer's login change what is stored, take the service's part, or switch a guard off.
    const sequencerAttempts = [
      'UPDATE audit.event_leaves SET integrated_at = integrated_at',
      'DELETE FROM audit.checkpoints',
      'TRUNCATE audit.records',
      'ALTER TABLE audit.event_leaves DISABLE TRIGGER ALL',
      "INSERT INTO audit.queue (entry) VALUES ('{}')",
      'DELETE FROM events.events',
      `SET ROLE ${AUDIT_WRITER_ROLE}`,
    ];
    for (const sql of sequencerAttempts) assert.equal(await refusal(sequencerUrl, sql), '42501', `as the sequencer's login: ${sql}`);

    // A hold is released only through audit.release_hold, which records the release, naming the
    // database login, in the same transaction: found in the trail once the sequencer ran.
    const cli = async (...args: string[]): Promise<string[]> => {
      const lines: string[] = [];
      const code = await runCli([...args, '--database-url', loginUrl], { stdout: (l) => lines.push(l), stderr: () => {}, env: {} });
      assert.equal(code, 0, `${args.join(' ')}: ${lines.join('\n')}`);
      return lines;
    };
    const [holdId] = await cli('hold', 'place', '--resource-type', 'account', '--resource-id', a, '--reason', 'litigation', '--as', 'user:counsel');
    assert.ok(holdId !== undefined);
    assert.deepEqual(await cli('hold', 'release', '--id', holdId, '--as', 'user:counsel'), ['released']);
    const deadline = Date.now() + SEQUENCER_WAIT_MS;
    let releases: Array<{ actor: { id: string }; outcome: string; resource: { id: string }; payload: unknown }> = [];
    while (releases.length === 0) {
      releases = (await cli('search', '--action', 'audit.hold.release', '--as', 'user:auditor')).map((l) => JSON.parse(l) as (typeof releases)[number]);
      assert.ok(releases.length > 0 || Date.now() < deadline, `the release was not integrated within ${SEQUENCER_WAIT_MS / 1000} s`);
      if (releases.length === 0) await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual(
      releases.map((r) => [r.actor.id, r.outcome, r.resource.id, r.payload]),
      [['user:counsel', 'success', holdId, { databaseLogin: LOGIN }]],
    );
    const held = await connected((c) => c.query<{ by: string }>('SELECT released_by AS by FROM audit.legal_holds WHERE id = $1 AND released_at IS NOT NULL', [holdId]), db.url);
    assert.deepEqual(held.rows, [{ by: 'user:counsel' }]);
    // GRANT by a role without grant options warns and grants nothing.
    const granted = await connected(async (c) => {
      await c.query(`GRANT UPDATE, DELETE ON audit.checkpoints TO ${LOGIN}`).catch(() => {});
      return (await c.query<{ u: boolean; d: boolean }>(`SELECT has_table_privilege('audit.checkpoints', 'UPDATE') AS u, has_table_privilege('audit.checkpoints', 'DELETE') AS d`)).rows[0];
    }, loginUrl);
    assert.deepEqual(granted, { u: false, d: false });
    // The premise: the owner could have switched the guard off (rolled back here).
    assert.equal(await refusal(ownerUrl, 'ALTER TABLE audit.event_leaves DISABLE TRIGGER ALL'), null, 'the owner may');

    // The trail the service wrote verifies, read with the login's rights.
    const out: string[] = [];
    const verified = await runCli(['verify', '--database-url', loginUrl], { stdout: (l) => out.push(l), stderr: (l) => out.push(l), env: {} });
    assert.equal(verified, 0, out.join('\n'));
    assert.match(out.join('\n'), /^OK: /m);

    s.child.kill('SIGTERM');
    assert.equal(await s.exited, 0, s.stderr());
    assert.doesNotMatch(s.stderr(), /"level":50/);
  });

  test('check mode refuses a login that could alter the log: the tables\' owner, or a superuser', async () => {
    assert.equal(await runCli(['migrate', '--database-url', ownerUrl], { stdout: () => {}, stderr: () => {}, env: {} }), 0);
    // (The services catch AuditSchemaCheckError, of which this is one, and exit 2 with its message, as above.)
    await assert.rejects(checkAuditMigrations(ownerUrl), (error: unknown) => {
      assert.ok(error instanceof AuditLoginPrivilegedError, String(error));
      assert.match(error.message, new RegExp(`the login ${OWNER} could alter the log \\(an owner of the audit schema or of objects in it, or a member of one \\(${OWNER}\\)\\)`));
      return true;
    });
    await assert.rejects(checkAuditMigrations(db.url), (error: unknown) => {
      assert.ok(error instanceof AuditLoginPrivilegedError, String(error));
      assert.match(error.message, /the login postgres could alter the log \(a superuser\)/);
      return true;
    });
    // A member of the owner role may become it: refused as well.
    const member = `ll_owner_member_${TAG}`;
    await connected(async (c) => {
      await c.query(`CREATE ROLE ${member} LOGIN NOINHERIT IN ROLE ${OWNER}, ${AUDIT_WRITER_ROLE}`);
    });
    try {
      await assert.rejects(checkAuditMigrations(as(member)), AuditLoginPrivilegedError);
    } finally {
      await connected((c) => c.query(`DROP ROLE ${member}`));
    }
    // And the login that is only a writer passes.
    await checkAuditMigrations(loginUrl);

    // A writer that may write the log beyond the writer's role is refused, however it came by
    // the right: a table-wide INSERT on the queue (which names who queued a row, and so which
    // governance records the sequencer takes as the database's), INSERT on the records, a
    // TRIGGER (its function would run as the sequencer), pg_write_all_data, CREATE in the audit
    // schema, or the right to create roles. Each is granted to a writer login of its own, which
    // passes before it.
    const powers: [grant: (role: string) => string, said: RegExp][] = [
      [(r) => `GRANT INSERT ON audit.queue TO ${r}`, /could alter the log \(allowed to write audit\.queue beyond what ledgerline_audit_writer may \(a grant, a role it may become, or pg_write_all_data\)\)/],
      [(r) => `GRANT INSERT (seq) ON audit.records TO ${r}`, /\(allowed to write audit\.records beyond what ledgerline_audit_writer may/],
      [(r) => `GRANT TRIGGER ON audit.checkpoints TO ${r}`, /\(allowed to write audit\.checkpoints beyond what ledgerline_audit_writer may/],
      [(r) => `GRANT pg_write_all_data TO ${r}`, /\(allowed to write audit\.checkpoints, audit\.erased_subjects, .*audit\.tree_nodes beyond what ledgerline_audit_writer may/],
      [(r) => `GRANT CREATE ON SCHEMA audit TO ${r}`, /\(allowed to create objects in the audit schema\)/],
      [(r) => `ALTER ROLE ${r} CREATEROLE`, /\(a role that may create roles \(and so grant itself the log's\)\)/],
      // Reached by SET ROLE only: through a role it does not inherit from, or an attribute no
      // membership passes on.
      [(r) => `CREATE ROLE ${r}_bulk NOLOGIN NOINHERIT IN ROLE pg_write_all_data; GRANT ${r}_bulk TO ${r}`, /\(allowed to write audit\.checkpoints, .*audit\.tree_nodes beyond what ledgerline_audit_writer may/],
      [(r) => `CREATE ROLE ${r}_su NOLOGIN SUPERUSER; GRANT ${r}_su TO ${r}`, new RegExp('\\(a member of a superuser \\(ll_writer_power_\\d+_[0-9a-f]+_su\\)\\)')],
      [(r) => `CREATE ROLE ${r}_cr NOLOGIN CREATEROLE; GRANT ${r}_cr TO ${r}`, new RegExp('\\(a member of a role that may create roles \\(ll_writer_power_\\d+_[0-9a-f]+_cr\\)\\)')],
      // The owner of the append-only trigger's function could drop it, and every trigger with it.
      [(r) => `ALTER FUNCTION audit.reject_change() OWNER TO ${r}`, /\(an owner of the audit schema or of objects in it, or a member of one \(ll_writer_power_/],
      // The erasure the owner alone may run, which queues no record.
      [(r) => `GRANT EXECUTE ON FUNCTION audit.erase_subject(text) TO ${r}`, /\(allowed to run audit\.erase_subject\(p_subject text\), which run as their owner, beyond what ledgerline_audit_writer may\)/],
      // The server's programs and files are a way to a superuser's rights.
      [(r) => `GRANT pg_execute_server_program TO ${r}`, /\(a member of pg_execute_server_program \(the server's programs or files/],
      [(r) => `GRANT EXECUTE ON FUNCTION pg_catalog.lo_export(oid, text) TO ${r}`, /\(allowed to run lo_export \(the server's files/],
      // Replica mode fires no trigger, the guards' included; ALTER SYSTEM configures the server.
      [(r) => `GRANT SET ON PARAMETER session_replication_role TO ${r}`, /\(allowed to set session_replication_role/],
      [(r) => `GRANT ALTER SYSTEM ON PARAMETER work_mem TO ${r}`, /\(allowed to ALTER SYSTEM/],
      // The database's owner may drop it, and the log with it.
      [(r) => `ALTER DATABASE ${db.name} OWNER TO ${r}`, /\(the database's owner or a member of it \(ll_writer_power_/],
      // A foreign key to an audit table is checked as its owner, through a cast the login may write.
      [(r) => `GRANT REFERENCES (id) ON audit.queue TO ${r}`, /\(allowed to write audit\.queue beyond what ledgerline_audit_writer may/],
      // setval on the queue's sequence reorders what is queued, or stops every write.
      [(r) => `GRANT UPDATE ON SEQUENCE audit.queue_id_seq TO ${r}`, /\(allowed to write audit\.queue_id_seq beyond what ledgerline_audit_writer may/],
    ];
    for (const [i, [grant, said]] of powers.entries()) {
      const writer = `ll_writer_power_${i}_${TAG}`;
      await connected((c) => c.query(`CREATE ROLE ${writer} LOGIN IN ROLE ${AUDIT_WRITER_ROLE}`));
      try {
        await checkAuditMigrations(as(writer));
        await connected((c) => c.query(grant(writer)), db.url);
        await assert.rejects(checkAuditMigrations(as(writer)), (error: unknown) => {
          assert.ok(error instanceof AuditLoginPrivilegedError, String(error));
          assert.match(error.message, new RegExp(`the login ${writer} could alter the log`));
          assert.match(error.message, said);
          return true;
        }, grant(writer));
      } finally {
        await connected(async (c) => {
          if (grant(writer).includes('audit.reject_change')) await c.query(`ALTER FUNCTION audit.reject_change() OWNER TO ${OWNER}`);
          if (grant(writer).startsWith('ALTER DATABASE')) await c.query(`ALTER DATABASE ${db.name} OWNER TO postgres`);
          if (grant(writer).includes('ON PARAMETER')) await c.query(`REVOKE ALL ON PARAMETER session_replication_role, work_mem FROM ${writer}`);
          await c.query(`DROP OWNED BY ${writer}`);
          await c.query(`DROP ROLE ${writer}`);
          for (const suffix of ['_bulk', '_su', '_cr']) await c.query(`DROP ROLE IF EXISTS ${writer}${suffix}`);
        }, db.url);
      }
    }
    // A namesake of a server-file function, which any login with CREATE may make, is not one.
    await connected(async (c) => {
      await c.query(`CREATE SCHEMA ll_namesake_${TAG} AUTHORIZATION ${LOGIN}`);
      await c.query(`CREATE FUNCTION ll_namesake_${TAG}.pg_read_file(text) RETURNS text LANGUAGE sql AS $$ SELECT $1 $$`);
      await c.query(`ALTER FUNCTION ll_namesake_${TAG}.pg_read_file(text) OWNER TO ${LOGIN}`);
    }, db.url);
    try {
      await checkAuditMigrations(loginUrl);
      await checkAuditMigrations(sequencerUrl, 'sequencer');
    } finally {
      await connected((c) => c.query(`DROP SCHEMA ll_namesake_${TAG} CASCADE`), db.url);
    }
    // The roles a login is checked against are held to what the migrations grant them: one that
    // is itself in pg_write_all_data (here a stand-in for the writer's role, a role of this test's
    // own, so that no other test's writer is touched) excuses nothing.
    const standIn = `ll_writer_stand_in_${TAG}`;
    const plain = `ll_writer_plain_${TAG}`;
    await connected(async (c) => {
      await c.query(`CREATE ROLE ${standIn} NOLOGIN IN ROLE pg_write_all_data`);
      await c.query(`CREATE ROLE ${plain} LOGIN IN ROLE ${standIn}`);
    });
    try {
      const power = await connected(async (c) => (await c.query<{ power: string | null }>(`SELECT ${logAlteringPowerSql('me', '$1::text[]')} AS power FROM pg_catalog.pg_roles me WHERE me.rolname = $2`, [[standIn], plain])).rows[0]?.power, db.url);
      assert.equal(power, `checked against roles that hold more than the migrations grant them: ${standIn} (a member of pg_write_all_data)`);
    } finally {
      await connected(async (c) => {
        await c.query(`DROP ROLE ${plain}`);
        await c.query(`DROP ROLE ${standIn}`);
      });
    }
    // Judged by the login, not a role set on connecting: the owner's member connected as the
    // writer may SET ROLE back to itself.
    const asWriter = (url: string): string => `${url}?options=${encodeURIComponent(`-c role=${AUDIT_WRITER_ROLE}`)}`;
    await connected((c) => c.query(`GRANT ${AUDIT_WRITER_ROLE} TO ${OWNER}`));
    try {
      await assert.rejects(checkAuditMigrations(asWriter(ownerUrl)), new RegExp(`the login ${OWNER} could alter the log \\(an owner of the audit schema`));
    } finally {
      await connected((c) => c.query(`REVOKE ${AUDIT_WRITER_ROLE} FROM ${OWNER}`));
    }
    await assert.rejects(checkAuditMigrations(`${db.url}?options=${encodeURIComponent(`-c role=${AUDIT_SEQUENCER_ROLE}`)}`, 'sequencer'), /the sequencer's login postgres could alter the log \(a superuser\)/);

    // A service login that is also the sequencer's could delete queued entries and move the cursor: refused.
    const both = `ll_writer_sequencer_${TAG}`;
    await connected((c) => c.query(`CREATE ROLE ${both} LOGIN IN ROLE ${AUDIT_WRITER_ROLE}, ${AUDIT_SEQUENCER_ROLE}`));
    try {
      await assert.rejects(checkAuditMigrations(as(both)), (error: unknown) => {
        assert.ok(error instanceof AuditLoginPrivilegedError, String(error));
        assert.match(error.message, new RegExp(`the service's login ${both} is a member of ${AUDIT_SEQUENCER_ROLE}`));
        return true;
      });
    } finally {
      await connected((c) => c.query(`DROP ROLE ${both}`));
    }
    // The sequencer's login must be a member of its role, and no more than the service's may it own the log.
    await assert.rejects(checkAuditMigrations(loginUrl, 'sequencer'), (error: unknown) => {
      assert.ok(error instanceof AuditSchemaCheckError && !(error instanceof AuditLoginPrivilegedError), String(error));
      assert.match(error.message, new RegExp(`the sequencer's login ${LOGIN} is not a member of ${AUDIT_SEQUENCER_ROLE}`));
      return true;
    });
    await assert.rejects(checkAuditMigrations(ownerUrl, 'sequencer'), AuditLoginPrivilegedError);
    await checkAuditMigrations(sequencerUrl, 'sequencer');
  });

  test('check mode runs no sequencer on the service\'s login; the sequencer runs on its own, here as `audit sequence`', async () => {
    assert.equal(await runCli(['migrate', '--database-url', ownerUrl], { stdout: () => {}, stderr: () => {}, env: {} }), 0);
    // Without a login for it, the service refuses to start, and says what to set.
    const refused = startService(await freePort(), { AUDIT_SEQUENCER_DATABASE_URL: '' });
    assert.equal(await refused.exited, 2, refused.stderr());
    assert.match(refused.stderr(), /runs the sequencer on a login of its own, a member of ledgerline_audit_sequencer: set AUDIT_SEQUENCER_DATABASE_URL/);

    // With none in the service, the standalone sequencer on its own login integrates the service's events and signs.
    const s = startService(await freePort(), { AUDIT_SEQUENCER_ENABLED: 'false', AUDIT_SEQUENCER_DATABASE_URL: '' });
    await ready(s);
    const [a, b] = [newId(), newId()];
    assert.equal(await post(s.port, '/v1/accounts', { id: a, ledger: 'USD', code: 1 }), 201);
    assert.equal(await post(s.port, '/v1/accounts', { id: b, ledger: 'USD', code: 1 }), 201);
    const leaves = (): Promise<number> =>
      connected(async (c) => Number((await c.query<{ n: string }>('SELECT coalesce(sum(leaf_count), 0)::text AS n FROM audit.event_leaves')).rows[0]?.n), db.url);
    const before = await leaves();
    let stop = (): void => {};
    const lines: string[] = [];
    const running = runCli(['sequence', '--interval-ms', '50', '--checkpoint-interval-ms', '0'], {
      stdout: (l) => lines.push(l),
      stderr: (l) => lines.push(l),
      // The sequencer's own login for the log; the event store read as its owner's, the service's.
      env: { AUDIT_SEQUENCER_DATABASE_URL: sequencerUrl, DATABASE_URL: loginUrl, AUDIT_MIGRATIONS: 'check' },
      stop: new Promise<void>((resolve) => {
        stop = resolve;
      }),
    });
    assert.equal(await post(s.port, '/v1/transfers', { id: newId(), debit_account_id: a, credit_account_id: b, amount: '7', ledger: 'USD', code: 1 }), 201);
    const deadline = Date.now() + SEQUENCER_WAIT_MS;
    while ((await leaves()) < before + 3) {
      assert.ok(Date.now() < deadline, `the standalone sequencer did not integrate the events: ${lines.join('\n')}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    stop();
    assert.equal(await running, 0, lines.join('\n'));
    assert.match(lines.join('\n'), /sequencing the queue and the event store/);
    const signed = await connected(
      async (c) => (await c.query<{ n: string; size: string }>('SELECT (SELECT max(tree_size) FROM audit.checkpoints)::text AS size, audit.leaf_count()::text AS n')).rows[0],
      db.url,
    );
    assert.equal(signed?.size, signed?.n, 'the last checkpoint covers every leaf');
    const out: string[] = [];
    assert.equal(await runCli(['verify', '--database-url', loginUrl], { stdout: (l) => out.push(l), stderr: (l) => out.push(l), env: {} }), 0, out.join('\n'));
    s.child.kill('SIGTERM');
    assert.equal(await s.exited, 0, s.stderr());
  });

  test('the service\'s login cannot make its code run as the owner or as the sequencer: not through a planted type, the event store\'s table, or a search path', async () => {
    assert.equal(await runCli(['migrate', '--database-url', ownerUrl], { stdout: () => {}, stderr: () => {}, env: {} }), 0);
    const s = startService(await freePort());
    await ready(s);
    const [a, b] = [newId(), newId()];
    assert.equal(await post(s.port, '/v1/accounts', { id: a, ledger: 'USD', code: 1 }), 201);
    assert.equal(await post(s.port, '/v1/accounts', { id: b, ledger: 'USD', code: 1 }), 201);

    // A domain named `text` in the login's temporary schema, whose check raises if it ever runs
    // as anyone but the login: the governance functions (SECURITY DEFINER, run as the owner)
    // resolve their types past it.
    const by = JSON.stringify({ actor: { type: 'user', id: 'user:counsel' }, origin: { service: 'roles-test' } });
    await withClient(loginUrl, async (c) => {
      await c.query(`CREATE FUNCTION pg_temp.same_login(v pg_catalog.text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN IF current_user <> session_user THEN RAISE EXCEPTION 'ran as %', current_user; END IF; RETURN true; END $$`);
      await c.query('CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.same_login(VALUE))');
      const hold = (await c.query<{ id: string }>("SELECT id::text FROM (SELECT gen_random_uuid() AS id) h, LATERAL audit.place_hold(h.id, 'cust-x', NULL, NULL, 'r', $1::json)", [by])).rows[0]?.id;
      assert.equal((await c.query<{ r: boolean }>('SELECT audit.release_hold($1, $2::json) AS r', [hold, by])).rows[0]?.r, true);
      assert.equal((await c.query<{ r: boolean }>("SELECT audit.erase_subject('cust-x', $1::json) AS r", [by])).rows[0]?.r, false);
      assert.equal((await c.query<{ r: number }>('SELECT audit.expire_payloads(now(), 10, $1::json) AS r', [by])).rows[0]?.r, 0);
    });

    // The login owns events.events, so it may put a row-level security policy on it (forced, so
    // that it binds its owner too), whose function runs as whoever reads the table. The
    // sequencer reads it as the login, never as its own: the function runs as the login, whose
    // rights it has anyway, and cannot move the sequencer's cursor. And the login may create a
    // schema named after the sequencer's login, first in a default search path, with a function
    // that matches a call the sequencer makes more exactly than the built-in one: the
    // sequencer's connections pin their search path, so it never runs.
    const cursor = (): Promise<string | undefined> =>
      connected(async (c) => (await c.query<{ p: string }>('SELECT event_position::text AS p FROM audit.sequencer_state')).rows[0]?.p, db.url);
    const leaves = (): Promise<number> =>
      connected(async (c) => Number((await c.query<{ n: string }>('SELECT coalesce(sum(leaf_count), 0)::text AS n FROM audit.event_leaves')).rows[0]?.n), db.url);
    const events = (): Promise<number> => connected(async (c) => Number((await c.query<{ n: string }>('SELECT count(*)::text AS n FROM events.events')).rows[0]?.n), db.url);
    const settle = async (done: () => Promise<boolean>, what: string): Promise<void> => {
      const deadline = Date.now() + SEQUENCER_WAIT_MS;
      while (!(await done())) {
        assert.ok(Date.now() < deadline, what);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    const ranAs = `${SEQUENCER}.ran_as`;
    await withClient(loginUrl, async (c) => {
      await c.query(`CREATE SCHEMA ${SEQUENCER}`);
      await c.query(`GRANT USAGE ON SCHEMA ${SEQUENCER} TO PUBLIC`);
      await c.query(`CREATE TABLE ${ranAs} (who text NOT NULL, what text NOT NULL)`);
      await c.query(`GRANT INSERT ON ${ranAs} TO PUBLIC`);
      await c.query(`CREATE FUNCTION events.moved() RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO ${ranAs} VALUES (current_user, 'policy');
          BEGIN UPDATE audit.sequencer_state SET event_position = event_position + 1000000; EXCEPTION WHEN insufficient_privilege THEN NULL; END;
          RETURN true;
        END $$`);
      await c.query('ALTER TABLE events.events ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY');
      await c.query('CREATE POLICY everyone ON events.events USING (events.moved())');
      await c.query(`CREATE FUNCTION ${SEQUENCER}.hashtextextended(t text, seed integer) RETURNS bigint LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO ${ranAs} VALUES (current_user, 'search path'); RETURN pg_catalog.hashtextextended(t, seed); END $$`);
      // And an aggregate the start-up check's string_agg(name, text) would prefer to the built-in (text, text).
      await c.query(`CREATE FUNCTION ${SEQUENCER}.agg_step(acc text, v name, sep text) RETURNS text LANGUAGE sql AS $$ SELECT coalesce(acc, '') || v $$`);
      await c.query(`CREATE FUNCTION ${SEQUENCER}.agg_final(acc text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO ${ranAs} VALUES (current_user, 'search path'); RETURN acc; END $$`);
      await c.query(`CREATE AGGREGATE ${SEQUENCER}.string_agg(name, text) (SFUNC = ${SEQUENCER}.agg_step, STYPE = text, FINALFUNC = ${SEQUENCER}.agg_final)`);
    });
    await checkAuditMigrations(sequencerUrl, 'sequencer');
    assert.equal(await post(s.port, '/v1/transfers', { id: newId(), debit_account_id: a, credit_account_id: b, amount: '9', ledger: 'USD', code: 1 }), 201);
    await settle(async () => (await leaves()) === (await events()), 'the transfer\'s event was not integrated under the policy');
    const ran = await connected((c) => c.query<{ who: string; what: string }>(`SELECT DISTINCT who, what FROM ${ranAs} ORDER BY 1, 2`), db.url);
    assert.deepEqual(ran.rows, [{ who: LOGIN, what: 'policy' }], 'the planted code ran as the service\'s login only, and only the policy');
    assert.ok(BigInt((await cursor()) ?? '0') < 1_000_000n, 'the cursor never jumped');
    await withClient(loginUrl, async (c) => {
      await c.query('DROP POLICY everyone ON events.events');
      await c.query('ALTER TABLE events.events NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY');
    });
    const out: string[] = [];
    assert.equal(await runCli(['verify', '--database-url', loginUrl], { stdout: (l) => out.push(l), stderr: (l) => out.push(l), env: {} }), 0, out.join('\n'));

    // The standalone sequencer: --events with a login that cannot read the event store is refused at once.
    const refused: string[] = [];
    assert.equal(await runCli(['sequence', '--events', '--database-url', ownerUrl], { stdout: (l) => refused.push(l), stderr: (l) => refused.push(l), env: {}, stop: Promise.resolve() }), 2);
    assert.match(refused.join('\n'), /--events: the event store's login .* cannot read events\.events/);
    s.child.kill('SIGTERM');
    assert.equal(await s.exited, 0, s.stderr());
  });

  test("the owner's retention change runs none of the login's code and waits for the sequencer; the record it queues is the database's, the login's is not; the CLI reads the event store only as its owner", async () => {
    // A database of its own, where nothing in the trail refuses a financial shortening: until
    // 2026-12-07 the guard then read the event store, as the owner.
    const fresh = await createTestDatabase('ll_audit_guard');
    try {
      const asIn = (role: string): string => {
        const url = new URL(fresh.url);
        url.username = role;
        url.password = '';
        return url.toString();
      };
      await connected((c) => c.query(`GRANT CREATE ON DATABASE ${fresh.name} TO ${OWNER}, ${LOGIN}`));
      await migrateEvents(asIn(LOGIN));
      assert.equal(await runCli(['migrate', '--database-url', asIn(OWNER)], { stdout: () => {}, stderr: () => {}, env: {} }), 0);
      // The login owns the event store. It grants the owner what docs/audit.md says (SELECT on
      // the position sequence, nothing else), records an event long past any retention, and
      // attaches code that runs as whoever reads the table: a row-level security policy, an
      // extended statistics expression and an index predicate, each with a function that notes
      // who ran it and, as anyone but the login, queues a forged financial shortening.
      const forged = JSON.stringify({
        id: '0190a0a0-0000-7000-8000-00000000f0f0', occurredAt: new Date().toISOString(), recordClass: 'governance', actor: { type: 'user', id: 'db:owner' },
        action: 'audit.retention.change', outcome: 'success', origin: { service: 'postgresql' }, resource: { type: 'audit.retention_policy', id: 'financial' },
        payloadJson: '{"changedAs":"owner","recordClass":"financial","retainDaysAfter":1,"retainDaysBefore":2557}', personalJson: null,
      });
      await withClient(asIn(LOGIN), async (c) => {
        await c.query(`INSERT INTO events.events (partition, event_id, stream_type, stream_id, version, type, data, metadata, recorded_at)
                       VALUES (0, gen_random_uuid(), 'ledger.transfer', 't-1', 1, 'ledger.TransferPosted', '{}', '{}', now() - interval '3000 days')`);
        await c.query('CREATE TABLE events.trap_ran (who text NOT NULL, what text NOT NULL)');
        await c.query('GRANT INSERT ON events.trap_ran TO PUBLIC');
        await c.query(`CREATE FUNCTION events.trap(what text) RETURNS boolean LANGUAGE plpgsql AS $$
          BEGIN
            INSERT INTO events.trap_ran VALUES (current_user, what);
            IF current_user = '${LOGIN}' THEN RETURN true; END IF;
            INSERT INTO audit.queue (entry) VALUES ('${forged}');
            RETURN false;
          END $$`);
        await c.query(`CREATE FUNCTION events.folded(what text) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
          BEGIN PERFORM events.trap(what); RETURN 0; END $$`);
        // Forced, so that it binds the login too (the liveness check below).
        await c.query('ALTER TABLE events.events ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY');
        await c.query("CREATE POLICY trap ON events.events USING (events.trap('policy'))");
        await c.query("CREATE STATISTICS events.trap_stats ON ((position + events.folded('statistics'))) FROM events.events");
        await c.query("CREATE INDEX events_trap_idx ON events.events (position) WHERE events.folded('index') = 0");
        await c.query('ANALYZE events.events');
        // The traps are live: a read by the login runs them (as the login).
        await c.query('SELECT count(*) FROM events.events');
        const live = await c.query<{ what: string }>('SELECT DISTINCT what FROM events.trap_ran ORDER BY 1');
        assert.deepEqual(live.rows.map((r) => r.what), ['index', 'policy', 'statistics']);
        await c.query('DELETE FROM events.trap_ran');
      });
      // Without the grant the guard cannot tell, and refuses saying so.
      const shorten = (): Promise<unknown> => withClient(asIn(OWNER), (c) => c.query("UPDATE audit.retention_policies SET retain_days = 2000 WHERE record_class = 'financial'"));
      await assert.rejects(shorten(), /this role cannot see how far the event store has numbered its events \(events\.events_position_seq\)/);
      await withClient(asIn(LOGIN), (c) => c.query(`GRANT SELECT ON SEQUENCE events.events_position_seq TO ${OWNER}`));
      // The event is numbered but not integrated: the shortening waits for the sequencer.
      await assert.rejects(shorten(), /financial retention cannot be shortened yet: the event store has numbered events up to 1 and the sequencer has integrated up to 0/);
      // A round of the standalone sequencer (its own login; the event store read as the login's)
      // integrates it; the event is 3000 days old, so the shortening then goes through.
      const lines: string[] = [];
      const round = runCli(['sequence', '--interval-ms', '50', '--checkpoint-interval-ms', '0'], {
        stdout: (l) => lines.push(l),
        stderr: (l) => lines.push(l),
        env: { AUDIT_SEQUENCER_DATABASE_URL: asIn(SEQUENCER), DATABASE_URL: asIn(LOGIN), AUDIT_MIGRATIONS: 'check' },
        stop: (async () => {
          const deadline = Date.now() + SEQUENCER_WAIT_MS;
          for (;;) {
            const n = await withClient(fresh.url, async (c) => Number((await c.query<{ p: string }>('SELECT event_position::text AS p FROM audit.sequencer_state')).rows[0]?.p));
            if (n >= 1) return;
            assert.ok(Date.now() < deadline, `the sequencer did not integrate the event: ${lines.join('\n')}`);
            await new Promise((r) => setTimeout(r, 50));
          }
        })(),
      });
      assert.equal(await round, 0, lines.join('\n'));
      await shorten();
      await withClient(asIn(LOGIN), (c) => c.query('INSERT INTO audit.queue (entry) VALUES ($1)', [forged]));
      await withClient(fresh.url, async (c) => {
        const ran = await c.query<{ who: string; what: string }>('SELECT DISTINCT who, what FROM events.trap_ran WHERE who <> $1 ORDER BY 1, 2', [LOGIN]);
        assert.deepEqual(ran.rows, [], "the login's code ran as another role (the owner's change, or the sequencer)");
        const queued = await c.query<{ by: string; database: boolean; after: number }>(
          `SELECT queued_by::text AS by, audit.queued_by_database(queued_by) AS database, ((entry::json->>'payloadJson')::json->>'retainDaysAfter')::int AS after
             FROM audit.queue ORDER BY id`,
        );
        // The change trigger's record, queued as the owner, then the login's forgery.
        assert.deepEqual(queued.rows, [
          { by: OWNER, database: true, after: 2000 },
          { by: LOGIN, database: false, after: 1 },
        ]);
      });
      // The CLI reads the event store (verify, search, prove) only as a login that either owns
      // it or could not alter the log: as the owner, even one the login let read its tables, it
      // refuses before reading; as the login, whose own traps then run as itself, it verifies.
      // The question itself runs nothing of the login's: not an aggregate planted, to be found
      // first, in a schema named after the owner (the owner's default search path names it).
      // And the owner set to a read-only role on connecting is the owner still (planted code may
      // SET ROLE back to the login).
      await withClient(asIn(LOGIN), async (c) => {
        await c.query(`GRANT USAGE ON SCHEMA events TO ${OWNER}`);
        await c.query(`GRANT SELECT ON events.events, events.archived_events TO ${OWNER}`);
        await c.query(`CREATE SCHEMA ${OWNER}`);
        await c.query(`GRANT USAGE ON SCHEMA ${OWNER} TO PUBLIC`);
        await c.query(`CREATE FUNCTION ${OWNER}.agg_step(acc text, v name, sep text) RETURNS text LANGUAGE plpgsql AS $$
          BEGIN PERFORM events.trap('aggregate'); RETURN coalesce(acc, '') || v; END $$`);
        await c.query(`CREATE AGGREGATE ${OWNER}.string_agg(name, text) (SFUNC = ${OWNER}.agg_step, STYPE = text)`);
        await c.query(`GRANT SELECT ON events.events, events.archived_events TO ${READER}`);
        await c.query(`GRANT USAGE ON SCHEMA events TO ${READER}`);
      });
      const asReader = `${asIn(OWNER)}?options=${encodeURIComponent(`-c role=${READER}`)}`;
      for (const [args, url] of [[['verify'], asIn(OWNER)], [['search', '--as', 'user:auditor'], asIn(OWNER)], [['prove', '--seq', '0', '--as', 'user:auditor'], asIn(OWNER)], [['verify'], asReader]] as const) {
        const said: string[] = [];
        assert.equal(await runCli([...args, '--database-url', url], { stdout: (l) => said.push(l), stderr: (l) => said.push(l), env: {} }), 2, args[0]);
        assert.match(said.join('\n'), new RegExp(`logs in as ${OWNER}, an owner of the audit schema or of objects in it, or a member of one \\(${OWNER}\\), but the event store belongs to ${LOGIN}`), args[0]);
      }
      // A login that may write every table (pg_write_all_data) could forge the log's rows, so its
      // reads are refused as well.
      const bulk = `ll_bulk_writer_${TAG}`;
      await connected((c) => c.query(`CREATE ROLE ${bulk} LOGIN IN ROLE pg_write_all_data, pg_read_all_data`));
      try {
        const said: string[] = [];
        assert.equal(await runCli(['verify', '--database-url', asIn(bulk)], { stdout: (l) => said.push(l), stderr: (l) => said.push(l), env: {} }), 2, said.join('\n'));
        assert.match(said.join('\n'), new RegExp(`logs in as ${bulk}, allowed to write audit\\.checkpoints, .*audit\\.tree_nodes beyond what ${AUDIT_WRITER_ROLE} may \\(a grant, a role it may become, or pg_write_all_data\\), but the event store belongs to ${LOGIN}`));
      } finally {
        await connected((c) => c.query(`DROP ROLE ${bulk}`));
      }
      const verified: string[] = [];
      assert.equal(await runCli(['verify', '--database-url', asIn(LOGIN)], { stdout: (l) => verified.push(l), stderr: (l) => verified.push(l), env: {} }), 0, verified.join('\n'));
      const ran = await withClient(fresh.url, (c) => c.query<{ who: string }>('SELECT DISTINCT who FROM events.trap_ran ORDER BY 1'));
      assert.deepEqual(ran.rows.map((r) => r.who), [LOGIN], 'the traps ran as the login only');
    } finally {
      await fresh.drop();
    }
  });

  test('refused before anything runs: apply mode on a login that may not act as the roles, and `audit sequence` misconfigured', async () => {
    assert.equal(await runCli(['migrate', '--database-url', ownerUrl], { stdout: () => {}, stderr: () => {}, env: {} }), 0);
    // The owner migrates, but is a member of neither role: in apply mode every flush and every round would fail.
    await assert.rejects(prepareAuditSchema('apply', ownerUrl), new RegExp(`the login ${OWNER} may not act as ${AUDIT_WRITER_ROLE}.*GRANT ${AUDIT_WRITER_ROLE} TO ${OWNER}`));
    // Made a writer, it passes that check, and meets the next one when it runs the sequencer too.
    await connected((c) => c.query(`GRANT ${AUDIT_WRITER_ROLE} TO ${OWNER}`));
    try {
      await prepareAuditSchema('apply', ownerUrl);
      await assert.rejects(prepareAuditSchema('apply', ownerUrl, { enabled: true, databaseUrl: '' }), new RegExp(`the login ${OWNER} may not act as ${AUDIT_SEQUENCER_ROLE}`));
    } finally {
      await connected((c) => c.query(`REVOKE ${AUDIT_WRITER_ROLE} FROM ${OWNER}`));
    }

    const sequence = async (env: Record<string, string>): Promise<{ code: number; text: string }> => {
      const lines: string[] = [];
      const code = await runCli(['sequence', '--events'], { stdout: (l) => lines.push(l), stderr: (l) => lines.push(l), env, stop: Promise.resolve() });
      return { code, text: lines.join('\n') };
    };
    const productionKey = generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const noKek = await sequence({ NODE_ENV: 'production', AUDIT_SIGNING_KEY: productionKey, AUDIT_SEQUENCER_DATABASE_URL: sequencerUrl, DATABASE_URL: loginUrl });
    assert.deepEqual([noKek.code, /AUDIT_KEY_ENCRYPTION_KEY is required in production/.test(noKek.text)], [2, true], noKek.text);
    const badOrigin = await sequence({ AUDIT_LOG_ORIGIN: 'a log', AUDIT_SEQUENCER_DATABASE_URL: sequencerUrl, DATABASE_URL: loginUrl });
    assert.deepEqual([badOrigin.code, /AUDIT_LOG_ORIGIN must be 1\.\.200 printable ASCII characters without spaces/.test(badOrigin.text)], [2, true], badOrigin.text);
    // In check mode the event store is never read as the sequencer's own login.
    const ownLogin = await sequence({ AUDIT_MIGRATIONS: 'check', AUDIT_SEQUENCER_DATABASE_URL: sequencerUrl });
    assert.deepEqual([ownLogin.code, /reads the event store as the service's login, never the sequencer's/.test(ownLogin.text)], [2, true], ownLogin.text);
    // Nor as a login that could alter the log.
    const ownerReads = await sequence({ AUDIT_MIGRATIONS: 'check', AUDIT_SEQUENCER_DATABASE_URL: sequencerUrl, DATABASE_URL: ownerUrl });
    assert.deepEqual([ownerReads.code, new RegExp(`the login ${OWNER} could alter the log`).test(ownerReads.text)], [2, true], ownerReads.text);
  });

  test('a schema behind the code is named migration by migration', async () => {
    // Played by the superuser: one migration's row is missing, as after a deploy that shipped
    // new code before its migration ran.
    assert.equal(await runCli(['migrate', '--database-url', ownerUrl], { stdout: () => {}, stderr: () => {}, env: {} }), 0);
    const last = auditMigrationNames().at(-1) as string;
    await connected((c) => c.query('DELETE FROM audit.migrations WHERE name = $1', [last]), db.url);
    const s = startService(await freePort());
    assert.equal(await s.exited, 2, s.stderr());
    assert.match(s.stderr(), new RegExp(`1 migration\\(s\\) not applied \\(${last}\\)`));
  });
});

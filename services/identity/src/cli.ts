/**
 * The identity service's operator commands, run with the deployment's database credentials:
 *
 *   npm run identity -- create-user --username NAME --roles ROLE[,ROLE...] --as WHO
 *
 * Over HTTP an admin gives users a customer's role only (ADMIN_GRANTABLE_ROLES): a role that
 * could make a teller could move money through the account it made, and the reference system
 * has no second person to approve a grant. Staff, oversight and further admin accounts come
 * from here, where the authority is the database's own credentials, and each creation (or its
 * refusal) is recorded as the HTTP route records it (`identity.user.create`), naming the
 * operator (`--as`) and the origin `identity-cli`; the record is durable before the command
 * reports success. The password comes from IDENTITY_USER_PASSWORD, never the command line,
 * which other users of the machine and the shell's history can read.
 *
 * Exit 0 created, 1 refused (the store's reason: a conflict, an invalid role or password) or
 * the record could not be written, 2 usage.
 */
import pg from 'pg';
import { PostgresAuditSink, type AuditEntry } from '@ledgerline/audit';
import { cliStreams, describeFailure, parseCommandLine, UsageError, type CliIo } from '@ledgerline/events';
import { Identity, IdentityError } from '@ledgerline/identity';
import { AUDIT_ACTIONS } from './app.ts';

const USAGE = `usage:
  identity create-user --username NAME --roles ROLE[,ROLE...] --as WHO
       (the password from IDENTITY_USER_PASSWORD; database: DATABASE_SESSION_URL, else DATABASE_URL)
exit 0 created, 1 refused or not recorded, 2 usage`;

const OPTIONS = {
  username: { type: 'string' },
  roles: { type: 'string' },
  as: { type: 'string' },
  help: { type: 'boolean', default: false },
} as const;

/** The operator's id as a record's actor: 1..200 printable characters, as the trail takes them. */
const ACTOR_PATTERN = /^[\x21-\x7e][\x20-\x7e]{0,199}$/;

export async function runIdentityCli(argv: readonly string[], io: CliIo = {}): Promise<number> {
  const { env, out, err } = cliStreams(io);
  const parsed = parseCommandLine(argv, OPTIONS, USAGE, err);
  if (parsed === null) return 2;
  const { values: a, positionals } = parsed;
  if (a.help || positionals.join(' ') !== 'create-user') {
    (a.help ? out : err)(USAGE);
    return a.help ? 0 : 2;
  }
  let pool: pg.Pool | null = null;
  let sink: PostgresAuditSink | null = null;
  try {
    const username = a.username;
    if (username === undefined || username === '') throw new UsageError('--username is required');
    const operator = a.as;
    if (operator === undefined || !ACTOR_PATTERN.test(operator)) throw new UsageError('--as is required: who runs the command (1..200 printable characters), as its record names them');
    if (a.roles === undefined) throw new UsageError('--roles is required (comma-separated; "" for none)');
    const roles = a.roles === '' ? [] : [...new Set(a.roles.split(',').map((r) => r.trim()))];
    const password = env.IDENTITY_USER_PASSWORD;
    if (password === undefined || password === '') throw new UsageError('IDENTITY_USER_PASSWORD is required: the new user\'s password, never on the command line');
    const databaseUrl = env.DATABASE_SESSION_URL || env.DATABASE_URL;
    if (databaseUrl === undefined || databaseUrl === '') throw new UsageError('DATABASE_URL is required');

    pool = new pg.Pool({ connectionString: databaseUrl, max: 2 });
    pool.on('error', () => {});
    // The trail must be able to take the record before anything is created: an account made and
    // then unrecorded (the audit schema missing, this login not a writer) stays live unrecorded.
    // The insert the sink will make, tried and rolled back: whatever it needs (the schema, the
    // column, a trigger's rights) is needed here.
    const trial = await pool.connect();
    let writable = false;
    try {
      await trial.query('BEGIN');
      await trial.query("INSERT INTO audit.queue (entry) VALUES ('{}')");
      writable = true;
    } catch {
      writable = false;
    } finally {
      await trial.query('ROLLBACK').catch(() => {});
      trial.release();
    }
    if (!writable) {
      err('identity: the audit trail cannot take the record of this creation (no audit.queue, or this login may not insert into it): nothing was created');
      return 1;
    }
    sink = new PostgresAuditSink({ pool });
    const identity = new Identity({ pool, issuer: env.IDENTITY_ISSUER ?? 'http://127.0.0.1:3001', userAudiences: [] });
    const entry: Omit<AuditEntry, 'outcome'> = {
      recordClass: 'access',
      action: AUDIT_ACTIONS.userCreate,
      actor: { type: 'user', id: operator },
      origin: { service: 'identity-cli' },
      resource: { type: 'user', id: username.toLowerCase() },
    };
    let created: { id: string } | null = null;
    let refusal: IdentityError | null = null;
    try {
      created = await identity.createUser({ username, password, roles });
    } catch (error) {
      if (!(error instanceof IdentityError)) throw error;
      refusal = error;
    }
    sink.record(
      created === null
        ? { ...entry, outcome: 'failure', reason: refusal?.code ?? 'error', payload: { user_id: null, roles } }
        : { ...entry, outcome: 'success', payload: { user_id: created.id, roles } },
    );
    try {
      await sink.flush();
    } catch (error) {
      err(`identity: ${created === null ? 'the refusal' : `user ${username} was created (${created.id}), but its creation`} could not be recorded: ${describeFailure(error)}`);
      return 1;
    }
    if (created === null) {
      err(`identity: not created: ${refusal?.message ?? 'refused'}`);
      return 1;
    }
    out(JSON.stringify({ id: created.id, username: username.toLowerCase(), roles }));
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      err(`${error.message}\n${USAGE}`);
      return 2;
    }
    err(`identity: ${describeFailure(error)}`);
    return 1;
  } finally {
    await sink?.close().catch(() => {});
    await pool?.end().catch(() => {});
  }
}

if (import.meta.main) {
  process.exitCode = await runIdentityCli(process.argv.slice(2));
}

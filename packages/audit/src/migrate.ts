import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import pg from 'pg';
import { inTransaction } from '@ledgerline/events';

const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));

/**
 * The application's role, which every service's audit writes run as: INSERT into the queue,
 * SELECT on the log, placing holds; no UPDATE and no DELETE on any audit table (migration
 * 1769300000000).
 */
export const AUDIT_WRITER_ROLE = 'ledgerline_audit_writer';

/**
 * The sequencer's role: it alone deletes integrated queue rows, moves the event cursor, appends
 * records, tiles, tree nodes and checkpoints, and creates or re-wraps subject keys. Only the
 * sequencer's login may be a member (docs/audit.md, "Roles").
 */
export const AUDIT_SEQUENCER_ROLE = 'ledgerline_audit_sequencer';

/**
 * Brings the `audit` schema up to date. Safe to call from every instance at start: the runner
 * serialises concurrent callers with an advisory lock and applies each migration once. The
 * caller must be able to create roles (the migration creates AUDIT_WRITER_ROLE if missing).
 */
export async function migrateAudit(databaseUrl: string): Promise<void> {
  await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    schema: 'audit',
    createSchema: true,
    migrationsSchema: 'audit',
    migrationsTable: 'migrations',
    advisoryLockMode: 'wait',
    checkOrder: true,
    log: () => {},
  });
}

/**
 * The search path of every connection of the sequencer's login: by default a path starts with
 * `"$user"`, a schema named after the login, which any login with CREATE on the database (a
 * service's) may create and fill with a function or aggregate that matches a call more
 * exactly than the built-in one (`hashtextextended(text, integer)` beats `(text, bigint)`,
 * `string_agg(name, text)` beats `(text, text)`): it would run with the login's rights. Set by
 * statement (`SET`, `SET LOCAL`), not as a startup option, which a pooler may drop. Every
 * object the sequencer names is schema-qualified.
 */
export const PINNED_SEARCH_PATH = 'pg_catalog, pg_temp';

/** A client of `databaseUrl` with the search path pinned (PINNED_SEARCH_PATH): for checks of a login's rights. */
export async function pinnedClient(databaseUrl: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: databaseUrl });
  // A connection lost while in use fails the query on it; without a listener it would end the process.
  client.on('error', () => {});
  await client.connect();
  try {
    await client.query(`SET search_path = ${PINNED_SEARCH_PATH}`);
  } catch (error) {
    await client.end();
    throw error;
  }
  return client;
}

/**
 * Why a login could alter the log beyond what its job needs, as one SQL expression over `me`
 * (an alias of a `pg_catalog.pg_roles` row, the login): a phrase naming the power, or NULL when
 * it has none. `baseline` is a SQL expression (text[]) naming the roles the login's job needs
 * (AUDIT_WRITER_ROLE for a service, or for a reader of the event store; AUDIT_SEQUENCER_ROLE,
 * and the writer's, for the sequencer): what any of them may do is not counted.
 *
 * Judged over every role the login may become, not only over what it inherits: `SET ROLE`
 * reaches a role it is a member of through roles it does not inherit from, and a role's
 * attributes (SUPERUSER, CREATEROLE) are never inherited. Counted, in this order:
 *
 * - a superuser, or a member of one;
 * - a role that may create roles, or a member of one (PostgreSQL 15 lets it grant itself any
 *   role but a superuser);
 * - a way to a superuser's rights: membership in pg_execute_server_program,
 *   pg_write_server_files or pg_read_server_files, EXECUTE on the server-file functions
 *   (lo_import, lo_export, pg_read_file, pg_read_binary_file, adminpack's pg_file_*), or
 *   ALTER SYSTEM on any parameter;
 * - SET on session_replication_role (in `replica` mode no trigger fires, the log's guards
 *   included);
 * - the database's owner, or a member of it (it may drop the database, the log with it);
 * - baseline roles that hold more than the migrations grant them: a superuser, a role that may
 *   create roles, or a member of any role (pg_write_all_data, say). A privilege granted to a
 *   baseline role directly, by the schema's owner or a superuser, is taken as the deployment's
 *   definition of that role and excused;
 * - the owner of the audit schema or of anything in it (a table, a function such as the
 *   append-only trigger's, a type, a sequence), or a member of such an owner: it may drop or
 *   replace it;
 * - any write on an audit table the baseline roles may not make: INSERT or UPDATE of a column,
 *   DELETE, TRUNCATE, or TRIGGER (a trigger's function runs as whoever fires it, the
 *   sequencer), and REFERENCES (a foreign key to an audit table is checked as the table's
 *   owner, through an implicit cast the login may write), directly granted, inherited, reachable by SET ROLE, or through
 *   pg_write_all_data. A table-wide INSERT on the queue counts: it names who queued a row
 *   (`queued_by`), which the sequencer trusts for governance records;
 * - EXECUTE on an audit function that runs as its owner (SECURITY DEFINER) the baseline roles
 *   may not run: an erasure without its record, say;
 * - CREATE on the audit schema beyond the baseline: a function created there can shadow a
 *   built-in that an audit function calls, and would run as that function's owner.
 *
 * Every name is schema-qualified, but run it on a pinned connection (pinnedClient) anyway.
 */
export function logAlteringPowerSql(me: string, baseline: string): string {
  /** Some role in the baseline may do what `check` asks of the role whose oid it is given. */
  const withinBaseline = (check: (role: string) => string): string =>
    `EXISTS (SELECT 1 FROM pg_catalog.pg_roles b WHERE b.rolname = ANY (${baseline}) AND ${check('b.oid')})`;
  /** Some role the login may become may do what `check` asks, and no baseline role may. */
  const beyondBaseline = (check: (role: string) => string): string =>
    `(EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE pg_catalog.pg_has_role(${me}.oid, r.oid, 'MEMBER') AND ${check('r.oid')}) AND NOT ${withinBaseline(check)})`;
  const reachableWhere = (condition: string): string =>
    `(SELECT pg_catalog.string_agg(r.rolname::text, ', ' ORDER BY r.rolname) FROM pg_catalog.pg_roles r
       WHERE ${condition} AND r.oid <> ${me}.oid AND pg_catalog.pg_has_role(${me}.oid, r.oid, 'MEMBER'))`;
  const superuserOf = reachableWhere('r.rolsuper');
  const createRoleOf = reachableWhere('r.rolcreaterole');
  const serverOf = reachableWhere(`r.rolname IN ('pg_execute_server_program', 'pg_write_server_files', 'pg_read_server_files')`);
  /** Some role the login may become may do what `check` asks of the role whose oid it is given. */
  const reachable = (check: (role: string) => string): string =>
    `EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE pg_catalog.pg_has_role(${me}.oid, r.oid, 'MEMBER') AND ${check('r.oid')})`;
  const serverFunctions = `(SELECT pg_catalog.string_agg(DISTINCT f.proname::text, ', ') FROM pg_catalog.pg_proc f
       WHERE f.proname IN ('lo_import', 'lo_export', 'pg_read_file', 'pg_read_binary_file', 'pg_file_write', 'pg_file_rename', 'pg_file_unlink', 'pg_file_sync')
         -- The server's own, or adminpack's: a namesake anyone may create elsewhere is nothing.
         AND (f.pronamespace = 'pg_catalog'::regnamespace
              OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension x ON x.oid = d.refobjid
                          WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = f.oid AND d.deptype = 'e' AND x.extname = 'adminpack'))
         AND ${reachable((r) => `pg_catalog.has_function_privilege(${r}, f.oid, 'EXECUTE')`)})`;
  const databaseOwner = `(SELECT pg_catalog.pg_get_userbyid(d.datdba)::text FROM pg_catalog.pg_database d
       WHERE d.datname = pg_catalog.current_database() AND pg_catalog.pg_has_role(${me}.oid, d.datdba, 'MEMBER'))`;
  const baselineBeyond = `(SELECT pg_catalog.string_agg(b.rolname::text || CASE WHEN b.rolsuper OR b.rolcreaterole THEN ' (a superuser, or may create roles)' ELSE ' (a member of ' || (SELECT pg_catalog.string_agg(g.rolname::text, ', ' ORDER BY g.rolname) FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles g ON g.oid = m.roleid WHERE m.member = b.oid) || ')' END, '; ' ORDER BY b.rolname)
       FROM pg_catalog.pg_roles b
      WHERE b.rolname = ANY (${baseline}) AND (b.rolsuper OR b.rolcreaterole OR EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m WHERE m.member = b.oid)))`;
  return `CASE
    WHEN ${me}.rolsuper THEN 'a superuser'
    WHEN ${superuserOf} IS NOT NULL THEN 'a member of a superuser (' || ${superuserOf} || ')'
    WHEN ${me}.rolcreaterole THEN 'a role that may create roles (and so grant itself the log''s)'
    WHEN ${createRoleOf} IS NOT NULL THEN 'a member of a role that may create roles (' || ${createRoleOf} || ')'
    WHEN ${serverOf} IS NOT NULL THEN 'a member of ' || ${serverOf} || ' (the server''s programs or files: a way to a superuser''s rights)'
    WHEN ${serverFunctions} IS NOT NULL THEN 'allowed to run ' || ${serverFunctions} || ' (the server''s files: a way to a superuser''s rights)'
    WHEN ${reachable((r) => `pg_catalog.has_parameter_privilege(${r}, 'session_replication_role', 'SET')`)}
      THEN 'allowed to set session_replication_role (replica: no trigger fires, the log''s guards included)'
    WHEN ${reachable((r) => `EXISTS (SELECT 1 FROM pg_catalog.pg_parameter_acl a WHERE pg_catalog.has_parameter_privilege(${r}, a.parname::text, 'ALTER SYSTEM'))`)}
      THEN 'allowed to ALTER SYSTEM (the server''s configuration: a way to a superuser''s rights)'
    WHEN ${databaseOwner} IS NOT NULL THEN 'the database''s owner or a member of it (' || ${databaseOwner} || '; it may drop the database, the log with it)'
    WHEN ${baselineBeyond} IS NOT NULL THEN 'checked against roles that hold more than the migrations grant them: ' || ${baselineBeyond}
    ELSE (SELECT CASE
      WHEN owned.owners IS NOT NULL THEN 'an owner of the audit schema or of objects in it, or a member of one (' || owned.owners || ')'
      WHEN written.tables IS NOT NULL
        THEN 'allowed to write ' || written.tables || ' beyond what ' || pg_catalog.array_to_string(${baseline}, ' or ') || ' may (a grant, a role it may become, or pg_write_all_data)'
      WHEN defined.functions IS NOT NULL
        THEN 'allowed to run ' || defined.functions || ', which run as their owner, beyond what ' || pg_catalog.array_to_string(${baseline}, ' or ') || ' may'
      WHEN ${beyondBaseline((r) => `pg_catalog.has_schema_privilege(${r}, s.oid, 'CREATE')`)} THEN 'allowed to create objects in the audit schema'
    END
    FROM pg_catalog.pg_namespace s
    CROSS JOIN LATERAL (
      SELECT pg_catalog.string_agg(DISTINCT pg_catalog.pg_get_userbyid(o.owner)::text, ', ') AS owners
        FROM (SELECT s.nspowner AS owner
              UNION SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.relnamespace = s.oid
              UNION SELECT f.proowner FROM pg_catalog.pg_proc f WHERE f.pronamespace = s.oid
              UNION SELECT y.typowner FROM pg_catalog.pg_type y WHERE y.typnamespace = s.oid) o
       WHERE pg_catalog.pg_has_role(${me}.oid, o.owner, 'MEMBER')) owned
    CROSS JOIN LATERAL (
      SELECT pg_catalog.string_agg('audit.' || t.relname::text, ', ' ORDER BY t.relname) AS tables
        FROM pg_catalog.pg_class t
       WHERE t.relnamespace = s.oid AND t.relkind IN ('r', 'p', 'S')
         AND CASE WHEN t.relkind = 'S' THEN ${beyondBaseline((r) => `pg_catalog.has_sequence_privilege(${r}, t.oid, 'UPDATE')`)} ELSE (EXISTS (SELECT 1 FROM pg_catalog.unnest(ARRAY['DELETE', 'TRUNCATE', 'TRIGGER']) p (privilege)
                       WHERE ${beyondBaseline((r) => `pg_catalog.has_table_privilege(${r}, t.oid, p.privilege)`)})
           OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a CROSS JOIN pg_catalog.unnest(ARRAY['INSERT', 'UPDATE', 'REFERENCES']) p (privilege)
                       WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
                         AND ${beyondBaseline((r) => `pg_catalog.has_column_privilege(${r}, t.oid, a.attnum, p.privilege)`)})) END) written
    CROSS JOIN LATERAL (
      SELECT pg_catalog.string_agg(DISTINCT 'audit.' || f.proname::text || '(' || pg_catalog.pg_get_function_identity_arguments(f.oid) || ')', ', ') AS functions
        FROM pg_catalog.pg_proc f
       WHERE f.pronamespace = s.oid AND f.prosecdef
         AND ${beyondBaseline((r) => `pg_catalog.has_function_privilege(${r}, f.oid, 'EXECUTE')`)}) defined
   WHERE s.nspname = 'audit')
  END`;
}

/** The audit migrations this code expects, by name (the file name without `.sql`), in order. */
export function auditMigrationNames(): string[] {
  return readdirSync(MIGRATIONS_DIR)
    .filter((f) => f.endsWith('.sql'))
    .map((f) => f.slice(0, -'.sql'.length))
    .sort();
}

/** AUDIT_MIGRATIONS=check refused the start: the schema or the login is not what check mode needs. */
export class AuditSchemaCheckError extends Error {
  override readonly name: string = 'AuditSchemaCheckError';
}

/** The audit schema is not what this code expects, and the service may not change it. */
export class AuditSchemaBehindError extends AuditSchemaCheckError {
  override readonly name = 'AuditSchemaBehindError';
  /** Migrations not applied, in order; empty when which ones could not be read. */
  readonly pending: readonly string[];

  constructor(message: string, pending: readonly string[], options?: ErrorOptions) {
    super(message, options);
    this.pending = pending;
  }
}

/**
 * The login could alter the log: it is a superuser, or it owns (or may become, by membership)
 * the owner of an audit table. Check mode exists so that the service's login cannot; a login
 * that can would make it a promise the database does not keep.
 */
export class AuditLoginPrivilegedError extends AuditSchemaCheckError {
  override readonly name = 'AuditLoginPrivilegedError';
}

/** Which of the trail's logins a check holds to account: a service's, or its sequencer's. */
export type AuditLogin = 'service' | 'sequencer';

/**
 * For a service whose login may not change the audit schema (`AUDIT_MIGRATIONS=check`): a
 * deploy job applies the migrations as the schema's owner (`npm run audit -- migrate`), and the
 * service only checks, before it starts, that every migration its code expects is applied.
 * Throws AuditSchemaBehindError, naming what is missing, otherwise. Needs no more than the
 * writer role's privileges. It also refuses a login that could alter the log anyway
 * (AuditLoginPrivilegedError; `logAlteringPowerSql` says what counts): a superuser, a role that
 * may create roles, the owner of an audit table or a member of it (as after a deployment that
 * ran in `apply` mode with this login), or one that may write audit tables beyond its role
 * (a direct grant, pg_write_all_data).
 *
 * `login` says whose login this is. A service's (the default) may not be a member of
 * AUDIT_SEQUENCER_ROLE either: it could then delete queued entries, move the event cursor and
 * append at the log's end. The sequencer's must be one (AuditSchemaCheckError otherwise: its
 * rounds would all fail).
 */
export async function checkAuditMigrations(databaseUrl: string, login: AuditLogin = 'service'): Promise<void> {
  const expected = auditMigrationNames();
  const client = await pinnedClient(databaseUrl);
  let applied: Set<string>;
  try {
    const own = login === 'service' ? AUDIT_WRITER_ROLE : AUDIT_SEQUENCER_ROLE;
    const power = await client.query<{ login: string; superuser: boolean; power: string | null; sequencer: boolean }>(
      `SELECT me.rolname::text AS login, me.rolsuper AS superuser, ${logAlteringPowerSql('me', '$3::text[]')} AS power,
              EXISTS (SELECT 1 FROM pg_catalog.pg_roles s WHERE s.rolname = $1 AND pg_catalog.pg_has_role(me.oid, s.oid, $2)) AS sequencer
         FROM pg_catalog.pg_roles me WHERE me.rolname = session_user`,
      // Judged by the login (session_user), not the role in effect: a login connected with a
      // role set (`options=-c role=...`, or ALTER ROLE ... SET role) may SET ROLE back to itself.
      // A service's login may not even be able to become the sequencer's role (MEMBER); the
      // sequencer's must hold its rights without SET ROLE (USAGE: an INHERIT member), since a
      // round reads the queue and the tree before it switches. What each login's own role may
      // write is not counted against it ($3; a sequencer's login that could also queue entries
      // could do no more than it may anyway).
      [AUDIT_SEQUENCER_ROLE, login === 'service' ? 'MEMBER' : 'USAGE', login === 'service' ? [AUDIT_WRITER_ROLE] : [AUDIT_SEQUENCER_ROLE, AUDIT_WRITER_ROLE]],
    );
    const me = power.rows[0];
    // A service's login in the sequencer's role is named as that first (its writes beyond the
    // writer's are the sequencer's), unless it is a superuser, which is a member of every role.
    if (me !== undefined && login === 'service' && me.sequencer && !me.superuser) {
      throw new AuditLoginPrivilegedError(
        `audit: AUDIT_MIGRATIONS=check, but the service's login ${me.login} is a member of ${AUDIT_SEQUENCER_ROLE}, so it could delete queued entries, move the event cursor and append at the log's end; ` +
          `give the sequencer a login of its own (AUDIT_SEQUENCER_DATABASE_URL, docs/audit.md, "Roles")`,
      );
    }
    if (me !== undefined && me.power !== null) {
      throw new AuditLoginPrivilegedError(
        `audit: AUDIT_MIGRATIONS=check, but the ${login === 'service' ? '' : 'sequencer\'s '}login ${me.login} could alter the log (${me.power}); ` +
          `log ${login === 'service' ? 'the service' : 'the sequencer'} in as a role that is only a member of ${own} (docs/audit.md, "Roles"), or use AUDIT_MIGRATIONS=apply and rely on verification`,
      );
    }
    if (me !== undefined && login === 'sequencer' && !me.sequencer) {
      throw new AuditSchemaCheckError(
        `audit: the sequencer's login ${me.login} is not a member of ${AUDIT_SEQUENCER_ROLE} that inherits its rights, so every round would be refused; grant it that role (docs/audit.md, "Roles")`,
      );
    }
    applied = new Set((await client.query<{ name: string }>('SELECT name FROM audit.migrations')).rows.map((r) => r.name));
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    if (code !== '42P01' && code !== '3F000' && code !== '42501') throw error;
    throw new AuditSchemaBehindError(
      code === '42501'
        ? 'audit: this login may not read audit.migrations: the schema predates migration 1769200000000, or the login is not a member of ' +
            `${login === 'service' ? AUDIT_WRITER_ROLE : AUDIT_SEQUENCER_ROLE}; run \`npm run audit -- migrate\` as the schema's owner, and grant the role`
        : 'audit: the database has no audit schema; run `npm run audit -- migrate` as its owner before the service starts',
      code === '42501' ? [] : expected,
      { cause: error },
    );
  } finally {
    await client.end();
  }
  const pending = expected.filter((name) => !applied.has(name));
  if (pending.length > 0) {
    throw new AuditSchemaBehindError(
      `audit: ${pending.length} migration(s) not applied (${pending.join(', ')}); run \`npm run audit -- migrate\` as the schema's owner before the service starts`,
      pending,
    );
  }
}

/** Where a service's sequencer runs: in this process on its own login, or not here at all. */
export interface SequencerPlacement {
  /** AUDIT_SEQUENCER_ENABLED. */
  enabled: boolean;
  /** AUDIT_SEQUENCER_DATABASE_URL; empty: the service's own login. */
  databaseUrl: string;
}

/**
 * What a service does with the audit schema at start (AUDIT_MIGRATIONS): apply the migrations,
 * or only check them. In `check` mode it also checks the sequencer's login when the sequencer
 * runs in this process: it must be a login of its own (AUDIT_SEQUENCER_DATABASE_URL), a member
 * of AUDIT_SEQUENCER_ROLE, and no more; the service's login may not be one.
 */
export async function prepareAuditSchema(mode: 'apply' | 'check', databaseUrl: string, sequencer: SequencerPlacement = { enabled: false, databaseUrl: '' }): Promise<void> {
  if (mode === 'apply') {
    await migrateAudit(databaseUrl);
    // The login writes as the writer role and, running the sequencer here, as the sequencer's:
    // a login that may not is refused now, not in every flush and every round after.
    await checkMayWriteAs(databaseUrl, AUDIT_WRITER_ROLE, false);
    if (sequencer.enabled) await checkMayWriteAs(sequencer.databaseUrl === '' ? databaseUrl : sequencer.databaseUrl, AUDIT_SEQUENCER_ROLE, true);
    return;
  }
  await checkAuditMigrations(databaseUrl, 'service');
  if (!sequencer.enabled) return;
  if (sequencer.databaseUrl === '') {
    throw new AuditSchemaCheckError(
      `audit: AUDIT_MIGRATIONS=check runs the sequencer on a login of its own, a member of ${AUDIT_SEQUENCER_ROLE}: set AUDIT_SEQUENCER_DATABASE_URL, ` +
        'or set AUDIT_SEQUENCER_ENABLED=false and run `npm run audit -- sequence` elsewhere (docs/audit.md, "Roles")',
    );
  }
  await checkAuditMigrations(sequencer.databaseUrl, 'sequencer');
}

/**
 * AuditSchemaCheckError unless the login at `databaseUrl` may `SET ROLE` to `role` and, with
 * `inherit`, holds its rights without it (the sequencer reads the queue and the tree first): a
 * superuser may. On PostgreSQL 16 and later a membership may withhold SET, so that is asked too.
 */
async function checkMayWriteAs(databaseUrl: string, role: string, inherit: boolean): Promise<void> {
  const client = await pinnedClient(databaseUrl);
  try {
    const r = await client.query<{ login: string; may: boolean }>(
      `SELECT current_user AS login,
              pg_has_role(current_user, $1, $2)
              AND CASE WHEN current_setting('server_version_num')::integer >= 160000 THEN pg_has_role(current_user, $1, 'SET') ELSE true END AS may`,
      [role, inherit ? 'USAGE' : 'MEMBER'],
    );
    const me = r.rows[0];
    if (me !== undefined && !me.may) {
      throw new AuditSchemaCheckError(`audit: the login ${me.login} may not act as ${role}, which its audit writes run as; grant it: GRANT ${role} TO ${me.login} (docs/audit.md, "Roles")`);
    }
  } finally {
    await client.end();
  }
}

/** Runs `fn` in a transaction as AUDIT_WRITER_ROLE, so the database's own grants bound what it can do. */
export function asAuditWriter<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  return inTransaction(pool, async (client) => {
    await client.query(`SET LOCAL ROLE ${AUDIT_WRITER_ROLE}`);
    return fn(client);
  });
}

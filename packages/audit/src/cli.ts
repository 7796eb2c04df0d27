/**
 * Operator and auditor commands for the audit trail.
 *
 *   npm run audit:verify [-- --public-key FILE] [--checkpoint FILE]... [--json]
 *   npm run audit -- public-key
 *   npm run audit -- search --as WHO [--actor ID] [--resource-type T] [--resource-id ID] [--action A]
 *                           [--outcome success|failure] [--subject S] [--class C] [--from ISO] [--to ISO]
 *                           [--limit N] [--order asc|desc] [--after SEQ]
 *   npm run audit -- prove --seq N --as WHO [--tree-size N]   (an inclusion proof bundle, JSON)
 *   npm run audit -- prove --from M --to N                (a consistency proof bundle, JSON)
 *   npm run audit -- verify-proof --public-key FILE BUNDLE.json   (no database: the third party's check)
 *   npm run audit -- erase --subject S --as WHO
 *   npm run audit -- hold place (--subject S | --resource-type T --resource-id ID) --reason TEXT --as WHO
 *   npm run audit -- hold release --id ID --as WHO
 *   npm run audit -- hold list
 *   npm run audit -- expire --as WHO [--as-of ISO]
 *   npm run audit -- migrate   (as the schema's owner: a deploy job, with services on AUDIT_MIGRATIONS=check)
 *   npm run audit -- sequence [--events | --no-events] [--events-database-url URL] [--interval-ms N] [--batch-max N] [--checkpoint-interval-ms N]
 *                             [--previous-public-key FILE]...
 *        (the sequencer as a process of its own, on AUDIT_SEQUENCER_DATABASE_URL, until SIGTERM or SIGINT; --previous-public-key:
 *        a key the log was signed with before AUDIT_SIGNING_KEY, whose checkpoint it may find latest after a rotation)
 *
 * The database is DATABASE_SESSION_URL, else DATABASE_URL (or --database-url); the key is
 * AUDIT_SIGNING_KEY, or the development key when it is unset, unless --public-key names a PEM
 * file. Every search, proof of a record, erasure, hold and expiry is itself recorded, with
 * `--as` as the actor; a search or proof prints nothing unless its record is written, and a
 * command whose record could not be written exits 2. `expire` removes everything due, in
 * transactions of at most 10,000 payloads, and prints the total.
 * Exit codes: 0 done (verified), 1 verification or proof failed, 2 usage error or failure.
 */
import { readFileSync } from 'node:fs';
import type { KeyObject } from 'node:crypto';
import pg from 'pg';
import { cliStreams, dateOption, describeFailure, intOption, operatorDatabaseUrl, parseCommandLine, UsageError, type CliIo } from '@ledgerline/events';
import { checkpointFromJson, keyTransitionJson, verifyBundle, type InclusionBundle, type ProofBundle } from './bundle.ts';
import { DEFAULT_LOG_ORIGIN, LOG_ORIGIN_PATTERN } from './config.ts';
import { KeyEncryptionKeyError, loadSigningKey, parseKeyEncryptionKey, parsePublicKey, publicKeyPem, SigningKeyError, signKeyTransition, type Checkpoint, type CheckpointSigner, type KeyEncryptionKey } from './keys.ts';
import { ProofError } from './merkle.ts';
import { checkFields, InvalidAuditEntryError } from './record.ts';
import { AUDIT_SEQUENCER_ROLE, AUDIT_WRITER_ROLE, AuditSchemaCheckError, auditMigrationNames, checkAuditMigrations, logAlteringPowerSql, migrateAudit, pinnedClient } from './migrate.ts';
import { keyEncryptionKeyFromConfig, signerFromConfig } from './startup.ts';
import { AuditSequencer, BATCH_RECORDS_MAX_DEFAULT, CHECKPOINT_INTERVAL_MS_DEFAULT, INTERVAL_MS_DEFAULT } from './sequencer.ts';
import { namedConnection, SEQUENCER_APPLICATION_NAME } from './sequencer-worker.ts';
import { AuditStore, AuditUnrecordedError, EventStoreUnreadError, LegalHoldError, type Requester } from './store.ts';
import { verifyLog } from './verify.ts';
import { PostgresAuditSink } from './writer.ts';

/** The commands' I/O; `stop`, for `sequence`: it runs until this settles (else SIGTERM or SIGINT). */
export interface AuditCliIo extends CliIo {
  stop?: Promise<unknown>;
}

const USAGE = `usage:
  audit verify [--public-key FILE]... [--checkpoint FILE]... [--json]
  audit public-key
  audit search --as WHO [--actor ID] [--resource-type T] [--resource-id ID] [--action A] [--outcome success|failure]
               [--subject S] [--class C] [--from ISO] [--to ISO] [--limit N] [--order asc|desc] [--after SEQ]
  audit prove --seq N --as WHO [--tree-size N] | audit prove --from M --to N
  audit verify-proof --public-key FILE... BUNDLE.json
  audit erase --subject S --as WHO
  audit hold place (--subject S | --resource-type T --resource-id ID) --reason TEXT --as WHO
  audit hold release --id ID --as WHO | audit hold list
  audit expire --as WHO [--as-of ISO]
  audit kek-status
  audit migrate
  audit key-transition --previous-key FILE --as WHO [--origin O]
  audit sequence [--events | --no-events] [--events-database-url URL] [--interval-ms N] [--batch-max N] [--checkpoint-interval-ms N]
                 [--previous-public-key FILE]...
       (runs the sequencer until SIGTERM or SIGINT, signing with AUDIT_SIGNING_KEY as AUDIT_LOG_ORIGIN, on AUDIT_SEQUENCER_DATABASE_URL
       when set; it reads the event store as its owner's login, --events-database-url, else the database below; --events: tail
       the event store, refused if it cannot; neither: tail it if there is one now; --previous-public-key: a public key the log
       was signed with before AUDIT_SIGNING_KEY, after a rotation: the latest checkpoint must verify before anything is signed)
database: DATABASE_SESSION_URL, else DATABASE_URL (or --database-url); key: AUDIT_SIGNING_KEY (or --public-key FILE, repeated for every key the log
was signed with across rotations);
personal data in search results: opened with the subject keys, unwrapped with AUDIT_KEY_ENCRYPTION_KEY when they are wrapped
(during a rotation, "new,old": kek-status says when no key is left under the old one)
exit 0 done, 1 verification failed, 2 usage or failure`;

const OPTIONS = {
  'public-key': { type: 'string', multiple: true },
  checkpoint: { type: 'string', multiple: true },
  json: { type: 'boolean', default: false },
  as: { type: 'string' },
  actor: { type: 'string' },
  'resource-type': { type: 'string' },
  'resource-id': { type: 'string' },
  action: { type: 'string' },
  outcome: { type: 'string' },
  subject: { type: 'string' },
  class: { type: 'string' },
  from: { type: 'string' },
  to: { type: 'string' },
  limit: { type: 'string' },
  order: { type: 'string' },
  after: { type: 'string' },
  seq: { type: 'string' },
  'tree-size': { type: 'string' },
  reason: { type: 'string' },
  id: { type: 'string' },
  'as-of': { type: 'string' },
  'previous-key': { type: 'string' },
  'previous-public-key': { type: 'string', multiple: true },
  origin: { type: 'string' },
  'database-url': { type: 'string' },
  'interval-ms': { type: 'string' },
  'batch-max': { type: 'string' },
  'checkpoint-interval-ms': { type: 'string' },
  events: { type: 'boolean' },
  'no-events': { type: 'boolean' },
  'events-database-url': { type: 'string' },
  help: { type: 'boolean', default: false },
} as const;

const COMMANDS = ['verify', 'public-key', 'search', 'prove', 'verify-proof', 'erase', 'hold place', 'hold release', 'hold list', 'expire', 'kek-status', 'key-transition', 'migrate', 'sequence'];

function required(name: string, value: string | undefined): string {
  if (value === undefined || value === '') throw new UsageError(`--${name} is required`);
  return value;
}

/**
 * `--name VALUE` as the field `field` of the record the command makes, checked by the trail's
 * own rules (record.ts `checkFields`) before anything is done: a value the sink or the
 * sequencer would refuse (over 500 characters, a NUL, an unpaired surrogate) is a usage error.
 * Otherwise a hold would fail with a stack trace, and an erasure or an expiry (whose records the
 * database functions queue themselves) would be done with a record the sequencer rejects.
 */
function recordable(name: string, field: 'actor.id' | 'resource.type' | 'resource.id' | 'subject', value: string | undefined): string {
  const v = required(name, value);
  const fields = {
    recordClass: 'governance',
    actor: { type: 'user' as const, id: field === 'actor.id' ? v : 'audit-cli' },
    action: 'audit.cli',
    outcome: 'success' as const,
    origin: { service: 'audit-cli' },
    resource: { type: field === 'resource.type' ? v : 'audit', id: field === 'resource.id' ? v : 'audit' },
    ...(field === 'subject' ? { subject: v } : {}),
  };
  try {
    checkFields(fields);
  } catch (error) {
    if (!(error instanceof InvalidAuditEntryError)) throw error;
    throw new UsageError(`--${name} must be 1..500 characters, well-formed UTF-16 and without NUL (the audit trail records it)`);
  }
  return v;
}

/** The signing key AUDIT_SIGNING_KEY names (the development key when unset); one that is not a key is a usage error naming the variable. */
function configuredSigningKey(env: Record<string, string | undefined>): CheckpointSigner {
  try {
    return loadSigningKey(env.AUDIT_SIGNING_KEY, { production: env.NODE_ENV === 'production' });
  } catch (error) {
    if (!(error instanceof SigningKeyError)) throw error;
    throw new UsageError(`AUDIT_SIGNING_KEY ${error.message}`);
  }
}

/** A file the command was given, as text; one that cannot be read is a usage error naming it (`what` it should be). */
function inputFile(path: string, what: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (error) {
    const code = (error as { code?: unknown } | null)?.code;
    throw new UsageError(`cannot read ${path} (${what}): ${typeof code === 'string' ? code : error instanceof Error ? error.message : String(error)}`);
  }
}

/** A JSON file the command was given; one that is not JSON is a usage error naming it. */
function jsonFile(path: string, what: string): unknown {
  const text = inputFile(path, what);
  try {
    return JSON.parse(text) as unknown;
  } catch (error) {
    throw new UsageError(`${path} is not JSON (${what}): ${error instanceof Error ? error.message : String(error)}`);
  }
}

/** An Ed25519 public key from a PEM file (`--public-key`, `--previous-public-key`). */
function publicKeyFile(path: string): KeyObject {
  const pem = inputFile(path, 'the public key');
  try {
    return parsePublicKey(pem);
  } catch (error) {
    throw new UsageError(`${path} is not an Ed25519 public key in PEM: ${error instanceof Error ? error.message : String(error)}`);
  }
}

/**
 * A checkpoint held outside the log (`verify --checkpoint`), parsed as strictly as a bundle's
 * (bundle.ts `checkpointFromJson`): a file that is not one is refused, naming the field, before
 * anything is verified. Its signature is verification's to judge.
 */
function checkpointFile(path: string): Checkpoint {
  const json = jsonFile(path, 'a checkpoint: the JSON of /v1/audit/checkpoint');
  try {
    return checkpointFromJson(json, 'checkpoint');
  } catch (error) {
    if (!(error instanceof ProofError)) throw error;
    throw new UsageError(`${path} is not a checkpoint (the JSON of /v1/audit/checkpoint): ${error.message}`);
  }
}

/**
 * Runs one command; returns the exit code. A command whose own audit record could not be
 * written when the CLI closes its sink fails (exit 2), whatever it printed: searches and
 * proofs make theirs durable before they print anything (AuditStore), so for them this is
 * never a disclosure without a record.
 */
export async function runCli(argv: readonly string[], io: AuditCliIo = {}): Promise<number> {
  const closing = { recordLost: false };
  const code = await runCommand(argv, io, closing);
  return code === 0 && closing.recordLost ? 2 : code;
}

async function runCommand(argv: readonly string[], io: AuditCliIo, closing: { recordLost: boolean }): Promise<number> {
  const { env, out, err } = cliStreams(io);
  const parsed = parseCommandLine(argv, OPTIONS, USAGE, err);
  if (parsed === null) return 2;
  const { values: a, positionals } = parsed;
  const command = positionals[0] === 'verify-proof' ? 'verify-proof' : positionals.join(' ');
  if (a.help || !COMMANDS.includes(command)) {
    (a.help ? out : err)(USAGE);
    return a.help ? 0 : 2;
  }
  let pool: pg.Pool | null = null;
  let sink: PostgresAuditSink | null = null;
  try {
    const ownKey = (): KeyObject => configuredSigningKey(env).publicKey;
    // The keys to trust: every --public-key given (several across a rotation), else the configured signing key's.
    const publicKey = (): KeyObject[] => (a['public-key'] === undefined ? [ownKey()] : a['public-key'].map(publicKeyFile));
    if (command === 'public-key') {
      out(publicKeyPem(ownKey()).trimEnd());
      return 0;
    }
    if (command === 'verify-proof') {
      const file = positionals[1];
      if (file === undefined || positionals.length > 2 || a['public-key'] === undefined) throw new UsageError('verify-proof needs --public-key FILE and one bundle file');
      const bundle = jsonFile(file, 'a proof bundle') as ProofBundle;
      const keys = publicKey();
      try {
        out(`OK: ${verifyBundle(bundle, keys)}`);
        return 0;
      } catch (error) {
        if (!(error instanceof ProofError)) throw error;
        out(`FAILED: ${error.message}`);
        return 1;
      }
    }

    const sequencerUrl = command === 'sequence' && env.AUDIT_SEQUENCER_DATABASE_URL !== '' ? env.AUDIT_SEQUENCER_DATABASE_URL : undefined;
    const databaseUrl = a['database-url'] ?? sequencerUrl ?? operatorDatabaseUrl(env);
    if (databaseUrl === undefined) throw new UsageError('DATABASE_URL (or --database-url) is required');
    if (command === 'migrate') {
      // As whoever the URL names: in production the owner role that only deploy jobs use.
      await migrateAudit(databaseUrl);
      out(`audit schema up to date (${auditMigrationNames().length} migrations)`);
      return 0;
    }
    if (command === 'sequence') {
      // The event store is read as the login that owns it (the service's): --events-database-url, else DATABASE_SESSION_URL or DATABASE_URL.
      const eventsUrl = a['events-database-url'] ?? operatorDatabaseUrl(env) ?? databaseUrl;
      return await sequence({ databaseUrl, eventsUrl }, a, env, io.stop ?? untilSignalled(), out, err);
    }
    pool = new pg.Pool({ connectionString: databaseUrl, max: 3 });
    pool.on('error', () => {});
    sink = new PostgresAuditSink({ pool });
    // Searches open personal data with the subject keys, wrapped at rest under this key when set.
    const kekText = env.AUDIT_KEY_ENCRYPTION_KEY ?? '';
    let keyEncryptionKey: KeyEncryptionKey | undefined;
    try {
      keyEncryptionKey = kekText === '' ? undefined : parseKeyEncryptionKey(kekText);
    } catch (error) {
      if (!(error instanceof KeyEncryptionKeyError)) throw error;
      throw new UsageError(`AUDIT_KEY_ENCRYPTION_KEY ${error.message}`);
    }
    // These read the event store (events are leaves), as whoever runs the command.
    const readEventStore =
      command === 'verify' || command === 'search' || command === 'prove' ? await checkEventStoreReader(databaseUrl, '--database-url (else DATABASE_SESSION_URL or DATABASE_URL)') : true;
    if (!readEventStore) {
      err(`[${command}] the event store is not read: there is none, and this login could alter the log (one created meanwhile would run its owner's code with this login's rights); events are neither checked, searched nor proved`);
    }
    const store = new AuditStore({ pool, sink, service: 'audit-cli', readEventStore, ...(keyEncryptionKey === undefined ? {} : { keyEncryptionKey }) });
    const by = (): Requester => ({ actor: { type: 'user', id: recordable('as', 'actor.id', a.as) }, origin: { service: 'audit-cli' } });

    switch (command) {
      case 'key-transition': {
        // A rotation of the signing key: the outgoing key (its private PEM in a file) vouches
        // for the incoming one, AUDIT_SIGNING_KEY, that the services now sign with.
        const previousKey = required('previous-key', a['previous-key']);
        const requester = by();
        const origin = a.origin ?? (env.AUDIT_LOG_ORIGIN === undefined || env.AUDIT_LOG_ORIGIN === '' ? DEFAULT_LOG_ORIGIN : env.AUDIT_LOG_ORIGIN);
        if (!LOG_ORIGIN_PATTERN.test(origin)) {
          throw new UsageError(`${a.origin === undefined ? 'AUDIT_LOG_ORIGIN' : '--origin'} must be 1..200 printable ASCII characters without spaces (a log's origin), got ${JSON.stringify(origin)}`);
        }
        let outgoing: CheckpointSigner;
        try {
          outgoing = loadSigningKey(inputFile(previousKey, 'the previous private key'), { production: false });
        } catch (error) {
          if (!(error instanceof SigningKeyError)) throw error;
          throw new UsageError(`${previousKey} ${error.message}`);
        }
        const incoming = configuredSigningKey(env);
        if (incoming.keyId === outgoing.keyId) throw new UsageError(`${previousKey} is the key AUDIT_SIGNING_KEY names: a transition is from the previous key to a new one`);
        const transition = signKeyTransition(outgoing, origin, incoming.publicKey, new Date());
        await store.recordKeyTransition(transition, outgoing.publicKey, requester);
        out(JSON.stringify(keyTransitionJson(transition)));
        return 0;
      }
      case 'kek-status': {
        const status = await store.keyEncryptionStatus();
        out(JSON.stringify(status));
        return 0;
      }
      case 'verify': {
        const report = await verifyLog(pool, {
          publicKey: publicKey(),
          trustedCheckpoints: (a.checkpoint ?? []).map(checkpointFile),
          onProgress: (n) => err(`[verify] ${n} records`),
          readEventStore,
        });
        if (a.json) out(JSON.stringify(report));
        else {
          out(`${report.ok ? 'OK' : 'FAILED'}: ${report.records} records, ${report.checkpoints} checkpoints verified, ${report.unsignedRecords} records after the latest checkpoint`);
          for (const i of report.issues) out(`  ${i.kind}${i.seq === null ? '' : ` at seq ${i.seq}`}${i.treeSize === null ? '' : ` (checkpoint ${i.treeSize})`}: ${i.detail}`);
          if (report.issuesTruncated) out('  (more issues not shown)');
        }
        return report.ok ? 0 : 1;
      }
      case 'search': {
        const outcome = a.outcome;
        if (outcome !== undefined && outcome !== 'success' && outcome !== 'failure') throw new UsageError('--outcome must be success or failure');
        const order = a.order;
        if (order !== undefined && order !== 'asc' && order !== 'desc') throw new UsageError('--order must be asc or desc');
        const from = dateOption('from', a.from);
        const to = dateOption('to', a.to);
        const limit = intOption('limit', a.limit);
        const after = intOption('after', a.after);
        const page = await store.search(
          {
            ...(a.actor === undefined ? {} : { actorId: a.actor }),
            ...(a['resource-type'] === undefined ? {} : { resourceType: a['resource-type'] }),
            ...(a['resource-id'] === undefined ? {} : { resourceId: a['resource-id'] }),
            ...(a.action === undefined ? {} : { action: a.action }),
            ...(outcome === undefined ? {} : { outcome }),
            ...(a.subject === undefined ? {} : { subject: a.subject }),
            ...(a.class === undefined ? {} : { recordClass: a.class }),
            ...(from === undefined ? {} : { from }),
            ...(to === undefined ? {} : { to }),
          },
          { ...(limit === undefined ? {} : { limit }), ...(order === undefined ? {} : { order }), ...(after === undefined ? {} : { after }) },
          by(),
        );
        for (const r of page.records) out(JSON.stringify(r));
        err(page.nextCursor === null ? '[search] last page' : `[search] more: --after ${page.nextCursor}`);
        return 0;
      }
      case 'prove': {
        const seq = intOption('seq', a.seq);
        const [from, to] = [intOption('from', a.from), intOption('to', a.to)];
        const inclusion = async (n: number): Promise<InclusionBundle | null> => {
          try {
            return await store.inclusionBundle(n, intOption('tree-size', a['tree-size']), by());
          } catch (error) {
            if (error instanceof EventStoreUnreadError) throw new UsageError(`${error.message}: prove it as the event store's owner, or as a login that may only read`);
            throw error;
          }
        };
        const bundle =
          seq !== undefined
            ? await inclusion(seq)
            : from !== undefined && to !== undefined
              ? await store.consistencyBundle(from, to)
              : undefined;
        if (bundle === undefined) throw new UsageError('prove needs --seq N, or --from M --to N');
        if (bundle === null) throw new UsageError('no such record or checkpoint (a record is provable once a checkpoint covers it)');
        out(JSON.stringify(bundle, null, 2));
        return 0;
      }
      case 'erase': {
        // The erasure's record names the subject as its resource.
        const subject = recordable('subject', 'resource.id', a.subject);
        const erased = await store.eraseSubject(subject, by());
        out(erased ? `erased: the key of ${subject} is destroyed` : `erased: ${subject} had no key yet; what was recorded about it before now reads as erased once integrated`);
        return 0;
      }
      case 'hold place': {
        const reason = required('reason', a.reason);
        // Exactly one target: a hold on the subject alone when a resource was named too would
        // leave the resource unheld while the operator believes it held.
        const resourceNamed = a['resource-type'] !== undefined || a['resource-id'] !== undefined;
        if ((a.subject !== undefined) === resourceNamed) throw new UsageError('hold place needs --subject S, or --resource-type T and --resource-id ID, not both');
        const target =
          a.subject !== undefined
            ? { subject: recordable('subject', 'subject', a.subject) }
            : { resource: { type: recordable('resource-type', 'resource.type', a['resource-type']), id: recordable('resource-id', 'resource.id', a['resource-id']) } };
        out(await store.placeHold(target, reason, by()));
        return 0;
      }
      case 'hold release': {
        const released = await store.releaseHold(required('id', a.id), by());
        out(released ? 'released' : 'no active hold with this id');
        return released ? 0 : 2;
      }
      case 'hold list': {
        for (const h of await store.activeHolds()) out(JSON.stringify(h));
        return 0;
      }
      default: {
        // expire: everything due by the cut-off, in transactions of at most EXPIRE_BATCH_DEFAULT.
        const removed = await store.expirePayloads(dateOption('as-of', a['as-of']) ?? new Date(), by());
        out(`${removed} payload(s) removed (their hashes stay in the tree)`);
        return 0;
      }
    }
  } catch (error) {
    if (error instanceof UsageError || error instanceof RangeError || error instanceof LegalHoldError || error instanceof AuditSchemaCheckError || error instanceof AuditUnrecordedError) {
      err(`${error.message}${error instanceof UsageError || error instanceof RangeError ? `\n${USAGE}` : ''}`);
    } else {
      err(`failed: ${describeFailure(error)}`);
    }
    return 2;
  } finally {
    await sink?.close().catch((error: unknown) => {
      closing.recordLost = true;
      err(`failed to record this command in the audit trail: ${String(error)}`);
    });
    await pool?.end().catch(() => {});
  }
}

/** Settles on the first SIGTERM or SIGINT. */
function untilSignalled(): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      process.off('SIGTERM', done).off('SIGINT', done);
      resolve();
    };
    process.once('SIGTERM', done).once('SIGINT', done);
  });
}

/**
 * Refuses to read the event store as a login that could alter the log (a member of the
 * sequencer's role, or what `logAlteringPowerSql` counts beyond the writer's role: a superuser,
 * a role that may create roles, the audit tables' owner or a member of it, a login that may write
 * audit tables beyond the writer, pg_write_all_data among them) unless that login owns the event
 * store's tables itself. A table's owner decides what
 * reading it runs (a row-level security policy's function, an immutable function the planner
 * folds from an index or a statistics expression), and that code runs with the reader's
 * rights: read as the audit owner, the service's login could make its code do what the owner
 * may. Reading as the event store's owner runs only that owner's own code. Judged by the login
 * (`session_user`), not the role in effect: planted code may SET ROLE back to the login, so a
 * privileged login set to a read-only role (`options=-c role=...`) is refused too. Asked on a
 * connection of its own with the search path pinned (pinnedClient, as the start-up check is),
 * so that nothing the question calls can be shadowed by a function or aggregate someone
 * planted in a schema the login's default path names. True: read the event store. False: a
 * privileged login, and no event store yet; the login (CREATE on the database, as a service's
 * has) could create one with code on its tables after this check, so the command reads nothing
 * of it (VerifyOptions.readEventStore, AuditStore's `readEventStore`) and says so.
 */
async function checkEventStoreReader(databaseUrl: string, which: string): Promise<boolean> {
  const client = await pinnedClient(databaseUrl);
  try {
    const r = await client.query<{ login: string; present: boolean; owner: string | null; privileged: string | null }>(
      `SELECT me.rolname::text AS login,
              (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'events' AND c.relname IN ('events', 'archived_events')) OPERATOR(pg_catalog.=) 2 AS present,
              (SELECT pg_catalog.string_agg(DISTINCT pg_catalog.pg_get_userbyid(c.relowner)::text, ', ')
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'events' AND c.relname IN ('events', 'archived_events') AND c.relowner <> me.oid) AS owner,
              CASE WHEN NOT me.rolsuper AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles s WHERE s.rolname = $1 AND pg_catalog.pg_has_role(me.oid, s.oid, 'MEMBER'))
                   THEN 'a member of ${AUDIT_SEQUENCER_ROLE}'
                   ELSE ${logAlteringPowerSql('me', 'ARRAY[$2::text]')}
              END AS privileged
         FROM pg_catalog.pg_roles me WHERE me.rolname = session_user`,
      [AUDIT_SEQUENCER_ROLE, AUDIT_WRITER_ROLE],
    );
    const me = r.rows[0];
    if (me === undefined || me.privileged === null) return true;
    // Privileged, and no event store yet: the login's database rights may let it create one
    // (with code on its tables) after this check and before the reads, so nothing of it is read.
    if (!me.present && me.owner === null) return false;
    if (me.owner === null) return true;
    throw new UsageError(
      `${which} logs in as ${me.login}, ${me.privileged}, but the event store belongs to ${me.owner}: code that owner attached to its tables would run with ${me.login}'s rights when they are read. ` +
        'Read the event store as its owner (the service\'s login) or as a login that may only read (docs/audit.md, "Roles")',
    );
  } finally {
    await client.end();
  }
}

/**
 * The sequencer as a process of its own, for a deployment whose services run none
 * (AUDIT_SEQUENCER_ENABLED=false): its login and the signing key are then in no process that
 * serves requests. Runs until `stop`, then integrates what is left and signs a last checkpoint.
 * With AUDIT_MIGRATIONS=check it first checks its login as a service does (a member of the
 * sequencer's role, and no owner or superuser). A failed round is reported and retried.
 */
async function sequence(
  urls: { databaseUrl: string; eventsUrl: string },
  a: {
    'interval-ms'?: string | undefined;
    'batch-max'?: string | undefined;
    'checkpoint-interval-ms'?: string | undefined;
    events?: boolean | undefined;
    'no-events'?: boolean | undefined;
    'events-database-url'?: string | undefined;
    'previous-public-key'?: string[] | undefined;
  },
  env: Record<string, string | undefined>,
  stop: Promise<unknown>,
  out: (text: string) => void,
  err: (text: string) => void,
): Promise<number> {
  const intervalMs = intOption('interval-ms', a['interval-ms'], 1) ?? INTERVAL_MS_DEFAULT;
  const batchRecordsMax = intOption('batch-max', a['batch-max'], 1) ?? BATCH_RECORDS_MAX_DEFAULT;
  const checkpointIntervalMs = intOption('checkpoint-interval-ms', a['checkpoint-interval-ms'], 0) ?? CHECKPOINT_INTERVAL_MS_DEFAULT;
  if (a.events === true && a['no-events'] === true) throw new UsageError('--events and --no-events exclude each other');
  const previousKeys = (a['previous-public-key'] ?? []).map(publicKeyFile);
  const production = env.NODE_ENV === 'production';
  // As strict as a service's start (startup.ts): the same variables, the same refusals.
  const origin = env.AUDIT_LOG_ORIGIN === undefined || env.AUDIT_LOG_ORIGIN === '' ? DEFAULT_LOG_ORIGIN : env.AUDIT_LOG_ORIGIN;
  if (!LOG_ORIGIN_PATTERN.test(origin)) throw new UsageError(`AUDIT_LOG_ORIGIN must be 1..200 printable ASCII characters without spaces, got ${JSON.stringify(origin)}`);
  let signer: CheckpointSigner;
  let keyEncryptionKey: KeyEncryptionKey | null;
  try {
    signer = signerFromConfig(env.AUDIT_SIGNING_KEY ?? '', { production, warn: err });
  } catch (error) {
    if (!(error instanceof SigningKeyError)) throw error;
    throw new UsageError(`AUDIT_SIGNING_KEY ${error.message}`);
  }
  try {
    keyEncryptionKey = keyEncryptionKeyFromConfig(env.AUDIT_KEY_ENCRYPTION_KEY ?? '', { production, warn: err });
  } catch (error) {
    if (!(error instanceof KeyEncryptionKeyError)) throw error;
    throw new UsageError(`AUDIT_KEY_ENCRYPTION_KEY ${error.message}`);
  }
  const { databaseUrl, eventsUrl } = urls;
  if (env.AUDIT_MIGRATIONS === 'check' && a['no-events'] !== true) {
    // The event store is read as its owner's login, which must be no more than a service's:
    // planted code on the table runs as whoever reads it (SequencerOptions.eventsPool).
    if (eventsUrl === databaseUrl) {
      throw new AuditSchemaCheckError('audit: AUDIT_MIGRATIONS=check reads the event store as the service\'s login, never the sequencer\'s: give --events-database-url, DATABASE_SESSION_URL or DATABASE_URL (or --no-events)');
    }
    await checkAuditMigrations(eventsUrl, 'service');
  }
  if (env.AUDIT_MIGRATIONS === 'check') await checkAuditMigrations(databaseUrl, 'sequencer');
  const pool = new pg.Pool({ ...namedConnection(databaseUrl, SEQUENCER_APPLICATION_NAME), max: 2 });
  const eventsPool = eventsUrl === databaseUrl ? null : new pg.Pool({ ...namedConnection(eventsUrl, SEQUENCER_APPLICATION_NAME), max: 1 });
  pool.on('error', () => {});
  eventsPool?.on('error', () => {});
  try {
    // --events: the ledger's database, whose events must be integrated: refused at once if the
    // event store is not there or not readable by its login. Without either flag: tailed when it
    // is there now, which a sequencer started before the ledger's first start would miss, hence
    // the flag for deployments.
    let tailEvents = a.events === true;
    if (a['no-events'] !== true) {
      let present: boolean;
      try {
        // The archive too: the sequencer reads it with the hot table (readEventTile).
        present = (
          await (eventsPool ?? pool).query<{ ok: boolean }>(
            `SELECT to_regclass('events.events') IS NOT NULL AND to_regclass('events.archived_events') IS NOT NULL
                AND has_table_privilege('events.events', 'SELECT') AND has_table_privilege('events.archived_events', 'SELECT') AS ok`,
          )
        ).rows[0]?.ok === true;
      } catch (error) {
        if ((error as { code?: unknown }).code !== '42501') throw error;
        present = false;
      }
      if (a.events === true && !present) {
        err('--events: the event store\'s login (--events-database-url, else DATABASE_SESSION_URL or DATABASE_URL) cannot read events.events and events.archived_events: not there yet, or not its owner\'s');
        return 2;
      }
      tailEvents = present;
    }
    // False: a login that could alter the log, and the event store gone since it was found above
    // (one made again meanwhile could carry its maker's code): then it is not tailed.
    if (tailEvents && !(await checkEventStoreReader(eventsUrl, eventsPool === null ? 'the sequencer\'s login' : '--events-database-url (else DATABASE_SESSION_URL or DATABASE_URL)'))) {
      if (a.events === true) {
        err('--events: the event store is gone, and this login could alter the log: it is not read');
        return 2;
      }
      tailEvents = false;
    }
    const sequencer = new AuditSequencer({
      pool,
      ...(eventsPool === null ? {} : { eventsPool }),
      signer,
      previousKeys,
      origin,
      tailEvents,
      intervalMs,
      batchRecordsMax,
      checkpointIntervalMs,
      ...(keyEncryptionKey === null ? {} : { keyEncryptionKey }),
      onError: (error) => err(`audit: a sequencer round failed; it tries again: ${error instanceof Error ? error.message : String(error)}`),
    });
    sequencer.start();
    out(`sequencing ${tailEvents ? 'the queue and the event store' : 'the queue only (no event store)'} as ${origin} (key ${signer.keyId}); stop with SIGTERM or SIGINT`);
    await stop;
    await sequencer.close();
    out('stopped: everything queued is integrated and a last checkpoint signed');
    return 0;
  } finally {
    await Promise.allSettled([pool.end(), eventsPool?.end()]);
  }
}

if (import.meta.main) {
  process.exitCode = await runCli(process.argv.slice(2));
}

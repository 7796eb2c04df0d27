/**
 * The identity service process: configuration, migrations, the first signing key, the
 * bootstrap accounts, HTTP, graceful shutdown. `npm run start:identity` runs this file.
 */
import pg from 'pg';
import { pino } from 'pino';
import { AuditSchemaCheckError, exportSequencerRestarts, prepareAuditSchema, PostgresAuditSink, rateLimitedSummaryFromConfig, serviceKeyEncryptionKey, serviceSigner, startServiceSequencer } from '@ledgerline/audit';
import { authFailureOptionsFromConfig, LogAuditSink } from '@ledgerline/authz';
import { auditPseudonymKey, Identity, KeyEncryptionKeyError, migrateIdentity, parseKeyEncryptionKey, type KeyEncryptionKey } from '@ledgerline/identity';
import { ConfigError, databasePoolConfig, guardPool, loadConfig, resilienceFromConfig, runService, sessionDatabaseUrl } from '@ledgerline/service-runtime';
import { buildIdentityService } from './app.ts';
import { bootstrap } from './bootstrap.ts';
import { identityConfigSchema, list, type IdentityConfig } from './config.ts';

let config: IdentityConfig;
try {
  config = loadConfig(identityConfigSchema);
} catch (error) {
  if (!(error instanceof ConfigError)) throw error;
  process.stderr.write(`identity: ${error.message}\n`);
  process.exit(2);
}

const logger = pino({ level: config.LOG_LEVEL, base: { service: 'identity' } });

/** Ends the process with status 2 and a message naming the variable, before anything starts. */
function refuseConfig(variable: string, message: string): never {
  process.stderr.write(`identity: Invalid configuration: ${variable} ${message}\n`);
  process.exit(2);
}

// The key that encrypts the signing keys at rest: required in production, and checked (with
// the stored keys, below) before the service listens.
let keyEncryptionKey: KeyEncryptionKey | undefined;
if (config.IDENTITY_KEY_ENCRYPTION_KEY !== '') {
  try {
    keyEncryptionKey = parseKeyEncryptionKey(config.IDENTITY_KEY_ENCRYPTION_KEY);
  } catch (error) {
    if (!(error instanceof KeyEncryptionKeyError)) throw error;
    refuseConfig('IDENTITY_KEY_ENCRYPTION_KEY', error.message);
  }
} else if (process.env.NODE_ENV === 'production') {
  refuseConfig('IDENTITY_KEY_ENCRYPTION_KEY', 'is required in production: the private signing keys would be stored in clear');
} else {
  logger.warn('identity: IDENTITY_KEY_ENCRYPTION_KEY is unset: the private signing keys are stored in clear in the database');
}

// The checkpoint signing key is checked before anything starts, as the ledger does.
const signer = config.AUDIT_ENABLED && config.AUDIT_SEQUENCER_ENABLED ? serviceSigner('identity', config.AUDIT_SIGNING_KEY, (message) => logger.warn(message)) : null;
// The identity service reads no personal data back; its sequencer wraps the subject keys it makes.
if (signer !== null) serviceKeyEncryptionKey('identity', config.AUDIT_KEY_ENCRYPTION_KEY, (message) => logger.warn(message));

// The migrations' lock and the audit sequencer's named statement keep state in their session,
// so they use DATABASE_SESSION_URL when it is set; the requests' queries, the token issuing
// and the audit sink's inserts keep none, so DATABASE_URL may go through a pooler that pools
// transactions (README, "Behind a connection pooler").
const sessionUrl = sessionDatabaseUrl(config);
await migrateIdentity(sessionUrl);
if (config.AUDIT_ENABLED) {
  // AUDIT_MIGRATIONS=check: the schema's owner migrated it; this login only checks (docs/audit.md, "Roles").
  try {
    await prepareAuditSchema(config.AUDIT_MIGRATIONS, sessionUrl, { enabled: signer !== null, databaseUrl: config.AUDIT_SEQUENCER_DATABASE_URL });
  } catch (error) {
    if (!(error instanceof AuditSchemaCheckError)) throw error;
    process.stderr.write(`identity: ${error.message}\n`);
    process.exit(2);
  }
}
// Bounded waits (databasePoolConfig): a request waits at most DATABASE_CONNECT_TIMEOUT_MS for a
// connection and DATABASE_QUERY_TIMEOUT_MS for an answer, then answers 503 (the runtime knows
// both errors as the database being unavailable); TCP keepalive finds a dead path. Without
// them, a pool whose every connection is held, or a server that stops answering, holds every
// request behind it for ever.
const pool = new pg.Pool(databasePoolConfig(config, { connectionString: config.DATABASE_URL, max: config.DATABASE_POOL_MAX }));
// A connection lost under a checked-out client emits 'error' on it, which would end the process
// unless something listens (guardPool); the query it broke fails and its request answers 5xx.
guardPool(pool, (err) => logger.warn({ err }, 'postgres: connection error'));

const audit = config.AUDIT_ENABLED
  ? new PostgresAuditSink({
      pool,
      flushIntervalMs: config.AUDIT_FLUSH_INTERVAL_MS,
      bufferEntriesMax: config.AUDIT_BUFFER_ENTRIES_MAX,
      onError: (err) => logger.error({ err }, 'audit: writing buffered entries failed; they stay buffered and are retried'),
    })
  : null;
if (audit === null) logger.warn({ AUDIT_ENABLED: false }, 'audit: THE AUDIT TRAIL IS DISABLED: token requests and access decisions are only logged');
// Integrates the queue into the Merkle log in a worker thread and signs checkpoints. Without
// it, a deployment whose identity database no ledger shares would queue its records forever.
const sequencer =
  signer === null
    ? null
    : await startServiceSequencer({ ...config, DATABASE_URL: sessionUrl }, logger, { tailEvents: false });

const identity = new Identity({
  pool,
  issuer: config.IDENTITY_ISSUER,
  userAudiences: list(config.IDENTITY_USER_AUDIENCES),
  accessTokenTtlSeconds: config.ACCESS_TOKEN_TTL_SECONDS,
  refreshTokenTtlSeconds: config.REFRESH_TOKEN_TTL_SECONDS,
  lockout: { failuresMax: config.LOCKOUT_FAILURES_MAX, lockMs: config.LOCKOUT_MS },
  ...(keyEncryptionKey === undefined ? {} : { keyEncryptionKey }),
});
try {
  await identity.ensureSigningKey();
} catch (error) {
  if (!(error instanceof KeyEncryptionKeyError)) throw error;
  refuseConfig('IDENTITY_KEY_ENCRYPTION_KEY', `does not open the stored signing keys: ${error.message}`);
}
// Where records go: the durable trail, or only the log when AUDIT_ENABLED=false.
const auditSink = audit ?? new LogAuditSink(logger);
await bootstrap(identity, config, logger, auditSink);

// Route priorities, load shedding, rate limiting (off by default), metrics and tracing, as the
// ledger has them; the token endpoint's limit per client address is its own (IDENTITY_TOKEN_*).
const resilience = resilienceFromConfig(config, 'identity');
const app = await buildIdentityService({
  identity,
  pool,
  issuer: config.IDENTITY_ISSUER,
  audit: auditSink,
  bodyLimitBytes: config.BODY_LIMIT_BYTES,
  logger,
  resilience: resilience.options,
  tokenRateLimit: { ratePerSecond: config.IDENTITY_TOKEN_RATE_PER_SECOND, burst: config.IDENTITY_TOKEN_BURST },
  rateLimitedSummary: rateLimitedSummaryFromConfig(config),
  authFailures: authFailureOptionsFromConfig(config),
  // The audiences the trail names as sent; any other text a request gives as its audience is
  // recorded by a digest (it may be a secret typed in the wrong field).
  audiences: [...list(config.IDENTITY_USER_AUDIENCES), ...list(config.IDENTITY_BOOTSTRAP_CLIENT_AUDIENCES)],
  // Unknown usernames are named in the trail by a digest under this key, the same on every
  // instance; without a key-encryption key, by a key of this process's own.
  ...(keyEncryptionKey === undefined ? {} : { pseudonymKey: auditPseudonymKey(keyEncryptionKey) }),
});
exportSequencerRestarts(app.metrics, sequencer);
const address = await runService(app, {
  port: config.PORT,
  host: config.HOST,
  shutdownTimeoutMs: config.SHUTDOWN_TIMEOUT_MS,
  // Requests have drained; the sink writes what it buffered, the sequencer integrates it and
  // signs a last checkpoint, then the pool closes, and the rate limiter's Redis client.
  onClose: [() => audit?.close(), () => sequencer?.close(), () => pool.end(), () => resilience.close()],
});
logger.info({ address, issuer: config.IDENTITY_ISSUER }, 'identity: listening');

/**
 * The ledger service process: configuration, migrations, engine, HTTP, graceful shutdown.
 * `npm start` runs this file.
 */
import pg from 'pg';
import { pino } from 'pino';
import { EventStore, migrateEvents, relayResidencyFromEnv, ResidencyConfigError, runRelay, type RelayResidency } from '@ledgerline/events';
import { LedgerEngine, migrateLedger } from '@ledgerline/ledger';
import { AuditStore, AuditSchemaCheckError, exportSequencerRestarts, prepareAuditSchema, PostgresAuditSink, rateLimitedSummaryFromConfig, serviceKeyEncryptionKey, serviceSigner, startServiceSequencer, type CheckpointSigner, type KeyEncryptionKey } from '@ledgerline/audit';
import { authFailureOptionsFromConfig, Authorizer, LogAuditSink, REFERENCE_POLICY } from '@ledgerline/authz';
import { createTokenVerifier, remoteKeys } from '@ledgerline/identity';
import { ConfigError, databasePoolConfig, guardPool, loadConfig, migrateRuntime, resilienceFromConfig, runService, sessionDatabaseUrl } from '@ledgerline/service-runtime';
import { buildLedgerService } from './app.ts';
import type { LedgerAuthOptions } from './auth.ts';
import { ledgerConfigSchema, type LedgerConfig } from './config.ts';

let config: LedgerConfig;
try {
  config = loadConfig(ledgerConfigSchema);
} catch (error) {
  if (!(error instanceof ConfigError)) throw error;
  process.stderr.write(`ledger: ${error.message}\n`);
  process.exit(2);
}

// The relay's residency policy is checked before anything starts, like the rest of the configuration.
let relayResidency: RelayResidency | null;
try {
  relayResidency = relayResidencyFromEnv(config);
} catch (error) {
  if (!(error instanceof ResidencyConfigError)) throw error;
  process.stderr.write(`ledger: Invalid configuration: ${error.message}\n`);
  process.exit(2);
}

const logger = pino({ level: config.LOG_LEVEL, base: { service: 'ledger' } });

// The checkpoint signing key is checked before anything starts (docs/audit.md).
let signer: CheckpointSigner | null = null;
let subjectKek: KeyEncryptionKey | null = null;
if (config.AUDIT_ENABLED) {
  signer = serviceSigner('ledger', config.AUDIT_SIGNING_KEY, (message) => logger.warn(message));
  subjectKek = serviceKeyEncryptionKey('ledger', config.AUDIT_KEY_ENCRYPTION_KEY, (message) => logger.warn(message));
} else {
  logger.warn({ AUDIT_ENABLED: false }, 'audit: THE AUDIT TRAIL IS DISABLED: commands, reads and events are not audited');
}

// The migrations' lock, the relay's partition locks and the audit sequencer keep state in their
// session, so they use DATABASE_SESSION_URL when it is set: DATABASE_URL may then go through a
// pooler that pools transactions, which the engine, the appends and the requests' queries allow.
const sessionUrl = sessionDatabaseUrl(config);
await migrateLedger(sessionUrl);
await migrateRuntime(sessionUrl);
await migrateEvents(sessionUrl);
if (signer !== null) {
  // AUDIT_MIGRATIONS=check: the schema's owner migrated it; this login only checks (docs/audit.md, "Roles").
  try {
    await prepareAuditSchema(config.AUDIT_MIGRATIONS, sessionUrl, { enabled: config.AUDIT_SEQUENCER_ENABLED, databaseUrl: config.AUDIT_SEQUENCER_DATABASE_URL });
  } catch (error) {
    if (!(error instanceof AuditSchemaCheckError)) throw error;
    process.stderr.write(`ledger: ${error.message}\n`);
    process.exit(2);
  }
}
// Every wait on PostgreSQL has a client-side limit (databasePoolConfig), so a server that stops
// answering fails requests with 503s instead of hanging them and the pool's connections.
const pool = new pg.Pool(databasePoolConfig(config, { connectionString: config.DATABASE_URL, max: config.DATABASE_POOL_MAX }));
// Idle clients whose backend dies emit 'error'; the pool discards them and the next query
// opens a new connection. Log it; it must not crash the process.
guardPool(pool, (err) => logger.warn({ err }, 'postgres: connection error'));
/** The relay's: its lock holder, and a connection for each partition it publishes at once. */
const RELAY_POOL_MAX = 6;
const sessionPool = sessionUrl === config.DATABASE_URL ? pool : new pg.Pool(databasePoolConfig(config, { connectionString: sessionUrl, max: RELAY_POOL_MAX }));
if (sessionPool !== pool) guardPool(sessionPool, (err) => logger.warn({ err }, 'postgres: connection error (DATABASE_SESSION_URL)'));

const events = await EventStore.open(pool);
const engine = new LedgerEngine({
  pool,
  batchSizeMax: config.LEDGER_BATCH_SIZE_MAX,
  batchesInFlightMax: config.LEDGER_BATCHES_IN_FLIGHT_MAX,
  batchLingerMs: config.LEDGER_BATCH_LINGER_MS,
  queueTransfersMax: config.LEDGER_QUEUE_TRANSFERS_MAX,
  expiryIntervalMs: config.LEDGER_EXPIRY_INTERVAL_MS,
  onExpiryError: (err) => logger.warn({ err }, 'ledger: pending-transfer expiry failed; retrying next interval'),
  // Domain events commit with the balance changes; the relay below carries them to NATS.
  events,
});

const relay = config.EVENTS_RELAY_ENABLED
  ? runRelay({
      pool: sessionPool,
      store: events,
      natsUrl: config.NATS_URL,
      streamName: config.EVENTS_STREAM,
      subjectPrefix: config.EVENTS_SUBJECT_PREFIX,
      ...(relayResidency === null ? {} : { residency: relayResidency }),
      onConnected: () => logger.info({ nats: config.NATS_URL, brokerLocation: relayResidency?.location ?? null }, 'events: relay connected'),
      onError: (err) => logger.warn({ err }, 'events: relay failure; it retries from its checkpoint'),
    })
  : null;

// Commands and reads are buffered into audit.queue; the sequencer, in a worker thread so its
// hashing stays off the request path, integrates them and tails the event store into the
// Merkle log, signing checkpoints (docs/audit.md).
const audit =
  signer === null
    ? null
    : {
        sink: new PostgresAuditSink({
          pool,
          flushIntervalMs: config.AUDIT_FLUSH_INTERVAL_MS,
          bufferEntriesMax: config.AUDIT_BUFFER_ENTRIES_MAX,
          onError: (err) => logger.error({ err }, 'audit: writing buffered entries failed; they stay buffered and are retried'),
        }),
        sequencer: await startServiceSequencer({ ...config, DATABASE_URL: sessionUrl }, logger, { tailEvents: true }),
        publicKey: signer.publicKey,
      };

// Tokens are verified here, against the identity service's JWKS (fetched lazily and cached),
// so the ledger starts and serves whether or not the identity service is up yet.
let auth: LedgerAuthOptions | undefined;
if (config.LEDGER_AUTH === 'disabled') {
  logger.warn(
    { LEDGER_AUTH: config.LEDGER_AUTH },
    'ledger: AUTHENTICATION AND AUTHORIZATION ARE DISABLED: every request is allowed and nothing is audited as an access decision. Use only for local benchmarks.',
  );
} else {
  auth = {
    verify: createTokenVerifier({ keys: remoteKeys(config.AUTH_JWKS_URL), issuer: config.AUTH_ISSUER, audience: config.AUTH_AUDIENCE }),
    // Every decision goes to the audit trail (or to the log when the trail is disabled).
    authorizer: new Authorizer({ policy: REFERENCE_POLICY, audit: audit?.sink ?? new LogAuditSink(logger) }),
    failures: authFailureOptionsFromConfig(config),
  };
  logger.info({ jwks: config.AUTH_JWKS_URL, issuer: config.AUTH_ISSUER, audience: config.AUTH_AUDIENCE, policy: REFERENCE_POLICY.version }, 'ledger: bearer tokens required');
}

// Route priorities, load shedding, rate limiting (off by default), metrics and tracing.
const resilience = resilienceFromConfig(config, 'ledger');
const app = await buildLedgerService({
  engine,
  pool,
  logger,
  bodyLimitBytes: config.BODY_LIMIT_BYTES,
  resilience: resilience.options,
  ...(auth === undefined ? {} : { auth }),
  ...(audit === null ? {} : { audit: { sink: audit.sink, eventsAudited: true, rateLimitedSummary: rateLimitedSummaryFromConfig(config), store: { store: new AuditStore({ pool, sink: audit.sink, service: 'ledger', ...(subjectKek === null ? {} : { keyEncryptionKey: subjectKek }) }), publicKey: audit.publicKey } } }),
  // The pruner stops when the app closes, before the pool ends.
  idempotency: {
    ttlMs: config.IDEMPOTENCY_TTL_MS,
    lockTimeoutMs: config.IDEMPOTENCY_LOCK_TIMEOUT_MS,
    pruneIntervalMs: config.IDEMPOTENCY_PRUNE_INTERVAL_MS,
  },
});
if (relay !== null && app.metrics !== undefined) {
  // What this process's relay got past since it started. A withheld event is one the residency
  // policy kept from the broker: each is in events.relay_withheld, and a rise deserves a look.
  app.metrics.registerGauge('events_relay_published', "Events this process's outbox relay published since it started.", () => relay.stats()?.published ?? 0);
  app.metrics.registerGauge('events_relay_withheld', "Events this process's outbox relay withheld under the residency policy since it started (each is in events.relay_withheld).", () => relay.stats()?.withheld ?? 0);
}
exportSequencerRestarts(app.metrics, audit?.sequencer ?? null);
const address = await runService(app, {
  port: config.PORT,
  host: config.HOST,
  shutdownTimeoutMs: config.SHUTDOWN_TIMEOUT_MS,
  // Requests have drained; now the audit sink writes what it buffered, the engine finishes its
  // queued batches, the sequencer integrates what is left (events included) and signs a last
  // checkpoint, the relay stops at a checkpoint, then the pool closes.
  onClose: [
    () => audit?.sink.close(),
    () => engine.close(),
    () => audit?.sequencer?.close(),
    () => relay?.stop(),
    () => pool.end(),
    () => (sessionPool === pool ? undefined : sessionPool.end()),
    () => resilience.close(),
  ],
});
logger.info({ address }, 'ledger: listening');

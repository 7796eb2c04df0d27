/**
 * The ledger service process: configuration, migrations, engine, HTTP, graceful shutdown.
 * `npm start` runs this file.
 */
import pg from 'pg';
import { pino } from 'pino';
import { EventStore, migrateEvents, runRelay } from '@ledgerline/events';
import { LedgerEngine, migrateLedger } from '@ledgerline/ledger';
import { ConfigError, loadConfig, migrateRuntime, resilienceFromConfig, runService } from '@ledgerline/service-runtime';
import { buildLedgerService } from './app.ts';
import { ledgerConfigSchema, type LedgerConfig } from './config.ts';

let config: LedgerConfig;
try {
  config = loadConfig(ledgerConfigSchema);
} catch (error) {
  if (!(error instanceof ConfigError)) throw error;
  process.stderr.write(`ledger: ${error.message}\n`);
  process.exit(2);
}

const logger = pino({ level: config.LOG_LEVEL, base: { service: 'ledger' } });

await migrateLedger(config.DATABASE_URL);
await migrateRuntime(config.DATABASE_URL);
await migrateEvents(config.DATABASE_URL);
const pool = new pg.Pool({ connectionString: config.DATABASE_URL, max: config.DATABASE_POOL_MAX });
// Idle clients whose backend dies emit 'error'; the pool discards them and the next query
// opens a new connection. Log it; it must not crash the process.
pool.on('error', (err) => logger.warn({ err }, 'postgres: idle client error'));

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
      pool,
      store: events,
      natsUrl: config.NATS_URL,
      streamName: config.EVENTS_STREAM,
      subjectPrefix: config.EVENTS_SUBJECT_PREFIX,
      onConnected: () => logger.info({ nats: config.NATS_URL }, 'events: relay connected'),
      onError: (err) => logger.warn({ err }, 'events: relay failure; it retries from its checkpoint'),
    })
  : null;

// Route priorities, load shedding, rate limiting (off by default), metrics and tracing.
const resilience = resilienceFromConfig(config, 'ledger');
const app = await buildLedgerService({
  engine,
  pool,
  logger,
  resilience: resilience.options,
  // The pruner stops when the app closes, before the pool ends.
  idempotency: {
    ttlMs: config.IDEMPOTENCY_TTL_MS,
    lockTimeoutMs: config.IDEMPOTENCY_LOCK_TIMEOUT_MS,
    pruneIntervalMs: config.IDEMPOTENCY_PRUNE_INTERVAL_MS,
  },
});
const address = await runService(app, {
  port: config.PORT,
  host: config.HOST,
  shutdownTimeoutMs: config.SHUTDOWN_TIMEOUT_MS,
  // Requests have drained; now the engine finishes its queued batches, the relay stops at a
  // checkpoint, then the pool closes.
  onClose: [() => engine.close(), () => relay?.stop(), () => pool.end(), () => resilience.close()],
});
logger.info({ address }, 'ledger: listening');

import { Type, type Static } from 'typebox';
import { auditConfigSchema } from '@ledgerline/audit';
import { authFailureConfigSchema } from '@ledgerline/authz';
import { baseConfigSchema, idempotencyConfigSchema, resilienceConfigSchema } from '@ledgerline/service-runtime';

/** The ledger service's environment: the runtime's variables plus the engine's tuning. */
export const ledgerConfigSchema = Type.Object({
  ...baseConfigSchema.properties,
  ...idempotencyConfigSchema.properties,
  ...resilienceConfigSchema.properties,
  ...auditConfigSchema.properties,
  ...authFailureConfigSchema.properties,
  LEDGER_BATCH_SIZE_MAX: Type.Integer({ minimum: 1, maximum: 8190, default: 2000 }),
  LEDGER_BATCHES_IN_FLIGHT_MAX: Type.Integer({ minimum: 1, maximum: 16, default: 3 }),
  LEDGER_BATCH_LINGER_MS: Type.Integer({ minimum: 0, maximum: 100, default: 0 }),
  LEDGER_QUEUE_TRANSFERS_MAX: Type.Integer({ minimum: 8190, maximum: 10_000_000, default: 100_000 }),
  LEDGER_EXPIRY_INTERVAL_MS: Type.Integer({ minimum: 0, maximum: 3_600_000, default: 1000 }),
  NATS_URL: Type.String({ pattern: '^(nats|tls)://', default: 'nats://127.0.0.1:4222' }),
  EVENTS_RELAY_ENABLED: Type.Boolean({ default: true }),
  EVENTS_STREAM: Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$', default: 'LEDGERLINE_EVENTS' }),
  EVENTS_SUBJECT_PREFIX: Type.String({ pattern: '^[a-z0-9_-]+(\\.[a-z0-9_-]+)*$', default: 'ledgerline.events' }),
  // Residency for the relay: both or neither (empty: no filtering). main.ts parses them with
  // relayResidencyFromEnv, which names the variable when a value is bad.
  EVENTS_BROKER_LOCATION: Type.String({ default: '' }),
  EVENTS_RESIDENCY_POLICY: Type.String({ default: '' }),
  // Authentication is on unless this says `disabled`, which main.ts logs loudly at start.
  LEDGER_AUTH: Type.Union([Type.Literal('required'), Type.Literal('disabled')], { default: 'required' }),
  AUTH_JWKS_URL: Type.String({ pattern: '^https?://', default: 'http://127.0.0.1:3001/.well-known/jwks.json' }),
  AUTH_ISSUER: Type.String({ minLength: 1, default: 'http://127.0.0.1:3001' }),
  AUTH_AUDIENCE: Type.String({ minLength: 1, default: 'ledger' }),
});

export type LedgerConfig = Static<typeof ledgerConfigSchema>;

import { Type, type Static } from 'typebox';
import { auditConfigSchema } from '@ledgerline/audit';
import { authFailureConfigSchema } from '@ledgerline/authz';
import { baseConfigSchema, resilienceConfigSchema, type RateLimit } from '@ledgerline/service-runtime';

/**
 * The token endpoint's limit per client address when rate limiting is on: each password or
 * client-secret check costs an argon2id hash, so a client gets far fewer attempts than the
 * service default allows on the other routes. IDENTITY_TOKEN_RATE_PER_SECOND and
 * IDENTITY_TOKEN_BURST change it; their defaults are these.
 */
export const IDENTITY_TOKEN_RATE_LIMIT_DEFAULT: Readonly<RateLimit> = { ratePerSecond: 5, burst: 20 };

const LIST = '^[a-z][a-z0-9_:-]*(,[a-z][a-z0-9_:-]*)*$';

/**
 * The identity service's environment. The bootstrap variables create an admin user and a
 * service client at start when they do not exist yet, so a fresh system can issue its first
 * tokens; leave them unset in production once real accounts exist.
 */
export const identityConfigSchema = Type.Object({
  ...baseConfigSchema.properties,
  // Failed bearer tokens on the administrative routes, per client address (@ledgerline/authz).
  ...authFailureConfigSchema.properties,
  // Metrics, tracing, deadlines, load shedding and rate limiting, as the ledger has them
  // (resilienceFromConfig). RATE_LIMIT_PER_SECOND and RATE_LIMIT_BURST are the default limit
  // of the administrative routes; the token endpoint has its own, below.
  ...resilienceConfigSchema.properties,
  // Token requests and access decisions go to the audit queue, and this service runs a
  // sequencer too, so they get their place in the log whether or not a ledger shares the
  // database. Sharing one, both sequencers take turns (an advisory lock) on one log: give them
  // the same AUDIT_LOG_ORIGIN and AUDIT_SIGNING_KEY.
  AUDIT_ENABLED: auditConfigSchema.properties.AUDIT_ENABLED,
  AUDIT_MIGRATIONS: auditConfigSchema.properties.AUDIT_MIGRATIONS,
  AUDIT_FLUSH_INTERVAL_MS: auditConfigSchema.properties.AUDIT_FLUSH_INTERVAL_MS,
  AUDIT_BUFFER_ENTRIES_MAX: auditConfigSchema.properties.AUDIT_BUFFER_ENTRIES_MAX,
  AUDIT_SIGNING_KEY: auditConfigSchema.properties.AUDIT_SIGNING_KEY,
  AUDIT_PREVIOUS_PUBLIC_KEYS: auditConfigSchema.properties.AUDIT_PREVIOUS_PUBLIC_KEYS,
  AUDIT_KEY_ENCRYPTION_KEY: auditConfigSchema.properties.AUDIT_KEY_ENCRYPTION_KEY,
  AUDIT_LOG_ORIGIN: auditConfigSchema.properties.AUDIT_LOG_ORIGIN,
  AUDIT_SEQUENCER_ENABLED: auditConfigSchema.properties.AUDIT_SEQUENCER_ENABLED,
  AUDIT_SEQUENCER_DATABASE_URL: auditConfigSchema.properties.AUDIT_SEQUENCER_DATABASE_URL,
  AUDIT_SEQUENCER_INTERVAL_MS: auditConfigSchema.properties.AUDIT_SEQUENCER_INTERVAL_MS,
  AUDIT_SEQUENCER_BATCH_MAX: auditConfigSchema.properties.AUDIT_SEQUENCER_BATCH_MAX,
  AUDIT_SEQUENCER_NICE: auditConfigSchema.properties.AUDIT_SEQUENCER_NICE,
  AUDIT_CHECKPOINT_INTERVAL_MS: auditConfigSchema.properties.AUDIT_CHECKPOINT_INTERVAL_MS,
  AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS: auditConfigSchema.properties.AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS,
  AUDIT_RATE_LIMITED_SUMMARY_KEYS_MAX: auditConfigSchema.properties.AUDIT_RATE_LIMITED_SUMMARY_KEYS_MAX,
  AUDIT_RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX: auditConfigSchema.properties.AUDIT_RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX,
  PORT: Type.Integer({ minimum: 1, maximum: 65_535, default: 3001 }),
  // Token requests are small: the base default (1 MiB) would only let a client make the
  // service buffer more. Kept equal to IDENTITY_BODY_LIMIT_BYTES_DEFAULT (app.ts).
  BODY_LIMIT_BYTES: Type.Integer({ minimum: 1024, maximum: 64 * 1024 * 1024, default: 65_536 }),
  IDENTITY_ISSUER: Type.String({ pattern: '^https?://', default: 'http://127.0.0.1:3001' }),
  IDENTITY_USER_AUDIENCES: Type.String({ pattern: LIST, default: 'ledger,identity' }),
  // 32 random bytes (base64url) that encrypt the private signing keys at rest; required in
  // production (NODE_ENV=production). Keep it outside the database, as in a secret store.
  IDENTITY_KEY_ENCRYPTION_KEY: Type.String({ default: '' }),
  ACCESS_TOKEN_TTL_SECONDS: Type.Integer({ minimum: 30, maximum: 3600, default: 300 }),
  REFRESH_TOKEN_TTL_SECONDS: Type.Integer({ minimum: 300, maximum: 30 * 86_400, default: 28_800 }),
  LOCKOUT_FAILURES_MAX: Type.Integer({ minimum: 3, maximum: 100, default: 5 }),
  LOCKOUT_MS: Type.Integer({ minimum: 1000, maximum: 86_400_000, default: 900_000 }),
  // The token endpoint's own limit per client address, when RATE_LIMIT_ENABLED: each password
  // or client-secret check costs an argon2id hash (19 MiB, tens of ms of CPU), so far fewer
  // requests than the service default are allowed (IDENTITY_TOKEN_RATE_LIMIT_DEFAULT).
  IDENTITY_TOKEN_RATE_PER_SECOND: Type.Number({ exclusiveMinimum: 0, maximum: 1_000_000, default: IDENTITY_TOKEN_RATE_LIMIT_DEFAULT.ratePerSecond }),
  IDENTITY_TOKEN_BURST: Type.Integer({ minimum: 1, maximum: 1_000_000, default: IDENTITY_TOKEN_RATE_LIMIT_DEFAULT.burst }),
  IDENTITY_BOOTSTRAP_ADMIN_USERNAME: Type.Optional(Type.String({ pattern: '^[a-z0-9._@-]{3,64}$' })),
  IDENTITY_BOOTSTRAP_ADMIN_PASSWORD: Type.Optional(Type.String({ minLength: 12, maxLength: 256 })),
  IDENTITY_BOOTSTRAP_CLIENT_ID: Type.Optional(Type.String({ pattern: '^[a-z0-9._-]{3,64}$' })),
  IDENTITY_BOOTSTRAP_CLIENT_SECRET: Type.Optional(Type.String({ minLength: 12, maxLength: 256 })),
  IDENTITY_BOOTSTRAP_CLIENT_ROLES: Type.String({ pattern: LIST, default: 'svc:payments' }),
  IDENTITY_BOOTSTRAP_CLIENT_AUDIENCES: Type.String({ pattern: LIST, default: 'ledger' }),
});

export type IdentityConfig = Static<typeof identityConfigSchema>;

export function list(value: string): string[] {
  return value.split(',');
}

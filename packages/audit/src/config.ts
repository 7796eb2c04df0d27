/**
 * The audit trail's environment variables, for services to spread into their schema:
 * `Type.Object({ ...baseConfigSchema.properties, ...auditConfigSchema.properties })`.
 */
import { Type } from 'typebox';
import { RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX_DEFAULT, RATE_LIMITED_SUMMARY_INTERVAL_MS_DEFAULT, RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT, type RateLimitedSummarySettings } from './rate-limited.ts';
import { BATCH_RECORDS_MAX_DEFAULT, INTERVAL_MS_DEFAULT } from './sequencer.ts';
import { SEQUENCER_NICE_DEFAULT } from './sequencer-worker.ts';

/** The ledger service's log name, in every checkpoint. */
export const DEFAULT_LOG_ORIGIN = 'ledgerline/ledger';
/** What a log name may be: 1..200 printable ASCII characters, no spaces. */
export const LOG_ORIGIN_PATTERN = /^[\x21-\x7e]{1,200}$/;

export const auditConfigSchema = Type.Object({
  AUDIT_ENABLED: Type.Boolean({ default: true }),
  /**
   * `apply`: the service brings the audit schema up to date at start, as its own login, which
   * then owns the tables. `check`: it only checks that every migration is applied, and refuses
   * to start otherwise; a deploy job applies them as an owner role the services never log in
   * as (`npm run audit -- migrate`), so the service's login cannot alter the log (docs/audit.md, "Roles").
   */
  AUDIT_MIGRATIONS: Type.Enum(['apply', 'check'], { default: 'apply' }),
  /** PKCS#8 PEM Ed25519 private key (literal `\n` accepted). Empty: the public development key, refused when NODE_ENV=production. */
  AUDIT_SIGNING_KEY: Type.String({ default: '' }),
  /**
   * After a rotation of AUDIT_SIGNING_KEY: the earlier keys' public keys (SPKI PEM, one or more
   * blocks, literal `\n` accepted), so that the sequencer can check the latest checkpoint an
   * earlier key signed before it signs over it. Empty: only checkpoints of AUDIT_SIGNING_KEY,
   * or of keys a trusted key led to through a signed transition, are trusted.
   */
  AUDIT_PREVIOUS_PUBLIC_KEYS: Type.String({ default: '' }),
  /** 32 random bytes (base64url) that wrap the subject keys at rest. Empty: stored in clear, refused when NODE_ENV=production. */
  AUDIT_KEY_ENCRYPTION_KEY: Type.String({ default: '' }),
  /** Names the log in every checkpoint. */
  AUDIT_LOG_ORIGIN: Type.String({ pattern: LOG_ORIGIN_PATTERN.source, default: DEFAULT_LOG_ORIGIN }),
  AUDIT_FLUSH_INTERVAL_MS: Type.Integer({ minimum: 0, maximum: 1000, default: 5 }),
  AUDIT_BUFFER_ENTRIES_MAX: Type.Integer({ minimum: 1000, maximum: 10_000_000, default: 100_000 }),
  /** Run the sequencer in this process (any number of instances may: an advisory lock picks one per round). */
  AUDIT_SEQUENCER_ENABLED: Type.Boolean({ default: true }),
  /**
   * The sequencer's own login, a member of `ledgerline_audit_sequencer` and of nothing that owns
   * the log. Empty: the service's login (`apply` mode only; `check` mode refuses to start without
   * it while the sequencer runs here, docs/audit.md "Roles").
   */
  AUDIT_SEQUENCER_DATABASE_URL: Type.String({ default: '' }),
  AUDIT_SEQUENCER_INTERVAL_MS: Type.Integer({ minimum: 1, maximum: 60_000, default: INTERVAL_MS_DEFAULT }),
  /** At most this many records a round; a full round is followed at once by the next (sequencer.ts). */
  AUDIT_SEQUENCER_BATCH_MAX: Type.Integer({ minimum: 1, maximum: 50_000, default: BATCH_RECORDS_MAX_DEFAULT }),
  /** The sequencer thread's nice value on Linux (sequencer-worker.ts); 0 leaves it at the process's priority. */
  AUDIT_SEQUENCER_NICE: Type.Integer({ minimum: 0, maximum: 19, default: SEQUENCER_NICE_DEFAULT }),
  AUDIT_CHECKPOINT_INTERVAL_MS: Type.Integer({ minimum: 0, maximum: 3_600_000, default: 1000 }),
  /**
   * The summaries of rate-limited requests (rate-limited.ts, docs/audit.md "Rate-limited
   * requests are summarised"): how often they are written (the refusals of the last interval
   * are lost if the process is killed, and a summary, dated by its last refusal, spans up to an
   * interval: at most a minute), how many are held at once before the overflow record, and how
   * many one bucket and route get before its catch-all.
   */
  AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS: Type.Integer({ minimum: 100, maximum: 60_000, default: RATE_LIMITED_SUMMARY_INTERVAL_MS_DEFAULT }),
  AUDIT_RATE_LIMITED_SUMMARY_KEYS_MAX: Type.Integer({ minimum: 1, maximum: 1_000_000, default: RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT }),
  AUDIT_RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX: Type.Integer({ minimum: 1, maximum: 10_000, default: RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX_DEFAULT }),
});

/** The rate-limited summaries' settings (`auditHttp`'s and the identity service's `rateLimitedSummary`) from a service's configuration. */
export function rateLimitedSummaryFromConfig(config: {
  AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS: number;
  AUDIT_RATE_LIMITED_SUMMARY_KEYS_MAX: number;
  AUDIT_RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX: number;
}): RateLimitedSummarySettings {
  return {
    intervalMs: config.AUDIT_RATE_LIMITED_SUMMARY_INTERVAL_MS,
    keysMax: config.AUDIT_RATE_LIMITED_SUMMARY_KEYS_MAX,
    perClientMax: config.AUDIT_RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX,
  };
}

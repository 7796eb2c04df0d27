/**
 * What a service's `main` needs to start its part of the audit trail, shared so that every
 * service checks the signing key the same way (docs/audit.md).
 */
import type { Static } from 'typebox';
import type { ServiceMetrics } from '@ledgerline/service-runtime';
import type { auditConfigSchema } from './config.ts';
import { KeyEncryptionKeyError, loadSigningKey, parseKeyEncryptionKey, parsePublicKey, SigningKeyError, type CheckpointSigner, type KeyEncryptionKey } from './keys.ts';
import { startSequencerWorker, type SequencerWorker } from './sequencer-worker.ts';

/**
 * The checkpoint signer from `AUDIT_SIGNING_KEY`: unset outside production, the public
 * development key, with a warning. Throws SigningKeyError on a bad key, or none in production.
 * Services and `audit sequence` check it alike.
 */
export function signerFromConfig(pem: string, options: { production: boolean; warn: (message: string) => void }): CheckpointSigner {
  const signer = loadSigningKey(pem, { production: options.production });
  if (signer.development) options.warn('audit: AUDIT_SIGNING_KEY is unset: checkpoints are signed with the public DEVELOPMENT key, which anyone can forge with');
  return signer;
}

/**
 * The key that wraps the subject keys at rest, from `AUDIT_KEY_ENCRYPTION_KEY` (keys.ts). Unset
 * outside production: none, with a warning (the subject keys sit in clear beside the personal
 * data they protect). Throws KeyEncryptionKeyError on a malformed key, or none in production.
 */
export function keyEncryptionKeyFromConfig(text: string, options: { production: boolean; warn: (message: string) => void }): KeyEncryptionKey | null {
  if (text === '') {
    if (options.production) throw new KeyEncryptionKeyError('is required in production: the subject keys would be stored in clear beside the personal data they protect');
    options.warn('audit: AUDIT_KEY_ENCRYPTION_KEY is unset: the subject keys are stored in clear, so the database alone opens the personal data they protect');
    return null;
  }
  return parseKeyEncryptionKey(text);
}

/**
 * signerFromConfig for a service's start: a bad key, or none in production (`NODE_ENV=production`),
 * ends the process with status 2 and a message naming the variable, before anything starts.
 */
export function serviceSigner(service: string, pem: string, warn: (message: string) => void): CheckpointSigner {
  try {
    return signerFromConfig(pem, { production: process.env.NODE_ENV === 'production', warn });
  } catch (error) {
    if (!(error instanceof SigningKeyError)) throw error;
    process.stderr.write(`${service}: Invalid configuration: AUDIT_SIGNING_KEY ${error.message}\n`);
    process.exit(2);
  }
}

/** keyEncryptionKeyFromConfig for a service's start: a refusal ends the process with status 2, naming the variable. */
export function serviceKeyEncryptionKey(service: string, text: string, warn: (message: string) => void): KeyEncryptionKey | null {
  try {
    return keyEncryptionKeyFromConfig(text, { production: process.env.NODE_ENV === 'production', warn });
  } catch (error) {
    if (!(error instanceof KeyEncryptionKeyError)) throw error;
    process.stderr.write(`${service}: Invalid configuration: AUDIT_KEY_ENCRYPTION_KEY ${error.message}\n`);
    process.exit(2);
  }
}

/** The part of a service's configuration the sequencer worker reads (config.ts). */
export type ServiceSequencerConfig = Pick<
  Static<typeof auditConfigSchema>,
  | 'AUDIT_SIGNING_KEY'
  | 'AUDIT_PREVIOUS_PUBLIC_KEYS'
  | 'AUDIT_KEY_ENCRYPTION_KEY'
  | 'AUDIT_LOG_ORIGIN'
  | 'AUDIT_SEQUENCER_ENABLED'
  | 'AUDIT_SEQUENCER_DATABASE_URL'
  | 'AUDIT_SEQUENCER_INTERVAL_MS'
  | 'AUDIT_SEQUENCER_BATCH_MAX'
  | 'AUDIT_SEQUENCER_NICE'
  | 'AUDIT_CHECKPOINT_INTERVAL_MS'
> & { DATABASE_URL: string };

/**
 * Starts the service's sequencer worker as configured, or none when AUDIT_SEQUENCER_ENABLED is
 * false (another instance or process integrates the queue). It logs in as
 * AUDIT_SEQUENCER_DATABASE_URL, else as `DATABASE_URL`, and reads the event store as
 * `DATABASE_URL`. Failed rounds (retried from storage)
 * are logged as errors, the rest as warnings. `tailEvents`: the service's event store feeds the
 * trail (the ledger's does; the identity service has none).
 */
export function startServiceSequencer(
  config: ServiceSequencerConfig,
  log: { error: (fields: { err: string }, message: string) => void; warn: (message: string) => void },
  options: { tailEvents: boolean },
): Promise<SequencerWorker | null> {
  if (!config.AUDIT_SEQUENCER_ENABLED) return Promise.resolve(null);
  // Checked here, so that a key that does not parse stops the service at start, not its sequencer later.
  const previousPublicKeysPem = previousPublicKeyPems(config.AUDIT_PREVIOUS_PUBLIC_KEYS);
  for (const pem of previousPublicKeysPem) parsePublicKey(pem);
  return startSequencerWorker(
    {
      databaseUrl: config.AUDIT_SEQUENCER_DATABASE_URL === '' ? config.DATABASE_URL : config.AUDIT_SEQUENCER_DATABASE_URL,
      // The event store is read as the service's login, which owns it (SequencerOptions.eventsPool).
      eventsDatabaseUrl: config.DATABASE_URL,
      signingKeyPem: config.AUDIT_SIGNING_KEY,
      ...(previousPublicKeysPem.length === 0 ? {} : { previousPublicKeysPem }),
      production: process.env.NODE_ENV === 'production',
      origin: config.AUDIT_LOG_ORIGIN,
      tailEvents: options.tailEvents,
      keyEncryptionKey: config.AUDIT_KEY_ENCRYPTION_KEY,
      intervalMs: config.AUDIT_SEQUENCER_INTERVAL_MS,
      batchRecordsMax: config.AUDIT_SEQUENCER_BATCH_MAX,
      nice: config.AUDIT_SEQUENCER_NICE,
      checkpointIntervalMs: config.AUDIT_CHECKPOINT_INTERVAL_MS,
    },
    {
      // A failed round (retried from storage) or a worker that died (started again).
      onError: (message) => log.error({ err: message }, 'audit: the sequencer failed; it tries again'),
      onWarning: (message) => log.warn(`audit: ${message}`),
    },
  );
}

/**
 * Counts the service's replaced sequencer threads on its /metrics as
 * `ledgerline_audit_sequencer_restarts_total`, and its rounds refused because the stored tree
 * no longer matches the latest checkpoint as `ledgerline_audit_tree_mismatches_total`
 * (docs/audit.md): a rise in either deserves an alert, the first a thread that died, the
 * second a trail that integrates nothing until its storage is repaired. Nothing when metrics
 * are off or no sequencer runs here.
 */
export function exportSequencerRestarts(metrics: Pick<ServiceMetrics, 'registerCounterFromTotal'> | undefined, sequencer: SequencerWorker | null): void {
  if (metrics === undefined || sequencer === null) return;
  metrics.registerCounterFromTotal('audit_sequencer_restarts_total', 'Audit sequencer worker threads that died and were replaced since this process started.', () => sequencer.restarts());
  metrics.registerCounterFromTotal(
    'audit_tree_mismatches_total',
    'Audit sequencer rounds refused because the stored tree does not give the latest checkpoint\'s root; nothing is integrated or signed until storage is repaired.',
    () => sequencer.treeMismatches(),
  );
}

const PUBLIC_KEY_PEM = /-----BEGIN PUBLIC KEY-----[^-]+-----END PUBLIC KEY-----/g;

/**
 * The PEM blocks of AUDIT_PREVIOUS_PUBLIC_KEYS (literal `\n` read as line breaks, as for the
 * signing key). Text that holds no block, or anything beside its blocks, is refused.
 */
export function previousPublicKeyPems(value: string): string[] {
  const text = value.replaceAll('\\n', '\n').trim();
  if (text === '') return [];
  const blocks = text.match(PUBLIC_KEY_PEM) ?? [];
  if (blocks.length === 0 || text.replace(PUBLIC_KEY_PEM, '').trim() !== '') {
    throw new SigningKeyError('AUDIT_PREVIOUS_PUBLIC_KEYS must be one or more SPKI PEM public keys (-----BEGIN PUBLIC KEY-----)');
  }
  return blocks;
}

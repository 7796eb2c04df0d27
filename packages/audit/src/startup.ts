/**
 * What a service's `main` needs to start its part of the audit trail, shared so that every
 * service checks the signing key the same way (docs/audit.md).
 */
import { KeyEncryptionKeyError, loadSigningKey, parseKeyEncryptionKey, SigningKeyError, type CheckpointSigner, type KeyEncryptionKey } from './keys.ts';

/**
 * The checkpoint signer from `AUDIT_SIGNING_KEY`. Unset outside production, the public
 * development key, with a warning; a bad key, or none in production (`NODE_ENV=production`),
 * ends the process with status 2 and a message naming the variable, before anything starts.
 */
export function serviceSigner(service: string, pem: string, warn: (message: string) => void): CheckpointSigner {
  try {
    const signer = loadSigningKey(pem, { production: process.env.NODE_ENV === 'production' });
    if (signer.development) warn('audit: AUDIT_SIGNING_KEY is unset: checkpoints are signed with the public DEVELOPMENT key, which anyone can forge with');
    return signer;
  } catch (error) {
    if (!(error instanceof SigningKeyError)) throw error;
    process.stderr.write(`${service}: Invalid configuration: AUDIT_SIGNING_KEY ${error.message}\n`);
    process.exit(2);
  }
}

/**
 * The key that wraps the subject keys at rest, from `AUDIT_KEY_ENCRYPTION_KEY` (keys.ts).
 * Unset outside production: none, with a warning (the subject keys sit in clear beside the
 * personal data they protect). A malformed key, or none in production, ends the process with
 * status 2 and a message naming the variable, before anything starts.
 */
export function serviceKeyEncryptionKey(service: string, text: string, warn: (message: string) => void): KeyEncryptionKey | null {
  if (text === '') {
    if (process.env.NODE_ENV === 'production') {
      process.stderr.write(`${service}: Invalid configuration: AUDIT_KEY_ENCRYPTION_KEY is required in production: the subject keys would be stored in clear beside the personal data they protect\n`);
      process.exit(2);
    }
    warn('audit: AUDIT_KEY_ENCRYPTION_KEY is unset: the subject keys are stored in clear, so the database alone opens the personal data they protect');
    return null;
  }
  try {
    return parseKeyEncryptionKey(text);
  } catch (error) {
    if (!(error instanceof KeyEncryptionKeyError)) throw error;
    process.stderr.write(`${service}: Invalid configuration: AUDIT_KEY_ENCRYPTION_KEY ${error.message}\n`);
    process.exit(2);
  }
}

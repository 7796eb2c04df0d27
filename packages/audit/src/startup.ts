/**
 * What a service's `main` needs to start its part of the audit trail, shared so that every
 * service checks the signing key the same way (docs/audit.md).
 */
import { loadSigningKey, SigningKeyError, type CheckpointSigner } from './keys.ts';

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

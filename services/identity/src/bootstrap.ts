/**
 * First-run bootstrap: an admin user and one service client from the environment, created only
 * when absent, so a fresh system can issue its first tokens and a restart changes nothing.
 */
import { IdentityError, type Identity } from '@ledgerline/identity';
import { ROLES } from '@ledgerline/authz';
import { list, type IdentityConfig } from './config.ts';

export interface BootstrapLog {
  info(object: object, message: string): void;
}

export async function bootstrap(identity: Identity, config: IdentityConfig, log: BootstrapLog): Promise<void> {
  const username = config.IDENTITY_BOOTSTRAP_ADMIN_USERNAME;
  const password = config.IDENTITY_BOOTSTRAP_ADMIN_PASSWORD;
  if (username !== undefined && password !== undefined) {
    await ignoreConflict(identity.createUser({ username, password, roles: [ROLES.admin] }), () =>
      log.info({ username }, 'identity: bootstrap admin user created'),
    );
  }
  const clientId = config.IDENTITY_BOOTSTRAP_CLIENT_ID;
  const secret = config.IDENTITY_BOOTSTRAP_CLIENT_SECRET;
  if (clientId !== undefined && secret !== undefined) {
    const roles = list(config.IDENTITY_BOOTSTRAP_CLIENT_ROLES);
    const audiences = list(config.IDENTITY_BOOTSTRAP_CLIENT_AUDIENCES);
    await ignoreConflict(identity.createClient({ id: clientId, secret, roles, audiences }), () =>
      log.info({ clientId, roles, audiences }, 'identity: bootstrap service client created'),
    );
  }
}

/** An existing user or client is left exactly as it is: the bootstrap never overwrites credentials. */
async function ignoreConflict(call: Promise<unknown>, onCreated: () => void): Promise<void> {
  try {
    await call;
    onCreated();
  } catch (error) {
    if (!(error instanceof IdentityError && error.code === 'conflict')) throw error;
  }
}

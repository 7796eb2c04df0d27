/**
 * First-run bootstrap: an admin user and one service client from the environment, created only
 * when absent, so a fresh system can issue its first tokens and a restart changes nothing.
 * Each creation is an audit record (PCI DSS 10.2.1.5: accounts created), by the actor
 * `identity-bootstrap`; a restart that creates nothing records nothing.
 */
import type { AuditSink } from '@ledgerline/audit';
import { IdentityError, type Identity } from '@ledgerline/identity';
import { ROLES } from '@ledgerline/authz';
import { AUDIT_ACTIONS } from './app.ts';
import { list, type IdentityConfig } from './config.ts';

export interface BootstrapLog {
  info(object: object, message: string): void;
}

/** The actor of the bootstrap's records: the service itself, configured by its environment. */
export const BOOTSTRAP_ACTOR = { type: 'service', id: 'identity-bootstrap' } as const;

export async function bootstrap(identity: Identity, config: IdentityConfig, log: BootstrapLog, audit: AuditSink): Promise<void> {
  const recorded = (action: string, resource: { type: string; id: string }, payload: Record<string, unknown>) => (outcome: 'success' | 'failure', reason?: string) =>
    audit.record({ recordClass: 'access', action, actor: BOOTSTRAP_ACTOR, origin: { service: 'identity' }, resource, outcome, payload, ...(reason === undefined ? {} : { reason }) });
  const username = config.IDENTITY_BOOTSTRAP_ADMIN_USERNAME;
  const password = config.IDENTITY_BOOTSTRAP_ADMIN_PASSWORD;
  if (username !== undefined && password !== undefined) {
    const roles = [ROLES.admin];
    let userId = '';
    const record = (outcome: 'success' | 'failure', reason?: string) => recorded(AUDIT_ACTIONS.userCreate, { type: 'user', id: username.toLowerCase() }, { user_id: userId || null, roles })(outcome, reason);
    await ignoreConflict(identity.createUser({ username, password, roles }).then((user) => { userId = user.id; }), record, () =>
      log.info({ username }, 'identity: bootstrap admin user created'),
    );
  }
  const clientId = config.IDENTITY_BOOTSTRAP_CLIENT_ID;
  const secret = config.IDENTITY_BOOTSTRAP_CLIENT_SECRET;
  if (clientId !== undefined && secret !== undefined) {
    const roles = list(config.IDENTITY_BOOTSTRAP_CLIENT_ROLES);
    const audiences = list(config.IDENTITY_BOOTSTRAP_CLIENT_AUDIENCES);
    const record = recorded(AUDIT_ACTIONS.clientCreate, { type: 'client', id: clientId }, { roles, audiences, authentication: 'client_secret' });
    await ignoreConflict(identity.createClient({ id: clientId, secret, roles, audiences }), record, () =>
      log.info({ clientId, roles, audiences }, 'identity: bootstrap service client created'),
    );
  }
}

/**
 * An existing user or client is left exactly as it is: the bootstrap never overwrites credentials.
 * A creation is recorded, and so is a failure other than the account existing (which stops the start).
 */
async function ignoreConflict(call: Promise<unknown>, record: (outcome: 'success' | 'failure', reason?: string) => void, onCreated: () => void): Promise<void> {
  try {
    await call;
  } catch (error) {
    if (error instanceof IdentityError && error.code === 'conflict') return;
    record('failure', error instanceof IdentityError ? error.code : 'error');
    throw error;
  }
  record('success');
  onCreated();
}

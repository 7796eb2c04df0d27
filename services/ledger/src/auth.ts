/**
 * Who may do what in the ledger service: each route's resource attributes, found and handed to
 * the authorization engine (`@ledgerline/authz`) before the handler touches money.
 *
 * Ownership: an account belongs to the principal whose id (the token's `sub`) is stored in the
 * account's `metadata.owner` when the account is opened (by a teller; an admin opens only
 * accounts with no owner, and customers none). Account metadata is immutable in the engine (a retry with different
 * metadata is `exists_with_different_metadata`), so ownership cannot be changed after the fact.
 * An account without an owner belongs to nobody, so "own account" rules never match it.
 * "Own account" is checked on every read of an account or a transfer (a transfer is the
 * customer's if either side is theirs) and on the debit side of every transfer created. A
 * transfer to create also carries its flags and its credit side's owner: in the reference
 * policy a customer may set the flags that act on the credit account (closing_credit,
 * balancing_credit) or post or void a pending transfer only between two accounts of their own.
 * A post or void takes both sides from the pending transfer it resolves.
 *
 * Owners are looked up only when a rule that could grant the permission to the principal's
 * roles reads them (customers, in the reference policy), so staff and services pay nothing.
 */
import type { FastifyRequest } from 'fastify';
import { installHttpAuth, type Authorizer, type HttpAuthOptions, type Principal, type ResourceAttributes } from '@ledgerline/authz';
import type { LedgerEngine, NewAccount, NewTransfer } from '@ledgerline/ledger';
import type { Service } from '@ledgerline/service-runtime';

/** `closingCredit` as the HTTP API and the policy spell it: `closing_credit`. */
function snakeCase(name: string): string {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/** The account metadata key that holds the owner's principal id. */
export const OWNER_METADATA_KEY = 'owner';

export interface LedgerAuthOptions {
  /** Verifies an access token whose audience is this service (see `createTokenVerifier`). */
  verify: (token: string) => Promise<Principal>;
  authorizer: Authorizer;
  /** Authentication failures allowed per client address and in all before 429s recorded together (`installHttpAuth`'s options; its defaults unless given). */
  failures?: Pick<HttpAuthOptions, 'failureLimit' | 'failureTotalLimit' | 'unverifiableRecordsPerSecond'>;
}

/** Authorization calls for the ledger's routes; each throws a 403 problem on deny. */
export interface LedgerGuard {
  /** The idempotency scope of the request: its principal, or undefined when auth is off. */
  clientId(request: FastifyRequest): string | undefined;
  allow(request: FastifyRequest, resource: ResourceAttributes): void;
  accounts(request: FastifyRequest, accounts: readonly NewAccount[]): void;
  account(request: FastifyRequest, accountId: string): Promise<void>;
  transfer(request: FastifyRequest, transferId: string): Promise<void>;
  newTransfers(request: FastifyRequest, transfers: readonly NewTransfer[]): Promise<void>;
}

/** For a service built without `auth` (tests, local benchmarks with LEDGER_AUTH=disabled): allows everything. */
export const OPEN_GUARD: LedgerGuard = {
  clientId: () => undefined,
  allow: () => undefined,
  accounts: () => undefined,
  account: () => Promise.resolve(),
  transfer: () => Promise.resolve(),
  newTransfers: () => Promise.resolve(),
};

export function createLedgerGuard(app: Service, engine: LedgerEngine, options: LedgerAuthOptions): LedgerGuard {
  const auth = installHttpAuth(app, {
    verify: options.verify,
    authorizer: options.authorizer,
    service: 'ledger',
    ...options.failures,
  });

  async function ownerOf(accountId: string | null | undefined): Promise<string | undefined> {
    if (accountId === undefined || accountId === null) return undefined;
    const account = await engine.getAccount(accountId);
    return account?.metadata[OWNER_METADATA_KEY];
  }

  const owners = (...found: (string | undefined)[]): string[] => found.filter((o) => o !== undefined);

  /**
   * The attributes of a transfer to create: amount, ledger, flags, and (when a rule reads them)
   * the owners of both sides. A post or void acts on its pending transfer, so its sides, and
   * unless given its amount and ledger, are the pending one's (never the request's, which the
   * engine would refuse if they differed anyway). The flags are the request's, snake_case as
   * the HTTP API spells them, so that the policy can refuse those that act on the credit side.
   */
  async function transferAttributes(request: FastifyRequest, transfer: NewTransfer): Promise<ResourceAttributes> {
    const pending = transfer.pendingId === undefined ? null : await engine.getTransfer(transfer.pendingId);
    const debitAccountId = pending?.debitAccountId ?? transfer.debitAccountId;
    const creditAccountId = pending?.creditAccountId ?? transfer.creditAccountId;
    const amount = transfer.amount ?? pending?.amount;
    const ledger = transfer.ledger ?? pending?.ledger ?? undefined;
    const flags = Object.entries(transfer.flags ?? {}).filter(([, on]) => on).map(([name]) => snakeCase(name));
    return {
      type: 'transfer',
      id: transfer.id,
      ...(amount === undefined ? {} : { amount }),
      ...(ledger === undefined ? {} : { ledger }),
      flags,
      ...(auth.needsOwners(request) ? { owners: owners(await ownerOf(debitAccountId)), creditOwners: owners(await ownerOf(creditAccountId)) } : {}),
    };
  }

  return {
    // The plugin stores an id too long for its key store (a 255-character subject) as its hash.
    clientId: (request) => {
      const p = auth.principal(request);
      return `${p.kind}:${p.id}`;
    },
    allow: (request, resource) => {
      auth.authorize(request, resource);
    },
    accounts: (request, accounts) => {
      // Its owner-to-be, as `owners`: who may open an account for someone is a rule's to say.
      for (const a of accounts) auth.authorize(request, { type: 'account', id: a.id, ledger: a.ledger, owners: owners(a.metadata?.[OWNER_METADATA_KEY]) });
    },
    account: async (request, accountId) => {
      const found = auth.needsOwners(request) ? { owners: owners(await ownerOf(accountId)) } : {};
      auth.authorize(request, { type: 'account', id: accountId, ...found });
    },
    transfer: async (request, transferId) => {
      let found = {};
      if (auth.needsOwners(request)) {
        const t = await engine.getTransfer(transferId);
        found = { owners: owners(await ownerOf(t?.debitAccountId), await ownerOf(t?.creditAccountId)) };
      }
      auth.authorize(request, { type: 'transfer', id: transferId, ...found });
    },
    // Every transfer of a batch is decided (and audited) before any is applied: one deny refuses the batch.
    newTransfers: async (request, transfers) => {
      for (const t of transfers) auth.authorize(request, await transferAttributes(request, t));
    },
  };
}

/**
 * The least-privilege roles of the reference system. Each role holds only what its job needs:
 * nobody but a money-moving role may create transfers, and nobody but the two oversight roles
 * may read the audit trail. Reads that reveal other people's money are limited to staff.
 */
import type { Permission, Policy } from './policy.ts';

export const ROLES = {
  customer: 'customer',
  teller: 'teller',
  complianceOfficer: 'compliance_officer',
  auditor: 'auditor',
  admin: 'admin',
} as const;

/** The prefix of every service role: only service clients hold such roles, and only they do (identity refuses the rest). */
export const SERVICE_ROLE_PREFIX = 'svc:';

/** One role per reference service, held by that service's client identity. */
export const SERVICE_ROLES = {
  gateway: 'svc:gateway',
  identity: 'svc:identity',
  ledger: 'svc:ledger',
  payments: 'svc:payments',
  risk: 'svc:risk',
  fx: 'svc:fx',
  notifications: 'svc:notifications',
  audit: 'svc:audit',
  reporting: 'svc:reporting',
  settlement: 'svc:settlement',
} as const;

export const ALL_ROLES: readonly string[] = [...Object.values(ROLES), ...Object.values(SERVICE_ROLES)];

/** The permissions the reference system's services check. */
export const PERMISSIONS = {
  ledgerRead: 'ledger:read',
  accountCreate: 'account:create',
  accountRead: 'account:read',
  transferCreate: 'transfer:create',
  transferRead: 'transfer:read',
  auditRead: 'audit:read',
  userCreate: 'user:create',
  keyRotate: 'key:rotate',
  /** Managing one's own credentials (two-factor enrolment). */
  selfManage: 'self:manage',
} as const satisfies Record<string, Permission>;

/**
 * Ledgers people may move money in by themselves: the seeded ledgers with two decimal places,
 * so that one amount limit in minor units means the same value in each (10,000.00).
 */
export const PERSONAL_LEDGERS: readonly string[] = ['USD', 'EUR', 'GBP', 'CHF'];

/** A customer moves at most 10,000.00 per transfer; a teller, on a customer's behalf, at most 50,000.00. */
export const CUSTOMER_TRANSFER_MAX_MINOR = 1_000_000n;
export const TELLER_TRANSFER_MAX_MINOR = 5_000_000n;

/** Branch hours: Monday to Friday, 08:00 to 18:00 UTC. */
const BRANCH_HOURS = { days: [1, 2, 3, 4, 5], startHour: 8, endHour: 18, utcOffsetMinutes: 0 };

const P = PERMISSIONS;
const R = ROLES;
const S = SERVICE_ROLES;

/**
 * The flags a customer may set on a transfer from an own account to anyone's account. Left out:
 * `closing_credit` and `balancing_credit`, which act on the credit account (close it, or size the
 * amount by its balance), and `post_pending_transfer` / `void_pending_transfer`: the ledger does
 * not record who created a pending transfer, so a hold a service or a teller placed on the
 * customer's account must not be released or captured by the customer. The second customer
 * rule allows every flag between two accounts the customer owns, where nobody else is affected.
 */
export const CUSTOMER_TRANSFER_FLAGS: readonly string[] = ['linked', 'pending', 'balancing_debit', 'closing_debit'];

/**
 * The roles an admin may give a user over HTTP: a customer's only. A role that could create a
 * teller, a compliance officer, an auditor or another admin could move money, or read the audit
 * trail, through the account it made, and the reference system has no second person to approve
 * such a grant; staff accounts come from an operator with the deployment's credentials
 * (`npm run identity -- create-user`, recorded) or the bootstrap.
 */
export const ADMIN_GRANTABLE_ROLES: readonly string[] = [ROLES.customer];
// (And an admin opens accounts with no owner only, rule admin-opens-house-accounts: one that
// made a customer could otherwise open an account owned by it and move money as it.)

export const REFERENCE_POLICY: Policy = {
  version: '2026-12-07.1',
  // Every rule names the kind of principal it is for: a service role in a user's token (or a
  // person's role in a client's) grants nothing.
  rules: [
    { id: 'everyone-reads-ledgers', kind: 'user', roles: [R.customer, R.teller, R.complianceOfficer, R.auditor, R.admin], permissions: [P.ledgerRead] },
    { id: 'services-read-ledgers', kind: 'service', roles: [S.payments, S.reporting, S.settlement, S.risk, S.fx], permissions: [P.ledgerRead] },
    { id: 'customer-reads-own', kind: 'user', roles: [R.customer], permissions: [P.accountRead, P.transferRead], when: { ownAccount: true } },
    {
      id: 'customer-transfers-from-own',
      kind: 'user',
      roles: [R.customer],
      permissions: [P.transferCreate],
      when: { ownAccount: true, amountMax: CUSTOMER_TRANSFER_MAX_MINOR, ledgerIn: PERSONAL_LEDGERS, flagsIn: CUSTOMER_TRANSFER_FLAGS },
    },
    {
      id: 'customer-transfers-between-own',
      kind: 'user',
      roles: [R.customer],
      permissions: [P.transferCreate],
      when: { ownAccount: true, ownCreditAccount: true, amountMax: CUSTOMER_TRANSFER_MAX_MINOR, ledgerIn: PERSONAL_LEDGERS },
    },
    { id: 'staff-reads-accounts', kind: 'user', roles: [R.teller, R.complianceOfficer, R.auditor, R.admin], permissions: [P.accountRead, P.transferRead] },
    { id: 'account-opening', kind: 'user', roles: [R.teller], permissions: [P.accountCreate] },
    // An admin opens the house's accounts, never a person's: one that could open an account for a
    // customer it made (with a password it chose) could move money through it.
    { id: 'admin-opens-house-accounts', kind: 'user', roles: [R.admin], permissions: [P.accountCreate], when: { noOwner: true } },
    {
      id: 'teller-transfers-in-hours',
      kind: 'user',
      roles: [R.teller],
      permissions: [P.transferCreate],
      when: { amountMax: TELLER_TRANSFER_MAX_MINOR, ledgerIn: PERSONAL_LEDGERS, businessHours: BRANCH_HOURS },
    },
    { id: 'oversight-reads-audit', kind: 'user', roles: [R.complianceOfficer, R.auditor], permissions: [P.auditRead] },
    { id: 'people-manage-own-credentials', kind: 'user', roles: [R.customer, R.teller, R.complianceOfficer, R.auditor, R.admin], permissions: [P.selfManage], when: { ownAccount: true } },
    { id: 'admin-creates-customers', kind: 'user', roles: [R.admin], permissions: [P.userCreate], when: { grantsIn: ADMIN_GRANTABLE_ROLES } },
    { id: 'admin-rotates-keys', kind: 'user', roles: [R.admin], permissions: [P.keyRotate] },
    { id: 'services-move-money', kind: 'service', roles: [S.payments, S.settlement], permissions: [P.transferCreate, P.transferRead, P.accountRead] },
    { id: 'services-read-money', kind: 'service', roles: [S.reporting, S.risk], permissions: [P.accountRead, P.transferRead] },
    { id: 'audit-service-reads-audit', kind: 'service', roles: [S.audit], permissions: [P.auditRead] },
  ],
};

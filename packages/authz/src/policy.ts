/**
 * The policy language: roles grant `resource:action` permissions through rules, and a rule may
 * carry attribute conditions. Policies are plain data so that they can be versioned, reviewed
 * and recorded beside every decision; `compilePolicy` turns one into closures.
 */

/** A permission, written `resource:action`, for example `transfer:create`. */
export type Permission = `${string}:${string}`;

/** Who asks: the verified claims of an access token, reduced to what decisions need. */
export interface Principal {
  /** The token's `sub`: a user id, or a service client id. */
  id: string;
  kind: 'user' | 'service';
  roles: readonly string[];
  /** The tenant the principal belongs to, when the deployment is multi-tenant. */
  tenant?: string;
}

/**
 * What is asked about. Every attribute is optional: a condition whose attribute is absent
 * fails, so leaving one out can only deny, never allow.
 */
export interface ResourceAttributes {
  type: string;
  id: string;
  /** Amount in minor units, compared as a bigint (never a float). */
  amount?: bigint;
  /** Ledger (currency or asset) code. */
  ledger?: string;
  /** Owners of the accounts the request touches, as the ownership rule defines them. */
  owners?: readonly string[];
  /**
   * Owners of a transfer's credit account. `owners` holds only the debit side's for a transfer
   * to create (paying anyone from one's own account is the point), so what acts on the credit
   * account itself (closing it, balancing against it, posting or voiding a hold into it) is
   * decided on this.
   */
  creditOwners?: readonly string[];
  /** The flags a transfer to create sets (`pending`, `closing_credit`, ...); empty for none. */
  flags?: readonly string[];
  /** The roles the request gives someone (a user to create); empty for none. */
  grants?: readonly string[];
  tenant?: string;
}

/**
 * Business hours: `[startHour, endHour)` on the listed weekdays (0 = Sunday), in a fixed
 * offset from UTC. A fixed offset, not a time zone name, keeps the check pure and free of
 * daylight-saving surprises; a deployment with DST states two policy versions.
 */
export interface BusinessHours {
  days: readonly number[];
  startHour: number;
  endHour: number;
  utcOffsetMinutes: number;
}

/** Conditions of one rule; all that are present must hold. */
export interface Conditions {
  /** The amount is present and at most this many minor units. */
  amountMax?: bigint;
  /** The ledger is present and one of these. */
  ledgerIn?: readonly string[];
  /** The principal's id is among the resource's owners (and there is at least one owner). */
  ownAccount?: true;
  /** The principal's id is among the owners of the transfer's credit account. */
  ownCreditAccount?: true;
  /** The owners are present and there are none (an account opened for nobody). */
  noOwner?: true;
  /** The flags are present and each one is in this set (none set passes). */
  flagsIn?: readonly string[];
  /** The roles granted are present and each one is in this set (none granted passes). */
  grantsIn?: readonly string[];
  /** The decision's clock reads inside these hours. */
  businessHours?: BusinessHours;
  /** The principal and the resource carry the same tenant. */
  sameTenant?: true;
}

export interface Rule {
  /** Unique within the policy; recorded with each decision it decides. */
  id: string;
  /**
   * The kind of principal the rule is for. Roles are only names in a token, so without this a
   * user given a service's role (by mistake or by a rogue admin) would get the service's
   * rights; with it, a service rule never applies to a user, nor a people rule to a service.
   * Absent: any kind.
   */
  kind?: Principal['kind'];
  roles: readonly string[];
  permissions: readonly Permission[];
  when?: Conditions;
}

export interface Policy {
  /** Recorded with every decision, so a decision can be replayed against the policy that made it. */
  version: string;
  rules: readonly Rule[];
}

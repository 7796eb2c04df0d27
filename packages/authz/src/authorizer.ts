/**
 * `Authorizer`: a compiled policy, a clock and an audit sink. Every call to `check` is one
 * decision and one audit entry, allow or deny, so no code path can decide without recording:
 * when the trail refuses the entry (its buffer at its bound), `check` throws
 * `DecisionUnrecordedError` carrying the decision, never the decision alone.
 */
import { AuditBufferFullError, type AuditEntry, type AuditOrigin, type AuditSink } from '@ledgerline/audit';
import { SUMMARY_ADDRESSES_MAX, type AuthFailureLimit, type ThrottleSummary } from './failure-throttle.ts';
import { compilePolicy, type CompiledPolicy, type Decision } from './engine.ts';
import type { Permission, Policy, Principal, ResourceAttributes } from './policy.ts';

export interface AuthorizerOptions {
  policy: Policy;
  audit: AuditSink;
  /** Milliseconds since the epoch; business-hour rules read it. */
  clock?: () => number;
}

/** A verifier's message is cut to this in the record: audit fields are bounded. */
const AUTHN_FAILURE_CHARS_MAX = 200;

/**
 * The trail refused a decision's record (AuditBufferFullError, its cause). It carries the
 * decision that was made, so the caller answers that one (installHttpAuth: a deny as a deny, an
 * allow refused 503) and never decides again without a record.
 */
export class DecisionUnrecordedError extends Error {
  override readonly name = 'DecisionUnrecordedError';
  readonly decision: Decision;

  constructor(decision: Decision, cause: AuditBufferFullError) {
    super(`the audit trail refused the record of a decision (${decision.allowed ? 'allow' : 'deny'}): ${cause.message}`, { cause });
    this.decision = decision;
  }
}

/** The audit action of every access decision. */
export const DECISION_ACTION = 'authz.decision';

export class Authorizer {
  readonly policy: CompiledPolicy;
  readonly #audit: AuditSink;
  readonly #clock: () => number;

  constructor(options: AuthorizerOptions) {
    this.policy = compilePolicy(options.policy);
    this.#audit = options.audit;
    this.#clock = options.clock ?? Date.now;
  }

  /**
   * Decides and records. `principal` null means the request carried no valid credentials;
   * `authnFailure` then says why (a missing token, an expired one), for the audit record.
   */
  check(principal: Principal | null, permission: Permission, resource: ResourceAttributes, origin: AuditOrigin, authnFailure?: string): Decision {
    const decided = this.policy.decide(principal, permission, resource, this.#clock());
    const decision = authnFailure === undefined ? decided : { ...decided, reason: `${decided.reason}: ${authnFailure.slice(0, AUTHN_FAILURE_CHARS_MAX)}` };
    try {
      this.#audit.record(decisionEntry(decision, principal, resource, origin));
    } catch (error) {
      if (error instanceof AuditBufferFullError) throw new DecisionUnrecordedError(decision, error);
      throw error;
    }
    return decision;
  }

  /**
   * Records the requests refused together because their address was over its limit of
   * authentication failures (failure-throttle.ts): one record for many, where each would
   * otherwise have had its own decision.
   */
  recordThrottled(summary: ThrottleSummary, limits: { limit: AuthFailureLimit; totalLimit: AuthFailureLimit }, service: string): void {
    const { limit, totalLimit } = limits;
    const who = summary.addresses === 1 ? 'the address' : `${summary.addresses} addresses (each below the ${SUMMARY_ADDRESSES_MAX} refused most, named in records of their own)`;
    this.#audit.record({
      recordClass: 'access',
      actor: { type: 'anonymous', id: 'anonymous' },
      action: THROTTLED_ACTION,
      outcome: 'failure',
      reason:
        `${summary.refused} request(s) without valid credentials refused (429) from ${who}: over ${limit.ratePerSecond} authentication failures a second ` +
        `(burst ${limit.burst}) from one address, or ${totalLimit.ratePerSecond} (burst ${totalLimit.burst}) from all`,
      origin: { service },
      resource: { type: 'client-address', id: summary.address },
      occurredAt: summary.to,
      payload: {
        refused: summary.refused,
        addresses: summary.addresses,
        from: summary.from.toISOString(),
        to: summary.to.toISOString(),
        ratePerSecond: limit.ratePerSecond,
        burst: limit.burst,
        totalRatePerSecond: totalLimit.ratePerSecond,
        totalBurst: totalLimit.burst,
      },
    });
  }
}

/** The action of a record of requests refused over the authentication failure limit. */
export const THROTTLED_ACTION = 'authz.authentication.throttled';

/** The audit record of one decision (PCI DSS 10.2.2: who, what, when, outcome, origin, resource). */
export function decisionEntry(decision: Decision, principal: Principal | null, resource: ResourceAttributes, origin: AuditOrigin): AuditEntry {
  return {
    recordClass: 'access',
    actor: principal === null ? { type: 'anonymous', id: 'anonymous' } : { type: principal.kind === 'service' ? 'service' : 'user', id: principal.id },
    action: DECISION_ACTION,
    outcome: decision.allowed ? 'success' : 'failure',
    reason: decision.reason,
    origin,
    resource: { type: resource.type, id: resource.id },
    payload: {
      decision: decision.allowed ? 'allow' : 'deny',
      permission: decision.permission,
      rule: decision.rule,
      policyVersion: decision.policyVersion,
      roles: principal === null ? [] : [...principal.roles],
      ...(resource.amount === undefined ? {} : { amount: resource.amount.toString() }),
      ...(resource.ledger === undefined ? {} : { ledger: resource.ledger }),
      ...(resource.grants === undefined ? {} : { grants: [...resource.grants] }),
    },
  };
}

/**
 * A small compiled policy engine. `compilePolicy` validates a policy once and indexes its
 * rules by permission, each with its conditions turned into one closure; `decide` is then a
 * map lookup, a role test and a few comparisons, with no allocation but the decision itself.
 *
 * Why not CASL: CASL answers "may this ability do that", but an ability is built per principal
 * (defineAbility per request, or a cache keyed by every attribute a condition reads), its
 * conditions read the subject object only (the clock, the principal's id and tenant must be
 * copied into it), and the decision record wants the rule that decided and why the others
 * failed, which CASL reports only in part (`relevantRuleFor` gives the rule, not the failing
 * condition). The engine below is ~150 lines, deny by default, and records all of that.
 */
import type { BusinessHours, Conditions, Permission, Policy, Principal, ResourceAttributes, Rule } from './policy.ts';

export interface Decision {
  allowed: boolean;
  permission: Permission;
  /** The rule that allowed; on a deny, the last rule that applied to the principal but whose condition failed, if any. */
  rule: string | null;
  /** Why: `allowed`, `unauthenticated`, `no rule grants <permission> to roles [...]`, or the failed condition. */
  reason: string;
  policyVersion: string;
}

/** A condition check: null when it holds, otherwise why not. */
type Check = (principal: Principal, resource: ResourceAttributes, nowMs: number) => string | null;

interface CompiledRule {
  id: string;
  kind: Principal['kind'] | undefined;
  roles: ReadonlySet<string>;
  check: Check;
}

export interface CompiledPolicy {
  readonly version: string;
  /** Deny by default: allowed only when a rule grants the permission to one of the principal's roles and its conditions hold. */
  decide(principal: Principal | null, permission: Permission, resource: ResourceAttributes, nowMs: number): Decision;
  /** Whether any rule that could grant this permission to these roles reads resource owners (so the caller must load them). */
  needsOwners(roles: readonly string[], permission: Permission): boolean;
  /** The permissions a role holds under some condition, for documentation and tests. */
  permissionsOf(role: string): ReadonlySet<Permission>;
}

const PERMISSION_PATTERN = /^[a-z][a-z0-9_-]*:[a-z][a-z0-9_-]*$/;
const MS_PER_MINUTE = 60_000;
const MINUTES_PER_DAY = 1440;

/** Throws on a malformed policy, so a bad one stops the service at start rather than denying or allowing oddly. */
export function compilePolicy(policy: Policy): CompiledPolicy {
  if (policy.version.length === 0) throw new TypeError('policy version must not be empty');
  const byPermission = new Map<Permission, CompiledRule[]>();
  const ownerRules = new Set<string>();
  const ids = new Set<string>();
  for (const rule of policy.rules) {
    if (ids.has(rule.id)) throw new TypeError(`policy rule id ${rule.id} is not unique`);
    ids.add(rule.id);
    if (rule.roles.length === 0) throw new TypeError(`policy rule ${rule.id} names no role`);
    if (rule.kind !== undefined && rule.kind !== 'user' && rule.kind !== 'service') throw new TypeError(`policy rule ${rule.id}: kind must be user or service`);
    const compiled: CompiledRule = { id: rule.id, kind: rule.kind, roles: new Set(rule.roles), check: compileConditions(rule) };
    if (rule.when?.ownAccount === true || rule.when?.ownCreditAccount === true) ownerRules.add(rule.id);
    for (const permission of rule.permissions) {
      if (!PERMISSION_PATTERN.test(permission)) throw new TypeError(`policy rule ${rule.id}: malformed permission ${permission}`);
      const list = byPermission.get(permission) ?? [];
      list.push(compiled);
      byPermission.set(permission, list);
    }
  }
  const version = policy.version;

  function decide(principal: Principal | null, permission: Permission, resource: ResourceAttributes, nowMs: number): Decision {
    if (principal === null) return { allowed: false, permission, rule: null, reason: 'unauthenticated', policyVersion: version };
    let failed: CompiledRule | null = null;
    let failure = '';
    for (const rule of byPermission.get(permission) ?? []) {
      if (!holdsAnyRole(rule.roles, principal.roles) || (rule.kind !== undefined && rule.kind !== principal.kind)) continue;
      const why = rule.check(principal, resource, nowMs);
      if (why === null) return { allowed: true, permission, rule: rule.id, reason: 'allowed', policyVersion: version };
      failed = rule;
      failure = why;
    }
    if (failed !== null) return { allowed: false, permission, rule: failed.id, reason: failure, policyVersion: version };
    return {
      allowed: false,
      permission,
      rule: null,
      reason: `no rule grants ${permission} to roles [${principal.roles.join(', ')}]`,
      policyVersion: version,
    };
  }

  return {
    version,
    decide,
    needsOwners: (roles, permission) =>
      (byPermission.get(permission) ?? []).some((r) => ownerRules.has(r.id) && holdsAnyRole(r.roles, roles)),
    permissionsOf: (role) =>
      new Set(policy.rules.filter((r) => r.roles.includes(role)).flatMap((r) => r.permissions)),
  };
}

function holdsAnyRole(ruleRoles: ReadonlySet<string>, roles: readonly string[]): boolean {
  for (const role of roles) if (ruleRoles.has(role)) return true;
  return false;
}

/** One closure per rule; conditions run cheapest first and the first failure names itself. */
function compileConditions(rule: Rule): Check {
  const when: Conditions = rule.when ?? {};
  const checks: Check[] = [];
  if (when.sameTenant === true) {
    checks.push((p, r) => (p.tenant !== undefined && p.tenant === r.tenant ? null : 'tenant differs'));
  }
  if (when.ledgerIn !== undefined) {
    const ledgers = new Set(when.ledgerIn);
    checks.push((_p, r) => (r.ledger !== undefined && ledgers.has(r.ledger) ? null : 'ledger not allowed'));
  }
  if (when.amountMax !== undefined) {
    const max = when.amountMax;
    if (typeof max !== 'bigint' || max < 0n) throw new TypeError(`policy rule ${rule.id}: amountMax must be a non-negative bigint`);
    checks.push((_p, r) => (typeof r.amount === 'bigint' && r.amount <= max ? null : 'amount above limit'));
  }
  if (when.ownAccount === true) {
    checks.push((p, r) => (r.owners !== undefined && r.owners.includes(p.id) ? null : 'not own account'));
  }
  if (when.ownCreditAccount === true) {
    checks.push((p, r) => (r.creditOwners !== undefined && r.creditOwners.includes(p.id) ? null : 'not own credit account'));
  }
  if (when.noOwner === true) {
    checks.push((_p, r) => (r.owners !== undefined && r.owners.length === 0 ? null : 'has an owner'));
  }
  if (when.flagsIn !== undefined) {
    const allowed = new Set(when.flagsIn);
    checks.push((_p, r) => (r.flags !== undefined && r.flags.every((f) => allowed.has(f)) ? null : 'flags not allowed'));
  }
  if (when.grantsIn !== undefined) {
    const grantable = new Set(when.grantsIn);
    checks.push((_p, r) => (r.grants !== undefined && r.grants.every((g) => grantable.has(g)) ? null : 'role not grantable'));
  }
  if (when.businessHours !== undefined) {
    const inHours = compileBusinessHours(rule.id, when.businessHours);
    checks.push((_p, _r, nowMs) => (inHours(nowMs) ? null : 'outside business hours'));
  }
  if (checks.length === 0) return () => null;
  return (p, r, nowMs) => {
    for (const check of checks) {
      const why = check(p, r, nowMs);
      if (why !== null) return why;
    }
    return null;
  };
}

function compileBusinessHours(ruleId: string, hours: BusinessHours): (nowMs: number) => boolean {
  const { startHour, endHour, utcOffsetMinutes } = hours;
  const valid =
    Number.isInteger(startHour) && Number.isInteger(endHour) && startHour >= 0 && startHour < endHour && endHour <= 24 &&
    Number.isInteger(utcOffsetMinutes) && Math.abs(utcOffsetMinutes) <= 14 * 60 &&
    hours.days.every((d) => Number.isInteger(d) && d >= 0 && d <= 6);
  if (!valid) throw new TypeError(`policy rule ${ruleId}: malformed business hours`);
  const days = new Set(hours.days);
  return (nowMs) => {
    const localMinutes = Math.floor(nowMs / MS_PER_MINUTE) + utcOffsetMinutes;
    const dayIndex = Math.floor(localMinutes / MINUTES_PER_DAY);
    // 1970-01-01 was a Thursday (4).
    const weekday = (((dayIndex + 4) % 7) + 7) % 7;
    const minuteOfDay = localMinutes - dayIndex * MINUTES_PER_DAY;
    return days.has(weekday) && minuteOfDay >= startHour * 60 && minuteOfDay < endHour * 60;
  };
}
